"""trainer/controlnet.py in-process: the ControlNet-steered UNet the one loop trains, the widened first convolution
of an RGB ControlNet given N channels, the conditioning embedding's depth, and the checkpoint hooks."""

from types import SimpleNamespace

import pytest
import torch
from diffusers import ControlNetModel

from stand_in.tiny_model import build_unet
from trainer import controlnet


@pytest.fixture(scope="module")
def unet():
    """The tiny UNet (cross-attention 32, 8x8 latents), frozen."""
    torch.manual_seed(0)
    return build_unet().requires_grad_(False).eval()


def rgb_controlnet(unet, seed: int = 1):
    """An RGB ControlNet for the tiny UNet with random output convolutions (so it steers), as a user would load."""
    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16,))
    with torch.no_grad():
        for block in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
            block.weight.normal_(0, 0.05)
    return net


def inputs(channels: int, seed: int = 2) -> tuple:
    """(sample, timesteps, text states, conditioning) for a batch of 2 at 8x8 latents (conditioning at 8x8 too)."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([10, 500]),
            torch.randn(2, 77, 32, generator=generator), torch.rand(2, channels, 8, 8, generator=generator))


def test_embedding_depth_follows_the_vae():
    """One stride-2 convolution per halving of the VAE: SD's 8 gives diffusers' default."""
    assert controlnet.embedding_channels(8) == (16, 32, 96, 256)
    assert controlnet.embedding_channels(2) == (16, 32)
    assert controlnet.embedding_channels(1) == (16,)
    assert controlnet.embedding_channels(16) == (16, 32, 96, 256, 256)


def test_controlled_unet_is_the_unet_plus_the_controlnet_residuals(unet):
    """Its output is the UNet given the ControlNet's residuals; a fresh from_unet ControlNet changes nothing (zero
    convolutions) and only its weights train."""
    net = rgb_controlnet(unet)
    model = controlnet.ControlledUNet(net, unet)
    sample, t, states, cond = inputs(3)
    with torch.no_grad():
        down, mid = net(sample, t, encoder_hidden_states=states, controlnet_cond=cond, return_dict=False)
        expected = unet(sample, t, states, down_block_additional_residuals=down,
                        mid_block_additional_residual=mid).sample
        got = model(sample, t, states, controlnet_cond=cond)[0]
        plain = unet(sample, t, states).sample
    assert torch.allclose(got, expected) and not torch.allclose(got, plain, atol=1e-4)
    fresh = controlnet.ControlledUNet(ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16,)),
                                      unet)
    with torch.no_grad():
        assert torch.allclose(fresh(sample, t, states, controlnet_cond=cond)[0], plain, atol=1e-6)
    from trainer.models import trainable_parameters

    assert {id(p) for p in trainable_parameters(model)} == {id(p) for p in net.parameters()}
    model.train()
    assert net.training and not unet.training


def test_widening_an_rgb_controlnet_to_four_bands_keeps_its_answer(unet):
    """N=4 from an RGB ControlNet: 4 input channels, the RGB kernels copied, the 4th zero, so the widened net
    answers any 4-band input exactly as the RGB net answers its first three bands."""
    rgb = rgb_controlnet(unet)
    old_weight = rgb.controlnet_cond_embedding.conv_in.weight.detach().clone()
    wide = rgb_controlnet(unet)
    controlnet.widen_conditioning(wide, 4)
    conv = wide.controlnet_cond_embedding.conv_in
    assert conv.in_channels == 4 and wide.config.conditioning_channels == 4
    assert torch.equal(conv.weight[:, :3], old_weight) and torch.count_nonzero(conv.weight[:, 3]) == 0
    sample, t, states, cond = inputs(4)
    with torch.no_grad():
        a = rgb(sample, t, encoder_hidden_states=states, controlnet_cond=cond[:, :3], return_dict=False)
        b = wide(sample, t, encoder_hidden_states=states, controlnet_cond=cond, return_dict=False)
    assert all(torch.allclose(x, y) for x, y in zip([*a[0], a[1]], [*b[0], b[1]]))


def test_load_controlnet_from_unet_or_folder(unet, tmp_path):
    """Without --controlnet_model_name_or_path: from_unet with N channels; with one: loaded and widened, fp32."""
    args = SimpleNamespace(controlnet_model_name_or_path=None, revision=None, variant=None)
    made = controlnet.load_controlnet(args, unet, 5, scale_factor=1)
    assert made.controlnet_cond_embedding.conv_in.in_channels == 5 and made.config.conditioning_channels == 5
    rgb_controlnet(unet).save_pretrained(tmp_path / "rgb")
    args.controlnet_model_name_or_path = str(tmp_path / "rgb")
    loaded = controlnet.load_controlnet(args, unet, 4)
    assert loaded.config.conditioning_channels == 4 and loaded.dtype == torch.float32 and loaded.training
    loaded.save_pretrained(tmp_path / "wide")
    assert ControlNetModel.from_pretrained(tmp_path / "wide").controlnet_cond_embedding.conv_in.in_channels == 4


def test_checkpoint_hooks_write_and_read_the_controlnet_folder(unet, tmp_path):
    """save_hook writes controlnet/ (and keeps accelerate from saving the weights); load_hook puts them back."""
    accelerator = SimpleNamespace(is_main_process=True, device=torch.device("cpu"))
    save, load = controlnet.make_state_hooks(accelerator, None)
    trained = controlnet.ControlledUNet(rgb_controlnet(unet, seed=3), unet)
    weights = [trained.state_dict()]
    save([trained], weights, str(tmp_path))
    assert weights == [] and (tmp_path / "controlnet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not (tmp_path / "unet").exists()
    other = controlnet.ControlledUNet(rgb_controlnet(unet, seed=4), unet)
    models = [other]
    load(models, str(tmp_path))
    assert models == []
    for a, b in zip(other.controlnet.parameters(), trained.controlnet.parameters()):
        assert torch.equal(a, b)
