"""LoRA mode: peft adapters on the UNet (and optionally the text encoder), their EMA, checkpoints and output files.

The base weights stay frozen in the run's weight dtype (fp16/bf16 under mixed precision, decided by the
accelerator, so an accelerate config asking for fp16 counts as much as the flag); only the adapters train, and
they are kept in fp32 so the gradient scaler never sees half-precision gradients. A run writes
pytorch_lora_weights.safetensors (diffusers' format, with its peft config as metadata so alpha != rank loads at
the trained strength), a kohya-format copy for A1111/ComfyUI, and lora_run.json naming the base model. With
--metadata_fields the UNet's metadata embedding trains in full (fp32, no adapter on it) beside the adapters and is
saved next to every LoRA file (trainer.metadata_unet.save_embedding).
"""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from utils.cli import UsageError
from utils.logger import get_logger

LORA_WEIGHTS_FILENAME = "pytorch_lora_weights.safetensors"  # the name load_lora_weights(folder) looks for
KOHYA_WEIGHTS_FILENAME = "pytorch_lora_weights_kohya.safetensors"
LORA_RUN_FILENAME = "lora_run.json"
EMA_LORA_DIRNAME = "lora_ema"
EMA_STATE_FILENAME = "ema_state.json"
ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# The feed-forward layers of SD's transformer blocks (GEGLU projection and output), beside the attention ones.
ALL_LINEAR_TARGETS = ATTENTION_TARGETS + ("ff.net.0.proj", "ff.net.2")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
UNET_PREFIX, TEXT_ENCODER_PREFIX = "unet", "text_encoder"
KOHYA_PREFIXES = {"lora_te1_": "lora_te_"}  # diffusers' converter writes SDXL's first text-encoder prefix
# A1111/ComfyUI name text-encoder layers as in the original CLIP checkpoints (lora_te_text_model_encoder_...); since
# transformers 5, CLIPTextModel has no `text_model` level, so its module paths start at `encoder.`.
KOHYA_TEXT_MODEL = "text_model."


@dataclass
class LoraSetup:
    """What LoRA mode added to the models: the peft configs and the trainable (adapter) parameters, in order."""

    unet_config: object
    text_encoder_config: Optional[object] = None
    params: List[torch.nn.Parameter] = field(default_factory=list)
    metadata: Optional[object] = None  # trainer.metadata.MetadataEncoder whose UNet embedding trains beside them


def target_modules(value: str) -> List[str]:
    """--lora_target_modules: a preset name, or a comma-separated list of module names."""
    presets = {"attention": ATTENTION_TARGETS, "all_linear": ALL_LINEAR_TARGETS}
    if value in presets:
        return list(presets[value])
    return [name.strip() for name in value.split(",") if name.strip()]


def lora_alpha(args) -> float:
    """--lora_alpha, defaulting to the rank (an update scale of 1)."""
    return float(args.lora_alpha if args.lora_alpha is not None else args.lora_rank)


def make_config(args, targets: List[str], exclude: Sequence[str] = ()):
    """peft LoraConfig for the flags: rank, alpha, dropout, targets, DoRA; Gaussian init like diffusers' script.
    exclude: module names that get no adapter even when a target name matches them."""
    from peft import LoraConfig

    return LoraConfig(r=args.lora_rank, lora_alpha=lora_alpha(args), lora_dropout=args.lora_dropout,
                      target_modules=targets, use_dora=args.use_dora, init_lora_weights="gaussian",
                      exclude_modules=list(exclude) or None)


def embedding_modules(unet) -> List[str]:
    """The metadata embedding's layers (class_embedding.linear_1, ...), kept free of adapters: it trains in full,
    and a target list naming e.g. linear_1 would otherwise wrap it too."""
    if unet.class_embedding is None:
        return []
    return [f"class_embedding.{name}" for name, _ in unet.class_embedding.named_modules() if name]


def add_adapter(model, config, flag_value: str, what: str) -> None:
    """Insert the adapter; a target list that matches no layer is the user's mistake, reported in one line."""
    try:
        model.add_adapter(config)
    except ValueError as err:
        if "not found in the base model" not in str(err) and "Target modules" not in str(err):
            raise
        raise UsageError(f"--lora_target_modules '{flag_value}' matches no layer of the {what}.") from None


def upcast_adapters(*models) -> None:
    """Keep every trainable (adapter) parameter in fp32 whatever the base's dtype."""
    from diffusers.training_utils import cast_training_params

    cast_training_params([m for m in models if m is not None], dtype=torch.float32)


def apply_lora(args, components, weight_dtype: torch.dtype, device, metadata=None) -> LoraSetup:
    """Freeze the UNet (and text encoder), add fp32 adapters per the flags; return what was added.

    metadata: the run's MetadataEncoder (--metadata_fields), whose embedding, already in the UNet, trains in full.
    """
    from trainer.models import freeze_and_cast, trainable_parameters

    freeze_and_cast(components.unet, weight_dtype, device)
    exclude = embedding_modules(components.unet) if metadata is not None else []
    unet_config = make_config(args, target_modules(args.lora_target_modules), exclude)
    add_adapter(components.unet, unet_config, args.lora_target_modules, "UNet")
    if metadata is not None:
        components.unet.class_embedding.requires_grad_(True)  # peft froze every non-adapter weight
    text_encoder_config = None
    if args.train_text_encoder_lora:
        text_encoder_config = make_config(args, list(TEXT_ENCODER_TARGETS))
        add_adapter(components.text_encoder, text_encoder_config, "q_proj,k_proj,v_proj,out_proj", "text encoder")
        components.text_encoder.train()
    trained_text_encoder = components.text_encoder if text_encoder_config else None
    upcast_adapters(components.unet, trained_text_encoder)
    params = trainable_parameters(components.unet, trained_text_encoder)
    get_logger().info("LoRA rank %d, alpha %g on %s%s: %d trainable parameters", args.lora_rank, lora_alpha(args),
                      ", ".join(sorted(unet_config.target_modules)),
                      " and the metadata embedding" if metadata is not None else "", sum(p.numel() for p in params))
    return LoraSetup(unet_config, text_encoder_config, params, metadata)


def adapter_state(model) -> dict:
    """The adapter weights of a peft-wrapped model, with diffusers' key names (no adapter name)."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in get_peft_model_state_dict(model).items()}


def config_metadata(config) -> Optional[dict]:
    """A LoraConfig as JSON-able metadata (diffusers reads rank, alpha, targets, DoRA from it when loading).

    Dropout is written as 0: it is a training setting, and diffusers' loader builds the dropout layers in
    training mode, so every image drawn with the file would get random dropout noise. The exclusions (the metadata
    embedding) are left out too: loaded onto a base without that embedding, peft would warn that they match nothing.
    """
    if config is None:
        return None
    metadata = json.loads(json.dumps(config.to_dict(), default=lambda v: sorted(v) if isinstance(v, set) else str(v)))
    return {**metadata, "lora_dropout": 0.0, "exclude_modules": None}


def save_diffusers_file(folder: Path, unet, text_encoder, setup: LoraSetup) -> Path:
    """Write FOLDER/pytorch_lora_weights.safetensors (temp name, then rename) with the adapter configs, and the
    metadata embedding and its spec beside it when the run trains one."""
    from diffusers import StableDiffusionPipeline

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp_name = f".{LORA_WEIGHTS_FILENAME}.tmp"
    text_layers = adapter_state(text_encoder) if setup.text_encoder_config is not None else None
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=adapter_state(unet), text_encoder_lora_layers=text_layers, weight_name=tmp_name,
        unet_lora_adapter_metadata=config_metadata(setup.unet_config),
        text_encoder_lora_adapter_metadata=config_metadata(setup.text_encoder_config))
    os.replace(folder / tmp_name, folder / LORA_WEIGHTS_FILENAME)
    if setup.metadata is not None:
        from trainer.metadata_unet import save_embedding

        save_embedding(folder, unet, setup.metadata)
    return folder / LORA_WEIGHTS_FILENAME


def kohya_text_path(key: str) -> str:
    """A text-encoder adapter key under CLIP's `text_model.` level, as kohya names it (once, whichever transformers)."""
    return key if key.startswith(KOHYA_TEXT_MODEL) else KOHYA_TEXT_MODEL + key


def kohya_state_dict(unet_state: dict, text_encoder_state: Optional[dict], alpha: float) -> dict:
    """kohya/A1111 keys (lora_unet_…, lora_te_text_model_…, .lora_down/.lora_up) with the trained alpha (diffusers'
    converter)."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    prefixed = {f"{UNET_PREFIX}.{k}": v for k, v in unet_state.items()}
    prefixed.update({f"{TEXT_ENCODER_PREFIX}.{kohya_text_path(k)}": v for k, v in (text_encoder_state or {}).items()})
    converted = {}
    for key, value in convert_state_dict_to_kohya(prefixed).items():
        for wrong, right in KOHYA_PREFIXES.items():
            if key.startswith(wrong):
                key = right + key[len(wrong):]
        # The converter forces alpha = rank; the file must carry the alpha that was trained.
        converted[key] = torch.tensor(alpha, dtype=torch.float32) if key.endswith(".alpha") else value
    return converted


def save_kohya_file(path: Path, unet, text_encoder, setup: LoraSetup, alpha: float) -> Optional[Path]:
    """Write the kohya-format file atomically; None for DoRA, which has no kohya key the converter writes right."""
    from safetensors.torch import save_file

    if setup.unet_config.use_dora:
        get_logger().info("DoRA: no kohya-format file written (load %s with diffusers).", LORA_WEIGHTS_FILENAME)
        return None
    text_state = adapter_state(text_encoder) if setup.text_encoder_config is not None else None
    state = kohya_state_dict(adapter_state(unet), text_state, alpha)
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(setup.unet_config.r),
                "ss_network_alpha": str(alpha), "ss_base_model_version": "sd_v1"}
    save_file(state, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return Path(path)


def resolved_base(model: str) -> str:
    """A local base model as an absolute path (the run may be used from another folder), a Hub id as is."""
    local = Path(model).expanduser()
    return str(local.resolve()) if local.exists() else model


def run_record(args) -> dict:
    """What generate/evaluate/merge need to rebuild the trained model: the base and the adapter settings."""
    return {"base_model": resolved_base(args.pretrained_model_name_or_path), "revision": args.revision,
            "variant": args.variant, "prediction_type": args.prediction_type, "rank": args.lora_rank,
            "alpha": lora_alpha(args), "target_modules": target_modules(args.lora_target_modules),
            "use_dora": args.use_dora, "text_encoder": args.train_text_encoder_lora}


def write_run_record(folder: Path, args) -> Path:
    """FOLDER/lora_run.json, written atomically."""
    from utils.atomic import write_json_atomic

    path = Path(folder) / LORA_RUN_FILENAME
    Path(folder).mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, run_record(args))
    return path


def read_run_record(folder: Path) -> Optional[dict]:
    """lora_run.json of a LoRA run or checkpoint folder, or None when absent."""
    path = Path(folder) / LORA_RUN_FILENAME
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def load_adapters(folder: Path, unet, text_encoder, setup: Optional[LoraSetup] = None) -> None:
    """Put FOLDER/pytorch_lora_weights.safetensors back into the wrapped models (resume), and the metadata
    embedding beside it when the run (setup) trains one."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(str(Path(folder) / LORA_WEIGHTS_FILENAME))
    for prefix, model in ((UNET_PREFIX, unet), (TEXT_ENCODER_PREFIX, text_encoder)):
        part = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
        if part:
            result = set_peft_model_state_dict(model, part)
            if getattr(result, "unexpected_keys", None):
                raise RuntimeError(f"{folder}: unexpected LoRA keys {result.unexpected_keys[:3]}")
    if setup is not None and setup.metadata is not None:
        from trainer.metadata_unet import load_embedding

        load_embedding(folder, unet)


def ema_state_fields(ema) -> dict:
    """EMA bookkeeping (step count, decay settings) without the shadow tensors, which go in a LoRA file."""
    return {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}


def make_state_hooks(accelerator, ema, setup: LoraSetup, args):
    """accelerate hooks that store only the adapters (and their EMA) in a checkpoint, each as a loadable LoRA file."""
    from diffusers import UNet2DConditionModel

    from utils.atomic import write_json_atomic
    from trainer.models import bare_model, ema_weights, place_ema

    def split(models):
        """(unet, text encoder) among the prepared models, unwrapped."""
        unwrapped = [bare_model(m) for m in models]
        unet = next(m for m in unwrapped if isinstance(m, UNet2DConditionModel))
        others = [m for m in unwrapped if m is not unet]
        return unet, others[0] if others else None

    def save_hook(models, weights, output_dir):
        """Write the adapters, the EMA adapters and lora_run.json; keep accelerate from saving whole models."""
        if accelerator.is_main_process:
            unet, text_encoder = split(models)
            save_diffusers_file(Path(output_dir), unet, text_encoder, setup)
            if ema is not None:
                with ema_weights(ema, setup.params):
                    save_diffusers_file(Path(output_dir) / EMA_LORA_DIRNAME, unet, text_encoder, setup)
                write_json_atomic(Path(output_dir) / EMA_LORA_DIRNAME / EMA_STATE_FILENAME, ema_state_fields(ema))
            write_run_record(Path(output_dir), args)
        while weights:
            weights.pop()

    def load_hook(models, input_dir):
        """Load the EMA adapters into the shadow weights, then the training adapters into the models."""
        unet, text_encoder = split(models)
        if ema is not None:
            ema.store(setup.params)
            load_adapters(Path(input_dir) / EMA_LORA_DIRNAME, unet, text_encoder, setup)
            ema.shadow_params = [p.detach().clone() for p in setup.params]
            ema.restore(setup.params)
            ema.load_state_dict(json.loads((Path(input_dir) / EMA_LORA_DIRNAME / EMA_STATE_FILENAME).read_text()))
            place_ema(ema, args.offload_ema, accelerator.device)
        load_adapters(Path(input_dir), unet, text_encoder, setup)
        models.clear()

    return save_hook, load_hook


def save_final(run, output_dir: Path):
    """Write the LoRA files and run record of the finished run; return a pipeline of base + adapters to validate."""
    from diffusers import StableDiffusionPipeline

    from trainer.models import bare_model, move_frozen

    accelerator, args, setup = run.accelerator, run.args, run.lora
    unet = bare_model(run.unet).eval()  # training is over: no LoRA dropout in the final validation
    text_encoder = bare_model(run.components.text_encoder).eval()
    path = save_diffusers_file(output_dir, unet, text_encoder, setup)
    kohya = save_kohya_file(output_dir / KOHYA_WEIGHTS_FILENAME, unet, text_encoder, setup, lora_alpha(args))
    write_run_record(output_dir, args)
    get_logger().info("Saved the LoRA weights to %s%s", path, f" and {kohya.name} (kohya format)" if kohya else "")
    move_frozen(run.components, accelerator.device)
    c = run.components
    return StableDiffusionPipeline(vae=c.vae, text_encoder=text_encoder, tokenizer=c.tokenizer, unet=unet,
                                   scheduler=run.inference_scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
