"""Build a ``VisionLanguageModel`` from a manifest's ``model`` / ``references`` sections and weights."""

from __future__ import annotations

from pathlib import Path

import torch

from vpgtrans.errors import VpgtransError

VISION_PREFIXES = {"hf-blip2": "vision_model.", "hf-vision": ""}


def load_vision_state(ref: dict) -> dict:
    """The frozen ViT's weights (HF ``Blip2VisionModel`` names, without ``post_layernorm``)."""
    from vpgtrans.formats.hf import read_tensors

    path, kind = Path(ref["path"]), ref["kind"]
    if kind not in VISION_PREFIXES:
        raise VpgtransError(f"unknown vision reference kind {kind!r}")
    state = read_tensors(path, prefix=VISION_PREFIXES[kind] or None)
    if kind == "hf-vision" and any(k.startswith("vision_model.") for k in state):
        state = {k[len("vision_model."):]: v for k, v in state.items() if k.startswith("vision_model.")}
    return {k: v for k, v in state.items() if not k.startswith("post_layernorm.")}


def load_vision_encoder(ref: dict, vision_config: dict):
    from vpgtrans.model.vlm import build_vision_encoder

    vision = build_vision_encoder(vision_config)
    state = load_vision_state(ref)
    result = vision.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("post_layernorm")]
    if missing or result.unexpected_keys:
        raise VpgtransError(f"{ref['path']}: vision weights do not fit the vision config "
                            f"(missing: {missing[:5]}, unexpected: {result.unexpected_keys[:5]})")
    return vision


def load_llm(ref: dict, is_encoder_decoder: bool, dtype=None, device: str = "cpu"):
    """The frozen LLM and its tokenizer. ``trust_remote_code`` only when the user asked for it."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    auto = AutoModelForSeq2SeqLM if is_encoder_decoder else AutoModelForCausalLM
    remote = bool(ref.get("trust_remote_code", False))
    try:
        llm = auto.from_pretrained(ref["path"], dtype=dtype or torch.float32, trust_remote_code=remote)
        tokenizer = AutoTokenizer.from_pretrained(ref["path"], trust_remote_code=remote)
    except (OSError, ValueError) as exc:
        raise VpgtransError(f"{ref['path']}: cannot load the LLM ({str(exc).splitlines()[0]})") from None
    return llm.to(device), tokenizer


def build_trainable_parts(model_info: dict):
    """Fresh (zero-initialised) VPG and connector from the manifest's ``model`` section."""
    from vpgtrans.model.connectors import build_connector
    from vpgtrans.model.vpg import VisualPromptGenerator

    vpg_info = model_info["vpg"]
    vpg = VisualPromptGenerator(vpg_info["kind"], vpg_info["qformer_config"], vpg_info["num_query_tokens"],
                                model_info["vision"]["config"]["hidden_size"], vpg_info.get("ln_eps", 1e-6))
    conn = model_info["connector"]
    connector = build_connector(conn["type"], conn["in_dim"], conn["out_dim"])
    return vpg, connector


def load_strict(module, state: dict, what: str) -> None:
    """``load_state_dict`` that names every missing, unexpected and mis-shaped tensor."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}" for k in set(own) & set(state)
              if tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        raise VpgtransError(f"{what}: weights do not fit (missing: {missing[:5]}, unexpected: {unexpected[:5]}, "
                            f"shape mismatches: {shapes[:5]})")
    module.load_state_dict(state, strict=True)


def assemble_model(manifest: dict, vpg_state: dict, connector_state: dict, device: str = "cpu", dtype=None):
    from vpgtrans.config import PromptTemplate, from_dict
    from vpgtrans.data import build_image_processor
    from vpgtrans.model.vlm import VisionLanguageModel

    info, refs = manifest["model"], manifest["references"]
    vision = load_vision_encoder(refs["vision"], info["vision"]["config"])
    vpg, connector = build_trainable_parts(info)
    load_strict(vpg, vpg_state, "vpg.safetensors")
    load_strict(connector, connector_state, "connector.safetensors")
    llm, tokenizer = load_llm(refs["llm"], info["llm"]["is_encoder_decoder"], dtype=dtype, device=device)
    processor_info = info["image_processor"]
    image_processor = build_image_processor(processor_info["image_size"], processor_info["image_mean"],
                                            processor_info["image_std"])
    model = VisionLanguageModel(vision.to(device), vpg.to(device), connector.to(device), llm,
                                tokenizer=tokenizer, template=from_dict(PromptTemplate, manifest["template"], "template"),
                                image_processor=image_processor)
    for part in (model.vision, model.llm):
        part.requires_grad_(False)
    return model.eval()  # as HF's from_pretrained: no dropout until a stage asks for train mode
