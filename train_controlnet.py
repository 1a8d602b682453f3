"""Train a ControlNet beside a frozen Stable Diffusion: a drop-in for diffusers' controlnet example, for remote
sensing.

Flow: parse + fail fast → accelerator → models (ControlNet + frozen UNet as one module) → data with conditioning →
optimizer/schedule → resume → the trainer's one loop → OUTPUT_DIR/{config.json,
diffusion_pytorch_model.safetensors, conditioning.json}. Run with `accelerate launch` or train_controlnet.sh; every flag is described by --help.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from trainer.controlnet_args import parse_args  # noqa: E402
from trainer.preflight import preflight  # noqa: E402
from utils.cli import run_main  # noqa: E402
from utils.logger import get_logger, setup_logging  # noqa: E402


def fail_fast(args):
    """Every check that needs no model: the shared preflight, the conditioning files and the conditioning spec."""
    from trainer.controlnet_data import check_conditioning_files, conditioning_spec, data_folder, validation_arrays

    checked = preflight(args)
    check_conditioning_files(args)
    spec, document = conditioning_spec(args, data_folder(args))
    validation_arrays(args.validation_image, spec, args.resolution)  # a bad file stops the run before models load
    return checked, spec, document


def check_command_line(argv=None) -> None:
    """main's checks that run before any model loads; utils/launch.py (train_controlnet.sh) runs them once."""
    args = parse_args(argv)
    fail_fast(args)
    from trainer.models import require_optional_packages

    require_optional_packages(args)


def main(argv=None) -> int:
    """Train, checkpoint, and write the final ControlNet to --output_dir; 1 if the loss diverged."""
    args = parse_args(argv)
    checked, spec, document = fail_fast(args)

    import torch
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler

    from trainer import controlnet, controlnet_data, data, latent_cache, loop, models
    from trainer.bad_rows import BadRowsReport
    from trainer.controlnet_validation import ControlValidation
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
        set_seed(args.seed, device_specific=True)  # rank 0 = --seed; data order and flips come from the data seed
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True

    # Models: the frozen parts in the weight dtype, the ControlNet in fp32 master weights under autocast.
    weight_dtype = models.weight_dtype_for(accelerator.mixed_precision)
    components = models.load_components(args, weight_dtype, accelerator.device)
    controlnet.load_tokenizer(args, components)
    model = controlnet.build_controlled_unet(args, components, spec.channels, weight_dtype, accelerator.device)
    controlnet.configure(model, args)
    trainable = models.trainable_parameters(model)
    ema = controlnet.build_ema(args, model.controlnet, accelerator.device) if args.use_ema else None
    controlnet.register_state_hooks(accelerator, ema, args.offload_ema)

    # Data: the conditioning is read every step, with the flip of the image (cached or not).
    folder = controlnet_data.data_folder(args)
    reader = controlnet_data.ConditioningReader(spec, folder, args.resolution)
    with accelerator.main_process_first():
        dataset = controlnet_data.build_train_dataset(args, components.tokenizer, data.data_seed(args.seed), spec,
                                                      folder)
    bad_rows = BadRowsReport(dataset, Path(args.output_dir), args.checkpointing_steps)  # also fed by the cache
    num_workers = data.resolve_num_workers(args.dataloader_num_workers, accelerator.num_processes)
    data.limit_cpu_threads(accelerator.device.type, accelerator.num_processes, num_workers, os.environ)
    collate = controlnet_data.collate
    if args.cache_latents:
        cached = latent_cache.cached_training_dataset(accelerator, args, components, dataset, weight_dtype,
                                                      num_workers)
        models.offload_frozen(components, cached.served_models)
        dataset = controlnet_data.CachedWithConditioning(cached, dataset.table, dataset.conditioning_column, reader,
                                                         dataset.bad_rows)
        collate = latent_cache.collate_cached
    dataloader = data.build_dataloader(dataset, args.train_batch_size, num_workers, data.data_seed(args.seed),
                                       collate)

    # Optimizer and schedule
    plan = loop.plan_steps(len(dataloader), accelerator.num_processes, args.gradient_accumulation_steps,
                           args.max_train_steps, args.num_train_epochs, args.lr_warmup_steps)
    optimizer = models.build_optimizer(args, trainable, models.learning_rate(args, accelerator.num_processes),
                                       accelerator.device.type)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=plan.scheduler_warmup_steps,
                                 num_training_steps=plan.scheduler_total_steps,
                                 num_cycles=args.lr_num_cycles, power=args.lr_power)
    model, optimizer, dataloader, lr_scheduler = accelerator.prepare(model, optimizer, dataloader, lr_scheduler)
    loop.init_trackers(accelerator, args)
    skipped = SkippedSteps()
    global_step = loop.resume_from(accelerator, args.output_dir, args.resume_from_checkpoint, [skipped])
    bad_rows.restore(resumed=global_step > 0)
    logger.info("%d examples, %d optimizer steps (%d per epoch), %d process(es), starting at step %d; "
                "conditioning: %s, %d channels", len(dataset), plan.max_train_steps, plan.steps_per_epoch,
                accelerator.num_processes, global_step, spec.type, spec.channels)

    # Loop: the trainer's own, on the ControlNet-steered UNet.
    scheduler = load_inference_scheduler(args.pretrained_model_name_or_path, args.revision, args.prediction_type)
    validation = ControlValidation.from_args(accelerator, args, components, spec, weight_dtype, ema)
    run = loop.TrainingRun(accelerator, args, components, model, optimizer, lr_scheduler, dataloader, ema, plan,
                           weight_dtype, scheduler, LossOptions.from_args(args), trainable, None, skipped,
                           after_step=controlnet.after_steps(validation and validation.during_training,
                                                             bad_rows.during_training))
    try:
        global_step = loop.train(run, global_step)
    except TrainingDiverged as err:
        bad_rows.write(accelerator, final=True)
        if accelerator.is_main_process:
            logger.error("%s", err)
        accelerator.end_training()
        return 1

    bad_rows.write(accelerator, final=True)
    controlnet.finish(run, global_step, checked.hub_repo_id, document, validation)
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    run_main(main)
