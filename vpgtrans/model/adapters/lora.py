"""``lora``: LoRA on the LLM's linear layers through **peft** — every token, text and visual alike (InfMLLM's
third stage, instruction tuning of the LLM; unlike ``plora``, text-only logits change once it is trained).

Each target is wrapped by peft's own ``lora.Linear`` (it keeps the layer as ``base_layer``, adds
``lora_A`` / ``lora_B`` / ``lora_dropout`` under the adapter name ``default``), so the computation is
peft's: ``W x + (alpha / r) B A drop(x)``, B starting at zero (the LLM unchanged at inherit).

Bundle file ``lora.safetensors``: peft's adapter weights exactly as peft saves them
(``base_model.model.<layer path>.lora_A.weight`` / ``.lora_B.weight``: the part's keys carry peft's prefix,
``PeftPart``), so with the ``LoraConfig`` of the manifest entry (``lora_config``) peft loads the file as it
is. ``save_peft`` writes a directory ``PeftModel.from_pretrained(llm, dir)`` loads, ``merge_lora`` a plain
HF LLM with the LoRA merged (peft's ``merge_and_unload``); ``vpgtrans export --format adapter`` uses them.

Targets: the ``plora`` table's groups (``attention``, ``mlp``) or single entries (``self_attn.q_proj``) of the
LLM's ``model_type``; only linear layers (MoE LLMs' fused experts are refused: peft's LoRA has no layer
for them here).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vpgtrans.errors import VpgtransError
from vpgtrans.model.parts import Part

DEFAULTS = {"rank": 8, "alpha": 16, "dropout": 0.05, "targets": ["attention", "mlp"]}
KEYS = {"type", *DEFAULTS}
PEFT_PREFIX = "base_model.model."  # what peft puts in front of the LLM's own module paths


def _peft_linear():
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError:  # pragma: no cover - peft is a dependency
        raise VpgtransError("the lora adapter needs peft: pip install peft") from None
    return Linear


class LoraWeights(nn.Module):
    """The trained half of one peft LoRA layer (its ``default`` adapter): ``lora_A``, ``lora_B`` and the
    dropout, under the names peft saves them (``lora_A.weight``, ``lora_B.weight``)."""

    def __init__(self, layer):
        super().__init__()
        self.lora_A = layer.lora_A["default"]
        self.lora_B = layer.lora_B["default"]
        self.dropout = layer.lora_dropout["default"]  # (no weights: train mode switches it on)

    def init_fresh(self, seed: int) -> None:
        """peft's default: A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(d_in), 1/sqrt(d_in)), B = 0."""
        generator = torch.Generator().manual_seed(seed)
        bound = 1 / math.sqrt(self.lora_A.weight.shape[1])
        with torch.no_grad():
            self.lora_A.weight.copy_((torch.rand(self.lora_A.weight.shape, generator=generator) * 2 - 1) * bound)
            self.lora_B.weight.zero_()


@functools.cache
def _layer_class():
    Linear = _peft_linear()

    class PeftLoraLinear(Linear):
        """peft's ``lora.Linear`` that says which part it belongs to (the parts table finds it by ``part``
        and ``base_layer``) and hands out its trained half as ``adapter``."""

        part: str = "lora"

        @property
        def adapter(self) -> LoraWeights:
            return LoraWeights(self)

    return PeftLoraLinear


@dataclass(frozen=True)
class PeftPart(Part):
    """The ``lora`` part with its keys under peft's ``base_model.model.`` prefix (the wrappers' paths in the
    LLM follow it, as in a ``PeftModel``)."""

    def modules(self, model: nn.Module) -> dict[str, nn.Module]:
        return {PEFT_PREFIX + prefix: module for prefix, module in super().modules(model).items()}


def lora_config(entry: dict, target_modules: list[str] | None = None, base_model: str | None = None):
    """peft's ``LoraConfig`` of a manifest entry (``target_modules``: the resolved module paths)."""
    from peft import LoraConfig

    entry = {**DEFAULTS, **entry}
    return LoraConfig(r=entry["rank"], lora_alpha=entry["alpha"], lora_dropout=entry["dropout"],
                      target_modules=target_modules or list(entry["targets"]), bias="none", task_type="CAUSAL_LM",
                      base_model_name_or_path=base_model)


class LoRA:
    """The ``lora`` adapter kind (``ADAPTERS["lora"]``)."""

    part_type = PeftPart  # the parts table entry insert_adapters makes for it

    @staticmethod
    def problems(entry: dict) -> list[str]:
        problems = []
        unknown = sorted(set(entry) - KEYS)
        if unknown:
            problems.append(f"lora has unknown keys {unknown} (it takes {', '.join(sorted(KEYS - {'type'}))})")
        entry = {**DEFAULTS, **entry}
        if not isinstance(entry["rank"], int) or isinstance(entry["rank"], bool) or entry["rank"] < 1:
            problems.append(f"lora rank must be an integer >= 1 (got {entry['rank']!r})")
        if not isinstance(entry["alpha"], (int, float)) or isinstance(entry["alpha"], bool) or not entry["alpha"] > 0:
            problems.append(f"lora alpha must be > 0 (got {entry['alpha']!r})")
        if not isinstance(entry["dropout"], (int, float)) or isinstance(entry["dropout"], bool) or \
                not 0 <= entry["dropout"] < 1:
            problems.append(f"lora dropout must be in [0, 1) (got {entry['dropout']!r})")
        targets = entry["targets"]
        if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
            problems.append(f"lora targets must be a non-empty list of names (got {targets!r})")
        return problems

    @staticmethod
    def targets(llm, entry: dict) -> list[str]:
        """The module paths of the LLM's linear layers the entry's targets name (plora's target table)."""
        from vpgtrans.model.adapters.plora import target_modules

        matched = target_modules(llm, entry, "lora")
        not_linear = sorted({type(module).__name__ for _, module in matched if type(module) is not nn.Linear})
        if not_linear:
            raise VpgtransError(f"lora (peft) wraps plain nn.Linear layers only; the targets also match {not_linear} "
                                "(MoE experts or a quantized LLM): name linear targets, or use --connector plora")
        return [name for name, _ in matched]

    @classmethod
    def wrap(cls, base_layer, entry, part, context):
        entry = {**DEFAULTS, **entry}
        layer = _layer_class()(base_layer, "default", config=lora_config(entry), r=entry["rank"],
                               lora_alpha=entry["alpha"], lora_dropout=entry["dropout"])
        if base_layer.weight.device.type == "meta":  # a skeleton from a config: real LoRA weights on the CPU
            for module in (layer.lora_A, layer.lora_B):
                module.to_empty(device="cpu")
        layer.part = part
        return layer


# --------------------------------------------------------------------------------------------- peft export

def peft_adapter(entry: dict, state: dict, base_model: str | None = None):
    """``(LoraConfig, {peft key: tensor})`` of a bundle's ``lora`` entry and its ``lora.safetensors`` state
    (already in peft's names)."""
    paths = sorted({key[len(PEFT_PREFIX):].rsplit(".lora_", 1)[0] for key in state})
    return lora_config(entry, target_modules=paths, base_model=base_model), dict(state)


def save_peft(out_dir: Path, entry: dict, state: dict, base_model: str | None = None) -> Path:
    """A peft adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    from safetensors.torch import save_file

    config, tensors = peft_adapter(entry, state, base_model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out_dir))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    return out_dir


def merge_lora(out_dir: Path, llm_path: Path, peft_dir: Path) -> Path:
    """The base LLM at ``llm_path`` with the peft adapter at ``peft_dir`` merged (peft's ``merge_and_unload``),
    saved as a plain HF directory with its tokenizer."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    llm = AutoModelForCausalLM.from_pretrained(llm_path, dtype=torch.float32)
    merged = PeftModel.from_pretrained(llm, str(peft_dir)).merge_and_unload()
    merged.save_pretrained(str(out_dir))
    AutoTokenizer.from_pretrained(llm_path).save_pretrained(str(out_dir))
    return Path(out_dir)
