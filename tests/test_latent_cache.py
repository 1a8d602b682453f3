"""trainer/latent_cache/: key, caption index, chunks, resume, bounded memory, Parquet index, text cache, parity."""

import dataclasses
import io
import logging

import pyarrow as pa
import pytest
import torch
from PIL import Image

from trainer import data
from trainer import latent_cache as lc
from utils.cli import UsageError

RESOLUTION = 16
SETTINGS = lc.CacheSettings("some/model", None, None, RESOLUTION, True, True, "lanczos", "image", "text",
                            "torch.float32")


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: the 2-core box is shared with other tests."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def png_bytes(seed: int, size=(20, 16)) -> bytes:
    """A small random RGB PNG (not square, so the centre crop matters)."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def make_table(captions, image_seeds=None):
    """A datasets table with an Image column (bytes) and a caption column."""
    import datasets

    seeds = image_seeds or list(range(len(captions)))
    table = datasets.Dataset.from_dict({"image": [{"bytes": png_bytes(s), "path": None} for s in seeds],
                                        "text": captions})
    return table.cast_column("image", datasets.Image())


@pytest.fixture(scope="module")
def tiny_pipe():
    """The tiny pipeline, built in memory (fp32, frozen parts in eval mode)."""
    from stand_in.tiny_model import build_tiny_pipeline

    pipe = build_tiny_pipeline(0)
    pipe.vae.eval()
    pipe.text_encoder.eval()
    return pipe


@pytest.fixture(scope="module")
def tiny_parts(tiny_pipe):
    """The tiny pipeline's VAE, text encoder and tokenizer."""
    return tiny_pipe.vae, tiny_pipe.text_encoder, tiny_pipe.tokenizer


def builder_for(parts, batch_size=2, chunk_rows=lc.build.DEFAULT_CACHE_CHUNK_ROWS, text=lc.TEXT_STATES,
                rank=0, world=1) -> lc.Builder:
    """A builder (one process unless rank/world say otherwise) with the centre-crop transform at RESOLUTION."""
    vae, text_encoder, tokenizer = parts
    return lc.Builder(vae, text_encoder, tokenizer, data.make_image_transform(RESOLUTION, True, False, "lanczos"),
                      batch_size, 0, rank, world, chunk_rows=chunk_rows, text=text)


def test_sample_posterior_draws_like_diffusers():
    """Same seed, same draw as DiagonalGaussianDistribution.sample(), bit for bit."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    parameters = torch.randn(3, 8, 4, 4)
    dist = DiagonalGaussianDistribution(parameters)
    torch.manual_seed(7)
    expected = dist.sample()
    after_expected = torch.rand(1)
    torch.manual_seed(7)
    got = lc.sample_posterior(dist.mean, dist.std)
    assert torch.equal(got, expected)
    assert torch.equal(torch.rand(1), after_expected)  # the RNG is left where diffusers leaves it


def test_index_captions_dedupes_and_keeps_list_positions():
    """Distinct captions once each; a list keeps its order and length (so rng.choice picks the same position)."""
    index = lc.index_captions(["a", ["b", "a", "b"], "c", "a"], "text")
    assert index.captions.to_pylist() == ["a", "b", "c"]
    assert [index.row(i) for i in range(len(index))] == [0, [1, 0, 1], 2, 0]
    arrow = lc.index_captions(pa.chunked_array([pa.array([["b", "a"], ["a"]]), pa.array([["c", "b"]])]), "text")
    assert arrow.captions.to_pylist() == ["b", "a", "c"]
    assert [arrow.row(i) for i in range(3)] == [[0, 1], [1], [2, 0]]


@pytest.mark.parametrize("cells", [["ok", []], ["ok", 3], ["ok", None], pa.array([["ok"], []]), pa.array(["a", None]),
                                   pa.array([1, 2]), pa.array([["a"], None])])
def test_index_captions_rejects_what_training_rejects(cells):
    """An empty list or a non-string caption: the training dataset's usage error."""
    with pytest.raises(UsageError, match="strings or lists of strings"):
        lc.index_captions(cells, "text")


@pytest.mark.parametrize("total,chunk_rows,world", [(0, 2, 2), (1, 2, 2), (7, 3, 3), (8, 2, 2), (10, 3, 4)])
def test_chunks_cover_every_item_once(total, chunk_rows, world):
    """The chunks tile [0, total) in chunk_rows pieces; the processes' static shares (i % world) tile the chunks."""
    ranges = lc.chunk_ranges(total, chunk_rows)
    assert [i for start, end in ranges for i in range(start, end)] == list(range(total))
    assert all(0 < end - start <= chunk_rows for start, end in ranges)
    shares = [lc.assigned(ranges, rank, world) for rank in range(world)]
    assert sorted(r for share in shares for r in share) == ranges
    assert all(ranges.index(r) % world == rank for rank, share in enumerate(shares) for r in share)


def test_key_changes_with_every_input():
    """Each setting, either model fingerprint and the data fingerprint change the key; nothing else does."""
    base = lc.cache_key(SETTINGS, "vae", "text", "data")
    assert lc.cache_key(dataclasses.replace(SETTINGS), "vae", "text", "data") == base
    changed = {lc.cache_key(SETTINGS, "vae2", "text", "data"), lc.cache_key(SETTINGS, "vae", "text2", "data"),
               lc.cache_key(SETTINGS, "vae", "text", "data2")}
    for field, value in (("model", "other/model"), ("revision", "v2"), ("variant", "fp16"), ("resolution", 32),
                         ("random_flip", False), ("interpolation", "bilinear"), ("caption_column", "captions"),
                         ("image_column", "img"), ("dtype", "torch.float16")):
        changed.add(lc.cache_key(dataclasses.replace(SETTINGS, **{field: value}), "vae", "text", "data"))
    assert base not in changed and len(changed) == 12


def test_fingerprints_follow_content_not_objects(tiny_parts):
    """Equal content gives equal fingerprints; one changed image, caption or weight changes them."""
    table = make_table(["a", "b", "c"])
    same = lc.data_fingerprint(make_table(["a", "b", "c"]), "image", "text")
    assert lc.data_fingerprint(table, "image", "text") == same
    assert lc.data_fingerprint(make_table(["a", "b", "C"]), "image", "text") != same
    assert lc.data_fingerprint(make_table(["a", "b", "c"], [0, 1, 5]), "image", "text") != same
    vae = tiny_parts[0]
    before = lc.module_fingerprint(vae)
    with torch.no_grad():
        weight = next(vae.parameters())
        saved = weight.clone()
        weight[0].add_(1.0)
        try:
            assert lc.module_fingerprint(vae) != before
        finally:
            weight.copy_(saved)
    assert lc.module_fingerprint(vae) == before


def key_of(table, parts) -> str:
    """The cache key of table under SETTINGS with the tiny models."""
    return lc.cache_key(SETTINGS, lc.module_fingerprint(parts[0]), lc.module_fingerprint(parts[1]),
                        lc.data_fingerprint(table, "image", "text"))


def files_and_mtimes(folder) -> dict:
    """name → mtime_ns of every file in folder."""
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_build_then_reuse_then_rebuild_on_change(tiny_parts, tmp_path, caplog):
    """First call builds (atomically: no temp files), the same data reuses untouched, a changed caption rebuilds."""
    caplog.set_level(logging.INFO, logger="rsdiff")
    table = make_table([["a field"], ["a road", "a field"], ["a pond"]])
    folder, built = lc.prepare_cache(tmp_path, key_of(table, tiny_parts), SETTINGS, table, builder_for(tiny_parts))
    assert built and "Building the latent cache" in caplog.text
    assert sorted(files_and_mtimes(folder)) == ["captions-0000000-0000003.safetensors", lc.CAPTIONS_FILENAME,
                                                lc.INDEX_FILENAME, "latents-0000000-0000003.safetensors",
                                                lc.MANIFEST_FILENAME]
    before = files_and_mtimes(folder)
    caplog.clear()
    again, built = lc.prepare_cache(tmp_path, key_of(make_table([["a field"], ["a road", "a field"], ["a pond"]]),
                                                     tiny_parts), SETTINGS, table, builder_for(tiny_parts))
    assert (again, built) == (folder, False) and "Reusing the latent cache" in caplog.text
    assert files_and_mtimes(folder) == before
    changed = make_table([["a field"], ["a road", "a field"], ["a lake"]])
    other, built = lc.prepare_cache(tmp_path, key_of(changed, tiny_parts), SETTINGS, changed, builder_for(tiny_parts))
    assert built and other != folder and (other / lc.MANIFEST_FILENAME).is_file()


def test_manifest_of_another_key_is_not_a_cache(tmp_path):
    """A folder whose manifest names another key (or none) is not reused."""
    lc.write_json_atomic(tmp_path / lc.MANIFEST_FILENAME, {"key": "abc", "version": lc.CACHE_VERSION})
    assert lc.read_manifest(tmp_path, "abc") is not None
    assert lc.read_manifest(tmp_path, "abd") is None
    assert lc.read_manifest(tmp_path / "missing", "abc") is None
    assert [p.name for p in tmp_path.iterdir()] == [lc.MANIFEST_FILENAME]


def test_cached_rows_equal_what_training_would_encode(tiny_parts, tmp_path):
    """Per (epoch, row): the cached posterior and caption states are those of the uncached sample (flip, caption)."""
    vae, text_encoder, tokenizer = tiny_parts
    captions = [["a field"], ["a road", "a field", "a harbour"], ["x", "y"], ["a pond", "a field"]]
    table = make_table(captions)
    # Chunks of 3 rows and captions: rows and caption states are read across chunk files.
    folder, _ = lc.prepare_cache(tmp_path, key_of(table, tiny_parts), SETTINGS, table,
                                 builder_for(tiny_parts, 2, chunk_rows=3))
    assert (folder / "latents-0000003-0000004.safetensors").is_file()
    cached = lc.CachedDataset(folder, seed=5, random_flip=True)
    plain = data.TrainingDataset(table, tokenizer, data.make_image_transform(RESOLUTION, True, True, "lanczos"),
                                 "image", "text", seed=5)
    views_seen = set()
    for epoch in range(3):
        cached.set_epoch(epoch)
        plain.set_epoch(epoch)
        for row in range(len(table)):
            got, want = cached[row], plain[row]
            mean, std = lc.posterior(vae, want["pixel_values"].unsqueeze(0))
            torch.testing.assert_close(got["latent_mean"], mean[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got["latent_std"], std[0], rtol=1e-5, atol=1e-5)
            with torch.no_grad():
                states = text_encoder(want["input_ids"].unsqueeze(0), return_dict=False)[0]
            torch.testing.assert_close(got["encoder_hidden_states"], states[0], rtol=1e-5, atol=1e-5)
            views_seen.add(torch.equal(want["pixel_values"], plain.image_transform(table[row]["image"],
                                                                                   _NoFlip())))
    assert views_seen == {True, False}  # both the image and its mirror were drawn


class _NoFlip:
    """An RNG stand-in whose draws never flip (random() is always 0.99 ≥ 0.5)."""

    def random(self) -> float:
        """Never below 0.5."""
        return 0.99


def test_collate_stacks_every_field():
    """A cached batch stacks each field along a new batch dimension."""
    rows = [{"latent_mean": torch.zeros(4, 2, 2), "latent_std": torch.ones(4, 2, 2),
             "encoder_hidden_states": torch.full((77, 8), float(i))} for i in range(3)]
    batch = lc.collate_cached(rows)
    assert batch["latent_mean"].shape == (3, 4, 2, 2) and batch["encoder_hidden_states"][2, 0, 0] == 2.0


def test_default_root_is_under_output_dir_and_skipped_by_the_hub_push(tmp_path):
    """OUTPUT_DIR/.cache/latents unless --latents_cache_dir is set; the push's .cache/* pattern covers it."""
    import fnmatch

    from trainer.hub import BASE_IGNORE_PATTERNS

    root = lc.cache_root(None, str(tmp_path))
    assert root == tmp_path / ".cache" / "latents"
    assert lc.cache_root("elsewhere", str(tmp_path)).as_posix() == "elsewhere"
    relative = f"{root.relative_to(tmp_path).as_posix()}/abc/latents-0000000-0000003.safetensors"
    assert any(fnmatch.fnmatch(relative, pattern) for pattern in BASE_IGNORE_PATTERNS)
