"""Connectors: the ways to attach the inherited vision side to the target LLM, chosen with ``--connector``.

A connector names a visual kind (``vpgtrans.model.visual``: what turns ViT outputs into visual tokens),
the adapters put inside the LLM (``vpgtrans.model.adapters``; entries as the manifest stores them) and
the recipe ``transfer`` runs by default (``vpgtrans.recipes``). New ways to connect are new entries in
these registries, not changes to the stages.

``PROJECTORS`` are the qformer kind's projector types (``model.visual.connector.type``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vpgtrans.errors import VpgtransError


class LinearConnector(nn.Module):
    """BLIP-2's projector: (B, K, D_q) -> (B, K, D_llm), ``proj = W x + b``."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)

    def init_fresh(self, seed: int, std: float = 0.02) -> None:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(self.proj.weight.shape, generator=generator) * std)
            self.proj.bias.zero_()

    def forward(self, vpg_output: torch.Tensor) -> torch.Tensor:
        return self.proj(vpg_output)


PROJECTORS = {"linear": LinearConnector}


def build_connector(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    if kind not in PROJECTORS:
        raise VpgtransError(f"unknown projector {kind!r}; available: {', '.join(PROJECTORS)}")
    return PROJECTORS[kind](in_dim, out_dim)


@dataclass(frozen=True)
class Connector:
    visual: str  # a VISUAL_KINDS name
    adapters: tuple[dict, ...] = ()  # manifest entries ({"type": an ADAPTERS name, its options})
    recipe: str = "vpgtrans"  # the RECIPES entry transfer runs


CONNECTORS: dict[str, Connector] = {
    "linear": Connector("qformer"),
    # InfMLLM's pool-adapter on the ViT's patch grid, no Q-Former (vpgtrans.model.visual.pool), and peft's
    # LoRA on the LLM for its third stage (vpgtrans.model.adapters.lora; zero at inherit)
    "infmllm": Connector("pool", ({"type": "lora", "rank": 8, "alpha": 16, "dropout": 0.05,
                                   "targets": ["attention", "mlp"]},), recipe="infmllm"),
    # BLIP-2's projector + LoRA at visual-token positions only (vpgtrans.model.adapters.plora)
    "plora": Connector("qformer", ({"type": "plora", "rank": 8, "alpha": 16, "dropout": 0.05,
                                    "targets": ["attention", "mlp"]},), recipe="plora"),
    # LaVIN: multi-layer [CLS] connector + mixture-of-modality adapters in every decoder block and ViT block;
    # lavin-llm: the same without the ViT adapters (LaVIN's "optionally also in the ViT")
    "lavin": Connector("lavin", ({"type": "mma", "rank": 8, "groups": 2, "tau": 10.0, "scale": 1.0, "dropout": 0.1},
                                {"type": "mma-vision", "rank": 8, "groups": 2, "tau": 10.0, "scale": 1.0,
                                 "dropout": 0.1}), recipe="lavin"),
    "lavin-llm": Connector("lavin", ({"type": "mma", "rank": 8, "groups": 2, "tau": 10.0, "scale": 1.0,
                                      "dropout": 0.1},), recipe="lavin-llm"),
}


def connector(name: str) -> Connector:
    if name not in CONNECTORS:
        raise VpgtransError(f"unknown connector {name!r}; available: {', '.join(CONNECTORS)}")
    return CONNECTORS[name]
