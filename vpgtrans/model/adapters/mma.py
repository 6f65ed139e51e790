"""LaVIN's mixture-of-modality adapters (Luo et al. 2023, arXiv 2305.15023), as ``base_layer`` wrappers.

One adapter per decoder block of the frozen LLM (``mma``), and one per ViT block (``mma-vision``), on the
output of the attention norm (so after the norm and before attention, where LaVIN's code puts them):

    h   = norm(x)                                   (B, T, D) the wrapped norm's own output
    z   = dropout(Down h)                           (B, T, r)   shared down-projection, with bias
    w   = softmax(Router(e_m) / tau)                (B, 2)      e_m: the sample's modality embedding
    out = h + s * (w_0 * Up_0 z + w_1 * Up_1 z)     (B, T, D)   Up_k: block-diagonal (``groups``), zero at init

LaVIN reads ``e_m`` at each layer from a modality token put at position 0, which no other token attends
to and which never enters the cache: its hidden state at a layer is a fixed function of the modality
embedding row alone. The router therefore only ever sees one of two vectors per layer, and a per-layer
``Linear(D, 2)`` over the embedding row itself spans the same functions (any pair of per-modality
mixtures per layer). We read the embedding row directly — no extra token, no change to the sequence,
the cache or the positions. The modality is ``context.modality`` ((B,): 1 a sample with an image,
0 text-only), set by ``VisionLanguageModel`` for every call, repeated for beams, kept during decode.
In the ViT (``mma-vision``) the router reads the [CLS] token of the adapter's input, per image, as
LaVIN's does there (no modality embedding: every ViT input is an image).

The modality ``Embedding(2, D)`` is one tensor shared by every wrapper of a model: the first wrapper's
adapter owns it (``modality.weight`` in its state dict), the others hold an unregistered reference, so
the parts table saves it exactly once.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vpgtrans.errors import VpgtransError
from vpgtrans.model.adapters.context import AdapterLayer, TokenContext

DEFAULTS = {"rank": 8, "groups": 2, "tau": 10.0, "scale": 1.0, "dropout": 0.1}
_SHARED = "_mma_modality"  # where the first wrapper leaves the shared modality embedding on the context


class GroupedUp(nn.Module):
    """A block-diagonal up-projection r -> D with ``groups`` blocks (LaVIN's ``Conv1d(r, D, 1, groups)``):
    output block g reads only input block g. ``weight`` (D, r / groups), ``bias`` (D,)."""

    def __init__(self, rank: int, width: int, groups: int):
        super().__init__()
        self.groups = groups
        self.weight = nn.Parameter(torch.zeros(width, rank // groups))
        self.bias = nn.Parameter(torch.zeros(width))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        g = self.groups
        blocks = z.unflatten(-1, (g, z.shape[-1] // g))  # (..., g, r/g)
        weight = self.weight.view(g, self.weight.shape[0] // g, self.weight.shape[1])  # (g, D/g, r/g)
        return torch.einsum("...gi,goi->...go", blocks, weight).flatten(-2) + self.bias  # (..., D)


class MixtureOfModality(nn.Module):
    """The trainable half of one wrapper: down, two up experts, the router and (first LLM wrapper only)
    the modality embedding. ``forward(h, w) -> delta`` (B, T, D) for the mixture ``w`` (B, 2); the
    wrapper adds it to ``h``. ``modality``: the shared embedding, None to own it, False for none (ViT)."""

    def __init__(self, width: int, entry: dict, modality):
        super().__init__()
        rank, groups = entry["rank"], entry["groups"]
        self.tau, self.scale = float(entry["tau"]), float(entry["scale"])
        self.down = nn.Linear(width, rank)
        self.up = nn.ModuleList([GroupedUp(rank, width, groups) for _ in range(2)])
        self.router = nn.Linear(width, 2)
        self.dropout = nn.Dropout(entry["dropout"])
        if modality is None:
            self.modality = nn.Embedding(2, width)  # owned: saved and trained through this wrapper
        elif modality is not False:
            self.__dict__["shared_modality"] = modality  # a reference: not a submodule, saved once elsewhere

    def modality_embedding(self) -> nn.Embedding:
        return self._modules.get("modality") or self.__dict__["shared_modality"]

    def init_fresh(self, seed: int) -> None:
        """LaVIN's initialisation: Xavier down, zero bias, zero experts (the adapter starts as the identity),
        torch's default router, N(0, 1) modality embedding."""
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            fan_out, fan_in = self.down.weight.shape
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            self.down.weight.copy_(torch.rand(self.down.weight.shape, generator=generator) * 2 * bound - bound)
            self.down.bias.zero_()
            for up in self.up:
                up.weight.zero_()
                up.bias.zero_()
            bound = 1 / math.sqrt(self.router.weight.shape[1])  # nn.Linear's default, from our generator
            self.router.weight.copy_(torch.rand(self.router.weight.shape, generator=generator) * 2 * bound - bound)
            self.router.bias.copy_(torch.rand(self.router.bias.shape, generator=generator) * 2 * bound - bound)
            if "modality" in self._modules:
                self.modality.weight.copy_(torch.randn(self.modality.weight.shape, generator=generator))

    def weights(self, modality: torch.Tensor) -> torch.Tensor:
        """(B,) long -> (B, 2) the experts' mixture of each sample."""
        return self.route(self.modality_rows(modality))

    def modality_rows(self, modality: torch.Tensor) -> torch.Tensor:
        """e_m (B, D): each sample's row of the shared modality embedding. Under FSDP the table lives in the
        first wrapper's unit (the first decoder block), which is sharded again while later blocks run: the
        owner, always the first wrapper a call reaches, leaves the rows it looked up on the table, and the
        others take them from there while the table is sharded (same values, gradients through the owner's
        lookup). Elsewhere every wrapper looks its rows up itself."""
        from vpgtrans.sharding import is_sharded

        own = self._modules.get("modality")
        if own is not None:
            rows = own(modality)
            own.__dict__["_rows"] = (modality, rows)
            return rows
        shared = self.__dict__["shared_modality"]
        if not is_sharded(shared.weight):
            return shared(modality)
        modality_seen, rows = shared.__dict__.get("_rows", (None, None))
        if modality_seen is not modality:
            raise RuntimeError("the mma modality embedding is sharded and its owner (the first wrapper) did not run "
                               "first in this call")
        return rows

    def route(self, token: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, 2): ``softmax(Router(token) / tau)``."""
        return torch.softmax(self.router(token) / self.tau, dim=-1)

    def forward(self, h: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        z = self.dropout(self.down(h))  # (B, T, r)
        w = weights[:, None, :, None]  # (B, 1, 2, 1)
        experts = torch.stack([up(z) for up in self.up], dim=2)  # (B, T, 2, D)
        return self.scale * (w * experts).sum(dim=2)  # (B, T, D)


def _decoder_norms(llm) -> list[str]:
    """The attention-norm path of every decoder block: LLaMA-family ``input_layernorm`` (blocks with
    ``self_attn``, ``input_layernorm`` and ``post_attention_layernorm``, in that sequential order), OPT's
    ``self_attn_layer_norm`` when it runs before attention (``do_layer_norm_before``)."""
    model_type = getattr(llm.config, "model_type", type(llm).__name__)
    paths = []
    for name, module in llm.named_modules():
        children = dict(module.named_children())
        if {"self_attn", "input_layernorm", "post_attention_layernorm"} <= set(children):
            paths.append(f"{name}.input_layernorm")
        elif type(module).__name__ == "OPTDecoderLayer":
            if not module.do_layer_norm_before:
                raise VpgtransError(f"the mma adapter goes after the attention norm, but this {model_type} model "
                                    "normalises after attention (do_layer_norm_before=False, as OPT-350m)")
            paths.append(f"{name}.self_attn_layer_norm")
    if not paths:
        raise VpgtransError(f"the mma adapter does not know the decoder blocks of a {model_type} model (it needs "
                            "LLaMA-style input_layernorm or OPT's self_attn_layer_norm)")
    return paths


class MixtureOfModalityLayer(AdapterLayer):
    """Wraps an attention norm: ``norm(x) + s * sum_k w_k Up_k(drop(Down norm(x)))``."""

    @staticmethod
    def problems(entry: dict) -> list[str]:
        name = entry.get("type", "mma")
        problems = [f"{name} has no option {key!r} (it has {', '.join(DEFAULTS)})" for key in sorted(set(entry) - {"type", *DEFAULTS})]
        rank, groups = entry.get("rank"), entry.get("groups")
        for key in ("rank", "groups"):
            if not isinstance(entry.get(key), int) or isinstance(entry.get(key), bool) or entry[key] < 1:
                problems.append(f"{name} {key} must be a positive integer (got {entry.get(key)!r:.20})")
        if not problems and rank % groups:
            problems.append(f"{name} rank {rank} must be divisible by groups {groups}")
        for key, low in (("tau", 0.0), ("scale", None)):
            value = entry.get(key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
                    or (low is not None and value <= low):
                problems.append(f"{name} {key} must be a {'positive ' if low is not None else ''}number (got {value!r:.20})")
        dropout = entry.get("dropout")
        if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout < 1:
            problems.append(f"{name} dropout must be in [0, 1) (got {dropout!r:.20})")
        return problems

    @staticmethod
    def targets(llm, entry: dict) -> list[str]:
        return _decoder_norms(llm)

    @classmethod
    def wrap(cls, base_layer: nn.Module, entry: dict, part: str, context: TokenContext):
        width = base_layer.weight.shape[0]
        if width % entry["groups"]:
            raise VpgtransError(f"mma groups {entry['groups']} must divide the LLM width {width}")
        shared = context.__dict__.get(_SHARED)
        adapter = MixtureOfModality(width, entry, shared)
        if shared is None:
            context.__dict__[_SHARED] = adapter.modality
        adapter.init_fresh(0)
        return cls(base_layer, adapter, part, context)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        h = self.base_layer(hidden_states, *args, **kwargs)  # (B, T, D)
        modality = self.context.modality
        if modality is None:  # called outside VisionLanguageModel: a text-only call
            modality = torch.zeros(h.shape[0], dtype=torch.long)
        if modality.shape[0] != h.shape[0]:
            raise RuntimeError(f"adapter input {tuple(h.shape)} does not match the modality of {modality.shape[0]} samples")
        dtype = self.adapter.down.weight.dtype
        delta = self.adapter(h.to(dtype), self.adapter.weights(modality.to(h.device)))
        return h + delta.to(h.dtype)


class VisionMixtureOfModalityLayer(MixtureOfModalityLayer):
    """``mma-vision``: the same adapter on ``layer_norm1`` of every ViT block, routed by the block's [CLS]."""

    host = "vision"

    @staticmethod
    def targets(vision, entry: dict) -> list[str]:
        paths = [f"{name}.layer_norm1" for name, module in vision.named_modules()
                 if type(module).__name__ in ("Blip2EncoderLayer", "InstructBlipEncoderLayer")]
        if not paths:
            raise VpgtransError(f"the mma-vision adapter does not know the blocks of a {type(vision).__name__}")
        return paths

    @classmethod
    def wrap(cls, base_layer: nn.Module, entry: dict, part: str, context: TokenContext):
        width = base_layer.weight.shape[0]
        if width % entry["groups"]:
            raise VpgtransError(f"mma-vision groups {entry['groups']} must divide the ViT width {width}")
        adapter = MixtureOfModality(width, entry, False)
        adapter.init_fresh(0)
        return cls(base_layer, adapter, part, context)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        h = self.base_layer(hidden_states, *args, **kwargs)  # (B, 1 + S*S, D_vit)
        x = h.to(self.adapter.down.weight.dtype)
        delta = self.adapter(x, self.adapter.route(x[:, 0]))  # routed by each image's [CLS]
        return h + delta.to(h.dtype)
