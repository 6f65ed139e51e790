"""Training steps/s with images decoded in the training process (``--num-workers 0``) vs in DataLoader workers.

    python -m benchmarks.loader --json benchmarks/results/loader.json    # about 3 minutes on 2 cores
    python -m benchmarks.loader --smoke                                  # seconds

The demo's tiny models (random weights, ``build_tiny_models``) inherited into a bundle, and the demo
world's caption scenes rendered at ``--image-px`` x ``--image-px`` and stored as JPEG (quality 90): images
that cost what COCO's ~640x480 JPEGs cost to decode and resize, in front of a model whose step is cheap,
the case where decoding in the training process shows. Each setting runs the same warm-up stage
(``run_stage``, ``--steps`` steps of ``--batch-size``) in this process, interleaved ``--repeats`` times
(0, 2, 0, 2, ...: both see the same machine load); steps/s is timed from the progress callback over the
steps after the first (workers start and the model warms up in step 1). The load average is recorded
beside each run: the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine_info, quiet_libraries, write_json


def make_data(out_dir: Path, rows: int, image_px: int, seed: int = 0) -> Path:
    """The demo world's caption rows with their scenes as ``image_px``-pixel JPEGs."""
    from PIL import Image

    from vpgtrans.demo import world

    split = world.make_split(out_dir, "caption", rows, seed, image_size=image_px)
    lines = []
    for line in (split / "data.jsonl").read_text().splitlines():
        row = json.loads(line)
        png = split / row["image"]
        row["image"] = str(Path(row["image"]).with_suffix(".jpg"))
        with Image.open(png) as image:
            image.convert("RGB").save(split / row["image"], quality=90)
        png.unlink()
        lines.append(json.dumps(row) + "\n")
    (split / "data.jsonl").write_text("".join(lines))
    return split


def timed_run(bundle: Path, data: Path, out: Path, steps: int, batch_size: int, num_workers: int) -> dict:
    """One warm-up stage; steps/s over steps 2..N from the progress callback."""
    from vpgtrans.config import TrainConfig
    from vpgtrans.stages.train import warmup_projector
    from vpgtrans.training import RunOptions

    stamps = []
    load_before = os.getloadavg()[0]
    warmup_projector(bundle, data, out, TrainConfig.warmup(max_steps=steps, batch_size=batch_size),
                     progress=lambda done, total, loss, lr: stamps.append(time.perf_counter()),
                     options=RunOptions(num_workers=num_workers))
    return {"num_workers": num_workers, "steps_per_second": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
            "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]}


def prepare_seconds(bundle: Path, data: Path, batch_size: int, repeats: int = 5) -> float:
    """Median seconds to decode, convert, resize and tokenise one batch in this process (``Collator.prepare``):
    the work workers take off the training process."""
    from vpgtrans.bundle import load_model
    from vpgtrans.collate import Collator
    from vpgtrans.data import load_rows

    model = load_model(bundle)
    rows, task, _ = load_rows(data)
    collate = Collator(model.tokenizer, model.template, task, model.num_image_tokens, model.image_processor,
                       model.is_encoder_decoder)
    seconds = []
    for repeat in range(repeats):
        batch = [rows[(repeat * batch_size + i) % len(rows)] for i in range(batch_size)]
        started = time.perf_counter()
        collate.prepare(batch)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loader", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--image-px", type=int, default=480)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks that it runs (seconds)")
    parser.add_argument("--json", type=Path, default=None, help="write the result here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rows, args.image_px, args.steps, args.batch_size, args.repeats = 16, 64, 3, 4, 1
    quiet_libraries()
    from vpgtrans.demo.zoo import build_tiny_models
    from vpgtrans.stages.inherit import inherit

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        zoo = build_tiny_models(tmp / "zoo")
        bundle = inherit(zoo["source"], zoo["llama-s"], tmp / "inherit")
        data = make_data(tmp / "data", args.rows, args.image_px)
        runs = [timed_run(bundle, data, tmp / f"run-{repeat}-{workers}", args.steps, args.batch_size, workers)
                for repeat in range(args.repeats) for workers in args.workers]
        prepare = prepare_seconds(bundle, data, args.batch_size)
    summary = {workers: statistics.median(r["steps_per_second"] for r in runs if r["num_workers"] == workers)
               for workers in args.workers}
    result = {"settings": {k: v for k, v in vars(args).items() if k != "json"},
              "machine": machine_info(), "runs": runs, "median_steps_per_second": summary,
              "prepare_seconds_per_batch": prepare}
    print("| --num-workers | steps/s (median of %d) | samples/s | vs 0 workers |" % args.repeats)
    print("|---|---|---|---|")
    for workers, rate in summary.items():
        base = summary.get(0)
        print(f"| {workers} | {rate:.2f} | {rate * args.batch_size:.1f} | "
              + (f"{rate / base:.2f}x |" if base else "- |"))
    print(f"preparing one batch in the training process: {prepare:.3f} s (median of 5)")
    print("runs:", json.dumps(runs))
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
