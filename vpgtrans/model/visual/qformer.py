"""The ``qformer`` visual kind: BLIP-2's VPG (ln_vision + Q-Former + K query tokens) and a linear projector.

    ViT last layer (B, 1 + S*S, D_vit) -> VPG -> (B, K, D_q) -> projector -> (B, K, D_llm)

Parts: ``vpg`` (``vpg.safetensors``: ``ln_vision.*``, ``query_tokens``, ``qformer.*``) and ``connector``
(``connector.safetensors``: ``proj.weight``, ``proj.bias``). VPGTrans inherits the VPG unchanged and
initialises the projector by composing the word converter after the source projector.
"""

from __future__ import annotations

import torch
from torch import nn

from vpgtrans.model.connectors import build_connector
from vpgtrans.model.vpg import VPG_KINDS, VisualPromptGenerator

_SCHEMA = {"vpg": {"kind": str, "qformer_config": dict, "num_query_tokens": int},
           "connector": {"type": str, "in_dim": int, "out_dim": int}}


class QFormerVisual(nn.Module):
    parts = ("vpg", "connector")
    uses_converter = True
    all_hidden_states = False

    def __init__(self, section: dict, vision_config: dict, llm_width: int):
        super().__init__()
        vpg, connector = section["vpg"], section["connector"]
        self.vpg = VisualPromptGenerator(vpg["kind"], vpg["qformer_config"], vpg["num_query_tokens"],
                                         vision_config["hidden_size"], vpg.get("ln_eps", 1e-6))
        self.connector = build_connector(connector["type"], connector["in_dim"], connector["out_dim"])

    @property
    def num_tokens(self) -> int:
        return self.vpg.num_query_tokens

    @staticmethod
    def problems(section: dict) -> list[str]:
        from vpgtrans.model.spec import schema_problems

        problems = schema_problems(section, _SCHEMA, "model.visual")
        vpg = section.get("vpg")
        if isinstance(vpg, dict) and isinstance(vpg.get("kind"), str) and vpg["kind"] not in VPG_KINDS:
            problems.append(f"model.visual.vpg.kind should be one of {', '.join(VPG_KINDS)} (is {vpg['kind']!r:.40})")
        return problems

    @classmethod
    def inherit(cls, source, llm_width: int, converter, seed: int, options: dict):
        """The source VPG unchanged; the projector merged with the converter (``W_t = W_w W_s``,
        ``b_t = W_w b_s + b_w``), or freshly initialised without one (the paper's "no init" ablation)."""
        from vpgtrans.converter import merge_projector
        from vpgtrans.errors import VpgtransError

        if options:
            raise VpgtransError(f"the qformer visual kind takes no options (got {', '.join(sorted(options))})")

        d_q = source.projector_weight.shape[1]
        if converter is not None:
            proj_w, proj_b = merge_projector(*converter, source.projector_weight, source.projector_bias)
        else:
            generator = torch.Generator().manual_seed(seed)
            proj_w = torch.randn(llm_width, d_q, generator=generator) * 0.02
            proj_b = torch.zeros(llm_width)
        section = {"type": "qformer",
                   "vpg": {"kind": source.kind, "qformer_config": source.qformer_config,
                           "num_query_tokens": source.num_query_tokens, "ln_eps": source.ln_eps},
                   "connector": {"type": "linear", "in_dim": d_q, "out_dim": llm_width}}
        return section, {"vpg": source.vpg_state, "connector": {"proj.weight": proj_w, "proj.bias": proj_b}}, {}

    def forward(self, features) -> torch.Tensor:
        image_embeds = features.last.to(self.vpg.query_tokens.dtype)  # (B, N_vit, D_vit)
        return self.connector(self.vpg(image_embeds))  # (B, K, D_q) -> (B, K, D_llm)
