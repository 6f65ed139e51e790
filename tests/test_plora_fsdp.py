"""plora under a real 2-process FSDP2 run (CPU, gloo; see tests/test_fsdp.py): the LLM with its LoRA
wrappers (attention linears and fused MoE experts) is sharded, and the bundle holds the same whole LoRA
tensors as a 2-process DDP run of the same transfer."""

from __future__ import annotations

import re

import torch
from safetensors.torch import load_file

from test_fsdp import _doc_fsdp_config, _launch
from test_plora import make_moe
from vpgtrans.bundle import read_manifest


def test_fsdp_shards_a_plora_moe_llm_and_saves_what_ddp_trains(tiny, tmp_path):
    moe = make_moe(tmp_path / "mixtral", "mixtral")
    args = ["transfer", "--source", tiny["source"], "--target-llm", moe, "--data", tiny["caption"],
            "--connector", "plora", "--max-steps", 3, "--batch-size", 4, "--finetune-lr", "3e-3"]
    sharded = _launch([*args, "--out", tmp_path / "fsdp", "--verbose"], _doc_fsdp_config(tmp_path))
    assert sharded.returncode == 0, sharded.stderr[-4000:]
    plain = _launch([*args, "--out", tmp_path / "ddp"], None)
    assert plain.returncode == 0, plain.stderr[-4000:]
    (line, *_) = [line for line in sharded.stderr.splitlines() if "FSDP over" in line]
    held, total = (int(g.replace(",", "")) for g in
                   re.search(r"holds ([\d,]+) of the LLM's ([\d,]+)", line).groups())
    assert held < total, line
    fsdp, ddp = tmp_path / "fsdp" / "finetune", tmp_path / "ddp" / "finetune"
    assert read_manifest(fsdp)["config"]["run"]["engine"] == "fsdp"
    assert read_manifest(ddp)["config"]["run"]["engine"] == "ddp"
    ours, theirs = load_file(str(fsdp / "plora.safetensors")), load_file(str(ddp / "plora.safetensors"))
    assert ours.keys() == theirs.keys() and any("mlp.experts.gate_up_B" in key for key in ours)
    assert any(ours[key].any() for key in ours if "experts" in key and key.endswith("_B"))  # the experts trained
    for key in ours:
        assert ours[key].shape == theirs[key].shape, key  # whole tensors, not one process's shard
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-6, rtol=0, msg=key)
