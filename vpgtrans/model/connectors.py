"""Connectors: what maps the VPG's output into the LLM's input-embedding space.

A registry, so new ways to connect the inherited vision side to the target LLM (LaVIN adapters,
InfMLLM's pool-adapter, visual-token LoRA) are new entries, not changes to the stages.
"""

from __future__ import annotations

import torch
from torch import nn


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


CONNECTORS = {"linear": LinearConnector}


def build_connector(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    from vpgtrans.errors import VpgtransError

    if kind not in CONNECTORS:
        raise VpgtransError(f"unknown connector {kind!r}; available: {', '.join(CONNECTORS)}")
    return CONNECTORS[kind](in_dim, out_dim)
