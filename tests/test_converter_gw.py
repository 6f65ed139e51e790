"""``--converter gw`` (Gromov-Wasserstein, no shared tokens needed) and ``--converter auto``."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from test_cli import _user_error
from vpgtrans.cli import app
from vpgtrans.config import InheritConfig
from vpgtrans.converter import TokenPairs
from vpgtrans.errors import VpgtransError

pytest.importorskip("ot")


def _isometric_tables(n: int = 200, d_s: int = 24, d_t: int = 32, seed: int = 0):
    """Clustered source rows; the target holds the same points rotated into another width, scaled, shuffled
    and a little noisy; true pair i <-> perm[i]."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(12, d_s, generator=generator)
    x = centres[torch.randint(0, 12, (n,), generator=generator)] + 0.5 * torch.randn(n, d_s, generator=generator)
    rotation, _ = torch.linalg.qr(torch.randn(d_t, d_s, generator=generator))  # (d_t, d_s), orthonormal columns
    perm = torch.randperm(n, generator=generator)
    y = torch.empty(n, d_t)
    y[perm] = 3.0 * x @ rotation.T + 0.05 * torch.randn(n, d_t, generator=generator)
    return x, y, TokenPairs(torch.arange(n), perm, torch.ones(n), n, 0, 0)


def test_gw_recovers_an_unknown_isometry_without_any_pair():
    from vpgtrans.converter_gw import fit_gw_converter

    x, y, truth = _isometric_tables()
    weight, bias, stats = fit_gw_converter(x, y, torch.arange(len(x)), torch.arange(len(y)), truth)
    assert weight.shape == (32, 24) and bias.shape == (32,)
    assert stats["method"] == "gw" and stats["anchors"] == [200, 200]
    assert stats["retrieval_accuracy"] > 0.95 and stats["heldout_cosine"] > 0.99
    # The same fit on shuffled-away structure (the target rows replaced by noise) finds no such map.
    noise = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    _, _, chance = fit_gw_converter(x, noise, torch.arange(len(x)), torch.arange(len(y)), truth)
    assert chance["retrieval_accuracy"] < 0.2


def test_anchor_ids_prefer_corpus_frequency():
    from vpgtrans.converter_gw import anchor_ids

    counts = torch.tensor([0.0, 5.0, 0.0, 9.0, 1.0, 0.0])
    assert anchor_ids(6, {1}, 2, counts).tolist() == [3, 4]  # 1 is special; then by count
    assert anchor_ids(6, {0}, 3).tolist() == [1, 2, 3]  # no corpus: the first non-special ids


def test_inherit_with_gw_and_auto_reports_method_and_quality(tiny, tmp_path, monkeypatch):
    from vpgtrans.stages import inherit as inherit_module
    from vpgtrans.stages.inherit import inherit

    runner = CliRunner()
    out = tmp_path / "gw"
    result = runner.invoke(app, ["inherit", "--source", str(tiny["source"]), "--target-llm", str(tiny["llama"]),
                                 "--out", str(out), "--converter", "gw"])
    assert result.exit_code == 0, result.output
    stats = json.loads((out / "manifest.json").read_text())["metrics"]["converter"]
    assert stats["method"] == "gw" and stats["anchors"][0] > 100 and stats["pairs"] == stats["refined_pairs"][-1]
    assert 0 <= stats["retrieval_accuracy"] <= 1 and stats["heldout_pairs"] > 0  # measured on the shared tokens
    assert "converter (gw):" in result.stdout and "retrieval" in result.stdout
    assert (out / "converter.safetensors").is_file()

    # auto: shared tokens when there are >= 2 x the source width of pairs, else GW, and the manifest says why.
    auto = inherit(tiny["source"], tiny["llama"], tmp_path / "auto", InheritConfig(converter="auto", gw_anchors=48))
    stats = json.loads((auto / "manifest.json").read_text())["metrics"]["converter"]
    found = int(stats["reason"].split()[0])  # "N shared-token pairs >= 96 (2 x the source width 48)"
    assert stats["reason"].endswith("(2 x the source width 48)")
    assert stats["method"] == ("shared-tokens" if found >= 96 else "gw")
    monkeypatch.setattr(inherit_module, "AUTO_PAIRS_PER_DIM", 10_000)  # no pair count is enough now
    auto = inherit(tiny["source"], tiny["llama"], tmp_path / "auto-gw", InheritConfig(converter="auto", gw_anchors=48))
    stats = json.loads((auto / "manifest.json").read_text())["metrics"]["converter"]
    assert stats["method"] == "gw" and " < " in stats["reason"] and stats["anchors"] == [48, 48]

    # Tokenizers that share nothing: shared-tokens says to use gw; auto goes to GW and measures on no pair.
    def share_nothing(*args, **kwargs):
        raise VpgtransError("the source and target tokenizers share no tokens; use --converter gw (it needs no "
                            "shared tokens) or --converter none")

    monkeypatch.setattr(inherit_module, "pair_tokens", share_nothing)
    _user_error(runner.invoke(app, ["inherit", "--source", str(tiny["source"]), "--target-llm", str(tiny["llama"]),
                                    "--out", str(tmp_path / "none")]), "share no tokens", "--converter gw")
    auto = inherit(tiny["source"], tiny["llama"], tmp_path / "nothing", InheritConfig(converter="auto", gw_anchors=48))
    stats = json.loads((auto / "manifest.json").read_text())["metrics"]["converter"]
    assert stats["method"] == "gw" and stats["reason"].startswith("0 shared-token pairs <")
    assert "heldout_cosine" not in stats and "retrieval_accuracy" not in stats


def test_gw_without_pot_is_a_one_line_error(tiny, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_ot(name, *args, **kwargs):
        if name == "ot":
            raise ImportError("No module named 'ot'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ot)
    _user_error(CliRunner().invoke(app, ["inherit", "--source", str(tiny["source"]), "--target-llm",
                                         str(tiny["llama"]), "--out", str(tmp_path / "x"), "--converter", "gw"]),
                "needs POT", ".[gw]")
    assert not (tmp_path / "x").exists()


def test_benchmark_smoke_solves_gw_on_the_most_frequent_anchors_only(tmp_path):
    """benchmarks/converter_gw.py --smoke: GW solved on 80 of 120 anchors whose frequency orders differ, then
    refined on all of them, still finds the isometry; the few-pair shared-token fit is scored beside it."""
    from benchmarks import converter_gw

    result = converter_gw.main(["--smoke", "--no-plot", "--out", str(tmp_path / "gw.json")])
    saved = json.loads((tmp_path / "gw.json").read_text())
    assert saved["rows"] == result["rows"] and len(result["rows"]) == 4
    big = next(row for row in result["rows"] if row["anchors"] == 120 and row["distortion"] == 0.0)
    assert big["gw"]["solved_anchors"] == [80, 80] and big["gw"]["scored_pairs"] == 100
    assert big["gw"]["retrieval_accuracy"] > 0.95 and big["shared_tokens"]["pairs"] == 20
