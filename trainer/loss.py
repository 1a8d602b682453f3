"""The diffusion training objective: noise, timesteps, target, min-SNR weighting, DREAM."""

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from utils.logger import get_logger

# The fp16 grad scaler halves its scale at each skipped update. This many in a row (a scale 2^32 times smaller)
# is not a passing overflow (the forward pass itself overflows, or the weights are broken): the run stops.
MAX_SKIPPED_IN_A_ROW = 32


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite: training must stop before the state is saved."""


@dataclass(frozen=True)
class LossOptions:
    """The loss-related flags, gathered so the step function has one argument for them."""

    noise_offset: float = 0.0
    input_perturbation: float = 0.0
    snr_gamma: Optional[float] = None
    dream_training: bool = False
    dream_detail_preservation: float = 1.0

    @classmethod
    def from_args(cls, args) -> "LossOptions":
        """Pick the loss flags out of the parsed command line."""
        return cls(args.noise_offset, args.input_perturbation, args.snr_gamma, args.dream_training,
                   args.dream_detail_preservation)


def randn_as(tensor: torch.Tensor) -> torch.Tensor:
    """Standard normal noise of tensor's shape, dtype and device, drawn in row-major order whatever its layout."""
    # Not randn_like: it keeps the memory format, and the VAE's CPU convolutions return channels_last latents from
    # batch 2 on, so the draw (values and RNG consumed) would differ from the cached path's contiguous latents.
    return torch.randn(tensor.shape, dtype=tensor.dtype, device=tensor.device)


def sample_noise(latents: torch.Tensor, noise_offset: float) -> torch.Tensor:
    """Gaussian noise like latents, plus a per-channel offset that lets the model learn overall brightness."""
    noise = randn_as(latents)
    if noise_offset:
        noise = noise + noise_offset * torch.randn(latents.shape[0], latents.shape[1], 1, 1, device=latents.device)
    return noise


def sample_timesteps(batch_size: int, num_train_timesteps: int, device) -> torch.Tensor:
    """One uniform timestep in [0, num_train_timesteps) per sample."""
    return torch.randint(0, num_train_timesteps, (batch_size,), device=device).long()


def training_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor,
                    timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet must predict: the noise (epsilon) or the velocity (v_prediction)."""
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"Unknown prediction type {prediction_type}")


def snr_loss_weights(noise_scheduler, timesteps: torch.Tensor, snr_gamma: float) -> torch.Tensor:
    """Min-SNR-γ weights: min(snr, γ)/snr for epsilon, min(snr, γ)/(snr + 1) for v_prediction."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    clipped = torch.minimum(snr, torch.full_like(snr, snr_gamma))
    if noise_scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
    """MSE in fp32, averaged per sample and weighted when weights are given."""
    if weights is None:
        return F.mse_loss(pred.float(), target.float(), reduction="mean")
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=list(range(1, pred.ndim)))
    return (per_sample * weights).mean()


def encode_latents(vae, pixel_values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """VAE posterior sample scaled by the VAE's scaling factor."""
    with torch.no_grad():
        latents = vae.encode(pixel_values.to(dtype)).latent_dist.sample()
    return latents * vae.config.scaling_factor


def batch_latents(batch: dict, vae, dtype: torch.dtype) -> torch.Tensor:
    """Scaled latents of a batch: sampled from the cached posterior when the batch carries one, else encoded."""
    if "latent_mean" not in batch:
        return encode_latents(vae, batch["pixel_values"], dtype)
    from trainer.latent_cache import sample_posterior

    return sample_posterior(batch["latent_mean"], batch["latent_std"]) * vae.config.scaling_factor


def batch_text_states(batch: dict, text_encoder) -> torch.Tensor:
    """Text-encoder hidden states of a batch: cached ones when present, else encoded from the token ids."""
    if "encoder_hidden_states" in batch:
        return batch["encoder_hidden_states"]
    # Gradients only when something in the text encoder trains (text-encoder LoRA).
    with torch.set_grad_enabled(any(p.requires_grad for p in text_encoder.parameters())):
        return text_encoder(batch["input_ids"], return_dict=False)[0]


def diffusion_loss(batch: dict, unet, vae, text_encoder, noise_scheduler, options: LossOptions,
                   weight_dtype: torch.dtype) -> torch.Tensor:
    """The loss of one batch, as the reference computes it (from the latent cache's batches too).

    The global RNG is consumed in the same order either way (latent sample, noise, timesteps), so a cached run
    with the same seed draws the same noise as an uncached one.
    """
    latents = batch_latents(batch, vae, weight_dtype)
    noise = sample_noise(latents, options.noise_offset)
    timesteps = sample_timesteps(latents.shape[0], noise_scheduler.config.num_train_timesteps, latents.device)
    noised_with = noise + options.input_perturbation * randn_as(noise) if options.input_perturbation else noise
    noisy_latents = noise_scheduler.add_noise(latents, noised_with, timesteps)
    encoder_hidden_states = batch_text_states(batch, text_encoder)
    target = training_target(noise_scheduler, latents, noise, timesteps)
    if options.dream_training:
        from diffusers.training_utils import compute_dream_and_update_latents

        noisy_latents, target = compute_dream_and_update_latents(
            unet, noise_scheduler, timesteps, noise, noisy_latents, target, encoder_hidden_states,
            options.dream_detail_preservation)
    # The metadata vectors (--metadata_fields) feed the UNet's projection class embedding; without them the call
    # is the reference's.
    conditioning = {"class_labels": batch["metadata"]} if "metadata" in batch else {}
    if "conditioning_pixel_values" in batch:  # ControlNet mode: the model is trainer.controlnet.ControlledUNet
        conditioning["controlnet_cond"] = batch["conditioning_pixel_values"]
    pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False, **conditioning)[0]
    weights = snr_loss_weights(noise_scheduler, timesteps, options.snr_gamma) if options.snr_gamma else None
    return weighted_mse(pred, target, weights)


def check_finite(loss_value: float, step: int) -> None:
    """Raise TrainingDiverged on a NaN or infinite loss, naming the optimizer step."""
    if not math.isfinite(loss_value):
        raise TrainingDiverged(
            f"loss is {loss_value} at optimizer step {step + 1}: training stopped, nothing saved after the last "
            "good checkpoint (try a lower --learning_rate, --mixed_precision=bf16 or --max_grad_norm).")


def check_finite_parameters(parameters, step: int) -> None:
    """Raise TrainingDiverged if an optimizer step left NaN/inf weights, so such a state is never checkpointed."""
    with torch.no_grad():
        if all(torch.isfinite(p).all() for p in parameters):
            return
    raise TrainingDiverged(
        f"weights became NaN or infinite at optimizer step {step}: training stopped, nothing saved after the last "
        "good checkpoint (try a lower --learning_rate or --max_grad_norm).")


@dataclass
class SkippedSteps:
    """Updates the fp16 grad scaler skipped (inf/NaN gradients): none is an optimizer step. Saved in checkpoints,
    because skipped updates consumed batches and resume must find the data position."""

    total: int = 0
    in_a_row: int = 0

    def record(self, skipped: bool, step: int, loss: float, scale: Optional[float]) -> None:
        """Count one update's outcome; raise TrainingDiverged when too many in a row were skipped."""
        if not skipped:
            self.in_a_row = 0
            return
        self.total += 1
        self.in_a_row += 1
        get_logger().info("The fp16 grad scaler skipped an update before optimizer step %d (inf/NaN gradients, "
                          "loss %.4g); loss scale now %g; %d skipped so far.", step + 1, loss, scale, self.total)
        if self.in_a_row >= MAX_SKIPPED_IN_A_ROW:
            raise TrainingDiverged(
                f"the fp16 grad scaler skipped {self.in_a_row} updates in a row before optimizer step {step + 1} "
                f"(last loss {loss}): training stopped, nothing saved after the last good checkpoint (try "
                "--mixed_precision=bf16 or a lower --learning_rate).")

    def report(self, accelerator) -> None:
        """One line at the end of training when any update was skipped."""
        if self.total and accelerator.is_main_process:
            get_logger().info("The fp16 grad scaler skipped %d update(s) (not counted as optimizer steps).", self.total)

    def state_dict(self) -> dict:
        """What a checkpoint keeps (accelerate's register_for_checkpointing)."""
        return {"total": self.total, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict) -> None:
        """Restore the counts of a checkpoint."""
        self.total, self.in_a_row = int(state["total"]), int(state["in_a_row"])
