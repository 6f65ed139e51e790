"""Training throughput and memory: our stage step vs. a plain transformers BLIP-2 training step.

    python -m benchmarks.throughput                      # tiny + mid (~220M LLaMA-shaped), a few minutes on 2 cores
    python -m benchmarks.throughput --size smoke         # seconds (what tests/test_throughput_smoke.py runs)
    python -m benchmarks.throughput --memory-table       # the computed 7B/13B/70B table of docs/cluster.md

Models are built from configs with random weights (nothing is downloaded): a BLIP-2 ViT, a Q-Former and
a LLaMA-shaped LLM, saved as an HF ``Blip2ForConditionalGeneration`` (the "HF" side) and inherited into a
vpgtrans bundle (the "ours" side) — the same architecture, sizes, frozen/trained split and batch.

- **step**: forward + backward + AdamW step on one pre-collated batch, median of ``--steps`` timed steps
  after one untimed step. HF: ``Blip2ForConditionalGeneration(..., labels=...)`` with the ViT and LLM
  frozen (``requires_grad_(False)``), trained parts as in the stage. Ours: ``summed_loss`` (LM-head
  logits only where a target is predicted; the frozen ViT under ``no_grad``) + the stage's optimizer.
- **stage**: samples/s of a real ``run_stage`` (data loading and collation included), from its
  progress callback, first step excluded.
- **memory**: peak RSS of the process (``resource.getrusage(...).ru_maxrss``; every measurement runs in
  its own subprocess, so peaks do not mix) and the RSS increase during training over the RSS after loading.
- **LLM weights**: ``get_memory_footprint()`` of the LLM loaded in bf16, 8-bit and 4-bit.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = {
    # vision (hidden, layers, image, patch), qformer (hidden, layers), queries, llm (hidden, layers, ffn, vocab)
    "smoke": dict(vision=(32, 1, 32, 8), qformer=(64, 1), queries=4, llm=(64, 2, 128, 512), batch=4, steps=2),
    "tiny": dict(vision=(128, 4, 64, 8), qformer=(128, 2), queries=8, llm=(256, 4, 688, 4096), batch=8, steps=5),
    "mid": dict(vision=(384, 6, 224, 16), qformer=(384, 4), queries=32, llm=(1024, 12, 2816, 32000), batch=8, steps=3),
}
CAPTIONS = [f"a {s} {c} {shape} on the {side}" for s in ("small", "large") for c in ("red", "green", "blue", "yellow")
            for shape in ("circle", "square", "triangle") for side in ("left", "right")]
STAGES = ("warmup", "finetune")


# --- building the models (random weights, from configs) ----------------------------------------------

def build(size: str, root: Path) -> dict:
    """Write the HF BLIP-2 (source), its LLM (target) with a tokenizer, caption data and a bundle."""
    import torch
    from PIL import Image
    from transformers import Blip2Config, Blip2ForConditionalGeneration, LlamaConfig

    from vpgtrans.config import InheritConfig
    from vpgtrans.demo.vocab import train_opt_tokenizer
    from vpgtrans.stages.inherit import inherit

    spec = SIZES[size]
    (vh, vl, image, patch), (qh, ql), (lh, ll, lf, vocab) = spec["vision"], spec["qformer"], spec["llm"]
    tokenizer = train_opt_tokenizer([c + "\n" for c in CAPTIONS] * 4, vocab_size=300)
    text = LlamaConfig(hidden_size=lh, num_hidden_layers=ll, intermediate_size=lf, num_attention_heads=max(2, lh // 64),
                       num_key_value_heads=max(2, lh // 64), vocab_size=vocab, max_position_embeddings=256,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    config = Blip2Config(vision_config=dict(hidden_size=vh, intermediate_size=4 * vh, num_hidden_layers=vl,
                                            num_attention_heads=max(2, vh // 64), image_size=image, patch_size=patch,
                                            initializer_range=0.02),
                         qformer_config=dict(hidden_size=qh, intermediate_size=4 * qh, num_hidden_layers=ql,
                                             num_attention_heads=max(2, qh // 64), encoder_hidden_size=vh),
                         text_config=text.to_dict(), num_query_tokens=spec["queries"], image_token_index=vocab - 1)
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(config)
    with torch.no_grad():
        model.query_tokens.normal_(0, 0.02)
    model.save_pretrained(root / "source")
    tokenizer.save_pretrained(root / "source")
    model.language_model.save_pretrained(root / "llm")
    tokenizer.save_pretrained(root / "llm")
    data = root / "data"
    (data / "images").mkdir(parents=True)
    rows = []
    for i in range(64):
        name = f"images/{i:03d}.png"
        Image.new("RGB", (image, image), ((40 * i) % 256, (90 * i) % 256, (150 * i) % 256)).save(data / name)
        rows.append({"image": name, "caption": CAPTIONS[i % len(CAPTIONS)]})
    (data / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    inherit(root / "source", root / "llm", root / "bundle", InheritConfig(converter="none"))
    params = {"llm": sum(p.numel() for p in model.language_model.parameters()),
              "vision": sum(p.numel() for p in model.vision_model.parameters()),
              "qformer": sum(p.numel() for p in model.qformer.parameters()) + model.query_tokens.numel()}
    (root / "params.json").write_text(json.dumps(params))
    return params


# --- one measurement (runs in its own subprocess) --------------------------------------------------

def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _batch(root: Path, batch_size: int):
    """One collated training batch (our Collator: image slots are -200)."""
    from vpgtrans.bundle import load_model
    from vpgtrans.data import load_rows
    from vpgtrans.collate import Collator

    model = load_model(root / "bundle")
    dataset, task, _ = load_rows(root / "data")
    collate = Collator(model.tokenizer, model.template, task, model.num_image_tokens, model.image_processor, False)
    return collate([dataset[i] for i in range(batch_size)])


def _ours(stage: str, root: Path, batch: dict):
    """Our stage's step: the bundle's VisionLanguageModel, the stage's trainable parts, modes and loss."""
    from vpgtrans.bundle import load_model
    from vpgtrans.config import TrainConfig
    from vpgtrans.training import count_targets, set_trainable, summed_loss, train_mode, trained_parts

    config = TrainConfig.warmup() if stage == "warmup" else TrainConfig.finetune()
    model = load_model(root / "bundle")
    parts = trained_parts(model, config.trainable)
    set_trainable(model, config.trainable)
    train_mode(model, model, parts)
    targets = count_targets(batch, False)
    return model, lambda: summed_loss(model, batch, False, keep_logits=True) / targets


def _hf(stage: str, root: Path, batch: dict):
    """A plain transformers training step: Blip2ForConditionalGeneration(..., labels=...), ViT and LLM frozen."""
    import torch
    from transformers import Blip2ForConditionalGeneration

    model = Blip2ForConditionalGeneration.from_pretrained(root / "source", dtype=torch.float32)
    model.requires_grad_(False)
    parts = [model.language_projection] + ([model.qformer, model.vision_model.post_layernorm]
                                           if stage == "finetune" else [])
    for part in parts:
        part.requires_grad_(True)
    model.query_tokens.requires_grad_(stage == "finetune")
    model.train()
    hf_batch = {**batch, "input_ids": batch["input_ids"].masked_fill(batch["input_ids"] < 0,
                                                                     model.config.image_token_index)}
    return model, lambda: model(**hf_batch).loss


def _stepper(model, loss_fn, stage: str):
    import torch

    from vpgtrans.config import TrainConfig
    from vpgtrans.training import param_groups

    config = TrainConfig.warmup() if stage == "warmup" else TrainConfig.finetune()
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr)

    def step():
        loss_fn().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def measure(kind: str, stage: str, root: Path, batch_size: int, steps: int) -> dict:
    """``pair``: ours and HF steps alternated in one process (both see the same machine load; the CPU
    is shared); ``ours`` / ``hf``: one model alone, for its peak memory; ``stage``: a real run_stage."""
    if kind == "stage":
        from vpgtrans.config import TrainConfig
        from vpgtrans.stages.train import run_stage

        make = TrainConfig.warmup if stage == "warmup" else TrainConfig.finetune
        stamps, loaded = [], _rss_mib()
        run_stage(root / "bundle", root / "data", root / f"out-{stage}", make(max_steps=steps + 1, batch_size=batch_size),
                  stage, force=True, progress=lambda done, total, loss, lr: stamps.append(time.perf_counter()))
        return {"seconds": [b - a for a, b in zip(stamps, stamps[1:])], "peak_mib": _peak_mib(),
                "train_mib": _peak_mib() - loaded}
    batch = _batch(root, batch_size)
    builders = {"ours": _ours, "hf": _hf}
    kinds = ["ours", "hf"] if kind == "pair" else [kind]
    models = {k: builders[k](stage, root, batch) for k in kinds}
    steppers = {k: _stepper(model, loss_fn, stage) for k, (model, loss_fn) in models.items()}
    loaded = _rss_mib()
    seconds = {k: [] for k in kinds}
    for i in range(steps + 1):  # the first round is untimed (allocations, first-call overheads)
        for k in kinds:
            start = time.perf_counter()
            steppers[k]()
            if i:
                seconds[k].append(time.perf_counter() - start)
    result = {k: {"seconds": seconds[k], "trainable": sum(p.numel() for p in models[k][0].parameters() if p.requires_grad)}
              for k in kinds}
    if kind != "pair":
        result = {**result[kind], "peak_mib": _peak_mib(), "train_mib": _peak_mib() - loaded}
    return result


def measure_llm_memory(root: Path, mode: str) -> dict:
    import torch

    from vpgtrans.model.assemble import load_llm

    before = _rss_mib()
    quantization = None if mode == "bf16" else mode
    llm, _ = load_llm({"path": str(root / "llm")}, False, dtype=torch.bfloat16, quantization=quantization)
    layers = sum(t.numel() * t.element_size() for t in [*llm.model.layers.parameters(), *llm.model.layers.buffers()])
    return {"footprint_mib": llm.get_memory_footprint() / 2**20, "layers_mib": layers / 2**20,
            "rss_increase_mib": _rss_mib() - before}


# --- the driver -------------------------------------------------------------------------------------

IN_PROCESS = False  # --in-process (the smoke test): no subprocess per measurement, peaks then mix


def _subprocess(*args) -> dict:
    if IN_PROCESS:
        if args[0] == "--one":
            kind, stage, root, batch, steps = args[1:]
            return measure(kind, stage, Path(root), int(batch), int(steps))
        return measure_llm_memory(Path(args[2]), args[1])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-m", "benchmarks.throughput", *map(str, args)], capture_output=True,
                          text=True, env=env)
    if done.returncode:
        raise SystemExit(f"measurement {args} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(sizes: list[str], work: Path) -> dict:
    results = {"machine": _machine(), "sizes": {}}
    for size in sizes:
        root = work / size
        if not (root / "bundle").is_dir():
            root.mkdir(parents=True, exist_ok=True)
            build(size, root)
        spec = SIZES[size]
        entry = {"params": json.loads((root / "params.json").read_text()), "batch": spec["batch"], "stages": {}}
        for stage in STAGES:
            pair = _subprocess("--one", "pair", stage, root, spec["batch"], spec["steps"])
            entry["stages"][stage] = {kind: {**pair[kind], **_subprocess("--one", kind, stage, root, spec["batch"], 1),
                                             "seconds": pair[kind]["seconds"]} for kind in ("ours", "hf")}
            entry["stages"][stage]["stage"] = _subprocess("--one", "stage", stage, root, spec["batch"], spec["steps"])
            print(f"{size} {stage}: " + _row(entry["stages"][stage], spec["batch"]), file=sys.stderr)
        entry["llm_memory"] = {mode: _subprocess("--llm-memory", mode, root) for mode in ("bf16", "8bit", "4bit")}
        results["sizes"][size] = entry
    return results


def _machine() -> dict:
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                    if line.startswith("model name")), cpu)
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}


def _sps(m: dict, batch: int) -> float:
    return batch / statistics.median(m["seconds"])


def _row(m: dict, batch: int) -> str:
    ours, hf = _sps(m["ours"], batch), _sps(m["hf"], batch)
    return f"ours {ours:.2f} samples/s, HF {hf:.2f} samples/s ({ours / hf:.2f}x), stage {_sps(m['stage'], batch):.2f}"


def markdown(results: dict) -> str:
    lines = ["| model | stage | ours: step samples/s | HF BLIP-2: step samples/s | ours / HF | ours: `run_stage` "
             "samples/s | peak RSS ours / HF (MiB) | training RSS increase ours / HF (MiB) |",
             "|---|---|---|---|---|---|---|---|"]
    for size, entry in results["sizes"].items():
        p = entry["params"]
        name = f"{size} (LLM {p['llm'] / 1e6:.1f}M, ViT {p['vision'] / 1e6:.1f}M, Q-Former {p['qformer'] / 1e6:.1f}M)"
        for stage, m in entry["stages"].items():
            b = entry["batch"]
            lines.append(f"| {name} | {stage} | {_sps(m['ours'], b):.2f} | {_sps(m['hf'], b):.2f} | "
                         f"{_sps(m['ours'], b) / _sps(m['hf'], b):.2f}× | {_sps(m['stage'], b):.2f} | "
                         f"{m['ours']['peak_mib']:.0f} / {m['hf']['peak_mib']:.0f} | "
                         f"{m['ours']['train_mib']:.0f} / {m['hf']['train_mib']:.0f} |")
    lines += ["", "| model | weights | bf16 | 8-bit | 4-bit (NF4) |", "|---|---|---|---|---|"]
    for size, entry in results["sizes"].items():
        mem = entry["llm_memory"]
        for key, what in (("footprint_mib", "whole LLM"), ("layers_mib", "decoder layers")):
            bf16 = mem["bf16"][key]
            lines.append(f"| {size} | {what} | {bf16:.1f} MiB | {mem['8bit'][key]:.1f} MiB "
                         f"({mem['8bit'][key] / bf16:.2f}×) | {mem['4bit'][key]:.1f} MiB ({mem['4bit'][key] / bf16:.2f}×) |")
    return "\n".join(lines)


def memory_table() -> str:
    """LLM weight memory computed from LLaMA parameter counts (docs/cluster.md)."""
    rows = ["| LLM | parameters | 16-bit | 8-bit | 4-bit |", "|---|---|---|---|---|"]
    for name, (h, layers, ffn, kv_heads) in {"LLaMA-7B": (4096, 32, 11008, 32), "LLaMA-13B": (5120, 40, 13824, 40),
                                             "LLaMA-2-70B": (8192, 80, 28672, 8)}.items():
        kv = kv_heads * 128
        linear = layers * (2 * h * h + 2 * h * kv + 3 * h * ffn)
        other = 2 * 32000 * h + (2 * layers + 1) * h  # embeddings, LM head, norms: kept 16-bit
        b16 = 2 * (linear + other)
        b8 = linear + 4 * layers * (3 * h + 2 * kv + 2 * ffn) + 2 * other  # int8 + one fp32 scale per output row
        b4 = linear / 2 + linear / 64 + linear / 64 / 256 * 4 + 2 * other  # NF4 + double-quantised block scales
        gib = 2**30
        rows.append(f"| {name} | {(linear + other) / 1e9:.2f} B | {b16 / gib:.1f} GiB | {b8 / gib:.1f} GiB "
                    f"({b8 / b16:.2f}×) | {b4 / gib:.1f} GiB ({b4 / b16:.2f}×) |")
    return "\n".join(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny,mid", help="comma-separated: smoke, tiny, mid")
    parser.add_argument("--work", type=Path, help="keep the built models here (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="write the results as JSON")
    parser.add_argument("--memory-table", action="store_true")
    parser.add_argument("--in-process", action="store_true", help="measure in this process (fast, peaks mix)")
    parser.add_argument("--threads", type=int, help="torch threads per measurement (default: torch's choice)")
    parser.add_argument("--one", nargs=5, help=argparse.SUPPRESS)  # KIND STAGE ROOT BATCH STEPS (subprocess)
    parser.add_argument("--llm-memory", nargs=2, help=argparse.SUPPRESS)  # MODE ROOT (subprocess)
    args = parser.parse_args(argv)
    if args.one:
        kind, stage, root, batch, steps = args.one
        print(json.dumps(measure(kind, stage, Path(root), int(batch), int(steps))))
        return
    if args.llm_memory:
        print(json.dumps(measure_llm_memory(Path(args.llm_memory[1]), args.llm_memory[0])))
        return
    if args.memory_table:
        print(memory_table())
        return
    global IN_PROCESS
    IN_PROCESS = args.in_process
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the subprocesses' torch reads it at import
        import torch

        torch.set_num_threads(args.threads)
    sizes = args.size.split(",")
    unknown = set(sizes) - set(SIZES)
    if unknown:
        parser.error(f"unknown size(s) {sorted(unknown)}; choose from {sorted(SIZES)}")
    with tempfile.TemporaryDirectory() as tmp:
        results = run(sizes, args.work or Path(tmp))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))


if __name__ == "__main__":
    main()
