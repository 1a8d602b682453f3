"""inference/schedulers.py: every offered sampler builds from the model's scheduler config and can sample."""

import inspect

import diffusers
import pytest
import torch

from inference.schedulers import SCHEDULERS, check_scheduler, make_scheduler
from stand_in.tiny_model import build_scheduler
from utils.cli import UsageError

# What a model's scheduler config fixes and every sampler built from it must keep.
KEPT_SETTINGS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")


@pytest.fixture(scope="module")
def model_config():
    """The tiny pipeline's scheduler config: DDPM with Stable Diffusion's betas."""
    return build_scheduler().config


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_each_name_builds_its_class_keeping_the_models_betas(name, model_config):
    scheduler = make_scheduler(name, model_config)
    assert type(scheduler) is getattr(diffusers, SCHEDULERS[name])
    for key in KEPT_SETTINGS:
        assert scheduler.config[key] == model_config[key], key


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_each_scheduler_samples_a_short_run_to_finite_latents(name, model_config):
    # Two steps is what the tests and quick previews use; PNDM's warm-up alone breaks there without the override.
    scheduler = make_scheduler(name, model_config)
    scheduler.set_timesteps(2)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 4, 4, generator=generator) * scheduler.init_noise_sigma
    # Ancestral and stochastic samplers draw noise at each step: seed it too.
    extra = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    for timestep in scheduler.timesteps:
        noise_prediction = 0.1 * scheduler.scale_model_input(latents, timestep)
        latents = scheduler.step(noise_prediction, timestep, latents, **extra).prev_sample
    assert latents.shape == (1, 4, 4, 4) and torch.isfinite(latents).all()


def test_pndm_skips_the_runge_kutta_warm_up_like_sd_configs(model_config):
    assert make_scheduler("pndm", model_config).config.skip_prk_steps is True


def test_v_prediction_models_keep_v_prediction_in_every_scheduler():
    config = build_scheduler().config
    v_config = {**config, "prediction_type": "v_prediction"}
    for name in SCHEDULERS:
        assert make_scheduler(name, v_config).config.prediction_type == "v_prediction", name


def test_unknown_name_is_a_usage_error_listing_the_offered_names(model_config):
    with pytest.raises(UsageError) as caught:
        make_scheduler("lms", model_config)
    message = str(caught.value)
    assert "--scheduler 'lms'" in message and all(name in message for name in SCHEDULERS)


def test_check_scheduler_accepts_every_offered_name():
    for name in SCHEDULERS:
        check_scheduler(name)
    with pytest.raises(UsageError, match="'DDIM'"):
        check_scheduler("DDIM")
