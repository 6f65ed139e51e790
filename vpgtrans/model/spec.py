"""``ModelSpec``: the manifest's ``model`` section, what ``load_model`` builds (bundle format 2).

    model.vision           {"config": ViT config}
    model.visual           {"type": a VISUAL_KINDS name, the kind's own keys}
    model.adapters         [{"type": an ADAPTERS name, the adapter's own keys}, ...]
    model.llm              {"model_type", "hidden_size", "vocab_size", "is_encoder_decoder"}
    model.image_processor  {"image_size", "image_mean", "image_std"}

Format-1 bundles (``model.vpg`` + ``model.connector``, written before visual kinds existed) read as the
``qformer`` kind with no adapters. No torch import here; the kinds are looked up only to check a section.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vpgtrans.errors import VpgtransError

_SCHEMA = {
    "vision": {"config": dict},
    "llm": {"model_type": str, "hidden_size": int, "vocab_size": int, "is_encoder_decoder": bool},
    "image_processor": {"image_size": int, "image_mean": list, "image_std": list},
}


def schema_problems(section, schema: dict, where: str) -> list[str]:
    """``schema``: part -> {key: type}; a missing or mistyped key is one problem each (ints positive)."""
    if not isinstance(section, dict):
        return [f"{where} should be an object"]
    problems = []
    for part, keys in schema.items():
        value = section.get(part)
        if not isinstance(value, dict):
            problems.append(f"{where}.{part} should be an object")
            continue
        for key, kind in keys.items():
            item = value.get(key)
            wrong_bool = isinstance(item, bool) and kind is not bool
            if not isinstance(item, kind) or wrong_bool or (kind is int and item < 1) or (kind is str and not item):
                problems.append(f"{where}.{part}.{key} should be a {'positive ' if kind is int else ''}{kind.__name__}"
                                f" (is {item!r:.40})")
    return problems


def upgrade(model: dict) -> dict:
    """A format-1 ``model`` section in format-2 layout (the qformer kind, no adapters); others unchanged."""
    if not isinstance(model, dict) or "visual" in model or "vpg" not in model:
        return model
    rest = {k: v for k, v in model.items() if k not in ("vpg", "connector")}
    return {**rest, "visual": {"type": "qformer", "vpg": model["vpg"], "connector": model.get("connector")},
            "adapters": []}


@dataclass
class ModelSpec:
    vision: dict
    visual: dict
    llm: dict
    image_processor: dict
    adapters: list = field(default_factory=list)

    def __post_init__(self) -> None:
        problems = model_problems(self.__dict__)
        if problems:
            raise VpgtransError("model: " + "; ".join(problems))

    @classmethod
    def from_manifest(cls, model: dict) -> "ModelSpec":
        from vpgtrans.config import from_dict

        return from_dict(cls, upgrade(model), "model")

    @property
    def llm_width(self) -> int:
        return self.llm["hidden_size"]

    @property
    def visual_type(self) -> str:
        return self.visual["type"]


def model_problems(model: dict) -> list[str]:
    """Every problem of a (format-2) ``model`` section; [] when ``load_model`` can build from it."""
    from vpgtrans.model.adapters import ADAPTERS
    from vpgtrans.model.visual import VISUAL_KINDS

    problems = schema_problems(model, _SCHEMA, "model")
    unknown = sorted(set(model) - {"vision", "visual", "llm", "image_processor", "adapters"})
    if unknown:
        problems.append(f"model has unknown keys {', '.join(map(repr, unknown))}")
    visual = model.get("visual")
    if not isinstance(visual, dict) or not isinstance(visual.get("type"), str):
        problems.append("model.visual should be an object with a type")
    elif visual["type"] not in VISUAL_KINDS:
        problems.append(f"model.visual.type should be one of {', '.join(VISUAL_KINDS)} (is {visual['type']!r:.40})")
    else:
        problems += VISUAL_KINDS[visual["type"]].problems(visual)
    adapters = model.get("adapters", [])
    if not isinstance(adapters, list):
        return problems + ["model.adapters should be a list"]
    seen = set()
    for i, entry in enumerate(adapters):
        kind = entry.get("type") if isinstance(entry, dict) else None
        if not isinstance(kind, str) or kind not in ADAPTERS:
            problems.append(f"model.adapters[{i}].type should be one of {', '.join(ADAPTERS) or '(none registered)'} "
                            f"(is {kind!r:.40})")
        elif kind in seen:
            problems.append(f"model.adapters[{i}]: a second {kind!r} adapter (each type once)")
        else:
            seen.add(kind)
            problems += ADAPTERS[kind].problems(entry)
    return problems


def part_names(model: dict) -> list[str]:
    """The trainable parts a (format-2) ``model`` section declares, in order: the visual kind's, then one
    per adapter entry. Parts of an unknown kind or entry are left out (``model_problems`` names those)."""
    from vpgtrans.model.visual import VISUAL_KINDS

    visual = model.get("visual") if isinstance(model, dict) else None
    name = visual.get("type") if isinstance(visual, dict) else None
    kind = VISUAL_KINDS.get(name) if isinstance(name, str) else None
    adapters = model.get("adapters") if isinstance(model, dict) else None
    adapters = adapters if isinstance(adapters, list) else []  # null or another type: model_problems names it
    return [*(kind.parts if kind else ()),
            *(entry["type"] for entry in adapters if isinstance(entry, dict) and isinstance(entry.get("type"), str))]
