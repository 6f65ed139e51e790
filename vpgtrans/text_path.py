"""The text-path check (``vpgtrans inspect BUNDLE --check-text-path``): probe texts through the bundle's model
and through the untouched LLM, and the largest absolute difference of their logits.

A connector *promises* an exact text path when every adapter it puts inside the LLM declares
``text_path_exact = True`` (its wrappers call the base layer's own forward where no position is visual, as
plora's do); a connector with no adapters (linear) never touches the LLM's text computation. Other adapters
(LaVIN's mixture-of-modality routes text through its own "text" mixture; infmllm's peft ``lora`` adapts every
token) are measured but promise nothing: they are exact at their initial value only.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vpgtrans.errors import VpgtransError

PROBES = (
    "The quick brown fox jumps over the lazy dog.",
    "Question: what color is the circle? Answer:",
    "a small red square on the left",
)


def text_path_promised(adapters: list[dict]) -> bool:
    """Whether a model with these ``model.adapters`` entries computes text-only inputs exactly as its LLM."""
    from vpgtrans.model.adapters import adapter_kind

    return all(getattr(adapter_kind(entry["type"]), "text_path_exact", False) for entry in adapters)


def check_text_path(bundle_dir: Path, texts: list[str] | None = None, device=None, **llm_options) -> dict:
    """``{"promised", "adapters", "exact", "max_abs_diff", "texts": [{"text", "tokens", "max_abs_diff"}]}``:
    each text (default ``PROBES``) tokenised by the bundle's tokenizer, run through ``load_model(bundle_dir)``
    and through ``AutoModelForCausalLM.from_pretrained`` of the bundle's LLM reference (the same
    ``llm_options``: ``quantization``), both on ``device`` (default: the CPU)."""
    from vpgtrans.bundle import load_model, validate_bundle
    from vpgtrans.model.assemble import load_llm

    bundle_dir = Path(bundle_dir)
    manifest = validate_bundle(bundle_dir)
    texts = list(texts) if texts else list(PROBES)
    if not all(isinstance(text, str) and text for text in texts):
        raise VpgtransError("--text needs non-empty texts")
    device = device or "cpu"
    adapters = manifest["model"].get("adapters", [])
    model = load_model(bundle_dir, device=device, **llm_options)
    base, _ = load_llm(manifest["references"]["llm"], model.is_encoder_decoder, device=device, **llm_options)
    base.eval()
    rows = []
    with torch.no_grad():
        for text in texts:
            ids = model.tokenizer(text, return_tensors="pt").input_ids.to(device)  # (1, T)
            extra = {"decoder_input_ids": ids} if model.is_encoder_decoder else {}
            ours = model(input_ids=ids, **extra).logits
            theirs = base(input_ids=ids, **extra).logits
            if ours.shape != theirs.shape:
                raise VpgtransError(f"logits of shape {tuple(ours.shape)} vs the LLM's {tuple(theirs.shape)}")
            diff = (ours.float() - theirs.float()).abs().max().item()
            rows.append({"text": text, "tokens": int(ids.shape[1]), "max_abs_diff": diff})
    worst = max(row["max_abs_diff"] for row in rows)
    return {"bundle": str(bundle_dir.resolve()), "adapters": [entry["type"] for entry in adapters],
            "promised": text_path_promised(adapters), "exact": worst == 0.0, "max_abs_diff": worst, "texts": rows}


def render_text_path(report: dict):
    """A rich table of ``check_text_path``'s report."""
    from rich.table import Table

    verdict = ("exact" if report["exact"] else "DIFFERS") + (" (promised)" if report["promised"] else
                                                              " (not promised by its adapters)")
    table = Table(title=f"text path: {verdict}; adapters: {', '.join(report['adapters']) or 'none'}")
    table.add_column("text")
    table.add_column("tokens", justify="right")
    table.add_column("max |logit diff|", justify="right")
    for row in report["texts"]:
        table.add_row(row["text"], str(row["tokens"]), f"{row['max_abs_diff']:.3g}")
    return table
