"""Several nodes: scripts/slurm/train_multinode.sbatch run under a stand-in Slurm as two "nodes" on 127.0.0.1, the
accelerate configs under configs/accelerate/, and scripts/slurm/create_array.sbatch.

The two-node run costs ~40 s (two launchers and two trainers on 2 cores); it is compared with test_train_e2e.py's
one-node two-process run (the session fixture two_process_run), which is not run again.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from test_train_e2e import (TWO_PROCESS_FLAGS, assert_same_weights, checkpoints, free_port, load_weights,
                            rank_torch_rng_states)
from warm import single_thread_env

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_SBATCH = REPO_ROOT / "scripts" / "slurm" / "train_multinode.sbatch"
CREATE_SBATCH = REPO_ROOT / "scripts" / "slurm" / "create_array.sbatch"
CONFIGS = REPO_ROOT / "configs" / "accelerate"
# Node 1 writes with a umask of its own, so each file's mode tells which node's process wrote it.
NODE_UMASKS = (0o022, 0o027)
# scontrol's answer: the first host holds the rendezvous store.
FAKE_SCONTROL = '#!/bin/sh\n[ "$1 $2" = "show hostnames" ] || exit 1\nprintf "127.0.0.1\\nnode-b\\n"\n'
# srun --ntasks-per-node=1 on SLURM_NNODES "nodes" of this host: each task gets SLURM_NODEID/SLURM_PROCID, its own
# working folder and TMPDIR (its node-local disk) and umask. Task 0 starts first and the others once its rendezvous
# port listens: on one host every launcher would claim to host the store, and accelerate's launcher on node 0 refuses a
# port already taken.
FAKE_SRUN = r'''#!{python}
import os, socket, subprocess, sys, time
args = sys.argv[1:]
while args[0].startswith("-"):
    args.pop(0)
nodes, port, root = int(os.environ["SLURM_NNODES"]), int(os.environ["MAIN_PROCESS_PORT"]), os.environ["FAKE_NODES"]
umasks = [int(u, 8) for u in os.environ["FAKE_UMASKS"].split(",")]
procs = []
for node in range(nodes):
    if node:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.2)
    home, tmp = os.path.join(root, f"node{{node}}", "work"), os.path.join(root, f"node{{node}}", "tmp")
    os.makedirs(home), os.makedirs(tmp)
    env = {{**os.environ, "SLURM_NODEID": str(node), "SLURM_PROCID": str(node), "TMPDIR": tmp}}
    with open(os.path.join(root, f"node{{node}}.log"), "w") as log:
        procs.append(subprocess.Popen(args, cwd=home, env=env, umask=umasks[node], stdout=log,
                                      stderr=subprocess.STDOUT))
sys.exit(max(p.wait() for p in procs))
'''


def fake_slurm(root: Path) -> Path:
    """A bin folder with the stand-in scontrol and srun."""
    bin_dir = root / "bin"
    bin_dir.mkdir(parents=True)
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN.format(python=sys.executable))):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def two_node_command(model, data, output) -> list:
    """The sbatch with the same trainer flags as test_train_e2e's trainer_command + TWO_PROCESS_FLAGS, over
    train.sh's recipe (its --gradient_checkpointing stays: it recomputes the same activations)."""
    return ["bash", str(TRAIN_SBATCH), "--resolution", "64", "--center_crop", "--random_flip",
            "--train_batch_size", "1", "--gradient_accumulation_steps", "1", "--learning_rate", "5.0e-04",
            "--scale_lr", "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--seed", "0",
            "--mixed_precision", "no", *[str(f) for f in TWO_PROCESS_FLAGS]]


@pytest.fixture(scope="module")
def two_node_run(tiny_model_dir, tiny_data_dir, tmp_path_factory) -> dict:
    """The sbatch run as two nodes of one process each, sharing OUTPUT_DIR: output, node folders, logs, result."""
    root = tmp_path_factory.mktemp("two_nodes")
    output, nodes = root / "shared" / "out", root / "nodes"
    bin_dir = fake_slurm(root)
    env = {**single_thread_env(), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node-[a-b]",
           "SLURM_NNODES": "2", "GPUS_PER_NODE": "1", "MAIN_PROCESS_PORT": str(free_port()),
           "REPO_DIR": str(REPO_ROOT), "MODEL_NAME": str(tiny_model_dir), "DATA_DIR": str(tiny_data_dir),
           "OUTPUT_DIR": str(output), "REPORT_TO": "tensorboard", "PUSH_TO_HUB": "0", "PYTHON": sys.executable,
           "ACCELERATE_USE_CPU": "1", "FAKE_NODES": str(nodes), "FAKE_UMASKS": ",".join(oct(u) for u in NODE_UMASKS)}
    env.pop("ACCELERATE_CONFIG_FILE", None)
    done = subprocess.run(two_node_command(tiny_model_dir, tiny_data_dir, output), capture_output=True, text=True,
                          env=env, timeout=400, cwd=root)
    logs = [(nodes / f"node{n}.log").read_text() if (nodes / f"node{n}.log").exists() else "" for n in range(2)]
    assert done.returncode == 0, \
        f"{done.stderr[-2000:]}\n--- node 0:\n{logs[0][-3000:]}\n--- node 1:\n{logs[1][-3000:]}"
    return {"output": output, "nodes": nodes, "logs": logs, "done": done}


def node_of_rank0(logs: list) -> int:
    """The node whose process is global rank 0: only it logs the run's plan (c10d orders ranks by host and pid)."""
    (node,) = [n for n, log in enumerate(logs) if "process(es), starting at step" in log]
    return node


def test_two_nodes_form_one_world_of_two(two_node_run):
    """Both nodes' launchers meet at the c10d rendezvous: one world of 2 processes, not two of 1."""
    logs = two_node_run["logs"]
    rank0 = node_of_rank0(logs)
    assert "8 examples, 6 optimizer steps (4 per epoch), 2 process(es)" in logs[rank0]
    assert "train_multinode.sbatch: 2 nodes x 1 processes, rendezvous at 127.0.0.1:" in two_node_run["done"].stderr


def test_two_nodes_equal_one_node_with_two_processes(two_node_run, two_process_run):
    """Same seed, same world size: every checkpoint's UNet and EMA, each rank's RNG state and the final UNet are
    bitwise those of torchrun --nproc_per_node 2 on one node; the ranks drew different noise."""
    output, (reference, reference_done) = two_node_run["output"], two_process_run
    assert reference_done.returncode == 0, reference_done.stderr[-2000:]
    assert checkpoints(output) == checkpoints(reference) == {"checkpoint-2", "checkpoint-4", "checkpoint-6"}
    for name in sorted(checkpoints(output)):
        for model in ("unet", "unet_ema"):
            assert_same_weights(load_weights(output / name / model), load_weights(reference / name / model))
        states, reference_states = rank_torch_rng_states(output / name), rank_torch_rng_states(reference / name)
        assert len(states) == 2 and not torch.equal(*states), f"{name}: both ranks drew the same noise"
        assert all(torch.equal(a, b) for a, b in zip(states, reference_states)), name
    assert_same_weights(load_weights(output / "unet"), load_weights(reference / "unet"))
    assert (output / "validation" / "step-4" / "0.png").is_file()


def test_only_global_rank_0_writes_checkpoints_and_the_pipeline(two_node_run):
    """The other node writes nothing into OUTPUT_DIR but its rank's RNG state in each checkpoint, and nothing at all
    into its node-local folder. safetensors creates its files 0600 whatever the umask, so those are attributed
    through the config.json that the same save_pretrained call writes beside them."""
    output, nodes = two_node_run["output"], two_node_run["nodes"]
    rank0 = node_of_rank0(two_node_run["logs"])
    modes = {str(p.relative_to(output)): p.stat().st_mode & 0o777 for p in output.rglob("*") if p.is_file()}
    by_node = [{p for p, mode in modes.items() if mode == 0o666 & ~umask} for umask in NODE_UMASKS]
    unattributed = {p for p, mode in modes.items() if mode == 0o600}
    assert set(modes) == by_node[0] | by_node[1] | unattributed
    assert all(p.endswith(".safetensors") for p in unattributed), unattributed
    assert by_node[1 - rank0] == {f"{name}/random_states_1.pkl" for name in checkpoints(output)}
    assert {"model_index.json", "unet/config.json", "checkpoint-6/unet/config.json",
            "checkpoint-6/unet_ema/config.json", "checkpoint-6/random_states_0.pkl"} <= by_node[rank0]
    assert list((nodes / f"node{1 - rank0}" / "work").iterdir()) == []


@pytest.mark.parametrize("name, distributed_type, options", [
    ("ddp", "MULTI_GPU", {}),
    ("deepspeed_zero2", "DEEPSPEED", {"zero_stage": 2, "gradient_accumulation_steps": "auto"}),
    ("fsdp", "FSDP", {"fsdp_sharding_strategy": "FULL_SHARD", "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP"}),
])
def test_accelerate_configs_load(name, distributed_type, options):
    """accelerate's own loader accepts each config; each holds its mode's options and the placeholders."""
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
    assert str(config.distributed_type).rsplit(".", 1)[-1] == distributed_type
    assert config.mixed_precision == "fp16" and config.num_machines == 1 and config.num_processes >= 1
    section = config.deepspeed_config or config.fsdp_config or {}
    assert {k: section[k] for k in options} == options


def test_fsdp_wraps_blocks_that_exist_in_the_unet():
    """Every class named in fsdp.yaml's wrap policy is a block of diffusers' UNet2DConditionModel."""
    import diffusers.models.unets.unet_2d_blocks as blocks
    from diffusers.models.attention import BasicTransformerBlock

    raw = yaml.safe_load((CONFIGS / "fsdp.yaml").read_text())
    names = raw["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"].split(",")
    known = {n for n in dir(blocks) if n[0].isupper()} | {BasicTransformerBlock.__name__}
    assert names and set(names) <= known, set(names) - known


@pytest.mark.parametrize("script", [TRAIN_SBATCH, CREATE_SBATCH])
def test_sbatch_scripts_parse_and_are_strict(script):
    """bash -n accepts the script; it runs under set -euo pipefail and has no eval."""
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    text = script.read_text()
    assert "set -euo pipefail" in text and "eval" not in text


def test_train_sbatch_outside_slurm_is_one_line_exit_2(tmp_path):
    """Run by hand (no allocation), the sbatch says so in one line and exits 2."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    done = subprocess.run(["bash", str(TRAIN_SBATCH)], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "train_multinode.sbatch: error: not inside a Slurm allocation (no SLURM_JOB_NODELIST/SLURM_NNODES): "
        "submit it with sbatch."]


def run_create_task(tmp_path, task: int, source_list: Path) -> subprocess.CompletedProcess:
    """create_array.sbatch as Slurm runs array task `task`."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}, "SLURM_ARRAY_TASK_ID": str(task),
           "SOURCE_LIST": str(source_list), "OUTPUT_ROOT": str(tmp_path / "parts"), "REPO_DIR": str(REPO_ROOT),
           "PYTHON": sys.executable, "CREATE_ARGS": "--resolution 32 --num_workers 1"}
    return subprocess.run(["bash", str(CREATE_SBATCH)], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=120)


def test_create_array_task_prepares_its_own_source_only(tmp_path):
    """Task 1 reads the list's second source (blank lines skipped) into part-00001, a complete DATA_DIR; a task
    past the list's end is one line, exit 2."""
    from diffusion_model.sample_data import make_sample_parquet

    first = make_sample_parquet(tmp_path / "a.parquet", 2, seed=0)
    second = make_sample_parquet(tmp_path / "b.parquet", 3, seed=1)
    source_list = tmp_path / "sources.txt"
    source_list.write_text(f"{first}\n\n{second}\n")
    done = run_create_task(tmp_path, 1, source_list)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "parts").iterdir()) == ["part-00001"]
    rows = (tmp_path / "parts" / "part-00001" / "metadata.jsonl").read_text().splitlines()
    assert len(rows) == 3
    done = run_create_task(tmp_path, 2, source_list)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"create_array.sbatch: error: array task 2 has no source: SOURCE_LIST '{source_list}' lists 2 (tasks 0-1)."]


def test_create_array_splits_one_source_into_shards_then_merges(tmp_path):
    """SOURCE mode: two array tasks (Slurm numbering them from 1) write their own shards of one source into one
    OUTPUT_DIR; MERGE=1 then writes the global index of every row."""
    from diffusion_model.sample_data import make_sample_parquet

    source = make_sample_parquet(tmp_path / "a.parquet", 5, seed=0)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}, "SOURCE": str(source),
           "OUTPUT_DIR": str(tmp_path / "shards"), "REPO_DIR": str(REPO_ROOT), "PYTHON": sys.executable,
           "CREATE_ARGS": "--resolution 16 --num_workers 1 --shard_size 2", "SLURM_ARRAY_TASK_COUNT": "2",
           "SLURM_ARRAY_TASK_MIN": "1"}
    for task in ("1", "2"):
        done = subprocess.run(["bash", str(CREATE_SBATCH)], capture_output=True, text=True, cwd=tmp_path,
                              env={**env, "SLURM_ARRAY_TASK_ID": task}, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"(task {task} of 2)" in done.stdout
    assert not (tmp_path / "shards" / "shards_index.parquet").exists()
    done = subprocess.run(["bash", str(CREATE_SBATCH)], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env={**env, "MERGE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "5 samples (5 rows) in 3 shards" in done.stdout
