"""trainer/loop.py and trainer/models.py: step arithmetic under several processes, LR scaling, optional packages."""

import argparse
import math

import pytest
import torch

from trainer import loop, models
from utils.cli import UsageError


def test_plan_single_process_with_max_steps():
    """8 batches, GA 1: 8 steps per epoch; max 20 steps → 3 epochs; scheduler sees the same numbers."""
    plan = loop.plan_steps(8, 1, 1, max_train_steps=20, num_train_epochs=100, lr_warmup_steps=5)
    assert plan == loop.StepPlan(8, 20, 3, 5, 20)


def test_plan_from_epochs_with_accumulation():
    """Without --max_train_steps: epochs × ceil(batches / GA); a partial accumulation still steps."""
    plan = loop.plan_steps(10, 1, 4, max_train_steps=None, num_train_epochs=2, lr_warmup_steps=0)
    assert (plan.steps_per_epoch, plan.max_train_steps, plan.num_epochs) == (3, 6, 2)


def test_plan_multiprocess_scales_scheduler_steps():
    """Two processes: each sees half the batches; warmup and total are × num_processes for the scheduler."""
    plan = loop.plan_steps(8, 2, 1, max_train_steps=4, num_train_epochs=100, lr_warmup_steps=3)
    assert plan.steps_per_epoch == 4 and plan.num_epochs == 1
    assert (plan.scheduler_warmup_steps, plan.scheduler_total_steps) == (6, 8)


def test_plan_of_zero_steps_builds_every_schedule():
    """--max_train_steps 0 (train_controlnet.py's initial ControlNet): no step, no epoch, and a schedule of one step,
    so even the polynomial schedule (which divides by its length) can be built."""
    from diffusers.optimization import get_scheduler

    plan = loop.plan_steps(3, 1, 1, max_train_steps=0, num_train_epochs=1, lr_warmup_steps=0)
    assert (plan.max_train_steps, plan.num_epochs, plan.scheduler_total_steps) == (0, 0, 1)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    get_scheduler("polynomial", optimizer=optimizer, num_warmup_steps=plan.scheduler_warmup_steps,
                  num_training_steps=plan.scheduler_total_steps)


def options(**overrides) -> argparse.Namespace:
    """The optimizer-related flags with the reference's defaults."""
    values = dict(learning_rate=1e-4, scale_lr=False, gradient_accumulation_steps=4, train_batch_size=2,
                  use_8bit_adam=False, optimizer_impl="auto", adam_beta1=0.9, adam_beta2=0.999, adam_weight_decay=1e-2, adam_epsilon=1e-8,
                  enable_xformers_memory_efficient_attention=False)
    values.update(overrides)
    return argparse.Namespace(**values)


def test_scale_lr_multiplies_by_accumulation_batch_and_processes():
    """--scale_lr: lr × GA × batch × processes; otherwise the flag's value."""
    assert models.learning_rate(options(), 2) == 1e-4
    assert models.learning_rate(options(scale_lr=True), 2) == pytest.approx(1e-4 * 4 * 2 * 2)


def test_adamw_gets_the_hyper_parameters():
    """AdamW with the flags' betas, weight decay and epsilon."""
    optimizer = models.build_optimizer(options(adam_beta1=0.8), [torch.nn.Parameter(torch.zeros(2))], 0.1)
    group = optimizer.param_groups[0]
    assert isinstance(optimizer, torch.optim.AdamW)
    assert (group["lr"], group["betas"], group["weight_decay"], group["eps"]) == (0.1, (0.8, 0.999), 1e-2, 1e-8)


@pytest.mark.parametrize("impl,device,expected", [
    ("auto", "cuda", {"fused": True}), ("auto", "cpu", {}), ("fused", "cpu", {"fused": True}),
    ("foreach", "cuda", {"foreach": True}), ("loop", "cuda", {"foreach": False, "fused": False})])
def test_optimizer_impl_picks_the_adamw_kernel(impl, device, expected):
    """--optimizer_impl maps to AdamW's fused/foreach switches; auto is fused on CUDA only."""
    assert models.adamw_kernel_options(impl, device) == expected


def adamw_steps(impl: str, steps: int = 3) -> torch.Tensor:
    """Weights of a small linear model after a few real AdamW steps with the given kernel."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    optimizer = models.build_optimizer(options(optimizer_impl=impl), model.parameters(), 1e-2)
    for _ in range(steps):
        model(torch.randn(5, 8)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model.weight.detach()


def test_adamw_kernels_agree():
    """fused, foreach and the per-tensor loop run on CPU and take the same steps (to float tolerance)."""
    reference = adamw_steps("loop")
    torch.manual_seed(0)
    assert not torch.equal(reference, torch.nn.Linear(8, 4).weight)  # the steps moved the weights
    for impl in ("fused", "foreach", "auto"):
        torch.testing.assert_close(adamw_steps(impl), reference, rtol=1e-5, atol=1e-6)


def test_8bit_adam_takes_real_steps_on_cpu():
    """bitsandbytes' AdamW8bit runs on CPU: weights move, optimizer states are 8-bit."""
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    before = model.weight.detach().clone()
    optimizer = models.build_optimizer(options(use_8bit_adam=True), model.parameters(), 1e-2)
    for _ in range(2):
        model(torch.randn(5, 64)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert type(optimizer).__name__ == "AdamW8bit"
    assert not torch.equal(model.weight, before)
    assert optimizer.state[model.weight]["state1"].dtype == torch.uint8


def test_missing_optional_packages_are_usage_errors(monkeypatch):
    """--use_8bit_adam / xformers without the package: a one-line usage error naming the package."""
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("bitsandbytes", "xformers") else real_find_spec(name, *a))
    models.require_optional_packages(options())
    with pytest.raises(UsageError, match="bitsandbytes"):
        models.require_optional_packages(options(use_8bit_adam=True))
    with pytest.raises(UsageError, match="xformers"):
        models.require_optional_packages(options(enable_xformers_memory_efficient_attention=True))


def test_weight_dtype_follows_mixed_precision():
    """fp16/bf16 for the frozen models under mixed precision, fp32 otherwise."""
    assert models.weight_dtype_for("fp16") == torch.float16
    assert models.weight_dtype_for("bf16") == torch.bfloat16
    assert models.weight_dtype_for("no") == models.weight_dtype_for(None) == torch.float32


def test_bare_model_leaves_the_ddp_and_compile_wrappers_in_place(compiled_ddp_unet):
    """The bare UNet comes out, sharing its weights; the compiled wrapper still holds DDP afterwards."""
    compiled, ddp, unet = compiled_ddp_unet
    assert models.bare_model(compiled) is unet
    assert compiled._orig_mod is ddp and ddp.module is unet
    assert models.bare_model(ddp) is unet and models.bare_model(unet) is unet


# --- Updates the fp16 grad scaler skips. accelerate makes a scaler only on GPUs; torch's CPU GradScaler stands in,
# set on a CPU accelerator before prepare() exactly where accelerate keeps its own.

@pytest.fixture
def scaled_accelerator():
    """A CPU Accelerator carrying a CPU GradScaler, as a CUDA fp16 run carries a CUDA one; state reset afterwards."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    accelerator = Accelerator(cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    yield accelerator
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_a_skipped_update_holds_the_lr_schedule(scaled_accelerator, impl):
    """inf gradients: no weight change, the LR schedule stays put, and the skip is reported (fused AdamW included,
    whose skip accelerate does not see)."""
    from diffusers.optimization import get_scheduler

    accelerator = scaled_accelerator
    layer = torch.nn.Linear(2, 1)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1, **models.adamw_kernel_options(impl, "cpu"))
    schedule = get_scheduler("linear", optimizer=optimizer, num_warmup_steps=0, num_training_steps=10)
    layer, optimizer, schedule = accelerator.prepare(layer, optimizer, schedule)
    accelerator.backward(layer(torch.ones(1, 2)).sum())
    assert loop.optimizer_update(accelerator, optimizer, schedule) is False
    lr, weights = schedule.get_last_lr(), [p.detach().clone() for p in layer.parameters()]
    accelerator.backward(layer(torch.full((1, 2), float("inf"))).sum())
    assert loop.optimizer_update(accelerator, optimizer, schedule) is True
    assert schedule.get_last_lr() == lr and schedule.scheduler.last_epoch == 1
    assert all(torch.equal(a, b) for a, b in zip(weights, layer.parameters()))


def latent_rows(count: int, bad: set) -> list:
    """Cached-latent training rows (8×8 latents, 77×32 text states); the rows in bad overflow (inf latents)."""
    generator = torch.Generator().manual_seed(0)
    rows = []
    for index in range(count):
        mean = torch.randn(4, 8, 8, generator=generator)
        rows.append({"latent_mean": mean + (float("inf") if index in bad else 0.0),
                     "latent_std": torch.full((4, 8, 8), 0.1),
                     "encoder_hidden_states": torch.randn(77, 32, generator=generator)})
    return rows


def tiny_run(accelerator, tmp_path, rows: list, max_train_steps: int):
    """A TrainingRun over cached-latent rows with a tiny UNet, fused AdamW, linear LR and EMA (no VAE needed)."""
    from types import SimpleNamespace

    from diffusers import DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from stand_in.tiny_model import build_unet

    torch.manual_seed(0)
    unet = build_unet()
    ema = EMAModel(unet.parameters(), model_cls=UNet2DConditionModel, model_config=unet.config)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3, fused=True)
    plan = loop.plan_steps(len(rows), 1, 1, max_train_steps, 1, 0)
    schedule = get_scheduler("linear", optimizer=optimizer, num_warmup_steps=0,
                             num_training_steps=plan.scheduler_total_steps)
    loader = torch.utils.data.DataLoader(rows, batch_size=1, shuffle=False)
    unet, optimizer, loader, schedule = accelerator.prepare(unet, optimizer, loader, schedule)
    args = argparse.Namespace(gradient_accumulation_steps=1, max_grad_norm=1.0, checkpointing_steps=1000,
                              checkpoints_total_limit=None, output_dir=str(tmp_path), validation_prompts=None,
                              validation_epochs=1, offload_ema=False, cache_latents=True, train_batch_size=1)
    components = SimpleNamespace(vae=SimpleNamespace(config=SimpleNamespace(scaling_factor=0.18)), text_encoder=None,
                                 noise_scheduler=DDPMScheduler(num_train_timesteps=1000))
    return loop.TrainingRun(accelerator, args, components, unet, optimizer, schedule, loader, ema, plan,
                            torch.float32, None, trainable=list(unet.parameters()))


def test_fp16_overflow_is_skipped_not_a_step(scaled_accelerator, tmp_path):
    """A row whose forward pass overflows: its update is skipped; step count, EMA and schedule count only real steps,
    and the run takes more epochs than planned to reach max_train_steps."""
    from trainer.loss_log import loss_log_path, read_loss_log

    run = tiny_run(scaled_accelerator, tmp_path, latent_rows(4, bad={1}), max_train_steps=7)
    assert run.plan.num_epochs == 2
    assert loop.train(run, 0) == 7
    assert run.skipped.total == 2 and run.skipped.in_a_row == 0  # row 1 of epochs 0 and 1; epoch 2 stops at row 0
    assert run.ema.optimization_step == 7
    assert run.lr_scheduler.scheduler.last_epoch == 7
    log = read_loss_log(loss_log_path(tmp_path))
    assert [row[0] for row in log] == list(range(1, 8)) and all(math.isfinite(row[1]) for row in log)


def test_persistent_overflow_stops_the_run(scaled_accelerator, tmp_path, monkeypatch):
    """Every update skipped: after MAX_SKIPPED_IN_A_ROW the run stops as diverged, having taken no step."""
    from trainer import loss

    monkeypatch.setattr(loss, "MAX_SKIPPED_IN_A_ROW", 3)
    run = tiny_run(scaled_accelerator, tmp_path, latent_rows(4, bad={0, 1, 2, 3}), max_train_steps=2)
    with pytest.raises(loss.TrainingDiverged, match="skipped 3 updates in a row"):
        loop.train(run, 0)
    assert run.ema.optimization_step == 0


def test_without_a_scaler_a_nan_loss_stops_at_once(tmp_path, fresh_accelerator):
    """fp32/bf16 have no grad scaler: a non-finite loss is divergence, at the step it happens."""
    from trainer import loss

    run = tiny_run(fresh_accelerator, tmp_path, latent_rows(4, bad={1}), max_train_steps=4)
    with pytest.raises(loss.TrainingDiverged, match="optimizer step 2"):
        loop.train(run, 0)


@pytest.fixture
def fresh_accelerator():
    """A CPU Accelerator without a scaler; state reset afterwards."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("compile_flag", [True, False])
def test_torch_compile_flag_sets_the_inductor_backend(tmp_path, compile_flag):
    """--torch_compile gives the Accelerator accelerate's inductor dynamo plugin (prepare() then compiles the UNet);
    without it the accelerate config's choice (here none) stays."""
    from accelerate.state import AcceleratorState

    from trainer.args import parse_args

    argv = ["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", "--output_dir", str(tmp_path),
            "--report_to", "tensorboard", *(["--torch_compile"] if compile_flag else [])]
    try:
        accelerator = loop.make_accelerator(parse_args(argv))
        assert (accelerator.state.dynamo_plugin.backend.value == "INDUCTOR") == compile_flag
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_channels_last_puts_conv_weights_in_nhwc_and_keeps_the_outputs():
    """--channels_last: every 4-D convolution weight is channels-last, and the UNet computes the same output."""
    from stand_in.tiny_model import build_unet

    torch.manual_seed(0)
    unet = build_unet().eval()
    sample, states = torch.randn(1, 4, 8, 8), torch.randn(1, 4, unet.config.cross_attention_dim)
    with torch.no_grad():
        before = unet(sample, 10, states).sample
        models.configure_unet(unet, False, False, channels_last=True)
        after = unet(sample, 10, states).sample
    convs = [p for p in unet.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
                         for p in convs if p.shape[-1] > 1)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


def test_a_launch_accelerate_did_not_join_is_refused():
    """WORLD_SIZE=2 from the launcher but one process in accelerate (a CPU box without ACCELERATE_USE_CPU): refused,
    naming the fix, instead of two runs each training alone into one OUTPUT_DIR."""
    with pytest.raises(UsageError, match=r"WORLD_SIZE=2\) but accelerate set up 1.*ACCELERATE_USE_CPU=1"):
        loop.check_world_size(1, {"WORLD_SIZE": "2"})
    loop.check_world_size(2, {"WORLD_SIZE": "2"})
    loop.check_world_size(1, {})


def test_fsdp_is_refused_and_ddp_deepspeed_pass():
    """FSDP would shard the weights the trainer's sync check, EMA and export read whole: a usage error."""
    from accelerate.utils import DistributedType

    with pytest.raises(UsageError, match="FSDP is not supported"):
        loop.check_supported_distribution(DistributedType.FSDP)
    for kind in (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU, DistributedType.DEEPSPEED):
        loop.check_supported_distribution(kind)
