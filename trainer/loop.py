"""The training loop: accelerator set-up, step arithmetic, resume, and the epoch/step iteration."""

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from trainer.checkpoints import (checkpoint_step, remove_stale_partials, resolve_resume, resume_position,
                                 save_checkpoint)
from trainer.loss import LossOptions, check_finite, check_finite_parameters, diffusion_loss
from trainer.loss_log import append_loss, truncate_loss_log
from trainer.models import frozen_models_on
from trainer.validation import BASE_STEP, should_validate, validate_during_training
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
        scheduler_total_steps=total_steps * num_processes,
    )


def make_accelerator(args):
    """An Accelerator with trackers under OUTPUT_DIR/logging_dir and a seedable sampler (exact resume)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    from trainer.data import data_seed

    project = ProjectConfiguration(project_dir=args.output_dir, logging_dir=str(Path(args.output_dir, args.logging_dir)))
    loader_config = DataLoaderConfiguration(use_seedable_sampler=True, data_seed=data_seed(args.seed))
    return Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps,
                       mixed_precision=args.mixed_precision, log_with=args.report_to,
                       project_config=project, dataloader_config=loader_config)


def init_trackers(accelerator, args) -> None:
    """Start tensorboard/wandb with the flat run config; wandb writes under the logging dir."""
    from trainer.args import tracker_config

    wandb_dir = Path(args.output_dir, args.logging_dir)
    if accelerator.is_main_process:
        wandb_dir.mkdir(parents=True, exist_ok=True)
    accelerator.init_trackers(args.tracker_project_name, config=tracker_config(args),
                              init_kwargs={"wandb": {"dir": str(wandb_dir)}})


def resume_from(accelerator, output_dir: str, value: Optional[str]) -> int:
    """Clear half-written saves, load the requested checkpoint's state; return its optimizer step (0 if none)."""
    if accelerator.is_main_process:
        for stale in remove_stale_partials(Path(output_dir)):
            get_logger().info("Removed an unfinished checkpoint save: %s", stale.name)
    accelerator.wait_for_everyone()
    path = resolve_resume(Path(output_dir), value)
    step = 0 if path is None else checkpoint_step(path.name)
    if accelerator.is_main_process:
        truncate_loss_log(output_dir, step)
    if path is None:
        return 0
    get_logger().info("Resuming from %s", path)
    accelerator.load_state(str(path))
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


def ema_step(ema, unet, offload: bool, device) -> None:
    """One EMA update; offloaded shadow weights visit the device only for it."""
    if offload:
        ema.to(device, non_blocking=True)
    ema.step(unet.parameters())
    if offload:
        ema.to("cpu", non_blocking=True)


def batch_size(batch: dict) -> int:
    """Rows in a batch, whether it holds images and token ids or cached latents and text states."""
    return next(iter(batch.values())).shape[0]


def micro_step(run: TrainingRun, batch: dict, global_step: int):
    """Forward/backward of one batch under accumulation; returns (mean loss over processes, grad norm or None)."""
    accelerator, args = run.accelerator, run.args
    with accelerator.accumulate(run.unet):
        c = run.components
        loss = diffusion_loss(batch, run.unet, c.vae, c.text_encoder, c.noise_scheduler, run.loss_options,
                              run.weight_dtype)
        # Gathered before backward so every process sees the same value and stops together on a NaN.
        mean_loss = accelerator.gather(loss.detach().repeat(batch_size(batch))).mean().item()
        check_finite(mean_loss, global_step)
        accelerator.backward(loss)
        grad_norm = None
        if accelerator.sync_gradients:
            grad_norm = accelerator.clip_grad_norm_(run.unet.parameters(), args.max_grad_norm)
        run.optimizer.step()
        run.lr_scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    return mean_loss, grad_norm


def after_optimizer_step(run: TrainingRun, global_step: int, train_loss: float, grad_norm) -> None:
    """EMA update, per-step logging and checkpointing once an optimizer step has happened."""
    accelerator, args = run.accelerator, run.args
    if run.ema is not None:
        ema_step(run.ema, run.unet, args.offload_ema, accelerator.device)
    logs = {"train_loss": train_loss, "lr": run.lr_scheduler.get_last_lr()[0]}
    if grad_norm is not None:
        logs["grad_norm"] = float(grad_norm)
    accelerator.log(logs, step=global_step)
    if accelerator.is_main_process:
        append_loss(args.output_dir, global_step, train_loss, logs["lr"])
    if global_step % args.checkpointing_steps == 0:
        check_finite_parameters(run.unet.parameters(), global_step)
        save_checkpoint(accelerator, Path(args.output_dir), global_step, args.checkpoints_total_limit)


def train(run: TrainingRun, global_step: int) -> int:
    """Train from global_step to plan.max_train_steps; return the optimizer step reached."""
    from accelerate.utils import tqdm as accelerate_tqdm

    accelerator, args, plan = run.accelerator, run.args, run.plan
    first_epoch, skip_batches = resume_position(global_step, plan.steps_per_epoch, args.gradient_accumulation_steps)
    if global_step == BASE_STEP and accelerator.is_main_process and args.validation_prompts:
        # The untrained model's images, drawn once with the same seed: validation_progress.png's first column.
        with frozen_models_on(run.components, accelerator.device, args.cache_latents):
            validate_during_training(accelerator, run.components, run.unet, run.ema, run.inference_scheduler,
                                     args, BASE_STEP, run.weight_dtype)
    progress = accelerate_tqdm(total=plan.max_train_steps, initial=global_step, desc="Steps",
                               main_process_only=True)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()  # the peak of the loop, not of model loading or the cache build
    started, first_step = time.perf_counter(), global_step
    for epoch in range(first_epoch, plan.num_epochs):
        if global_step >= plan.max_train_steps:
            break
        run.unet.train()
        run.dataloader.set_epoch(epoch)
        batches = run.dataloader
        if epoch == first_epoch and skip_batches:
            batches = accelerator.skip_first_batches(run.dataloader, skip_batches)
        accumulated = 0.0
        for batch in batches:
            loss, grad_norm = micro_step(run, batch, global_step)
            accumulated += loss / args.gradient_accumulation_steps
            if not accelerator.sync_gradients:
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
    log_throughput(accelerator, args, global_step - first_step, time.perf_counter() - started)
    return global_step


def log_throughput(accelerator, args, steps: int, seconds: float) -> None:
    """One line with the loop's optimizer steps/s and samples/s (and peak CUDA memory): what bench/ reads."""
    if not steps or not accelerator.is_main_process:
        return
    samples = steps * args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    peak = ""
    if torch.cuda.is_available():
        peak = f", peak CUDA memory allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    get_logger().info("Training loop: %d optimizer steps in %.2f s: %.4f steps/s, %.3f samples/s%s",
                      steps, seconds, steps / seconds, samples / seconds, peak)
