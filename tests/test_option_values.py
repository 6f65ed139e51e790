"""Numeric options are checked at the boundary with their real domain: one line, exit 2, nothing written."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from test_cli import _run, _user_error

TRAIN = [  # (options, what the one line names)
    (["--epochs", "inf"], "epochs must be a finite number > 0"),
    (["--epochs", "-1"], "epochs must be a finite number > 0"),
    (["--seed", str(2**64)], "seed must be in [0, 2**32)"),
    (["--seed", "-3"], "seed must be in [0, 2**32)"),
    (["--max-text-len", "0"], "max_text_len must be >= 1"),
    (["--lr", "inf"], "lr must be a finite number > 0"),
    (["--lr", "nan"], "lr must be a finite number > 0"),
    (["--max-steps", "-2"], "max_steps must be >= 1"),
    (["--batch-size", "0"], "batch_size and grad_accum must be >= 1"),
]


@pytest.mark.parametrize("options, expected", TRAIN)
def test_training_options_outside_their_domain(inherited, tiny, tmp_path, options, expected):
    _user_error(_run(CliRunner(), "warmup-projector", inherited, "--data", tiny["caption"], "--out", tmp_path / "o",
                     *options), expected)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("options, expected", [
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--num-beams", "0"], "--num-beams must be >= 1"),
    (["--max-samples", "-1"], "--max-samples must be >= 1"),
])
def test_eval_options_outside_their_domain(inherited, tiny, tmp_path, options, expected):
    _user_error(_run(CliRunner(), "eval", inherited, "--data", tiny["caption"], "--out", tmp_path / "s.json",
                     *options), expected)
    assert not (tmp_path / "s.json").exists()


def test_ridge_outside_its_domain(tiny, tmp_path):
    for value in ("inf", "-1"):
        _user_error(_run(CliRunner(), "inherit", "--source", tiny["source"], "--target-llm", tiny["llama"], "--out",
                         tmp_path / "o", "--ridge", value), "ridge must be a finite number >= 0")
    assert not (tmp_path / "o").exists()
