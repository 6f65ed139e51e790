"""Real 2-process FSDP2 runs (``fully_shard`` through accelerate, gloo on CPU): every parameter,
the frozen LLM's included, is sharded over the processes, and the stage still writes the same
bundle as a 1-process run — whole tensors gathered for the bundle and the checkpoints, whole
parameters for generation during evaluation, and checkpoints that resume on any number of processes,
sharded or not.

accelerate enables FSDP only on GPU-like devices; ``tests/fsdp_on_cpu.py`` lifts that one gate so the
same accelerate code path runs on CPU processes. The FSDP runs use docs/cluster.md's accelerate config.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_curves_close
from safetensors.torch import load_file

from vpgtrans.bundle import CONNECTOR_FILE, VPG_FILE, read_manifest
from vpgtrans.checkpoint import list_checkpoints

LAUNCHER = str(Path(__file__).with_name("fsdp_on_cpu.py"))
DOC = Path(__file__).resolve().parent.parent / "docs" / "cluster.md"
STEPS, BATCH, GRAD_ACCUM = 6, 9, 3  # 5 + 4 samples: 3 micro-batches on one process, 2 on the other


def _doc_fsdp_config(tmp: Path) -> Path:
    """docs/cluster.md's FSDP accelerate config, on 2 processes and in fp32 (as the DDP reference)."""
    text = DOC.read_text().split("### FSDP", 1)[1]
    block = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert "distributed_type: FSDP" in block and "fsdp_version: 2" in block
    block = block.replace("num_processes: 8", "num_processes: 2").replace("mixed_precision: bf16", "mixed_precision: 'no'")
    path = tmp / "fsdp.yaml"
    path.write_text(block)
    return path


def _launch(args, fsdp_config: Path | None, env_extra=None):
    """``accelerate launch --config_file FSDP_CONFIG`` (FSDP), or ``torchrun`` on 2 processes (DDP)."""
    launcher = (["-m", "accelerate.commands.launch", "--config_file", str(fsdp_config)] if fsdp_config
                else ["-m", "torch.distributed.run", "--nproc_per_node", "2"])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "COLUMNS": "400", **(env_extra or {})}
    env = {k: v for k, v in env.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    return subprocess.run([sys.executable, *launcher, LAUNCHER, *map(str, args)], capture_output=True, text=True,
                          timeout=600, env=env)


def _finetune_args(inherited, data, out, *extra):
    return ["finetune", inherited, "--data", data, "--out", out, "--max-steps", STEPS, "--batch-size", BATCH,
            "--grad-accum", GRAD_ACCUM, "--eval-data", data, "--eval-every", 3, *extra]


def _assert_same_weights(a: Path, b: Path, atol=1e-5):
    for name in (VPG_FILE, CONNECTOR_FILE):
        x, y = load_file(str(a / name)), load_file(str(b / name))
        assert x.keys() == y.keys()
        for key in x:
            assert x[key].shape == y[key].shape, key  # whole tensors, not one process's shard
            torch.testing.assert_close(x[key], y[key], atol=atol, rtol=0, msg=f"{name}:{key}")


@pytest.fixture(scope="module")
def runs(inherited, tiny, tmp_path_factory):
    """The same 2-process fine-tune under FSDP and under DDP (the reference: same processes, same
    dropout streams; DDP itself equals a 1-process run, tests/test_distributed.py). The global batch
    splits unevenly: under FSDP every forward is collective, so the process with fewer micro-batches
    runs a zero-weight pass to stay in step (without it the run hangs), which must change nothing."""
    root = tmp_path_factory.mktemp("fsdp")
    config = _doc_fsdp_config(root)
    sharded = _launch(_finetune_args(inherited, tiny["caption"], root / "fsdp", "--verbose"), config)
    assert sharded.returncode == 0, sharded.stderr[-4000:]
    plain = _launch(_finetune_args(inherited, tiny["caption"], root / "ddp"), None)
    assert plain.returncode == 0, plain.stderr[-4000:]
    return {"fsdp": root / "fsdp", "ddp": root / "ddp", "log": sharded.stderr, "stdout": sharded.stdout,
            "config": config}


def test_fsdp_shards_the_llm_and_saves_what_ddp_trains(runs):
    # It really ran sharded: rank 0 reports each process holding half of the frozen LLM's parameters.
    (line,) = [line for line in runs["log"].splitlines() if "FSDP over" in line]
    match = re.search(r"FSDP over 2 processes, (\d+) units: this process holds ([\d,]+) of the LLM's ([\d,]+)", line)
    assert match, line
    units, held, total = (int(g.replace(",", "")) for g in match.groups())
    assert units >= 4 and held == pytest.approx(total / 2, rel=0.05) and held < total, line
    sharded, plain = read_manifest(runs["fsdp"]), read_manifest(runs["ddp"])
    assert sharded["config"]["run"]["engine"] == "fsdp" and plain["config"]["run"]["engine"] == "ddp"
    assert sharded["config"]["num_processes"] == 2
    _assert_same_weights(runs["ddp"], runs["fsdp"])  # whole tensors, the same values
    # Evaluation with whole parameters on each process scores every row as DDP does.
    assert [p["step"] for p in sharded["curve"]] == [0, 3, 6]
    assert_curves_close(sharded["curve"], plain["curve"])
    assert runs["stdout"].count("bundle written to") == 1


def test_fsdp_trains_the_vpg(runs, inherited):
    before, after = load_file(str(inherited / VPG_FILE)), load_file(str(runs["fsdp"] / VPG_FILE))
    moved = [key for key in before if not torch.allclose(before[key], after[key], atol=1e-6)]
    assert any(".layer." in key for key in moved), moved  # the sharded Q-Former layers were updated


def test_fsdp_stop_saves_whole_tensors_that_resume_under_either_engine(runs, inherited, tiny, tmp_path):
    """A SIGTERM during step 3 of the FSDP run (simulated at a known step on every process): the
    checkpoint holds whole tensors gathered from the shards; resumed under FSDP, or under DDP, the run
    ends with the weights of the uninterrupted one."""
    stopped = tmp_path / "stopped"
    done = _launch(_finetune_args(inherited, tiny["caption"], stopped), runs["config"],
                   env_extra={"VPGTRANS_TEST_STOP_AT_STEP": "3"})
    assert done.returncode != 0 and "stopped by SIGTERM after step 3/6" in done.stderr, done.stderr[-4000:]
    (checkpoint,) = list_checkpoints(stopped)
    state = json.loads((checkpoint / "state.json").read_text())
    assert state["step"] == 3 and state["num_processes"] == 2 and len(state["rng"]) == 2
    optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)  # plain tensors: weights_only loads them
    trained = {**load_file(str(checkpoint / VPG_FILE)), **load_file(str(checkpoint / CONNECTOR_FILE))}
    assert sorted(e["exp_avg"].numel() for e in optimizer["state"].values()) == sorted(v.numel() for v in trained.values())
    inherited_vpg = load_file(str(inherited / VPG_FILE))
    assert trained.keys() >= inherited_vpg.keys() and all(trained[k].shape == v.shape for k, v in inherited_vpg.items())

    shutil.copytree(stopped, tmp_path / "stopped-copy")
    for out, config in ((stopped, runs["config"]), (tmp_path / "stopped-copy", None)):
        done = _launch(_finetune_args(inherited, tiny["caption"], out, "--resume"), config)
        assert done.returncode == 0, done.stderr[-4000:]
        assert "resuming finetune from" in done.stderr
        _assert_same_weights(runs["ddp"], out)


def test_fsdp_lavin_with_text_only_batches_trains_what_ddp_trains(runs, tiny, tmp_path):
    """LaVIN under FSDP: the modality embedding all decoder blocks share lives in the first block's unit
    (sharded while the others run), and a process whose micro-batch is all text-only rows must still run the
    ViT units (their forward and backward are collectives). Mixed multiple-choice rows, adapter dropout 0:
    the FSDP weights equal DDP's. (Before: a DTensor/Tensor mix error, then a hang in backward.)"""
    from typer.testing import CliRunner

    from vpgtrans.cli import app
    from vpgtrans.demo.choices import make_choice_split

    bundle = tmp_path / "lavin"
    made = CliRunner().invoke(app, ["inherit", "--source", str(tiny["source"]), "--target-llm", str(tiny["llama"]),
                                    "--out", str(bundle), "--connector", "lavin", "--mma-dropout", "0"])
    assert made.exit_code == 0, made.output
    data = make_choice_split(tmp_path / "mc", 24, seed=0, text_fraction=0.4)
    rows = [json.loads(line) for line in (data / "data.jsonl").read_text().splitlines()]
    assert 0 < sum("image" not in r for r in rows) < len(rows)
    args = lambda out: ["finetune", bundle, "--data", data, "--out", out, "--max-steps", 3, "--batch-size", 8]  # noqa: E731
    sharded = _launch(args(tmp_path / "fsdp"), runs["config"])
    assert sharded.returncode == 0, sharded.stderr[-4000:]
    plain = _launch(args(tmp_path / "ddp"), None)
    assert plain.returncode == 0, plain.stderr[-4000:]
    for name in ("connector.safetensors", "mma.safetensors", "mma-vision.safetensors"):
        x, y, before = (load_file(str(d / name)) for d in (tmp_path / "fsdp", tmp_path / "ddp", bundle))
        assert x.keys() == y.keys() == before.keys()
        for key in x:
            assert x[key].shape == y[key].shape, key
            torch.testing.assert_close(x[key], y[key], atol=1e-5, rtol=0, msg=f"{name}:{key}")
        assert any(not torch.equal(x[key], before[key]) for key in x), f"{name} did not train"
