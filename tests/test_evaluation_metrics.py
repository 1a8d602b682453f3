"""evaluation.metrics (and fidelity_compat): FID against closed forms, CLIP score against CLIP's own embeddings,
and the one-line refusals of files that are not the models they should be."""

import hashlib
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from evaluation.fidelity_compat import torchvision_missing
from evaluation.metrics import (FeatureVectors, clip_cosine, clip_info, inception_info, load_clip, load_inception,
                                make_clip_score, make_fid, to_uint8_batch)
from evaluation.stand_ins import tiny_clip
from utils.cli import UsageError

DIM = 6
SAMPLES = 400


def exact_gaussian_sample(mean, std, rotation, seed: int) -> torch.Tensor:
    """SAMPLES vectors whose sample mean is exactly `mean` and whose sample covariance (n - 1) is exactly
    R diag(std^2) R^T, so FID's closed form holds to rounding, not just to sampling error."""
    z = torch.randn(SAMPLES, DIM, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = z - z.mean(0)
    chol = torch.linalg.cholesky(z.T @ z / (SAMPLES - 1))
    white = z @ torch.linalg.inv(chol).T
    return torch.as_tensor(mean, dtype=torch.float64) + (white * torch.as_tensor(std, dtype=torch.float64)) @ rotation.T


def random_rotation(seed: int) -> torch.Tensor:
    """A random orthogonal matrix (QR of a Gaussian matrix)."""
    q, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def fid_of(real: torch.Tensor, generated: torch.Tensor) -> float:
    """FID through the metric evaluate.py builds, over the given feature vectors."""
    metric = make_fid(FeatureVectors(DIM))
    metric.update(real, real=True)
    metric.update(generated, real=False)
    return float(metric.compute())


def closed_form(mean1, std1, mean2, std2) -> float:
    """FID of two Gaussians whose covariances share eigenvectors: |mu1-mu2|^2 + sum (s1 - s2)^2 (s = std devs)."""
    return float(np.sum((np.array(mean1) - mean2) ** 2) + np.sum((np.array(std1) - std2) ** 2))


MEAN_A = [0.0, 1.0, -2.0, 0.5, 3.0, 0.0]
STD_A = [1.0, 2.0, 0.5, 1.5, 1.0, 3.0]
MEAN_B = [1.0, 1.0, 0.0, -0.5, 3.0, 2.0]
STD_B = [2.0, 0.5, 0.5, 1.0, 4.0, 1.0]


def test_fid_of_a_set_with_itself_is_zero():
    features = exact_gaussian_sample(MEAN_A, STD_A, random_rotation(0), seed=1)
    assert fid_of(features, features) == pytest.approx(0.0, abs=1e-6)


def test_fid_of_a_shift_is_the_squared_distance_of_means():
    rotation = random_rotation(0)
    assert fid_of(exact_gaussian_sample(MEAN_A, STD_A, rotation, seed=1),
                  exact_gaussian_sample(MEAN_B, STD_A, rotation, seed=2)) == pytest.approx(
        closed_form(MEAN_A, STD_A, MEAN_B, STD_A), rel=1e-6)


@pytest.mark.parametrize("rotation_seed", [None, 5])
def test_fid_matches_the_closed_form_for_different_covariances(rotation_seed):
    """Diagonal covariances, then the same ones rotated (full matrices): FID is rotation invariant."""
    rotation = torch.eye(DIM, dtype=torch.float64) if rotation_seed is None else random_rotation(rotation_seed)
    got = fid_of(exact_gaussian_sample(MEAN_A, STD_A, rotation, seed=3),
                 exact_gaussian_sample(MEAN_B, STD_B, rotation, seed=4))
    assert got == pytest.approx(closed_form(MEAN_A, STD_A, MEAN_B, STD_B), rel=1e-6)


def noise_images(count: int, size: int, seed: int) -> list:
    """Random RGB PIL images."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def test_to_uint8_batch_is_n_c_h_w_with_the_pixels():
    images = noise_images(2, 5, seed=0)
    batch = to_uint8_batch(images)
    assert batch.dtype == torch.uint8 and batch.shape == (2, 3, 5, 5)
    assert torch.equal(batch[1, 2], torch.from_numpy(np.array(images[1])[:, :, 2]))


def test_clip_score_is_100_times_the_mean_cosine_of_clip_embeddings():
    """Compare with CLIPModel.forward's own normalised embeddings, a different code path from the metric's."""
    model, processor = tiny_clip(seed=3)
    images = noise_images(3, 48, seed=1)
    captions = ["green fields and a river .", "a straight road between ponds .", "many buildings"]
    metric = make_clip_score(model, processor)
    metric.update(to_uint8_batch(images), captions)
    with torch.no_grad():
        out = model(**processor(text=captions, images=images, return_tensors="pt", padding=True))
    cosines = (out.image_embeds * out.text_embeds).sum(-1)
    assert clip_cosine(metric) == pytest.approx(float(cosines.mean()), abs=1e-5)
    assert float(metric.compute()) == pytest.approx(max(100 * float(cosines.mean()), 0.0), abs=1e-3)


def test_stand_in_inception_loads_and_tells_images_apart(stand_in_models):
    inception = load_inception(stand_in_models["inception_weights"])
    features = inception(to_uint8_batch(noise_images(2, 64, seed=2)))
    assert features.shape == (2, 2048)
    assert not torch.allclose(features[0], features[1])


def test_inception_info_records_the_sha256_and_flags_a_non_standard_file(stand_in_models):
    path = stand_in_models["inception_weights"]
    info = inception_info(path)
    assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info["matches_standard_name"] is False


def test_inception_weights_that_are_not_inception_are_refused(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("not weights")
    other = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, other)
    for path, words in ((tmp_path / "missing.pth", "does not exist"), (text, "not a PyTorch weights file"),
                        (other, "does not hold FID InceptionV3 weights")):
        with pytest.raises(UsageError, match=words) as caught:
            load_inception(path)
        assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_clip_folder_that_is_not_clip_is_refused(tmp_path, tiny_model_dir):
    for folder, words in ((tmp_path, "no config.json"), (tiny_model_dir / "text_encoder", "not CLIP"),
                          (tiny_model_dir / "unet", "does not load as a CLIP model")):
        with pytest.raises(UsageError, match=words):
            load_clip(folder)


def test_stand_in_clip_loads_and_is_marked(stand_in_models):
    model, processor = load_clip(stand_in_models["clip_model"])
    assert model.config.projection_dim > 0 and processor.tokenizer is not None
    assert clip_info(stand_in_models["clip_model"])["stand_in"] is True


@pytest.mark.skipif(not torchvision_missing(), reason="with torchvision, torch_fidelity imports normally")
def test_torch_fidelity_is_a_bare_package_without_torchvision():
    """Its eager __init__ (which needs torchvision) was skipped, yet the Inception module imports."""
    package = sys.modules["torch_fidelity"]
    assert not hasattr(package, "calculate_metrics")
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3  # noqa: F401
