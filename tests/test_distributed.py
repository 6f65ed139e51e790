"""Real 2-process runs (gloo on CPU) through torchrun and accelerate launch, with the commands of
docs/cluster.md: the trained weights equal a 1-process run with the same global batch, only rank 0
writes, evaluation gathers every process's share, and a SIGTERM'ed 2-process run resumes exactly.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from conftest import assert_curves_close
from safetensors.torch import load_file

from vpgtrans.bundle import CONNECTOR_FILE, VPG_FILE, read_manifest
from vpgtrans.checkpoint import list_checkpoints
from vpgtrans.config import TrainConfig
from vpgtrans.stages import train as train_module

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "cluster.md"


def _console_script() -> str:
    """The real ``vpgtrans`` console script (a Python file next to the interpreter; ``which`` may
    find a shell shim such as pyenv's, which torchrun cannot run with python)."""
    script = Path(sys.executable).parent / "vpgtrans"
    if not script.is_file():
        pytest.skip("the vpgtrans console script is not installed next to this Python (pip install -e .)")
    return str(script)


def _doc_command(prefix: str, paths: dict) -> list[str]:
    """The docs/cluster.md command line starting with ``prefix``, with its paths replaced by the test's."""
    lines = [line.strip() for line in DOC.read_text().splitlines() if line.strip().startswith(prefix)]
    assert lines, f"docs/cluster.md has no command starting with {prefix!r}"
    line = lines[0].replace("$(which vpgtrans)", _console_script())
    for placeholder, path in paths.items():
        line = re.sub(rf"(?<![\w/]){re.escape(placeholder)}(?![\w/])", str(path), line)
    argv = shlex.split(line)
    launcher = {"torchrun": [sys.executable, "-m", "torch.distributed.run"],
                "accelerate": [sys.executable, "-m", "accelerate.commands.launch"]}[argv[0]]
    return launcher + (argv[1:] if argv[0] == "torchrun" else argv[2:])  # "accelerate launch ..." -> launch ...


def _run(argv, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)


def _assert_close_weights(a: Path, b: Path, atol=1e-6):
    for name in (VPG_FILE, CONNECTOR_FILE):
        x, y = load_file(str(a / name)), load_file(str(b / name))
        for key in x:
            torch.testing.assert_close(x[key], y[key], atol=atol, rtol=0, msg=f"{name}:{key}")


def _records(bundle: Path) -> list[dict]:
    return [json.loads(line) for line in (bundle / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def paths(inherited, tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    return {"runs/inherit": inherited, "data/captions": tiny["caption"], "runs/warmup-2proc": root / "torchrun",
            "runs/warmup-accelerate": root / "accelerate", "root": root}


def test_torchrun_two_processes_equal_one_process(paths):
    argv = _doc_command("torchrun --nproc_per_node 2", paths)
    assert "--batch-size" in argv and "--eval-every" in argv
    done = _run(argv)
    assert done.returncode == 0, done.stderr[-3000:]
    two = paths["runs/warmup-2proc"]
    # The same run in one process, same global batch (the command's options, as the library call).
    config = TrainConfig.warmup(max_steps=4, batch_size=8, eval_every=2, eval_max_samples=200)
    assert [argv[argv.index(o) + 1] for o in ("--max-steps", "--batch-size", "--eval-every")] == ["4", "8", "2"]
    one = train_module.warmup_projector(paths["runs/inherit"], paths["data/captions"], paths["root"] / "one", config,
                                        eval_data=paths["data/captions"])
    manifest = read_manifest(two)
    assert manifest["config"]["num_processes"] == 2 and read_manifest(one)["config"]["num_processes"] == 1
    _assert_close_weights(one, two)
    start = load_file(str(paths["runs/inherit"] / CONNECTOR_FILE))["proj.weight"]
    assert not torch.allclose(load_file(str(two / CONNECTOR_FILE))["proj.weight"], start, atol=1e-4)  # it trained
    # Only rank 0 prints and writes: one "bundle written", one line per logged step / eval point.
    assert done.stdout.count("bundle written to") == 1
    ours, theirs = _records(two), _records(one)
    assert [(r["type"], r["step"]) for r in ours] == [(r["type"], r["step"]) for r in theirs]
    assert [(r["type"], r["step"]) for r in ours] == [("eval", 0), ("eval", 2), ("train", 4), ("eval", 4)]
    assert ours[2]["loss"] == pytest.approx(theirs[2]["loss"], abs=1e-6)
    # Evaluation scores every eval row (gathered from both processes), as 1 process does.
    assert_curves_close(manifest["curve"], read_manifest(one)["curve"])
    assert {p.name for p in two.parent.iterdir()} == {"torchrun", "one"}  # no stray temporary directories


def test_accelerate_launch_uneven_split_equals_one_process(paths):
    """A global batch of 6 on 2 processes x 2 micro-batches is split 2 + 1 per process: the loss is
    normalised by the global number of target tokens, so the update is still the 1-process one."""
    argv = _doc_command("accelerate launch --multi_gpu", paths)
    done = _run(argv)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [argv[argv.index(o) + 1] for o in ("--max-steps", "--batch-size", "--grad-accum")] == ["3", "6", "2"]
    config = TrainConfig.warmup(max_steps=3, batch_size=6, grad_accum=2)
    one = train_module.warmup_projector(paths["runs/inherit"], paths["data/captions"], paths["root"] / "one-b", config)
    two = paths["runs/warmup-accelerate"]
    assert read_manifest(two)["config"]["num_processes"] == 2
    _assert_close_weights(one, two)
    assert done.stdout.count("bundle written to") == 1


def test_sigterm_to_torchrun_then_resume_on_two_processes(paths, tmp_path):
    """Slurm pre-emption on a 2-process run: torchrun passes SIGTERM to both processes, they finish
    the step, rank 0 saves one checkpoint (with both processes' RNG states), all exit; --resume on 2
    processes ends where an uninterrupted run does."""
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", _console_script(),
            "warmup-projector", str(paths["runs/inherit"]), "--data", str(paths["data/captions"]), "--out", str(out),
            "--max-steps", "80", "--batch-size", "4", "--save-every", "1000"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").is_file():  # step 10 is done (log_every)
        assert process.poll() is None and time.time() < deadline, process.communicate()
        time.sleep(0.005)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode != 0
    assert stderr.count("stopped: stopped by SIGTERM after step") == 1, stderr[-3000:]  # rank 0 says it, once
    (checkpoint,) = list_checkpoints(out)
    state = json.loads((checkpoint / "state.json").read_text())
    assert len(state["rng"]) == 2 and state["num_processes"] == 2 and 10 <= state["step"] < 80
    done = _run(argv + ["--resume"])
    if done.returncode != 0 and "terminate called without an active exception" in done.stderr \
            and (out / "manifest.json").is_file():
        # A rare abort of one process in gloo's teardown after the run had finished and the bundle was
        # written (seen twice in ~10 runs before the CLI met at a barrier before leaving the process
        # group). The weights below are still checked; anything else is a failure.
        warnings.warn("gloo teardown abort after a finished 2-process run")
    else:
        assert done.returncode == 0, done.stderr[-3000:]
    one = train_module.warmup_projector(paths["runs/inherit"], paths["data/captions"], tmp_path / "one",
                                        TrainConfig.warmup(max_steps=80, batch_size=4))
    _assert_close_weights(one, out, atol=1e-5)
