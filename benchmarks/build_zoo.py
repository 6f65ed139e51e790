"""Build (or reuse) the benchmark zoo, zoo-v2, in the cache: ``python -m benchmarks.build_zoo [--seed 0] [--force]``.

Deterministic from the seed; written under ``$VPGTRANS_CACHE`` (default ``~/.cache/vpgtrans``)
``/zoo-v2/seed{seed}``, then the stage-1 Q-Former beside its parts (``qformer-stage1/``). Prints the build
record (sizes, pre-training metrics, source scores, times)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.build_zoo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if a complete zoo is cached")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--no-stage1", action="store_true",
                        help="skip the stage-1 Q-Former (built on first use by transfer_speedup otherwise)")
    args = parser.parse_args(argv)
    from vpgtrans.demo.zoo2 import build_zoo_v2

    started = time.perf_counter()
    paths = build_zoo_v2(args.cache_dir, seed=args.seed, force=args.force, log=print)
    record = json.loads((paths["root"] / "zoo.json").read_text())
    print(json.dumps({k: record[k] for k in ("zoo_version", "seed", "params", "metrics", "seconds", "build_seconds")},
                     indent=2))
    print(f"zoo-v2 at {paths['root']} ({time.perf_counter() - started:.0f}s)")
    if not args.no_stage1:  # the paper's from-scratch start (transfer_speedup's scratch arm), cached beside it
        from vpgtrans.demo.zoo2 import stage1_qformer

        stage1_dir, stage1 = stage1_qformer(paths, seed=args.seed, log=print)
        record["stage1"] = stage1
        print(f"stage-1 Q-Former at {stage1_dir}: held-out retrieval top-1 {stage1['metrics']['retrieval_top1']:.3f} "
              f"(chance {stage1['metrics']['chance']:.3f}), ITC {stage1['metrics']['itc_loss']:.3f}, "
              f"ITM {stage1['metrics']['itm_loss']:.3f}")
    return record


if __name__ == "__main__":
    main()
