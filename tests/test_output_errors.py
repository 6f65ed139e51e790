"""Failed writes on the output side — a read-only or full file system, a name too long — are one line naming
the output (never blamed on an input), exit 2, with no partial output left. Real file systems: small tmpfs
mounts (skipped where this process may not mount, e.g. not root)."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from test_cli import _run, _user_error
from vpgtrans.config import TrainConfig
from vpgtrans.stages.train import warmup_projector


def _mount(path: Path, *options: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode})")


@pytest.fixture
def mounts(tmp_path):
    made = []

    def mount(name: str, *options: str) -> Path:
        path = tmp_path / f"{name}-{uuid.uuid4().hex[:6]}"
        _mount(path, *options)
        made.append(path)
        return path

    yield mount
    for path in made:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture(scope="module")
def trained(inherited, tiny, tmp_path_factory):
    return warmup_projector(inherited, tiny["caption"], tmp_path_factory.mktemp("out-errors") / "warmup",
                            TrainConfig.warmup(max_steps=1, batch_size=4))


def test_read_only_output_file_system(mounts, trained, tiny):
    read_only = mounts("ro", "ro", "size=1m")
    runner = CliRunner()
    for args, out in ((["inherit", "--source", tiny["source"], "--target-llm", tiny["llama"]], read_only / "b"),
                      (["warmup-projector", trained, "--data", tiny["caption"], "--max-steps", "1", "--batch-size", "4"],
                       read_only / "w"),
                      (["export", trained, "--format", "adapter"], read_only / "e"),
                      (["eval", trained, "--data", tiny["caption"], "--max-samples", "2"], read_only / "s.json")):
        _user_error(_run(runner, *args, "--out", out), str(out), "cannot write (Read-only file system)")
    assert list(read_only.iterdir()) == []


def test_full_output_file_system(mounts, trained, tiny):
    full = mounts("full", "size=16k")  # room for a manifest, not for the weights
    runner = CliRunner()
    for args, out in ((["inherit", "--source", tiny["source"], "--target-llm", tiny["llama"]], full / "b"),
                      (["export", trained, "--format", "adapter"], full / "e"),
                      (["export", trained], full / "hf")):
        line = _user_error(_run(runner, *args, "--out", out), str(out), "cannot write (No space left on device)")
        assert str(tiny["llama"]) not in line  # a full disk is never blamed on the input model
    assert list(full.iterdir()) == []  # no half bundle, no hidden temporary directory


def test_a_name_too_long_for_the_file_system(tiny, tmp_path):
    out = tmp_path / ("x" * 300)
    line = _user_error(_run(CliRunner(), "inherit", "--source", tiny["source"], "--target-llm", tiny["llama"], "--out",
                            out), str(out), "File name too long")
    assert str(tiny["llama"]) not in line and not any(tmp_path.iterdir())
