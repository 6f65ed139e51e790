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


def _run(target, arm, seed, points, cider=0.5, vqa=0.4, n_train=100, seconds_per_sample=0.01):
    """A hand-made run: points are (samples, score); training seconds proportional to samples."""
    return {"target": target, "arm": arm, "seed": seed, "warmup_epochs": 1.0 if arm == "vpgtrans" else 0.0,
            "curve": [{"samples": x, "epoch": x / n_train, "train_seconds": x * seconds_per_sample, "cider": c}
                      for x, c in points],
            "plateau": {"plateaued": True, "relative_gain_in_last": 0.0},
            "final": {"caption": {"cider": cider}, "vqa": {"vqa_accuracy": vqa}}}


# every 50 samples; n_train = 100, so whole epochs at 100, 200, ...
GRID_SCRATCH = [(0, 0.0), (50, 0.2), (100, 0.4), (150, 0.5), (200, 0.6), (250, 0.65), (300, 0.7), (350, 0.6),
                (400, 0.7)]
GRID_VPGTRANS = [(0, 0.1), (50, 0.3), (100, 0.5), (150, 0.6), (200, 0.72), (250, 0.75), (300, 0.7), (350, 0.7),
                 (400, 0.8)]


def test_speedups_in_epochs_samples_and_seconds():
    from benchmarks.transfer_speedup import SpeedupConfig, speedups

    cfg = SpeedupConfig(smooth_window=1)
    # the vpgtrans arm's seconds run twice as slow per sample: the seconds ratio is half the samples ratio
    out = speedups(_run("t", "scratch", 0, GRID_SCRATCH), _run("t", "vpgtrans", 0, GRID_VPGTRANS, seconds_per_sample=0.02),
                   cfg, n_train=100)
    # samples, to best: scratch first at 0.7 at 300; vpgtrans first above 0.7 at 200 (0.72)
    assert out["samples"]["at_best"] == {"threshold": 0.7, "baseline": 300, "arm": 200, "speedup": 1.5}
    assert out["seconds"]["at_best"]["speedup"] == pytest.approx(3.0 / 4.0)
    # samples, to 95% (window 1 = raw): 0.665 -> scratch at 300, vpgtrans at 200
    assert (out["samples"]["at_95"]["baseline"], out["samples"]["at_95"]["arm"]) == (300, 200)
    # epochs: scratch per epoch 0.4, 0.6, 0.7, 0.7 -> best at epoch 3; vpgtrans 0.5, 0.72 -> above 0.7 at epoch 2
    assert out["epochs"]["at_best"] == {"threshold": 0.7, "baseline": 3, "arm": 2, "speedup": 1.5}
    # 95% of 0.7 = 0.665: scratch reaches it at epoch 3, vpgtrans at epoch 2
    assert out["epochs"]["at_95"]["speedup"] == 1.5
    never = speedups(_run("t", "scratch", 0, GRID_SCRATCH), _run("t", "x", 0, [(0, 0.1), (100, 0.7)]), cfg, 100)
    assert never["samples"]["at_best"]["speedup"] is None and never["epochs"]["at_best"]["arm"] is None


def test_summarize_keys_the_headline_by_measure_and_recomputes_from_runs():
    from benchmarks.transfer_speedup import SpeedupConfig, speedups, summarize

    cfg = SpeedupConfig(targets=["opt-l"], seeds=[0, 1], ablations=["no-warmup"], ablation_seed=0, smooth_window=1)
    faster = [(x, min(1.0, s + 0.2)) for x, s in GRID_VPGTRANS]
    runs = [_run("opt-l", "scratch", 0, GRID_SCRATCH), _run("opt-l", "vpgtrans", 0, GRID_VPGTRANS, cider=0.8),
            _run("opt-l", "scratch", 1, GRID_SCRATCH), _run("opt-l", "vpgtrans", 1, faster, cider=0.9),
            _run("opt-l", "scratch-random", 0, GRID_SCRATCH), _run("opt-l", "no-warmup", 0, [(0, 0.0), (400, 0.1)])]
    block = summarize(runs, cfg, n_train=100)["opt-l"]
    per_seed = [speedups(runs[2 * s], runs[2 * s + 1], cfg, 100) for s in (0, 1)]
    for unit in ("epochs", "samples", "seconds"):
        expected = [p[unit]["at_best"]["speedup"] for p in per_seed]
        assert block["speedup"][unit] == pytest.approx(sum(expected) / 2)
    # seed 1: 0.7 at 100 samples only equals scratch's best; 0.8 at 150 exceeds it -> 300 / 150
    assert per_seed[1]["samples"]["at_best"]["speedup"] == 2.0
    rows = {(r["arm"], r["baseline"]): r for r in block["rows"]}
    assert set(rows) == {("vpgtrans", "scratch"), ("vpgtrans", "scratch-random"), ("scratch", "scratch-random"),
                         ("no-warmup", "scratch")}
    assert rows[("vpgtrans", "scratch")]["final_cider"]["mean"] == pytest.approx(0.85)
    assert rows[("vpgtrans", "scratch-random")]["seeds"] == [0]
    assert rows[("no-warmup", "scratch")]["samples"]["at_best"]["missing"] == 1
    assert block["baselines"]["scratch"]["samples_to_best"]["mean"] == 300
    # the warmed-up arm's score where its one-epoch warm-up ends (100 samples), over its seeds
    at_epoch_1 = [dict(GRID_VPGTRANS)[100], dict(faster)[100]]
    assert set(block["after_warmup"]) == {"vpgtrans"}
    assert block["after_warmup"]["vpgtrans"]["mean"] == pytest.approx(sum(at_epoch_1) / 2)


def test_only_the_lists_a_config_allows_empty_take_no_values(capsys):
    """``--ablations`` alone means no ablation; ``--seeds`` / ``--targets`` alone stay argparse errors (exit 2)."""
    from benchmarks.common import result_parser
    from benchmarks.transfer_speedup import SpeedupConfig

    parser = result_parser("transfer_speedup", "doc", "smoke", SpeedupConfig)
    assert parser.parse_args(["--ablations"]).ablations == []
    for flag in ("--seeds", "--targets", "--lr-grid"):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([flag])
        assert exit_info.value.code == 2
    assert "expected at least one argument" in capsys.readouterr().err


def test_plan_steps_refuses_a_grid_the_arms_cannot_share():
    from benchmarks.transfer_speedup import SpeedupConfig, plan_steps
    from vpgtrans.errors import VpgtransError

    plan = plan_steps(SpeedupConfig(), 6000)
    assert (plan["epoch_steps"], plan["total_steps"], plan["eval_every"], plan["warmup_epochs"]) == (150, 3000, 30, 1.0)
    with pytest.raises(VpgtransError, match="not a whole number of eval_every_samples intervals"):
        plan_steps(SpeedupConfig(eval_every_samples=1600), 6000)
    with pytest.raises(VpgtransError, match="not a multiple of batch_size"):
        plan_steps(SpeedupConfig(eval_every_samples=1210), 6000)


# ---------------------------------------------------------------------------------------- converter

def test_lr_search_extends_the_grid_beyond_an_edge_pick_only():
    from benchmarks.common import next_lr, search_lr_grid

    grid = [1e-3, 2e-3, 4e-3, 8e-3]
    assert next_lr(dict(zip(grid, [1, 2, 3, 4]))) == pytest.approx(1.6e-2)  # top pick: one more doubling up
    assert next_lr(dict(zip(grid, [4, 3, 2, 1]))) == pytest.approx(5e-4)  # bottom pick: one halving down
    assert next_lr(dict(zip(grid, [1, 4, 3, 2]))) is None  # an inside pick ends the search
    assert next_lr({1e-3: 1.0}) is None  # one lr: no grid to extend
    assert next_lr({3e-3: 2.0, 1e-3: 1.0}) == pytest.approx(9e-3)  # the grid's own end ratio, in any order
    assert next_lr({1e-3: 0.5, 2e-3: 1.0, 4e-3: 1.0}) is None  # a tie goes to the smaller lr: inside here

    def searched(curve, extend):  # score rising with lr up to a peak at 3.2e-2
        ran = []
        found = search_lr_grid(grid, lambda lr: ran.append(lr) or {"lr": lr, "s": -abs(lr - 3.2e-2)},
                               lambda t: t["s"], extend)
        return found, ran

    found, ran = searched(None, 2)
    assert ran == [1e-3, 2e-3, 4e-3, 8e-3, 0.016, 0.032] and found["extended"] == [0.016, 0.032]
    assert found["chosen_lr"] == 0.032 and found["at_grid_edge"]  # the limit reached: the pick is still the top
    assert [t["lr"] for t in found["trials"]] == found["grid"] == sorted(found["grid"])
    found, ran = searched(None, 3)
    assert ran[-1] == 0.064 and found["chosen_lr"] == 0.032 and not found["at_grid_edge"]
    found, ran = searched(None, 0)
    assert ran == grid and found["chosen_lr"] == 8e-3 and found["at_grid_edge"] and found["extended"] == []


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
    assert saved["sgd"]["steps"] == cfg.epochs * -(-cfg.corpus_tokens // cfg.batch_size)
    # The zoo case: pairs the library's pairing makes, restricted to tokens the captions use; the closed form's
    # held-out cosine recomputed with numpy on the same tables.
    assert [(c["source"], c["target"]) for c in saved["zoo_cases"]] == [("opt-s", "opt-l"), ("opt-s", "llama-s")]
    for case in saved["zoo_cases"]:
        pairs = case["pairs"]
        assert pairs["train"] + pairs["heldout"] == pairs["used_in_captions"] <= pairs["paired"]
        assert case["sgd"]["steps"] == saved["sgd"]["steps"] and case["sgd"]["rows"] == saved["sgd"]["rows"]
        assert case["cosine_gap"] == pytest.approx(case["closed_form"]["heldout_cosine"] - case["sgd"]["heldout_cosine"])
    # The docs table is the result's numbers.
    text = converter_fit.markdown(saved)
    assert text.startswith(converter_fit.DOCS_BEGIN) and text.endswith(converter_fit.DOCS_END)
    assert f"| {saved['closed_form']['heldout_cosine']:.4f} | {saved['speedup']:.1f}x |" in text
    assert f"{saved['sgd']['steps']} steps | {saved['sgd']['seconds']:.2f} | {saved['sgd']['heldout_cosine']:.4f} |" in text


def test_sgd_batches_summed_per_token_equal_the_row_by_row_mean():
    import torch

    from benchmarks import converter_fit

    cfg = converter_fit.ConverterBenchConfig(**{**converter_fit.SMOKE, "epochs": 1, "corpus_tokens": 300,
                                                "batch_size": 300})
    tables = converter_fit.make_tables(cfg)
    ours = converter_fit.fit_sgd(cfg, tables)
    # one step by hand, every row its own term
    torch.manual_seed(cfg.seed)
    linear = torch.nn.Linear(cfg.source_dim, cfg.target_dim)
    stream = converter_fit.corpus_stream(tables["frequency"], 300, torch.Generator().manual_seed(cfg.seed + 1))
    x = tables["source"][tables["train_source_ids"]][stream]
    y = tables["target"][tables["train_target_ids"]][stream]
    loss = (1 - torch.nn.functional.cosine_similarity(linear(x), y, dim=-1)).mean()
    loss.backward()
    with torch.no_grad():
        for p in linear.parameters():
            p -= cfg.lr * p.grad
        cosine = converter_fit.heldout_cosine(linear.weight, linear.bias, tables)
    assert ours["steps"] == 1 and ours["heldout_cosine"] == pytest.approx(cosine, abs=1e-5)


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
    from benchmarks.transfer_speedup import speedups

    # one process runs only the scratch arm (no ablation); the full run after it on the same work dir reads
    # that arm's runs and lr-search trials back
    part = tmp_path / "scratch.json"
    transfer_speedup.main(["--smoke", "--no-plot", "--out", str(part), "--targets", "llama-s", "--arms", "scratch",
                           "--ablations", "--work-dir", str(tmp_path / "runs")])
    scratch_only = json.loads(part.read_text())
    assert scratch_only["source_build"] is None  # no arm of that call inherited the source
    assert {r["arm"] for r in scratch_only["runs"]} == {"scratch"} and len(scratch_only["runs"]) == 1
    assert [s["arm"] for s in scratch_only["lr_search"]] == ["scratch"]
    out = tmp_path / "speedup.json"
    transfer_speedup.main(["--smoke", "--no-plot", "--out", str(out), "--targets", "llama-s",
                           "--work-dir", str(tmp_path / "runs")])
    saved = json.loads(out.read_text())
    assert saved["records"]["reused"] == 1 + len(scratch_only["lr_search"][0]["trials"])
    assert next(r for r in saved["runs"] if r["arm"] == "scratch") == scratch_only["runs"][0]
    # the inherited arms' source: the zoo's source recipe trained 2 steps (a stronger source, issue 13)
    assert saved["source_build"]["dir"] == "source-blip2-opt-s-long" and saved["source_build"]["steps"] == 2
    cfg, plan = saved["config"], saved["plan"]
    # the records are the runs: no run's bundles are left behind (a killed run's would be in a later run's way)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["caption_dev", "records"]
    arms = {(r["target"], r["arm"], r["seed"]) for r in saved["runs"]}
    assert arms == {("llama-s", arm, 0) for arm in (*transfer_speedup.ARMS, *transfer_speedup.ABLATIONS)}
    assert (plan["n_train"], plan["epoch_steps"]) == (16, 16 // cfg["batch_size"])
    budget = int(cfg["epochs"] * plan["n_train"])
    for run in saved["runs"]:
        # the interface: every run names its arm, init, grid, warm-up length, lr search and plateau evidence
        assert run["init"] == transfer_speedup.INIT[run["arm"]] and run["eval_every_samples"] == cfg["eval_every_samples"]
        long = transfer_speedup.LONG_FACTOR if run["arm"] == "scratch-long" else 1
        assert run["total_samples"] == long * budget
        grid = list(range(0, long * budget + 1, cfg["eval_every_samples"]))
        assert [p["samples"] for p in run["curve"]] == grid  # one grid for every arm, warm-up counted
        seconds = [p["train_seconds"] for p in run["curve"]]
        assert seconds[0] == 0 and seconds == sorted(seconds)
        assert run["warmup_epochs"] == (1.0 if run["arm"] in ("vpgtrans", "no-converter", "warmup-1x", "frozen-vpg")
                                        else 0.0)
        assert run["lr_search"]["chosen_lr"] == run["lr"] and run["lr_search"]["split"] == "dev"
        assert run["lr_search"]["searched_arm"] == {"scratch-long": "scratch", "scratch-random": "scratch-random",
                                                    "scratch": "scratch"}.get(run["arm"], "vpgtrans")
        assert {"plateaued", "relative_gain_in_last", "slope_per_epoch_in_last"} <= set(run["plateau"])
        cosine = run["stage_lrs"]["scratch" if run["arm"] == "scratch-random" else "finetune"]
        assert cosine == {"lr": run["lr"], "min_lr": pytest.approx(run["lr"] * cfg["min_lr_ratio"]),
                          "warmup_steps": cfg["lr_warmup_samples"] // cfg["batch_size"], "steps": cosine["steps"],
                          "trainable": ["connector"] if run["arm"] == "frozen-vpg" else ["vpg", "connector"]}
        if "warmup" in run["stage_lrs"]:  # one epoch, constant, at 5x (1x for warmup-1x)
            multiplier = 1.0 if run["arm"] == "warmup-1x" else cfg["warmup_lr_multiplier"]
            assert run["stage_lrs"]["warmup"] == {"lr": pytest.approx(multiplier * run["lr"]), "min_lr": None,
                                                  "warmup_steps": 0, "steps": plan["epoch_steps"],
                                                  "trainable": ["connector"]}
        assert {"cider", "bleu4"} <= set(run["final"]["caption"]) and "vqa_accuracy" in run["final"]["vqa"]
    searches = {(s["target"], s["arm"]) for s in saved["lr_search"]}
    assert searches == {("llama-s", arm) for arm in transfer_speedup.SEARCHED}
    for search in saved["lr_search"]:
        assert [t["lr"] for t in search["trials"]] == cfg["lr_grid"]
        assert search["chosen_lr"] == max(search["trials"], key=lambda t: t["dev_best_smoothed"])["lr"]
    # the summary's numbers are the runs' numbers
    by_arm = {r["arm"]: r for r in saved["runs"]}
    block = saved["summary"]["llama-s"]
    headline = speedups(by_arm["scratch"], by_arm["vpgtrans"], transfer_speedup.SpeedupConfig(**cfg), plan["n_train"])
    assert set(block["speedup"]) == {"epochs", "samples", "seconds"}
    rows = {(r["arm"], r["baseline"]): r for r in block["rows"]}
    against_long = speedups(by_arm["scratch-long"], by_arm["vpgtrans"], transfer_speedup.SpeedupConfig(**cfg),
                            plan["n_train"])
    assert rows[("vpgtrans", "scratch-long")]["samples"]["at_best"]["mean"] == against_long["samples"]["at_best"]["speedup"]
    assert ("scratch-long", "scratch") not in rows and "scratch-long" in block["baselines"]
    # the VPG as inherited: each warmed-up arm's score where its one-epoch warm-up ends, read off its curve
    warmed = {"vpgtrans", "no-converter", "warmup-1x", "frozen-vpg"}
    assert set(block["after_warmup"]) == warmed
    for arm in warmed:
        at = [p["cider"] for p in by_arm[arm]["curve"] if p["samples"] == plan["n_train"]]
        assert len(at) == 1 and block["after_warmup"][arm]["mean"] == at[0]
    epochs = [p for p in by_arm["scratch"]["curve"] if p["samples"] and p["samples"] % plan["n_train"] == 0]
    top = max(p["cider"] for p in epochs)
    assert block["baselines"]["scratch"]["epoch_of_best"]["mean"] == next(
        p["samples"] // plan["n_train"] for p in epochs if p["cider"] == top)
    for unit in ("epochs", "samples", "seconds"):
        assert block["speedup"][unit] == headline[unit].get("at_best", {}).get("speedup")
    assert saved["smoke"] is True
    # a second process on the same work dir trains nothing: every run and search trial is read back
    again = tmp_path / "again.json"
    transfer_speedup.main(["--smoke", "--no-plot", "--out", str(again), "--targets", "llama-s",
                           "--work-dir", str(tmp_path / "runs")])
    resumed = json.loads(again.read_text())
    trials = sum(len(s["trials"]) for s in saved["lr_search"])
    assert resumed["records"]["reused"] == len(saved["runs"]) + trials
    assert resumed["records"]["identity"] == saved["records"]["identity"]
    assert resumed["runs"] == saved["runs"] and resumed["summary"] == saved["summary"]
    # a wider lr grid trains only the new lr's trials (and the runs of arms whose pick changed)
    wider = tmp_path / "wider.json"
    transfer_speedup.main(["--smoke", "--no-plot", "--out", str(wider), "--targets", "llama-s",
                           "--work-dir", str(tmp_path / "runs"),
                           "--lr-grid", *map(str, cfg["lr_grid"]), "3e-3"])
    widened = json.loads(wider.read_text())
    changed = {s["arm"] for s in widened["lr_search"]} - {
        s["arm"] for s in widened["lr_search"] if s["chosen_lr"] == next(
            x["chosen_lr"] for x in saved["lr_search"] if x["arm"] == s["arm"])}
    kept = [r for r in widened["runs"] if transfer_speedup.searched_arm(r["arm"]) not in changed]
    assert widened["records"]["reused"] == trials + len(kept)
    assert widened["records"]["identity"] == saved["records"]["identity"]


def test_docs_section_says_to_be_remeasured_without_a_full_run(tmp_path):
    from benchmarks import transfer_speedup

    text = transfer_speedup.markdown(None, transfer_speedup.SpeedupConfig())
    assert text.startswith(transfer_speedup.DOCS_BEGIN) and text.endswith(transfer_speedup.DOCS_END)
    assert "to be re-measured" in text and transfer_speedup.PAPER_MEASURE in text
    doc = tmp_path / "b.md"
    doc.write_text(f"before\n{transfer_speedup.DOCS_BEGIN}\nold\n{transfer_speedup.DOCS_END}\nafter\n")
    transfer_speedup.write_docs(text, doc)
    assert doc.read_text() == f"before\n{text}\nafter\n"


def test_benchmarks_say_what_to_install_without_matplotlib(monkeypatch):
    from benchmarks import common, converter_fit

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(common.MissingExtra, match=r"pip install -e '\.\[bench\]'"):
        converter_fit.main(["--smoke"])


def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    from benchmarks import converter_fit

    result = converter_fit.main(["--smoke", "--out", str(tmp_path / "c.json"), "--epochs", "1", "--zoo-pairs", ""])
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and result["plot"] == str(tmp_path / "c.png")


def test_run_records_reuse_only_runs_of_the_same_identity(tmp_path):
    from benchmarks.common import RunRecords

    calls = []

    def train(value):
        calls.append(value)
        return {"value": value}

    first = RunRecords(tmp_path, {"lr": 1e-3, "zoo": "a"})
    assert first.get("run-a", lambda: train(1))["value"] == 1
    # the same identity (key order aside): read back, not trained, the code version kept from the first time
    same = RunRecords(tmp_path, {"zoo": "a", "lr": 1e-3})
    run = same.get("run-a", lambda: train(2))
    assert run["value"] == 1 and same.reused == 1 and calls == [1] and set(run["code"]) == {"commit", "dirty"}
    # another protocol: trained again and the record replaced; no temporary file left behind
    other = RunRecords(tmp_path, {"lr": 2e-3, "zoo": "a"})
    assert other.get("run-a", lambda: train(3))["value"] == 3 and other.reused == 0 and calls == [1, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run-a.json"]
    # no root: nothing kept, always trained
    assert RunRecords(None, {}).get("run-a", lambda: train(4))["value"] == 4 and calls == [1, 3, 4]


# ------------------------------------------------------------------------------------ converter_init

def test_char_tokenizer_round_trips_the_world_text_one_character_a_token():
    from vpgtrans.demo import vocab, world2

    corpus = world2.text_corpus(200, 0)
    tokenizer = vocab.train_char_tokenizer(corpus)
    for line in corpus[:20]:
        ids = tokenizer(line + "\n", add_special_tokens=False)["input_ids"]
        # one token a character, plus the "▁" Metaspace puts before the first word
        assert len(ids) == len(line) + 2 and tokenizer.decode(ids) == line + "\n"
    assert tokenizer("\n", add_special_tokens=False)["input_ids"] == [tokenizer.convert_tokens_to_ids("\n")]
    assert tokenizer("Z", add_special_tokens=False)["input_ids"][-1] == tokenizer.unk_token_id  # no byte fallback
    assert tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id == 1


def test_cached_part_is_rebuilt_only_when_its_settings_change(tmp_path):
    from vpgtrans.demo.zoo_parts import cached_part

    built = []

    def build(out):
        (out / "config.json").write_text("{}")
        built.append(out)
        return {"metrics": {"n": len(built)}}

    out, record = cached_part(tmp_path / "part", "build.json", {"steps": 2, "shape": (1, 2)}, build)
    assert record["metrics"] == {"n": 1} and record["settings"] == {"steps": 2, "shape": [1, 2]}
    assert cached_part(out, "build.json", {"steps": 2, "shape": (1, 2)}, build)[1] == record and len(built) == 1
    assert cached_part(out, "build.json", {"steps": 3, "shape": (1, 2)}, build)[1]["metrics"] == {"n": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part"]  # the staging directory is gone


def _table_row(text: str, target: str, arm: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(f"| {target} | {arm} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_converter_init_smoke_on_a_target_that_shares_few_tokens(tmp_path, monkeypatch):
    """benchmarks/converter_init.py --smoke on the tiny zoo: the target's tokenizer (saved beside the zoo)
    shares only single characters with the source's, counted here from the two vocabularies; every arm has its
    lr search recorded; auto picks GW for that reason; a second call resumes from the records; the docs
    section carries the JSON's numbers."""
    from transformers import AutoTokenizer

    from benchmarks import converter_init
    from benchmarks.common import write_docs_section
    from vpgtrans.demo.zoo2 import build_tiny_zoo_v2

    zoo = build_tiny_zoo_v2(tmp_path / "zoo")
    work = tmp_path / "work"
    (tmp_path / "tmp").mkdir()
    cfg = converter_init.InitBenchConfig(**{**converter_init.SMOKE, "lr_grid": [1e-3]})
    result = converter_init.run(cfg, zoo, tmp_path / "tmp", work, log=lambda message: None)

    # the overlap, counted independently: the two saved vocabularies as text, special tokens aside
    source = AutoTokenizer.from_pretrained(zoo["source"])
    target = AutoTokenizer.from_pretrained(tmp_path / "zoo" / converter_init.CHAR_TARGET)
    source_texts = {source.convert_tokens_to_string([t]) for t in source.get_vocab()
                    if t not in source.all_special_tokens}
    shared = source_texts & {t.replace("▁", " ") for t in target.get_vocab() if t not in target.all_special_tokens}
    overlap = result["overlap"][converter_init.CHAR_TARGET]
    assert (overlap["source_vocab"], overlap["target_vocab"]) == (len(source), len(target))
    assert len(shared) == overlap["exact"] + overlap["lowercase"] and overlap["byte"] == 0
    assert overlap["shared"] == len(shared) + overlap["special"] <= 0.1 * len(source)
    assert all(len(text.strip()) <= 1 for text in shared) and overlap["shared_multi_character"] == 0
    llama = AutoTokenizer.from_pretrained(zoo["llama-s"])  # the zoo's other tokenizer shares words: many more
    words = source_texts & {t.replace("▁", " ") for t in llama.get_vocab()}
    assert len(words) > 4 * len(shared) and sum(len(text.strip()) > 1 for text in words) > 100

    # every arm searched on the dev split (records on disk), auto picked GW on too few pairs
    assert [(s["target"], s["arm"]) for s in result["lr_search"]] == [(converter_init.CHAR_TARGET, a)
                                                                       for a in converter_init.ARMS]
    for search in result["lr_search"]:
        assert search["split"] == "dev" and search["seed"] not in cfg.seeds and search["grid"] == [1e-3]
        assert (work / "records" / f"search-{search['target']}-{search['arm']}-lr0.001.json").is_file()
    rows = {row["arm"]: row for row in result["summary"]}
    assert rows["auto"]["method"] == ["gw"] and rows["shared-tokens"]["method"] == ["shared-tokens"]
    assert rows["auto"]["reason"].startswith(f"{overlap['shared']} shared-token pairs < 128")
    assert rows["none"]["method"] == ["None"] and rows["none"]["scored_pairs"] is None
    assert rows["gw"]["scored_pairs"] == rows["shared-tokens"]["scored_pairs"] == overlap["shared"]
    assert all(run["curve"][0]["step"] == 0 for run in result["runs"])

    # the command resumes from the records: nothing trained again, the same runs
    out = tmp_path / "init.json"
    resumed = converter_init.main(["--smoke", "--no-plot", "--out", str(out), "--work-dir", str(work),
                                   "--lr-grid", "1e-3"])
    assert resumed["records"]["identity"] == result["records"]["identity"]
    assert resumed["records"]["reused"] == len(result["runs"]) + len(result["lr_search"])
    assert resumed["runs"] == result["runs"] and resumed["summary"] == result["summary"]

    # the docs section from the JSON (--docs-from), with distinct numbers per arm so a mix-up shows
    saved = json.loads(out.read_text())
    for k, run in enumerate(saved["runs"]):
        run.update(start=0.01 * k, final=0.1 + k, best=0.2 + k)
    saved["summary"] = converter_init.summarize(saved["runs"], saved["lr_search"])
    out.write_text(json.dumps(saved))
    (tmp_path / "docs").mkdir()
    doc = tmp_path / "docs" / "benchmarks.md"
    doc.write_text(f"## heading\n\n{converter_init.DOCS_BEGIN}\nold\n{converter_init.DOCS_END}\nafter\n")
    monkeypatch.chdir(tmp_path)
    converter_init.main(["--docs-from", str(out)])
    text = doc.read_text()
    assert text.startswith("## heading\n\n") and text.endswith("\nafter\n") and "old" not in text
    for row in saved["summary"]:
        cells = _table_row(text, row["target"], row["arm"])
        means = [round(row[key]["mean"], 3) for key in ("start", "final", "best")]
        assert [float(cell.split()[0]) for cell in cells[5:8]] == means
        assert cells[8].split()[0] == f"{row['lr']:g}"
        if row["heldout_cosine"]["mean"] is not None:
            assert float(cells[3].split()[0]) == round(row["heldout_cosine"]["mean"], 3)
            assert float(cells[4].split()[0]) == round(row["retrieval_accuracy"]["mean"], 3)
    assert f"{overlap['shared']} shared" in text and f"source's {overlap['source_vocab']}" in text
    assert write_docs_section(converter_init.markdown(saved), converter_init.DOCS_BEGIN, converter_init.DOCS_END,
                              doc).read_text() == text
