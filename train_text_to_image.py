"""Fine-tune Stable Diffusion's UNet on image/caption pairs: a drop-in for diffusers' text_to_image example.

Flow: parse + fail fast → accelerator → models → data → optimizer/schedule → resume → loop → final pipeline.
Run with `accelerate launch` or `torchrun`; every flag is described by --help.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from trainer.args import parse_args  # noqa: E402
from trainer.preflight import preflight  # noqa: E402
from utils.cli import run_main  # noqa: E402
from utils.logger import get_logger, setup_logging  # noqa: E402


def check_command_line(argv=None) -> None:
    """main's checks that run before any model loads; utils/launch.py (train.sh) runs them once before launching."""
    args = parse_args(argv)
    preflight(args)  # creating the Hub repo is idempotent: the launched trainer's own preflight finds it
    from trainer.models import require_optional_packages

    require_optional_packages(args)


def main(argv=None) -> int:
    """Train, checkpoint, and write the final pipeline to --output_dir; 1 if the loss diverged."""
    args = parse_args(argv)
    checked = preflight(args)  # one-line usage errors before anything heavy is imported

    import torch
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler

    from trainer import data, export, latent_cache, lora, loop, metadata_unet, models
    from trainer.bad_rows import BadRowsReport
    from trainer.checkpoints import register_state_hooks
    from trainer.loss import LossOptions, SkippedSteps, TrainingDiverged
    from trainer.validation import load_inference_scheduler
    from utils.quiet import quiet_loading_bars

    models.require_optional_packages(args)
    quiet_loading_bars()
    accelerator = loop.make_accelerator(args)
    loop.check_world_size(accelerator.num_processes, os.environ)
    loop.check_supported_distribution(accelerator.distributed_type)
    setup_logging(is_main_process=accelerator.is_main_process)
    logger = get_logger()
    if args.seed is not None:
        # Offset by the process index: ranks draw their own noise, timesteps and latent samples (rank 0 = --seed).
        # Data order and augmentations come from the data seed, so shards stay disjoint.
        set_seed(args.seed, device_specific=True)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True

    # Config: precision of the frozen parts; the UNet keeps fp32 master weights under autocast. With --lora_rank
    # the UNet is frozen in the weight dtype too and only fp32 adapters train.
    weight_dtype = models.weight_dtype_for(accelerator.mixed_precision)
    components = models.load_components(args, weight_dtype, accelerator.device)
    with accelerator.main_process_first():
        dataset = data.build_train_dataset(args, components.tokenizer, data.data_seed(args.seed))
    bad_rows = BadRowsReport(dataset, Path(args.output_dir), args.checkpointing_steps)  # also fed by the cache
    # With --metadata_fields: the UNet gains its zero-output metadata embedding before anything copies its weights
    # (under LoRA it then trains in full beside the adapters).
    encoder = metadata_unet.prepare(components.unet, dataset.metadata)
    lora_setup = (lora.apply_lora(args, components, weight_dtype, accelerator.device, encoder) if args.lora_rank
                  else None)
    trainable = lora_setup.params if lora_setup else models.trainable_parameters(components.unet)
    models.configure_unet(components.unet, args.gradient_checkpointing,
                          args.enable_xformers_memory_efficient_attention, args.channels_last)
    ema = models.build_ema(args, components.unet, accelerator.device, lora_setup) if args.use_ema else None
    register_state_hooks(accelerator, ema, args.offload_ema, lora_setup, args, encoder)

    # Data; with --cache_latents the frozen encoders run once here, then those the cache serves leave the accelerator.
    num_workers = data.resolve_num_workers(args.dataloader_num_workers, accelerator.num_processes)
    data.limit_cpu_threads(accelerator.device.type, accelerator.num_processes, num_workers, os.environ)
    collate = data.collate
    if args.cache_latents:
        dataset = latent_cache.cached_training_dataset(accelerator, args, components, dataset, weight_dtype,
                                                       num_workers)
        models.offload_frozen(components, dataset.served_models)
        collate = latent_cache.collate_cached
    dataloader = data.build_dataloader(dataset, args.train_batch_size, num_workers, data.data_seed(args.seed),
                                       collate)

    # Optimizer and schedule
    plan = loop.plan_steps(len(dataloader), accelerator.num_processes, args.gradient_accumulation_steps,
                           args.max_train_steps, args.num_train_epochs, args.lr_warmup_steps)
    optimizer = models.build_optimizer(args, trainable,
                                       models.learning_rate(args, accelerator.num_processes), accelerator.device.type)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=plan.scheduler_warmup_steps,
                                 num_training_steps=plan.scheduler_total_steps)
    unet, optimizer, dataloader, lr_scheduler = accelerator.prepare(components.unet, optimizer, dataloader,
                                                                    lr_scheduler)
    if args.train_text_encoder_lora:  # trained, so it joins the gradient sync; the loss then runs it wrapped
        components.text_encoder = accelerator.prepare(components.text_encoder)
    loop.init_trackers(accelerator, args)
    skipped = SkippedSteps()  # skipped updates consumed data: checkpoints keep their count for the resume position
    global_step = loop.resume_from(accelerator, args.output_dir, args.resume_from_checkpoint, [skipped])
    bad_rows.restore(resumed=global_step > 0)
    logger.info("%d examples, %d optimizer steps (%d per epoch), %d process(es), starting at step %d",
                len(dataset), plan.max_train_steps, plan.steps_per_epoch, accelerator.num_processes, global_step)

    # Loop
    run = loop.TrainingRun(accelerator, args, components, unet, optimizer, lr_scheduler, dataloader, ema, plan,
                           weight_dtype, load_inference_scheduler(args.pretrained_model_name_or_path,
                                                                  args.revision, args.prediction_type),
                           LossOptions.from_args(args), trainable, lora_setup, skipped, encoder,
                           after_step=bad_rows.during_training)
    try:
        global_step = loop.train(run, global_step)
    except TrainingDiverged as err:
        bad_rows.write(accelerator, final=True)
        if accelerator.is_main_process:
            logger.error("%s", err)
        accelerator.end_training()
        return 1

    # Bad rows, final pipeline, validation grid, model card, push
    bad_rows.write(accelerator, final=True)
    export.finish(run, global_step, checked.hub_repo_id)
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    run_main(main)
