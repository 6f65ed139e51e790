"""``inherit``: the first step of a transfer — take the source's vision side, fit the word converter
between the two LLMs' input-embedding tables where the connector uses one, write the first bundle."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from vpgtrans.bundle import CONVERTER_FILE, fingerprint, write_bundle
from vpgtrans.config import InheritConfig, PromptTemplate, to_dict
from vpgtrans.converter import fit_converter, pair_tokens
from vpgtrans.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from vpgtrans.errors import VpgtransError
from vpgtrans.formats import detect
from vpgtrans.formats.frozen import check_llm, check_vision
from vpgtrans.formats.hf import read_input_embeddings, require_trusted_code
from vpgtrans.references import resolve_model
from vpgtrans.sources import SourceVPG, read_source

log = logging.getLogger(__name__)
AUTO_PAIRS_PER_DIM = 2  # --converter auto: shared tokens when pairs >= 2 x the source width, else GW

def read_target_llm(target_llm: Path, trust_remote_code: bool = False):
    """The target LLM's config (its family comes from here, never from the path)."""
    from transformers import AutoConfig

    fmt = detect.detect_format(target_llm)
    if fmt != "hf-llm":
        raise VpgtransError(f"{target_llm}: --target-llm must be an HF causal LM or T5 directory (found {fmt})")
    require_trusted_code(Path(target_llm), trust_remote_code)  # before transformers could import any of it
    try:
        return AutoConfig.from_pretrained(target_llm, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001
        raise VpgtransError(f"{target_llm}: cannot read the LLM config ({str(exc).splitlines()[0]})") from None

def _image_processor_info(source: SourceVPG) -> dict:
    info = {"image_size": source.vision_config["image_size"], "image_mean": OPENAI_CLIP_MEAN, "image_std": OPENAI_CLIP_STD}
    preprocessor = Path(source.vision_ref["path"]) / "preprocessor_config.json"
    if preprocessor.is_file():
        saved = json.loads(preprocessor.read_text())
        info["image_mean"] = saved.get("image_mean", OPENAI_CLIP_MEAN)
        info["image_std"] = saved.get("image_std", OPENAI_CLIP_STD)
    return info

def llm_section(llm_config) -> dict:
    text = llm_config.get_text_config() if hasattr(llm_config, "get_text_config") else llm_config
    return {"model_type": llm_config.model_type, "hidden_size": text.hidden_size, "vocab_size": text.vocab_size,
            "is_encoder_decoder": bool(getattr(llm_config, "is_encoder_decoder", False))}

def _fit_converter(source: SourceVPG, target_llm: Path, target_config, config: InheritConfig, corpus: Path | None):
    from transformers import AutoConfig, AutoTokenizer

    if not source.source_llm:
        raise VpgtransError(f"{source.path}: a .pth carries no LLM; pass --source-llm (the source LLM directory) "
                            "to fit the converter, or --converter none")
    llm_path = Path(source.source_llm["path"])
    try:
        source_tokenizer = AutoTokenizer.from_pretrained(llm_path)
        target_tokenizer = AutoTokenizer.from_pretrained(target_llm)
    except Exception as exc:  # noqa: BLE001
        raise VpgtransError(f"cannot load the tokenizers of {llm_path} / {target_llm} ({str(exc).splitlines()[0]})") from None
    source_config = AutoConfig.for_model(**source.source_llm["text_config"])
    # (V_s, D_s), (V_t, D_t) as stored (bf16 at 7B sizes): the fit reads them in float32 blocks of pairs.
    source_embeddings = read_input_embeddings(llm_path, source_config, source.source_llm["prefix"], as_float=False)
    target_embeddings = read_input_embeddings(target_llm, target_config, as_float=False)
    if source_embeddings.shape[1] != source.projector_weight.shape[0]:
        raise VpgtransError(f"source LLM width {source_embeddings.shape[1]} != source projector output "
                            f"{source.projector_weight.shape[0]}: --source-llm is not the LLM this VPG was trained for")
    lines = None
    if corpus is not None:
        if not Path(corpus).is_file():
            raise VpgtransError(f"{corpus}: corpus file not found")
        lines = [line for line in Path(corpus).read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    method, reason = config.converter, None
    try:
        pairs = pair_tokens(source_tokenizer, target_tokenizer, config.lowercase_fallback, lines)
    except VpgtransError:
        if method == "shared-tokens":
            raise
        pairs = None  # no shared token at all: GW needs none (and measures on none)
    if method == "auto":
        found, needed = (0 if pairs is None else len(pairs.target_ids)), AUTO_PAIRS_PER_DIM * source_embeddings.shape[1]
        method = "shared-tokens" if found >= needed else "gw"
        reason = (f"{found} shared-token pairs {'>=' if found >= needed else '<'} {needed} "
                  f"({AUTO_PAIRS_PER_DIM} x the source width {source_embeddings.shape[1]})")
    if method == "shared-tokens":
        weight, bias, stats = fit_converter(source_embeddings, target_embeddings, pairs, config.ridge,
                                            config.heldout_fraction, config.seed)
        stats = {"method": "shared-tokens", **stats}
    else:
        from vpgtrans.converter_gw import anchor_ids, fit_gw_converter

        source_embeddings, target_embeddings = source_embeddings.float(), target_embeddings.float()
        anchors = [anchor_ids(min(len(tokenizer), len(table)), set(tokenizer.all_special_ids), config.gw_anchors,
                              _token_counts(tokenizer, lines, len(table)) if lines else None)
                   for tokenizer, table in ((source_tokenizer, source_embeddings), (target_tokenizer, target_embeddings))]
        weight, bias, stats = fit_gw_converter(source_embeddings, target_embeddings, *anchors, pairs, config.ridge)
        stats["pairs"] = stats["refined_pairs"][-1] if stats["refined_pairs"] else stats["gw_pairs"]
    if reason:
        stats["reason"] = reason
    stats["corpus"] = str(corpus) if corpus else None
    return weight, bias, stats


def _token_counts(tokenizer, lines: list[str], size: int):
    """(size,) float64 counts of each token id in ``lines``."""
    import torch

    counts = torch.zeros(size, dtype=torch.float64)
    for line in lines:
        ids = torch.tensor(tokenizer(line, add_special_tokens=False)["input_ids"], dtype=torch.long)
        ids = ids[ids < size]
        counts.index_add_(0, ids, torch.ones(len(ids), dtype=torch.float64))
    return counts


def inherit(source: Path, target_llm: Path, out_dir: Path, config: InheritConfig | None = None,
            vision: Path | None = None, source_llm: Path | None = None, corpus: Path | None = None,
            template: PromptTemplate | None = None, trust_remote_code: bool = False, force: bool = False) -> Path:
    """Source vision side + the connector's parts for ``target_llm`` -> a bundle at ``out_dir``.

    The connector (``config.connector``) names the visual kind, which inherits what it can from the source
    (the qformer kind: the VPG unchanged, the projector through the word converter), and the adapters,
    which start at the value that leaves the LLM unchanged."""
    from vpgtrans.model.adapters import adapter_kind
    from vpgtrans.model.assemble import initial_adapter_states
    from vpgtrans.model.connectors import connector as connector_entry
    from vpgtrans.model.spec import ModelSpec
    from vpgtrans.model.visual import visual_kind

    config = config or InheritConfig()
    entry = connector_entry(config.connector)
    kind = visual_kind(entry.visual)
    adapters = [{**adapter, **config.adapter_options.get(adapter["type"], {})} for adapter in entry.adapters]
    unknown = sorted(set(config.adapter_options) - {adapter["type"] for adapter in adapters})
    problems = [f"it has no {name!r} adapter to set options of" for name in unknown]
    problems += [p for adapter in adapters for p in adapter_kind(adapter["type"]).problems(adapter)]
    if problems:
        raise VpgtransError(f"connector {config.connector!r}: " + "; ".join(problems))
    # Local paths, or Hub ids resolved through the HF cache (recorded as repo_id + commit in the references).
    source, source_hub = resolve_model(source, what="source model")
    target_llm, llm_hub = resolve_model(target_llm, what="target LLM")
    vision, vision_hub = resolve_model(vision, what="vision model") if vision is not None else (None, source_hub)
    source_llm, source_llm_hub = (resolve_model(source_llm, what="source LLM") if source_llm is not None
                                  else (None, source_hub))
    src = read_source(Path(source), vision, source_llm)
    target_config = read_target_llm(target_llm, trust_remote_code)
    llm = llm_section(target_config)
    # The frozen models, checked from their headers against their configs (no weight read); the summaries are
    # recorded so that every later command notices a model replaced by one of other shapes.
    headers = {"llm": check_llm(target_llm, target_config, trust_remote_code),
               "vision": check_vision(src.vision_ref, src.vision_config)}
    metrics, tensors, converter = {}, {}, None
    if config.converter != "none" and kind.uses_converter:
        conv_w, conv_b, stats = _fit_converter(src, target_llm, target_config, config, corpus)
        converter = conv_w, conv_b
        tensors[CONVERTER_FILE] = {"weight": conv_w, "bias": conv_b}
        metrics["converter"] = stats
        log.info("converter (%s): %d pairs, held-out cosine %.4f%s", stats["method"], stats["pairs"],
                 stats.get("heldout_cosine", float("nan")), f"; {stats['reason']}" if "reason" in stats else "")
    elif config.converter != "none":
        log.info("the %s visual kind does not use a word converter: none fitted", entry.visual)
    visual, states, visual_metrics = kind.inherit(src, llm["hidden_size"], converter, config.seed,
                                                  dict(config.visual_options))
    metrics.update(visual_metrics)
    states.update(initial_adapter_states(target_config, adapters, config.seed, src.vision_config))
    spec = ModelSpec(vision={"config": src.vision_config}, visual=visual, llm=llm,
                     image_processor=_image_processor_info(src), adapters=adapters)
    tensors.update({f"{name}.safetensors": state for name, state in states.items()})
    references = {
        "vision": {**src.vision_ref, **vision_hub, "fingerprint": fingerprint(Path(src.vision_ref["path"])),
                   **({"header": headers["vision"]} if headers["vision"] else {})},
        "llm": {"path": str(target_llm.resolve()), **llm_hub, "fingerprint": fingerprint(target_llm),
                "trust_remote_code": trust_remote_code, **({"header": headers["llm"]} if headers["llm"] else {})},
        "source": {"path": str(Path(source).resolve()), **source_hub, "format": src.format,
                   "fingerprint": fingerprint(Path(source))},
    }
    if src.source_llm:
        references["source_llm"] = {"path": src.source_llm["path"], **source_llm_hub, "prefix": src.source_llm["prefix"]}
    template = template or PromptTemplate.for_llm(llm["is_encoder_decoder"])
    return write_bundle(out_dir, stage="inherit", tensors=tensors, model=to_dict(spec), references=references,
                        template=to_dict(template), config={"inherit": to_dict(config)}, metrics=metrics, force=force)
