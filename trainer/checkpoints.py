"""Checkpoints: atomic `checkpoint-<step>` folders holding accelerate's state plus loadable UNet/EMA models."""

import re
import shutil
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from utils.atomic import TRASH_SUFFIX, publish_dir
from utils.cli import UsageError
from utils.constants import CHECKPOINT_PREFIX, EMA_UNET_DIRNAME, UNET_DIRNAME
from utils.logger import get_logger

CHECKPOINT_RE = re.compile(rf"^{re.escape(CHECKPOINT_PREFIX)}(\d+)$")
# Leading dot and suffix: never matched by CHECKPOINT_RE, so "latest" and pruning cannot pick a half-written save.
PARTIAL_SUFFIX = ".partial"
# accelerate's file for each object given to register_for_checkpointing; its load_state refuses a folder holding a
# different number of them than are registered.
COUNTER_FILE_RE = re.compile(r"^custom_checkpoint_\d+\.pkl$")


def checkpoint_step(name: str) -> Optional[int]:
    """The step of a finished checkpoint folder name, or None for anything else (temp folders included)."""
    match = CHECKPOINT_RE.match(name)
    return int(match.group(1)) if match else None


def list_checkpoints(output_dir: Path) -> List[Path]:
    """Finished checkpoint folders of output_dir, oldest step first."""
    if not Path(output_dir).is_dir():
        return []
    found = [(checkpoint_step(p.name), p) for p in Path(output_dir).iterdir() if p.is_dir()]
    return [p for step, p in sorted((s, p) for s, p in found if s is not None)]


def checkpoints_to_prune(checkpoints: List[Path], total_limit: Optional[int]) -> List[Path]:
    """The oldest checkpoints to delete so that, after one more save, at most total_limit remain."""
    if total_limit is None or len(checkpoints) < total_limit:
        return []
    return checkpoints[: len(checkpoints) - total_limit + 1]


def partial_dir(output_dir: Path, step: int) -> Path:
    """Where a checkpoint is written before the rename that publishes it."""
    return Path(output_dir) / f".{CHECKPOINT_PREFIX}{step}{PARTIAL_SUFFIX}"


def remove_stale_partials(output_dir: Path) -> List[Path]:
    """Delete temp folders left by a save that was killed; return what was removed."""
    if not Path(output_dir).is_dir():
        return []
    stale = [p for p in Path(output_dir).iterdir()
             if p.is_dir() and p.name.startswith(f".{CHECKPOINT_PREFIX}") and p.name.endswith((PARTIAL_SUFFIX, TRASH_SUFFIX))]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def resolve_resume(output_dir: Path, value: Optional[str]) -> Optional[Path]:
    """The checkpoint to resume from: None, "latest" (None if there is none), a name under output_dir, or a path."""
    if value is None:
        return None
    if value == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            get_logger().info("--resume_from_checkpoint=latest: no checkpoint in %s, starting a new run.", output_dir)
            return None
        return found[-1]
    candidate = Path(value) if Path(value).is_dir() else Path(output_dir) / value
    if not candidate.is_dir() or checkpoint_step(candidate.name) is None:
        raise UsageError(f"--resume_from_checkpoint: no checkpoint folder '{value}' (expected 'latest', "
                         f"'{CHECKPOINT_PREFIX}N' in {output_dir}, or the path of one).")
    return candidate


def saved_counters(path: Path) -> int:
    """How many registered objects (counters kept beside the models) a checkpoint folder holds."""
    return sum(1 for p in Path(path).iterdir() if COUNTER_FILE_RE.match(p.name))


def load_checkpoint(accelerator, path: Path, counters: Sequence) -> None:
    """accelerator.load_state with the counters registered, so later saves keep them too.

    A checkpoint saved before the trainer kept any counter loads with them at their start values (zero skipped
    updates: its step count already included them, so the data position is the one that version resumed at). One
    holding a different number of them was written by another version of the trainer: a usage error.
    """
    saved = saved_counters(path)
    if saved not in (0, len(counters)):
        raise UsageError(f"--resume_from_checkpoint: {path.name} holds {saved} saved counter(s) where this trainer "
                         f"keeps {len(counters)}: it was written by another version of the trainer; resume it with "
                         "that version.")
    older = saved < len(counters)
    if older and accelerator.is_main_process:
        get_logger().warning("%s was saved before checkpoints kept the count of updates the fp16 grad scaler "
                             "skipped: resuming with that count at 0, as the version that saved it would.", path.name)
    if not older:
        accelerator.register_for_checkpointing(*counters)
    accelerator.load_state(str(path))
    if older:
        accelerator.register_for_checkpointing(*counters)


def resume_position(global_step: int, steps_per_epoch: int, gradient_accumulation_steps: int) -> Tuple[int, int]:
    """(first epoch, batches of it already consumed) for a run resumed at global_step optimizer steps."""
    first_epoch = global_step // steps_per_epoch
    return first_epoch, (global_step % steps_per_epoch) * gradient_accumulation_steps


def save_checkpoint(accelerator, output_dir: Path, step: int, total_limit: Optional[int]) -> Path:
    """Prune the oldest, save accelerate's state into a temp folder, then rename it to checkpoint-<step>."""
    output_dir = Path(output_dir)
    tmp, final = partial_dir(output_dir, step), output_dir / f"{CHECKPOINT_PREFIX}{step}"
    if accelerator.is_main_process:
        for old in checkpoints_to_prune(list_checkpoints(output_dir), total_limit):
            get_logger().info("Removing %s (--checkpoints_total_limit=%s)", old.name, total_limit)
            shutil.rmtree(old)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    # Every process calls save_state: each writes its own RNG state; only the main one writes the rest.
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        publish_dir(tmp, final)
        get_logger().info("Saved %s", final)
    accelerator.wait_for_everyone()
    return final


def make_state_hooks(accelerator, ema, offload_ema: bool = False, metadata=None):
    """accelerate save/load hooks that store the UNet (and EMA) as diffusers models in the checkpoint; with a
    metadata encoder (trainer.metadata.MetadataEncoder), its metadata_spec.json beside each."""
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.training_utils import EMAModel

    from trainer.models import bare_model, place_ema

    def save_hook(models, weights, output_dir):
        """Write unet/ (and unet_ema/) as diffusers models; keep accelerate from saving its own copy."""
        if accelerator.is_main_process:
            if ema is not None:
                # It builds a randomly initialised UNet: off the training RNG, so saves do not change later draws.
                with torch.random.fork_rng(devices=[]):
                    ema.save_pretrained(Path(output_dir) / EMA_UNET_DIRNAME)
            for model in models:
                bare_model(model).save_pretrained(Path(output_dir) / UNET_DIRNAME, safe_serialization=True)
            if metadata is not None:
                from trainer.metadata import write_spec

                for name in (UNET_DIRNAME, EMA_UNET_DIRNAME) if ema is not None else (UNET_DIRNAME,):
                    write_spec(metadata, Path(output_dir) / name)
        # Emptied so accelerate does not write a second, opaque copy of the weights.
        while weights:
            weights.pop()

    def load_hook(models, input_dir):
        """Load unet/ (and unet_ema/) back in place; the popped models are then skipped by accelerate."""
        if ema is not None:
            loaded = EMAModel.from_pretrained(Path(input_dir) / EMA_UNET_DIRNAME, UNet2DConditionModel)
            ema.load_state_dict(loaded.state_dict())
            place_ema(ema, offload_ema, accelerator.device)
        while models:
            model = bare_model(models.pop())
            saved = UNet2DConditionModel.from_pretrained(Path(input_dir) / UNET_DIRNAME)
            model.register_to_config(**saved.config)
            model.load_state_dict(saved.state_dict())

    return save_hook, load_hook


def register_state_hooks(accelerator, ema, offload_ema: bool = False, lora=None, args=None, metadata=None) -> None:
    """Install the UNet/EMA save and load hooks on the accelerator; in LoRA mode, ones that store only adapters."""
    if lora is not None:
        from trainer import lora as lora_mode

        save_hook, load_hook = lora_mode.make_state_hooks(accelerator, ema, lora, args)
    else:
        save_hook, load_hook = make_state_hooks(accelerator, ema, offload_ema, metadata)
    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
