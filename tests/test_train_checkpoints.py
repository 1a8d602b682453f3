"""trainer/checkpoints.py: naming, pruning, resume resolution and position, atomic publish, exact state restore,
and checkpoints saved before the skipped-update counter."""

import logging
import shutil
from pathlib import Path

import pytest
import torch

from trainer import checkpoints as C
from utils.cli import UsageError


def make_dirs(root: Path, *names: str) -> None:
    """Create empty folders under root."""
    for name in names:
        (root / name).mkdir(parents=True)


def test_checkpoint_step_ignores_temp_and_odd_names():
    """Only checkpoint-<digits> counts."""
    assert C.checkpoint_step("checkpoint-12") == 12
    for name in (".checkpoint-12.partial", "checkpoint-12.tmp", "checkpoint-x", "checkpoint-", "logs"):
        assert C.checkpoint_step(name) is None


def test_list_sorts_numerically(tmp_path):
    """checkpoint-10 comes after checkpoint-9 (not string order); temp folders are skipped."""
    make_dirs(tmp_path, "checkpoint-10", "checkpoint-9", ".checkpoint-11.partial", "logs")
    assert [p.name for p in C.list_checkpoints(tmp_path)] == ["checkpoint-9", "checkpoint-10"]
    assert C.list_checkpoints(tmp_path / "missing") == []


@pytest.mark.parametrize("existing, limit, pruned", [
    (["checkpoint-2", "checkpoint-4"], 2, ["checkpoint-2"]),
    (["checkpoint-2", "checkpoint-4", "checkpoint-6"], 2, ["checkpoint-2", "checkpoint-4"]),
    (["checkpoint-2"], 2, []),
    (["checkpoint-2", "checkpoint-4"], None, []),
    (["checkpoint-2", "checkpoint-4"], 1, ["checkpoint-2", "checkpoint-4"]),
])
def test_prune_before_save_keeps_limit_minus_one(tmp_path, existing, limit, pruned):
    """Before a save, the oldest len − limit + 1 go, so the new one makes exactly `limit`."""
    make_dirs(tmp_path, *existing)
    chosen = C.checkpoints_to_prune(C.list_checkpoints(tmp_path), limit)
    assert [p.name for p in chosen] == pruned


def test_resolve_resume(tmp_path):
    """latest → newest finished; a name or a path → that folder; none → None; a bad value → usage error."""
    assert C.resolve_resume(tmp_path, None) is None
    assert C.resolve_resume(tmp_path, "latest") is None
    make_dirs(tmp_path, "checkpoint-2", "checkpoint-4", ".checkpoint-6.partial")
    assert C.resolve_resume(tmp_path, "latest").name == "checkpoint-4"
    assert C.resolve_resume(tmp_path, "checkpoint-2") == tmp_path / "checkpoint-2"
    assert C.resolve_resume(Path("/nonexistent"), str(tmp_path / "checkpoint-2")) == tmp_path / "checkpoint-2"
    with pytest.raises(UsageError, match="checkpoint-8"):
        C.resolve_resume(tmp_path, "checkpoint-8")


@pytest.mark.parametrize("step, per_epoch, ga, expected", [
    (0, 5, 1, (0, 0)), (4, 8, 1, (0, 4)), (8, 8, 1, (1, 0)), (3, 2, 4, (1, 4)),
])
def test_resume_position(step, per_epoch, ga, expected):
    """Epoch to restart in, and how many of its batches were already consumed (× accumulation)."""
    assert C.resume_position(step, per_epoch, ga) == expected


def test_publish_and_stale_cleanup(tmp_path):
    """publish_dir renames the temp folder into place (replacing an old one); stale temp folders are removed."""
    tmp, final = C.partial_dir(tmp_path, 4), tmp_path / "checkpoint-4"
    make_dirs(tmp_path, tmp.name, "checkpoint-4/old")
    (tmp / "new").mkdir()
    C.publish_dir(tmp, final)
    assert (final / "new").is_dir() and not (final / "old").exists() and not tmp.exists()
    make_dirs(tmp_path, ".checkpoint-6.partial", ".checkpoint-2.old")
    removed = {p.name for p in C.remove_stale_partials(tmp_path)}
    assert removed == {".checkpoint-6.partial", ".checkpoint-2.old"}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-4"]


def build_state(accelerator, seed: int):
    """A prepared tiny UNet, AdamW, LR scheduler and EMA with the trainer's checkpoint hooks."""
    from diffusers import UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from stand_in.tiny_model import build_unet

    torch.manual_seed(seed)
    unet = build_unet()
    ema = EMAModel(unet.parameters(), model_cls=UNet2DConditionModel, model_config=unet.config)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    scheduler = get_scheduler("linear", optimizer=optimizer, num_warmup_steps=2, num_training_steps=10)
    C.register_state_hooks(accelerator, ema)
    unet, optimizer, scheduler = accelerator.prepare(unet, optimizer, scheduler)
    return unet, optimizer, scheduler, ema


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps process-wide state: reset it after the test so later in-process users start clean."""
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_resume_restores_optimizer_ema_scheduler_and_weights_exactly(tmp_path, fresh_accelerate_state):
    """Save after 3 steps, load into fresh objects: every tensor and counter comes back equal."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    unet, optimizer, scheduler, ema = build_state(accelerator, seed=0)
    for _ in range(3):
        sample = torch.randn(1, 4, 8, 8)
        out = unet(sample, torch.tensor([5]), torch.randn(1, 77, 32)).sample
        accelerator.backward(out.pow(2).mean())
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        ema.step(unet.parameters())
    C.save_checkpoint(accelerator, tmp_path, 3, total_limit=None)
    assert (tmp_path / "checkpoint-3" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "checkpoint-3" / "unet_ema" / "config.json").is_file()

    fresh = Accelerator(cpu=True)
    unet2, optimizer2, scheduler2, ema2 = build_state(fresh, seed=1)
    fresh.load_state(str(C.resolve_resume(tmp_path, "latest")))
    for a, b in zip(unet.parameters(), unet2.parameters()):
        assert torch.equal(a, b)
    assert ema2.optimization_step == ema.optimization_step == 3
    for a, b in zip(ema.shadow_params, ema2.shadow_params):
        assert torch.equal(a, b)
    state, state2 = optimizer.state_dict()["state"], optimizer2.state_dict()["state"]
    assert state.keys() == state2.keys()
    for key in state:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state[key][name], state2[key][name]), (key, name)
    assert scheduler2.get_last_lr() == scheduler.get_last_lr()
    assert scheduler2.scheduler.last_epoch == scheduler.scheduler.last_epoch


def test_state_hooks_keep_ddp_inside_a_compiled_model(compiled_ddp_unet, tmp_path):
    """Saving and loading a checkpoint of a compiled DDP UNet writes/reads unet/ and never strips DDP from it."""
    from types import SimpleNamespace

    compiled, ddp, unet = compiled_ddp_unet
    save_hook, load_hook = C.make_state_hooks(SimpleNamespace(is_main_process=True, device=torch.device("cpu")), None)
    save_hook([compiled], [{"weights": 1}], str(tmp_path))
    assert compiled._orig_mod is ddp
    saved = {k: v.clone() for k, v in unet.state_dict().items()}
    with torch.no_grad():
        next(unet.parameters()).add_(1.0)
    load_hook([compiled], str(tmp_path))
    assert compiled._orig_mod is ddp
    assert all(torch.equal(saved[k], v) for k, v in unet.state_dict().items())


def test_checkpoint_from_before_the_counter_resumes_with_it_at_zero(tmp_path, fresh_accelerate_state, caplog):
    """The counter's file deleted from a copy (as a checkpoint saved before it existed): it loads with the count at 0
    and one warning, and the counter is registered again, so the next save keeps it; an intact copy loads it back;
    one with an extra counter file is a usage error naming the folder."""
    from accelerate import Accelerator

    from trainer.loss import SkippedSteps

    accelerator = Accelerator(cpu=True)
    build_state(accelerator, seed=0)
    accelerator.register_for_checkpointing(SkippedSteps(total=3, in_a_row=1))
    saved = C.save_checkpoint(accelerator, tmp_path / "intact", 2, total_limit=None)
    old, other = tmp_path / "old" / "checkpoint-2", tmp_path / "other" / "checkpoint-2"
    shutil.copytree(saved, old)
    (old / "custom_checkpoint_0.pkl").unlink()
    shutil.copytree(saved, other)
    shutil.copy(other / "custom_checkpoint_0.pkl", other / "custom_checkpoint_1.pkl")
    assert [C.saved_counters(path) for path in (saved, old, other)] == [1, 0, 2]

    caplog.set_level(logging.INFO, logger="rsdiff")
    for path, counts in ((saved, (3, 1)), (old, (0, 0))):
        fresh = Accelerator(cpu=True)
        build_state(fresh, seed=1)
        counter = SkippedSteps()
        C.load_checkpoint(fresh, path, [counter])
        assert (counter.total, counter.in_a_row) == counts
        resaved = C.save_checkpoint(fresh, tmp_path / f"again-{path.parent.name}", 4, total_limit=None)
        assert C.saved_counters(resaved) == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["checkpoint-2 was saved before checkpoints kept the count of updates the fp16 grad scaler "
                        "skipped: resuming with that count at 0, as the version that saved it would."]

    with pytest.raises(UsageError, match="checkpoint-2 holds 2 saved counter.s. where this trainer keeps 1"):
        C.load_checkpoint(fresh, other, [SkippedSteps()])
