"""Inputs that would block or never end (a FIFO, a link to /dev/zero) and names the file system refuses are
refused or skipped, never waited on. The CLI runs in a subprocess with a timeout: a hang fails the test."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from vpgtrans.data import load_rows

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs (POSIX)")


def _cli(*args, timeout=120):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "vpgtrans", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _one_line(done, *fragments):
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_a_data_file_that_never_ends_is_refused(inherited, tmp_path, kind):
    data = tmp_path / "data"
    data.mkdir()
    if kind == "fifo":
        os.mkfifo(data / "data.jsonl")
    else:
        (data / "data.jsonl").symlink_to("/dev/zero")
    done = _cli("warmup-projector", inherited, "--data", data, "--out", tmp_path / "o", "--max-steps", "1")
    _one_line(done, "data.jsonl: not a regular file")
    assert not (tmp_path / "o").exists()


def test_images_that_would_block_or_cannot_be_named_are_skipped_and_counted(tiny, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny["caption"], data)
    rows = [json.loads(line) for line in (data / "data.jsonl").read_text().splitlines()]
    os.mkfifo(data / "images" / "fifo.png")
    rows[0]["image"] = "images/fifo.png"
    rows[1]["image"] = "images/" + "x" * 300 + ".png"  # a path component over 255 bytes
    (data / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    dataset, task, stats = load_rows(data)
    assert task == "caption" and len(dataset) == len(rows) - 2 and stats.skipped_missing_image == 2
    assert all(not row["image"].endswith("fifo.png") for row in dataset)


def test_open_image_refuses_a_fifo_instead_of_waiting(tmp_path):
    from vpgtrans.images import open_image

    os.mkfifo(tmp_path / "x.png")
    with pytest.raises(ValueError, match="not a regular file"):
        open_image(str(tmp_path / "x.png"))
