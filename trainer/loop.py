"""The training loop: accelerator set-up, step arithmetic, resume, and the epoch/step iteration."""

import itertools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import torch

from trainer.checkpoints import (checkpoint_step, load_checkpoint, remove_stale_partials, resolve_resume,
                                 resume_position, save_checkpoint)
from trainer.data import set_epoch
from trainer.loss import (LossOptions, SkippedSteps, TrainingDiverged, check_finite, check_finite_parameters,
                          diffusion_loss)
from trainer.loss_log import append_loss, truncate_loss_log
from trainer.models import frozen_models_on, trainable_parameters
from trainer.validation import BASE_STEP, should_validate, validate_during_training
from utils.cli import UsageError
from utils.logger import get_logger


@dataclass(frozen=True)
class StepPlan:
    """Step arithmetic of a run, per process, plus the LR scheduler's view of it."""

    steps_per_epoch: int
    max_train_steps: int
    num_epochs: int
    scheduler_warmup_steps: int
    scheduler_total_steps: int


def plan_steps(num_batches: int, num_processes: int, gradient_accumulation_steps: int,
               max_train_steps: Optional[int], num_train_epochs: int, lr_warmup_steps: int) -> StepPlan:
    """The reference's step math; the prepared LR scheduler steps once per process, hence × num_processes."""
    batches_per_process = math.ceil(num_batches / num_processes)
    steps_per_epoch = math.ceil(batches_per_process / gradient_accumulation_steps)
    total_steps = max_train_steps if max_train_steps is not None else num_train_epochs * steps_per_epoch
    return StepPlan(
        steps_per_epoch=steps_per_epoch,
        max_train_steps=total_steps,
        num_epochs=math.ceil(total_steps / steps_per_epoch),
        scheduler_warmup_steps=lr_warmup_steps * num_processes,
        # At least one: a 0-step run (the initial ControlNet) still builds its schedule, and a polynomial one divides
        # by its length.
        scheduler_total_steps=max(total_steps, 1) * num_processes,
    )


def make_accelerator(args):
    """An Accelerator with trackers under OUTPUT_DIR/logging_dir and a seedable sampler (exact resume)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, TorchDynamoPlugin

    from trainer.data import data_seed

    project = ProjectConfiguration(project_dir=args.output_dir, logging_dir=str(Path(args.output_dir, args.logging_dir)))
    loader_config = DataLoaderConfiguration(use_seedable_sampler=True, data_seed=data_seed(args.seed))
    # None leaves the accelerate config's (or `accelerate launch --dynamo_backend`'s) choice in force.
    dynamo = TorchDynamoPlugin(backend="inductor") if args.torch_compile else None
    return Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps,
                       mixed_precision=args.mixed_precision, log_with=args.report_to,
                       project_config=project, dataloader_config=loader_config, dynamo_plugin=dynamo)


def check_world_size(num_processes: int, environ: Mapping[str, str]) -> None:
    """Refuse a run whose launcher started WORLD_SIZE processes that accelerate did not join into one group.

    On a machine without a GPU, accelerate turns a torchrun/`accelerate launch --multi_gpu` process into a
    stand-alone one unless told to use the CPU: each process would then train alone on all the data and they would
    overwrite each other's checkpoints in OUTPUT_DIR.
    """
    launched = int(environ.get("WORLD_SIZE", "1") or 1)
    if launched > num_processes:
        raise UsageError(f"the launcher started {launched} processes (WORLD_SIZE={launched}) but accelerate set up "
                         f"{num_processes}: with no GPU each process would train alone; on a CPU-only machine set "
                         "ACCELERATE_USE_CPU=1 to train them together over gloo.")


def check_supported_distribution(distributed_type) -> None:
    """Refuse FSDP: the trainer's weight-sync check, EMA and unet/ export need whole weights on every rank."""
    if distributed_type == "FSDP":  # accelerate's DistributedType is a str enum
        raise UsageError("FSDP is not supported by this trainer (its EMA, checkpoint check and unet/ export need "
                         "whole weights on every process): use configs/accelerate/ddp.yaml or deepspeed_zero2.yaml.")


def init_trackers(accelerator, args) -> None:
    """Start tensorboard/wandb with the flat run config; wandb writes under the logging dir."""
    from trainer.args import tracker_config

    wandb_dir = Path(args.output_dir, args.logging_dir)
    if accelerator.is_main_process:
        wandb_dir.mkdir(parents=True, exist_ok=True)
    accelerator.init_trackers(args.tracker_project_name, config=tracker_config(args),
                              init_kwargs={"wandb": {"dir": str(wandb_dir)}})


def resume_from(accelerator, output_dir: str, value: Optional[str], counters: Sequence = ()) -> int:
    """Clear half-written saves, load the requested checkpoint's state; return its optimizer step (0 if none).

    counters: objects every checkpoint keeps beside the models (SkippedSteps), registered here with accelerate.
    """
    if accelerator.is_main_process:
        for stale in remove_stale_partials(Path(output_dir)):
            get_logger().info("Removed an unfinished checkpoint save: %s", stale.name)
    accelerator.wait_for_everyone()
    path = resolve_resume(Path(output_dir), value)
    step = 0 if path is None else checkpoint_step(path.name)
    if accelerator.is_main_process:
        truncate_loss_log(output_dir, step)
    if path is None:
        accelerator.register_for_checkpointing(*counters)
        return 0
    get_logger().info("Resuming from %s", path)
    load_checkpoint(accelerator, path, counters)
    return step


@dataclass
class TrainingRun:
    """Everything the loop touches, prepared by accelerate."""

    accelerator: object
    args: object
    components: object
    unet: torch.nn.Module
    optimizer: object
    lr_scheduler: object
    dataloader: object
    ema: object
    plan: StepPlan
    weight_dtype: torch.dtype
    inference_scheduler: object
    loss_options: LossOptions = field(default_factory=LossOptions)
    trainable: list = field(default_factory=list)  # what is clipped and averaged: all UNet weights, or LoRA's
    lora: object = None  # trainer.lora.LoraSetup in LoRA mode
    skipped: SkippedSteps = field(default_factory=SkippedSteps)
    metadata: object = None  # trainer.metadata.MetadataEncoder with --metadata_fields: its spec ships with the UNet
    after_step: Optional[Callable] = None  # after_step(run, step) after each optimizer step (bad_rows.json, ControlNet validation)

    def __post_init__(self):
        # Not given: the UNet's trainable weights, so clipping and EMA never silently get an empty list.
        if not self.trainable:
            self.trainable = trainable_parameters(self.unet)


def ema_step(ema, params, offload: bool, device) -> None:
    """One EMA update of params; offloaded shadow weights visit the device only for it."""
    if offload:
        ema.to(device, non_blocking=True)
    ema.step(params)
    if offload:
        ema.to("cpu", non_blocking=True)


def batch_size(batch: dict) -> int:
    """Rows in a batch, whether it holds images and token ids or cached latents and text states."""
    return next(iter(batch.values())).shape[0]


def loss_scale(accelerator) -> Optional[float]:
    """The fp16 grad scaler's loss scale; None without a scaler (no, bf16)."""
    return None if accelerator.scaler is None else accelerator.scaler.get_scale()


def update_was_skipped(accelerator, scale_before: Optional[float]) -> bool:
    """True when the grad scaler skipped the update just made (inf/NaN gradients).

    accelerate infers a skip from the optimizer's step not being called, but fused AdamW is always called and
    skips inside its kernel; the scaler lowers its scale exactly when it skips, so that is checked as well.
    """
    if scale_before is None:
        return False
    return accelerator.optimizer_step_was_skipped or accelerator.scaler.get_scale() < scale_before


def optimizer_update(accelerator, optimizer, lr_scheduler) -> bool:
    """Optimizer step, then the LR schedule unless the grad scaler skipped the update; True when it did."""
    scale = loss_scale(accelerator)
    optimizer.step()
    skipped = accelerator.sync_gradients and update_was_skipped(accelerator, scale)
    if not skipped:
        lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return skipped


def micro_step(run: TrainingRun, batch: dict, global_step: int):
    """Forward/backward of one batch under accumulation; returns (mean loss over processes, grad norm or None,
    True when the fp16 grad scaler skipped this optimizer update)."""
    accelerator, args = run.accelerator, run.args
    # The text encoder is listed too, for text-encoder LoRA; a model that is not DDP-wrapped is unaffected.
    with accelerator.accumulate(run.unet, run.components.text_encoder):
        c = run.components
        loss = diffusion_loss(batch, run.unet, c.vae, c.text_encoder, c.noise_scheduler, run.loss_options,
                              run.weight_dtype)
        # Gathered before backward so every process sees the same value and stops together on a NaN.
        mean_loss = accelerator.gather(loss.detach().repeat(batch_size(batch))).mean().item()
        if accelerator.scaler is None:
            check_finite(mean_loss, global_step)  # under fp16 an overflow is the grad scaler's to skip, as upstream
        accelerator.backward(loss)
        grad_norm = None
        if accelerator.sync_gradients:
            grad_norm = accelerator.clip_grad_norm_(run.trainable, args.max_grad_norm)
        skipped = optimizer_update(accelerator, run.optimizer, run.lr_scheduler)
    return mean_loss, grad_norm, skipped


def after_optimizer_step(run: TrainingRun, global_step: int, train_loss: float, grad_norm) -> None:
    """EMA update, per-step logging and checkpointing once an optimizer step has happened."""
    accelerator, args = run.accelerator, run.args
    if run.ema is not None:
        ema_step(run.ema, run.trainable, args.offload_ema, accelerator.device)
    logs = {"train_loss": train_loss, "lr": run.lr_scheduler.get_last_lr()[0]}
    if grad_norm is not None:
        logs["grad_norm"] = float(grad_norm)
    if accelerator.scaler is not None:
        logs["skipped_updates"] = run.skipped.total
    accelerator.log(logs, step=global_step)
    if accelerator.is_main_process:
        append_loss(args.output_dir, global_step, train_loss, logs["lr"])
    if global_step % args.checkpointing_steps == 0:
        check_finite_parameters(run.trainable, global_step)
        check_in_sync(accelerator, run.unet, global_step)
        save_checkpoint(accelerator, Path(args.output_dir), global_step, args.checkpoints_total_limit)
    if run.after_step is not None:
        run.after_step(run, global_step)


def check_in_sync(accelerator, model, step: int) -> None:
    """Raise TrainingDiverged when the processes' weights differ, so such a state is never checkpointed.

    Under DDP every process applies the same averaged gradients, so the weights stay bit-identical; a difference
    means gradients stopped syncing (e.g. a wrapper was lost) and each process trained on its own shard.
    """
    if accelerator.num_processes == 1:
        return
    with torch.no_grad():
        sums = torch.stack([p.detach().sum(dtype=torch.float64) for p in model.parameters()])
    gathered = accelerator.gather(sums[None])
    if not torch.equal(gathered, gathered[:1].expand_as(gathered)):
        raise TrainingDiverged(f"the {accelerator.num_processes} processes hold different weights at optimizer step "
                               f"{step}: gradients are not being synchronised; training stopped, nothing saved.")


def train(run: TrainingRun, global_step: int) -> int:
    """Train from global_step to plan.max_train_steps; return the optimizer step reached."""
    from accelerate.utils import tqdm as accelerate_tqdm

    accelerator, args, plan = run.accelerator, run.args, run.plan
    # Skipped updates consumed batches too: the data position counts them.
    first_epoch, skip_batches = resume_position(global_step + run.skipped.total, plan.steps_per_epoch,
                                                args.gradient_accumulation_steps)
    if global_step == BASE_STEP and accelerator.is_main_process and args.validation_prompts:
        # The untrained model's images, drawn once with the same seed: validation_progress.png's first column.
        with frozen_models_on(run.components, accelerator.device, args.cache_latents):
            validate_during_training(accelerator, run.components, run.unet, run.ema, run.inference_scheduler,
                                     args, BASE_STEP, run.weight_dtype)
    progress = accelerate_tqdm(total=plan.max_train_steps, initial=global_step, desc="Steps",
                               main_process_only=True)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()  # the peak of the loop, not of model loading or the cache build
    started, first_step = synced_clock(), global_step
    # Open-ended: updates the grad scaler skips are not steps, so a run may need more epochs than planned.
    for epoch in itertools.count(first_epoch):
        if global_step >= plan.max_train_steps:
            break
        run.unet.train()
        set_epoch(run.dataloader, epoch)
        batches = run.dataloader
        if epoch == first_epoch and skip_batches:
            batches = accelerator.skip_first_batches(run.dataloader, skip_batches)
        accumulated = 0.0
        for batch in batches:
            loss, grad_norm, skipped = micro_step(run, batch, global_step)
            accumulated += loss / args.gradient_accumulation_steps
            if not accelerator.sync_gradients:
                continue
            run.skipped.record(skipped, global_step, accumulated, loss_scale(accelerator))
            if skipped:  # no step was taken: no EMA, no schedule, no step count, no grad norm to log
                accumulated = 0.0
                continue
            global_step += 1
            progress.update(1)
            progress.set_postfix(loss=accumulated, lr=run.lr_scheduler.get_last_lr()[0])
            after_optimizer_step(run, global_step, accumulated, grad_norm)
            accumulated = 0.0
            if global_step >= plan.max_train_steps:
                break
        # The last epoch is validated by the final pipeline at the end; doing it here too would repeat it.
        if global_step < plan.max_train_steps and accelerator.is_main_process and \
                should_validate(epoch, args.validation_epochs, args.validation_prompts):
            with frozen_models_on(run.components, accelerator.device, args.cache_latents):
                validate_during_training(accelerator, run.components, run.unet, run.ema, run.inference_scheduler,
                                         args, global_step, run.weight_dtype)
    progress.close()
    run.skipped.report(accelerator)
    log_throughput(accelerator, args, global_step - first_step, synced_clock() - started)
    return global_step


def synced_clock() -> float:
    """perf_counter after the GPU has finished its queued work, so a timed window holds whole steps."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def log_throughput(accelerator, args, steps: int, seconds: float) -> None:
    """One line with the loop's optimizer steps/s and samples/s (and peak CUDA memory): what bench/ reads."""
    if not steps or not accelerator.is_main_process:
        return
    samples = steps * args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    peak = ""
    if torch.cuda.is_available():
        peak = (f", peak CUDA memory allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB, "
                f"reserved {torch.cuda.max_memory_reserved() / 2**30:.2f} GiB")
    get_logger().info("Training loop: %d optimizer steps in %.2f s: %.4f steps/s, %.3f samples/s%s",
                      steps, seconds, steps / seconds, samples / seconds, peak)
