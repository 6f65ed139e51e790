"""NaN / Inf in a source's VPG or projector are refused at inherit, naming the tensor (issue 16, item 9)."""

from __future__ import annotations

import shutil

import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from test_cli import _run, _user_error


def test_a_source_with_nan_in_its_vpg_is_refused_by_name(tiny, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(tiny["source"], source)
    (weights,) = source.glob("*.safetensors")
    state = load_file(str(weights))
    state["qformer.encoder.layer.0.attention.attention.query.weight"][0, 0] = float("nan")
    state["language_projection.bias"][1] = float("inf")
    save_file(state, str(weights), metadata={"format": "pt"})
    line = _user_error(_run(CliRunner(), "inherit", "--source", source, "--target-llm", tiny["llama"], "--out",
                            tmp_path / "out"), "NaN or Inf", "language_projection.bias",
                       "qformer.encoder.layer.0.attention.attention.query.weight")
    assert "learning rate" not in line and not (tmp_path / "out").exists()
    assert torch.isfinite(load_file(str(next(tiny["source"].glob("*.safetensors"))))["language_projection.bias"]).all()
