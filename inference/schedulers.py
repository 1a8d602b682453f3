"""The diffusers schedulers generate.py offers by short name, each built from the model's own scheduler config."""

from utils.cli import UsageError

# Short names users know from the diffusers docs and web UIs -> diffusers class names. LMS is left out because
# it needs scipy, which the project does not install.
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "deis": "DEISMultistepScheduler",
}
# Settings Stable Diffusion's own scheduler configs use; from_config of another kind's config lacks them.
# PNDM's Runge-Kutta warm-up needs more steps than a short run has, so SD skips it.
OVERRIDES = {"pndm": {"skip_prk_steps": True}}


def check_scheduler(name: str) -> None:
    """Refuse a name that is not offered, listing those that are."""
    if name not in SCHEDULERS:
        raise UsageError(f"--scheduler '{name}' is not one of {', '.join(SCHEDULERS)}.")


def make_scheduler(name: str, config):
    """A scheduler of the named kind carrying the model's betas and prediction type (from_config)."""
    import diffusers

    check_scheduler(name)
    return getattr(diffusers, SCHEDULERS[name]).from_config(config, **OVERRIDES.get(name, {}))
