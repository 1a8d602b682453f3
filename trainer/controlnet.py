"""ControlNet mode: a trainable ControlNet beside the frozen UNet, trained by the one loop (trainer/loop.py).

ControlledUNet has the UNet's call signature plus `controlnet_cond`, so trainer/loss.py calls it like the UNet;
its only trainable weights are the ControlNet's. Checkpoints hold checkpoint-N/controlnet/ (and controlnet_ema/
with --use_ema) as diffusers models; the final OUTPUT_DIR holds the ControlNet's config.json +
diffusion_pytorch_model.safetensors, loadable with ControlNetModel.from_pretrained, and conditioning.json.
"""

from pathlib import Path
from typing import Callable, Optional

import torch

from utils.logger import get_logger

CONTROLNET_DIRNAME = "controlnet"
EMA_CONTROLNET_DIRNAME = "controlnet_ema"
# ControlNetModel's default conditioning embedding: 3 stride-2 convolutions, for SD's VAE, which downsamples by 8.
EMBEDDING_CHANNELS = (16, 32, 96, 256)


class ControlledUNet(torch.nn.Module):
    """The frozen UNet steered by a ControlNet's residuals; called like a UNet, with `controlnet_cond` added."""

    def __init__(self, controlnet, unet):
        """controlnet: trainable ControlNetModel; unet: the frozen UNet2DConditionModel (any dtype)."""
        super().__init__()
        self.controlnet, self.unet = controlnet, unet

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, return_dict: bool = False, **kwargs):
        """UNet prediction for sample with the ControlNet's residuals of controlnet_cond added (a tuple, as the
        loss asks for)."""
        down, mid = self.controlnet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                                    controlnet_cond=controlnet_cond.to(sample.dtype), return_dict=False)
        dtype = self.unet.dtype
        return self.unet(sample, timestep, encoder_hidden_states,
                         down_block_additional_residuals=[residual.to(dtype) for residual in down],
                         mid_block_additional_residual=mid.to(dtype), return_dict=return_dict, **kwargs)

    def train(self, mode: bool = True):
        """Train mode for the ControlNet only: the frozen UNet stays in eval mode, as the reference keeps it."""
        super().train(mode)
        self.unet.eval()
        return self


def widen_conditioning(controlnet, channels: int) -> None:
    """Give controlnet's first conditioning convolution `channels` inputs: the old kernels copied to the first
    ones, the rest zero, so the widened net answers the old channels exactly as before."""
    old = controlnet.controlnet_cond_embedding.conv_in
    if old.in_channels == channels:
        return
    new = torch.nn.Conv2d(channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                          dtype=old.weight.dtype, device=old.weight.device)
    kept = min(channels, old.in_channels)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, :kept] = old.weight[:, :kept]
        new.bias.copy_(old.bias)
    controlnet.controlnet_cond_embedding.conv_in = new
    controlnet.register_to_config(conditioning_channels=channels)
    get_logger().info("ControlNet's conditioning input widened from %d to %d channels (first %d kernels kept, "
                      "the others zero)", old.in_channels, channels, kept)


def embedding_channels(vae_scale_factor: int) -> tuple:
    """Conditioning-embedding widths that bring a full-size conditioning down to the latent size: one stride-2
    convolution per halving (SD's VAE: 8, the default (16, 32, 96, 256); a tiny test VAE: 2, (16, 32))."""
    halvings = max(0, int(vae_scale_factor).bit_length() - 1)
    widths = list(EMBEDDING_CHANNELS[:halvings + 1])
    while len(widths) < halvings + 1:  # a VAE downsampling by more than 8: keep the last width
        widths.append(EMBEDDING_CHANNELS[-1])
    return tuple(widths)


def vae_scale_factor(vae) -> int:
    """How much the VAE downsamples (8 for SD)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def load_controlnet(args, unet, channels: int, scale_factor: int = 8):
    """The fp32 ControlNet to train: --controlnet_model_name_or_path (widened to channels when it has another
    count), else made from the UNet's encoder with `channels` conditioning inputs."""
    from diffusers import ControlNetModel

    if args.controlnet_model_name_or_path:
        get_logger().info("Loading the ControlNet %s", args.controlnet_model_name_or_path)
        controlnet = ControlNetModel.from_pretrained(args.controlnet_model_name_or_path, revision=args.revision,
                                                     variant=args.variant)
        widen_conditioning(controlnet, channels)
    else:
        # Resuming builds it this way too, then loads the checkpoint over it: "initialising" would mislead there.
        get_logger().info("Building the ControlNet from the UNet's encoder (%d conditioning channels)", channels)
        controlnet = ControlNetModel.from_unet(unet, conditioning_channels=channels,
                                               conditioning_embedding_out_channels=embedding_channels(scale_factor))
    controlnet.to(dtype=torch.float32)
    controlnet.train()
    return controlnet


def load_tokenizer(args, components) -> None:
    """--tokenizer_name's tokenizer in place of the base pipeline's, when given."""
    if args.tokenizer_name:
        from transformers import AutoTokenizer

        components.tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name, revision=args.revision,
                                                             use_fast=False)


def build_controlled_unet(args, components, channels: int, weight_dtype: torch.dtype, device) -> ControlledUNet:
    """Load the ControlNet (from the still fp32 UNet), then freeze the UNet in the weight dtype; both on device."""
    from trainer.models import freeze_and_cast

    controlnet = load_controlnet(args, components.unet, channels, vae_scale_factor(components.vae))
    freeze_and_cast(components.unet, weight_dtype, device)
    components.unet.eval()
    controlnet.to(device)
    return ControlledUNet(controlnet, components.unet)


def configure(model: ControlledUNet, args) -> None:
    """Memory and speed options: gradient checkpointing in both nets (the loss backpropagates through the frozen
    UNet into the ControlNet), xformers attention when asked."""
    for net in (model.controlnet, model.unet):
        if args.gradient_checkpointing:
            net.enable_gradient_checkpointing()
        if args.enable_xformers_memory_efficient_attention:
            net.enable_xformers_memory_efficient_attention()
    if args.channels_last:
        model.to(memory_format=torch.channels_last)


def build_ema(args, controlnet, device):
    """diffusers' EMAModel over the ControlNet's weights (placed like the UNet's EMA)."""
    from diffusers import ControlNetModel
    from diffusers.training_utils import EMAModel

    from trainer.models import place_ema

    ema = EMAModel(controlnet.parameters(), model_cls=ControlNetModel, model_config=controlnet.config,
                   foreach=args.foreach_ema)
    place_ema(ema, args.offload_ema, device)
    return ema


def make_state_hooks(accelerator, ema, offload_ema: bool = False):
    """accelerate save/load hooks writing the ControlNet (and its EMA) as diffusers models into checkpoint-N/."""
    from diffusers import ControlNetModel
    from diffusers.training_utils import EMAModel

    from trainer.models import bare_model, place_ema

    def save_hook(models, weights, output_dir):
        """Write controlnet/ (and controlnet_ema/); keep accelerate from saving the frozen UNet too."""
        if accelerator.is_main_process:
            if ema is not None:
                with torch.random.fork_rng(devices=[]):  # it builds a random model: keep the training RNG as it was
                    ema.save_pretrained(Path(output_dir) / EMA_CONTROLNET_DIRNAME)
            for model in models:
                bare_model(model).controlnet.save_pretrained(Path(output_dir) / CONTROLNET_DIRNAME,
                                                             safe_serialization=True)
        while weights:
            weights.pop()

    def load_hook(models, input_dir):
        """Load controlnet/ (and controlnet_ema/) back in place."""
        if ema is not None:
            loaded = EMAModel.from_pretrained(Path(input_dir) / EMA_CONTROLNET_DIRNAME, ControlNetModel)
            ema.load_state_dict(loaded.state_dict())
            place_ema(ema, offload_ema, accelerator.device)
        while models:
            model = bare_model(models.pop())
            saved = ControlNetModel.from_pretrained(Path(input_dir) / CONTROLNET_DIRNAME)
            model.controlnet.load_state_dict(saved.state_dict())

    return save_hook, load_hook


def register_state_hooks(accelerator, ema, offload_ema: bool = False) -> None:
    """Install the ControlNet checkpoint hooks on the accelerator."""
    save_hook, load_hook = make_state_hooks(accelerator, ema, offload_ema)
    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def after_steps(*hooks) -> Callable:
    """One after_step(run, step) for trainer/loop.py that calls each given hook in turn (None ones left out)."""
    chosen = [hook for hook in hooks if hook]

    def after_step(run, step: int) -> None:
        """Every hook, in order."""
        for hook in chosen:
            hook(run, step)

    return after_step


def save_final(run, output_dir: Path, document: dict, global_step: int):
    """Write the ControlNet (EMA weights with --use_ema) and conditioning.json to output_dir; return the net."""
    from trainer.export import final_unet
    from utils.atomic import write_json_atomic
    from utils.constants import CONDITIONING_FILENAME

    controlnet = final_unet(run.accelerator, run.unet, run.ema, run.trainable).controlnet
    controlnet.save_pretrained(output_dir, safe_serialization=True)
    write_json_atomic(Path(output_dir) / CONDITIONING_FILENAME, document)
    get_logger().info("Saved the ControlNet after %d optimizer steps to %s (load it with "
                      "ControlNetModel.from_pretrained)", global_step, output_dir)
    return controlnet


def finish(run, global_step: int, hub_repo_id: Optional[str], document: dict, validation=None) -> None:
    """Main process: the ControlNet and conditioning.json, the final validation, model card, loss curve, push."""
    from trainer.hub import push_final, write_controlnet_card
    from trainer.loss_log import write_loss_curve

    accelerator, args = run.accelerator, run.args
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    output_dir = Path(args.output_dir)
    controlnet = save_final(run, output_dir, document, global_step)
    grid = validation.final(controlnet, global_step) if validation is not None else None
    write_controlnet_card(output_dir, args, hub_repo_id, document, grid)
    curve = write_loss_curve(output_dir)
    if curve is not None:
        get_logger().info("Loss curve: %s", curve)
    if args.push_to_hub:
        push_final(output_dir, hub_repo_id, args)
