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


def load_llm(ref: dict, is_encoder_decoder: bool, dtype=None, device: str = "cpu", quantization: str | None = None,
             gradient_checkpointing: bool = False, device_map=None):
    """The frozen LLM and its tokenizer. ``trust_remote_code`` only when the user asked for it.

    ``quantization`` "8bit" / "4bit" loads the LLM's linear layers with bitsandbytes (LLM.int8 / NF4;
    they run on CPU too); the other weights, and 4-bit compute, use ``dtype`` (default fp32).
    ``device_map`` ("auto", "balanced", a dict, ...) spreads an LLM larger than one device over the
    available ones through accelerate's big-model loading (inference and eval; ``device`` is ignored)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    auto = AutoModelForSeq2SeqLM if is_encoder_decoder else AutoModelForCausalLM
    remote = bool(ref.get("trust_remote_code", False))
    kwargs = {"dtype": dtype or torch.float32, "trust_remote_code": remote}
    if quantization is not None:
        kwargs.update(quantization_config=quantization_config(quantization, dtype), device_map={"": str(device)})
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        llm = auto.from_pretrained(ref["path"], **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(ref["path"], trust_remote_code=remote)
    except (OSError, ValueError) as exc:
        raise VpgtransError(f"{ref['path']}: cannot load the LLM ({str(exc).splitlines()[0]})") from None
    if gradient_checkpointing:
        checkpoint_layers(llm)
    placed = quantization is not None or device_map is not None  # from_pretrained already put it in place
    return (llm if placed else llm.to(device)), tokenizer


def quantization_config(quantization: str, dtype=None):
    """transformers' ``BitsAndBytesConfig`` for ``--load-in-8bit`` / ``--load-in-4bit``."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise VpgtransError(f"--load-in-{quantization} needs bitsandbytes: pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype or torch.float32)
    raise VpgtransError(f"unknown quantization {quantization!r} (8bit or 4bit)")


def checkpoint_layers(llm) -> int:
    """Gradient checkpointing for the frozen LLM: each decoder/encoder block recomputes its activations
    in the backward pass instead of storing them (non-reentrant ``torch.utils.checkpoint``, RNG
    preserved).

    transformers' own switch only acts on modules in train mode, and our frozen LLM stays in eval
    mode (no dropout), so the blocks' ``forward`` is wrapped here. Under ``torch.no_grad``
    (evaluation, generation) the blocks run as usual. Returns the number of blocks wrapped."""
    from torch.utils.checkpoint import checkpoint
    from transformers.modeling_layers import GradientCheckpointingLayer

    blocks = [m for m in llm.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not blocks:
        raise VpgtransError(f"{type(llm).__name__}: no transformer blocks found for --gradient-checkpointing")
    for block in blocks:
        def forward(*args, _forward=block.forward, **kwargs):
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = forward
    return len(blocks)


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


def assemble_model(manifest: dict, vpg_state: dict, connector_state: dict, device: str = "cpu", dtype=None,
                   **llm_options):
    """``llm_options`` (``quantization``, ``gradient_checkpointing``, ``device_map``) go to ``load_llm``."""
    from vpgtrans.config import PromptTemplate, from_dict
    from vpgtrans.images import build_image_processor
    from vpgtrans.model.vlm import VisionLanguageModel

    info, refs = manifest["model"], manifest["references"]
    vision = load_vision_encoder(refs["vision"], info["vision"]["config"])
    vpg, connector = build_trainable_parts(info)
    load_strict(vpg, vpg_state, "vpg.safetensors")
    load_strict(connector, connector_state, "connector.safetensors")
    llm, tokenizer = load_llm(refs["llm"], info["llm"]["is_encoder_decoder"], dtype=dtype, device=device,
                              **llm_options)
    processor_info = info["image_processor"]
    image_processor = build_image_processor(processor_info["image_size"], processor_info["image_mean"],
                                            processor_info["image_std"])
    if llm_options.get("device_map") is not None:
        device = llm.get_input_embeddings().weight.device  # the vision side feeds the LLM's first device
    model = VisionLanguageModel(vision.to(device), vpg.to(device), connector.to(device), llm,
                                tokenizer=tokenizer, template=from_dict(PromptTemplate, manifest["template"], "template"),
                                image_processor=image_processor)
    for part in (model.vision, model.llm):
        part.requires_grad_(False)
    return model.eval()  # as HF's from_pretrained: no dropout until a stage asks for train mode
