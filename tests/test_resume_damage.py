"""Damaged checkpoints on --resume are one line (exit 2) naming the step directory, and nothing is written."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from conftest import StopHere, stop_at
from test_cli import _run, _user_error
from vpgtrans.config import TrainConfig
from vpgtrans.stages import train as train_module
from vpgtrans.training import RunOptions

BUDGET = ["--max-steps", "6", "--batch-size", "4", "--seed", "42"]




@pytest.fixture(scope="module")
def interrupted(inherited, tiny, tmp_path_factory):
    """A warm-up (connector only) and a fine-tune (VPG + connector) stopped after step 5: checkpoints 2, 4."""
    root = tmp_path_factory.mktemp("damage")
    runs = {}
    for name, run, config in (("warmup", train_module.warmup_projector, TrainConfig.warmup(max_steps=6, batch_size=4)),
                              ("finetune", train_module.finetune, TrainConfig.finetune(max_steps=6, batch_size=4))):
        with pytest.raises(StopHere):
            run(inherited, tiny["caption"], root / name, config, progress=stop_at(5), options=RunOptions(save_every=2))
        runs[name] = root / name
    return runs


def _edit_state(step_dir, change):
    state = json.loads((step_dir / "state.json").read_text())
    change(state)
    (step_dir / "state.json").write_text(json.dumps(state))


DAMAGE = {
    "truncated-state": (lambda d, _: (d / "state.json").write_text((d / "state.json").read_text()[:100]),
                        "state.json is not valid JSON"),
    "missing-state": (lambda d, _: (d / "state.json").unlink(), "no state.json"),
    "state-is-a-list": (lambda d, _: (d / "state.json").write_text("[1, 2]"), "state.json is not a JSON object"),
    "step-is-text": (lambda d, _: _edit_state(d, lambda s: s.update(step="four")), "lacks or mistypes step (str)"),
    "no-scheduler": (lambda d, _: _edit_state(d, lambda s: s.pop("scheduler")), "scheduler (missing)"),
    "garbage-rng": (lambda d, _: _edit_state(d, lambda s: s.update(rng=[{"torch": [1, 2, 3], "python": 7}])),
                    "its RNG state cannot be restored"),
    "optimizer-of-other-parts": (lambda d, runs: shutil.copy(runs["finetune"] / "checkpoints" / d.name / "optimizer.pt",
                                                             d / "optimizer.pt"),
                                 "optimizer.pt holds parameter groups of sizes"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_newest_checkpoint_is_one_line(interrupted, inherited, tiny, tmp_path, case):
    damage, expected = DAMAGE[case]
    out = tmp_path / "run"
    shutil.copytree(interrupted["warmup"], out)
    step_dir = out / "checkpoints" / "step-000004"
    damage(step_dir, interrupted)
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    line = _user_error(_run(CliRunner(), "warmup-projector", inherited, "--data", tiny["caption"], "--out", out,
                            *BUDGET, "--save-every", "2", "--resume"), "damaged checkpoint", expected)
    assert str(step_dir) in line and "delete this step directory" in line
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before  # nothing written


def test_an_empty_step_directory_is_named_and_the_run_resumes_once_it_is_gone(interrupted, inherited, tiny, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(interrupted["warmup"], out)
    (out / "checkpoints" / "step-000006").mkdir()  # a directory with a checkpoint's name and nothing in it
    runner = CliRunner()
    args = ["warmup-projector", inherited, "--data", tiny["caption"], "--out", out, *BUDGET, "--save-every", "2",
            "--resume"]
    _user_error(_run(runner, *args), "step-000006: damaged checkpoint (no state.json)")
    (out / "checkpoints" / "step-000006").rmdir()  # what the message says to do
    result = _run(runner, *args)
    assert result.exit_code == 0, result.output
    reference = train_module.warmup_projector(inherited, tiny["caption"], tmp_path / "reference",
                                              TrainConfig.warmup(max_steps=6, batch_size=4))
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(out / "connector.safetensors"))["proj.weight"],
                       load_file(str(reference / "connector.safetensors"))["proj.weight"])
