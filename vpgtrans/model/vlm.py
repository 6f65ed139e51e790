"""VisionLanguageModel = frozen vision encoder -> VPG -> connector -> frozen LLM, composed, not inherited.

Soft prompts go where ``input_ids`` hold ``IMAGE_TOKEN_ID`` (a negative id no vocabulary uses, so the
LLM's vocabulary is never touched): the template decides where the image sits in the text.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

IMAGE_TOKEN_ID = -200
VISION_SIDE_LAYERS = ("Blip2EncoderLayer", "Blip2QFormerLayer", "InstructBlipEncoderLayer", "InstructBlipQFormerLayer")


def build_vision_encoder(vision_config: dict):
    """A BLIP-2 ViT without its final LayerNorm (that one belongs to the VPG, as LAVIS's ln_vision)."""
    from transformers import Blip2VisionConfig, Blip2VisionModel

    vision = Blip2VisionModel(Blip2VisionConfig(**vision_config))
    vision.post_layernorm = nn.Identity()
    return vision


class VisionLanguageModel(nn.Module):
    """forward(input_ids, pixel_values=None, attention_mask=None, labels=None) -> HF output with
    ``.logits`` and ``.loss``; ``generate(...)`` -> new token ids."""

    def __init__(self, vision: nn.Module, vpg: nn.Module, connector: nn.Module, llm: nn.Module,
                 tokenizer=None, template=None, image_processor=None):
        super().__init__()
        self.vision = vision
        self.vpg = vpg
        self.connector = connector
        self.llm = llm
        self.tokenizer = tokenizer
        self.template = template
        self.image_processor = image_processor

    @property
    def is_encoder_decoder(self) -> bool:
        return bool(getattr(self.llm.config, "is_encoder_decoder", False))

    @property
    def _no_split_modules(self) -> list[str]:
        """Layer classes that FSDP's transformer auto-wrap policy shards as one unit each (accelerate reads
        this name, as on an HF model): the LLM's decoder layers, the ViT's and the Q-Former's layers.
        Only classes present in this model (accelerate refuses a name it cannot find)."""
        wanted = {*(getattr(self.llm, "_no_split_modules", None) or ()), *VISION_SIDE_LAYERS}
        return sorted(wanted & {type(module).__name__ for module in self.modules()})

    @property
    def num_query_tokens(self) -> int:
        return self.vpg.num_query_tokens

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, K, D_llm) soft prompts."""
        vision_frozen = not any(p.requires_grad for p in self.vision.parameters())
        with torch.no_grad() if vision_frozen else nullcontext():
            # No graph through the frozen ViT: it is the most expensive part and never trained here.
            vision_dtype = next(self.vision.parameters()).dtype
            image_embeds = self.vision(pixel_values=pixel_values.to(vision_dtype)).last_hidden_state  # (B, N, D_vit)
        vpg_dtype = self.vpg.query_tokens.dtype
        query_output = self.vpg(image_embeds.to(vpg_dtype))  # (B, K, D_q)
        return self.connector(query_output)  # (B, K, D_llm)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with the soft prompts scattered into the image slots."""
        image_mask = input_ids == IMAGE_TOKEN_ID  # (B, T)
        embed_tokens = self.llm.get_input_embeddings()
        inputs_embeds = embed_tokens(input_ids.masked_fill(image_mask, 0))  # (B, T, D_llm)
        if not image_mask.any():
            return inputs_embeds
        if pixel_values is None:
            raise ValueError("input_ids hold image slots but no pixel_values were given")
        soft_prompts = self.encode_images(pixel_values).to(inputs_embeds.device, inputs_embeds.dtype)  # (B, K, D_llm)
        if int(image_mask.sum()) != soft_prompts.shape[0] * soft_prompts.shape[1]:
            raise ValueError(f"each sample needs exactly {soft_prompts.shape[1]} image slots")
        return inputs_embeds.masked_scatter(image_mask.unsqueeze(-1), soft_prompts)

    def forward(self, input_ids, pixel_values=None, attention_mask=None, labels=None, **kwargs):
        inputs_embeds = self.embed(input_ids, pixel_values)
        return self.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids, pixel_values=None, attention_mask=None, **generate_kwargs):
        """Greedy/beam generation from the (left-padded) prompt; returns only the new tokens."""
        inputs_embeds = self.embed(input_ids, pixel_values)
        return self.llm.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **generate_kwargs)
