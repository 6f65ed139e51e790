"""Helpers shared by the benchmarks: the machine record, JSON output, the optional plotting dependency."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

RESULTS_DIR = Path("benchmarks/results")


class MissingExtra(SystemExit):
    """Raised (and shown as the exit message) when an optional dependency of a benchmark is missing."""


def require_matplotlib():
    """``matplotlib.pyplot`` with the file-only Agg backend, or a clear exit naming the extra to install."""
    try:
        import matplotlib
    except ImportError:
        raise MissingExtra("this benchmark writes a PNG plot with matplotlib, which is not installed: "
                           "pip install -e '.[bench]' (or pass --no-plot)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def machine_info() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform()}


def write_json(path: Path, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path
