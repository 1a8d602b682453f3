"""trainer/lora.py: target presets, fp32 adapters on a half-precision base, trainable set, kohya keys and alphas,
run record, adapter EMA and its swap; and the LoRA flag checks of trainer/args.py."""

import json
from types import SimpleNamespace

import pytest
import torch

from trainer import lora
from trainer.args import parse_args
from trainer.models import Components, build_ema, ema_weights, trainable_parameters
from stand_in.tiny_model import build_text_encoder, build_tokenizer, build_unet
from utils.cli import UsageError


def lora_args(**overrides):
    """The LoRA flags as parse_args leaves them."""
    values = dict(lora_rank=4, lora_alpha=None, lora_dropout=0.0, lora_target_modules="attention", use_dora=False,
                  train_text_encoder_lora=False, pretrained_model_name_or_path="some/model", revision=None,
                  variant=None, prediction_type=None)
    values.update(overrides)
    return SimpleNamespace(**values)


def tiny_components() -> Components:
    """A tiny UNet and a frozen text encoder, as load_components leaves them (no VAE needed here)."""
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    return Components(tokenizer, build_text_encoder(len(tokenizer)).requires_grad_(False), None, build_unet(), None)


def adapted_names(model) -> set:
    """Module names (relative to the model) that carry a LoRA branch."""
    return {name for name, module in model.named_modules() if hasattr(module, "lora_A")}


def test_target_presets_and_lists():
    """attention = the four projections; all_linear adds the feed-forward; anything else is a list."""
    assert lora.target_modules("attention") == ["to_q", "to_k", "to_v", "to_out.0"]
    assert lora.target_modules("all_linear")[-2:] == ["ff.net.0.proj", "ff.net.2"]
    assert lora.target_modules(" to_q, to_v ,") == ["to_q", "to_v"]


def test_adapters_fp32_on_a_fp16_base_and_only_they_train():
    """Under an fp16 weight dtype the base is fp16 and frozen; every trainable parameter is a fp32 adapter."""
    components = tiny_components()
    setup = lora.apply_lora(lora_args(), components, torch.float16, "cpu")
    params = dict(components.unet.named_parameters())
    trainable = {name for name, p in params.items() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert all(params[n].dtype == torch.float32 for n in trainable)
    assert all(p.dtype == torch.float16 for n, p in params.items() if n not in trainable)
    assert [id(p) for p in setup.params] == [id(p) for p in trainable_parameters(components.unet)]
    assert isinstance(setup.params, list)  # reused by clipping after the optimizer: not a spent iterator
    assert {n.rsplit(".", 1)[-1] for n in adapted_names(components.unet)} == {"to_q", "to_k", "to_v", "0"}


def test_all_linear_adds_the_feed_forward_layers():
    """all_linear reaches ff.net.0.proj and ff.net.2 of every transformer block, and nothing outside them."""
    components = tiny_components()
    lora.apply_lora(lora_args(lora_target_modules="all_linear"), components, torch.float32, "cpu")
    names = adapted_names(components.unet)
    assert any(n.endswith("ff.net.0.proj") for n in names) and any(n.endswith("ff.net.2") for n in names)
    assert all(".transformer_blocks." in n for n in names)


def test_text_encoder_lora_and_alpha_scale():
    """--train_text_encoder_lora adapts q/k/v/out_proj; alpha 8 at rank 4 scales the update by 2."""
    components = tiny_components()
    setup = lora.apply_lora(lora_args(lora_alpha=8, train_text_encoder_lora=True), components, torch.float32, "cpu")
    te_names = adapted_names(components.text_encoder)
    assert te_names and {n.rsplit(".", 1)[-1] for n in te_names} == {"q_proj", "k_proj", "v_proj", "out_proj"}
    assert len(setup.params) == len(trainable_parameters(components.unet, components.text_encoder))
    module = components.unet.get_submodule(sorted(adapted_names(components.unet))[0])
    assert module.scaling["default"] == 2.0


def test_unknown_target_is_a_usage_error():
    """A target list that matches nothing is one line naming the value."""
    with pytest.raises(UsageError, match="'to_nothing'"):
        lora.apply_lora(lora_args(lora_target_modules="to_nothing"), tiny_components(), torch.float32, "cpu")


def peft_deltas(components, scale: float) -> dict:
    """Each adapted Linear's weight delta scale * B @ A, by module name."""
    deltas = {}
    for prefix, model in (("unet", components.unet), ("text_encoder", components.text_encoder)):
        for name, module in model.named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                deltas[f"{prefix}.{name}"] = scale * module.lora_B["default"].weight @ module.lora_A["default"].weight
    return deltas


def test_kohya_keys_and_alphas_decode_to_the_same_deltas():
    """Kohya file: lora_unet_/lora_te_text_model_ + module path with '_' for '.', alpha/rank * up @ down == peft's
    delta."""
    components = tiny_components()
    setup = lora.apply_lora(lora_args(lora_alpha=6, train_text_encoder_lora=True), components, torch.float32, "cpu")
    for p in setup.params:  # lora_B starts at zero: give every delta a value
        torch.nn.init.normal_(p)
    state = lora.kohya_state_dict(lora.adapter_state(components.unet), lora.adapter_state(components.text_encoder),
                                  6.0)
    expected = peft_deltas(components, 6.0 / 4)
    assert len(expected) * 3 == len(state)
    for name, delta in expected.items():
        model, _, path = name.partition(".")
        key = ("lora_unet_" if model == "unet" else "lora_te_text_model_") + path.replace(".", "_")
        up, down, alpha = state[f"{key}.lora_up.weight"], state[f"{key}.lora_down.weight"], state[f"{key}.alpha"]
        assert float(alpha) == 6.0
        torch.testing.assert_close(float(alpha) / down.shape[0] * up @ down, delta)


def lora_deltas(model) -> dict:
    """scaling * B @ A of every adapted Linear of model, whatever its adapter's name, by module name."""
    deltas = {}
    for name, module in model.named_modules():
        for adapter in getattr(module, "lora_A", {}):
            deltas[name] = module.scaling[adapter] * module.lora_B[adapter].weight @ module.lora_A[adapter].weight
    return deltas


def test_kohya_names_are_the_ones_a1111_and_comfyui_look_for(tmp_path, tiny_model_dir):
    """A1111/ComfyUI name text-encoder modules after the original CLIP layout (text_model.encoder...), which
    transformers 5's CLIPTextModel no longer has: the file still carries those names, and diffusers' kohya loader
    puts the same deltas back into both models, as its loader of our diffusers-format file does."""
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    components = Components(pipeline.tokenizer, pipeline.text_encoder.requires_grad_(False), None, pipeline.unet,
                            None)
    setup = lora.apply_lora(lora_args(lora_alpha=6, train_text_encoder_lora=True), components, torch.float32, "cpu")
    torch.manual_seed(0)
    for p in setup.params:
        torch.nn.init.normal_(p, std=0.3)
    path = lora.save_kohya_file(tmp_path / lora.KOHYA_WEIGHTS_FILENAME, components.unet, components.text_encoder,
                                setup, 6.0)
    from safetensors.torch import load_file

    keys = set(load_file(str(path)))
    for key in ("lora_te_text_model_encoder_layers_0_self_attn_k_proj.lora_down.weight",
                "lora_te_text_model_encoder_layers_1_self_attn_out_proj.lora_up.weight",
                "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha",
                "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight",
                "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0.alpha"):
        assert key in keys
    assert all(k.startswith(("lora_unet_", "lora_te_text_model_encoder_layers_")) for k in keys)
    # The diffusers-format file keeps transformers 5's paths (text_encoder.encoder.layers...): diffusers loads it.
    lora.save_diffusers_file(tmp_path, components.unet, components.text_encoder, setup)
    for weight_name in (path.name, lora.LORA_WEIGHTS_FILENAME):
        loaded = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
        loaded.load_lora_weights(str(tmp_path), weight_name=weight_name)
        for trained, model in ((components.text_encoder, loaded.text_encoder), (components.unet, loaded.unet)):
            want, got = lora_deltas(trained), lora_deltas(model)
            assert sorted(got) == sorted(want), weight_name
            for name, delta in want.items():
                torch.testing.assert_close(got[name], delta, rtol=1e-4, atol=1e-5)


def test_run_record_resolves_a_local_base(tmp_path, monkeypatch):
    """lora_run.json names a local base by absolute path (so a run works from any folder), a Hub id as is."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base").mkdir()
    path = lora.write_run_record(tmp_path / "out", lora_args(pretrained_model_name_or_path="base", lora_alpha=2))
    record = json.loads(path.read_text())
    assert record["base_model"] == str(tmp_path / "base") and record["alpha"] == 2.0 and record["rank"] == 4
    assert lora.read_run_record(tmp_path / "out") == record
    assert lora.run_record(lora_args())["base_model"] == "some/model"


def test_ema_weights_swap_and_restore():
    """Inside ema_weights the parameters hold the EMA values; after it, the training values again."""
    from diffusers.training_utils import EMAModel

    param = torch.nn.Parameter(torch.zeros(3))
    ema = EMAModel([param])
    with torch.no_grad():
        param.add_(1.0)
    with ema_weights(ema, [param]):
        assert torch.equal(param.data, torch.zeros(3))
    assert torch.equal(param.data, torch.ones(3))



def test_lora_ema_averages_the_adapters_only():
    """With a LoRA setup, build_ema shadows exactly the adapter parameters (not the UNet), with no model class."""
    unet = build_unet()
    param = torch.nn.Parameter(torch.full((3,), 2.0))
    args = SimpleNamespace(foreach_ema=False, offload_ema=False, non_ema_revision=None)
    ema = build_ema(args, unet, "cpu", lora.LoraSetup(None, None, [param]))
    assert len(ema.shadow_params) == 1 and torch.equal(ema.shadow_params[0], param.data) and ema.model_cls is None

BASE = ["--pretrained_model_name_or_path", "m", "--train_data_dir", "d"]


@pytest.mark.parametrize("flags, message", [
    (["--lora_alpha", "8"], "--lora_alpha needs --lora_rank"),
    (["--use_dora"], "--use_dora needs --lora_rank"),
    (["--lora_rank", "0"], "--lora_rank must be at least 1"),
    (["--lora_rank", "4", "--lora_dropout", "1.5"], "--lora_dropout must be in"),
    (["--lora_rank", "4", "--lora_alpha", "0"], "--lora_alpha must be positive"),
    (["--lora_rank", "4", "--train_text_encoder_lora", "--cache_latents", "--center_crop"],
     "--train_text_encoder_lora cannot use --cache_latents"),
])
def test_lora_flag_mistakes_are_one_line(flags, message, capsys):
    """Each LoRA flag mistake: exit 2, one line naming the flag."""
    with pytest.raises(SystemExit) as exit_info:
        parse_args(BASE + flags)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_gradients_reach_every_adapter_under_gradient_checkpointing():
    """With the base frozen and --gradient_checkpointing, every lora_B still gets a non-zero gradient."""
    components = tiny_components()
    setup = lora.apply_lora(lora_args(), components, torch.float32, "cpu")
    components.unet.enable_gradient_checkpointing()
    components.unet.train()
    torch.manual_seed(0)
    latents, states = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
    components.unet(latents, torch.tensor([10]), states).sample.square().mean().backward()
    b_grads = [p.grad for n, p in components.unet.named_parameters() if ".lora_B." in n]
    assert len(b_grads) == len(setup.params) // 2
    assert all(g is not None and g.abs().sum() > 0 for g in b_grads)


def test_saved_file_loads_without_dropout(tmp_path, tiny_model_dir):
    """Trained with dropout, the file's config says 0, so diffusers' loader draws the same image twice."""
    from diffusers import StableDiffusionPipeline

    args = lora_args(lora_dropout=0.5, pretrained_model_name_or_path=str(tiny_model_dir))
    components = tiny_components()
    setup = lora.apply_lora(args, components, torch.float32, "cpu")
    assert lora.config_metadata(setup.unet_config)["lora_dropout"] == 0.0
    for p in setup.params:
        torch.nn.init.normal_(p, std=0.3)
    lora.save_diffusers_file(tmp_path, components.unet, None, setup)
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.load_lora_weights(tmp_path)

    def draw():
        """One seeded 16 px image."""
        return pipeline("a field", num_inference_steps=2, height=16, width=16, output_type="np",
                        generator=torch.Generator("cpu").manual_seed(0)).images[0]

    assert (draw() == draw()).all()


def metadata_lora(targets: str = "attention", weight_dtype=torch.float16):
    """Tiny components whose UNet carries a zero-initialised metadata embedding (gsd alone), then LoRA on it;
    returns them, the encoder, the LoraSetup and a copy of the UNet as it was before both."""
    import copy

    from trainer.metadata import MetadataEncoder
    from trainer.metadata_unet import add_embedding

    components, encoder = tiny_components(), MetadataEncoder(("gsd",))
    base = copy.deepcopy(components.unet)
    add_embedding(components.unet, encoder.dim)
    setup = lora.apply_lora(lora_args(lora_target_modules=targets), components, weight_dtype, "cpu", encoder)
    return components, encoder, setup, base


def test_metadata_embedding_trains_in_full_beside_the_adapters_and_step_zero_is_the_base():
    """With --metadata_fields the embedding's weights train in fp32 with the adapters (none on it, even when a
    target name matches its layers), and before training the UNet computes exactly what the base does."""
    components, encoder, setup, base = metadata_lora("to_q,linear_1", torch.float32)
    embedding = {id(p) for p in components.unet.class_embedding.parameters()}
    assert embedding <= {id(p) for p in setup.params} and setup.metadata == encoder
    assert all(p.requires_grad and p.dtype == torch.float32 for p in components.unet.class_embedding.parameters())
    assert not [n for n in adapted_names(components.unet) if n.startswith("class_embedding")]
    assert "time_embedding.linear_1" in adapted_names(components.unet)  # the target did match elsewhere
    sample, text = torch.randn(2, 4, 8, 8), torch.randn(2, 77, base.config.cross_attention_dim)
    labels = torch.randn(2, encoder.dim)
    with torch.no_grad():
        assert torch.equal(components.unet(sample, 10, text, class_labels=labels).sample, base(sample, 10, text).sample)
    half = metadata_lora()[0].unet.class_embedding
    assert all(p.dtype == torch.float32 and p.requires_grad for p in half.parameters())  # on a fp16 base


def test_embedding_saved_beside_the_lora_file_and_loaded_back(tmp_path):
    """The LoRA file holds adapters only; metadata_embedding.safetensors (class_embedding.* keys) and
    metadata_spec.json lie beside it, and load_adapters puts the embedding back (resume)."""
    from safetensors.torch import load_file

    from trainer.metadata import read_spec
    from trainer.metadata_unet import EMBEDDING_FILENAME

    components, encoder, setup, _ = metadata_lora()
    for p in setup.params:
        torch.nn.init.normal_(p, std=0.3)
    lora.save_diffusers_file(tmp_path, components.unet, None, setup)
    assert not [k for k in load_file(str(tmp_path / lora.LORA_WEIGHTS_FILENAME)) if "class_embedding" in k]
    saved = load_file(str(tmp_path / EMBEDDING_FILENAME))
    assert set(saved) == {f"class_embedding.{k}" for k in components.unet.class_embedding.state_dict()}
    assert read_spec(tmp_path) == encoder
    fresh, _, fresh_setup, _ = metadata_lora()
    lora.load_adapters(tmp_path, fresh.unet, None, fresh_setup)
    for mine, theirs in zip(setup.params, fresh_setup.params):
        assert torch.equal(mine, theirs)
    (tmp_path / EMBEDDING_FILENAME).unlink()
    with pytest.raises(UsageError, match=EMBEDDING_FILENAME):
        lora.load_adapters(tmp_path, fresh.unet, None, fresh_setup)
