"""Configs: dataclasses that round-trip to JSON and are validated on construction.

No torch import here: ``vpgtrans --help`` must stay instant.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from vpgtrans.errors import VpgtransError

MAX_SEED = 2**32  # seeds feed torch / numpy / Python generators and per-epoch permutations (seed * 100003 + epoch)
IMAGE_SLOT = "{image}"
# Caption training rows on a seq2seq (FlanT5) LLM: "random-prefix" is BLIP-2's prefix language modelling (the
# first 0..n/2 words to the encoder, the rest as the target: vpgtrans.prompting.split_caption), "none" the
# whole caption as the target.
T5_CAPTION_SPLITS = ("random-prefix", "none")
# Multiple-choice answers (vpgtrans.multiple_choice): "letter" trains and reads "The answer is B" (LaVIN's
# format), "text" "The answer is <the option's own words>" (words an LLM has trained embedding rows for).
CHOICE_ANSWERS = ("letter", "text")
BOS_SLOT = "{bos}"


def _from_dict(cls, data: dict[str, Any], what: str):
    """Build dataclass ``cls`` from ``data``; unknown keys are an error that lists them all."""
    if not isinstance(data, dict):
        raise VpgtransError(f"{what}: expected a JSON object, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise VpgtransError(f"{what}: unknown keys {', '.join(map(repr, unknown))} (known: {', '.join(sorted(known))})")
    kwargs = {f.name: data[f.name] for f in fields(cls) if f.name in data}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise VpgtransError(f"{what}: {exc}") from None


@dataclass
class PromptTemplate:
    """Where the image and the text go.

    ``caption`` and ``vqa`` are the text in front of the target. ``{image}`` marks where the K soft
    prompts go (a slot, so chat formats can put the image mid-prompt), ``{bos}`` where the LLM's BOS
    token goes, ``{question}`` the question. The target is followed by ``target_suffix`` (BLIP-2 OPT
    appends "\\n" and stops generation there); seq2seq LLMs (T5) put the prompt on the encoder side
    and the target on the decoder side.

    ``grounding`` is the referring-expression prompt: ``{question}`` is the expression, the target the
    box as ``x1,y1,x2,y2`` in [0, 1] with three decimals (``vpgtrans.grounding.format_box``).
    """

    caption: str = "{image}{bos}"
    vqa: str = "{image}{bos}Question: {question} Answer:"
    target_suffix: str = "\n"
    stop: str = "\n"
    grounding: str = "{image}{bos}Where is {question}? Box:"

    def __post_init__(self) -> None:
        problems = []
        for name in ("caption", "vqa", "grounding"):
            text = getattr(self, name)
            if not isinstance(text, str) or text.count(IMAGE_SLOT) != 1:
                problems.append(f"prompt template '{name}' must contain {IMAGE_SLOT} exactly once: {text!r}")
        if not isinstance(self.vqa, str) or "{question}" not in self.vqa:
            problems.append(f"prompt template 'vqa' must contain {{question}}: {self.vqa!r}")
        if not isinstance(self.grounding, str) or "{question}" not in self.grounding:
            problems.append(f"prompt template 'grounding' must contain {{question}} (the expression): {self.grounding!r}")
        if problems:
            raise VpgtransError("; ".join(problems))

    @classmethod
    def for_llm(cls, is_encoder_decoder: bool) -> "PromptTemplate":
        """BLIP-2's templates: OPT/LLaMA style for decoder-only LLMs, FlanT5 style for seq2seq."""
        if is_encoder_decoder:
            return cls(caption="{image}", vqa="{image}Question: {question} Short answer:", target_suffix="", stop="",
                       grounding="{image}Where is {question}? Box:")
        return cls()


# Named prompt templates (``--template NAME``); any other value of ``--template`` is a JSON file of the fields.
TEMPLATES = {
    # BLIP-2 (LAVIS) for decoder-only LLMs (OPT, LLaMA): image first, then BOS and the prompt; "\n" ends answers.
    "blip2": {},
    # BLIP-2 FlanT5: the prompt on the encoder side, "Short answer:".
    "blip2-t5": {"caption": "{image}", "vqa": "{image}Question: {question} Short answer:",
                 "grounding": "{image}Where is {question}? Box:", "target_suffix": "", "stop": ""},
    # VPGTrans's VL-Vicuna (MiniGPT-4 style chat): the image inside the human turn, "###" ends the answer.
    "vl-vicuna": {"caption": "{bos}###Human: <Img>{image}</Img> Describe this image in one sentence. ###Assistant: ",
                  "vqa": "{bos}###Human: <Img>{image}</Img> {question} Answer briefly. ###Assistant: ",
                  "grounding": "{bos}###Human: <Img>{image}</Img> Where is {question}? Give the box. ###Assistant: ",
                  "target_suffix": "###", "stop": "###"},
}


def load_template(name_or_path: str) -> "PromptTemplate":
    """``--template``: a name in ``TEMPLATES``, or a JSON file with ``PromptTemplate`` fields (validated)."""
    from pathlib import Path

    if name_or_path in TEMPLATES:
        return PromptTemplate(**TEMPLATES[name_or_path])
    path = Path(name_or_path)
    if not path.is_file():
        raise VpgtransError(f"--template {name_or_path!r}: neither a template name ({', '.join(TEMPLATES)}) nor a "
                            "JSON file")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VpgtransError(f"{path}: not a JSON template ({str(exc).splitlines()[0]})") from None
    return from_dict(PromptTemplate, data, str(path))


@dataclass
class TrainConfig:
    """One training stage. Budgets are in samples or optimizer steps, so a run means the same on any
    number of processes; ``batch_size`` is the global batch (all processes, all accumulation steps)."""

    lr: float = 1e-4
    min_lr: float | None = None  # cosine floor; None = constant schedule
    warmup_steps: int = 0
    warmup_fraction: float = 0.0  # linear warm-up over this fraction of the run's steps (when warmup_steps is 0)
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    epochs: float = 1.0
    max_steps: int | None = None
    max_samples: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    seed: int = 42
    max_text_len: int = 64
    eval_every: int | None = None  # optimizer steps between evaluations (None: only at the end)
    eval_max_samples: int = 200
    max_new_tokens: int = 20
    choice_scoring: str = "generate"  # multiple-choice eval points: "generate" (parse the answer) or "likelihood"
    choice_answer: str = "letter"  # multiple-choice targets and eval points: CHOICE_ANSWERS
    t5_caption_split: str = "random-prefix"  # seq2seq LLMs' caption rows (T5_CAPTION_SPLITS); decoder-only: unused
    trainable: list[str] = field(default_factory=lambda: ["connector"])
    log_every: int = 10

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # JSON gives a list
        problems = []
        if not (self.lr > 0 and math.isfinite(self.lr)):
            problems.append(f"lr must be a finite number > 0 (got {self.lr})")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            problems.append(f"min_lr must be in [0, lr] (got {self.min_lr})")
        if not 0 <= self.warmup_fraction < 1:
            problems.append(f"warmup_fraction must be in [0, 1) (got {self.warmup_fraction})")
        if self.batch_size < 1 or self.grad_accum < 1:
            problems.append("batch_size and grad_accum must be >= 1")
        elif self.batch_size % self.grad_accum:
            problems.append(f"batch_size {self.batch_size} must be divisible by grad_accum {self.grad_accum}")
        for name in ("max_steps", "max_samples", "eval_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"{name} must be >= 1 (got {value})")
        if not (self.epochs > 0 and math.isfinite(self.epochs)):
            problems.append(f"epochs must be a finite number > 0 (got {self.epochs})")
        for name in ("max_text_len", "eval_max_samples", "max_new_tokens", "log_every"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.choice_scoring not in ("generate", "likelihood"):
            problems.append(f"choice_scoring must be generate or likelihood (got {self.choice_scoring!r})")
        if self.choice_answer not in CHOICE_ANSWERS:
            problems.append(f"choice_answer must be one of {', '.join(CHOICE_ANSWERS)} (got {self.choice_answer!r})")
        if self.t5_caption_split not in T5_CAPTION_SPLITS:
            problems.append(f"t5_caption_split must be one of {', '.join(T5_CAPTION_SPLITS)} "
                            f"(got {self.t5_caption_split!r})")
        if self.warmup_steps < 0:
            problems.append(f"warmup_steps must be >= 0 (got {self.warmup_steps})")
        if not (0 <= self.weight_decay and math.isfinite(self.weight_decay)):
            problems.append(f"weight_decay must be a finite number >= 0 (got {self.weight_decay})")
        if len(self.betas) != 2 or not all(0 <= beta < 1 for beta in self.betas):
            problems.append(f"betas must be two numbers in [0, 1) (got {list(self.betas)})")
        if not 0 <= self.seed < MAX_SEED:
            problems.append(f"seed must be in [0, 2**32) (got {self.seed})")
        if (not isinstance(self.trainable, list) or not self.trainable
                or not all(isinstance(name, str) and name for name in self.trainable)):
            # Which names exist is the model's business (its parts table); the stage checks them.
            problems.append(f"trainable parts must be a non-empty list of part names (got {self.trainable!r})")
        elif {"vision", "llm"} & set(self.trainable):
            problems.append(f"trainable parts cannot include the frozen base models (got {self.trainable}); the LLM "
                            "trains only through adapters")
        if problems:
            raise VpgtransError("training config: " + "; ".join(problems))

    @classmethod
    def warmup(cls, **overrides) -> "TrainConfig":
        """Stage 1 (VPGTrans): projector only, 5x BLIP-2's lr, constant, one epoch."""
        from vpgtrans.recipes import stage

        return stage("vpgtrans", "warmup").config(**overrides)

    @classmethod
    def finetune(cls, **overrides) -> "TrainConfig":
        """Stage 2 (VPGTrans) and train-from-scratch: VPG + projector, lr 1e-4 cosine to 5e-5."""
        from vpgtrans.recipes import stage

        return stage("vpgtrans", "finetune").config(**overrides)


CONVERTERS = ("shared-tokens", "gw", "auto", "none")


@dataclass
class InheritConfig:
    """How ``inherit`` builds the first bundle of a transfer."""

    converter: str = "shared-tokens"  # or "gw" (no shared tokens needed), "auto" (shared-tokens if enough pairs), "none"
    ridge: float = 1e-3  # relative to the mean diagonal of X^T X
    heldout_fraction: float = 0.1
    lowercase_fallback: bool = True
    connector: str = "linear"
    seed: int = 0
    visual_options: dict = field(default_factory=dict)  # the connector's visual kind's options (pool size, ...)
    adapter_options: dict = field(default_factory=dict)  # adapter type -> options over the connector's defaults
    gw_anchors: int = 2000  # --converter gw: anchor tokens per side (the most frequent in --corpus)

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.visual_options, dict) or not isinstance(self.adapter_options, dict) or not all(
                isinstance(v, dict) for v in self.adapter_options.values()):
            problems.append("visual_options must be an object and adapter_options an object of objects")
        if self.converter not in CONVERTERS:
            problems.append(f"converter must be one of {', '.join(CONVERTERS)} (got {self.converter!r})")
        if not isinstance(self.gw_anchors, int) or self.gw_anchors < 4:
            problems.append(f"gw_anchors must be an integer >= 4 (got {self.gw_anchors!r})")
        if not 0 < self.heldout_fraction < 0.5:
            problems.append(f"heldout_fraction must be in (0, 0.5) (got {self.heldout_fraction})")
        if not (self.ridge >= 0 and math.isfinite(self.ridge)):
            problems.append(f"ridge must be a finite number >= 0 (got {self.ridge})")
        if not 0 <= self.seed < MAX_SEED:
            problems.append(f"seed must be in [0, 2**32) (got {self.seed})")
        if problems:
            raise VpgtransError("; ".join(problems))


def to_dict(config) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass."""
    data = asdict(config)
    return json.loads(json.dumps(data))


def from_dict(cls, data: dict[str, Any], what: str | None = None):
    """The inverse of ``to_dict``: unknown keys are an error that lists them."""
    return _from_dict(cls, data, what or cls.__name__)


def replace(config, **changes):
    """``dataclasses.replace`` that re-runs validation."""
    return dataclasses.replace(config, **changes)
