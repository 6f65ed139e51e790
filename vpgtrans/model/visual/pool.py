"""The ``pool`` visual kind: InfMLLM's pool-adapter (Zhou et al. 2023, arXiv 2311.06791).

    ViT last layer (B, 1 + S*S, D_vit) -> drop [CLS] -> (B, S, S, D_vit) -> LayerNorm
        -> average pooling without overlap to (B, P, P, D_vit) -> row-major (B, P*P, D_vit)
        -> Linear(D_vit, H) -> GELU -> Linear(H, D_llm) -> (B, P*P, D_llm)

The P*P visual tokens keep the grid's spatial order (row by row), which is what lets the LLM answer with
a box. The Q-Former is not used: the bundle holds no ``vpg.safetensors``.

Parts: ``ln_vision`` (``ln_vision.safetensors``: ``weight``, ``bias``; inherited from the source VPG's
post-ViT LayerNorm, which was trained on this ViT's features) and ``pool_adapter``
(``pool_adapter.safetensors``: ``fc1.*``, ``fc2.*``).

Initialisation of ``pool_adapter`` (``model.visual.init`` records which):

``converter``  the source has a projector into an LLM the word converter relates to the target: ``fc2``
               starts as BLIP-2's merged projector (``W_w W_s``, ``W_w b_s + b_w``), so H is the source
               Q-Former width and ``fc2`` maps that space into the target's embeddings the way VPGTrans
               initialises the qformer kind's projector; ``fc1`` is fresh.
``fresh``      no converter (``--converter none``): both Linears fresh, H = the LLM width (InfMLLM's shape).

Options (``InheritConfig.visual_options``): ``pool_size`` P (default: half the grid side, as InfMLLM's
32 x 32 grid -> 16 x 16), which must divide the grid side S unless ``adaptive`` (adaptive average
pooling, off by default: its windows overlap or differ in size when P does not divide S).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

OPTIONS = ("pool_size", "adaptive")
_KEYS = {"type": str, "grid": int, "pool_size": int, "adaptive": bool, "hidden": int, "init": str, "ln_eps": float}
INITS = ("converter", "fresh")


class VisionNorm(nn.LayerNorm):
    """The LayerNorm on the ViT's patch features (LAVIS's ``ln_vision``)."""

    def init_fresh(self, seed: int) -> None:
        self.reset_parameters()  # weight 1, bias 0: nothing random to seed


class PoolAdapter(nn.Module):
    """(B, N, D_vit) -> (B, N, D_llm): ``fc2(gelu(fc1(x)))``."""

    def __init__(self, vision_width: int, hidden: int, llm_width: int):
        super().__init__()
        self.fc1 = nn.Linear(vision_width, hidden)
        self.fc2 = nn.Linear(hidden, llm_width)

    def init_fresh(self, seed: int, std: float = 0.02) -> None:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for linear in (self.fc1, self.fc2):
                linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) * std)
                linear.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def grid_side(vision_config: dict) -> int:
    """S: the ViT's patch grid side (``image_size // patch_size``)."""
    return vision_config["image_size"] // vision_config["patch_size"]


def pool_problem(grid: int, pool_size, adaptive: bool) -> str | None:
    """What is wrong with pooling an S x S grid to P x P, or None."""
    if not isinstance(pool_size, int) or isinstance(pool_size, bool) or pool_size < 1:
        return f"--pool-size must be a positive integer (got {pool_size!r})"
    if pool_size > grid:
        return f"--pool-size {pool_size} is larger than the ViT's {grid}x{grid} patch grid"
    if grid % pool_size and not adaptive:
        divisors = [p for p in range(1, grid + 1) if grid % p == 0]
        return (f"--pool-size {pool_size} does not divide the ViT's {grid}x{grid} patch grid (non-overlapping "
                f"pooling needs one of {', '.join(map(str, divisors))}; --adaptive-pool allows any P <= {grid})")
    return None


class PoolVisual(nn.Module):
    parts = ("ln_vision", "pool_adapter")
    warmup_parts = ("pool_adapter",)  # what warmup-projector trains (InfMLLM's alignment stage)
    uses_converter = True
    all_hidden_states = False

    def __init__(self, section: dict, vision_config: dict, llm_width: int):
        super().__init__()
        self.grid, self.pool_size, self.adaptive = section["grid"], section["pool_size"], section["adaptive"]
        self.ln_vision = VisionNorm(vision_config["hidden_size"], eps=section["ln_eps"])
        self.pool_adapter = PoolAdapter(vision_config["hidden_size"], section["hidden"], llm_width)

    @property
    def num_tokens(self) -> int:
        return self.pool_size * self.pool_size

    @staticmethod
    def problems(section: dict) -> list[str]:
        problems = []
        for key, kind in _KEYS.items():
            value = section.get(key)
            ok = isinstance(value, (int, float) if kind is float else kind) and (kind is bool or not isinstance(value, bool))
            if not ok or (kind is int and value < 1):
                problems.append(f"model.visual.{key} should be a {'positive ' if kind is int else ''}{kind.__name__} "
                                f"(is {value!r:.40})")
        unknown = sorted(set(section) - set(_KEYS))
        if unknown:
            problems.append(f"model.visual has unknown keys {', '.join(map(repr, unknown))}")
        if not problems:
            problem = pool_problem(section["grid"], section["pool_size"], section["adaptive"])
            if problem:
                problems.append(f"model.visual: {problem}")
            if section["init"] not in INITS:
                problems.append(f"model.visual.init should be one of {', '.join(INITS)} (is {section['init']!r:.40})")
        return problems

    @classmethod
    def inherit(cls, source, llm_width: int, converter, seed: int, options: dict):
        """The source VPG's ``ln_vision``; the pool-adapter's ``fc2`` through the converter when there is
        one (see the module docstring), else fresh."""
        from vpgtrans.errors import VpgtransError

        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise VpgtransError(f"the pool visual kind takes options {', '.join(OPTIONS)} (got {', '.join(unknown)})")
        grid = grid_side(source.vision_config)
        adaptive = options.get("adaptive", False)
        if not isinstance(adaptive, bool):
            raise VpgtransError(f"the pool visual kind's 'adaptive' option must be true or false (got {adaptive!r})")
        pool_size = options.get("pool_size")
        if pool_size is None:
            if grid % 2:
                raise VpgtransError(f"the ViT's patch grid is {grid}x{grid}: no default pool size; pass --pool-size")
            pool_size = grid // 2
        problem = pool_problem(grid, pool_size, adaptive)
        if problem:
            raise VpgtransError(problem)

        width = source.vision_config["hidden_size"]
        d_q = source.projector_weight.shape[1]
        hidden = d_q if converter is not None else llm_width
        adapter = PoolAdapter(width, hidden, llm_width)
        adapter.init_fresh(seed)
        if converter is not None:
            from vpgtrans.converter import merge_projector

            fc2_w, fc2_b = merge_projector(*converter, source.projector_weight, source.projector_bias)  # (D_t, D_q)
            with torch.no_grad():
                adapter.fc2.weight.copy_(fc2_w)
                adapter.fc2.bias.copy_(fc2_b)
        section = {"type": "pool", "grid": grid, "pool_size": pool_size, "adaptive": adaptive, "hidden": hidden,
                   "init": "converter" if converter is not None else "fresh", "ln_eps": float(source.ln_eps)}
        ln = {"weight": source.vpg_state["ln_vision.weight"].float(), "bias": source.vpg_state["ln_vision.bias"].float()}
        metrics = {"pool": {"grid": grid, "pool_size": pool_size, "tokens": pool_size * pool_size,
                            "init": section["init"]}}
        return section, {"ln_vision": ln, "pool_adapter": adapter.state_dict()}, metrics

    def forward(self, features) -> torch.Tensor:
        grid = features.patch_grid()  # (B, S, S, D_vit), [CLS] dropped
        if grid.shape[1] != self.grid:
            raise ValueError(f"the ViT gave a {grid.shape[1]}x{grid.shape[1]} patch grid; this pool-adapter was "
                             f"built for {self.grid}x{self.grid} (image size differs from the bundle's)")
        x = self.ln_vision(grid.to(self.ln_vision.weight.dtype)).permute(0, 3, 1, 2)  # (B, D_vit, S, S)
        if self.adaptive:
            x = F.adaptive_avg_pool2d(x, self.pool_size)
        else:
            x = F.avg_pool2d(x, kernel_size=self.grid // self.pool_size)  # stride = kernel: no overlap
        x = x.flatten(2).transpose(1, 2)  # (B, D_vit, P, P) -> (B, P*P, D_vit), row by row
        return self.pool_adapter(x)  # (B, P*P, D_llm)
