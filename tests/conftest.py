"""Shared fixtures: the repository root, a subprocess runner for the entry scripts, a sample RSICD Parquet."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import warm  # noqa: E402
from diffusion_model.sample_data import make_sample_parquet  # noqa: E402

SAMPLE_ROWS = 24


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root (holds diffusion_model/, utils/, tests/)."""
    return REPO_ROOT


def run_script_at(script: str, args, cwd=None, timeout: float = 120, cold=False) -> subprocess.CompletedProcess:
    """Run repo script (path relative to the repo root) with this interpreter, from the warm zygote unless cold
    (tests/warm.py); capture text output."""
    command = [sys.executable, str(REPO_ROOT / script), *[str(a) for a in args]]
    return warm.run(command, cwd=cwd or REPO_ROOT, timeout=timeout, cold=cold)


@pytest.fixture(scope="session")
def run_script():
    """A helper run_script(script, args, cwd=None) -> CompletedProcess, for end-to-end tests."""
    return run_script_at


@pytest.fixture(scope="session")
def sample_parquet(tmp_path_factory) -> Path:
    """A small RSICD-schema Parquet from sample_data.py, shared by the whole session."""
    path = tmp_path_factory.mktemp("sample") / "rsicd_sample.parquet"
    return make_sample_parquet(path, SAMPLE_ROWS, seed=0, row_group_size=8)


# --- Trainer fixtures (helper "trainer"): a tiny SD pipeline and 64 px training data from the project's tools.

TRAIN_ROWS = 8
TRAIN_RESOLUTION = 64


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Stable Diffusion pipeline saved once per session (stand_in.tiny_model)."""
    from stand_in.tiny_model import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny_model") / "pipeline")


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    """DATA_DIR as users build it: sample Parquet → create.py (64 px) → format.py → metadata.jsonl."""
    root = tmp_path_factory.mktemp("tiny_data")
    parquet = make_sample_parquet(root / "rsicd.parquet", TRAIN_ROWS, seed=0)
    data_dir = root / "data"
    for script, args in (
        ("diffusion_model/create.py", ["--parquet_path", parquet, "--output_dir", data_dir,
                                       "--resolution", TRAIN_RESOLUTION]),
        ("diffusion_model/format.py", ["--caption_file", data_dir / "captions.txt",
                                       "--output_file", data_dir / "metadata.jsonl"]),
    ):
        done = run_script_at(script, args)
        assert done.returncode == 0, f"{script} failed:\n{done.stderr}"
    return data_dir


@pytest.fixture(scope="session")
def two_process_run(tiny_model_dir, tiny_data_dir, tmp_path_factory):
    """(output dir, CompletedProcess) of one torchrun --nproc_per_node 2 training run on the CPU, made once for
    test_train_e2e.py and for test_multinode.py's two-node run, which must give the same weights."""
    from test_train_e2e import run_two_processes_with_torchrun

    output = tmp_path_factory.mktemp("two_processes") / "out"
    return output, run_two_processes_with_torchrun(tiny_model_dir, tiny_data_dir, output)


# --- Evaluation fixtures (helper "evaluate"): random stand-ins for the Inception and CLIP models, made once.


@pytest.fixture(scope="session")
def stand_in_models(tmp_path_factory) -> dict:
    """inception_random.pth and clip_tiny/ from `python -m evaluation.stand_ins DIR`'s main, run in-process
    (a subprocess would spend seconds importing torch, transformers and torchmetrics again)."""
    from evaluation.stand_ins import main

    out = tmp_path_factory.mktemp("stand_ins")
    assert main([str(out)]) == 0
    return {"inception_weights": out / "inception_random.pth", "clip_model": out / "clip_tiny"}


# --- Wrapped-model fixture (helper "h9a"): what accelerate.prepare gives with several processes and dynamo on.


@pytest.fixture()
def compiled_ddp_unet(monkeypatch):
    """(compiled, ddp, unet): a tiny UNet inside DDP inside torch.compile, in a one-process gloo group on the CPU."""
    import socket

    import torch
    import torch.distributed as dist

    from stand_in.tiny_model import build_unet

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        unet = build_unet()
        ddp = torch.nn.parallel.DistributedDataParallel(unet)
        yield torch.compile(ddp), ddp, unet  # compiles lazily, at the first call: never here
    finally:
        dist.destroy_process_group()


# --- LoRA fixtures (helper "h10lora"): a LoRA run folder made without training, on the tiny model.


@pytest.fixture(scope="session")
def lora_run_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A LoRA run's OUTPUT_DIR (rank 4, alpha 8, random non-zero adapters) as trainer.lora writes it, with a
    checkpoint-2 holding training and EMA adapters; base recorded in lora_run.json."""
    from types import SimpleNamespace

    import torch

    from trainer import lora
    from trainer.models import load_components

    args = SimpleNamespace(pretrained_model_name_or_path=str(tiny_model_dir), revision=None, variant=None,
                           non_ema_revision=None, prediction_type=None, lora_rank=4, lora_alpha=8.0,
                           lora_dropout=0.0, lora_target_modules="attention", use_dora=False,
                           train_text_encoder_lora=False)
    components = load_components(args, torch.float32, "cpu")
    setup = lora.apply_lora(args, components, torch.float32, "cpu")
    output = tmp_path_factory.mktemp("lora_run") / "run"
    torch.manual_seed(0)
    for param in setup.params:
        torch.nn.init.normal_(param, std=0.3)
    lora.save_diffusers_file(output / "checkpoint-2", components.unet, None, setup)
    lora.write_run_record(output / "checkpoint-2", args)
    for param in setup.params:
        param.data.mul_(0.5)
    lora.save_diffusers_file(output / "checkpoint-2" / lora.EMA_LORA_DIRNAME, components.unet, None, setup)
    lora.save_diffusers_file(output, components.unet, None, setup)
    lora.write_run_record(output, args)
    return output


@pytest.fixture(scope="session")
def lora_metadata_run_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A LoRA run's OUTPUT_DIR trained with --metadata_fields gsd,lat,lon,date, made without training: random
    non-zero adapters and metadata embedding (last layer included), saved as trainer.lora writes them."""
    from types import SimpleNamespace

    import torch

    from trainer import lora
    from trainer.metadata import MetadataEncoder
    from trainer.metadata_unet import add_embedding
    from trainer.models import load_components

    args = SimpleNamespace(pretrained_model_name_or_path=str(tiny_model_dir), revision=None, variant=None,
                           non_ema_revision=None, prediction_type=None, lora_rank=4, lora_alpha=4.0,
                           lora_dropout=0.0, lora_target_modules="attention", use_dora=False,
                           train_text_encoder_lora=False)
    components = load_components(args, torch.float32, "cpu")
    encoder = MetadataEncoder(("gsd", "lat", "lon", "date"))
    add_embedding(components.unet, encoder.dim)
    setup = lora.apply_lora(args, components, torch.float32, "cpu", encoder)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in setup.params:
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    output = tmp_path_factory.mktemp("lora_metadata_run") / "run"
    lora.save_diffusers_file(output, components.unet, None, setup)
    lora.write_run_record(output, args)
    return output


# --- Metadata fixtures (helper "metasample"): a pipeline whose UNet takes metadata, made without training; a copy
# of the tiny training folder whose rows carry metadata.

# Rows of the tiny folder get these in turn; lat 95 is a bad value (absent, counted), the last row has none.
TRAIN_METADATA = [{"gsd": 0.5, "lat": 37.77, "lon": -122.42, "date": "2021-07-01", "sensor": "naip"},
                  {"gsd": 2.0, "lat": -33.9, "lon": 151.2, "date": "2019-01-15T10:32:22Z", "sensor": "WV3"},
                  {"gsd": 8.0, "lat": 95.0, "lon": 10.0},
                  None]


@pytest.fixture(scope="session")
def metadata_dir(tiny_data_dir, tmp_path_factory) -> Path:
    """A copy of the tiny data folder whose metadata.jsonl lines carry metadata, as format.py writes them."""
    folder = tmp_path_factory.mktemp("metadata_data") / "data"
    shutil.copytree(tiny_data_dir, folder)
    path = folder / "metadata.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if TRAIN_METADATA[i % len(TRAIN_METADATA)] is not None:
            line["metadata"] = TRAIN_METADATA[i % len(TRAIN_METADATA)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder



METADATA_FIELDS = ("gsd", "lat", "lon", "date")


def save_metadata_pipeline(base_dir: Path, folder: Path, trained: bool = True) -> Path:
    """base_dir's pipeline with a metadata embedding for METADATA_FIELDS and its unet/metadata_spec.json, saved to
    folder; trained=True draws the embedding's last layer (zero, as training starts, otherwise) so metadata count."""
    import torch
    from diffusers import StableDiffusionPipeline

    from trainer.metadata import MetadataEncoder, write_spec
    from trainer.metadata_unet import add_embedding

    pipeline = StableDiffusionPipeline.from_pretrained(base_dir, safety_checker=None, requires_safety_checker=False)
    encoder = MetadataEncoder(METADATA_FIELDS)
    add_embedding(pipeline.unet, encoder.dim)
    if trained:
        last = pipeline.unet.class_embedding.linear_2
        generator = torch.Generator().manual_seed(7)
        with torch.no_grad():
            last.weight.copy_(torch.randn(last.weight.shape, generator=generator))
            last.bias.copy_(torch.randn(last.bias.shape, generator=generator))
    pipeline.save_pretrained(folder, safe_serialization=True)
    write_spec(encoder, Path(folder) / "unet")
    return Path(folder)


@pytest.fixture(scope="session")
def metadata_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny pipeline with a 'trained' (random, non-zero) metadata embedding over gsd, lat, lon and date."""
    return save_metadata_pipeline(tiny_model_dir, tmp_path_factory.mktemp("metadata_model") / "pipeline")


# --- ControlNet fixtures (helper "ctrleval"): ControlNets for the tiny pipeline, made without training.

MASK_ROWS = 8
MASK_RESOLUTION = 32


def save_test_controlnet(base_dir: Path, folder: Path, document, seed: int = 0) -> Path:
    """A random ControlNet for base_dir's UNet taking document's channels, its zero-initialised convolutions (the
    conditioning embedding's last, the outputs) drawn so that it steers, with document as its conditioning.json
    (None: a plain diffusers RGB ControlNet)."""
    import json

    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    from trainer.controlnet import embedding_channels
    from utils.control_input import spec_from_document

    unet = UNet2DConditionModel.from_pretrained(base_dir, subfolder="unet")
    channels = spec_from_document(document or {}).channels
    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(unet, conditioning_channels=channels,
                                           conditioning_embedding_out_channels=embedding_channels(2))
    with torch.no_grad():
        for block in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                      controlnet.controlnet_cond_embedding.conv_out]:
            block.weight.normal_(0, 0.3)
    controlnet.save_pretrained(folder, safe_serialization=True)
    if document is not None:
        (Path(folder) / "conditioning.json").write_text(json.dumps({**document, "channels": channels}))
    return Path(folder)


@pytest.fixture(scope="session")
def mask_data_dir(tmp_path_factory) -> Path:
    """A create.py + format.py folder of MASK_ROWS sample layout scenes with their 5-class masks, at 32 px."""
    root = tmp_path_factory.mktemp("mask_data")
    parquet = make_sample_parquet(root / "masks.parquet", MASK_ROWS, seed=0, masks=True)
    data_dir = root / "data"
    for script, args in (
        ("diffusion_model/create.py", ["--parquet_path", parquet, "--output_dir", data_dir, "--resolution",
                                       MASK_RESOLUTION, "--conditioning_column", "mask", "--conditioning_type", "mask",
                                       "--num_classes", 5]),
        ("diffusion_model/format.py", ["--caption_file", data_dir / "captions.txt",
                                       "--output_file", data_dir / "metadata.jsonl"]),
    ):
        done = run_script_at(script, args)
        assert done.returncode == 0, f"{script} failed:\n{done.stderr}"
    return data_dir


@pytest.fixture(scope="session")
def mask_controlnet_dir(tiny_model_dir, mask_data_dir, tmp_path_factory) -> Path:
    """A 'trained' (random, steering) ControlNet of the tiny pipeline for mask_data_dir's 5-class masks, described
    as train_controlnet.py describes a run: the folder's conditioning.json plus channels and train_data_dir."""
    import json

    document = json.loads((mask_data_dir / "conditioning.json").read_text())
    return save_test_controlnet(tiny_model_dir, tmp_path_factory.mktemp("mask_controlnet") / "run",
                                {**document, "base_model": str(tiny_model_dir), "train_data_dir": str(mask_data_dir)})


# --- Bad-rows fixture (helper "badrows"): a training folder with images that cannot be read.

# Row 1's image is a truncated JPEG, row 2's a text file named .jpg; rows 0 and 3 are fine.
BROKEN_ROWS = {1: "truncated", 2: "undecodable"}


@pytest.fixture(scope="session")
def broken_images_dir(tmp_path_factory) -> Path:
    """A format.py-style folder of 4 rows at 32 px (images/N.jpg, metadata.jsonl) with BROKEN_ROWS' images broken."""
    import odd_images as odd

    folder = tmp_path_factory.mktemp("broken_images")
    (folder / "images").mkdir()
    lines = []
    for row in range(4):
        content = {1: odd.truncated_jpeg(), 2: odd.junk_bytes()}.get(row)
        (folder / "images" / f"{row}.jpg").write_bytes(content or odd.save(odd.noisy_rgb(32, 32, row), "JPEG"))
        lines.append(json.dumps({"file_name": f"images/{row}.jpg", "text": f"scene {row}"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder
