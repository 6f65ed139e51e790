"""Outputs as a user's tools expect them (issue 16, item 9): file modes follow the umask, identical weights give
identical bytes, and a Ctrl-C once a command is over prints no traceback."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from test_cli import _ok, _run

# What may differ between two runs with the same inputs and seed (docs/formats.md says so): the time a bundle
# was made, and the wall-clock fields of a training run's metrics.
TIMESTAMPS = {"created"}
CLOCK_FIELDS = {"seconds", "samples_per_second", "train_seconds", "curve_seconds"}


@pytest.fixture
def umask_027():
    previous = os.umask(0o027)
    yield 0o027
    os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_outputs_follow_the_umask(inherited, tiny, tmp_path, umask_027):
    """tempfile makes 0600 files and 0700 directories; what vpgtrans leaves behind has the modes the umask gives
    ordinary files (0640) and directories (0750) — bundles, exports, the LAVIS file and eval reports."""
    runner = CliRunner()
    _ok(_run(runner, "export", inherited, "--out", tmp_path / "hf"))
    _ok(_run(runner, "export", inherited, "--format", "lavis", "--out", tmp_path / "model.pth"))
    _ok(_run(runner, "export", inherited, "--format", "adapter", "--out", tmp_path / "adapter"))
    _ok(_run(runner, "eval", inherited, "--data", tiny["caption"], "--max-samples", "2", "--out", tmp_path / "e.json"))
    _ok(_run(runner, "inherit", "--source", tiny["source"], "--target-llm", tiny["llama"], "--out", tmp_path / "b",
             "--converter", "none"))
    outputs = [tmp_path / name for name in ("hf", "model.pth", "adapter", "e.json", "b")]
    made = [path for out in outputs for path in ([out, *out.rglob("*")] if out.is_dir() else [out])]
    assert len(made) > 15
    wrong = {str(p): oct(_mode(p)) for p in made if _mode(p) != (0o750 if p.is_dir() else 0o640)}
    assert not wrong


def _inherit(tiny, out):
    _ok(_run(CliRunner(), "inherit", "--source", tiny["source"], "--target-llm", tiny["llama"], "--out", out,
             "--converter", "shared-tokens"))
    return out


def _without(manifest: dict, keys: set[str]) -> dict:
    return {key: value for key, value in manifest.items() if key not in keys}


def test_a_bundle_written_twice_is_byte_identical_but_its_timestamp(tiny, tmp_path):
    first, second = _inherit(tiny, tmp_path / "a" / "bundle"), _inherit(tiny, tmp_path / "b" / "bundle")
    files = sorted(p.name for p in first.iterdir())
    assert files == sorted(p.name for p in second.iterdir()) and "converter.safetensors" in files
    for name in files:
        if name != "manifest.json":
            assert (first / name).read_bytes() == (second / name).read_bytes(), name
    manifests = [json.loads((bundle / "manifest.json").read_text()) for bundle in (first, second)]
    assert manifests[0]["created"] <= manifests[1]["created"]
    assert _without(manifests[0], TIMESTAMPS) == _without(manifests[1], TIMESTAMPS)


def test_a_trained_bundle_written_twice_has_the_same_weight_bytes(inherited, tiny, tmp_path):
    outs = [tmp_path / name / "warm" for name in ("a", "b")]
    for out in outs:
        _ok(_run(CliRunner(), "warmup-projector", inherited, "--data", tiny["caption"], "--out", out,
                 "--max-steps", "2", "--batch-size", "4", "--seed", "5"))
    assert (outs[0] / "connector.safetensors").read_bytes() == (outs[1] / "connector.safetensors").read_bytes()
    assert (outs[0] / "vpg.safetensors").read_bytes() == (outs[1] / "vpg.safetensors").read_bytes()
    manifests = [json.loads((out / "manifest.json").read_text()) for out in outs]
    for manifest in manifests:
        manifest["metrics"]["train"] = _without(manifest["metrics"]["train"], CLOCK_FIELDS)
    assert _without(manifests[0], TIMESTAMPS) == _without(manifests[1], TIMESTAMPS)


def test_ctrl_c_while_python_shuts_down_after_a_command_prints_no_traceback(inherited, tmp_path):
    """The interrupt is sent from an exit handler that runs while torch's own run (deterministic stand-in for
    a Ctrl-C typed just as export ends): the process ends on SIGINT, silently; the export is complete."""
    out = tmp_path / "hf"
    script = ("import atexit, os, signal, sys, time\n"
              "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(1)))\n"
              "from vpgtrans.cli import main\n"
              f"sys.argv = ['vpgtrans', 'export', {str(inherited)!r}, '--out', {str(out)!r}]\n"
              "main()\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert "Traceback" not in result.stderr and "KeyboardInterrupt" not in result.stderr, result.stderr
    assert result.returncode == -signal.SIGINT
    assert (out / "vpgtrans_export.json").is_file()
