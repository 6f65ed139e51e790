"""Real shapes: the toolkit's commands at BLIP-2 OPT-2.7B -> OPT-6.7B / LLaMA-7B sizes, on random weights.

    python -m benchmarks.real_shapes --preset opt-6.7b     # ~37 GB of disk, ~14 GiB anonymous RSS, ~17 min idle
    python -m benchmarks.real_shapes --preset llama-7b
    python -m benchmarks.real_shapes --preset small        # tiny shapes, seconds (tests/test_real_shapes.py)
    python -m benchmarks.real_shapes --table               # the markdown table of benchmarks/results/real_shapes.json
    python -m benchmarks.real_shapes --write-docs          # ... written into docs/benchmarks.md

**Checkpoints.** The source is an HF ``Blip2ForConditionalGeneration`` directory with BLIP-2 OPT-2.7B's
configuration (ViT-g/14 at 224 px, 39 layers of width 1408; a 12-layer Q-Former of width 768 with 32
queries; OPT-2.7B), the targets HF causal-LM directories with OPT-6.7B's and LLaMA-7B's — configs written
from the published values, nothing downloaded. No model is ever materialised: each is built on the meta
device, and ``vpgtrans.formats.shards`` writes the weight files ``save_pretrained`` would write (same
shards, index and bytes layout; ``tests/test_shards.py``) one random tensor at a time (bf16 by default).
Tokenizers are trained locally on random words (byte-level BPE with OPT's 50,265 tokens; Metaspace BPE
with byte fallback and LLaMA's 32,000), so the converter pairs as many tokens as with the real ones
(OPT -> OPT: all 50,265; OPT -> LLaMA: ~29k).

**Measurements.** Every command is its own subprocess (the ``vpgtrans`` CLI, or a child of this module
for loading the export in transformers): wall time; peak RSS (``VmHWM``) and the peaks of anonymous and
file-backed RSS apart (``RssAnon`` / ``RssFile``), all from ``/proc/PID/status`` sampled every 50 ms
(``ru_maxrss`` would count the forked child before its exec: this process's RSS); warning lines on
stderr. Before each command the load average and the page cache size are recorded (the checkpoints were
just written, so the cache is as warm as memory lets it be).
A step that cannot fit in the available memory (a 6.7B LLM in fp32) is skipped and said so.
Everything is written under ``--work-dir`` (default: a temp dir) and deleted afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

from benchmarks.common import RESULTS_DIR, machine_info, write_json

GIB = 2**30
DOCS = Path("docs/benchmarks.md")
DOC_BEGIN, DOC_END = "<!-- real_shapes table: begin (python -m benchmarks.real_shapes --write-docs) -->", \
    "<!-- real_shapes table: end -->"

# Published configurations (Salesforce/blip2-opt-2.7b, facebook/opt-6.7b, huggyllama/llama-7b).
OPT_2_7B = dict(hidden_size=2560, num_hidden_layers=32, ffn_dim=10240, num_attention_heads=32, vocab_size=50272,
                max_position_embeddings=2048, word_embed_proj_dim=2560)
OPT_6_7B = dict(hidden_size=4096, num_hidden_layers=32, ffn_dim=16384, num_attention_heads=32, vocab_size=50272,
                max_position_embeddings=2048, word_embed_proj_dim=4096)
LLAMA_7B = dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-6,
                tie_word_embeddings=False)
VIT_G = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16, image_size=224,
             patch_size=14, layer_norm_eps=1e-6, qkv_bias=True)
QFORMER = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
               cross_attention_frequency=2, encoder_hidden_size=1408)
SMALL_OPT = dict(hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=2, vocab_size=600,
                 max_position_embeddings=128, word_embed_proj_dim=64)
SMALL_LLM = dict(SMALL_OPT, hidden_size=96, ffn_dim=192, word_embed_proj_dim=96)

PRESETS = {
    # source text config, vision, qformer, queries, target (family, config), tokenizer vocab sizes, shard size
    "opt-6.7b": dict(source_text=OPT_2_7B, vision=VIT_G, qformer=QFORMER, queries=32, target=("opt", OPT_6_7B),
                     opt_vocab=50265, llama_vocab=32000, shard="5GB", batch=2),
    "llama-7b": dict(source_text=OPT_2_7B, vision=VIT_G, qformer=QFORMER, queries=32, target=("llama", LLAMA_7B),
                     opt_vocab=50265, llama_vocab=32000, shard="5GB", batch=2),
    "small": dict(source_text=SMALL_OPT, queries=4, target=("opt", SMALL_LLM), opt_vocab=400, llama_vocab=300,
                  shard="200KB", batch=2,
                  vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, qkv_bias=True),
                  qformer=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                               cross_attention_frequency=1, encoder_hidden_size=32)),
}
STEPS = {"fp32": ["--dtype", "fp32"], "8bit": ["--load-in-8bit", "--dtype", "fp32"], "4bit": ["--load-in-4bit", "--dtype", "fp32"],
         # the frozen ViT stored in bf16 beside the quantised LLM (LAVIS keeps BLIP-2's ViT in fp16)
         "8bit-vit-bf16": ["--load-in-8bit", "--dtype", "fp32", "--vision-dtype", "bf16"],
         "4bit-vit-bf16": ["--load-in-4bit", "--dtype", "fp32", "--vision-dtype", "bf16"]}


# --- checkpoints: meta-device models written one random tensor at a time ------------------------------

def _tokenizers(opt_vocab: int, llama_vocab: int, seed: int = 0):
    """OPT-style and LLaMA-style tokenizers trained on random words (enough distinct words for the vocabularies)."""
    from vpgtrans.demo.vocab import train_llama_tokenizer, train_opt_tokenizer

    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 7))) for _ in range(max(60000, opt_vocab))]
    corpus = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(max(200, opt_vocab * 4 // 5))]
    return train_opt_tokenizer(corpus, opt_vocab), train_llama_tokenizer(corpus, llama_vocab - 259)


POOL_SIZE = (1 << 25) + 4099  # values; not a multiple of any row width, so windows never repeat a row


class RandomPool:
    """Random values for whole checkpoints at disk speed: one pool of N(0, 0.02) values per dtype (drawing
    10 billion normals costs more than an hour on a loaded 2-core machine), each tensor a window of it from
    a seeded random offset, wrapping around. Norm weights are 1. Rows of a table are shifted windows of the
    pool: all different, and no two tensors start alike."""

    def __init__(self, seed: int = 0):
        self.seed, self.pools = seed, {}

    def __call__(self, name: str, meta):
        import torch

        if not meta.is_floating_point():
            return torch.zeros(meta.shape, dtype=meta.dtype)
        if meta.dim() == 1 and "norm" in name and name.endswith("weight"):
            return torch.ones(meta.shape, dtype=meta.dtype)
        if meta.dtype not in self.pools:
            generator = torch.Generator().manual_seed(self.seed)
            self.pools[meta.dtype] = torch.randn(POOL_SIZE, generator=generator).mul_(0.02).to(meta.dtype)
        pool, numel = self.pools[meta.dtype], meta.numel()
        offset = zlib.crc32(f"{self.seed}:{name}".encode()) % POOL_SIZE
        out = torch.empty(numel, dtype=meta.dtype)
        done = 0
        while done < numel:  # windows of the pool, wrapping around
            take = min(numel - done, POOL_SIZE - offset)
            out[done:done + take] = pool[offset:offset + take]
            done, offset = done + take, (offset + take) % POOL_SIZE
        return out.view(meta.shape)


def write_checkpoint(model_cls, config, out_dir: Path, dtype, max_shard_size: str, tokenizer=None, seed: int = 0) -> dict:
    """An HF directory for ``model_cls(config)`` with random weights, never materialising the model."""
    import torch

    from vpgtrans.formats.shards import save_state_metas, write_sharded

    start = time.perf_counter()
    with torch.device("meta"):
        model = model_cls(config).to(dtype)
    metas = save_state_metas(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    values = RandomPool(seed)
    files = write_sharded(out_dir, metas, lambda name: values(name, metas[name]), max_shard_size,
                          model.num_parameters())
    config.dtype = dtype
    model.config.save_pretrained(out_dir)
    model.generation_config.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return {"path": str(out_dir), "params": model.num_parameters(), "files": len(files),
            "bytes": sum(f.stat().st_size for f in files), "write_s": round(time.perf_counter() - start, 1)}


def build_checkpoints(preset: dict, root: Path, dtype) -> dict:
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, LlamaConfig, LlamaForCausalLM, OPTConfig,
                              OPTForCausalLM)

    opt_tok, llama_tok = _tokenizers(preset["opt_vocab"], preset["llama_vocab"])
    ids = dict(bos_token_id=opt_tok.bos_token_id, eos_token_id=opt_tok.eos_token_id, pad_token_id=opt_tok.pad_token_id)
    source_text = OPTConfig(**preset["source_text"], **ids)
    source = Blip2Config(vision_config=preset["vision"], qformer_config=preset["qformer"],
                         text_config=source_text.to_dict(), num_query_tokens=preset["queries"])
    family, target = preset["target"]
    if family == "opt":
        target_cls, target_config, target_tok = OPTForCausalLM, OPTConfig(**target, **ids), opt_tok
    else:
        target_cls, target_tok = LlamaForCausalLM, llama_tok
        target_config = LlamaConfig(**target, bos_token_id=llama_tok.bos_token_id, eos_token_id=llama_tok.eos_token_id)
    return {"source": write_checkpoint(Blip2ForConditionalGeneration, source, root / "source", dtype, preset["shard"], opt_tok),
            "target": write_checkpoint(target_cls, target_config, root / "target", dtype, preset["shard"], target_tok)}


def write_data(root: Path, image_size: int, rows: int = 8) -> Path:
    from PIL import Image

    data = root / "data"
    (data / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(rows):
        Image.new("RGB", (image_size, image_size), (30 * i % 256, 70 * i % 256, 110 * i % 256)).save(data / f"images/{i}.png")
        lines.append(json.dumps({"image": f"images/{i}.png", "caption": f"a photo of thing number {i}"}) + "\n")
    (data / "data.jsonl").write_text("".join(lines))
    return data


# --- what the commands must hold -------------------------------------------------------------------

DTYPE_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "BF16": 2, "F16": 2, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _bytes(shapes: dict, keep, bytes_per_value: int | None = None) -> int:
    """Bytes of the tensors ``keep(name)`` selects, as stored or at ``bytes_per_value``."""
    total = 0
    for name, (shape, dtype) in shapes.items():
        if keep(name):
            numel = 1
            for d in shape:
                numel *= d
            total += numel * (bytes_per_value or DTYPE_BYTES[dtype])
    return total


def expected_bytes(root: Path, target_family: str) -> dict:
    """Bytes inherit must read (the VPG + projector, both embedding tables; as stored and in fp32), and the
    8-bit step's weights (decoder linears in int8, everything else fp32)."""
    from vpgtrans.formats.hf import tensor_shapes

    source, target = tensor_shapes(root / "source"), tensor_shapes(root / "target")
    vpg = lambda n: n.startswith(("qformer.", "query_tokens", "language_projection.", "vision_model.post_layernorm."))
    embed = lambda n: n.endswith("embed_tokens.weight")
    linear = lambda n: ".layers." in n and n.endswith("proj.weight") or n.endswith(("fc1.weight", "fc2.weight"))
    inherit_fp32 = _bytes(source, vpg, 4) + _bytes(source, lambda n: n.startswith("language_model.") and embed(n), 4) \
        + _bytes(target, embed, 4)
    vision = lambda n: n.startswith("vision_model.") and not n.startswith("vision_model.post_layernorm.")
    frozen_vision_fp32 = _bytes(source, vision, 4) + _bytes(source, vpg, 4)  # the ViT + the VPG as a step holds them
    return {"inherit_read_fp32": inherit_fp32,
            "vision_and_vpg_fp32": frozen_vision_fp32,
            "vision_bf16_and_vpg_fp32": _bytes(source, vision, 2) + _bytes(source, vpg, 4),  # --vision-dtype bf16
            "export_stored": _bytes(source, lambda n: not n.startswith("language_model."), 2) + _bytes(target, lambda n: True, 2),
            "inherit_read_stored": _bytes(source, vpg) + _bytes(source, lambda n: n.startswith("language_model.") and embed(n))
            + _bytes(target, embed),
            "target_fp32": _bytes(target, lambda n: True, 4),
            "target_8bit": _bytes(target, linear, 1) + _bytes(target, lambda n: not linear(n), 4),
            "target_4bit": _bytes(target, linear, 1) // 2 + _bytes(target, lambda n: not linear(n), 4)}


# --- one measured subprocess ------------------------------------------------------------------------

def _status(pid: int) -> dict:
    fields = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return fields


def _meminfo() -> dict:
    info = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, value = line.partition(":")
        info[key] = int(value.split()[0]) * 1024
    return info


def run_measured(name: str, argv: list[str], log_dir: Path, env: dict | None = None) -> dict:
    """Run ``argv``; wall time, exact peak RSS, sampled peaks of anonymous and file-backed RSS."""
    meminfo = _meminfo()
    record = {"name": name, "argv": argv, "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
              "page_cache_gib": round(meminfo["Cached"] / GIB, 1), "available_gib": round(meminfo["MemAvailable"] / GIB, 1)}
    log_dir.mkdir(parents=True, exist_ok=True)
    slug = name.replace(" ", "_").replace("/", "-")
    out, err = log_dir / f"{slug}.out", log_dir / f"{slug}.err"
    peaks = {"RssAnon": 0, "RssFile": 0, "VmHWM": 0}
    start = time.perf_counter()
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        proc = subprocess.Popen(argv, stdout=stdout, stderr=stderr, env=env)
        done = threading.Event()

        def sample():
            while not done.is_set():
                status = _status(proc.pid)
                for key in peaks:
                    peaks[key] = max(peaks[key], status.get(key, 0))
                done.wait(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        # Not ru_maxrss: it counts the forked child before exec, i.e. this process's own RSS. VmHWM is the
        # exec'd program's own high-water mark (exact; the last sample is at most 50 ms old).
        _, status, usage = os.wait4(proc.pid, 0)
        done.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    record.update(wall_s=round(time.perf_counter() - start, 2), returncode=proc.returncode,
                  cpu_s=round(usage.ru_utime + usage.ru_stime, 2),  # CPU time: what the machine's load does not inflate
                  peak_rss_mib=round(peaks["VmHWM"] / 2**20), peak_anon_mib=round(peaks["RssAnon"] / 2**20),
                  peak_file_mib=round(peaks["RssFile"] / 2**20))
    lines = err.read_text(errors="replace").splitlines()
    warned = [line for line in lines if "warn" in line.lower()]
    record["warning_lines"] = len(warned)
    # each warning's first line without rich's time stamp (the message may wrap onto the next lines)
    record["warnings"] = [line.split("]", 1)[-1].strip() if line.startswith("[") else line.strip()
                          for line in warned[:20]]
    if proc.returncode != 0:
        record["error"] = "\n".join(lines[-5:])
    print(f"  {name:<22} {record['wall_s']:>8.1f} s  peak {record['peak_rss_mib']:>6} MiB  anon "
          f"{record['peak_anon_mib']:>6} MiB  file {record['peak_file_mib']:>6} MiB  rc {proc.returncode}", flush=True)
    return record


def step_weights(expected: dict, step: str) -> int:
    """The bytes of the weights a training step ``step`` (a key of ``STEPS``) holds: the LLM as quantised and
    the ViT + VPG, the ViT in bf16 for the ``-vit-bf16`` steps."""
    llm, _, vision = step.partition("-vit-")
    return expected[f"target_{llm}"] + expected["vision_bf16_and_vpg_fp32" if vision else "vision_and_vpg_fp32"]


def _fits(name: str, need: float, records: list) -> bool:
    """Whether ``need`` bytes fit in the memory available now; if not, a skipped record says so (the machine is
    shared: a command that would push others into swap or the OOM killer is not run)."""
    available = _meminfo()["MemAvailable"]
    if need <= available:
        return True
    records.append({"name": name, "skipped": f"needs ~{need / GIB:.1f} GiB for its weights alone, "
                                             f"{available / GIB:.1f} GiB available"})
    print(f"  {name:<22} skipped: {records[-1]['skipped']}", flush=True)
    return False


def _child_load_export(path: str) -> None:
    """The export as its users load it: transformers alone, default dtype (config.json's)."""
    from transformers import Blip2ForConditionalGeneration

    model = Blip2ForConditionalGeneration.from_pretrained(path)
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    print(json.dumps({"params": model.num_parameters(), "dtypes": dtypes}))


# --- the run ---------------------------------------------------------------------------------------

def run(preset_name: str, work_dir: Path, dtype_name: str, steps: list[str], keep: bool) -> dict:
    import torch

    preset = PRESETS[preset_name]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    free = shutil.disk_usage(work_dir).free
    print(f"real_shapes --preset {preset_name}: {free / 1e9:.0f} GB free under {work_dir}", flush=True)
    result = {"preset": preset_name, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": {**machine_info(), "memory_gib": round(_meminfo()["MemTotal"] / GIB, 1)},
              "disk_free_gb_before": round(free / 1e9, 1), "weights_dtype": dtype_name,
              "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg())}
    src, tgt, bundle, export = work_dir / "source", work_dir / "target", work_dir / "bundle", work_dir / "export"
    data = work_dir / "data"
    try:  # a failed or interrupted run leaves nothing of its ~35 GB behind either
        start = time.perf_counter()
        result["checkpoints"] = build_checkpoints(preset, work_dir, dtype)
        result["checkpoints_write_s"] = round(time.perf_counter() - start, 1)
        print(f"  checkpoints written in {result['checkpoints_write_s']} s: " + ", ".join(
            f"{k} {v['params'] / 1e9:.2f}B params {v['bytes'] / 1e9:.1f} GB" for k, v in result["checkpoints"].items()), flush=True)
        family = preset["target"][0]
        result["expected_bytes"] = expected_bytes(work_dir, family)
        write_data(work_dir, preset["vision"]["image_size"])  # = data
        cli = [sys.executable, "-m", "vpgtrans"]
        logs = work_dir / "logs"
        commands = [
            ("inspect source", cli + ["inspect", str(src), "--json"]),
            ("inspect target", cli + ["inspect", str(tgt), "--json"]),
            ("inherit", cli + ["inherit", "--source", str(src), "--target-llm", str(tgt), "--out", str(bundle)]),
            ("export", cli + ["export", str(bundle), "--out", str(export), "--max-shard-size", preset["shard"]]),
            ("load export", [sys.executable, "-m", "benchmarks.real_shapes", "--child-load-export", str(export)]),
        ]
        records = []
        for name, argv in commands:
            need = result["expected_bytes"]["export_stored"] * 1.1 if name == "load export" else 0
            if not _fits(name, need, records):
                continue
            records.append(run_measured(name, argv, logs))
        for step in steps:
            name = f"train step {step}"
            if not _fits(name, step_weights(result["expected_bytes"], step) * 1.1, records):
                continue
            argv = cli + ["warmup-projector", str(bundle), "--data", str(data), "--out", str(work_dir / f"step-{step}"),
                          "--max-steps", "1", "--batch-size", str(preset["batch"]), "--max-text-len", "32"] + STEPS[step]
            records.append(run_measured(name, argv, logs))
        load = next(r for r in records if r["name"] == "load export")
        if load.get("returncode") == 0:
            load["loaded"] = json.loads((logs / "load_export.out").read_text().splitlines()[-1])
        result["commands"] = records
        export_files = sorted(p.name for p in export.iterdir()) if export.is_dir() else []
        result["export"] = {"files": [f for f in export_files if f.endswith(".safetensors")],
                            "config_dtype": json.loads((export / "config.json").read_text()).get("dtype")
                            if export.is_dir() else None}
        # The targets are about real sizes: at tiny shapes the interpreter and its imports are all there is.
        result["targets"] = evaluate_targets(result) if preset_name != "small" else {}
    finally:
        if not keep:
            for path in (src, tgt, bundle, export, data, *work_dir.glob("step-*")):
                shutil.rmtree(path, ignore_errors=True)
    return result


def evaluate_targets(result: dict) -> dict:
    """The issue's targets, with the measured value next to each."""
    by_name = {r["name"]: r for r in result["commands"]}
    expected = result["expected_bytes"]
    targets = {}
    inherit = by_name.get("inherit", {})
    if "peak_rss_mib" in inherit:
        ratio = inherit["peak_rss_mib"] * 2**20 / expected["inherit_read_fp32"]
        targets["inherit peak RSS <= 1.5x bytes read (fp32)"] = {"value": round(ratio, 2), "met": ratio <= 1.5}
        targets["inherit <= 60 s"] = {"value": inherit["wall_s"], "met": inherit["wall_s"] <= 60}
    export = by_name.get("export", {})
    if "peak_anon_mib" in export:
        targets["export anonymous RSS < 1 GiB"] = {"value": export["peak_anon_mib"], "met": export["peak_anon_mib"] < 1024}
        targets["export sharded, one dtype"] = {"value": f"{len(result['export']['files'])} files, "
                                                         f"{result['export']['config_dtype']}",
                                                "met": len(result["export"]["files"]) > 1}
    for name in ("inspect source", "inspect target"):
        if "cpu_s" in by_name.get(name, {}):  # CPU time: the wall time is the machine's load as much as ours
            targets[f"{name} < 1 s (CPU time)"] = {"value": by_name[name]["cpu_s"], "met": by_name[name]["cpu_s"] < 1}
    for step, held in (("8bit", "LLM int8 + ViT/VPG fp32"), ("8bit-vit-bf16", "LLM int8 + ViT bf16 + VPG fp32")):
        record = by_name.get(f"train step {step}", {})
        if "peak_anon_mib" in record:
            # The weights a step holds: the LLM (int8 linears, the rest fp32), the ViT (fp32 or bf16), the VPG.
            ratio = record["peak_anon_mib"] * 2**20 / step_weights(expected, step)
            targets[f"{step} step anonymous RSS <= 1.3x weights ({held})"] = {"value": round(ratio, 2),
                                                                              "met": ratio <= 1.3}
            targets[f"{step} step warnings summarised"] = {"value": record["warning_lines"],
                                                          "met": record["warning_lines"] <= 2}
    return targets


# --- the table -------------------------------------------------------------------------------------

def markdown(results: dict) -> str:
    """The docs table of ``results`` ({preset: run result})."""
    lines = ["| preset | command | wall s | CPU s | peak RSS MiB | anonymous MiB | file-backed MiB | warnings | load before | "
             "page cache GiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for preset, result in results.items():
        for r in result["commands"]:
            if "skipped" in r:
                lines.append(f"| {preset} | {r['name']} | skipped: {r['skipped']} | | | | | | | |")
                continue
            status = "" if r["returncode"] == 0 else f" (**failed**, exit {r['returncode']})"
            lines.append(f"| {preset} | {r['name']}{status} | {r['wall_s']:.1f} | {r.get('cpu_s', '')} | {r['peak_rss_mib']} | "
                         f"{r['peak_anon_mib']} | "
                         f"{r['peak_file_mib']} | {r['warning_lines']} | {r['load']} | {r['page_cache_gib']} |")
    lines += ["", "| preset | target | measured | met |", "|---|---|---|---|"]
    for preset, result in results.items():
        for target, value in result["targets"].items():
            lines.append(f"| {preset} | {target} | {value['value']} | {'yes' if value['met'] else '**no**'} |")
    return "\n".join(lines)


def write_docs(results: dict, docs: Path = DOCS) -> None:
    text = docs.read_text()
    if DOC_BEGIN not in text or DOC_END not in text:
        raise SystemExit(f"{docs}: no real_shapes table markers ({DOC_BEGIN!r} ... {DOC_END!r})")
    head, rest = text.split(DOC_BEGIN, 1)
    tail = rest.split(DOC_END, 1)[1]
    docs.write_text(f"{head}{DOC_BEGIN}\n{markdown(results)}\n{DOC_END}{tail}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.real_shapes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None)
    parser.add_argument("--work-dir", type=Path, default=None, help="where the checkpoints go (default: a temp dir)")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="weights' dtype on disk")
    parser.add_argument("--steps", nargs="*", choices=sorted(STEPS), default=list(STEPS), help="training steps to measure")
    parser.add_argument("--out", type=Path, default=None,
                        help="results JSON (default benchmarks/results/real_shapes.json; small: real_shapes.small.json)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints and outputs")
    parser.add_argument("--table", action="store_true", help="print the markdown table of the results JSON")
    parser.add_argument("--write-docs", action="store_true", help="write that table into docs/benchmarks.md")
    parser.add_argument("--child-load-export", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_load_export:
        return _child_load_export(args.child_load_export)
    out = args.out or RESULTS_DIR / ("real_shapes.small.json" if args.preset == "small" else "real_shapes.json")
    if args.table or args.write_docs:
        results = json.loads(out.read_text())
        print(markdown(results))
        if args.write_docs:
            write_docs(results)
        return None
    if args.preset is None:
        parser.error("give --preset (or --table / --write-docs)")
    if args.work_dir is None:
        with tempfile.TemporaryDirectory(prefix="real_shapes-") as tmp:
            result = run(args.preset, Path(tmp), args.dtype, args.steps, args.keep)
    else:
        args.work_dir.mkdir(parents=True, exist_ok=True)
        result = run(args.preset, args.work_dir, args.dtype, args.steps, args.keep)
    results = json.loads(out.read_text()) if out.is_file() else {}
    results[args.preset] = result
    write_json(out, results)
    print(markdown({args.preset: result}))
    print(f"-> {out}")
    return None


if __name__ == "__main__":
    main()
