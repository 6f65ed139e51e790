"""Visual-token-only LoRA ("partial LoRA", Dutt et al. 2025, arXiv 2503.22517): ``h = W x + m (α/r) B A x``
with ``m = 1`` at visual-token positions only, on dense LLMs and on the experts of Mixture-of-Experts LLMs.

Two wrappers, both keeping the original module as ``base_layer``:

``MaskedLoRALinear``   around a linear layer (``nn.Linear``, bitsandbytes ``Linear8bitLt`` / ``Linear4bit``:
                       they keep ``in_features`` / ``out_features``); adds the low-rank delta at visual rows.
``MaskedLoRAExperts``  around transformers' fused experts module (Mixtral, Qwen2-MoE, OLMoE: 3-D
                       ``gate_up_proj`` (E, 2I, D) and ``down_proj`` (E, D, I)); per-expert A/B on both
                       projections. It receives the flattened tokens (B*T, D) with the router's top-k choice,
                       so token positions are still known: the original experts forward computes every token,
                       then the visual rows are replaced by the same expert mixture computed with the
                       adapted weights. The router is not touched (it stays frozen: the base weights never train).

Where the token context has no visual position (text-only inputs, decode steps) both call the base layer's
own forward and nothing else, so the float summation order — and the logits — are the untouched LLM's.
Text rows of a mixed sequence also keep their base output in every wrapped layer; they still change
downstream through attention to the adapted visual positions, as expected.

Targets are a literal table per ``model_type``: groups (``attention``, ``mlp``; ``mlp`` on an MoE LLM means the
experts and, for Qwen2-MoE, the shared expert and its dense layers) or single entries of the table
(``self_attn.q_proj``, ``mlp.experts``). An unknown model type is refused with one line.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from vpgtrans.errors import VpgtransError
from vpgtrans.model.adapters.context import AdapterLayer

DEFAULTS = {"rank": 8, "alpha": 16, "dropout": 0.05, "targets": ["attention", "mlp"]}
KEYS = {"type", *DEFAULTS}

_LLAMA_ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_LLAMA_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_LAYERS = r"model\.layers\.\d+\."
# model_type -> (prefix of a decoder layer's path, {group: module paths inside the layer})
TARGETS: dict[str, tuple[str, dict[str, tuple[str, ...]]]] = {
    "llama": (_LAYERS, {"attention": _LLAMA_ATTENTION, "mlp": _LLAMA_MLP}),
    "mistral": (_LAYERS, {"attention": _LLAMA_ATTENTION, "mlp": _LLAMA_MLP}),
    "qwen2": (_LAYERS, {"attention": _LLAMA_ATTENTION, "mlp": _LLAMA_MLP}),
    "qwen3": (_LAYERS, {"attention": _LLAMA_ATTENTION, "mlp": _LLAMA_MLP}),
    "opt": (r"model\.decoder\.layers\.\d+\.", {"attention": ("self_attn.q_proj", "self_attn.k_proj",
                                                             "self_attn.v_proj", "self_attn.out_proj"),
                                               "mlp": ("fc1", "fc2")}),
    "mixtral": (_LAYERS, {"attention": _LLAMA_ATTENTION, "mlp": ("mlp.experts",)}),
    "olmoe": (_LAYERS, {"attention": _LLAMA_ATTENTION, "mlp": ("mlp.experts",)}),
    # Qwen2-MoE: routed experts, the shared expert (dense, every token), and the dense MLP of mlp_only_layers.
    "qwen2_moe": (_LAYERS, {"attention": _LLAMA_ATTENTION,
                            "mlp": ("mlp.experts", "mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj",
                                    "mlp.shared_expert.down_proj", *_LLAMA_MLP)}),
}


def _kaiming_uniform(shape: tuple[int, ...], fan_in: int, generator: torch.Generator) -> torch.Tensor:
    # peft's default for lora_A (kaiming_uniform with a = sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    bound = 1 / math.sqrt(fan_in)
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound



def target_modules(llm, entry: dict, adapter: str) -> list[tuple[str, nn.Module]]:
    """``(path, module)`` of the LLM's layers an entry's ``targets`` name (groups like ``attention`` / ``mlp``
    or single layer names, from the literal table of its model type); one line for an unknown type, unknown
    names, or names that match nothing. Shared by ``plora`` and peft's ``lora``."""
    model_type = llm.config.model_type
    if model_type not in TARGETS:
        raise VpgtransError(f"{adapter} has no target table for LLMs of model type {model_type!r} "
                            f"(known: {', '.join(TARGETS)})")
    prefix, groups = TARGETS[model_type]
    known = {name for names in groups.values() for name in names}
    wanted, unknown = [], []
    for target in {**DEFAULTS, **entry}["targets"]:
        if target in groups:
            wanted += groups[target]
        elif target in known:
            wanted.append(target)
        else:
            unknown.append(target)
    if unknown:
        raise VpgtransError(f"{adapter} targets {unknown} are not known for {model_type} (groups: "
                            f"{', '.join(groups)}; layers: {', '.join(sorted(known))})")
    pattern = re.compile(prefix + "(" + "|".join(re.escape(name) for name in sorted(set(wanted))) + ")$")
    matched = [(name, module) for name, module in llm.named_modules() if pattern.match(name)]
    if not matched:
        raise VpgtransError(f"{adapter} targets {entry.get('targets', DEFAULTS['targets'])} match no module of this "
                            f"{model_type} LLM")
    return matched

class LoRA(nn.Module):
    """``(α/r) B A drop(x)``: (..., d_in) -> (..., d_out); B starts at zero."""

    def __init__(self, d_in: int, d_out: int, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.lora_A = nn.Parameter(torch.zeros(rank, d_in))
        self.lora_B = nn.Parameter(torch.zeros(d_out, rank))
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)

    def init_fresh(self, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.lora_A.copy_(_kaiming_uniform(tuple(self.lora_A.shape), self.lora_A.shape[1], generator))
            self.lora_B.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x.to(self.lora_A.dtype))
        return F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale


class ExpertsLoRA(nn.Module):
    """Per-expert LoRA of a fused experts module: ``gate_up`` (E: (2I, r) x (r, D)), ``down`` (E: (D, r) x (r, I))."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.gate_up_A = nn.Parameter(torch.zeros(num_experts, rank, hidden))
        self.gate_up_B = nn.Parameter(torch.zeros(num_experts, 2 * intermediate, rank))
        self.down_A = nn.Parameter(torch.zeros(num_experts, rank, intermediate))
        self.down_B = nn.Parameter(torch.zeros(num_experts, hidden, rank))
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)

    def init_fresh(self, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for a in (self.gate_up_A, self.down_A):
                a.copy_(_kaiming_uniform(tuple(a.shape), a.shape[2], generator))
            self.gate_up_B.zero_()
            self.down_B.zero_()

    def delta(self, x: torch.Tensor, expert: int, which: str) -> torch.Tensor:
        a, b = getattr(self, f"{which}_A")[expert], getattr(self, f"{which}_B")[expert]
        x = self.dropout(x.to(a.dtype))
        return F.linear(F.linear(x, a), b) * self.scale


class MaskedLoRALinear(AdapterLayer):
    """``base_layer(x)``, plus ``(α/r) B A x`` at the visual rows (the text rows keep the base output)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.context.visual_mask(x)  # (B, T), or (B*T,) for flattened tokens; None: nothing visual
        if mask is None:
            return self.base_layer(x)
        out = self.base_layer(x)
        rows = mask.reshape(-1).nonzero().squeeze(1)  # visual token indices in the flattened (B*T) order
        flat_x, flat_out = x.reshape(-1, x.shape[-1]), out.reshape(-1, out.shape[-1])
        adapted = flat_out[rows] + self.adapter(flat_x[rows]).to(out.dtype)
        return flat_out.index_copy(0, rows, adapted).reshape(out.shape)


class MaskedLoRAExperts(AdapterLayer):
    """The fused experts with per-expert LoRA at the visual rows: ``forward(hidden (N, D), top_k_index (N, k),
    top_k_weights (N, k)) -> (N, D)``, the router's choice unchanged."""

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        mask = self.context.visual_mask(hidden_states)  # (N,) with N = B*T
        out = self.base_layer(hidden_states, top_k_index, top_k_weights)  # the original forward, every token
        if mask is None:
            return out
        rows = mask.reshape(-1).nonzero().squeeze(1)
        x, index, weights = hidden_states[rows], top_k_index[rows], top_k_weights[rows]  # (V, D), (V, k), (V, k)
        base, lora = self.base_layer, self.adapter
        mixed = torch.zeros(x.shape[0], out.shape[-1], dtype=torch.float32, device=x.device)
        for expert in index.unique().tolist():
            if expert >= base.num_experts:  # transformers' "no expert" padding index (expert parallelism)
                continue
            token, slot = torch.where(index == expert)
            h = x[token]  # (n, D)
            gate_up = F.linear(h, base.gate_up_proj[expert]).float() + lora.delta(h, expert, "gate_up")
            gate, up = gate_up.chunk(2, dim=-1)
            inner = base.act_fn(gate) * up  # (n, I)
            y = F.linear(inner.to(base.down_proj.dtype), base.down_proj[expert]).float()  # (n, D)
            y = y + lora.delta(inner, expert, "down")
            mixed = mixed.index_add(0, token, y * weights[token, slot, None].float())
        return out.index_copy(0, rows, mixed.to(out.dtype))


class PLoRA(AdapterLayer):
    """The ``plora`` adapter type: picks the wrapper per target (a linear layer or a fused experts module)."""

    text_path_exact = True  # text-only inputs compute exactly what the LLM computes, trained or not

    @staticmethod
    def problems(entry: dict) -> list[str]:
        problems = []
        unknown = sorted(set(entry) - KEYS)
        if unknown:
            problems.append(f"plora has unknown keys {unknown} (it takes {', '.join(sorted(KEYS - {'type'}))})")
        entry = {**DEFAULTS, **entry}
        if not isinstance(entry["rank"], int) or isinstance(entry["rank"], bool) or entry["rank"] < 1:
            problems.append(f"plora rank must be an integer >= 1 (got {entry['rank']!r})")
        if not isinstance(entry["alpha"], (int, float)) or isinstance(entry["alpha"], bool) or not entry["alpha"] > 0:
            problems.append(f"plora alpha must be > 0 (got {entry['alpha']!r})")
        if not isinstance(entry["dropout"], (int, float)) or not 0 <= entry["dropout"] < 1:
            problems.append(f"plora dropout must be in [0, 1) (got {entry['dropout']!r})")
        targets = entry["targets"]
        if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
            problems.append(f"plora targets must be a non-empty list of names (got {targets!r})")
        return problems

    @staticmethod
    def targets(llm, entry: dict) -> list[str]:
        return [name for name, _ in target_modules(llm, entry, "plora")]

    @classmethod
    def wrap(cls, base_layer, entry, part, context):
        entry = {**DEFAULTS, **entry}
        rank, alpha, dropout = entry["rank"], float(entry["alpha"]), float(entry["dropout"])
        if _is_fused_experts(base_layer):
            gate_up, down = base_layer.gate_up_proj, base_layer.down_proj  # (E, 2I, D), (E, D, I)
            adapter = ExpertsLoRA(gate_up.shape[0], gate_up.shape[2], down.shape[2], rank, alpha, dropout)
            return MaskedLoRAExperts(base_layer, adapter, part, context)
        if hasattr(base_layer, "in_features") and hasattr(base_layer, "out_features"):
            adapter = LoRA(base_layer.in_features, base_layer.out_features, rank, alpha, dropout)
            return MaskedLoRALinear(base_layer, adapter, part, context)
        raise VpgtransError(f"plora cannot wrap a {type(base_layer).__name__} (a linear layer or fused experts)")


def _is_fused_experts(module: nn.Module) -> bool:
    """transformers' fused experts layout that ``MaskedLoRAExperts`` computes: [gate; up] concatenated, not
    transposed, no biases."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not isinstance(gate_up, torch.Tensor) or not isinstance(down, torch.Tensor) or gate_up.dim() != 3:
        return False
    layout = (getattr(module, "is_concatenated", True), getattr(module, "is_transposed", False),
              getattr(module, "has_bias", False), getattr(module, "has_gate", True))
    if layout != (True, False, False, True):
        raise VpgtransError(f"plora: the experts of {type(module).__name__} use a fused layout it does not compute "
                            f"(concatenated, transposed, bias, gate = {layout})")
    return True
