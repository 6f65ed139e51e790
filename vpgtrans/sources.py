"""Read the source model's VPG and projector from an HF BLIP-2 / InstructBLIP directory or a
LAVIS / VPGTrans ``.pth``, plus where its ViT and its LLM live. Nothing big is materialised: the
tensors read are the VPG's and the projector's."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vpgtrans.errors import VpgtransError
from vpgtrans.formats import detect
from vpgtrans.formats.hf import custom_code, read_config, read_tensors
from vpgtrans.model.parts import check_finite

LAVIS_LN_EPS = 1e-5  # LAVIS ln_vision; HF post_layernorm uses the vision config's 1e-6


@dataclass
class SourceVPG:
    """What a transfer inherits: VPG weights (``ln_vision.*``, ``query_tokens``, ``qformer.*``),
    the source projector, and references to the source ViT and LLM."""

    path: Path
    format: str  # hf-blip2 | hf-instructblip | lavis-pth
    kind: str  # blip2 | instructblip
    vpg_state: dict
    projector_weight: torch.Tensor  # (D_s, D_q)
    projector_bias: torch.Tensor  # (D_s,)
    qformer_config: dict
    vision_config: dict
    vision_ref: dict  # {"path", "kind"}
    ln_eps: float = 1e-6
    source_llm: dict = field(default_factory=dict)  # {"path", "prefix", "text_config"} or {}

    @property
    def num_query_tokens(self) -> int:
        return self.vpg_state["query_tokens"].shape[1]


def _split_hf_state(state: dict) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """HF BLIP-2 names -> (VPG state, projector W, projector b), through the one naming table."""
    from vpgtrans.naming import hf_to_parts

    parts, _other = hf_to_parts(state)  # (the source's ViT and LLM are not inherited)
    vpg, projector = parts["vpg"], parts["connector"]
    missing = [k for k in ("query_tokens", "ln_vision.weight", "ln_vision.bias") if k not in vpg]
    missing += [f"language_projection.{k}" for k in ("weight", "bias") if f"proj.{k}" not in projector]
    if missing:
        raise VpgtransError(f"source has no complete VPG: missing {', '.join(missing)}")
    return vpg, projector["proj.weight"], projector["proj.bias"]


def _vision_ref(vision: Path | None, fallback: Path | None) -> tuple[dict, dict, dict | None]:
    """(vision_ref, vision_config, qformer_config or None) from an HF BLIP-2 dir or a vision dir."""
    path = vision or fallback
    if path is None:
        raise VpgtransError("LAVIS checkpoints carry no ViT: pass --vision with an HF BLIP-2 directory "
                            "or a Blip2VisionModel directory")
    kind = detect.detect_format(path)
    if kind not in ("hf-blip2", "hf-instructblip", "hf-vision"):
        raise VpgtransError(f"{path}: --vision must be an HF BLIP-2 / InstructBLIP directory or a vision model "
                            f"directory (found {kind})")
    config = read_config(path)
    if kind == "hf-vision":
        return {"path": str(Path(path).resolve()), "kind": "hf-vision"}, config, None
    _require_sections(path, config, ("vision_config", "qformer_config"))
    return {"path": str(Path(path).resolve()), "kind": "hf-blip2"}, config["vision_config"], config["qformer_config"]


def _require_sections(path: Path, config: dict, sections: tuple[str, ...]) -> None:
    bad = [name for name in sections if not isinstance(config.get(name), dict)]
    if bad:
        raise VpgtransError(f"{Path(path) / 'config.json'}: a BLIP-2 config needs {', '.join(bad)} as JSON objects; "
                            "the file is damaged or not a BLIP-2 config")


def _source_llm(source_llm: Path) -> dict:
    """The source LLM a converter is fitted from: only its tokenizer and embedding table are read, and
    never with the model's own code — so its type must be one transformers knows."""
    config = read_config(source_llm)
    if custom_code(config):
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        if config.get("model_type") not in CONFIG_MAPPING_NAMES:
            raise VpgtransError(f"{source_llm}: model_type {config.get('model_type')!r} needs the model's own code "
                                f"({', '.join(custom_code(config)[:3])} in auto_map), which vpgtrans does not run for "
                                "a source LLM; pass --converter none to inherit without it")
    return {"path": str(Path(source_llm).resolve()), "prefix": "", "text_config": config}


def _clean_config(config: dict) -> dict:
    drop = {"architectures", "transformers_version", "_name_or_path", "dtype", "torch_dtype", "model_type"}
    return {k: v for k, v in config.items() if k not in drop}


def _infer_qformer_config(vpg_state: dict, kind: str, template: dict | None) -> dict:
    """Q-Former config from tensor shapes (LAVIS .pth carry no HF config). Head count is not in the
    shapes: it comes from ``template`` (the --vision BLIP-2 config) or BERT's 64-dim heads."""
    hidden = vpg_state["query_tokens"].shape[2]
    layers = sorted({int(m.group(1)) for k in vpg_state for m in [re.match(r"qformer\.encoder\.layer\.(\d+)\.", k)] if m})
    if not layers:
        raise VpgtransError("source checkpoint has no Q-Former layers")
    cross = [i for i in layers if f"qformer.encoder.layer.{i}.crossattention.attention.key.weight" in vpg_state]
    if not cross:
        raise VpgtransError("source Q-Former has no cross-attention layers")
    config = dict(template or {})
    config.update(
        hidden_size=hidden,
        num_hidden_layers=len(layers),
        intermediate_size=vpg_state["qformer.encoder.layer.0.intermediate_query.dense.weight"].shape[0],
        encoder_hidden_size=vpg_state[f"qformer.encoder.layer.{cross[0]}.crossattention.attention.key.weight"].shape[1],
        cross_attention_frequency=cross[1] - cross[0] if len(cross) > 1 else max(1, len(layers)),
    )
    if "num_attention_heads" not in config or hidden % config["num_attention_heads"]:
        if hidden % 64:
            raise VpgtransError(f"cannot infer the Q-Former head count for hidden size {hidden}; pass --vision "
                                "with an HF BLIP-2 directory whose qformer_config has it")
        config["num_attention_heads"] = hidden // 64
    if kind == "instructblip" and "qformer.embeddings.word_embeddings.weight" in vpg_state:
        config["vocab_size"] = vpg_state["qformer.embeddings.word_embeddings.weight"].shape[0]
        config["max_position_embeddings"] = vpg_state["qformer.embeddings.position_embeddings.weight"].shape[0]
    return config


def read_source(source: Path, vision: Path | None = None, source_llm: Path | None = None) -> SourceVPG:
    """Read the VPG to inherit. ``vision`` overrides (or, for .pth, supplies) the ViT;
    ``source_llm`` supplies the source LLM (embeddings + tokenizer) a .pth does not carry."""
    source = Path(source)
    fmt = detect.detect_format(source)
    if fmt in ("hf-blip2", "hf-instructblip"):
        config = read_config(source)
        _require_sections(source, config, ("vision_config", "qformer_config", "text_config"))
        kind = "instructblip" if fmt == "hf-instructblip" else "blip2"
        names = [n for n in detect.weight_names(source) if not n.startswith(("language_model.", "vision_model.encoder",
                                                                               "vision_model.embeddings"))]
        vpg_state, proj_w, proj_b = _split_hf_state(read_tensors(source, names))
        vision_ref, vision_config, _ = _vision_ref(vision, source)
        llm = {"path": str(source.resolve()), "prefix": "language_model.", "text_config": config["text_config"]}
        if source_llm is not None:
            llm = _source_llm(source_llm)
        qformer_config = _clean_config(config["qformer_config"])
        ln_eps = vision_config.get("layer_norm_eps", 1e-6)
    elif fmt == "lavis-pth":
        from vpgtrans.formats import lavis

        state = lavis.load_pth(source)
        kind = lavis.checkpoint_kind(state)
        hf_state, _dropped = lavis.lavis_to_hf(state, keep_qformer_embeddings=kind == "instructblip")
        vpg_state, proj_w, proj_b = _split_hf_state(hf_state)
        vision_ref, vision_config, template = _vision_ref(vision, None)
        qformer_config = _clean_config(_infer_qformer_config(vpg_state, kind, template and _clean_config(template)))
        llm = _source_llm(source_llm) if source_llm is not None else {}
        ln_eps = LAVIS_LN_EPS
    else:
        raise VpgtransError(f"{source}: not a BLIP-2 source (found {fmt}); expected an HF BLIP-2 / InstructBLIP "
                            "directory or a LAVIS / VPGTrans .pth")
    vision_config = _clean_config(vision_config)
    missing = [key for key in ("hidden_size", "image_size") if not isinstance(vision_config.get(key), int)]
    if missing:
        raise VpgtransError(f"{vision_ref['path']}: the vision config lacks {', '.join(missing)}; it is damaged or "
                            "not a BLIP-2 ViT config")
    width = vision_config["hidden_size"]
    problems = []
    if vpg_state["ln_vision.weight"].shape[0] != width:
        problems.append(f"ln_vision width {vpg_state['ln_vision.weight'].shape[0]} != ViT width {width}")
    if qformer_config.get("encoder_hidden_size", width) != width:
        problems.append(f"Q-Former cross-attends to width {qformer_config['encoder_hidden_size']}, ViT width is {width}")
    if proj_w.shape[1] != vpg_state["query_tokens"].shape[2]:
        problems.append(f"projector input {proj_w.shape[1]} != Q-Former width {vpg_state['query_tokens'].shape[2]}")
    if problems:
        raise VpgtransError(f"{source}: VPG does not fit its vision encoder: " + "; ".join(problems))
    tensors = {**vpg_state, "language_projection.weight": proj_w, "language_projection.bias": proj_b}
    check_finite(tensors, f"{source}: the source's VPG / projector")
    return SourceVPG(source, fmt, kind, vpg_state, proj_w.float(), proj_b.float(), qformer_config,
                     vision_config, vision_ref, ln_eps, llm)
