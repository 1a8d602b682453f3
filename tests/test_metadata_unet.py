"""trainer/metadata_unet.py: the zero-initialised projection embedding (step 0 = base, bitwise), its stock-diffusers
save/load, the all-absent default for callers without metadata, and a tiny UNet that learns from the metadata."""

from types import SimpleNamespace

import pytest
import torch

from stand_in.tiny_model import build_scheduler, build_unet
from trainer import metadata as M
from trainer import metadata_unet as MU
from trainer.loss import LossOptions, diffusion_loss
from utils.cli import UsageError


def inputs(seed: int = 0, batch: int = 2):
    """A noisy sample, timesteps and text states for the tiny UNet."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 8, 8, generator=g), torch.tensor([10, 700][:batch]), torch.randn(batch, 77, 32,
                                                                                                   generator=g)


def test_step_zero_equals_the_base_bitwise():
    """With the embedding added, any metadata gives exactly the base UNet's output; only its last layer is zero."""
    torch.manual_seed(0)
    unet = build_unet().eval()
    sample, t, text = inputs()
    with torch.no_grad():
        base = unet(sample, t, text).sample
        assert MU.add_embedding(unet, 10)
        conditioned = unet(sample, t, text, class_labels=torch.randn(2, 10) * 5).sample
    assert torch.equal(base, conditioned)
    assert unet.class_embedding.linear_1.weight.abs().sum() > 0
    assert unet.config.class_embed_type == "projection" and unet.config.projection_class_embeddings_input_dim == 10
    assert not MU.add_embedding(unet, 10)  # already there: kept


def test_parameter_order_is_that_of_a_unet_built_from_the_config():
    """EMAModel pairs shadow weights with a UNet built from the config by order: the orders must agree."""
    from diffusers import UNet2DConditionModel

    unet = build_unet()
    MU.add_embedding(unet, 6)
    rebuilt = UNet2DConditionModel.from_config(unet.config)
    assert [n for n, _ in unet.named_parameters()] == [n for n, _ in rebuilt.named_parameters()]


def test_adding_it_leaves_the_global_rng_alone():
    """The new layers are drawn off the global RNG: the noise a metadata run draws next is the base run's."""
    torch.manual_seed(3)
    unet = build_unet()
    state = torch.random.get_rng_state()
    MU.add_embedding(unet, 7)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_saved_unet_loads_in_stock_diffusers_with_the_same_output(tmp_path):
    """save_pretrained + UNet2DConditionModel.from_pretrained: same config keys, same output with metadata."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = build_unet().eval()
    MU.add_embedding(unet, 10)
    with torch.no_grad():
        unet.class_embedding.linear_2.weight.normal_()  # as if trained: the metadata now change the output
    unet.save_pretrained(tmp_path)
    loaded = UNet2DConditionModel.from_pretrained(tmp_path).eval()
    sample, t, text = inputs()
    labels = torch.randn(2, 10)
    with torch.no_grad():
        a, b = unet(sample, t, text, class_labels=labels).sample, loaded(sample, t, text, class_labels=labels).sample
        other = loaded(sample, t, text, class_labels=torch.zeros(2, 10)).sample
    assert torch.equal(a, b) and not torch.equal(a, other)


def test_calls_without_metadata_get_the_all_absent_vector():
    """The stock pipeline passes no class_labels: the hook gives zeros; explicit labels are left alone."""
    torch.manual_seed(0)
    unet = build_unet().eval()
    MU.add_embedding(unet, 4)
    with torch.no_grad():
        unet.class_embedding.linear_2.weight.normal_()
    sample, t, text = inputs()
    with pytest.raises(ValueError, match="class_labels"):
        unet(sample, t, text)
    handle = MU.absent_by_default(unet, 4)
    with torch.no_grad():
        assert torch.equal(unet(sample, t, text).sample, unet(sample, t, text, class_labels=torch.zeros(2, 4)).sample)
        assert not torch.equal(unet(sample, t, text).sample,
                               unet(sample, t, text, class_labels=torch.ones(2, 4)).sample)
    handle.remove()


def test_a_base_with_another_class_embedding_is_refused():
    """A UNet whose class embedding takes something else is a usage error naming it, not a silent overwrite."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=8,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, num_class_embeds=5)
    with pytest.raises(UsageError, match="already has a class embedding"):
        MU.add_embedding(unet, 10)


GSDS = (0.5, 1.0, 2.0, 4.0)
ROWS = 32


def synthetic_rows():
    """Rows whose latent content depends on their GSD alone: channel k lit for the k-th GSD; no caption signal."""
    meta = M.read_rows([{"gsd": GSDS[i % 4]} for i in range(ROWS)], ("gsd",))
    latents = torch.zeros(ROWS, 4, 8, 8)
    for i in range(ROWS):
        latents[i, i % 4] = 2.0
    return meta, latents


def batch_of(meta, latents, rows, epoch, vectors=None):
    """A cached-style batch of rows with their drawn metadata vectors (guidance dropout on), or given vectors."""
    dropout = M.GuidanceDropout(field=0.1, all=0.05)
    if vectors is None:
        vectors = torch.stack([M.row_conditioning(meta, dropout, 0, epoch, i)[1] for i in rows])
    return {"latent_mean": latents[rows], "latent_std": torch.zeros_like(latents[rows]),
            "encoder_hidden_states": torch.zeros(len(rows), 77, 32), "metadata": vectors}


@pytest.fixture
def one_thread():
    """One intra-op thread: the 2-core box is shared."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_a_tiny_unet_learns_to_follow_the_gsd(one_thread):
    """200 steps of diffusion_loss (v-prediction) on rows whose content only their GSD tells: the loss with the true
    metadata ends well below the all-absent floor, and shuffled (misaligned) metadata do worse still (~10 s)."""
    torch.manual_seed(0)
    meta, latents = synthetic_rows()
    unet = build_unet()
    MU.add_embedding(unet, meta.encoder.dim)
    scheduler = build_scheduler()
    scheduler.register_to_config(prediction_type="v_prediction")  # at high noise the target is the content itself
    vae = SimpleNamespace(config=SimpleNamespace(scaling_factor=1.0))
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    order = torch.Generator().manual_seed(0)
    for step in range(200):
        rows = torch.randperm(ROWS, generator=order)[:8].tolist()
        loss = diffusion_loss(batch_of(meta, latents, rows, step), unet, vae, None, scheduler, LossOptions(),
                              torch.float32)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def evaluate(vectors):
        """Mean loss over all rows, same noise and timesteps for every call."""
        torch.manual_seed(123)
        with torch.no_grad():
            return sum(diffusion_loss(batch_of(meta, latents, list(range(ROWS)), 0, vectors), unet, vae, None,
                                      scheduler, LossOptions(), torch.float32).item() for _ in range(8)) / 8

    true = torch.stack([meta.vector(i) for i in range(ROWS)])
    followed, absent, shuffled = evaluate(true), evaluate(torch.zeros_like(true)), evaluate(true.roll(1, 0))
    assert followed < 0.6 * absent < 0.6 * shuffled, (followed, absent, shuffled)
