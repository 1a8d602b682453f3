"""trainer/loss.py: targets, min-SNR weights, noise offset, DREAM, NaN guard, and that training lowers the loss."""

import math
from types import SimpleNamespace

import pytest
import torch

from trainer import loss as L


def ddpm(prediction_type: str = "epsilon"):
    """SD's DDPM training scheduler."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", prediction_type=prediction_type)


def test_target_is_noise_or_velocity():
    """epsilon → the noise; v_prediction → sqrt(ᾱ)·noise − sqrt(1−ᾱ)·latents."""
    latents, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    assert torch.equal(L.training_target(ddpm("epsilon"), latents, noise, t), noise)
    alpha = ddpm().alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = alpha.sqrt() * noise - (1 - alpha).sqrt() * latents
    torch.testing.assert_close(L.training_target(ddpm("v_prediction"), latents, noise, t), expected)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights(prediction_type):
    """min(snr, γ)/snr for epsilon, min(snr, γ)/(snr+1) for v_prediction, with snr = ᾱ/(1−ᾱ)."""
    scheduler, t = ddpm(prediction_type), torch.tensor([0, 50, 500, 999])
    alpha = scheduler.alphas_cumprod[t]
    snr = alpha / (1 - alpha)
    denominator = snr if prediction_type == "epsilon" else snr + 1
    expected = torch.minimum(snr, torch.full_like(snr, 5.0)) / denominator
    torch.testing.assert_close(L.snr_loss_weights(scheduler, t, 5.0), expected)


def test_weighted_mse_per_sample():
    """Unweighted: plain MSE. Weighted: per-sample means times weights, averaged."""
    pred, target = torch.zeros(2, 1, 2, 2), torch.stack([torch.ones(1, 2, 2), 2 * torch.ones(1, 2, 2)])
    assert L.weighted_mse(pred, target, None).item() == pytest.approx(2.5)
    assert L.weighted_mse(pred, target, torch.tensor([1.0, 0.0])).item() == pytest.approx(0.5)


def test_noise_offset_is_a_per_channel_shift():
    """noise_offset adds offset × randn(B, C, 1, 1) to the Gaussian noise."""
    latents = torch.zeros(2, 4, 8, 8)
    torch.manual_seed(3)
    noise = L.sample_noise(latents, 0.5)
    torch.manual_seed(3)
    base, shift = torch.randn_like(latents), torch.randn(2, 4, 1, 1)
    torch.testing.assert_close(noise, base + 0.5 * shift)
    torch.manual_seed(3)
    torch.testing.assert_close(L.sample_noise(latents, 0.0), base)


def test_check_finite():
    """NaN and inf raise TrainingDiverged naming the step; finite losses pass."""
    L.check_finite(0.3, 0)
    for bad in (math.nan, math.inf):
        with pytest.raises(L.TrainingDiverged, match="optimizer step 5"):
            L.check_finite(bad, 4)


def test_check_finite_parameters():
    """Finite weights pass; one NaN anywhere raises before a checkpoint could store it."""
    weights = [torch.zeros(3), torch.ones(2, 2)]
    L.check_finite_parameters(weights, 2)
    weights[1][0, 1] = math.nan
    with pytest.raises(L.TrainingDiverged, match="step 2"):
        L.check_finite_parameters(weights, 2)


class ZeroUNet:
    """Predicts zeros; answers both call styles the trainer and diffusers' DREAM helper use."""

    def __call__(self, sample, timesteps, encoder_hidden_states, return_dict=True):
        """Zeros shaped like the sample."""
        out = torch.zeros_like(sample)
        return (out,) if not return_dict else SimpleNamespace(sample=out)


@pytest.fixture(scope="module")
def tiny_parts(tiny_model_dir):
    """The tiny pipeline's VAE, text encoder and training scheduler."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    return (AutoencoderKL.from_pretrained(tiny_model_dir, subfolder="vae"),
            CLIPTextModel.from_pretrained(tiny_model_dir, subfolder="text_encoder"))


def fixed_loss(monkeypatch, tiny_parts, scheduler, options, noise, timesteps):
    """diffusion_loss of a zero-predicting UNet with the noise and timesteps pinned."""
    monkeypatch.setattr(L, "sample_noise", lambda latents, offset: noise)
    monkeypatch.setattr(L, "sample_timesteps", lambda n, total, device: timesteps)
    vae, text_encoder = tiny_parts
    batch = {"pixel_values": torch.zeros(2, 3, 16, 16), "input_ids": torch.zeros(2, 77, dtype=torch.long)}
    return L.diffusion_loss(batch, ZeroUNet(), vae, text_encoder, scheduler, options, torch.float32).item()


def test_loss_composes_target_snr_and_dream(monkeypatch, tiny_parts):
    """With a zero prediction: epsilon loss = E[noise²]; min-SNR weights it; DREAM scales the target by 1+λ."""
    noise, t = torch.ones(2, 4, 8, 8), torch.tensor([100, 700])
    scheduler = ddpm()
    assert fixed_loss(monkeypatch, tiny_parts, scheduler, L.LossOptions(), noise, t) == pytest.approx(1.0)
    weights = L.snr_loss_weights(scheduler, t, 5.0)
    snr_loss = fixed_loss(monkeypatch, tiny_parts, scheduler, L.LossOptions(snr_gamma=5.0), noise, t)
    assert snr_loss == pytest.approx(weights.mean().item(), rel=1e-5)
    lam = (1 - scheduler.alphas_cumprod[t]).sqrt()
    dream = fixed_loss(monkeypatch, tiny_parts, scheduler, L.LossOptions(dream_training=True), noise, t)
    assert dream == pytest.approx(((1 + lam) ** 2).mean().item(), rel=1e-5)


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: two threads stall badly when the 2-core box is shared."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_loss_falls_when_overfitting_four_images(tiny_model_dir, tiny_data_dir, one_thread):
    """A few high-LR steps on 4 fixed images: the mean loss of the last steps is well below the first ones."""
    from trainer import data, models
    from trainer.args import parse_args

    args = parse_args(["--pretrained_model_name_or_path", str(tiny_model_dir), "--train_data_dir",
                       str(tiny_data_dir), "--resolution", "32", "--max_train_samples", "4", "--seed", "0",
                       "--center_crop"])
    torch.manual_seed(0)
    parts = models.load_components(args, torch.float32, "cpu")
    batch = next(iter(data.build_dataloader(data.build_train_dataset(args, parts.tokenizer, 0), 4, 0, 0)))
    optimizer = models.build_optimizer(args, parts.unet.parameters(), 1e-3)
    losses = []
    for _ in range(16):
        loss = L.diffusion_loss(batch, parts.unet, parts.vae, parts.text_encoder, parts.noise_scheduler,
                                L.LossOptions(), torch.float32)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    first, last = sum(losses[:3]) / 3, sum(losses[-5:]) / 5
    assert last < 0.6 * first, losses


def test_noise_does_not_depend_on_the_latents_memory_layout():
    """Batch-2 cache parity: the VAE's CPU convolutions give channels_last latents from batch 2 on, cached latents
    are contiguous; the same seed must draw the same noise and leave the RNG at the same place for both."""
    latents = torch.zeros(2, 4, 8, 8)
    draws = []
    for layout in (torch.contiguous_format, torch.channels_last):
        torch.manual_seed(3)
        draws.append((L.sample_noise(latents.to(memory_format=layout), 0.0), torch.rand(1)))
    assert torch.equal(draws[0][0], draws[1][0]) and torch.equal(draws[0][1], draws[1][1])
