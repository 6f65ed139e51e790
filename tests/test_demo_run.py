"""``vpgtrans demo`` says what its table can and cannot be read for: a smoke run of the pipeline and the two
untrained starts side by side, not a speed-up (its scratch arm is a short, untuned, random-Q-Former baseline).
Run end to end on the zoo's random-weight tiny models, a few steps per arm."""

from __future__ import annotations

import pytest
from rich.console import Console


@pytest.fixture(scope="module")
def summary(tmp_path_factory):
    from vpgtrans.demo.run import run_demo
    from vpgtrans.demo.zoo import build_tiny_models

    root = tmp_path_factory.mktemp("demo")
    return run_demo(out_dir=root / "run", steps={"warmup": 1, "finetune": 2}, zoo=build_tiny_models(root / "zoo"),
                    log=lambda message: None)


def _printed(summary) -> str:
    from vpgtrans.demo.run import render_summary

    console = Console(width=250, record=True, file=open("/dev/null", "w"))
    console.print(render_summary(summary))
    return " ".join(console.export_text().split())  # as read: wherever the terminal wraps the notes


def test_the_summary_says_it_is_not_a_speedup_measure(summary):
    comparable = summary["comparable"]
    assert comparable["speedup_measure"] is False
    assert comparable["fair_comparison"] == "python -m benchmarks.transfer_speedup (docs/benchmarks.md)"
    for words in ("short-budget baseline (3 steps", "lr 0.0001, not tuned", "a random Q-Former",
                  "not the paper's train-from-scratch (TFS)", "first-stage pre-training",
                  "pre-trained on the caption attributes", "No speed-up can be read from this table"):
        assert words in comparable["not_comparable"], words
    assert "the pipeline runs end to end" in comparable["shows"]


def test_the_two_untrained_starts_come_from_the_same_eval(summary):
    rows = {row["arm"]: row for row in summary["rows"]}
    random_start = rows["random VPG + projector (no training)"]
    inherited = rows["inherited VPG + converter init (no training)"]
    assert random_start["steps"] == inherited["steps"] == 0
    assert random_start["cider"] == summary["curves"]["scratch"][0]["cider"]
    assert inherited["cider"] == summary["curves"]["vpgtrans"][0]["cider"]
    assert (f"the inherited VPG scores CIDEr {inherited['cider']:.3f} against {random_start['cider']:.3f} for a "
            "random one") in summary["comparable"]["shows"]
    scratch = rows["train from scratch, short (same steps)"]
    assert scratch["steps"] == 3 and scratch["note"].startswith("NOT a fair baseline")


def test_the_printed_table_carries_the_caveat(summary):
    text = _printed(summary)
    assert "comparable?" in text
    assert "NOT a fair baseline: 3 steps at lr 0.0001 (not tuned), random Q-Former, no lr warm-up" in text
    assert "Not comparable: the scratch row with the VPGTrans rows." in text
    assert "No speed-up can be read from this table." in text
    assert ("The fair VPGTrans vs train-from-scratch comparison: python -m benchmarks.transfer_speedup "
            "(docs/benchmarks.md).") in text
