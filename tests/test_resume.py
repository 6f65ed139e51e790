"""Exact resume, checkpoints, SIGTERM and non-finite losses.

A run interrupted after step k — by an exception, by SIGTERM, or by ``kill -9`` of the CLI — and then
resumed with ``--resume`` ends with the same trained weights, bit for bit (``torch.equal``), as a run
that was never interrupted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from vpgtrans.bundle import CONNECTOR_FILE, MANIFEST, VPG_FILE, read_manifest
from vpgtrans.checkpoint import latest_checkpoint, list_checkpoints
from vpgtrans.cli import app
from vpgtrans.config import TrainConfig
from vpgtrans.errors import VpgtransError
from vpgtrans.stages import train as train_module
from vpgtrans.stages.transfer import transfer
from vpgtrans.training import RunOptions, TrainingInterrupted, epoch_order

# finetune: dropout in the trained Q-Former (RNG state matters), 2 micro-batches per step, an eval curve,
# and 8 x 4 = 32 samples > 24 rows, so the run crosses into the second epoch's order.
FINETUNE = dict(max_steps=8, batch_size=4, grad_accum=2, eval_every=3, eval_max_samples=4, max_new_tokens=2, log_every=1)


class Injected(Exception):
    pass


def _fail_at(step: int, total: int | None = None):
    def progress(done, steps, loss, lr):
        if done == step and (total is None or steps == total):
            raise Injected(f"injected failure after step {done}")
    return progress


def _assert_same_weights(a, b):
    for name in (VPG_FILE, CONNECTOR_FILE):
        x, y = load_file(str(a / name)), load_file(str(b / name))
        assert set(x) == set(y)
        for key in x:
            assert torch.equal(x[key], y[key]), f"{name}:{key}"


def _losses(bundle):
    return [r["loss"] for r in map(json.loads, (bundle / "metrics.jsonl").read_text().splitlines()) if r["type"] == "train"]


@pytest.fixture(scope="module")
def reference(inherited, tiny, tmp_path_factory):
    """Uninterrupted runs to compare with."""
    root = tmp_path_factory.mktemp("reference")
    config = TrainConfig.finetune(**FINETUNE)
    return {"finetune": train_module.finetune(inherited, tiny["caption"], root / "finetune", config,
                                              eval_data=tiny["caption"]),
            "warmup": train_module.warmup_projector(inherited, tiny["caption"], root / "warmup",
                                                    TrainConfig.warmup(max_steps=60, batch_size=4))}


def test_resume_after_a_crash_is_bit_identical(reference, inherited, tiny, tmp_path):
    config, out = TrainConfig.finetune(**FINETUNE), tmp_path / "run"
    with pytest.raises(Injected):
        train_module.finetune(inherited, tiny["caption"], out, config, eval_data=tiny["caption"],
                              progress=_fail_at(5), options=RunOptions(save_every=2))
    assert not (out / MANIFEST).exists()
    assert [p.name for p in list_checkpoints(out)] == ["step-000002", "step-000004"]  # keeps the last 2
    (out / "checkpoints" / ".step-000006.tmp-99999").mkdir()  # what a kill mid-save leaves: never read
    assert latest_checkpoint(out).name == "step-000004"
    with pytest.raises(VpgtransError, match="--resume"):  # the run dir is not silently overwritten
        train_module.finetune(inherited, tiny["caption"], out, config, eval_data=tiny["caption"])
    result = train_module.finetune(inherited, tiny["caption"], out, config, eval_data=tiny["caption"],
                                   options=RunOptions(save_every=2, resume=True))
    _assert_same_weights(reference["finetune"], result)
    ours, theirs = read_manifest(result), read_manifest(reference["finetune"])
    assert ours["curve"] == theirs["curve"] and len(ours["curve"]) == 4  # steps 0, 3, 6, 8
    assert ours["metrics"]["train"]["final_loss"] == theirs["metrics"]["train"]["final_loss"]
    assert ours["metrics"]["train"]["resumed"] is True
    assert _losses(result) == _losses(reference["finetune"]) and len(_losses(result)) == 8
    assert {p.name for p in result.iterdir()} == {MANIFEST, VPG_FILE, CONNECTOR_FILE, "metrics.jsonl"}  # no checkpoints
    assert ours["config"]["run"]["resume"] is True and ours["config"]["run"]["save_every"] == 2


def test_checkpoint_contents(inherited, tiny, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Injected):
        train_module.finetune(inherited, tiny["caption"], out, TrainConfig.finetune(**FINETUNE),
                              eval_data=tiny["caption"], progress=_fail_at(4), options=RunOptions(save_every=3))
    (checkpoint,) = list_checkpoints(out)
    assert {p.name for p in checkpoint.iterdir()} == {VPG_FILE, CONNECTOR_FILE, "optimizer.pt", "state.json"}
    optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)  # no pickled code
    assert len(optimizer["state"]) == sum(len(g["params"]) for g in optimizer["param_groups"])
    assert all(float(s["step"]) == 3 for s in optimizer["state"].values())
    state = json.loads((checkpoint / "state.json").read_text())
    assert state["step"] == 3 and state["position"] == {"epoch": 0, "cursor": 12}
    assert len(state["losses"]) == 3 and [p["step"] for p in state["curve"]] == [0, 3]
    assert state["scheduler"]["last_epoch"] == 3 and len(state["rng"]) == 1
    assert set(state["rng"][0]) >= {"torch", "python"}
    assert state["record"]["stage"] == "finetune" and state["record"]["train"]["lr"] == 1e-4


def test_resume_refuses_what_it_cannot_continue(reference, inherited, tiny, tmp_path):
    config = TrainConfig.finetune(**FINETUNE)
    with pytest.raises(VpgtransError, match="no checkpoint to resume from"):
        train_module.finetune(inherited, tiny["caption"], tmp_path / "none", config, options=RunOptions(resume=True))
    assert not (tmp_path / "none").exists()
    out = tmp_path / "run"
    with pytest.raises(Injected):
        train_module.finetune(inherited, tiny["caption"], out, config, progress=_fail_at(3),
                              options=RunOptions(save_every=2))
    other = TrainConfig.finetune(**{**FINETUNE, "max_steps": 9})
    with pytest.raises(VpgtransError, match=r"different train\.max_steps"):
        train_module.finetune(inherited, tiny["caption"], out, other, options=RunOptions(resume=True))
    # A finished run is returned as it is.
    assert train_module.finetune(inherited, tiny["caption"], reference["finetune"], config, eval_data=tiny["caption"],
                                 options=RunOptions(resume=True)) == reference["finetune"]
    # --force starts over and drops the old checkpoints.
    train_module.finetune(inherited, tiny["caption"], out, TrainConfig.finetune(max_steps=1, batch_size=4), force=True)
    assert list_checkpoints(out) == [] and read_manifest(out)["metrics"]["train"]["steps"] == 1


def test_sigterm_saves_a_checkpoint_and_resume_is_exact(reference, inherited, tiny, tmp_path):
    def terminate_at_step_3(done, steps, loss, lr):
        if done == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # what Slurm sends on pre-emption

    config, out = TrainConfig.finetune(**FINETUNE), tmp_path / "run"
    with pytest.raises(TrainingInterrupted, match="re-run the same command with --resume") as info:
        train_module.finetune(inherited, tiny["caption"], out, config, eval_data=tiny["caption"],
                              progress=terminate_at_step_3)
    assert "after step 3/8" in str(info.value)
    assert [p.name for p in list_checkpoints(out)] == ["step-000003"]  # saved although --save-every was not given
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is restored
    result = train_module.finetune(inherited, tiny["caption"], out, config, eval_data=tiny["caption"],
                                   options=RunOptions(resume=True))
    _assert_same_weights(reference["finetune"], result)


class _NanImageCollator(train_module.Collator):
    """Sample 5's image becomes NaN pixels: a real non-finite loss through the whole model."""

    def prepare(self, rows, draws=None):
        batch, outcomes = super().prepare(rows, draws)
        for i, row in enumerate(rows):
            if row["image"].endswith("0005.png"):
                batch["pixel_values"][i] = float("nan")
        return batch, outcomes


def _step_of_sample_5(batch_size: int) -> int:
    return epoch_order(24, 42, 0).index(5) // batch_size + 1


def test_nonfinite_loss_stops_with_step_and_samples(inherited, tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "Collator", _NanImageCollator)
    bad_step = _step_of_sample_5(4)
    assert bad_step <= 5  # 5 steps + 1 skipped batch = one epoch: sample 5 comes once
    config = TrainConfig.warmup(max_steps=5, batch_size=4, grad_accum=4)  # micro-batches of one sample
    out = tmp_path / "stop"
    with pytest.raises(VpgtransError, match=rf"non-finite loss at step {bad_step} \(samples \[5\]\)") as info:
        train_module.warmup_projector(inherited, tiny["caption"], out, config, options=RunOptions(save_every=1))
    if bad_step > 1:
        assert f"last good checkpoint: {out / 'checkpoints' / f'step-{bad_step - 1:06d}'}" in str(info.value)
        assert latest_checkpoint(out).name == f"step-{bad_step - 1:06d}"
    assert not (out / MANIFEST).exists()
    result = train_module.warmup_projector(inherited, tiny["caption"], tmp_path / "skip", config,
                                           options=RunOptions(skip_nonfinite=1))
    train = read_manifest(result)["metrics"]["train"]
    assert train["skipped_nonfinite"] == 1 and train["skipped_nonfinite_batches"] == [{"step": bad_step, "samples": [5]}]
    assert train["steps"] == 5 and all(torch.isfinite(t).all() for t in load_file(str(result / CONNECTOR_FILE)).values())


def test_nonfinite_loss_on_the_cli_is_one_line(inherited, tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "Collator", _NanImageCollator)
    result = CliRunner().invoke(app, ["warmup-projector", str(inherited), "--data", str(tiny["caption"]), "--out",
                                      str(tmp_path / "o"), "--max-steps", "6", "--batch-size", "4", "--grad-accum", "4"])
    assert result.exit_code == 2
    # (Steps done before it are logged as plain progress lines: stderr is not a terminal here.)
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("warmup: step ")]
    assert len(lines) == 1 and lines[0].startswith("error: non-finite loss at step") and "[5]" in lines[0]
    assert result.stderr.strip().splitlines()[-1] == lines[0]


def test_resume_without_checkpoint_on_the_cli(inherited, tiny, tmp_path):
    result = CliRunner().invoke(app, ["finetune", str(inherited), "--data", str(tiny["caption"]), "--out",
                                      str(tmp_path / "o"), "--resume"])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'o'}: no checkpoint to resume from (none under {tmp_path / 'o'}/checkpoints); "
        f"run without --resume"]


def _cli(*args):
    return [sys.executable, "-m", "vpgtrans", *map(str, args)]


def _wait_for_checkpoint(process, out, name, timeout=120):
    deadline = time.time() + timeout
    while not (out / "checkpoints" / name).is_dir():
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.002)


def test_kill_9_of_the_cli_then_resume_is_bit_identical(reference, inherited, tiny, tmp_path):
    out = tmp_path / "run"
    args = ["warmup-projector", inherited, "--data", tiny["caption"], "--out", out, "--max-steps", "60",
            "--batch-size", "4", "--save-every", "2"]
    process = subprocess.Popen(_cli(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for_checkpoint(process, out, "step-000010")
    process.kill()  # SIGKILL: no handler, no clean-up, possibly mid-step or mid-save
    assert process.wait() == -signal.SIGKILL
    assert not (out / MANIFEST).exists()
    done = subprocess.run(_cli(*args, "--resume"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"bundle written to {out}" in done.stdout
    _assert_same_weights(reference["warmup"], out)


def test_sigterm_of_the_cli_exits_143_then_resume_is_bit_identical(reference, inherited, tiny, tmp_path):
    out = tmp_path / "run"
    args = ["warmup-projector", inherited, "--data", tiny["caption"], "--out", out, "--max-steps", "60",
            "--batch-size", "4", "--save-every", "50"]
    process = subprocess.Popen(_cli(*args, "--verbose"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").is_file():  # training has reached step 10 (log_every)
        assert process.poll() is None and time.time() < deadline, process.communicate()
        time.sleep(0.002)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert "stopped: stopped by SIGTERM after step" in stderr and "--resume" in stderr
    assert "Traceback" not in stderr
    (checkpoint,) = list_checkpoints(out)
    assert 10 <= int(checkpoint.name.split("-")[1]) < 60
    done = subprocess.run(_cli(*args, "--resume"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    _assert_same_weights(reference["warmup"], out)


def test_transfer_resume_skips_finished_stages(inherited, tiny, tmp_path):
    warmup = TrainConfig.warmup(max_steps=3, batch_size=4)
    finetune = TrainConfig.finetune(max_steps=5, batch_size=4)
    common = dict(warmup_config=warmup, finetune_config=finetune)
    reference = transfer(tiny["source"], tiny["llama"], tiny["caption"], tmp_path / "ref", **common)
    out = tmp_path / "run"
    with pytest.raises(Injected):
        transfer(tiny["source"], tiny["llama"], tiny["caption"], out, progress=_fail_at(4, total=5),
                 options=RunOptions(save_every=2), **common)
    kept = {name: (out / name / MANIFEST).read_bytes() for name in ("inherit", "warmup")}
    with pytest.raises(VpgtransError, match="--resume"):
        transfer(tiny["source"], tiny["llama"], tiny["caption"], out, **common)
    summary = transfer(tiny["source"], tiny["llama"], tiny["caption"], out, options=RunOptions(resume=True), **common)
    for name, manifest in kept.items():  # finished stages are kept as they were, not re-run
        assert (out / name / MANIFEST).read_bytes() == manifest
    assert read_manifest(out / "finetune")["metrics"]["train"]["resumed"] is True
    _assert_same_weights(tmp_path / "ref" / "finetune", out / "finetune")
    assert summary["stages"].keys() == reference["stages"].keys()
    with pytest.raises(VpgtransError, match="nothing to resume"):
        transfer(tiny["source"], tiny["llama"], tiny["caption"], tmp_path / "missing", options=RunOptions(resume=True),
                 **common)


def test_a_record_made_before_an_option_existed_still_resumes():
    """A checkpoint's record lacks the options added since (e.g. ``t5_caption_split``): not a change; a
    changed option inside the train config is named."""
    from vpgtrans.stages.train import _changed

    old = {"stage": "finetune", "train": {"lr": 1e-4, "max_steps": 6}, "data_fingerprint": "a"}
    now = {"stage": "finetune", "train": {"lr": 1e-4, "max_steps": 6, "t5_caption_split": "random-prefix"},
           "data_fingerprint": "a", "quantization": None}
    assert _changed(old, now) == []
    assert _changed(old, {**now, "train": {**now["train"], "lr": 2e-4}}) == ["train.lr"]
    assert _changed(old, {**now, "data_fingerprint": "b"}) == ["data (its rows changed)"]
