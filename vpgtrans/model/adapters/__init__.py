"""LLM adapters: wrappers put around modules of the frozen LLM, registered in ``ADAPTERS`` under their
manifest name (``model.adapters[i].type``).

An adapter class (a subclass of ``AdapterLayer``) provides:

``Adapter.problems(entry) -> list[str]``
    what in a manifest entry (``{"type": ..., its own keys}``) it could not build from;
``Adapter.targets(llm, entry) -> list[str]``
    the module paths in the LLM to wrap (refuse an LLM it does not know with one line);
``Adapter.wrap(base_layer, entry, part, context) -> AdapterLayer``
    the wrapper of one base layer, whose ``adapter`` module has ``init_fresh(seed)`` and starts at the
    value that leaves the LLM's output unchanged.

``insert_adapters`` replaces the targets in place (``setattr`` on their parents: transformers' source is
never edited, no base weight is touched) and returns one ``Part`` per entry for the parts table.
"""

from __future__ import annotations

from torch import nn

from vpgtrans.errors import VpgtransError
from vpgtrans.model.adapters.context import AdapterLayer, TokenContext
from vpgtrans.model.adapters.mma import MixtureOfModalityLayer, VisionMixtureOfModalityLayer
from vpgtrans.model.adapters.lora import LoRA
from vpgtrans.model.adapters.plora import PLoRA
from vpgtrans.model.parts import Part

ADAPTERS: dict[str, type] = {"plora": PLoRA, "mma": MixtureOfModalityLayer,
                             "mma-vision": VisionMixtureOfModalityLayer}
ADAPTERS["lora"] = LoRA  # peft's LoRA on every token (InfMLLM's third stage)


def adapter_kind(name: str) -> type:
    if name not in ADAPTERS:
        raise VpgtransError(f"unknown adapter {name!r}; available: {', '.join(ADAPTERS) or 'none'}")
    return ADAPTERS[name]


def insert_adapters(llm: nn.Module, entries: list[dict], context: TokenContext, host: str = "llm") -> list[Part]:
    """Wrap each entry's targets; the adapters start on their base layer's device, in fp32. ``host``: the
    entries whose adapter class lives there (its ``host`` attribute: "llm" unless it says "vision") go
    into ``llm`` (here the module of that name in the ``VisionLanguageModel``)."""
    entries = [entry for entry in entries if getattr(adapter_kind(entry["type"]), "host", "llm") == host]
    if entries and host == "llm" and getattr(llm.config, "is_encoder_decoder", False):
        raise VpgtransError(f"adapters inside a seq2seq LLM ({llm.config.model_type}) are not supported: its encoder "
                            "runs outside the calls that carry the token context")
    parts = []
    for entry in entries:
        kind, name = adapter_kind(entry["type"]), entry["type"]
        for path in kind.targets(llm, entry):
            parent_path, _, attr = path.rpartition(".")
            parent = llm.get_submodule(parent_path)
            base = getattr(parent, attr)
            wrapper = kind.wrap(base, entry, name, context)
            device = next(base.parameters()).device
            if device.type != "meta":  # (a meta-device skeleton keeps real adapter weights on the CPU)
                wrapper.adapter.to(device)
            setattr(parent, attr, wrapper)
        parts.append(getattr(kind, "part_type", Part)(name, host, in_llm=True))  # (peft's lora: its own key prefix)
    return parts


__all__ = ["ADAPTERS", "AdapterLayer", "TokenContext", "adapter_kind", "insert_adapters"]
