"""The token context: which positions of the current LLM call are visual, and each sample's modality.

``VisionLanguageModel`` sets it around every LLM call (``forward``: the whole sequence; ``generate``:
the prompt's mask for the prefill call, none for the decode steps, whose new tokens are text; the
batch is repeated as generate repeats it for beams). Adapter wrappers read it; a wrapper whose mask is
empty calls its base layer's own forward, so a text-only input computes exactly what the LLM does.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


class TokenContext:
    def __init__(self):
        self.visual: torch.Tensor | None = None  # (B, T) bool; None: no visual position in this call
        self.modality: torch.Tensor | None = None  # (B,) long: 1 a sample with an image, 0 text-only

    def visual_mask(self, x: torch.Tensor) -> torch.Tensor | None:
        """The mask for a wrapper's input ``x`` ((B, T, D), or (B*T, D) where a layer flattens tokens, as
        MoE experts do); None when no position of this call is visual."""
        if self.visual is None:
            return None
        if tuple(x.shape[:2]) == tuple(self.visual.shape):
            return self.visual
        if x.dim() == 2 and x.shape[0] == self.visual.numel():
            return self.visual.reshape(-1)
        raise RuntimeError(f"adapter input {tuple(x.shape)} does not match the token context {tuple(self.visual.shape)}")

    @contextmanager
    def call(self, visual: torch.Tensor):
        """Around one LLM forward over a whole sequence: ``visual`` (B, T) bool."""
        previous = self.visual, self.modality
        self.visual = visual if bool(visual.any()) else None
        self.modality = visual.any(dim=1).long()
        try:
            yield
        finally:
            self.visual, self.modality = previous

    @contextmanager
    def generation(self, llm: nn.Module, visual: torch.Tensor):
        """Around ``llm.generate``: the first LLM call (the prefill over the prompt) sees ``visual``,
        every later call (one decode step each) sees none; both repeated to the call's batch (beams)."""
        previous, calls = (self.visual, self.modality), [0]

        def before_call(module, args, kwargs):
            tokens = next((kwargs[k] for k in ("inputs_embeds", "input_ids", "decoder_input_ids")
                           if kwargs.get(k) is not None), None)
            if tokens is None:  # nothing to align with (a seq2seq call): no visual position
                self.visual = self.modality = None
                return
            repeat = tokens.shape[0] // visual.shape[0]
            prefill = calls[0] == 0
            calls[0] += 1
            self.visual = visual.repeat_interleave(repeat, dim=0) if prefill and bool(visual.any()) else None
            self.modality = visual.any(dim=1).long().repeat_interleave(repeat, dim=0)

        handle = llm.register_forward_pre_hook(before_call, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()
            self.visual, self.modality = previous


class AdapterLayer(nn.Module):
    """Base of the adapter wrappers: keeps the original module as ``base_layer`` (never changed, never
    trained) and the trainable weights as ``adapter``; ``part`` names the parts-table entry they are
    saved under. Subclasses write ``forward``, calling ``self.base_layer`` unchanged where the context
    says nothing is visual."""

    def __init__(self, base_layer: nn.Module, adapter: nn.Module, part: str, context: TokenContext):
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter
        self.part = part
        self.__dict__["context"] = context  # shared, not a submodule: never saved, never moved

    def __getattr__(self, name: str):
        # Code that reads the wrapped layer's attributes (``weight``, ``in_features``) still finds them.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base_layer"), name)
