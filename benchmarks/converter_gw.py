"""The GW word converter (``--converter gw``): its time against the number of anchor tokens, and its quality
against the shared-token fit when only a few tokens are shared.

    python -m benchmarks.converter_gw            # anchors 1000, 2000, 5000 at OPT-2.7B -> LLaMA-7B widths
    python -m benchmarks.converter_gw --smoke    # anchors 60, 120 at small widths, seconds

The tables are synthetic: ``anchors`` source rows (clustered, anisotropic like real tables) in frequency
order, and the target rows are the same tokens through a random map into the target width that is an
isometry plus ``distortion`` times a random matrix (0: distances are kept exactly, which GW assumes), plus
noise, in a frequency order that differs from the source's by a rank jitter of ``rank_noise`` x anchors
(std): GW is solved on the first ``solve`` anchors of each side, which are then only partly the same tokens,
as the most frequent tokens of two tokenizers are. All anchors are true pairs, unknown to GW. The
shared-token fit (``vpgtrans.converter.fit_ridge``) is given ``few_pairs`` of them, as when two tokenizers
share few tokens. Both are scored on the pairs neither used:
mean cosine of converted vs true target rows, and retrieval accuracy (the converted row's nearest target row
among those pairs is the right one). Times are wall clock of the fit only, ``torch.set_num_threads`` as given
(POT's exact solver is single-threaded).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from benchmarks.common import (machine_info, require_matplotlib, result_config, result_parser, save_result,
                               write_docs_section)


@dataclass
class GwBenchConfig:
    anchors: list = field(default_factory=lambda: [1000, 2000, 5000])
    source_dim: int = 2560
    target_dim: int = 4096
    clusters: int = 50
    distortion: list = field(default_factory=lambda: [0.0, 0.3])
    noise: float = 0.05  # relative to the signal's std
    few_pairs: int = 50  # what the shared-token fit gets
    solve: int = 1000  # GW solved on the most frequent ones (vpgtrans.converter_gw.DEFAULT_SOLVE)
    rank_noise: float = 0.05
    ridge: float = 1e-3
    seed: int = 0
    threads: int = 2


SMOKE = dict(anchors=[60, 120], source_dim=32, target_dim=48, clusters=8, few_pairs=20, solve=80)


def make_tables(n: int, cfg: GwBenchConfig, distortion: float) -> dict:
    """``source`` (n, D_s), ``target`` (n, D_t) and ``perm``: source row i is target row perm[i]."""
    g = torch.Generator().manual_seed(cfg.seed + n)
    spectrum = (torch.arange(cfg.source_dim, dtype=torch.float32) + 1) ** -0.5
    centres = torch.randn(cfg.clusters, cfg.source_dim, generator=g) * spectrum
    source = centres[torch.randint(0, cfg.clusters, (n,), generator=g)] + \
        0.5 * torch.randn(n, cfg.source_dim, generator=g) * spectrum  # (n, D_s)
    isometry, _ = torch.linalg.qr(torch.randn(cfg.target_dim, cfg.source_dim, generator=g))  # (D_t, D_s)
    mapping = isometry + distortion * torch.randn(cfg.target_dim, cfg.source_dim, generator=g) / cfg.source_dim ** 0.5
    signal = source @ mapping.T
    jitter = cfg.rank_noise * n * torch.randn(n, generator=g, dtype=torch.float64)
    jittered = torch.arange(n, dtype=torch.float64) + jitter
    perm = torch.empty(n, dtype=torch.long)
    perm[torch.argsort(jittered)] = torch.arange(n)  # source row i is the target's perm[i]-th most frequent
    target = torch.empty(n, cfg.target_dim)
    target[perm] = signal + cfg.noise * signal.std() * torch.randn(signal.shape, generator=g)
    return {"source": source, "target": target, "perm": perm}


def _scores(weight, bias, source, target, source_ids, target_ids) -> dict:
    from vpgtrans.converter import TokenPairs
    from vpgtrans.converter_gw import measure

    pairs = TokenPairs(source_ids, target_ids, torch.ones(len(source_ids)), len(source_ids), 0, 0)
    scored = measure(weight, bias, source, target, pairs, max_pairs=len(source_ids))
    return {"heldout_cosine": scored["heldout_cosine"], "retrieval_accuracy": scored["retrieval_accuracy"],
            "scored_pairs": scored["heldout_pairs"]}


def run_one(n: int, distortion: float, cfg: GwBenchConfig) -> dict:
    from vpgtrans.converter import fit_ridge
    from vpgtrans.converter_gw import fit_gw_converter

    tables = make_tables(n, cfg, distortion)
    load = os.getloadavg()
    source, target, perm = tables["source"], tables["target"], tables["perm"]
    ids = torch.arange(n)
    few = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + 1))[:cfg.few_pairs]
    rest = torch.ones(n, dtype=torch.bool)
    rest[few] = False
    started = time.perf_counter()
    weight, bias, stats = fit_gw_converter(source, target, ids, ids, None, cfg.ridge, solve=cfg.solve)
    gw_seconds = time.perf_counter() - started
    started = time.perf_counter()
    shared_w, shared_b = fit_ridge(source[few], target[perm[few]], None, cfg.ridge)
    shared_seconds = time.perf_counter() - started
    return {"anchors": n, "distortion": distortion, "loadavg_before": [round(v, 2) for v in load],
            "loadavg_after": [round(v, 2) for v in os.getloadavg()],
            "gw": {"seconds": round(gw_seconds, 3), "solver_seconds": stats["gw_seconds"],
                   "gw_pairs": stats["gw_pairs"],
                   "solved_anchors": stats["solved_anchors"],
                   "refined_pairs": stats["refined_pairs"],
                   **_scores(weight, bias, source, target, ids[rest], perm[rest])},
            "shared_tokens": {"pairs": len(few), "seconds": round(shared_seconds, 4),
                              **_scores(shared_w, shared_b, source, target, ids[rest], perm[rest])}}


def run(cfg: GwBenchConfig) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        rows = [run_one(n, distortion, cfg) for distortion in cfg.distortion for n in cfg.anchors]
    finally:
        torch.set_num_threads(threads)
    return {"benchmark": "converter_gw", "config": asdict(cfg),
            "machine": {**machine_info(), "torch_threads": cfg.threads},
            "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows}


DOCS_BEGIN, DOCS_END = "<!-- converter_gw:begin -->", "<!-- converter_gw:end -->"


def markdown(result: dict) -> str:
    """The ``docs/benchmarks.md`` section, from a result JSON."""
    cfg, machine = result["config"], result["machine"]
    lines = [DOCS_BEGIN, "", "*Written by `python -m benchmarks.converter_gw --write-docs` from "
             "`benchmarks/results/converter_gw.json`; do not edit by hand.*", "",
             f"Run: {result.get('finished', '?')}, {machine['cpu']}, {machine['torch_threads']} torch thread(s), "
             f"torch {machine['torch']}; {cfg['source_dim']} -> {cfg['target_dim']} widths, GW solved on the "
             f"{cfg['solve']} most frequent anchors of each side, the shared-token fit given {cfg['few_pairs']} "
             "pairs; both scored on the anchors neither used.", "",
             "| anchors | distortion | GW fit (s) | of which GW solve (s) | GW held-out cosine | GW retrieval | "
             "shared-token cosine | shared-token retrieval | load average before → after |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        gw, shared = row["gw"], row["shared_tokens"]
        load = (f"{row['loadavg_before'][0]:.2f} → {row['loadavg_after'][0]:.2f}" if "loadavg_before" in row
                else "not recorded")
        lines.append(f"| {row['anchors']} | {row['distortion']:.2f} | {gw['seconds']:.1f} | {gw['solver_seconds']:.1f} "
                     f"| {gw['heldout_cosine']:.4f} | {gw['retrieval_accuracy']:.3f} | {shared['heldout_cosine']:.4f} "
                     f"| {shared['retrieval_accuracy']:.3f} | {load} |")
    lines += ["", DOCS_END]
    return "\n".join(lines)


def render(result: dict):
    from rich.table import Table

    cfg = result["config"]
    table = Table(title=f"GW converter, {cfg['source_dim']} -> {cfg['target_dim']}; shared-token fit on "
                        f"{cfg['few_pairs']} pairs; scored on the other anchors")
    for column in ("anchors", "distortion", "GW time (s)", "GW cosine", "GW retrieval", "shared cosine",
                   "shared retrieval"):
        table.add_column(column, justify="right")
    for row in result["rows"]:
        gw, shared = row["gw"], row["shared_tokens"]
        table.add_row(str(row["anchors"]), f"{row['distortion']:.2f}", f"{gw['seconds']:.2f}",
                      f"{gw['heldout_cosine']:.4f}", f"{gw['retrieval_accuracy']:.3f}",
                      f"{shared['heldout_cosine']:.4f}", f"{shared['retrieval_accuracy']:.3f}")
    return table


def plot(result: dict, path: Path) -> Path:
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(6, 4))
    for distortion in result["config"]["distortion"]:
        rows = [r for r in result["rows"] if r["distortion"] == distortion]
        ax.plot([r["anchors"] for r in rows], [r["gw"]["seconds"] for r in rows], "o-",
                label=f"distortion {distortion}")
    ax.set_xlabel("anchor tokens per side")
    ax.set_ylabel("GW converter fit (s)")
    ax.set_title("--converter gw: time against anchors")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict:
    parser = result_parser("converter_gw", __doc__, "small anchors and widths (seconds)", GwBenchConfig)
    parser.add_argument("--write-docs", action="store_true",
                        help="after a full run, regenerate the GW section of docs/benchmarks.md from its JSON")
    args = parser.parse_args(argv)
    cfg = result_config(args, GwBenchConfig, SMOKE)
    result = run(cfg)
    out = save_result("converter_gw", args, result, plot)
    if args.write_docs and not args.smoke:
        print(f"wrote {write_docs_section(markdown(result), DOCS_BEGIN, DOCS_END)}")
    from rich.console import Console

    Console().print(render(result))
    print(f"result written to {out}")
    return result


if __name__ == "__main__":
    main()
