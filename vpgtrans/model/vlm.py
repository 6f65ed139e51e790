"""VisionLanguageModel = frozen vision encoder -> visual kind -> LLM (frozen, optionally with adapters
inside), composed, not inherited.

Visual tokens go where ``input_ids`` hold ``IMAGE_TOKEN_ID`` (a negative id no vocabulary uses, so the
LLM's vocabulary is never touched): the template decides where the image sits in the text. Around every
LLM call the token context says which positions are visual, for the adapters inside the LLM.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext

import torch
from torch import nn

from vpgtrans.errors import VpgtransError
from vpgtrans.model.adapters.context import TokenContext
from vpgtrans.model.parts import Part

log = logging.getLogger(__name__)

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
    ``.logits`` and ``.loss``; ``generate(...)`` -> new token ids.

    ``parts`` is the parts table (``vpgtrans.model.parts``): the visual kind's parts, then one per adapter
    entry; ``part(name)`` one of them."""

    def __init__(self, vision: nn.Module, visual: nn.Module, llm: nn.Module, tokenizer=None, template=None,
                 image_processor=None, adapter_parts: list[Part] | None = None, token_context: TokenContext | None = None):
        super().__init__()
        self.vision = vision
        self.visual = visual
        self.llm = llm
        self.tokenizer = tokenizer
        self.template = template
        self.image_processor = image_processor
        self.token_context = token_context or TokenContext()
        self.parts = [Part(name, f"visual.{name}") for name in visual.parts] + list(adapter_parts or [])

    def part(self, name: str) -> Part:
        for part in self.parts:
            if part.name == name:
                return part
        raise KeyError(name)

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
    def num_image_tokens(self) -> int:
        """The image-slot count of the prompt: what the visual kind produces per image."""
        return self.visual.num_tokens

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, N, D_llm) visual tokens."""
        from vpgtrans.model.visual import VisionFeatures

        vision_frozen = not any(p.requires_grad for p in self.vision.parameters())
        with torch.no_grad() if vision_frozen else nullcontext():
            # No graph through the frozen ViT: it is the most expensive part and never trained here.
            vision_dtype = next(self.vision.parameters()).dtype
            out = self.vision(pixel_values=pixel_values.to(vision_dtype),
                              output_hidden_states=self.visual.all_hidden_states)
        # A 16-bit frozen ViT feeds fp32 trained parts (outside autocast: eval --dtype bf16) in their dtype.
        dtype = next(self.visual.parameters()).dtype
        hidden = None if out.hidden_states is None else tuple(h.to(dtype) for h in out.hidden_states)
        features = VisionFeatures(out.last_hidden_state.to(dtype), hidden)  # (B, 1 + S*S, D_vit)
        return self.visual(features)  # (B, N, D_llm)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with the visual tokens scattered into the image slots.

        A batch may mix samples with an image (exactly N slots each) and text-only samples (no slot):
        ``pixel_values`` then holds the images of the samples with slots only, in batch order."""
        image_mask = input_ids == IMAGE_TOKEN_ID  # (B, T)
        embed_tokens = self.llm.get_input_embeddings()
        inputs_embeds = embed_tokens(input_ids.masked_fill(image_mask, 0))  # (B, T, D_llm)
        if not image_mask.any():
            return inputs_embeds
        if pixel_values is None:
            raise ValueError("input_ids hold image slots but no pixel_values were given")
        slots = image_mask.sum(dim=1)  # (B,)
        with_image = int((slots > 0).sum())
        if pixel_values.shape[0] != with_image:
            raise ValueError(f"{with_image} samples hold image slots but {pixel_values.shape[0]} images were given")
        visual_tokens = self.encode_images(pixel_values).to(inputs_embeds.device, inputs_embeds.dtype)  # (B_img, N, D_llm)
        if bool(((slots != 0) & (slots != visual_tokens.shape[1])).any()):
            raise ValueError(f"each sample needs exactly {visual_tokens.shape[1]} image slots, or none")
        return inputs_embeds.masked_scatter(image_mask.unsqueeze(-1), visual_tokens)  # fills samples in batch order

    def check_length(self, tokens: int, new_tokens: int = 0) -> None:
        """A sequence longer than a decoder-only LLM's ``max_position_embeddings``: with a learned position
        table (OPT, GPT-2) it cannot run (an IndexError deep in torch) and is refused in one line; rotary or
        relative positions (LLaMA, Mistral...) run past the length they were trained on, which is warned
        about once."""
        limit = getattr(self.llm.config, "max_position_embeddings", None)
        if self.is_encoder_decoder or not isinstance(limit, int) or tokens + new_tokens <= limit:
            return
        asked = f"a prompt of {tokens} tokens" + (f" + up to {new_tokens} new tokens" if new_tokens else "")
        if not self._learned_positions(limit):
            if not getattr(self, "_warned_length", False):
                self._warned_length = True
                log.warning("%s (image slots included) runs past the %d positions the LLM was trained on "
                            "(max_position_embeddings)", asked, limit)
            return
        raise VpgtransError(f"{asked} (image slots included) exceeds the LLM's {limit} positions "
                            "(max_position_embeddings): shorten the question / context text"
                            + (", or lower --max-new-tokens" if new_tokens else " (--max-text-len caps the answer's tokens)"))

    def _learned_positions(self, limit: int) -> bool:
        """Whether the LLM looks positions up in a table of ``limit`` rows (OPT keeps 2 more). Found once per
        model: every forward of an over-long prompt asks."""
        if "_learned_positions_found" not in self.__dict__:
            words = self.llm.get_input_embeddings()
            self.__dict__["_learned_positions_found"] = any(
                isinstance(module, nn.Embedding) and module is not words and module.num_embeddings in (limit, limit + 2)
                for module in self.llm.modules())
        return self.__dict__["_learned_positions_found"]

    def forward(self, input_ids, pixel_values=None, attention_mask=None, labels=None, **kwargs):
        if "past_key_values" not in kwargs:
            self.check_length(input_ids.shape[1])
        image_mask = input_ids == IMAGE_TOKEN_ID
        text_only = pixel_values is None and not bool(image_mask.any())
        blank_image = text_only and torch.is_grad_enabled() and self._vision_side_sharded()
        with self.token_context.call(image_mask):
            if blank_image:
                inputs_embeds = self.llm.get_input_embeddings()(input_ids) + self._blank_image_zero(input_ids.device)
                out = self.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs)
            elif text_only:  # exactly the LLM's own computation
                out = self.llm(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
            else:
                inputs_embeds = self.embed(input_ids, pixel_values)
                out = self.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs)
        return self._keep_visual_in_graph(out) if text_only and not blank_image else out

    def _vision_side_sharded(self) -> bool:
        try:
            from torch.distributed.fsdp import FSDPModule
        except ImportError:  # torch without FSDP2
            return False
        return any(isinstance(module, FSDPModule) for side in (self.vision, self.visual) for module in side.modules())

    def _blank_image_zero(self, device) -> torch.Tensor:
        """Under FSDP each ViT / Q-Former layer is a unit whose forward (and backward) all-gathers its
        weights with the other processes: a process whose batch has no image runs the visual side on one
        blank image, as the others do on theirs, and feeds 0 x the result into the LLM's input embeddings
        (x + 0.0 == x), so its graph, and the order of the collectives in backward, is theirs."""
        size = self.vision.config.image_size
        return self.encode_images(torch.zeros(1, 3, size, size, device=device)).float().sum() * 0.0

    def _keep_visual_in_graph(self, out):
        """A batch without an image (text-only multiple-choice rows) leaves the trained visual parts out of
        the autograd graph, and under DDP every process must give every trained parameter a gradient (the
        others' batches may hold images): add 0 x one element of each. The logits keep their values
        (x + 0.0 == x); nothing is added when no gradient is being recorded."""
        if not torch.is_grad_enabled():
            return out
        params = [p for module in (self.visual, self.vision) for p in module.parameters() if p.requires_grad]
        if not params:
            return out
        zero = torch.stack([p.reshape(-1)[0].float() for p in params]).sum() * 0.0
        out.logits = out.logits + zero.to(out.logits.device, out.logits.dtype)
        if getattr(out, "loss", None) is not None:
            out.loss = out.loss + zero.to(out.loss.device, out.loss.dtype)
        return out

    @torch.no_grad()
    def generate(self, input_ids, pixel_values=None, attention_mask=None, **generate_kwargs):
        """Greedy/beam generation from the (left-padded) prompt; returns only the new tokens."""
        self.check_length(input_ids.shape[1], int(generate_kwargs.get("max_new_tokens") or 0))
        inputs_embeds = self.embed(input_ids, pixel_values)
        with self.token_context.generation(self.llm, input_ids == IMAGE_TOKEN_ID):
            return self.llm.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **generate_kwargs)
