"""Fail-fast checks run before any model loads: each user mistake becomes one UsageError line (exit 2).

The reference trainer finds most of these problems minutes or hours into a run. Local checks come first,
then the ones that touch the Hub. huggingface_hub is imported lazily so that this module stays light.
The Hub token is never put in a message: any text that could carry it goes through scrub_token.
"""

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from utils.shard_index import is_shards_dir
from trainer.checkpoints import list_checkpoints
from trainer.shards import check_shards_dir
from utils.cli import UsageError
from utils.constants import IMAGES_DIRNAME, METADATA_FILENAME

HUB_TIMEOUT_S = 10
# Values of a boolean environment variable that mean "on".
TRUE_VALUES = ("1", "on", "yes", "true")
OFFLINE_VALUES = TRUE_VALUES
# Files a diffusers Stable Diffusion pipeline folder must hold for the trainer to load each component.
PIPELINE_FILES = ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
                  "scheduler/scheduler_config.json", "tokenizer/tokenizer_config.json")
IMAGEFOLDER_FILE_KEY = "file_name"
IMAGEFOLDER_IMAGE_COLUMN = "image"
LOGIN_HINT = "run `hf auth login` or set HF_TOKEN"
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"


@dataclass(frozen=True)
class Preflight:
    """What the checks established, for the trainer to use instead of re-deriving it."""

    hub_repo_id: Optional[str] = None
    model_is_local: bool = False
    resume_path: Optional[Path] = None


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE asks for no network (read now: huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in OFFLINE_VALUES


def resolve_token(args) -> Optional[str]:
    """The Hub token: --hub_token, else HF_TOKEN or the stored login (huggingface_hub.get_token)."""
    if args.hub_token:
        return args.hub_token
    from huggingface_hub import get_token

    return get_token()


def scrub_token(text: str, token: Optional[str]) -> str:
    """First line of an error text, with the token masked in case a library echoed it."""
    line = (str(text).strip().splitlines() or [""])[0]
    return line.replace(token, "***") if token else line


def check_resolution(resolution: int) -> None:
    """The VAE downsamples by 8, so other sizes fail inside the UNet much later."""
    if resolution <= 0 or resolution % 8:
        raise UsageError(f"--resolution {resolution} must be a positive multiple of 8 (e.g. 512).")


def _nearest_existing(path: Path) -> Path:
    """The closest ancestor of path (or path itself) that exists."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_dir(output_dir: str) -> None:
    """The output dir is a writable folder, or can be created; nothing is created here."""
    path = Path(output_dir).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise UsageError(f"--output_dir '{output_dir}' exists and is not a folder.")
    anchor = _nearest_existing(path)
    if not anchor.is_dir():
        raise UsageError(f"--output_dir '{output_dir}' cannot be created: '{anchor}' is a file, not a folder.")
    if not os.access(anchor, os.W_OK | os.X_OK):
        what = "is not writable" if anchor == path else f"cannot be created: '{anchor}' is not writable"
        raise UsageError(f"--output_dir '{output_dir}' {what}.")


def check_trackers(report_to: str) -> None:
    """wandb must be importable when asked for by name ('all' uses whatever is installed)."""
    if report_to == "wandb" and importlib.util.find_spec("wandb") is None:
        raise UsageError("--report_to wandb needs the wandb package: `pip install wandb`, "
                         "or use --report_to tensorboard.")
    if report_to == "tensorboard" and not any(importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX")):
        raise UsageError("--report_to tensorboard needs the tensorboard package: `pip install tensorboard`.")


def _images_folder_hint(data_dir: Path, flag_value: str) -> Optional[str]:
    """A message pointing to the parent when the user passed the images subfolder."""
    if (data_dir.parent / METADATA_FILENAME).is_file():
        return (f"--train_data_dir '{flag_value}' holds only images; pass its parent '{data_dir.parent}', "
                f"which holds {METADATA_FILENAME}.")
    if data_dir.name == IMAGES_DIRNAME:
        return (f"--train_data_dir '{flag_value}' is the images folder; pass the folder above it that holds "
                f"{METADATA_FILENAME} (format.py writes it).")
    return None


def _metadata_records(metadata: Path):
    """Yield (line number, record) for each non-empty line of metadata.jsonl; bad JSON is a UsageError."""
    with metadata.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise UsageError(f"{metadata}:{number} is not valid JSON ({err.msg}).") from None
            if not isinstance(record, dict):
                raise UsageError(f"{metadata}:{number} is not a JSON object.")
            yield number, record


def _check_record(metadata: Path, number: int, record: dict, args) -> None:
    """One metadata line names an existing image and holds the caption (and any extra image) column."""
    name = record.get(IMAGEFOLDER_FILE_KEY)
    if not isinstance(name, str):
        raise UsageError(f"{metadata}:{number} has no '{IMAGEFOLDER_FILE_KEY}' string naming its image.")
    if not (metadata.parent / name).is_file():
        raise UsageError(f"{metadata}:{number} names image '{name}', which does not exist in {metadata.parent}.")
    columns = [IMAGEFOLDER_IMAGE_COLUMN] + [k for k in record if k != IMAGEFOLDER_FILE_KEY]
    for flag, column in (("--caption_column", args.caption_column), ("--image_column", args.image_column)):
        if column not in columns:
            raise UsageError(f"{flag} '{column}' is not a column of {metadata} (line {number}); "
                             f"columns: {', '.join(columns)}.")


def check_train_data_dir(args) -> None:
    """The imagefolder exists, holds metadata.jsonl, and every line names an image and has the columns."""
    data_dir = Path(args.train_data_dir).expanduser()
    if not data_dir.is_dir():
        raise UsageError(f"--train_data_dir '{args.train_data_dir}' does not exist or is not a folder.")
    if is_shards_dir(data_dir):
        return check_shards_dir(data_dir, args.image_column, args.caption_column)
    metadata = data_dir / METADATA_FILENAME
    if not metadata.is_file():
        hint = _images_folder_hint(data_dir.absolute(), args.train_data_dir)
        raise UsageError(hint or f"--train_data_dir '{args.train_data_dir}' holds no {METADATA_FILENAME}; "
                                 f"pass the folder format.py wrote (it holds {METADATA_FILENAME}).")
    count = 0
    for number, record in _metadata_records(metadata):
        _check_record(metadata, number, record, args)
        count += 1
    if count == 0:
        raise UsageError(f"{metadata} is empty: no training examples.")


def _looks_like_path(value: str) -> bool:
    """A value meant as a filesystem path rather than a Hub id."""
    return value.startswith((".", "/", "~")) or value.count("/") > 1 or os.sep != "/" and os.sep in value


def _validate_hub_id(flag: str, value: str) -> None:
    """A Hub id must be 'name' or 'namespace/name' with allowed characters."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        raise UsageError(f"{flag} '{value}' is neither an existing local folder nor a valid Hub id "
                         "(namespace/name).") from None


def check_dataset_name(args) -> None:
    """--dataset_name is an existing local path or a well-formed Hub dataset id that exists."""
    value = args.dataset_name
    if Path(value).expanduser().exists():
        return
    if _looks_like_path(value):
        raise UsageError(f"--dataset_name '{value}' looks like a path but does not exist.")
    _validate_hub_id("--dataset_name", value)
    if hub_offline():
        return
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        HfApi().dataset_info(value, timeout=HUB_TIMEOUT_S, token=resolve_token(args))
    except GatedRepoError:
        raise UsageError(f"--dataset_name '{value}' is gated: accept its terms on the Hub, then "
                         f"{LOGIN_HINT}.") from None
    except RepositoryNotFoundError:
        raise UsageError(f"--dataset_name '{value}' was not found on the Hub (private? {LOGIN_HINT}).") from None
    except Exception:  # noqa: BLE001 - unreachable Hub: the datasets cache may still have it
        return


def _missing_local_files(folder: Path) -> list:
    """Pipeline files absent from a local diffusers folder."""
    return [name for name in PIPELINE_FILES if not (folder / name).is_file()]


def check_local_model(value: str) -> None:
    """A local base model is a diffusers pipeline folder (save_pretrained layout)."""
    folder = Path(value).expanduser()
    if not folder.is_dir():
        raise UsageError(f"--pretrained_model_name_or_path '{value}' is a file; pass a diffusers pipeline folder.")
    missing = _missing_local_files(folder)
    if "model_index.json" in missing:
        raise UsageError(f"--pretrained_model_name_or_path '{value}' holds no model_index.json: "
                         "pass a diffusers pipeline folder (not a single checkpoint or a checkpoint-N folder).")
    if missing:
        raise UsageError(f"--pretrained_model_name_or_path '{value}' is missing {', '.join(missing)}.")


def _missing_cached_files(repo_id: str, revision: Optional[str], cache_dir: Optional[str]) -> list:
    """Pipeline files of a Hub model absent from the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    return [name for name in PIPELINE_FILES
            if not isinstance(try_to_load_from_cache(repo_id, name, cache_dir=cache_dir, revision=revision), str)]


def _check_cached_model(args, reason: str) -> None:
    """Without the Hub, the model must already be fully in the local cache."""
    missing = _missing_cached_files(args.pretrained_model_name_or_path, args.revision, args.cache_dir)
    if missing:
        shown = "everything" if len(missing) == len(PIPELINE_FILES) else ", ".join(missing)
        raise UsageError(f"--pretrained_model_name_or_path '{args.pretrained_model_name_or_path}' is not in the "
                         f"local Hugging Face cache ({reason}; missing {shown}): run `hf download "
                         f"{args.pretrained_model_name_or_path}` on a connected machine, or pass a local folder.")


def _check_remote_model(args) -> None:
    """Ask the Hub whether the model exists, is readable and is a diffusers pipeline."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    value = args.pretrained_model_name_or_path
    token = resolve_token(args)
    try:
        info = HfApi().model_info(value, revision=args.revision, timeout=HUB_TIMEOUT_S, token=token)
    except GatedRepoError:
        raise UsageError(f"--pretrained_model_name_or_path '{value}' is gated: accept its license on the Hub, "
                         f"then {LOGIN_HINT}.") from None
    except RevisionNotFoundError:
        raise UsageError(f"--revision '{args.revision}' does not exist for '{value}'.") from None
    except RepositoryNotFoundError:
        raise UsageError(f"--pretrained_model_name_or_path '{value}' was not found on the Hub "
                         f"(private? {LOGIN_HINT}).") from None
    except Exception as err:  # noqa: BLE001 - any network failure: fall back to the local cache
        _check_cached_model(args, f"the Hub is unreachable: {scrub_token(err, token)}")
        return
    names = {sibling.rfilename for sibling in (info.siblings or [])}
    if names and "model_index.json" not in names:
        raise UsageError(f"--pretrained_model_name_or_path '{value}' has no model_index.json on the Hub: "
                         "it is not a diffusers pipeline.")


def check_base_model(args) -> bool:
    """The base model is a local pipeline folder or a reachable/cached Hub id; returns True when local."""
    value = args.pretrained_model_name_or_path
    if Path(value).expanduser().exists():
        check_local_model(value)
        return True
    if _looks_like_path(value):
        raise UsageError(f"--pretrained_model_name_or_path '{value}' does not exist.")
    _validate_hub_id("--pretrained_model_name_or_path", value)
    if hub_offline():
        _check_cached_model(args, "HF_HUB_OFFLINE=1")
    else:
        _check_remote_model(args)
    return False


def effective_mixed_precision(args) -> str:
    """--mixed_precision, else what `accelerate launch` or its config passed on (ACCELERATE_MIXED_PRECISION), or no."""
    value = args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION") or "no"
    return value.strip().lower()


def _precision_source(args) -> str:
    """How the user set the precision, for the message: the flag or accelerate's config."""
    if args.mixed_precision:
        return f"--mixed_precision={args.mixed_precision}"
    return f"mixed precision {effective_mixed_precision(args)} (from the accelerate config or launch flags)"


def check_mixed_precision(args) -> None:
    """fp16 needs CUDA (autocast and the grad scaler); bf16 needs a CPU or a GPU with native bf16."""
    precision = effective_mixed_precision(args)
    if precision not in ("fp16", "bf16"):
        return
    import torch

    # accelerate launch --cpu (or ACCELERATE_USE_CPU) trains on the CPU even when a GPU is present.
    on_cuda = torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "").lower() not in TRUE_VALUES
    if precision == "fp16" and not on_cuda:
        raise UsageError(f"{_precision_source(args)} needs a CUDA GPU and none is in use here: "
                         "pass --mixed_precision=bf16 (works on CPU) or --mixed_precision=no.")
    if precision == "bf16" and on_cuda and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise UsageError(f"{_precision_source(args)} needs a GPU with native bf16 (Ampere or newer) and "
                         f"{torch.cuda.get_device_name()} has none: pass --mixed_precision=fp16 or "
                         "--mixed_precision=no.")


def _scheduler_config_file(args) -> Optional[Path]:
    """The base model's scheduler config: in its folder, the Hub cache, or downloaded; None when unreachable."""
    local = Path(args.pretrained_model_name_or_path).expanduser() / SCHEDULER_CONFIG
    if local.is_file():
        return local
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(args.pretrained_model_name_or_path, SCHEDULER_CONFIG, cache_dir=args.cache_dir,
                                    revision=args.revision)
    if isinstance(cached, str):
        return Path(cached)
    if hub_offline():
        return None
    try:
        return Path(hf_hub_download(args.pretrained_model_name_or_path, SCHEDULER_CONFIG, revision=args.revision,
                                    cache_dir=args.cache_dir, token=resolve_token(args)))
    except Exception:  # noqa: BLE001 - the model check already reported a missing model; nothing more to say here
        return None


def training_prediction_type(args) -> Optional[str]:
    """--prediction_type, else the base scheduler's (epsilon when its config names none); None when unknown."""
    if args.prediction_type is not None:
        return args.prediction_type
    path = _scheduler_config_file(args)
    if path is None:
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config.get("prediction_type", "epsilon") if isinstance(config, dict) else None


def check_dream(args) -> None:
    """DREAM is defined for epsilon prediction only (diffusers raises at the first step otherwise)."""
    if args.dream_training and training_prediction_type(args) == "v_prediction":
        raise UsageError("--dream_training works with epsilon prediction only, and this run trains v_prediction "
                         "(--prediction_type or the base scheduler): drop --dream_training or pass "
                         "--prediction_type=epsilon.")


def resolve_resume(args) -> Optional[Path]:
    """The checkpoint folder to resume from; None for a fresh start ('latest' with none saved yet)."""
    value = args.resume_from_checkpoint
    if value is None:
        return None
    output_dir = Path(args.output_dir).expanduser()
    # The trainer's own listing, so preflight and the resume itself agree on what a finished checkpoint is.
    existing = [path.name for path in list_checkpoints(output_dir)]
    if value == "latest":
        return output_dir / existing[-1] if existing else None
    # A bare checkpoint-N name lives in the output dir (the reference's reading); anything else is a path.
    candidate = Path(value).expanduser() if ("/" in value or os.sep in value) else output_dir / value
    if candidate.is_dir():
        return candidate
    available = ", ".join(existing) if existing else "none"
    raise UsageError(f"--resume_from_checkpoint '{value}' does not exist (checkpoints in '{args.output_dir}': "
                     f"{available}); use 'latest' or drop the flag to start fresh.")


def _hub_repo_id(args, token: str) -> str:
    """--hub_model_id, else the output dir's name; prefixed with the user's namespace when it has none."""
    name = args.hub_model_id or Path(args.output_dir).expanduser().absolute().name
    if "/" in name:
        return name
    from huggingface_hub import HfApi

    try:
        user = HfApi().whoami(token=token)["name"]
    except Exception as err:  # noqa: BLE001 - bad token or no network: both stop the run here
        raise UsageError(f"cannot identify your Hub account ({scrub_token(err, token)}): {LOGIN_HINT}.") from None
    return f"{user}/{name}"


def create_hub_repo(args) -> str:
    """Check the login and create (or reuse) the model repo at start; returns its id."""
    if hub_offline():
        raise UsageError("--push_to_hub needs the Hub, but HF_HUB_OFFLINE is set.")
    token = resolve_token(args)
    if not token:
        raise UsageError(f"--push_to_hub needs a Hugging Face login: {LOGIN_HINT}.")
    repo_id = _hub_repo_id(args, token)
    _validate_hub_id("--hub_model_id", repo_id)
    from huggingface_hub import HfApi

    try:
        url = HfApi().create_repo(repo_id, exist_ok=True, token=token, repo_type="model")
    except Exception as err:  # noqa: BLE001 - every Hub failure is the same user-facing stop
        raise UsageError(f"cannot create Hub repo '{repo_id}': {scrub_token(err, token)}") from None
    return getattr(url, "repo_id", None) or repo_id


def preflight(args) -> Preflight:
    """Run every fail-fast check, cheap local ones first; raise UsageError on the first failure."""
    check_resolution(args.resolution)
    check_output_dir(args.output_dir)
    check_trackers(args.report_to)
    check_mixed_precision(args)
    resume_path = resolve_resume(args)
    # Like the reference, --dataset_name wins when both data sources are given.
    if args.dataset_name is not None:
        check_dataset_name(args)
    else:
        check_train_data_dir(args)
    model_is_local = check_base_model(args)
    check_dream(args)
    hub_repo_id = create_hub_repo(args) if args.push_to_hub else None
    return Preflight(hub_repo_id=hub_repo_id, model_is_local=model_is_local, resume_path=resume_path)
