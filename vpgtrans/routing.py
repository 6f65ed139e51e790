"""Routing analysis for MoE targets (``vpgtrans inspect BUNDLE --routing --data DIR [--out DIR]``): which
experts the visual tokens take, per layer, next to the text tokens ("modality pathways").

The bundle's model runs teacher-forced over the first ``max_samples`` rows of ``data`` (the training format:
image slots, prompt, target). A forward hook on every router (``mlp.gate``, frozen) reads its logits and its
top-k choice for each token; tokens are split into visual (image slots), text (the rest) and padding
(ignored). Per layer and expert:

    visual, text           top-k assignments of visual / text tokens to the expert (counts)
    visual_load, text_load the expert's share of all visual / all text assignments in the layer (each sums to 1)
    visual_preference      visual_load / (visual_load + text_load): 0.5 = used alike by both modalities,
                           1 = only images, 0 = only text (independent of how many tokens of each there are)
    mean_prob_visual/text  the router's mean softmax probability for the expert

The routers never train, but what reaches them does (the projector, the VPG, plora's LoRA in earlier
layers): run it on the inherit bundle and on the trained one, with the same data, to compare.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from vpgtrans.errors import VpgtransError

# model_type -> the path (in a decoder layer) of the router whose forward returns (logits, weights, top-k index)
ROUTERS = {"mixtral": "mlp.gate", "olmoe": "mlp.gate", "qwen2_moe": "mlp.gate"}
PAD, TEXT, VISUAL = -1, 0, 1


def _routers(llm) -> dict[int, torch.nn.Module]:
    model_type = llm.config.model_type
    if model_type not in ROUTERS:
        raise VpgtransError(f"routing analysis needs an MoE LLM ({', '.join(ROUTERS)}); this bundle's LLM is "
                            f"{model_type!r}")
    pattern = re.compile(r"model\.layers\.(\d+)\." + re.escape(ROUTERS[model_type]) + "$")
    found = {int(m.group(1)): module for name, module in llm.named_modules() if (m := pattern.match(name))}
    if not found:
        raise VpgtransError(f"no router ({ROUTERS[model_type]}) found in this {model_type} LLM")
    return dict(sorted(found.items()))


def routing_report(bundle_dir: Path, data: Path, max_samples: int = 64, batch_size: int = 8, device=None) -> dict:
    """Per layer and expert, how the router's top-k assignments split between visual and text tokens
    (see the module docstring for each field)."""
    from vpgtrans.bundle import load_model
    from vpgtrans.collate import Collator
    from vpgtrans.data import load_rows
    from vpgtrans.model.vlm import IMAGE_TOKEN_ID

    if max_samples < 1 or batch_size < 1:
        raise VpgtransError("--max-samples and the batch size must be >= 1")
    device = device or "cpu"
    model = load_model(bundle_dir, device=device)
    routers = _routers(model.llm)
    first = next(iter(routers.values()))
    num_experts, top_k = int(first.num_experts), int(first.top_k)
    layers = list(routers)
    counts = torch.zeros(len(layers), 2, num_experts, dtype=torch.long)  # (L, text/visual, E)
    prob_sums = torch.zeros(len(layers), 2, num_experts, dtype=torch.float64)
    kinds = {}  # the current batch's token kinds, flattened (B*T,): PAD, TEXT or VISUAL

    def hook(row: int):
        def record(module, args, output):
            logits, _, index = output  # (B*T, E), (B*T, k), (B*T, k)
            for kind in (TEXT, VISUAL):
                chosen = kinds["tokens"] == kind
                counts[row, kind] += torch.bincount(index[chosen].reshape(-1).cpu(), minlength=num_experts)
                prob_sums[row, kind] += torch.softmax(logits[chosen].double(), dim=-1).sum(0).cpu()
        return record

    handles = [router.register_forward_hook(hook(row)) for row, router in enumerate(routers.values())]
    dataset, task, _ = load_rows(data)
    rows = [dataset[i] for i in range(min(max_samples, len(dataset)))]
    collate = Collator(model.tokenizer, model.template, task, model.num_image_tokens, model.image_processor,
                       model.is_encoder_decoder, mode="train")
    tokens = torch.zeros(2, dtype=torch.long)
    try:
        with torch.no_grad():
            for start in range(0, len(rows), batch_size):
                batch = collate(rows[start:start + batch_size])
                if not batch:
                    continue
                ids, attention = batch["input_ids"], batch["attention_mask"]  # (B, T)
                token_kinds = torch.where(attention == 0, PAD, (ids == IMAGE_TOKEN_ID).long())
                kinds["tokens"] = token_kinds.reshape(-1).to(device)
                pixels = batch["pixel_values"].to(device) if batch["pixel_values"] is not None else None
                model(input_ids=ids.to(device), pixel_values=pixels, attention_mask=attention.to(device))
                tokens += torch.stack([(token_kinds == TEXT).sum(), (token_kinds == VISUAL).sum()])
    finally:
        for handle in handles:
            handle.remove()
    if not int(tokens[VISUAL]):
        raise VpgtransError(f"{data}: no visual token in the first {len(rows)} rows (no usable image)")
    report_layers = []
    for row, layer in enumerate(layers):
        loads = counts[row].double() / counts[row].sum(dim=1, keepdim=True).clamp(min=1)  # (2, E)
        both = loads.sum(0)
        experts = []
        for expert in range(num_experts):
            text_load, visual_load = float(loads[TEXT, expert]), float(loads[VISUAL, expert])
            experts.append({"expert": expert, "visual": int(counts[row, VISUAL, expert]),
                            "text": int(counts[row, TEXT, expert]), "visual_load": visual_load,
                            "text_load": text_load,
                            "visual_preference": visual_load / float(both[expert]) if both[expert] > 0 else None,
                            "mean_prob_visual": float(prob_sums[row, VISUAL, expert] / max(int(tokens[VISUAL]), 1)),
                            "mean_prob_text": float(prob_sums[row, TEXT, expert] / max(int(tokens[TEXT]), 1))})
        report_layers.append({"layer": layer, "experts": experts})
    return {"bundle": str(Path(bundle_dir).resolve()), "data": str(Path(data).resolve()), "samples": len(rows),
            "model_type": model.llm.config.model_type, "num_experts": num_experts, "top_k": top_k,
            "tokens": {"visual": int(tokens[VISUAL]), "text": int(tokens[TEXT])}, "layers": report_layers}


def preference_matrix(report: dict) -> list[list[float | None]]:
    """(layers, experts) of ``visual_preference``."""
    return [[expert["visual_preference"] for expert in layer["experts"]] for layer in report["layers"]]


def save_routing(report: dict, out_dir: Path) -> dict[str, Path]:
    """``routing.json`` and ``routing.png`` (heat map: layers x experts, visual preference) under ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "routing.json", "png": out_dir / "routing.png"}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise VpgtransError('the heat map needs matplotlib: pip install "matplotlib>=3.9" (routing.json was '
                            f"written to {out_dir})") from None
    matrix = [[float("nan") if v is None else v for v in row] for row in preference_matrix(report)]
    layers, experts = len(matrix), report["num_experts"]
    figure, axes = plt.subplots(figsize=(max(5.0, 1.5 + 0.6 * experts), 1.6 + 0.45 * layers))
    image = axes.imshow(matrix, cmap="coolwarm", vmin=0.0, vmax=1.0, aspect="auto")
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            if value == value:  # not NaN
                axes.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7)
    axes.set_xticks(range(experts))
    axes.set_yticks(range(layers), [str(layer["layer"]) for layer in report["layers"]])
    axes.set_xlabel("expert")
    axes.set_ylabel("layer")
    axes.set_title(f"visual preference per expert (0.5 = alike)\ntop-{report['top_k']} of {experts}; "
                   f"{report['tokens']['visual']} visual / {report['tokens']['text']} text tokens", fontsize=8)
    figure.colorbar(image, ax=axes)
    figure.tight_layout()
    figure.savefig(paths["png"], dpi=120)
    plt.close(figure)
    return paths


def render_routing(report: dict):
    """A rich table: per layer (rows) and expert (columns), visual load | text load."""
    from rich.table import Table

    table = Table(title=f"routing: {report['model_type']}, top-{report['top_k']} of {report['num_experts']} experts, "
                        f"{report['tokens']['visual']} visual / {report['tokens']['text']} text tokens "
                        f"({report['samples']} samples); cell = visual load | text load")
    table.add_column("layer", justify="right")
    for expert in range(report["num_experts"]):
        table.add_column(f"e{expert}", justify="right")
    for layer in report["layers"]:
        table.add_row(str(layer["layer"]),
                      *(f"{e['visual_load']:.0%} | {e['text_load']:.0%}" for e in layer["experts"]))
    return table
