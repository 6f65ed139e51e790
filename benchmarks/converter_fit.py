"""The word converter: vpgtrans's closed-form ridge fit vs the reference's SGD fit, on embedding tables of
real size (default: a 32k x 2560 source table, OPT-2.7B's width, and a 32k x 4096 target, LLaMA-7B's).

    python -m benchmarks.converter_fit                 # full size, a few minutes on 2 CPU cores
    python -m benchmarks.converter_fit --smoke         # tiny tables, about a second

The tables are synthetic: the target embedding of a shared token is a random linear map of its source
embedding plus noise; source embeddings are anisotropic like real ones (a common offset and a decaying
spectrum). 10% of the shared tokens are held out; both fits see only the rest and are scored by the
mean cosine between converted and true target embeddings of the held-out tokens.

- **closed form** (vpgtrans): ``vpgtrans.converter.fit_ridge`` on the unique training pairs, weighted by
  corpus frequency as ``vpgtrans inherit --corpus`` weights them (1 + log(1 + count)): on float32 tables
  its two big products run in float32 and the solve in float64. A second row times the same function
  on float64 copies of the tables (float64 throughout, what ``fit_ridge`` did before), for reference.
- **SGD** (reference, DESIGN §2/§7): ``nn.Linear`` trained with plain SGD, lr 5.0, loss mean(1 - cos), at the
  reference's budget: **8 epochs** of batches of 4096 captions flattened to token rows (~45k rows a batch,
  ``batch_size``), over a corpus sized so that the 8 epochs are ~1,200 optimiser steps (the reference's
  OPT -> LLaMA script over COCO + SBU: ~1,000-1,700). Every occurrence of a token in the caption stream is
  one row (Zipf-distributed frequencies). A batch's rows are summed per distinct token (each token's loss
  times its count, over the batch's row count): the same loss and gradient as the row-by-row mean, at the
  cost of the distinct tokens.

**Zoo case** (``zoo_pairs``): the same two fits on *real* tables whose relation is not least squares' own
model — the embedding tables of the benchmark zoo's tiny LLMs, pre-trained on the same world text (opt-s ->
opt-l: same tokenizer, other seed and width; opt-s -> llama-s: another tokenizer), paired by
``vpgtrans.converter.pair_tokens`` (what ``inherit`` runs), restricted to tokens the world's captions use
(the others are untrained rows), 10% held out; the caption-token stream is the world's caption_train
split tokenised; SGD at the same budget (steps and rows per step). ``--smoke`` uses the random-weight tiny
zoo (plumbing only); a full run the trained zoo-v2 (built and cached when missing).

Timings are wall-clock of the fit only (tables already in memory), ``torch.set_num_threads`` as given.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks.common import (add_zoo_options, machine_info, quiet_libraries, require_matplotlib, result_config,
                               result_parser, save_result, write_docs_section, zoo_v2)


@dataclass
class ConverterBenchConfig:
    source_vocab: int = 32000
    target_vocab: int = 32000
    source_dim: int = 2560
    target_dim: int = 4096
    shared: int = 12000  # tokens with the same string in both vocabularies (OPT's 50k vs LLaMA's 32k: ~1/3)
    noise: float = 0.5  # per-dimension noise std relative to the signal's
    heldout_fraction: float = 0.1
    corpus_tokens: int = 150 * 45_056  # token occurrences per SGD epoch: 150 batches, 8 epochs = 1,200 steps
    zipf: float = 1.0
    epochs: int = 8  # the reference's OPT -> LLaMA script
    batch_size: int = 45_056  # rows per step: 4096 captions x ~11 tokens
    lr: float = 5.0
    ridge: float = 1e-3
    seed: int = 0
    threads: int = 1  # on a shared 2-core machine one thread was faster than two, even for big matmuls
    zoo_pairs: str = "opt-s:opt-l,opt-s:llama-s"  # source:target LLMs of the zoo case ("" = none)
    zoo_seed: int = 0


SMOKE = dict(source_vocab=600, target_vocab=500, source_dim=32, target_dim=48, shared=300, corpus_tokens=2000,
             epochs=2, batch_size=256)


def make_tables(cfg: ConverterBenchConfig) -> dict:
    """Synthetic embedding tables and pairs. Returns ``source`` (V_s, D_s), ``target`` (V_t, D_t),
    ``train_source_ids`` / ``train_target_ids`` / ``heldout_source_ids`` / ``heldout_target_ids`` and the
    corpus ``counts`` (V_t,) of the training tokens."""
    g = torch.Generator().manual_seed(cfg.seed)
    spectrum = (torch.arange(cfg.source_dim, dtype=torch.float32) + 1) ** -0.5  # anisotropic, like real tables
    spectrum = spectrum / spectrum.pow(2).mean().sqrt()
    offset = torch.randn(cfg.source_dim, generator=g) * 0.5
    source = (torch.randn(cfg.source_vocab, cfg.source_dim, generator=g) * spectrum + offset) * 0.02  # (V_s, D_s)
    target = torch.randn(cfg.target_vocab, cfg.target_dim, generator=g) * 0.02  # unshared rows: unrelated
    mapping = torch.randn(cfg.target_dim, cfg.source_dim, generator=g) / cfg.source_dim ** 0.5  # (D_t, D_s)
    shift = torch.randn(cfg.target_dim, generator=g) * 0.01
    source_ids = torch.randperm(cfg.source_vocab, generator=g)[:cfg.shared]
    target_ids = torch.randperm(cfg.target_vocab, generator=g)[:cfg.shared]
    signal = source[source_ids] @ mapping.T  # (n, D_t)
    noise = torch.randn(cfg.shared, cfg.target_dim, generator=g) * signal.std() * cfg.noise
    target[target_ids] = signal + shift + noise
    n_heldout = max(1, round(cfg.shared * cfg.heldout_fraction))
    order = torch.randperm(cfg.shared, generator=g)
    held, train = order[:n_heldout], order[n_heldout:]
    # Zipf frequencies over the training tokens in a random rank order: the caption-token stream's law.
    rank_weights = (torch.arange(len(train), dtype=torch.float64) + 2.7) ** -cfg.zipf
    frequency = torch.zeros(len(train), dtype=torch.float64)
    frequency[torch.randperm(len(train), generator=g)] = rank_weights / rank_weights.sum()
    return {"source": source, "target": target, "train_source_ids": source_ids[train],
            "train_target_ids": target_ids[train], "heldout_source_ids": source_ids[held],
            "heldout_target_ids": target_ids[held], "frequency": frequency}


def corpus_stream(frequency: torch.Tensor, length: int, generator: torch.Generator) -> torch.Tensor:
    """One epoch of the caption-token stream: ``length`` draws of training-pair indices by frequency."""
    return torch.multinomial(frequency, length, replacement=True, generator=generator)


def heldout_cosine(weight: torch.Tensor, bias: torch.Tensor, tables: dict) -> float:
    """Mean cosine between converted and true target embeddings of the held-out shared tokens."""
    from vpgtrans.converter import mean_cosine

    x = tables["source"][tables["heldout_source_ids"]].double()
    y = tables["target"][tables["heldout_target_ids"]]
    return mean_cosine(x @ weight.double().T + bias.double(), y)


def fit_closed_form(cfg: ConverterBenchConfig, tables: dict) -> dict:
    """vpgtrans's fit: ridge least squares on the unique training pairs, frequency-weighted."""
    from vpgtrans.converter import fit_ridge

    counts = torch.bincount(corpus_stream(tables["frequency"], cfg.corpus_tokens, torch.Generator().manual_seed(cfg.seed + 1)),
                            minlength=len(tables["frequency"])).double()
    weights = 1.0 + torch.log1p(counts)  # as vpgtrans.converter.pair_tokens weights pairs by a corpus
    x = tables["source"][tables["train_source_ids"]]
    y = tables["target"][tables["train_target_ids"]]
    started = time.perf_counter()
    weight, bias = fit_ridge(x, y, weights, cfg.ridge)
    seconds = time.perf_counter() - started
    started = time.perf_counter()
    weight64, bias64 = fit_ridge(x.double(), y.double(), weights, cfg.ridge)
    seconds64 = time.perf_counter() - started
    return {"seconds": seconds, "heldout_cosine": heldout_cosine(weight, bias, tables), "pairs": len(x),
            "float64": {"seconds": seconds64, "heldout_cosine": heldout_cosine(weight64, bias64, tables)}}


def fit_sgd(cfg: ConverterBenchConfig, tables: dict) -> dict:
    """The reference's fit: SGD (lr 5.0) on mean(1 - cos) over the caption-token stream, epoch by epoch.
    Only the optimisation is timed; the held-out cosine after each epoch is measured outside the clock."""
    torch.manual_seed(cfg.seed)
    converter = torch.nn.Linear(tables["source"].shape[1], tables["target"].shape[1])
    optimizer = torch.optim.SGD(converter.parameters(), lr=cfg.lr)
    x_all = tables["source"][tables["train_source_ids"]]  # (n, D_s)
    y_all = tables["target"][tables["train_target_ids"]]  # (n, D_t)
    stream_generator = torch.Generator().manual_seed(cfg.seed + 1)  # the same first epoch the closed form counts
    seconds, epochs, rows, steps = 0.0, [], 0, 0
    for epoch in range(cfg.epochs):
        stream = corpus_stream(tables["frequency"], cfg.corpus_tokens, stream_generator)
        started = time.perf_counter()
        for start in range(0, len(stream), cfg.batch_size):
            rows_ = stream[start:start + cfg.batch_size]
            # mean over the batch's rows = sum over its distinct tokens of count x loss, / rows
            distinct, counts = rows_.unique(return_counts=True)
            predicted = converter(x_all[distinct])  # (U, D_t)
            cosine = torch.nn.functional.cosine_similarity(predicted, y_all[distinct], dim=-1)
            loss = ((1 - cosine) * counts).sum() / len(rows_)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            rows += len(rows_)
            steps += 1
        seconds += time.perf_counter() - started
        with torch.no_grad():
            cosine = heldout_cosine(converter.weight, converter.bias, tables)
        epochs.append({"epoch": epoch + 1, "seconds": round(seconds, 3), "rows": rows, "steps": steps,
                       "heldout_cosine": cosine, "loss": loss.item()})
    return {"seconds": seconds, "heldout_cosine": epochs[-1]["heldout_cosine"], "rows": rows, "steps": steps,
            "epochs": epochs}


def zoo_tables(cfg: ConverterBenchConfig, zoo: dict, source: str, target: str) -> dict:
    """``make_tables``'s layout from two of the zoo's LLMs: their input-embedding tables, the tokens
    ``pair_tokens`` pairs that the world's training captions use (10% held out), and those tokens' caption
    frequencies (counted in the target tokenizer, as ``inherit --corpus`` counts them)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vpgtrans.converter import pair_tokens

    models = {name: AutoModelForCausalLM.from_pretrained(zoo[name]) for name in (source, target)}
    tokenizers = {name: AutoTokenizer.from_pretrained(zoo[name]) for name in (source, target)}
    captions = [json.loads(line)["caption"] for line in (Path(zoo["world"]) / "caption_train" / "data.jsonl").open()]
    pairs = pair_tokens(tokenizers[source], tokenizers[target])
    counts = torch.zeros(len(tokenizers[target]), dtype=torch.float64)
    for caption in captions:
        ids = tokenizers[target](caption, add_special_tokens=False)["input_ids"]
        counts.index_add_(0, torch.tensor(ids, dtype=torch.long), torch.ones(len(ids), dtype=torch.float64))
    used = counts[pairs.target_ids] > 0  # the other pairs are rows neither LLM saw in training
    source_ids, target_ids = pairs.source_ids[used], pairs.target_ids[used]
    g = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(target_ids), generator=g)
    n_heldout = max(1, round(len(order) * cfg.heldout_fraction))
    held, train = order[:n_heldout], order[n_heldout:]
    frequency = counts[target_ids[train]]
    tables = {name: models[name].get_input_embeddings().weight.detach().float() for name in (source, target)}
    return {"source": tables[source], "target": tables[target], "train_source_ids": source_ids[train],
            "train_target_ids": target_ids[train], "heldout_source_ids": source_ids[held],
            "heldout_target_ids": target_ids[held], "frequency": frequency / frequency.sum(),
            "pairs": {"paired": len(pairs.target_ids), "used_in_captions": int(used.sum()), "train": len(train),
                      "heldout": n_heldout, "caption_tokens": int(counts.sum())}}


def run_zoo_case(cfg: ConverterBenchConfig, zoo: dict) -> list[dict]:
    """Closed form vs SGD (the same budget) on each ``zoo_pairs`` pair of the zoo's LLMs."""
    cases = []
    for pair in filter(None, cfg.zoo_pairs.split(",")):
        source, target = pair.split(":")
        tables = zoo_tables(cfg, zoo, source, target)
        closed, sgd = fit_closed_form(cfg, tables), fit_sgd(cfg, tables)
        cases.append({"source": source, "target": target, "pairs": tables["pairs"],
                      "dims": [tables["source"].shape[1], tables["target"].shape[1]],
                      "closed_form": closed, "sgd": sgd, "cosine_gap": closed["heldout_cosine"] - sgd["heldout_cosine"]})
    return cases


def run(cfg: ConverterBenchConfig, zoo=None) -> dict:
    """The synthetic case, then the zoo case on ``zoo`` (the zoo's paths, or a function returning them: the
    zoo is then only built or read when the synthetic case is done)."""
    threads, load = torch.get_num_threads(), os.getloadavg()
    torch.set_num_threads(cfg.threads)
    try:
        started = time.perf_counter()
        tables = make_tables(cfg)
        setup = time.perf_counter() - started
        closed = fit_closed_form(cfg, tables)
        sgd = fit_sgd(cfg, tables)
        zoo_cases = run_zoo_case(cfg, zoo() if callable(zoo) else zoo) if zoo is not None else []
    finally:
        torch.set_num_threads(threads)
    speedup = sgd["seconds"] / closed["seconds"]
    loadavg = {"loadavg_start": [round(x, 2) for x in load], "loadavg_end": [round(x, 2) for x in os.getloadavg()],
               "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    reached = next((p for p in sgd["epochs"] if p["heldout_cosine"] >= closed["heldout_cosine"]), None)
    sgd["seconds_to_closed_form_cosine"] = None if reached is None else reached["seconds"]  # None: not within its epochs
    return {"benchmark": "converter_fit", "config": asdict(cfg), "machine": {**machine_info(), "torch_threads": cfg.threads},
            "setup_seconds": round(setup, 2), "closed_form": closed, "sgd": sgd, "speedup": speedup,
            "cosine_gap": closed["heldout_cosine"] - sgd["heldout_cosine"], "zoo_cases": zoo_cases,
            "target_met": bool(speedup >= 20 and closed["heldout_cosine"] >= sgd["heldout_cosine"]), **loadavg}


COLUMNS = ("fit", "data", "wall time (s)", "held-out cosine", "SGD time ÷ this")
DOCS_BEGIN, DOCS_END = "<!-- converter_fit:begin -->", "<!-- converter_fit:end -->"


def _rows(result: dict) -> list[list[str]]:
    cfg = result["config"]
    closed, sgd = result["closed_form"], result["sgd"]
    f64 = closed["float64"]
    rows = [["closed form (vpgtrans, ridge)", f"{closed['pairs']} unique pairs, frequency-weighted",
             f"{closed['seconds']:.2f}", f"{closed['heldout_cosine']:.4f}", f"{result['speedup']:.1f}x"],
            ["  same fit, float64 throughout (before 0.1.0)", "same", f"{f64['seconds']:.2f}",
             f"{f64['heldout_cosine']:.4f}", f"{sgd['seconds'] / f64['seconds']:.1f}x"],
            [f"SGD lr {cfg['lr']} (reference)", f"{sgd['rows']} rows = {cfg['epochs']} epochs x "
             f"{cfg['corpus_tokens']} tokens, {sgd['steps']} steps", f"{sgd['seconds']:.2f}",
             f"{sgd['heldout_cosine']:.4f}", "1.0x"]]
    rows += [[f"  SGD after epoch {point['epoch']}", f"{point['rows']} rows, {point['steps']} steps",
              f"{point['seconds']:.2f}", f"{point['heldout_cosine']:.4f}", ""] for point in sgd["epochs"][:-1]]
    for case in result.get("zoo_cases", []):
        name = f"zoo {case['source']} -> {case['target']} ({case['dims'][0]} -> {case['dims'][1]})"
        rows.append([f"{name}: closed form", f"{case['pairs']['train']} pairs used in captions",
                     f"{case['closed_form']['seconds']:.3f}", f"{case['closed_form']['heldout_cosine']:.4f}",
                     f"{case['sgd']['seconds'] / max(case['closed_form']['seconds'], 1e-9):.1f}x"])
        rows.append([f"{name}: SGD", f"{case['sgd']['rows']} rows, {case['sgd']['steps']} steps",
                     f"{case['sgd']['seconds']:.2f}", f"{case['sgd']['heldout_cosine']:.4f}", "1.0x"])
    return rows


def render(result: dict):
    from rich.table import Table

    cfg = result["config"]
    table = Table(title=f"word converter fit: {cfg['source_vocab']}x{cfg['source_dim']} -> "
                        f"{cfg['target_vocab']}x{cfg['target_dim']}, {cfg['shared']} shared tokens")
    for column in COLUMNS:
        table.add_column(column, justify="left" if column in ("fit", "data") else "right")
    for row in _rows(result):
        table.add_row(*row)
    return table


def markdown(result: dict) -> str:
    """The docs/benchmarks.md table of a run (``--write-docs``), with its machine, load and date."""
    machine = result["machine"]
    lines = [DOCS_BEGIN, "", "*Written by `python -m benchmarks.converter_fit --write-docs`; do not edit by hand.*",
             "", f"Run: {result.get('finished', '?')}, {machine['cpu']}, {machine['torch_threads']} torch thread(s), "
             f"load average before / after {result.get('loadavg_start')} / {result.get('loadavg_end')}.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(result)]
    lines += ["", f"Target (closed form >= 20x faster at equal or better held-out cosine): "
              f"{'met' if result['target_met'] else 'not met'}.", "", DOCS_END]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Path:
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = result["sgd"]["epochs"]
    ax.plot([p["seconds"] for p in epochs], [p["heldout_cosine"] for p in epochs], "o-", label="SGD lr 5.0 (reference), per epoch")
    closed = result["closed_form"]
    ax.plot([closed["seconds"]], [closed["heldout_cosine"]], "*", markersize=14, label="closed form (vpgtrans)")
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("held-out cosine")
    cfg = result["config"]
    ax.set_title(f"converter fit {cfg['source_dim']} -> {cfg['target_dim']}, {cfg['shared']} shared tokens")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict:
    parser = result_parser("converter_fit", __doc__, "tiny tables (seconds); for tests", ConverterBenchConfig)
    add_zoo_options(parser)
    parser.add_argument("--write-docs", action="store_true",
                        help="after a full run, regenerate the converter table of docs/benchmarks.md from its result")
    args = parser.parse_args(argv)
    cfg = result_config(args, ConverterBenchConfig, SMOKE)
    quiet_libraries()
    with tempfile.TemporaryDirectory(prefix="vpgtrans-converter-") as tmp:
        zoo = (lambda: zoo_v2(args, cfg.zoo_seed, Path(tmp))) if cfg.zoo_pairs else None
        result = run(cfg, zoo)
    out = save_result("converter_fit", args, result, plot)
    if args.write_docs and not args.smoke:
        print(f"wrote {write_docs_section(markdown(result), DOCS_BEGIN, DOCS_END)}")
    from rich.console import Console

    console = Console(width=150)
    console.print(render(result))
    console.print(f"target (closed form >= 20x faster at equal or better held-out cosine): "
                  f"{'met' if result['target_met'] else 'NOT met'}; results: {out}")
    return result


if __name__ == "__main__":
    main()
