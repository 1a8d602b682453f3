"""FID and CLIP score through torchmetrics, with the Inception and CLIP models loaded from local paths.

FID: torchmetrics' FrechetInceptionDistance over the 2048-d pool features of torch-fidelity's FID InceptionV3
(the TensorFlow FID graph ported to PyTorch), loaded from --inception_weights. Images go in as uint8 at the
evaluation resolution; the metric resizes them to 299x299 (bilinear with antialiasing, torchmetrics' default).
CLIP score: torchmetrics' CLIPScore, i.e. max(100 * mean cosine(image, caption), 0); the unclamped mean cosine is
read from the same metric's state, for papers that quote it as a fraction (0.278).
"""

import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from evaluation.fidelity_compat import register_torch_fidelity
from utils.cli import UsageError

register_torch_fidelity()
from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3  # noqa: E402
from torchmetrics.multimodal.clip_score import CLIPScore  # noqa: E402
from transformers import AutoConfig, CLIPConfig, CLIPModel, CLIPProcessor  # noqa: E402

FID_FEATURE = "2048"
FID_INPUT_SIZE = 299
FID_RESIZE = "bilinear with antialiasing to 299x299 (torchmetrics default)"
CLIP_SCORE_DEFINITION = "torchmetrics CLIPScore: max(100 * mean cosine(image, caption), 0)"
# torch.hub names weights files <name>-<first 8+ hex digits of the file's sha256>.pth; both published copies of
# the standard FID Inception weights (pytorch-fid's pt_inception-2015-12-05-6726825d.pth and torch-fidelity's
# weights-inception-2015-12-05-6726825d.pth) carry this prefix.
STANDARD_INCEPTION_SHA256_PREFIX = "6726825d"
# Written by evaluation.stand_ins into its random CLIP folder, so reports can say the figures mean nothing.
STAND_IN_MARKER = "STAND_IN.txt"
HASH_CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_state_dict(path: Path) -> None:
    """The file must be a plain tensor state dict (loaded with weights_only, so no pickled code runs)."""
    if not path.is_file():
        raise UsageError(f"--inception_weights {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises pickle, zip and runtime errors for non-weights files
        raise UsageError(f"--inception_weights {path} is not a PyTorch weights file ({type(err).__name__})") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UsageError(f"--inception_weights {path} is not a state dict of tensors")


def load_inception(path: Path) -> NoTrainInceptionV3:
    """torch-fidelity's FID InceptionV3 (2048-d pool features) with the weights at path; UsageError otherwise."""
    check_state_dict(path)
    try:
        inception = NoTrainInceptionV3(name="inception-v3-compat", features_list=[FID_FEATURE],
                                       feature_extractor_weights_path=str(path))
    except RuntimeError as err:  # load_state_dict: missing/unexpected keys or wrong shapes
        first = str(err).strip().splitlines()[0]
        raise UsageError(f"--inception_weights {path} does not hold FID InceptionV3 weights ({first})") from None
    # Stated, so torchmetrics need not find the feature length by a forward pass at 299x299.
    inception.num_features = int(FID_FEATURE)
    return inception


def inception_info(path: Path) -> dict:
    """Path, sha256 and whether the hash matches the standard weights' file name, for the report."""
    sha = file_sha256(path)
    return {"path": str(path), "sha256": sha, "matches_standard_name": sha.startswith(STANDARD_INCEPTION_SHA256_PREFIX)}


class FeatureVectors(nn.Module):
    """A pass-through feature extractor: FID over feature vectors given directly (known answers, saved features)."""

    def __init__(self, num_features: int):
        """num_features is the vector length; torchmetrics reads it to size its state."""
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Return the vectors unchanged."""
        return features


def make_fid(feature: nn.Module) -> FrechetInceptionDistance:
    """The FID metric evaluate.py uses, over any feature extractor (Inception in use, FeatureVectors in tests)."""
    return FrechetInceptionDistance(feature=feature, normalize=False)


class ClipFeatures(nn.Module):
    """A CLIPModel whose get_*_features return embedding tensors, as torchmetrics 1.9 expects.

    transformers 5 returns an output object there, with the projected embeddings in pooler_output.
    """

    def __init__(self, clip: CLIPModel):
        """Wrap a loaded CLIPModel."""
        super().__init__()
        self.clip = clip

    @property
    def config(self) -> CLIPConfig:
        """The wrapped model's config (torchmetrics reads the text length limit from it)."""
        return self.clip.config

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected image embeddings."""
        return embeddings(self.clip.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids: torch.Tensor, attention_mask=None) -> torch.Tensor:
        """Projected text embeddings."""
        return embeddings(self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


def embeddings(output) -> torch.Tensor:
    """The embedding tensor from a get_*_features result, whichever form the transformers version returns."""
    return output if torch.is_tensor(output) else output.pooler_output


def load_clip(folder: Path):
    """CLIPModel and CLIPProcessor from a local folder; UsageError naming it when it is not a CLIP model."""
    if not (folder / "config.json").is_file():
        raise UsageError(f"--clip_model {folder} is not a model folder (no config.json)")
    try:
        config = AutoConfig.from_pretrained(folder)
        if not isinstance(config, CLIPConfig):
            raise UsageError(f"--clip_model {folder} is a {config.model_type!r} model, not CLIP")
        model = CLIPModel.from_pretrained(folder).eval()
        processor = CLIPProcessor.from_pretrained(folder)
    except (OSError, ValueError, KeyError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"--clip_model {folder} does not load as a CLIP model and processor ({first})") from None
    return model, processor


def make_clip_score(model: CLIPModel, processor: CLIPProcessor) -> CLIPScore:
    """torchmetrics CLIPScore over a loaded model (a callable: torchmetrics only loads Hub names itself)."""
    return CLIPScore(model_name_or_path=lambda: (ClipFeatures(model), processor))


def clip_cosine(metric: CLIPScore) -> float:
    """Mean image-caption cosine from CLIPScore's own running sums, before its x100 and its clamp at 0."""
    return float(metric.score / metric.n_samples / 100.0)


def clip_info(folder: Path) -> dict:
    """CLIP model path and whether it is the random stand-in, for the report."""
    return {"path": str(folder), "stand_in": (folder / STAND_IN_MARKER).is_file()}


def to_uint8_batch(images: Sequence) -> torch.Tensor:
    """Same-size RGB PIL images -> uint8 tensor N x 3 x H x W, the input both metrics take."""
    arrays = np.stack([np.asarray(image.convert("RGB"), dtype=np.uint8) for image in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous()
