"""benchmarks/lavin_choice.py at smoke size (tiny random models, a few steps): the plumbing of every arm,
and the summary's numbers are the runs' numbers."""

from __future__ import annotations

import json

import pytest


def test_lavin_choice_smoke(tmp_path):
    from benchmarks import lavin_choice

    out = tmp_path / "choice.json"
    lavin_choice.main(["--smoke", "--no-plot", "--out", str(out), "--work-dir", str(tmp_path / "work")])
    saved = json.loads(out.read_text())
    cfg = saved["config"]
    assert {(r["arm"], r["seed"]) for r in saved["runs"]} == {(arm, 0) for arm in lavin_choice.ARMS}
    by_arm = {r["arm"]: r for r in saved["runs"]}
    for run in saved["runs"]:
        steps = [p["step"] for p in run["curve"]]
        assert steps == sorted(steps) and steps[0] == 0 and steps[-1] == cfg["steps"] == run["steps"]
        final = run["final"]
        assert final["samples"] == cfg["n_eval"] and final["samples_image"] + final["samples_text"] == cfg["n_eval"]
        reached = [p["step"] for p in run["curve"] if p["accuracy"] >= cfg["target_accuracy"]]
        assert run["steps_to_target"] == (reached[0] if reached else None)
        assert all(0 <= p["accuracy_norm"] <= 1 for p in run["curve"])  # the eval points' length-normalised pick
        assert run["curve"][-1]["accuracy_norm"] == final["accuracy_norm"]  # (the same rows, the same bundle)
    # The text-only arm's image questions are the lavin arm's image questions (asked without the image).
    assert by_arm["text-only"]["final"]["samples_image"] == by_arm["lavin"]["final"]["samples_image"] > 0
    # Same architecture for lavin and text-only; the BLIP-2 arm trains the VPG + projector instead.
    assert by_arm["lavin"]["trainable_params"] == by_arm["text-only"]["trainable_params"]
    assert by_arm["blip2"]["trainable_params"] != by_arm["lavin"]["trainable_params"]
    for arm, block in saved["summary"].items():
        assert block["accuracy_image"]["mean"] == pytest.approx(by_arm[arm]["final"]["accuracy_image"])
        assert block["accuracy_norm_image"]["mean"] == pytest.approx(by_arm[arm]["final"]["accuracy_norm_image"])
        assert block["generated_unparseable"]["mean"] == by_arm[arm]["final"]["generated_unparseable"]
        assert by_arm[arm]["final"]["unparseable"] == 0  # likelihood scoring always names an option
        # The lr search ran on the dev split and chose the lr every seed then trained with.
        search = saved["lr_search"][arm]
        assert block["lr"] == search["chosen"] == max(search["trials"], key=lambda t: t["accuracy"])["lr"]
        assert search["chosen_at_edge"] is None  # (a one-lr grid at smoke size)
    # The answers counted per option, by position and by option text (constant answers show as one bar),
    # beside the eval split's own answers; the default format is the options' words.
    assert cfg["choice_answer"] == "text"
    letters = {"A", "B", "C", "unparseable"}
    for run in saved["runs"]:
        for how, prefix in (("likelihood", ""), ("likelihood_norm", ""), ("generate", "generated_")):
            histogram = run["predicted_options"][how]
            assert set(histogram["by_position"]) <= letters and sum(histogram["by_position"].values()) == cfg["n_eval"]
            assert histogram["by_position"].get("unparseable", 0) == run["final"][prefix + "unparseable"]
            assert sum(histogram["by_value"].values()) == cfg["n_eval"]
        assert "unparseable" not in run["predicted_options"]["likelihood"]["by_position"]
        shares = run["predicted_options"]["likelihood"]["by_position"].values()
        assert saved["summary"][run["arm"]]["top_position_share"]["mean"] == pytest.approx(max(shares) / cfg["n_eval"])
    # chance levels by question kind, recomputed here from the eval split's own rows
    rows = [json.loads(line) for line in (tmp_path / "work" / "splits" / "eval" / "data.jsonl").read_text().splitlines()]
    image = [r for r in rows if r.get("image") is not None]
    chance = saved["eval_chance"]["image"]
    assert chance["n"] == len(image) == by_arm["lavin"]["final"]["samples_image"]
    assert chance["guessing"] == pytest.approx(sum(1 / len(r["choices"]) for r in image) / len(image))
    assert chance["best_constant"] == max(sum(r["answer"] == i for r in image) for i in range(3)) / len(image)
    answers = saved["eval_answers"]
    assert sum(answers["by_position"].values()) == cfg["n_eval"] and "unparseable" not in answers["by_position"]
    for trial in (t for search in saved["lr_search"].values() for t in search["trials"]):
        assert sum(trial["predicted_options"]["by_position"].values()) == cfg["n_dev"]
        assert sum(trial["predicted_options_norm"]["by_position"].values()) == cfg["n_dev"]
        assert {"accuracy_norm", "accuracy_norm_image", "accuracy_norm_text"} <= set(trial)
    # the docs table is the result's numbers
    text = lavin_choice.markdown(saved)
    assert text.startswith(lavin_choice.DOCS_BEGIN) and text.endswith(lavin_choice.DOCS_END)
    for arm, block in saved["summary"].items():
        row = next(line for line in text.splitlines() if line.startswith(f"| {arm} |"))
        assert f"| {block['accuracy_image']['mean']:.3f} |" in row and f"{block['trainable_params']:,}" in row
    assert (tmp_path / "work" / "runs" / "lavin-seed0-lr0.01" / "finetune" / "mma.safetensors").is_file()
    assert (tmp_path / "work" / "search" / "lavin-seed0-lr0.01" / "finetune" / "mma.safetensors").is_file()
