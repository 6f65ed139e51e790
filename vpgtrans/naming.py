"""The one table of names between a bundle's parts and HF BLIP-2 (LAVIS <-> HF is ``formats.lavis``'s table).

    bundle part   bundle name           HF BLIP-2 name
    vpg           ln_vision.{rest}      vision_model.post_layernorm.{rest}
    vpg           query_tokens          query_tokens
    vpg           qformer.{rest}        qformer.{rest}
    connector     proj.{rest}           language_projection.{rest}
    (vision)      {rest}                vision_model.{rest}   (the frozen ViT, without post_layernorm)
    (llm)         {rest}                language_model.{rest}

``sources`` (HF / LAVIS source -> bundle), ``export`` (bundle -> HF / LAVIS) and ``model.assemble`` (the
referenced ViT) go through here; every name either maps or is reported.
"""

from __future__ import annotations

from vpgtrans.errors import VpgtransError

# (part, bundle prefix, HF prefix); a prefix ending without "." is a whole name.
PART_NAMES = (
    ("vpg", "ln_vision.", "vision_model.post_layernorm."),
    ("vpg", "query_tokens", "query_tokens"),
    ("vpg", "qformer.", "qformer."),
    ("connector", "proj.", "language_projection."),
)
VISION_PREFIX = "vision_model."  # the frozen ViT inside an HF BLIP-2
LLM_PREFIX = "language_model."
POST_LAYERNORM = "post_layernorm."  # HF's name of the VPG's ln_vision inside the vision model


def _matches(name: str, prefix: str) -> bool:
    return name.startswith(prefix) if prefix.endswith(".") else name == prefix


def hf_to_parts(state: dict) -> tuple[dict[str, dict], list[str]]:
    """HF BLIP-2 names -> ``({part: {bundle name: tensor}}, names that are no part's)``."""
    parts: dict[str, dict] = {"vpg": {}, "connector": {}}
    other = []
    for name, tensor in state.items():
        for part, ours, theirs in PART_NAMES:
            if _matches(name, theirs):
                parts[part][ours + name[len(theirs):]] = tensor
                break
        else:
            other.append(name)
    return parts, other


def parts_to_hf(parts: dict[str, dict]) -> dict:
    """``{part: {bundle name: tensor}}`` of the qformer kind -> HF BLIP-2 names; an unknown name is an error."""
    state, unknown = {}, []
    for part, tensors in parts.items():
        for name, tensor in tensors.items():
            rule = next(((ours, theirs) for p, ours, theirs in PART_NAMES if p == part and _matches(name, ours)), None)
            if rule is None:
                unknown.append(f"{part}: {name}")
            else:
                state[rule[1] + name[len(rule[0]):]] = tensor
    if unknown:
        raise VpgtransError(f"tensors with no HF BLIP-2 name: {', '.join(sorted(unknown)[:10])}")
    return state


def vision_state(state: dict, prefixed: bool) -> dict:
    """A ViT's weights in ``Blip2VisionModel`` names without ``post_layernorm`` (which is the VPG's), from an
    HF BLIP-2 state (``prefixed``: under ``vision_model.``) or a vision model's own."""
    if prefixed or any(name.startswith(VISION_PREFIX) for name in state):
        state = {name[len(VISION_PREFIX):]: v for name, v in state.items() if name.startswith(VISION_PREFIX)}
    return {name: v for name, v in state.items() if not name.startswith(POST_LAYERNORM)}
