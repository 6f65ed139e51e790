"""Visual kinds: what turns the vision encoder's outputs into the LLM's visual tokens.

A kind is an ``nn.Module`` class registered in ``VISUAL_KINDS`` under its manifest name
(``model.visual.type``). Its interface:

``Kind(section, vision_config, llm_width)``
    build from the manifest section (``{"type": ..., kind's own keys}``), the ViT config and the LLM width;
``Kind.problems(section) -> list[str]``
    what in a manifest section it could not build from ([] when nothing);
``Kind.inherit(source, llm_width, converter, seed, options) -> (section, {part: tensors}, metrics)``
    the first bundle's section and weights from the source model (``converter``: the fitted word
    converter ``(W, b)``, or None when the kind does not use one or the user asked for none;
    ``options``: ``InheritConfig.visual_options``, refuse unknown ones with one line);
``Kind.parts``
    its trainable parts, in order: each is an attribute of the module saved as ``<part>.safetensors``,
    with an ``init_fresh(seed)`` method for training from scratch;
``Kind.uses_converter``, ``Kind.all_hidden_states``
    whether inherit should fit the word converter; whether forward reads every ViT layer;
``kind.num_tokens``
    N, the image-slot count the prompt template reserves;
``kind(features) -> (B, N, D_llm)``
    the visual tokens, from ``VisionFeatures``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class VisionFeatures:
    """The frozen ViT's outputs: ``last`` (B, 1 + S*S, D_vit) and, when a kind asks for them, every
    layer's ``hidden_states`` (embeddings first). Position 0 is [CLS], the rest the patch grid."""

    last: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None

    def cls(self, layer: int = -1) -> torch.Tensor:
        """(B, D_vit): the [CLS] token of a layer (``hidden_states`` index; -1 the last)."""
        states = self.last if layer == -1 or self.hidden_states is None else self.hidden_states[layer]
        return states[:, 0]

    def patch_grid(self) -> torch.Tensor:
        """(B, S, S, D_vit): the last layer's patch tokens in their spatial order ([CLS] dropped)."""
        patches = self.last[:, 1:]
        side = int(round(patches.shape[1] ** 0.5))
        return patches.reshape(patches.shape[0], side, side, patches.shape[2])


def _kinds() -> dict:
    from vpgtrans.model.visual.lavin import LavinVisual
    from vpgtrans.model.visual.pool import PoolVisual
    from vpgtrans.model.visual.qformer import QFormerVisual

    return {"qformer": QFormerVisual, "pool": PoolVisual, "lavin": LavinVisual}


VISUAL_KINDS: dict[str, type] = _kinds()


def visual_kind(name: str) -> type:
    from vpgtrans.errors import VpgtransError

    if name not in VISUAL_KINDS:
        raise VpgtransError(f"unknown visual kind {name!r}; available: {', '.join(VISUAL_KINDS)}")
    return VISUAL_KINDS[name]
