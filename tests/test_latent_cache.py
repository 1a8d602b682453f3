"""trainer/latent_cache/: key, caption index, chunks, resume, bounded memory, Parquet index, text cache, parity."""

import dataclasses
import io
import json
import logging

import pyarrow as pa
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from utils.image_errors import ImageRejected
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


def make_table(captions, image_seeds=None, images=None):
    """A datasets table with an Image column (bytes: images, else PNGs of image_seeds) and a caption column."""
    import datasets

    images = images or [png_bytes(s) for s in image_seeds or range(len(captions))]
    table = datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in images],
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


def changed_fingerprint(vae, parameter_name: str) -> bool:
    """Whether vae_fingerprint changes when one weight of the named parameter is nudged (then restored)."""
    before = lc.vae_fingerprint(vae)
    weight = dict(vae.named_parameters())[parameter_name]
    with torch.no_grad():
        saved = weight.clone()
        weight.view(-1)[0] += 1.0
        try:
            return lc.vae_fingerprint(vae) != before
        finally:
            weight.copy_(saved)


def test_the_vae_fingerprint_follows_the_encoder_and_config_not_the_decoder(tiny_parts):
    """The cache holds encoder outputs: a changed decoder keeps the key (and hashing it would page it in)."""
    vae = tiny_parts[0]
    names = [name for name, _ in vae.named_parameters()]
    assert changed_fingerprint(vae, next(n for n in names if n.startswith("encoder.")))
    assert changed_fingerprint(vae, next(n for n in names if n.startswith("quant_conv.")))
    assert not changed_fingerprint(vae, next(n for n in names if n.startswith("decoder.")))
    assert not changed_fingerprint(vae, next(n for n in names if n.startswith("post_quant_conv.")))
    before = lc.vae_fingerprint(vae)
    vae.register_to_config(scaling_factor=vae.config.scaling_factor * 2)
    try:
        assert lc.vae_fingerprint(vae) != before
    finally:
        vae.register_to_config(scaling_factor=vae.config.scaling_factor / 2)


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
        for row in assert_cached_serves_what_plain_serves(cached, plain, epoch, tiny_parts):
            views_seen.add(torch.equal(plain[row]["pixel_values"], plain.image_transform(table[row]["image"],
                                                                                          _NoFlip())))
    assert views_seen == {True, False}  # both the image and its mirror were drawn


def assert_cached_serves_what_plain_serves(cached, plain, epoch: int, parts) -> range:
    """At epoch, each row's cached posterior and caption states are those of the uncached item; returns the rows."""
    vae, text_encoder, _ = parts
    cached.set_epoch(epoch)
    plain.set_epoch(epoch)
    for row in range(len(plain)):
        got, want = cached[row], plain[row]
        mean, std = lc.posterior(vae, want["pixel_values"].unsqueeze(0))
        torch.testing.assert_close(got["latent_mean"], mean[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["latent_std"], std[0], rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            states = text_encoder(want["input_ids"].unsqueeze(0), return_dict=False)[0]
        torch.testing.assert_close(got["encoder_hidden_states"], states[0], rtol=1e-5, atol=1e-5)
    return range(len(plain))


def test_unreadable_images_are_marked_and_served_as_without_the_cache(tiny_parts, tmp_path):
    """A truncated JPEG and a non-image: the build goes on, records both, marks them in their chunks and the
    manifest; the opened cache records them at once and serves each row what the uncached dataset serves (the next
    readable row's item)."""
    import odd_images as odd

    from trainer.bad_rows import BadRows

    table = make_table([["a field"], ["a road"], ["a pond"], ["a river", "a bridge"]],
                       images=[png_bytes(0), odd.truncated_jpeg(), odd.junk_bytes(), png_bytes(3)])
    met = BadRows(len(table), (ImageRejected,))
    builder = dataclasses.replace(builder_for(tiny_parts, 2, chunk_rows=2), bad_rows=met)
    folder, _ = lc.prepare_cache(tmp_path, key_of(table, tiny_parts), SETTINGS, table, builder)
    assert met.flagged() == [1, 2]
    assert json.loads((folder / lc.MANIFEST_FILENAME).read_text())["unreadable_rows"] == [1, 2]
    with safe_open(str(folder / "latents-0000000-0000002.safetensors"), framework="pt") as chunk:
        assert chunk.get_tensor("unreadable").tolist() == [False, True]
    opened = BadRows(len(table), (ImageRejected,))
    cached = lc.CachedDataset(folder, seed=5, random_flip=True, bad_rows=opened)
    assert opened.flagged() == [1, 2]
    with pytest.raises(ImageRejected, match="could not be read when the latent cache"):
        cached.row(2)  # what CachedWithConditioning reads: a marked row is never served, whatever its record
    plain = data.TrainingDataset(table, tiny_parts[2], data.make_image_transform(RESOLUTION, True, True, "lanczos"),
                                 "image", "text", seed=5)
    for epoch in range(2):
        assert_cached_serves_what_plain_serves(cached, plain, epoch, tiny_parts)


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


def chunk_bytes(folder) -> dict:
    """name → bytes of every chunk file and Parquet index file in folder."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix in (".safetensors", ".parquet")}


CHUNKED_CAPTIONS = [["a field"], ["a road", "a field"], ["a pond"], ["x", "y"], ["a lake"]]  # 5 rows, 6 captions


def test_killed_build_redoes_only_the_unfinished_chunk_and_matches(tiny_parts, tmp_path, monkeypatch):
    """A build that dies in its third latent chunk keeps two chunks; the rerun builds the rest, byte for byte alike."""
    table = make_table(CHUNKED_CAPTIONS)
    key = key_of(table, tiny_parts)
    whole, _ = lc.prepare_cache(tmp_path / "whole", key, SETTINGS, table, builder_for(tiny_parts, 2, chunk_rows=2))
    real, calls = lc.chunks.posterior, []

    def dies_in_third_chunk(vae, pixels):
        """One batch per 2-row chunk: the third batch is the third chunk's."""
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return real(vae, pixels)

    monkeypatch.setattr(lc.chunks, "posterior", dies_in_third_chunk)
    with pytest.raises(RuntimeError, match="killed"):
        lc.prepare_cache(tmp_path / "killed", key, SETTINGS, table, builder_for(tiny_parts, 2, chunk_rows=2))
    folder = tmp_path / "killed" / key
    assert sorted(p.name for p in folder.iterdir()) == ["latents-0000000-0000002.safetensors",
                                                       "latents-0000002-0000004.safetensors"]
    (folder / ".latents-0000004-0000005.safetensors.123.tmp").write_bytes(b"partial")  # a save killed mid-write
    builder = builder_for(tiny_parts, 2, chunk_rows=2)
    _, built = lc.prepare_cache(tmp_path / "killed", key, SETTINGS, table, builder)
    assert built and builder.stats.chunks_built == ["latents-0000004-0000005.safetensors",
                                                    "captions-0000000-0000002.safetensors",
                                                    "captions-0000002-0000004.safetensors",
                                                    "captions-0000004-0000006.safetensors"]
    assert chunk_bytes(folder) == chunk_bytes(whole)
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in whole.iterdir())  # no .tmp left


def test_missing_or_truncated_chunks_are_rebuilt(tiny_parts, tmp_path):
    """Without a manifest, a deleted chunk and a truncated one are rebuilt; complete ones are kept untouched."""
    table = make_table(CHUNKED_CAPTIONS)
    key = key_of(table, tiny_parts)
    folder, _ = lc.prepare_cache(tmp_path, key, SETTINGS, table, builder_for(tiny_parts, 2, chunk_rows=2))
    reference, before = chunk_bytes(folder), files_and_mtimes(folder)
    (folder / lc.MANIFEST_FILENAME).unlink()
    (folder / "captions-0000004-0000006.safetensors").unlink()
    truncated = folder / "latents-0000002-0000004.safetensors"
    truncated.write_bytes(reference[truncated.name][:-1])
    assert not lc.chunk_is_complete(truncated, 2, 4) and not lc.chunk_is_complete(truncated, 2, 3)
    builder = builder_for(tiny_parts, 2, chunk_rows=2)
    lc.prepare_cache(tmp_path, key, SETTINGS, table, builder)
    assert builder.stats.chunks_built == ["latents-0000002-0000004.safetensors",
                                          "captions-0000004-0000006.safetensors"]
    assert chunk_bytes(folder) == reference
    kept = set(before) - set(builder.stats.chunks_built) - {lc.MANIFEST_FILENAME, lc.INDEX_FILENAME,
                                                            lc.CAPTIONS_FILENAME}
    assert all(files_and_mtimes(folder)[name] == before[name] for name in kept)


def test_build_holds_one_chunk_at_a_time(tiny_parts, tmp_path):
    """7 rows in chunks of 3 (batches of 2): the builder never holds more than the 3 rows of one chunk."""
    table = make_table([f"caption {i}" for i in range(7)])
    builder = builder_for(tiny_parts, 2, chunk_rows=3)
    lc.prepare_cache(tmp_path, key_of(table, tiny_parts), SETTINGS, table, builder)
    assert builder.stats.peak_rows == 3


def test_two_processes_write_the_single_process_files(tiny_parts, tmp_path):
    """Process i % 2 builds chunk i: together the two write exactly the files one process writes."""
    table = make_table(CHUNKED_CAPTIONS)
    key = key_of(table, tiny_parts)
    single, _ = lc.prepare_cache(tmp_path / "one", key, SETTINGS, table, builder_for(tiny_parts, 2, chunk_rows=2))
    folder = tmp_path / "two" / key
    folder.mkdir(parents=True)
    index = lc.index_captions(table["text"], "text")
    built = []
    for rank in (1, 0):
        builder = builder_for(tiny_parts, 2, chunk_rows=2, rank=rank, world=2)
        lc.build_chunks(builder, folder, table, "image", index, True)
        built.append(builder.stats.chunks_built)
    assert built[0] == ["latents-0000002-0000004.safetensors", "captions-0000002-0000004.safetensors"]
    lc.build.finish(folder, key, SETTINGS, len(table), index, builder)
    assert chunk_bytes(folder) == chunk_bytes(single)


def test_parquet_index_has_rows_and_distinct_captions(tiny_parts, tmp_path):
    """index.parquet: one row per table row (chunk, offset, caption ids); captions.parquet: each caption once."""
    import pyarrow.parquet as pq

    table = make_table(CHUNKED_CAPTIONS)
    folder, _ = lc.prepare_cache(tmp_path, key_of(table, tiny_parts), SETTINGS, table,
                                 builder_for(tiny_parts, 2, chunk_rows=2))
    rows = pq.read_table(folder / lc.INDEX_FILENAME).to_pydict()
    assert list(rows) == ["row", "chunk", "offset", "caption_ids", "caption_is_list"]
    assert rows["row"] == [0, 1, 2, 3, 4] and rows["chunk"] == [0, 0, 1, 1, 2] and rows["offset"] == [0, 1, 0, 1, 0]
    assert rows["caption_ids"] == [[0], [1, 0], [2], [3, 4], [5]] and all(rows["caption_is_list"])
    captions = pq.read_table(folder / lc.CAPTIONS_FILENAME).to_pydict()
    assert captions["caption"] == ["a field", "a road", "a pond", "x", "y", "a lake"]
    assert captions["chunk"] == [0, 0, 1, 1, 2, 2] and captions["caption_id"] == list(range(6))
    manifest = lc.read_manifest(folder, folder.name)
    assert "captions" not in manifest and manifest["num_captions"] == 6 and manifest["latent_chunks"] == 3


def test_bytes_on_disk_are_the_tensor_bytes(tiny_parts, tmp_path):
    """The chunk files take within 5% of the raw bytes of what they must hold: per row mean and std of both views
    and its caption id, per distinct caption its states (no pickling, padding, duplicates or wider dtypes)."""
    vae, text_encoder, tokenizer = tiny_parts
    rows = 32
    table = make_table([f"caption {i}" for i in range(rows)])
    folder, _ = lc.prepare_cache(tmp_path, key_of(table, tiny_parts), SETTINGS, table,
                                 builder_for(tiny_parts, 8, chunk_rows=16))
    side = RESOLUTION // 2 ** (len(vae.config.block_out_channels) - 1)
    latent = vae.config.latent_channels * side * side * 4  # fp32 bytes of one view's mean (or std)
    raw = rows * (2 * 2 * latent + 4 + 1) + rows * tokenizer.model_max_length * text_encoder.config.hidden_size * 4
    on_disk = sum(path.stat().st_size for path in folder.glob("*.safetensors"))
    assert raw <= on_disk <= 1.05 * raw, (on_disk, raw)


@pytest.mark.parametrize("mode,size,budget,kind", [
    ("on", 10**12, 0, lc.TEXT_STATES), ("off", 0, 10**12, lc.TEXT_TOKENS), ("auto", 5, 5, lc.TEXT_STATES),
    ("auto", 6, 5, lc.TEXT_TOKENS), ("auto", 0, 0, lc.TEXT_STATES)])
def test_text_cache_decision(mode, size, budget, kind):
    """on always caches states, off never, auto when the states' bytes are within the budget."""
    assert lc.text_kind(mode, size, budget) == kind


def test_text_states_bytes():
    """Distinct captions × context × hidden × dtype bytes: NWPU-Captions' 157,500 in CLIP-L fp16 ≈ 18.6 GB."""
    assert lc.text_states_bytes(157_500, 77, 768, torch.float16) == 157_500 * 77 * 768 * 2
    assert lc.text_states_bytes(3, 77, 32, torch.float32) == 3 * 77 * 32 * 4
    with pytest.raises(ValueError):
        lc.text_kind("maybe", 0, 0)


def test_token_ids_cache_gives_the_states_cache_losses(tiny_pipe, tiny_parts, tmp_path):
    """Same seed, same batch: the loss from cached token ids (text encoder run per step) equals the cached states'."""
    from trainer.loss import LossOptions, diffusion_loss

    table = make_table([["a field", "a road"], ["a pond"], ["x", "y", "z"], ["a lake"]])
    opened = {}
    for text in (lc.TEXT_STATES, lc.TEXT_TOKENS):
        folder, _ = lc.prepare_cache(tmp_path / text, key_of(table, tiny_parts), SETTINGS, table,
                                     builder_for(tiny_parts, 2, chunk_rows=3, text=text))
        opened[text] = lc.CachedDataset(folder, seed=3, random_flip=True)
    assert opened[lc.TEXT_TOKENS].served_models == ("vae",)
    assert opened[lc.TEXT_STATES].served_models == ("vae", "text_encoder")
    losses = {}
    for text, dataset in opened.items():
        dataset.set_epoch(1)
        batch = lc.collate_cached([dataset[i] for i in range(len(table))])
        assert ("input_ids" in batch) == (text == lc.TEXT_TOKENS)
        torch.manual_seed(11)
        with torch.no_grad():
            losses[text] = [diffusion_loss(batch, tiny_pipe.unet, tiny_pipe.vae, tiny_pipe.text_encoder,
                                           tiny_pipe.scheduler, LossOptions(), torch.float32).item()
                            for _ in range(3)]
    assert losses[lc.TEXT_TOKENS] == pytest.approx(losses[lc.TEXT_STATES], rel=1e-5, abs=1e-7)


def test_reads_work_with_one_open_chunk(tiny_parts, tmp_path, monkeypatch):
    """With room for one open handle, reading rows across chunks closes the older handle and still reads right."""
    table = make_table(CHUNKED_CAPTIONS)
    folder, _ = lc.prepare_cache(tmp_path, key_of(table, tiny_parts), SETTINGS, table,
                                 builder_for(tiny_parts, 2, chunk_rows=2))
    roomy = lc.CachedDataset(folder, seed=0, random_flip=True)
    expected = [roomy[i] for i in range(len(table))]
    monkeypatch.setattr(lc.dataset, "MAX_OPEN_CHUNKS", 1)
    tight = lc.CachedDataset(folder, seed=0, random_flip=True)
    for i in (4, 0, 3, 1, 2):
        got = tight[i]
        assert len(tight._handles) == 1
        assert all(torch.equal(got[k], expected[i][k]) for k in got)


def test_the_build_encodes_a_training_batch_at_a_time_unless_told():
    """--vae_batch_size unset: the cache build's encoder batch is --train_batch_size (no larger peak than an uncached
    step's encode); set: it wins."""
    from types import SimpleNamespace

    from trainer.latent_cache.dataset import encode_batch_size

    assert encode_batch_size(SimpleNamespace(vae_batch_size=None, train_batch_size=3)) == 3
    assert encode_batch_size(SimpleNamespace(vae_batch_size=16, train_batch_size=3)) == 16
