"""Models: load the SD components, freeze what is not trained, build the EMA copy and the optimizer."""

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch

from utils.cli import UsageError

WEIGHT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Components:
    """The pieces of a Stable Diffusion pipeline the trainer uses."""

    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object
    offloaded: tuple = ()  # names of the frozen models kept on the CPU while a cache serves them


def weight_dtype_for(mixed_precision: Optional[str]) -> torch.dtype:
    """dtype of the frozen models: half precision under fp16/bf16, fp32 otherwise."""
    return WEIGHT_DTYPES.get(mixed_precision or "no", torch.float32)


def require_optional_packages(args) -> None:
    """Fail before any model loads when a flag needs a package that is not installed."""
    import importlib.util

    if args.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        raise UsageError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes")
    if args.enable_xformers_memory_efficient_attention and importlib.util.find_spec("xformers") is None:
        raise UsageError("--enable_xformers_memory_efficient_attention needs xformers: pip install xformers "
                         "(or drop the flag: PyTorch's SDPA attention is used by default)")


def load_noise_scheduler(model_path: str, revision: Optional[str], prediction_type: Optional[str]):
    """The base model's DDPM training scheduler, with the --prediction_type override applied."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_pretrained(model_path, subfolder="scheduler", revision=revision)
    if prediction_type is not None:
        scheduler.register_to_config(prediction_type=prediction_type)
    return scheduler


def load_components(args, weight_dtype: torch.dtype, device) -> Components:
    """Load tokenizer, text encoder, VAE (frozen, in weight_dtype, on device) and the fp32 trainable UNet."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from trainer.args import non_ema_revision

    path, revision, variant = args.pretrained_model_name_or_path, args.revision, args.variant
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", revision=revision)
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", revision=revision, variant=variant)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", revision=revision, variant=variant)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", revision=non_ema_revision(args))
    for frozen in (text_encoder, vae):
        freeze_and_cast(frozen, weight_dtype, device)
    unet.train()
    return Components(tokenizer, text_encoder, vae, unet,
                      load_noise_scheduler(path, revision, args.prediction_type))


def freeze_and_cast(model, weight_dtype: torch.dtype, device) -> None:
    """Freeze a model and store it in the run's weight dtype on the device (saves memory under fp16/bf16)."""
    model.requires_grad_(False)
    model.to(device, dtype=weight_dtype)


def move_frozen(components: Components, device) -> None:
    """Move the VAE and text encoder (not the UNet) to device, e.g. off the accelerator while a cache serves them."""
    components.vae.to(device)
    components.text_encoder.to(device)


def bare_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside the DDP and torch.compile wrappers, sharing their parameters; the wrappers stay intact.

    accelerator.unwrap_model keeps a compiled wrapper by pointing its _orig_mod at the bare module: on a compiled
    DDP model that removes DDP from the model being trained (its no_sync under gradient accumulation, and whatever
    else goes through the wrapper, then reach the bare module instead).
    """
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model, keep_torch_compile=False)


def offload_frozen(components: Components, names) -> None:
    """Move the named frozen models ("vae", "text_encoder") to the CPU while a cache serves them."""
    components.offloaded = tuple(names)
    for name in components.offloaded:
        getattr(components, name).to("cpu")


@contextlib.contextmanager
def frozen_models_on(components: Components, device, enabled: bool = True):
    """Bring the offloaded frozen models to device for the block (validation), then back to the CPU; no-op if
    disabled or none is offloaded."""
    moved = [getattr(components, name) for name in components.offloaded] if enabled else []
    for model in moved:
        model.to(device)
    try:
        yield
    finally:
        for model in moved:
            model.to("cpu")


@contextlib.contextmanager
def eval_mode(*modules):
    """Put modules in eval mode for the block (LoRA dropout off while sampling), then restore each one's mode."""
    modes = [(module, module.training) for module in modules if module is not None]
    for module, _ in modes:
        module.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.train(training)


@contextlib.contextmanager
def ema_weights(ema, params):
    """Swap the EMA values into params for the block, then put the training values back (no-op without EMA)."""
    if ema is None:
        yield
        return
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)


def configure_unet(unet, gradient_checkpointing: bool, xformers: bool, channels_last: bool = False) -> None:
    """Memory and speed options: gradient checkpointing, xformers attention only when asked (SDPA otherwise), and
    channels-last convolution weights."""
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if xformers:
        unet.enable_xformers_memory_efficient_attention()
    if channels_last:
        unet.to(memory_format=torch.channels_last)


def build_ema(args, unet, device, lora=None):
    """diffusers' EMAModel over the UNet; from the --revision UNet when a separate non-EMA revision is trained.

    In LoRA mode (lora: trainer.lora.LoraSetup) it averages the adapter weights only, with no model class: a
    checkpoint stores them as LoRA files (trainer.lora's state hooks).
    """
    from diffusers import UNet2DConditionModel
    from diffusers.training_utils import EMAModel

    if lora is not None:
        ema = EMAModel(lora.params, foreach=args.foreach_ema)
    else:
        source = unet
        if args.non_ema_revision is not None:
            source = UNet2DConditionModel.from_pretrained(args.pretrained_model_name_or_path, subfolder="unet",
                                                          revision=args.revision, variant=args.variant)
            if unet.config.class_embed_type == "projection" and source.class_embedding is None:
                from trainer.metadata_unet import add_embedding

                add_embedding(source, unet.config.projection_class_embeddings_input_dim)  # --metadata_fields
        ema = EMAModel(source.parameters(), model_cls=UNet2DConditionModel, model_config=source.config,
                       foreach=args.foreach_ema)
    place_ema(ema, args.offload_ema, device)
    return ema


def place_ema(ema, offload: bool, device) -> None:
    """Shadow weights on the training device, or in pinned host memory with --offload_ema (CUDA only)."""
    if not offload:
        ema.to(device)
    elif torch.cuda.is_available():
        ema.pin_memory()
    else:
        ema.to("cpu")


def trainable_parameters(*modules) -> list:
    """The parameters the optimizer, clipping and EMA work on, as a list (an iterator would be used up by the first)."""
    return [p for module in modules if module is not None for p in module.parameters() if p.requires_grad]


def learning_rate(args, num_processes: int) -> float:
    """--learning_rate, scaled by GA × batch × processes with --scale_lr."""
    if not args.scale_lr:
        return args.learning_rate
    return args.learning_rate * args.gradient_accumulation_steps * args.train_batch_size * num_processes


def adamw_kernel_options(impl: str, device_type: str) -> dict:
    """torch AdamW keyword arguments for --optimizer_impl; auto picks fused on CUDA, torch's own default elsewhere."""
    if impl == "auto":
        impl = "fused" if device_type == "cuda" else "default"
    return {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False, "fused": False},
            "default": {}}[impl]


def build_optimizer(args, params, lr: float, device_type: str = "cpu") -> torch.optim.Optimizer:
    """AdamW with the --optimizer_impl kernel, or bitsandbytes' AdamW8bit with --use_8bit_adam (imported only then)."""
    hyper = {"lr": lr, "betas": (args.adam_beta1, args.adam_beta2), "weight_decay": args.adam_weight_decay,
             "eps": args.adam_epsilon}
    if args.use_8bit_adam:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **hyper)
    return torch.optim.AdamW(params, **hyper, **adamw_kernel_options(args.optimizer_impl, device_type))
