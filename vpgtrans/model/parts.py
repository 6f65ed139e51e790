"""The parts table: every trainable part of a ``VisionLanguageModel``, where it lives, its bundle file.

A part is either a module of the visual side (``vpg``, ``connector``: ``Part(name, "visual.vpg")``) or
the trainable halves of the adapter wrappers one adapter entry put inside the frozen LLM
(``Part(name, "llm", in_llm=True)``: the ``adapter`` module of every wrapper whose ``part`` is the name).
Stages, bundles, checkpoints, ``load_model`` and FSDP gathering all go through this table, so a new
visual kind or adapter is a new registry entry, never a change to them.

State-dict keys of a part: the module's own keys for a visual part (``proj.weight``); for an adapter
part, the wrapper's path in the LLM then the adapter's keys (``model.layers.0.self_attn.q_proj.lora_A``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from vpgtrans.errors import VpgtransError


@dataclass(frozen=True)
class Part:
    name: str  # what a recipe's ``trainable`` names, e.g. "vpg"
    path: str  # module path in the VisionLanguageModel: "visual.vpg", or "llm" for adapters
    in_llm: bool = False  # lives inside the frozen LLM (adapter wrappers around base layers)

    @property
    def file(self) -> str:
        return f"{self.name}.safetensors"

    def modules(self, model: nn.Module) -> dict[str, nn.Module]:
        """``{state-dict prefix: module}`` holding this part's parameters (one entry for a visual part,
        one per wrapper for an adapter part), in a fixed order."""
        root = model.get_submodule(self.path)
        if not self.in_llm:
            return {"": root}
        found = {f"{name}.": module.adapter for name, module in root.named_modules()
                 if getattr(module, "part", None) == self.name and hasattr(module, "base_layer")}
        if not found:
            raise VpgtransError(f"adapter part {self.name!r} wraps no layer of the LLM")
        return found

    def parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return [param for module in self.modules(model).values() for param in module.parameters()]

    def state_dict(self, model: nn.Module, gather=None) -> dict:
        """The part's tensors under their bundle names; ``gather(module)`` (FSDP's whole tensors) when given."""
        state = {}
        for prefix, module in self.modules(model).items():
            own = gather(module) if gather is not None else module.state_dict()
            state.update({prefix + key: value for key, value in own.items()})
        return state

    def load(self, model: nn.Module, state: dict, what: str | None = None) -> None:
        """Strict: every missing, unexpected and mis-shaped tensor is named (``what`` says where from)."""
        modules = self.modules(model)
        own = {prefix + key: value for prefix, module in modules.items() for key, value in module.state_dict().items()}
        check_state(own, state, what or self.file)
        for prefix, module in modules.items():
            module.load_state_dict({key[len(prefix):]: value for key, value in state.items()
                                    if key.startswith(prefix) and key[len(prefix):] in module.state_dict()},
                                   strict=True)

    def init_fresh(self, model: nn.Module, seed: int) -> None:
        """Train-from-scratch initialisation: each module of the part knows its own (``init_fresh``)."""
        for offset, module in enumerate(self.modules(model).values()):
            module.init_fresh(seed + offset)


def check_state(own: dict, state: dict, what: str) -> None:
    """Raise one line naming every missing, unexpected and mis-shaped tensor of ``state`` against ``own``."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}" for k in set(own) & set(state)
                    if tuple(state[k].shape) != tuple(own[k].shape))
    if missing or unexpected or shapes:
        raise VpgtransError(f"{what}: weights do not fit (missing: {missing[:5]}, unexpected: {unexpected[:5]}, "
                            f"shape mismatches: {shapes[:5]})")


def check_finite(state: dict, what: str) -> None:
    """Raise one line naming the floating-point tensors of ``state`` that hold NaN or Inf (``what``: whose)."""
    import torch

    bad = sorted(name for name, tensor in state.items()
                 if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()))
    if bad:  # else a stage would fail later and blame the learning rate
        raise VpgtransError(f"{what} holds NaN or Inf values in {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; "
                            "it is damaged")
