"""Build a ``VisionLanguageModel`` from a manifest's ``model`` / ``references`` sections and weights."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import torch
from torch import nn

from vpgtrans.errors import VpgtransError

VISION_KINDS = ("hf-blip2", "hf-vision")  # a BLIP-2 directory (ViT under vision_model.), a vision model's own


def load_vision_state(ref: dict) -> dict:
    """The frozen ViT's weights (HF ``Blip2VisionModel`` names, without ``post_layernorm``)."""
    from vpgtrans.formats.hf import read_tensors
    from vpgtrans.naming import VISION_PREFIX, vision_state

    path, kind = Path(ref["path"]), ref["kind"]
    if kind not in VISION_KINDS:
        raise VpgtransError(f"unknown vision reference kind {kind!r}")
    prefixed = kind == "hf-blip2"
    return vision_state(read_tensors(path, prefix=VISION_PREFIX if prefixed else None, strip_prefix=False), prefixed)


def load_vision_encoder(ref: dict, vision_config: dict, dtype=None):
    """The frozen ViT in ``dtype`` (default fp32): built on the meta device (no random init, no second
    copy) and given the checkpoint's tensors, each cast as it is taken."""
    from vpgtrans.model.vlm import build_vision_encoder

    with torch.device("meta"):
        vision = build_vision_encoder(vision_config)  # post_layernorm is an Identity: no weights
    return load_on_meta(vision, load_vision_state(ref), f"{ref['path']}: the vision encoder", dtype or torch.float32)


def load_on_meta(module: nn.Module, state: dict, what: str, dtype=None) -> nn.Module:
    """Give a module built on the meta device the tensors of ``state`` (checked strictly first), floating
    ones cast to ``dtype`` — default: the dtype the module declares, as ``load_state_dict`` copies would
    (trained parts stay fp32 whatever the bundle stores) — one at a time, so the peak is one tensor above
    the state's own size."""
    from vpgtrans.model.parts import check_state

    declared = module.state_dict()
    check_state(declared, state, what)
    for name, tensor in state.items():
        if tensor.is_floating_point():
            state[name] = tensor.to(dtype or declared[name].dtype)
    module.load_state_dict(state, strict=True, assign=True)
    left = [name for name, tensor in [*module.named_parameters(), *module.named_buffers()] if tensor.is_meta]
    if left:  # a buffer no checkpoint holds: the module cannot be built this way
        raise VpgtransError(f"{what}: no weights for {', '.join(left[:5])}")
    return module


def load_llm(ref: dict, is_encoder_decoder: bool, dtype=None, device=None, quantization: str | None = None,
             gradient_checkpointing: bool = False, device_map=None):
    """The frozen LLM and its tokenizer. ``trust_remote_code`` only when the user asked for it.

    ``quantization`` "8bit" / "4bit" loads the LLM's linear layers with bitsandbytes (LLM.int8 / NF4;
    they run on CPU too); the other weights, and 4-bit compute, use ``dtype`` (default fp32).
    ``device_map`` ("auto", "balanced", a dict, ...) spreads an LLM larger than one device over the
    available ones through accelerate's big-model loading (inference and eval; ``device`` is ignored)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    device = default_device() if device is None else device
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
        refusal = _unpickling_error(exc)  # transformers < 5 wraps its weights_only refusal (twice)
        if refusal is not None:
            raise refusal from None  # named as the refusal by bundle.reference_errors
        raise VpgtransError(f"{ref['path']}: cannot load the LLM ({str(exc).splitlines()[0]})") from None
    if quantization == "4bit":
        keep_generic_4bit_path(llm)
    if gradient_checkpointing:
        checkpoint_layers(llm)
    placed = quantization is not None or device_map is not None  # from_pretrained already put it in place
    return (llm if placed else llm.to(device)), tokenizer


BNB_CPU_PACK_BLOCK = 32  # bitsandbytes' packed 4-bit CPU layout: out_features must be a multiple of this


def keep_generic_4bit_path(model) -> int:
    """On a CPU with AVX512-BF16, bitsandbytes (>= 0.49) repacks a 4-bit layer's weight in place for its fast
    CPU kernel the first time the layer runs without gradients (eval, generation), and fails with "N must be
    divisible by block_n" when ``out_features`` is not a multiple of 32. Such layers are kept on bitsandbytes'
    generic 4-bit path (the one training uses); the others keep the fast kernel. Returns how many were kept."""
    kept = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False) and module.out_features % BNB_CPU_PACK_BLOCK:
            module.support_avx512bf16_for_cpu = False
            kept += 1
    return kept


def _unpickling_error(exc: BaseException, depth: int = 6) -> pickle.UnpicklingError | None:
    """The ``UnpicklingError`` an exception was raised from (its cause / context chain), if any."""
    while exc is not None and depth:
        if isinstance(exc, pickle.UnpicklingError):
            return exc
        exc, depth = exc.__cause__ or exc.__context__, depth - 1
    return None


def quantization_config(quantization: str, dtype=None):
    """transformers' ``BitsAndBytesConfig`` for ``--load-in-8bit`` / ``--load-in-4bit``."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise VpgtransError(f'--load-in-{quantization} needs bitsandbytes (the quant extra): pip install -e ".[quant]" '
                            'or pip install "bitsandbytes>=0.46"') from None
    from transformers import BitsAndBytesConfig

    log_once(logging.getLogger("bitsandbytes.autograd._functions"))  # the logger of its 8-bit matmul
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype or torch.float32)
    raise VpgtransError(f"unknown quantization {quantization!r} (8bit or 4bit)")


class _FirstOnly(logging.Filter):
    """Passes the first record of each message template and drops its repeats, counting them."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = str(record.msg)
        self.counts[key] = self.counts.get(key, 0) + 1
        if self.counts[key] > 1:
            return False
        record.msg = f"{key} (logged once: it repeats at every call of every such layer)"
        return True


def log_once(logger: logging.Logger) -> None:
    """Make ``logger`` say each message once per process (idempotent). bitsandbytes logs "MatMul8bitLt: inputs
    will be cast from torch.float32 to float16" at every 8-bit layer call: 192 lines a step at 7B."""
    if not any(isinstance(f, _FirstOnly) for f in logger.filters):
        logger.addFilter(_FirstOnly())


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
        def forward(*args, _forward=block.forward, _block=block, **kwargs):
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            # The backward pass recomputes the block after the call that set the adapters' token context has
            # returned: the recomputation must see the context of the original call, or the adapters compute
            # something else (and checkpoint refuses the mismatch).
            contexts = _token_contexts(_block)
            saved = [dict(vars(context)) for context in contexts]

            def run(*args, **kwargs):
                previous = [dict(vars(context)) for context in contexts]
                for context, state in zip(contexts, saved):
                    vars(context).update(state)
                try:
                    return _forward(*args, **kwargs)
                finally:
                    for context, state in zip(contexts, previous):
                        vars(context).update(state)

            return checkpoint(run, *args, use_reentrant=False, **kwargs)

        block.forward = forward
    return len(blocks)


def _token_contexts(block) -> list:
    """The token contexts read by the adapter wrappers inside ``block`` (usually one shared context)."""
    found = {}
    for module in block.modules():
        context = module.__dict__.get("context")
        if context is not None and hasattr(module, "base_layer"):
            found[id(context)] = context
    return list(found.values())


def default_device():
    """Where a model goes when the caller names no device: accelerate's device for this process (the
    process's GPU under a launcher, the GPU on a one-GPU machine, else the CPU)."""
    from accelerate import PartialState

    return PartialState().device


def build_visual(spec, states: dict[str, dict] | None = None):
    """The spec's visual kind, its parts loaded strictly from ``states`` when given (before any LLM is
    read: a bundle that does not fit fails in a second, not after loading 14 GB) — then built on the meta
    device, so there is no random init to overwrite; freshly initialised without ``states``."""
    from vpgtrans.model.visual import visual_kind

    build = visual_kind(spec.visual_type)
    if states is None:
        return build(spec.visual, spec.vision["config"], spec.llm_width)
    with torch.device("meta"):
        visual = build(spec.visual, spec.vision["config"], spec.llm_width)
    for name in visual.parts:
        load_on_meta(getattr(visual, name), dict(states.get(name, {})), f"{name}.safetensors")
    return visual


def build_model(spec, vision, visual, llm, tokenizer=None, template=None, image_processor=None):
    """Compose a ``VisionLanguageModel``: the spec's adapters are wrapped into ``llm`` (at their initial
    value), the parts table is the visual kind's parts then one per adapter."""
    from vpgtrans.model.adapters import TokenContext, insert_adapters
    from vpgtrans.model.vlm import VisionLanguageModel

    context = TokenContext()
    adapter_parts = insert_adapters(llm, spec.adapters, context) + insert_adapters(vision, spec.adapters, context,
                                                                                   host="vision")
    clash = sorted({p.name for p in adapter_parts} & set(visual.parts))
    if clash:
        raise VpgtransError(f"adapter {clash[0]!r} has the name of a part of the {spec.visual_type} visual kind")
    return VisionLanguageModel(vision, visual, llm, tokenizer=tokenizer, template=template,
                               image_processor=image_processor, adapter_parts=adapter_parts, token_context=context)


def assemble_model(manifest: dict, states: dict[str, dict], device=None, dtype=None, vision_dtype=None,
                   **llm_options):
    """The model of a manifest with the trained parts' ``states``; ``llm_options`` (``quantization``,
    ``gradient_checkpointing``, ``device_map``) go to ``load_llm``. ``device`` None: ``default_device()``.
    ``vision_dtype``: the frozen ViT's dtype where it differs from ``dtype`` (loaded in it, never in fp32 first)."""
    from vpgtrans.config import PromptTemplate, from_dict
    from vpgtrans.images import build_image_processor
    from vpgtrans.model.spec import ModelSpec

    spec, refs = ModelSpec.from_manifest(manifest["model"]), manifest["references"]
    device = default_device() if device is None else device
    expected = sorted(states)
    vision = load_vision_encoder(refs["vision"], spec.vision["config"], vision_dtype or dtype)
    visual = build_visual(spec, states)
    llm, tokenizer = load_llm(refs["llm"], spec.llm["is_encoder_decoder"], dtype=dtype, device=device,
                              **llm_options)
    processor_info = spec.image_processor
    image_processor = build_image_processor(processor_info["image_size"], processor_info["image_mean"],
                                            processor_info["image_std"])
    if llm_options.get("device_map") is not None:
        device = llm.get_input_embeddings().weight.device  # the vision side feeds the LLM's first device
    llm.requires_grad_(False)
    model = build_model(spec, vision.to(device), visual.to(device), llm, tokenizer,
                        from_dict(PromptTemplate, manifest["template"], "template"), image_processor)
    names = sorted(part.name for part in model.parts)
    if names != expected:
        raise VpgtransError(f"the bundle holds parts {expected}, its model has {names}")
    for part in model.parts:
        if part.in_llm:
            part.load(model, states[part.name])
    model.vision.requires_grad_(False)
    return model.eval()  # as HF's from_pretrained: no dropout until a stage asks for train mode


def initial_adapter_states(llm_config, entries: list[dict], seed: int, vision_config: dict | None = None) -> dict[str, dict]:
    """``{part: tensors}`` of the spec's adapters at their initial value, for the first bundle. The LLM
    (and, for adapters in the ViT, the ViT from ``vision_config``) is built on the meta device from its
    config (no weights read, no memory): only the wrappers' adapter weights are real."""
    from transformers import AutoModelForCausalLM

    from vpgtrans.model.adapters import TokenContext, insert_adapters
    from vpgtrans.model.vlm import build_vision_encoder

    if not entries:
        return {}
    holder = nn.Module()
    with torch.device("meta"):
        holder.llm = AutoModelForCausalLM.from_config(llm_config)
        holder.vision = build_vision_encoder(vision_config) if vision_config is not None else nn.Module()
    context = TokenContext()
    parts = insert_adapters(holder.llm, entries, context) + insert_adapters(holder.vision, entries, context, host="vision")
    states = {}
    for offset, part in enumerate(parts):
        part.init_fresh(holder, seed + offset)
        states[part.name] = part.state_dict(holder)
    return states
