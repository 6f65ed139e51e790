"""One training run writes an output at a time (issue 16, item 8): a second run on the same --out is one line
at once, and the lock leaves nothing behind."""

from __future__ import annotations

import fcntl

from typer.testing import CliRunner

from test_cli import _ok, _run, _user_error


def test_a_second_run_on_the_same_out_is_refused_at_once(inherited, tiny, tmp_path):
    out = tmp_path / "run"
    args = ["warmup-projector", inherited, "--data", tiny["caption"], "--out", out, "--max-steps", "1",
            "--batch-size", "4"]
    lock = tmp_path / ".run.lock"
    with open(lock, "a+") as held:  # what a running writer holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        _user_error(_run(CliRunner(), *args), "another vpgtrans run is writing it", str(lock))
        assert not out.exists()
    lock.unlink()
    _ok(_run(CliRunner(), *args))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no lock file left behind
