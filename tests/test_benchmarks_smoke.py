"""Smoke-sized runs of the benchmarks (so they cannot rot) and the speed-up arithmetic on hand-made curves."""

from __future__ import annotations

import json
import sys

import pytest

from benchmarks import curves


# ------------------------------------------------------------------------------------------- curves

SCRATCH = [(0, 0.0), (100, 0.2), (200, 0.5), (300, 0.7), (400, 0.65), (500, 0.7)]
VPGTRANS = [(0, 0.1), (20, 0.6), (40, 0.69), (60, 0.72), (80, 0.8)]


def test_best_and_steps_to_best_take_the_first_maximum():
    assert curves.best(SCRATCH) == 0.7
    assert curves.steps_to_best(SCRATCH) == 300  # 500 ties it; the first step at the best counts


def test_paper_speedup_needs_vpgtrans_to_exceed_the_best():
    result = curves.speedup(SCRATCH, VPGTRANS)
    # 0.69 < 0.7 at step 40; 0.72 > 0.7 at step 60: 300 / 60
    assert result == {"scratch_best": 0.7, "scratch_steps": 300, "vpgtrans_steps": 60, "speedup": 5.0}
    assert curves.speedup(SCRATCH, [(0, 0.1), (50, 0.7)])["vpgtrans_steps"] is None  # equal is not exceeding
    assert curves.speedup(SCRATCH, [(0, 0.1), (50, 0.7)])["speedup"] is None


def test_smooth_is_a_trailing_mean():
    assert curves.smooth([(0, 0.0), (1, 3.0), (2, 6.0), (3, 0.0)], window=3) == \
        [(0, 0.0), (1, 1.5), (2, 3.0), (3, 3.0)]
    assert curves.smooth(SCRATCH, window=1) == SCRATCH
    with pytest.raises(ValueError):
        curves.smooth(SCRATCH, window=0)


def test_threshold_speedup_on_smoothed_curves():
    # scratch smoothed (window 2): 0, .1, .35, .6, .675, .675 -> best .675; 95% = .64125 -> step 400
    # vpgtrans smoothed: .1, .35, .645, .705, .76 -> first >= .64125 at step 40
    result = curves.threshold_speedup(SCRATCH, VPGTRANS, 0.95, window=2)
    assert result["threshold"] == pytest.approx(0.95 * 0.675)
    assert (result["scratch_steps"], result["vpgtrans_steps"]) == (400, 40)
    assert result["speedup"] == pytest.approx(10.0)
    full = curves.threshold_speedup(SCRATCH, VPGTRANS, 1.0, window=2)
    assert (full["scratch_steps"], full["vpgtrans_steps"], full["speedup"]) == (400, 60, pytest.approx(400 / 60))


def test_a_step_zero_crossing_counts_as_one_step():
    assert curves.speedup(SCRATCH, [(0, 0.9)])["speedup"] == 300.0


def _run(target, arm, seed, points, cider=0.5, vqa=0.4):
    return {"target": target, "arm": arm, "seed": seed,
            "curve": [{"step": s, "samples": s * 8, "stage": "x", "cider": c} for s, c in points],
            "final": {"caption": {"cider": cider}, "vqa": {"vqa_accuracy": vqa}}}


def test_summarize_reports_speedups_data_fraction_and_spread():
    from benchmarks.transfer_speedup import SpeedupConfig, summarize

    cfg = SpeedupConfig(targets=["opt-l"], seeds=[0, 1], ablations=["no-warmup"], ablation_seed=0, batch_size=8)
    runs = [_run("opt-l", "scratch", 0, SCRATCH, cider=0.7), _run("opt-l", "vpgtrans", 0, VPGTRANS, cider=0.8),
            _run("opt-l", "scratch", 1, SCRATCH, cider=0.7), _run("opt-l", "vpgtrans", 1, [(0, 0.1), (30, 0.9)], cider=0.9),
            _run("opt-l", "no-warmup", 0, [(0, 0.0), (100, 0.1)], cider=0.1)]
    block = summarize(runs, cfg)["opt-l"]
    assert block["scratch"]["steps_to_best"]["mean"] == 300
    headline, ablation = block["rows"]
    assert headline["arm"] == "vpgtrans" and headline["seeds"] == [0, 1]
    assert [c["speedup"] for c in headline["per_seed"]] == [5.0, 10.0]
    assert headline["speedup"]["mean"] == 7.5 and headline["speedup"]["std"] == pytest.approx(12.5 ** 0.5)
    assert headline["data_fraction"]["min"] == pytest.approx(30 / 300) and headline["data_fraction"]["max"] == pytest.approx(60 / 300)
    assert headline["final_cider"]["mean"] == pytest.approx(0.85)
    assert ablation["arm"] == "no-warmup" and ablation["speedup"]["mean"] is None and ablation["speedup"]["missing"] == 1


# ---------------------------------------------------------------------------------------- converter

def test_converter_fit_smoke(tmp_path):
    import numpy as np
    import torch

    from benchmarks import converter_fit

    out = tmp_path / "converter.json"
    result = converter_fit.main(["--smoke", "--no-plot", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert set(saved) >= {"config", "machine", "closed_form", "sgd", "speedup", "target_met"}
    cfg = converter_fit.ConverterBenchConfig(**saved["config"])
    assert saved["sgd"]["rows"] == cfg.epochs * cfg.corpus_tokens and len(saved["sgd"]["epochs"]) == cfg.epochs
    assert saved["speedup"] == pytest.approx(saved["sgd"]["seconds"] / saved["closed_form"]["seconds"])
    # The closed form's held-out cosine, recomputed independently (numpy weighted ridge on the same tables).
    tables = converter_fit.make_tables(cfg)
    x = tables["source"][tables["train_source_ids"]].double().numpy()
    y = tables["target"][tables["train_target_ids"]].double().numpy()
    stream = converter_fit.corpus_stream(tables["frequency"], cfg.corpus_tokens, torch.Generator().manual_seed(cfg.seed + 1))
    w = 1 + np.log1p(np.bincount(stream.numpy(), minlength=len(x)))
    xa = np.hstack([x, np.ones((len(x), 1))])
    gram = xa.T @ (xa * w[:, None])
    gram[:-1, :-1] += cfg.ridge * np.mean(np.diag(gram)[:-1]) * np.eye(x.shape[1])
    solution = np.linalg.solve(gram, xa.T @ (y * w[:, None]))
    xh = tables["source"][tables["heldout_source_ids"]].double().numpy()
    yh = tables["target"][tables["heldout_target_ids"]].double().numpy()
    pred = xh @ solution[:-1] + solution[-1]
    cos = np.mean(np.sum(pred * yh, 1) / np.linalg.norm(pred, axis=1) / np.linalg.norm(yh, axis=1))
    assert saved["closed_form"]["heldout_cosine"] == pytest.approx(cos, abs=1e-6)
    assert result["closed_form"]["heldout_cosine"] > 0.5  # the map is linear + noise: the fit finds it


def test_converter_tables_hold_a_noiseless_linear_map():
    from benchmarks import converter_fit

    cfg = converter_fit.ConverterBenchConfig(**{**converter_fit.SMOKE, "noise": 0.0})
    tables = converter_fit.make_tables(cfg)
    assert tables["source"].shape == (cfg.source_vocab, cfg.source_dim)
    assert tables["target"].shape == (cfg.target_vocab, cfg.target_dim)
    assert len(tables["heldout_source_ids"]) == round(cfg.shared * cfg.heldout_fraction)
    assert converter_fit.fit_closed_form(cfg, tables)["heldout_cosine"] > 0.999


# ----------------------------------------------------------------------------------------- speed-up

def test_transfer_speedup_smoke(tmp_path):
    from benchmarks import transfer_speedup

    out = tmp_path / "speedup.json"
    transfer_speedup.main(["--smoke", "--no-plot", "--out", str(out), "--targets", "llama-s",
                           "--work-dir", str(tmp_path / "runs")])
    saved = json.loads(out.read_text())
    cfg = saved["config"]
    arms = {(r["target"], r["arm"], r["seed"]) for r in saved["runs"]}
    assert arms == {("llama-s", arm, 0) for arm in ("scratch", "vpgtrans", *transfer_speedup.ABLATIONS)}
    for run in saved["runs"]:
        steps = [p["step"] for p in run["curve"]]
        assert steps == sorted(steps) and steps[0] == 0
        expected = cfg["scratch_steps"] if run["arm"] == "scratch" else \
            cfg["finetune_steps"] + (0 if run["arm"] == "no-warmup" else cfg["warmup_steps"])
        assert steps[-1] == expected == run["steps"]
        assert {"cider", "bleu4"} <= set(run["final"]["caption"]) and "vqa_accuracy" in run["final"]["vqa"]
        if run["arm"] in ("vpgtrans", "no-warmup", "warmup-1x"):
            assert run["converter_heldout_cosine"] is not None
    block = saved["summary"]["llama-s"]
    assert [row["arm"] for row in block["rows"]] == ["vpgtrans", *transfer_speedup.ABLATIONS]
    by_arm = {r["arm"]: r for r in saved["runs"]}
    for row in block["rows"]:  # the summary's numbers are the curves' numbers
        expected = curves.speedup(*[[(p["step"], p["cider"]) for p in by_arm[a]["curve"]] for a in ("scratch", row["arm"])])
        assert row["per_seed"][0]["speedup"] == expected["speedup"]
        assert row["final_cider"]["mean"] == by_arm[row["arm"]]["final"]["caption"]["cider"]
    assert {p["stage"] for p in by_arm["no-warmup"]["curve"]} == {"finetune"}
    assert {p["stage"] for p in by_arm["vpgtrans"]["curve"]} == {"warmup", "finetune"}
    # The warm-up of the warmup-1x arm runs at the normal lr, VPGTrans's at 5x.
    assert by_arm["warmup-1x"]["lr"] == {"warmup": cfg["lr"], "finetune": cfg["lr"]}
    assert by_arm["vpgtrans"]["lr"] == {"warmup": 5 * cfg["lr"], "finetune": cfg["lr"]}


def test_benchmarks_say_what_to_install_without_matplotlib(monkeypatch):
    from benchmarks import common, converter_fit

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(common.MissingExtra, match=r"pip install -e '\.\[bench\]'"):
        converter_fit.main(["--smoke"])


def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    from benchmarks import converter_fit

    result = converter_fit.main(["--smoke", "--out", str(tmp_path / "c.json"), "--epochs", "1"])
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and result["plot"] == str(tmp_path / "c.png")
