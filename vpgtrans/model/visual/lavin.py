"""The ``lavin`` visual kind: LaVIN's multi-layer [CLS] connector (Luo et al. 2023).

    ViT hidden states -> [CLS] of the chosen layers (B, n, D_vit) -> Linear -> SiLU -> Linear -> (B, n, D_llm)

LaVIN takes the [CLS] token of every 4th layer of a 24-layer ViT-L/14 (6 tokens) through
``Linear(1024, 128) -> SiLU -> Linear(128, D)``. For another depth L the same rule picks ``tokens`` (6)
layers evenly, the last one always included (``ceil(L * i / tokens)``, i = 1..tokens, repeats dropped);
the layers are recorded in the manifest (``model.visual.layers``, ``hidden_states`` indices: 0 is the
embeddings, L the last block). Part: ``connector`` (``connector.safetensors``: ``fc1.*``, ``fc2.*``),
freshly initialised at inherit (the source has nothing of this shape; no word converter).

Options (``InheritConfig.visual_options``): ``hidden`` (128), ``tokens`` (6), or ``layers`` (a list).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vpgtrans.errors import VpgtransError

OPTIONS = {"hidden": 128, "tokens": 6, "layers": None}


def pick_layers(depth: int, tokens: int) -> list[int]:
    """``tokens`` evenly spaced ``hidden_states`` indices of a ``depth``-block ViT, ending at the last:
    24 blocks, 6 tokens -> [4, 8, 12, 16, 20, 24] (LaVIN's every 4th)."""
    return sorted({math.ceil(depth * i / tokens) for i in range(1, tokens + 1)})


class LavinConnector(nn.Module):
    """(B, n, D_vit) -> (B, n, D_llm): ``fc2(silu(fc1(x)))`` (LaVIN's ``AdapterMLP``)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, out_dim)

    def init_fresh(self, seed: int) -> None:
        """LaVIN's: Xavier-uniform weights, zero biases."""
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for linear in (self.fc1, self.fc2):
                fan_out, fan_in = linear.weight.shape
                bound = math.sqrt(6.0 / (fan_in + fan_out))
                linear.weight.copy_(torch.rand(linear.weight.shape, generator=generator) * 2 * bound - bound)
                linear.bias.zero_()

    def forward(self, cls_tokens: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.silu(self.fc1(cls_tokens)))


class LavinVisual(nn.Module):
    parts = ("connector",)
    uses_converter = False
    all_hidden_states = True

    def __init__(self, section: dict, vision_config: dict, llm_width: int):
        super().__init__()
        self.layers = list(section["layers"])
        self.connector = LavinConnector(vision_config["hidden_size"], section["hidden"], llm_width)

    @property
    def num_tokens(self) -> int:
        return len(self.layers)

    @staticmethod
    def problems(section: dict) -> list[str]:
        problems = []
        unknown = sorted(set(section) - {"type", "layers", "hidden"})
        if unknown:
            problems.append(f"model.visual has unknown keys {unknown} for the lavin kind")
        hidden, layers = section.get("hidden"), section.get("layers")
        if not isinstance(hidden, int) or isinstance(hidden, bool) or hidden < 1:
            problems.append(f"model.visual.hidden should be a positive int (is {hidden!r:.40})")
        if not isinstance(layers, list) or not layers or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
            problems.append(f"model.visual.layers should be a non-empty list of ViT layer indices (is {layers!r:.60})")
        return problems

    @classmethod
    def inherit(cls, source, llm_width: int, converter, seed: int, options: dict):
        """A fresh connector (Xavier) over the chosen layers of the source's ViT."""
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise VpgtransError(f"the lavin visual kind has no option {', '.join(map(repr, unknown))} "
                                f"(it has {', '.join(OPTIONS)})")
        depth = source.vision_config["num_hidden_layers"]
        hidden, tokens, layers = (options.get(k, v) for k, v in OPTIONS.items())
        problems = []
        if not isinstance(hidden, int) or isinstance(hidden, bool) or hidden < 1:
            problems.append(f"hidden must be a positive integer (got {hidden!r:.20})")
        if layers is None:
            if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
                problems.append(f"tokens must be a positive integer (got {tokens!r:.20})")
            else:
                layers = pick_layers(depth, tokens)
        elif not isinstance(layers, list) or not layers or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i <= depth for i in layers):
            problems.append(f"layers must be a non-empty list of indices in 0..{depth} (the ViT has {depth} blocks; "
                            f"got {layers!r:.40})")
        if problems:
            raise VpgtransError("lavin visual options: " + "; ".join(problems))
        module = LavinConnector(source.vision_config["hidden_size"], hidden, llm_width)
        module.init_fresh(seed)
        section = {"type": "lavin", "layers": list(layers), "hidden": hidden}
        return section, {"connector": module.state_dict()}, {"lavin_layers": list(layers)}

    def forward(self, features) -> torch.Tensor:
        cls_tokens = torch.stack([features.cls(i) for i in self.layers], dim=1)  # (B, n, D_vit)
        return self.connector(cls_tokens.to(self.connector.fc1.weight.dtype))  # (B, n, D_llm)
