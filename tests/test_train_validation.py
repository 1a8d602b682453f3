"""trainer/validation.py: the epoch rule, PNG paths, tracker logging, EMA swap-in/restore, scheduler config."""

import argparse
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from trainer import validation as V
from utils import grids


def test_should_validate_every_n_epochs_including_zero():
    """epoch % n == 0, epoch 0 included; never without prompts."""
    assert [e for e in range(7) if V.should_validate(e, 3, ["a"])] == [0, 3, 6]
    assert not V.should_validate(0, 1, None)


def test_save_images_layout(tmp_path):
    """OUTPUT_DIR/validation/step-<N>/<i>.png."""
    paths = V.save_images([Image.new("RGB", (4, 4)), Image.new("RGB", (4, 4))], tmp_path, 7)
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == ["validation/step-7/0.png", "validation/step-7/1.png"]
    assert all(p.is_file() for p in paths)


class FakeWriter:
    """Records SummaryWriter.add_images calls."""

    def __init__(self):
        """No calls yet."""
        self.calls = []

    def add_images(self, tag, images, step, dataformats):
        """Record the call."""
        self.calls.append((tag, images.shape, step, dataformats))


class FakeWandbTracker:
    """Records accelerate's wandb tracker log calls."""

    name = "wandb"

    def __init__(self):
        """Nothing logged yet."""
        self.logged = []

    def log(self, values, step):
        """Record the call."""
        self.logged.append((values, step))


def test_log_images_to_tensorboard_and_wandb(monkeypatch):
    """tensorboard: one NHWC batch under "validation"; wandb: images captioned "i: prompt"."""
    import sys

    fake_wandb = SimpleNamespace(Image=lambda image, caption: ("image", caption))
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb)
    tensorboard = SimpleNamespace(name="tensorboard", writer=FakeWriter())
    wandb_tracker = FakeWandbTracker()
    images = [Image.new("RGB", (8, 8)), Image.new("RGB", (8, 8))]
    V.log_images([tensorboard, wandb_tracker], images, ["a farm", "a river"], 3)
    assert tensorboard.writer.calls == [("validation", (2, 8, 8, 3), 3, "NHWC")]
    assert wandb_tracker.logged == [({"validation": [("image", "0: a farm"), ("image", "1: a river")]}, 3)]


def test_validation_uses_ema_weights_then_restores_training_weights(monkeypatch, tmp_path):
    """During validate() the UNet holds the EMA weights; afterwards the training weights, bit for bit."""
    from diffusers import UNet2DConditionModel
    from diffusers.training_utils import EMAModel

    from stand_in.tiny_model import build_scheduler, build_text_encoder, build_tokenizer, build_unet

    torch.manual_seed(0)
    unet = build_unet()
    ema = EMAModel(unet.parameters(), model_cls=UNet2DConditionModel, model_config=unet.config)
    ema.shadow_params = [torch.full_like(p, 0.5) for p in ema.shadow_params]
    training = [p.detach().clone() for p in unet.parameters()]
    seen = {}

    def fake_validate(accelerator, pipeline, args, step, weight_dtype):
        """Note whether the pipeline's UNet holds the EMA weights."""
        seen["ema_in_use"] = all(torch.all(p == 0.5) for p in pipeline.unet.parameters())
        return []

    monkeypatch.setattr(V, "validate", fake_validate)
    accelerator = SimpleNamespace(unwrap_model=lambda model: model)
    tokenizer = build_tokenizer()
    text_encoder = build_text_encoder(len(tokenizer)).requires_grad_(False)  # frozen, as in a full fine-tune
    components = SimpleNamespace(vae=None, text_encoder=text_encoder, tokenizer=tokenizer)
    V.validate_during_training(accelerator, components, unet, ema, build_scheduler(),
                               argparse.Namespace(), 1, torch.float32)
    assert seen["ema_in_use"]
    assert all(torch.equal(a, b) for a, b in zip(training, unet.parameters()))


def test_inference_scheduler_carries_the_trained_prediction_type(tiny_model_dir):
    """The base pipeline's scheduler class, with --prediction_type written into its config."""
    scheduler = V.load_inference_scheduler(str(tiny_model_dir), None, "v_prediction")
    assert scheduler.config.prediction_type == "v_prediction"
    assert V.load_inference_scheduler(str(tiny_model_dir), None, None).config.prediction_type == "epsilon"


def layout_for(prompts, columns: int):
    """The labelled grid's layout for 4 px tiles (enlarged to 128 px), prompts as row labels, steps above."""
    font = grids.label_font()
    return grids.grid_layout((128, 128), len(prompts), columns, grids.row_label_width(prompts, font),
                             grids.line_height(font))


def test_grid_is_a_labelled_row_per_prompt_at_the_final_step(tmp_path):
    """validation_grid.png: each prompt's image enlarged to 128 px in its own row, the step above, prompts at left."""
    colours = [(200, 0, 0), (0, 200, 0), (0, 0, 200)]
    prompts = ["a field", "a river", "a harbour"]
    path = V.save_grid([Image.new("RGB", (4, 4), colour) for colour in colours], prompts, 12, tmp_path)
    layout = layout_for(prompts, 1)
    sheet = Image.open(path)
    assert path == tmp_path / V.GRID_FILENAME and sheet.size == layout.size
    for row, colour in enumerate(colours):
        x, y = layout.origin(row, 0)
        assert sheet.getpixel((x, y)) == sheet.getpixel((x + 127, y + 127)) == colour
        assert sheet.getpixel((x + 128, y + 128)) == grids.BACKGROUND
    assert V.step_label(12) == "step 12" and V.step_label(V.BASE_STEP) == "base"


def write_step(output_dir, step: int, colours) -> None:
    """validation/step-<step>/<i>.png, one flat 4x4 image per prompt."""
    V.save_images([Image.new("RGB", (4, 4), colour) for colour in colours], output_dir, step)


def test_progress_has_the_base_first_then_each_step_in_order(tmp_path):
    """One row per prompt, one column per validation (base at step 0 first), steps in numeric order, each tile
    enlarged to 128 px."""
    for step, shade in ((16, 16), (0, 0), (112, 112), (32, 32)):
        write_step(tmp_path, step, [(shade, 0, 0), (0, shade, 0)])
    prompts = ["a field", "a river"]
    path = V.save_progress(tmp_path, 112, prompts)
    assert path == tmp_path / V.PROGRESS_FILENAME
    sheet = Image.open(path)
    layout = layout_for(prompts, 4)
    assert sheet.size == layout.size
    assert [sheet.getpixel(layout.origin(0, column))[0] for column in range(4)] == [0, 16, 32, 112]
    assert [sheet.getpixel(layout.origin(1, column))[1] for column in range(4)] == [0, 16, 32, 112]
    assert not list(tmp_path.glob("*.tmp"))


def test_progress_ignores_later_incomplete_and_foreign_folders(tmp_path):
    """Steps past the run's last step (an older, longer run), folders missing a prompt and odd names are left out."""
    write_step(tmp_path, 0, [(1, 1, 1), (1, 1, 1)])
    write_step(tmp_path, 8, [(2, 2, 2), (2, 2, 2)])
    write_step(tmp_path, 9, [(3, 3, 3)])
    write_step(tmp_path, 500, [(4, 4, 4), (4, 4, 4)])
    (tmp_path / "validation" / "step-x").mkdir()
    assert V.validation_steps(tmp_path, 10, 2) == [0, 8]
    assert Image.open(V.save_progress(tmp_path, 10, ["a", "b"])).size == layout_for(["a", "b"], 2).size
    assert V.save_progress(tmp_path / "empty", 10, ["a", "b"]) is None


def test_validation_draws_at_the_training_resolution():
    """A small base's default size (here 16 px) is not what is trained (32 px): validation asks for the latter."""
    calls = []

    class FakePipeline:
        """Records each call's keyword arguments."""

        def set_progress_bar_config(self, **kwargs):
            """Progress bars are irrelevant here."""

        def __call__(self, prompt, **kwargs):
            """One blank image per call."""
            calls.append(kwargs)
            return SimpleNamespace(images=[Image.new("RGB", (32, 32))])

    images = V.generate(FakePipeline(), ["a", "b"], 0, torch.device("cpu"), torch.float32, 32)
    assert len(images) == 2 and [(c["height"], c["width"]) for c in calls] == [(32, 32), (32, 32)]
    assert [c["guidance_scale"] for c in calls] == [7.5, 7.5]  # the reference's guidance unless asked otherwise
    V.generate(FakePipeline(), ["a"], 0, torch.device("cpu"), torch.float32, 32, guidance_scale=1.0)
    assert calls[-1]["guidance_scale"] == 1.0
