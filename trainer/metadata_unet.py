"""The metadata embedding in the UNet, with stock diffusers config keys only (class_embed_type="projection").

diffusers' projection class embedding is Linear-SiLU-Linear on the metadata vector, added to the timestep embedding.
A new one starts with its last layer at zero, so the UNet computes exactly what the base does until it trains.
A LoRA run ships the trained embedding beside its adapters as metadata_embedding.safetensors (the UNet's own
class_embedding.* keys) plus metadata_spec.json; install_embedding puts it into a base UNet for sampling or merging.
"""

import os
from pathlib import Path

import torch

from utils.cli import UsageError

PROJECTION = "projection"
EMBEDDING_FILENAME = "metadata_embedding.safetensors"
EMBEDDING_PREFIX = "class_embedding."
SPEC_ATTRIBUTE = "metadata_spec"  # where install_embedding leaves the encoder on the UNet for the sampling pipeline


def has_embedding(unet, dim: int) -> bool:
    """True when the UNet already carries a projection class embedding taking dim inputs (a model trained so)."""
    config = unet.config
    return (config.class_embed_type == PROJECTION and config.projection_class_embeddings_input_dim == dim
            and unet.class_embedding is not None)


def add_embedding(unet, dim: int) -> bool:
    """Give the UNet a zero-output projection class embedding of dim inputs (kept when it has one); True if added.

    The new layers are built off the global RNG, so a metadata run draws the same noise and timesteps as a run
    without metadata.
    """
    from diffusers.models.embeddings import TimestepEmbedding

    if has_embedding(unet, dim):
        return False
    config = unet.config
    if unet.class_embedding is not None or config.class_embed_type is not None or config.num_class_embeds:
        raise UsageError(f"--metadata_fields: the base UNet already has a class embedding "
                         f"(class_embed_type={config.class_embed_type}, projection_class_embeddings_input_dim="
                         f"{config.projection_class_embeddings_input_dim}) that does not take the {dim} metadata "
                         "features.")
    time_dim = unet.time_embedding.linear_2.out_features
    reference = unet.time_embedding.linear_2.weight
    with torch.random.fork_rng(devices=[]):
        # diffusers builds the projection embedding with TimestepEmbedding's default SiLU whatever act_fn says.
        embedding = TimestepEmbedding(dim, time_dim)
    torch.nn.init.zeros_(embedding.linear_2.weight)
    torch.nn.init.zeros_(embedding.linear_2.bias)
    unet.class_embedding = embedding.to(device=reference.device, dtype=reference.dtype)
    unet.class_embedding.requires_grad_(True)
    place_like_diffusers(unet)
    keys = ("class_embed_type", "projection_class_embeddings_input_dim")
    unet.register_to_config(class_embed_type=PROJECTION, projection_class_embeddings_input_dim=dim)
    # from_config (EMAModel.save_pretrained builds its UNet so) drops keys listed as left at their defaults.
    defaults = unet.config.get("_use_default_values")
    if defaults:
        unet.register_to_config(_use_default_values=[k for k in defaults if k not in keys])
    return True


def place_like_diffusers(unet) -> None:
    """Move class_embedding to where diffusers' constructor registers it (after time_embedding and encoder_hid_proj),
    so the UNet's parameters come in the order of a UNet built from its config: EMAModel.save_pretrained and
    from_pretrained pair weights by that order."""
    from collections import OrderedDict

    names = list(unet._modules)
    names.remove("class_embedding")
    anchor = max(names.index(n) for n in ("time_embedding", "encoder_hid_proj") if n in names)
    names.insert(anchor + 1, "class_embedding")
    unet._modules = OrderedDict((name, unet._modules[name]) for name in names)


def absent_by_default(unet, dim: int):
    """A forward pre-hook giving the all-absent (zero) metadata vector to calls without class_labels (validation
    through the stock pipeline); calls that pass class_labels are untouched. Returns the hook handle."""

    def fill(module, args, kwargs):
        """Add zeros(batch, dim) as class_labels when the caller gave none."""
        if kwargs.get("class_labels") is not None:
            return None
        sample = args[0] if args else kwargs["sample"]
        return args, {**kwargs, "class_labels": torch.zeros(sample.shape[0], dim, device=sample.device,
                                                            dtype=sample.dtype)}

    return unet.register_forward_pre_hook(fill, with_kwargs=True)


def prepare(unet, rows):
    """With rows (trainer.metadata.RowMetadata): add the embedding for their encoder, make calls without metadata
    get the all-absent vector, and return the encoder; None (the UNet untouched) without rows."""
    from utils.logger import get_logger

    if rows is None:
        return None
    encoder = rows.encoder
    if add_embedding(unet, encoder.dim):
        get_logger().info("Added a zero-initialised metadata embedding (%d features -> %d) to the UNet", encoder.dim,
                          unet.class_embedding.linear_2.out_features)
    absent_by_default(unet, encoder.dim)
    return encoder


def embedding_state(unet) -> dict:
    """The UNet's class_embedding weights under their UNet state-dict names, fp32 on the CPU."""
    return {EMBEDDING_PREFIX + key: value.detach().to("cpu", torch.float32).contiguous()
            for key, value in unet.class_embedding.state_dict().items()}


def save_embedding(folder: Path, unet, encoder) -> Path:
    """FOLDER/metadata_embedding.safetensors (temp name, then rename) and FOLDER/metadata_spec.json."""
    from safetensors.torch import save_file

    from trainer.metadata import write_spec

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{EMBEDDING_FILENAME}.tmp"
    save_file(embedding_state(unet), str(tmp), metadata={"class_embed_type": PROJECTION,
                                                         "projection_class_embeddings_input_dim": str(encoder.dim)})
    os.replace(tmp, folder / EMBEDDING_FILENAME)
    write_spec(encoder, folder)
    return folder / EMBEDDING_FILENAME


def load_embedding(folder: Path, unet) -> None:
    """Copy FOLDER/metadata_embedding.safetensors into the UNet's class_embedding (resume); a folder without one was
    saved by a run without --metadata_fields: a usage error."""
    from safetensors.torch import load_file

    path = Path(folder) / EMBEDDING_FILENAME
    if not path.is_file():
        raise UsageError(f"'{folder}' holds no {EMBEDDING_FILENAME}: it was saved by a run without "
                         "--metadata_fields; resume it with the flags it was trained with.")
    state = load_file(str(path))
    unet.class_embedding.load_state_dict({key[len(EMBEDDING_PREFIX):]: value for key, value in state.items()})


def install_embedding(folder: Path, unet):
    """Give a UNet the metadata embedding saved in FOLDER (a LoRA run's) and attach its encoder as
    unet.metadata_spec; return the encoder, or None (the UNet untouched) when FOLDER has no embedding."""
    from trainer.metadata import read_spec

    if not (Path(folder) / EMBEDDING_FILENAME).is_file():
        return None
    encoder = read_spec(folder)
    if encoder is None:
        raise UsageError(f"'{folder}' holds {EMBEDDING_FILENAME} but no metadata_spec.json describing its input.")
    add_embedding(unet, encoder.dim)
    load_embedding(folder, unet)
    setattr(unet, SPEC_ATTRIBUTE, encoder)
    return encoder
