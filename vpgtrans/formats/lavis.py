"""LAVIS / VPGTrans ``.pth`` checkpoints: read them safely, and map their keys to and from HF BLIP-2.

A LAVIS checkpoint is a pickle ``{"model": state_dict, "optimizer", "config", "scaler", "iters"|"epoch"}``
holding only what was trained (Q-Former, query tokens, ``ln_vision``, the LLM projection) — sometimes the
EVA ViT, never the LLM. The key map is a literal table of name templates (DESIGN.md §3), used in both
directions. Placeholders in the templates::

    {n} layer index   {wb} weight|bias   {qkv} query|key|value   {attn} attention|crossattention
    {sub} dense|LayerNorm   {fc} fc1|fc2   {i} 1|2   {emb} word_embeddings|position_embeddings

Every key either matches a rule, is dropped with a report (parts generative models do not use), or is
an error; all unknown keys are reported at once, nothing is dropped silently.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from vpgtrans.errors import VpgtransError
from vpgtrans.formats.torchfile import load_weights_only
from vpgtrans.io import atomic_write

PROJECTION_PREFIXES = ("opt_proj", "t5_proj", "llama_proj", "llm_proj")
LLM_PREFIXES = ("opt_model.", "llama_model.", "t5_model.", "llm_model.")  # LAVIS names of the LLM itself

_FIELDS = {
    "n": r"\d+",
    "wb": r"weight|bias",
    "qkv": r"query|key|value",
    "attn": r"attention|crossattention",
    "sub": r"dense|LayerNorm",
    "fc": r"fc1|fc2",
    "i": r"1|2",
    "emb": r"word_embeddings|position_embeddings",
    "proj": "|".join(PROJECTION_PREFIXES),
}

# ------------------------------------------------------------------------------------- key tables
# (LAVIS name, HF BLIP-2 name)

VPG_KEYS = (
    ("query_tokens", "query_tokens"),  # (1, Q, D_qformer)
    ("ln_vision.{wb}", "vision_model.post_layernorm.{wb}"),
    ("Qformer.bert.encoder.layer.{n}.{attn}.self.{qkv}.{wb}", "qformer.encoder.layer.{n}.{attn}.attention.{qkv}.{wb}"),
    ("Qformer.bert.encoder.layer.{n}.{attn}.output.{sub}.{wb}", "qformer.encoder.layer.{n}.{attn}.output.{sub}.{wb}"),
    ("Qformer.bert.encoder.layer.{n}.intermediate_query.dense.{wb}",
     "qformer.encoder.layer.{n}.intermediate_query.dense.{wb}"),
    ("Qformer.bert.encoder.layer.{n}.output_query.{sub}.{wb}", "qformer.encoder.layer.{n}.output_query.{sub}.{wb}"),
)

# BLIP-2 keeps only the embeddings LayerNorm of the Q-Former's BERT embeddings.
BLIP2_EMBEDDING_KEYS = (
    ("Qformer.bert.embeddings.LayerNorm.{wb}", "qformer.layernorm.{wb}"),
)

# InstructBLIP feeds the instruction through the Q-Former: it keeps the text embeddings and the text
# FFN of every layer, and HF puts the embeddings LayerNorm inside ``qformer.embeddings``.
INSTRUCTBLIP_EMBEDDING_KEYS = (
    ("Qformer.bert.embeddings.LayerNorm.{wb}", "qformer.embeddings.layernorm.{wb}"),
)
QFORMER_TEXT_KEYS = (
    ("Qformer.bert.embeddings.{emb}.weight", "qformer.embeddings.{emb}.weight"),
    ("Qformer.bert.encoder.layer.{n}.intermediate.dense.{wb}", "qformer.encoder.layer.{n}.intermediate.dense.{wb}"),
    ("Qformer.bert.encoder.layer.{n}.output.{sub}.{wb}", "qformer.encoder.layer.{n}.output.{sub}.{wb}"),
)

# EVA ViT. Shapes are the same on both sides: cls_token (1, 1, D), pos_embed (1, N+1, D),
# qkv.weight (3D, D). The q/v biases are handled apart (see QKV_BIAS).
VISION_KEYS = (
    ("visual_encoder.cls_token", "vision_model.embeddings.class_embedding"),
    ("visual_encoder.pos_embed", "vision_model.embeddings.position_embedding"),
    ("visual_encoder.patch_embed.proj.{wb}", "vision_model.embeddings.patch_embedding.{wb}"),
    ("visual_encoder.blocks.{n}.norm{i}.{wb}", "vision_model.encoder.layers.{n}.layer_norm{i}.{wb}"),
    ("visual_encoder.blocks.{n}.attn.qkv.weight", "vision_model.encoder.layers.{n}.self_attn.qkv.weight"),
    ("visual_encoder.blocks.{n}.attn.proj.{wb}", "vision_model.encoder.layers.{n}.self_attn.projection.{wb}"),
    ("visual_encoder.blocks.{n}.mlp.{fc}.{wb}", "vision_model.encoder.layers.{n}.mlp.{fc}.{wb}"),
)
VISION_HF_PREFIXES = ("vision_model.embeddings.", "vision_model.encoder.")

# EVA has no key bias: HF stores (3D,) qkv.bias = cat(q_bias (D,), zeros (D,), v_bias (D,)).
Q_BIAS = "visual_encoder.blocks.{n}.attn.q_bias"
V_BIAS = "visual_encoder.blocks.{n}.attn.v_bias"
QKV_BIAS = "vision_model.encoder.layers.{n}.self_attn.qkv.bias"
QKV_WEIGHT = "vision_model.encoder.layers.{n}.self_attn.qkv.weight"

PROJECTION_KEYS = (("{proj}.{wb}", "language_projection.{wb}"),)  # (D_llm, D_qformer)

# LAVIS keys that generative BLIP-2 models do not use: a buffer, stage-1 heads (ITC/ITM/LM).
DROPPED_KEYS = (
    "Qformer.bert.embeddings.position_ids",
    "Qformer.cls.predictions.bias",
    "Qformer.cls.predictions.transform.{sub}.{wb}",
    "Qformer.cls.predictions.decoder.{wb}",
    "vision_proj.{wb}",
    "text_proj.{wb}",
    "itm_head.{wb}",
    "temp",
)


def _pattern(template: str) -> re.Pattern:
    """``"a.{n}.b"`` -> ``re.compile(r"a\\.(?P<n>\\d+)\\.b")``."""
    parts = re.split(r"\{(\w+)\}", template)
    regex = "".join(re.escape(part) if i % 2 == 0 else f"(?P<{part}>{_FIELDS[part]})" for i, part in enumerate(parts))
    return re.compile(regex)


def _rules(table, reverse: bool = False) -> list[tuple[re.Pattern, str]]:
    return [(_pattern(hf), lavis) if reverse else (_pattern(lavis), hf) for lavis, hf in table]


def _rename(name: str, rules: list[tuple[re.Pattern, str]]) -> str | None:
    for pattern, template in rules:
        match = pattern.fullmatch(name)
        if match:
            return template.format(**match.groupdict())
    return None


def _put(out: dict, new: str, tensor: torch.Tensor, old: str, sources: dict, problems: list) -> None:
    if new in out:
        problems.append(f"{sources[new]} and {old} both map to {new}")
        return
    out[new], sources[new] = tensor, old


def _raise_if(unknown: list[str], problems: list[str], what: str) -> None:
    messages = []
    if unknown:
        messages.append(f"{len(unknown)} {what} key(s) match no rule: {', '.join(sorted(unknown))}")
    messages += problems
    if messages:
        raise VpgtransError("; ".join(messages) + " — nothing was converted")


# --------------------------------------------------------------------------------- LAVIS -> HF


def lavis_to_hf(state: dict[str, torch.Tensor],
                keep_qformer_embeddings: bool = False) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map a LAVIS state dict to HF BLIP-2 names; return ``(hf_state, dropped_keys)``.

    ``keep_qformer_embeddings`` selects the InstructBLIP layout: the Q-Former's word/position
    embeddings and text FFN (``intermediate``, ``output``) are kept, and its embeddings LayerNorm goes
    to ``qformer.embeddings.layernorm`` (BLIP-2: ``qformer.layernorm``, text path dropped).
    Raises ``VpgtransError`` listing every key that matches no rule.
    """
    if keep_qformer_embeddings:
        table = VPG_KEYS + INSTRUCTBLIP_EMBEDDING_KEYS + QFORMER_TEXT_KEYS
        dropped_table = DROPPED_KEYS
    else:
        table = VPG_KEYS + BLIP2_EMBEDDING_KEYS
        dropped_table = DROPPED_KEYS + tuple(lavis for lavis, _ in QFORMER_TEXT_KEYS)
    rules = _rules(table + VISION_KEYS + PROJECTION_KEYS)
    drops = [_pattern(template) for template in dropped_table]
    q_bias, v_bias = _pattern(Q_BIAS), _pattern(V_BIAS)

    hf, sources, dropped, unknown, problems = {}, {}, [], [], []
    biases: dict[int, dict[str, torch.Tensor]] = {}  # block -> {"q": (D,), "v": (D,)}
    for name, tensor in state.items():
        match = q_bias.fullmatch(name) or v_bias.fullmatch(name)
        if match:  # gathered per block, joined into qkv.bias below
            biases.setdefault(int(match["n"]), {})["q" if name.endswith("q_bias") else "v"] = tensor
            continue
        new = _rename(name, rules)
        if new is not None:
            _put(hf, new, tensor, name, sources, problems)
        elif name.startswith(LLM_PREFIXES) or any(p.fullmatch(name) for p in drops):
            dropped.append(name)
        else:
            unknown.append(name)

    for n, parts in sorted(biases.items()):
        if set(parts) != {"q", "v"}:
            have, lack = ("q_bias", "v_bias") if "q" in parts else ("v_bias", "q_bias")
            problems.append(f"visual_encoder.blocks.{n}.attn has {have} but no {lack}")
            continue
        q, v = parts["q"], parts["v"]
        if q.dim() != 1 or q.shape != v.shape:
            problems.append(f"visual_encoder.blocks.{n}.attn: q_bias {tuple(q.shape)} and v_bias {tuple(v.shape)} "
                            "must be equal 1-D vectors")
            continue
        qkv = torch.cat([q, torch.zeros_like(q), v])  # (3D,)
        weight = hf.get(QKV_WEIGHT.format(n=n))
        if weight is not None and weight.shape[0] != qkv.shape[0]:
            problems.append(f"visual_encoder.blocks.{n}.attn: qkv.weight has {weight.shape[0]} rows but "
                            f"q_bias/v_bias give a {qkv.shape[0]}-long qkv bias")
            continue
        hf[QKV_BIAS.format(n=n)] = qkv

    _raise_if(unknown, problems, "LAVIS")
    return hf, sorted(dropped)


# --------------------------------------------------------------------------------- HF -> LAVIS


def hf_to_lavis(state: dict[str, torch.Tensor], projection_prefix: str = "opt_proj",
                include_vision: bool = False) -> dict[str, torch.Tensor]:
    """Map HF BLIP-2 / InstructBLIP names to LAVIS names (the inverse of ``lavis_to_hf``).

    ``language_model.*`` is skipped (LAVIS checkpoints do not carry the LLM), and so is the ViT unless
    ``include_vision``. ``language_projection`` becomes ``{projection_prefix}``. Raises
    ``VpgtransError`` listing every other key that matches no rule, or a qkv bias with a nonzero key part.
    """
    if projection_prefix not in PROJECTION_PREFIXES:
        raise VpgtransError(f"projection prefix {projection_prefix!r} is not one of {', '.join(PROJECTION_PREFIXES)}")
    table = VPG_KEYS + BLIP2_EMBEDDING_KEYS + INSTRUCTBLIP_EMBEDDING_KEYS + QFORMER_TEXT_KEYS
    table += ((f"{projection_prefix}.{{wb}}", "language_projection.{wb}"),)
    if include_vision:
        table += VISION_KEYS
    rules = _rules(table, reverse=True)
    qkv_bias = _pattern(QKV_BIAS)

    lavis, sources, unknown, problems = {}, {}, [], []
    for name, tensor in state.items():
        if name.startswith("language_model.") or (not include_vision and name.startswith(VISION_HF_PREFIXES)):
            continue
        match = qkv_bias.fullmatch(name) if include_vision else None
        if match:
            n = match["n"]
            if tensor.dim() != 1 or tensor.shape[0] % 3:
                problems.append(f"{name}: shape {tuple(tensor.shape)} is not a (3D,) qkv bias")
                continue
            q, k, v = tensor.chunk(3)  # (3D,) -> 3 x (D,)
            if torch.count_nonzero(k):
                # Adding b_k to every key shifts each query's logits by q·b_k, which softmax ignores: the
                # part is inert (zero gradient), nonzero only in randomly initialised models.
                problems.append(f"{name}: key bias is nonzero, which EVA/LAVIS (q_bias, v_bias only) cannot hold; "
                                "it has no effect on attention, so zero its middle third before exporting")
                continue
            _put(lavis, Q_BIAS.format(n=n), q.clone(), name, sources, problems)
            _put(lavis, V_BIAS.format(n=n), v.clone(), name, sources, problems)
            continue
        new = _rename(name, rules)
        if new is None:
            unknown.append(name)
        else:
            _put(lavis, new, tensor, name, sources, problems)

    _raise_if(unknown, problems, "HF")
    return lavis


# ----------------------------------------------------------------------------------- .pth files


def checkpoint_kind(state: dict) -> str:
    """``instructblip`` or ``blip2``: InstructBLIP keeps the Q-Former's word embeddings (it reads the
    instruction) and projects with ``llm_proj`` / ``t5_proj``; BLIP-2 stage-2 checkpoints do neither."""
    instruct = any(k.startswith("Qformer.bert.embeddings.word_embeddings") for k in state) \
        and any(k.startswith(("llm_proj", "t5_proj")) for k in state)
    return "instructblip" if instruct else "blip2"


def load_pth(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a LAVIS / VPGTrans ``.pth`` (its ``"model"`` entry, or the file itself when
    it is a flat state dict), loaded with ``weights_only=True`` — pickled code is never run."""
    path = Path(path)
    obj = load_weights_only(path)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        state = obj["model"]
    elif _is_state_dict(obj):
        state = obj
    else:
        keys = ", ".join(map(str, list(obj)[:10])) if isinstance(obj, dict) else type(obj).__name__
        raise VpgtransError(f"{path}: no state dict ('model' key) in the checkpoint (found: {keys}); expected a "
                            "LAVIS / VPGTrans checkpoint {'model': state_dict, ...} or a flat state dict")
    bad = [str(name) for name, value in state.items() if not isinstance(name, str) or not torch.is_tensor(value)]
    if bad or not state:
        raise VpgtransError(f"{path}: the state dict " + (f"has non-tensor entries: {', '.join(bad)}" if bad
                                                          else "is empty"))
    return state


def save_pth(state: dict[str, torch.Tensor], path: str | Path, config: dict | None = None) -> Path:
    """Write ``{"model": state, "config": config, "iters": 0}`` atomically (temp file, fsync, rename).

    ``config`` must be plain JSON-like data, so that ``weights_only`` loading reads it back.
    """
    path = Path(path)
    bad = [name for name, value in state.items() if not torch.is_tensor(value)]
    if bad:
        raise VpgtransError(f"{path}: refusing to save non-tensor state entries: {', '.join(map(str, bad))}")
    config = config or {}
    try:
        json.dumps(config)
    except (TypeError, ValueError) as exc:
        raise VpgtransError(f"{path}: config is not plain JSON-like data ({exc})") from None
    if not path.parent.is_dir():
        raise VpgtransError(f"{path.parent}: no such directory")
    return atomic_write(path, lambda tmp: torch.save({"model": state, "config": config, "iters": 0}, tmp))


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items())
