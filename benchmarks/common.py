"""Helpers shared by the benchmarks: the machine record, JSON output, the optional plotting dependency,
and the command line of the benchmarks that write a result JSON and a plot."""

from __future__ import annotations

import argparse
import json
import os
import platform
from dataclasses import asdict
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


def result_parser(name: str, doc: str, smoke_help: str, config_cls) -> argparse.ArgumentParser:
    """``python -m benchmarks.NAME``'s options: --smoke, --out, --plot, --no-plot, and one flag per field
    of its config dataclass (list fields take one or more values; those the config names in ``MAY_BE_EMPTY``
    also none, e.g. transfer_speedup's ``--ablations`` alone runs no ablation)."""
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=doc.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help=smoke_help)
    parser.add_argument("--out", type=Path, default=None, help=f"JSON path (default benchmarks/results/{name}[.smoke].json)")
    parser.add_argument("--plot", type=Path, default=None, help="PNG path (default: beside the JSON)")
    parser.add_argument("--no-plot", action="store_true")
    for field, default in asdict(config_cls()).items():
        flag = f"--{field.replace('_', '-')}"
        if isinstance(default, list):
            nargs = "*" if field in getattr(config_cls, "MAY_BE_EMPTY", ()) else "+"
            parser.add_argument(flag, nargs=nargs, type=type(default[0]), default=None)
        else:
            parser.add_argument(flag, type=type(default), default=None)
    return parser


def result_config(args: argparse.Namespace, config_cls, smoke: dict):
    """The run's config: the smoke values under --smoke, then the flags given. Checks for matplotlib
    first when a plot is wanted (fail before the work, not after it)."""
    if not args.no_plot:
        require_matplotlib()
    overrides = {k: v for k, v in vars(args).items() if k in config_cls.__dataclass_fields__ and v is not None}
    return config_cls(**{**(smoke if args.smoke else {}), **overrides})


def save_result(name: str, args: argparse.Namespace, result: dict, plot) -> Path:
    """Write the plot (unless --no-plot; its path goes into the result) and the result JSON; return the JSON path."""
    out = args.out or RESULTS_DIR / (f"{name}.smoke.json" if args.smoke else f"{name}.json")
    if not args.no_plot:
        result["plot"] = str(plot(result, args.plot or out.with_suffix(".png")))
    return write_json(out, result)


def quiet_libraries() -> None:
    """Benchmarks print their own tables: vpgtrans logs warnings only, transformers errors only, no bars."""
    import logging

    from transformers.utils import logging as hf_logging

    logging.getLogger("vpgtrans").setLevel(logging.WARNING)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def plot_curves_by_target(result: dict, path: Path, metric: str, colors: dict | None = None) -> Path:
    """One panel per target, every run's eval curve (``result["runs"]``: target, arm, curve) coloured by arm
    (``colors``: arm -> matplotlib colour; default one per arm in order)."""
    plt = require_matplotlib()
    runs = result["runs"]
    targets = list(dict.fromkeys(r["target"] for r in runs))
    arms = list(dict.fromkeys(r["arm"] for r in runs))
    colors = colors or {arm: f"C{k}" for k, arm in enumerate(arms)}
    fig, axes = plt.subplots(1, len(targets), figsize=(5 * len(targets), 4), squeeze=False)
    for ax, target in zip(axes[0], targets):
        for arm in arms:
            for i, run_ in enumerate(r for r in runs if r["target"] == target and r["arm"] == arm):
                ax.plot([p["step"] for p in run_["curve"]], [p[metric] for p in run_["curve"]], color=colors[arm],
                        alpha=0.7, label=arm if i == 0 else None)
        ax.set_title(target)
        ax.set_xlabel("optimizer steps (warm-up included)")
        ax.set_ylabel(metric)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def add_zoo_options(parser: argparse.ArgumentParser) -> None:
    """``--work-dir`` and ``--cache-dir`` of the benchmarks that train on the tiny zoo."""
    parser.add_argument("--work-dir", type=Path, default=None, help="where the arms' bundles go (default: a temp dir)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="zoo cache (default $VPGTRANS_CACHE or ~/.cache/vpgtrans)")


def zoo_v2(args: argparse.Namespace, seed: int, tmp: Path) -> dict:
    """The zoo a run trains on: ``--smoke`` a random-weight tiny zoo built in ``tmp``, else the pre-trained
    zoo v2 from the cache (built once when missing)."""
    if args.smoke:
        from vpgtrans.demo.zoo2 import build_tiny_zoo_v2

        return build_tiny_zoo_v2(Path(tmp) / "zoo", seed=seed)
    from vpgtrans.demo.zoo2 import build_zoo_v2

    return build_zoo_v2(args.cache_dir, seed=seed, log=print)


def write_docs_section(text: str, begin: str, end: str, path: Path = Path("docs/benchmarks.md")) -> Path:
    """Replace the part of ``path`` from the ``begin`` marker to the ``end`` marker (both included) with
    ``text`` (which carries the markers itself)."""
    doc = path.read_text()
    start, stop = doc.index(begin), doc.index(end) + len(end)
    path.write_text(doc[:start] + text + doc[stop:])
    return path


def code_version() -> dict:
    """The git commit of the code that produced a record, and whether the work tree had changes."""
    import subprocess

    def git(*cmd: str) -> str | None:
        try:
            return subprocess.run(["git", *cmd], capture_output=True, text=True, timeout=30,
                                  cwd=Path(__file__).resolve().parent, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


class RunRecords:
    """Finished runs of a long benchmark, one JSON file each under ``root``, keyed by a digest of everything
    that determines them (``identity``): a run found with the same digest is read back instead of trained
    again. An interrupted benchmark resumes where it stopped, and several processes can share one benchmark
    (e.g. one target each, then one more process that finds every run recorded and only assembles). Every
    run gets ``code``: the code version that trained it. ``root=None``: nothing is kept."""

    def __init__(self, root: Path | None, identity: dict):
        import hashlib

        self.root = None if root is None else Path(root)
        self.digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.reused = 0

    def get(self, name: str, train) -> dict:
        """The run called ``name``: from its record when one with this digest exists, else ``train()``
        (then recorded atomically, so a killed process never leaves half a record)."""
        path = None if self.root is None else self.root / f"{name}.json"
        if path is not None and path.is_file():
            record = json.loads(path.read_text())
            if record.get("identity") == self.digest:
                self.reused += 1
                return record["run"]
        run = {**train(), "code": code_version()}
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"identity": self.digest, "run": run}) + "\n")
            os.replace(tmp, path)
        return run


def spread(values: list[float | None]) -> dict:
    """mean, std (sample), min, max of the defined values; ``missing`` counts the undefined ones."""
    import statistics

    present = [v for v in values if v is not None]
    if not present:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0, "missing": len(values)}
    return {"mean": statistics.fmean(present), "std": statistics.stdev(present) if len(present) > 1 else 0.0,
            "min": min(present), "max": max(present), "n": len(present), "missing": len(values) - len(present)}


def docs_preamble(name: str, begin: str, result: dict, details: str) -> list[str]:
    """The first lines of a generated ``docs/benchmarks.md`` section: its marker, where it comes from, and
    when and on what the run ran (``details``: the protocol in a sentence)."""
    machine = result["machine"]
    reused = result.get("records", {}).get("reused")
    took = f"{result['seconds']:.0f} s in all" + (f" ({reused} runs read back from the records of earlier calls; each "
                                                   "run's seconds are its own)" if reused else "")
    return [begin, "", f"*Written by `python -m benchmarks.{name} --write-docs` from `benchmarks/results/{name}.json`; "
            "do not edit by hand.*", "", f"Run: {result.get('finished', '?')}, {machine['cpu']}, torch "
            f"{machine['torch']}; {took}; {details}", ""]


def fmt_spread(block: dict, digits: int = 3) -> str:
    """A ``spread`` block as a table cell: ``mean (min–max)``, the count of seeds without a value, or
    "never" when none has one."""
    if block["mean"] is None:
        return "never"
    text = f"{block['mean']:.{digits}f}"
    if block["max"] != block["min"]:
        text += f" ({block['min']:.{digits}f}–{block['max']:.{digits}f})"
    return text + (f", {block['missing']} never" if block.get("missing") else "")


def next_lr(scores: dict[float, float]) -> float | None:
    """The lr to try next when the best of ``scores`` (lr -> score, higher is better; ties: the smaller lr)
    sits at an end of the searched grid: one step of the grid's own end ratio beyond that end; ``None`` when
    the best is inside (or the grid has one lr)."""
    grid = sorted(scores)
    if len(grid) < 2:
        return None
    best = max(grid, key=lambda lr: scores[lr])  # max keeps the first, i.e. smallest, of equal scores
    if best == grid[-1]:
        return grid[-1] * grid[-1] / grid[-2]
    if best == grid[0]:
        return grid[0] * grid[0] / grid[1]
    return None


def search_lr_grid(grid: list[float], trial, score, extend: int) -> dict:
    """An lr search: ``trial(lr)`` for every lr of ``grid``, then, while the best ``score(trial)`` sits at an
    end of the searched lrs, one more lr beyond that end (``next_lr``), at most ``extend`` times — the same
    rule for every arm, so no arm is left under-tuned by a grid that stops too early. Returns the trials in
    lr order, the chosen lr (best score; ties: the smaller lr), the lrs added and whether the pick still sits
    at an end."""
    trials = {lr: trial(lr) for lr in grid}
    added = []
    while len(added) < extend and (lr := next_lr({k: score(t) for k, t in trials.items()})) is not None:
        added.append(float(f"{lr:.6g}"))  # 8e-3 * 2 is 0.016, not 0.016000000000000004, in names and JSON
        trials[added[-1]] = trial(added[-1])
    lrs = sorted(trials)
    chosen = max(lrs, key=lambda lr: score(trials[lr]))
    return {"trials": [trials[lr] for lr in lrs], "chosen_lr": chosen, "grid": lrs, "extended": added,
            "at_grid_edge": len(lrs) > 1 and chosen in (lrs[0], lrs[-1])}


def without_times(record):
    """``record`` with every key naming seconds left out, at any depth: a rebuilt zoo is the same zoo, so a
    record's identity must not depend on how long it took to build."""
    if isinstance(record, dict):
        return {k: without_times(v) for k, v in record.items() if "seconds" not in k}
    return [without_times(v) for v in record] if isinstance(record, list) else record


def register_lora_all(targets: tuple[str, ...]) -> str:
    """A benchmark-only connector: BLIP-2's Q-Former + projector and peft's LoRA on every token of the LLM
    (``targets``, rank 8 unless ``adapter_options`` say otherwise), with the recipe ``bench-lora-all``
    (projector warm-up -> VPG + projector + LoRA). The registries are plain dicts; returns the connector's name."""
    from vpgtrans.model.connectors import CONNECTORS, Connector
    from vpgtrans.recipes import RECIPES, Stage

    RECIPES["bench-lora-all"] = [Stage("warmup", {"trainable": ["connector"], "lr": 5e-4, "min_lr": None}),
                                 Stage("finetune", {"trainable": ["vpg", "connector", "lora"], "lr": 1e-4,
                                                    "min_lr": 5e-5}, data="finetune_data")]
    name = f"bench-lora-all-{'-'.join(targets)}"
    CONNECTORS[name] = Connector("qformer", ({"type": "lora", "rank": 8, "alpha": 16, "dropout": 0.05,
                                             "targets": list(targets)},), recipe="bench-lora-all")
    return name
