"""The throughput benchmark's smoke setting runs end to end and reports sane numbers; the memory table
in docs/cluster.md is the one the benchmark computes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_smoke_setting_runs_and_reports(tmp_path):
    out = tmp_path / "results.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.throughput", "--size", "smoke", "--in-process", "--threads", "1",
                           "--work", str(tmp_path / "work"), "--json", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    smoke = results["sizes"]["smoke"]
    assert set(smoke["stages"]) == {"warmup", "finetune"}
    for stage in smoke["stages"].values():
        for kind in ("ours", "hf", "stage"):
            seconds = stage[kind]["seconds"]
            assert len(seconds) >= 2 and all(0 < s < 60 for s in seconds), (kind, seconds)
            assert stage[kind]["peak_mib"] > 100
        # Same trained parameters on both sides: ours and HF train the same thing.
        assert stage["ours"]["trainable"] == stage["hf"]["trainable"] > 0
    memory = smoke["llm_memory"]
    assert memory["8bit"]["footprint_mib"] < memory["bf16"]["footprint_mib"]
    assert memory["4bit"]["footprint_mib"] < memory["8bit"]["footprint_mib"]
    assert "| smoke" in done.stdout and "ours / HF" in done.stdout


def test_cluster_doc_memory_table_is_the_computed_one():
    table = subprocess.run([sys.executable, "-m", "benchmarks.throughput", "--memory-table"], capture_output=True,
                           text=True, cwd=ROOT, check=True).stdout.strip().splitlines()
    doc = (ROOT / "docs" / "cluster.md").read_text()
    for row in table[2:]:
        assert row in doc, row
