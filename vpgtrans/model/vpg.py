"""The visual prompt generator: post-ViT LayerNorm + Q-Former + K learned query tokens.

This is the part VPGTrans inherits unchanged from the source model. Names follow HF BLIP-2 except the
LayerNorm, which HF keeps inside the vision model as ``post_layernorm`` and LAVIS calls ``ln_vision``:
here it belongs to the VPG (it is trained with it), so it is ``ln_vision``.
"""

from __future__ import annotations

import torch
from torch import nn

VPG_KINDS = ("blip2", "instructblip")


def build_qformer(kind: str, qformer_config: dict):
    """An HF Q-Former (BLIP-2's, or InstructBLIP's, which also has text embeddings)."""
    if kind == "instructblip":
        from transformers import InstructBlipQFormerConfig, InstructBlipQFormerModel

        return InstructBlipQFormerModel(InstructBlipQFormerConfig(**qformer_config))
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    return Blip2QFormerModel(Blip2QFormerConfig(**qformer_config))


class VisualPromptGenerator(nn.Module):
    """(B, N, D_vit) ViT features -> (B, K, D_qformer) query outputs."""

    def __init__(self, kind: str, qformer_config: dict, num_query_tokens: int, vision_width: int,
                 ln_eps: float = 1e-6):
        super().__init__()
        self.kind = kind
        self.ln_vision = nn.LayerNorm(vision_width, eps=ln_eps)
        self.query_tokens = nn.Parameter(torch.zeros(1, num_query_tokens, qformer_config["hidden_size"]))
        self.qformer = build_qformer(kind, qformer_config)

    @property
    def num_query_tokens(self) -> int:
        return self.query_tokens.shape[1]

    @property
    def out_dim(self) -> int:
        return self.query_tokens.shape[2]

    def init_fresh(self, seed: int, std: float = 0.02) -> None:
        """Initialise for training from scratch. HF initialises query tokens to zeros and the
        BLIP-2 vision config's initializer_range is 1e-10: left alone, the VPG would be dead."""
        generator = torch.Generator().manual_seed(seed)
        for name, param in self.named_parameters():
            with torch.no_grad():
                if name.endswith("bias"):
                    param.zero_()
                elif "LayerNorm" in name or "layernorm" in name or name.startswith("ln_vision"):
                    param.fill_(1.0)
                else:
                    param.copy_(torch.randn(param.shape, generator=generator) * std)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        image_embeds = self.ln_vision(image_embeds)  # (B, N, D_vit)
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)  # (B, K, D_q)
        if self.kind == "instructblip":
            # Instruction-free use of InstructBLIP's Q-Former: queries only (no instruction text).
            query_mask = torch.ones(queries.shape[:-1], dtype=torch.long, device=queries.device)
            out = self.qformer(query_embeds=queries, attention_mask=query_mask,
                               encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask)
            return out.last_hidden_state[:, : queries.shape[1]]
        out = self.qformer(query_embeds=queries, encoder_hidden_states=image_embeds,
                           encoder_attention_mask=image_mask)
        return out.last_hidden_state  # (B, K, D_q)
