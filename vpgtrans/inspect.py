"""``vpgtrans inspect``: describe a model, checkpoint or bundle without loading it.

Everything comes from configs, the manifest and safetensors headers (shapes and dtypes, no tensor
data); a LAVIS ``.pth`` is a pickle and has to be read (``weights_only=True``) to see its shapes. No
model is ever built. ``inspect_path`` returns a JSON-serialisable dict, ``render`` a rich table of it.

What the parameter counts cover (the split vpgtrans trains and stores)::

    vpg.vision.params   the ViT: vision_model.* without post_layernorm (frozen, referenced by bundles)
    vpg.qformer.params  qformer.*
    vpg.params          what a bundle's vpg.safetensors holds: ln_vision (= vision_model.post_layernorm)
                        + query_tokens + qformer.*  — the ViT is not part of it
    projector.params    language_projection.* (LAVIS opt_proj / t5_proj / llama_proj / llm_proj)
    llm.params          language_model.* (an LLM directory: every tensor), a tied lm_head counted once,
                        as ``sum(p.numel() for p in model.parameters())`` counts it
    params              the whole checkpoint: vision + vpg + projector + llm
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from types import SimpleNamespace

from vpgtrans.bundle import CONNECTOR_FILE, VPG_FILE, check_references, read_manifest, validate_bundle
from vpgtrans.model.spec import part_names, upgrade
from vpgtrans.errors import VpgtransError
from vpgtrans.formats.detect import detect_format
from vpgtrans.formats.hf import custom_code, read_config, safetensors_header, tensor_shapes

Shapes = dict[str, tuple[tuple[int, ...], str]]  # tensor name -> (shape, dtype)

SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                      "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                      "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
LN_VISION = "vision_model.post_layernorm."
PTH_NOTE = "a LAVIS .pth stores only the trained parameters: no LLM, and no ViT unless visual_encoder.* is saved"


def inspect_path(path: str | Path) -> dict:
    """Describe what is at ``path`` (see the module docstring for what each count covers)."""
    path = Path(path)
    fmt = detect_format(path)
    info = {"path": str(path.resolve()), "format": fmt}
    info.update(INSPECTORS[fmt](path))
    return info


# ---------------------------------------------------------------------------------------- helpers

def _count(shapes: Shapes, prefix: str = "", exclude: tuple[str, ...] = ()) -> int:
    return sum(math.prod(shape) for name, (shape, _) in shapes.items()
               if name.startswith(prefix) and not (exclude and name.startswith(exclude)))


def _dtype(shapes: Shapes) -> str | None:
    """The dtype of the floating-point tensors: one name, or ``mixed (a, b)``."""
    dtypes = sorted({SAFETENSORS_DTYPES.get(d, d.lower()) for _, d in shapes.values()})
    floats = [d for d in dtypes if d.startswith(("float", "bfloat"))] or dtypes
    return None if not floats else floats[0] if len(floats) == 1 else f"mixed ({', '.join(floats)})"


def _subset(shapes: Shapes, keep) -> Shapes:
    return {name: value for name, value in shapes.items() if keep(name)}


LLM_FIELDS = (("hidden_size", "d_model", "n_embd", "dim"), ("vocab_size",),
              ("num_hidden_layers", "num_layers", "n_layer", "n_layers"))
VISION_FIELDS = (("hidden_size",), ("num_hidden_layers",), ("image_size",), ("patch_size",))
QFORMER_FIELDS = (("hidden_size",), ("num_hidden_layers",), ("cross_attention_frequency",))


def _hf_config(config: dict, needed: tuple[tuple[str, ...], ...] = ()):
    """The config as a namespace. When the raw dict lacks one of the ``needed`` fields (each a tuple of
    the names it goes by), a transformers config instead (defaults filled in, aliases such as T5's
    ``d_model`` -> ``hidden_size`` resolved); the raw dict when transformers does not know the model type.

    Configs written by ``save_pretrained`` name every field, so the header path never imports transformers
    (seconds of imports: torch with it), which is what keeps ``inspect`` instant on a 7B checkpoint."""
    if not isinstance(config, dict):
        return SimpleNamespace()
    if all(any(config.get(name) is not None for name in names) for names in needed):
        return SimpleNamespace(**config)
    return _full_config(config)


def _full_config(config: dict):
    try:
        from transformers import AutoConfig

        extra = {k: v for k, v in config.items() if k != "model_type"}
        return AutoConfig.for_model(config["model_type"], **extra)
    except Exception:  # noqa: BLE001 - remote-code or malformed configs are described from the raw dict
        return SimpleNamespace(**config)


def _field(config, *names):
    """The first of ``names`` the config has (configs spell the same thing differently)."""
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def _model_class(config):
    """The transformers class an LLM config builds — looked up by name, never instantiated."""
    try:
        import transformers
        from transformers.models.auto import modeling_auto as auto
    except ImportError:
        return None
    names = list(getattr(config, "architectures", None) or [])
    model_type = getattr(config, "model_type", None)
    for mapping in (auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES):
        if model_type in mapping:
            names.append(mapping[model_type])
    for name in names:
        try:
            return getattr(transformers, name)
        except (AttributeError, ImportError):
            continue
    return None


def _tied_copies(shapes: Shapes, config) -> set[str]:
    """Stored tensors that the model ties to another stored tensor (old checkpoints save a tied
    ``lm_head`` twice; the model holds it once). transformers ties only when ``tie_word_embeddings``.
    Only vocabulary-sized tables can be tied: with fewer than two stored, transformers is not consulted."""
    vocab = _field(config, "vocab_size")
    if sum(len(shape) == 2 and shape[0] == vocab for shape, _ in shapes.values()) < 2:
        return set()
    if isinstance(config, SimpleNamespace) and getattr(config, "tie_word_embeddings", None) is None:
        config = _full_config(vars(config))  # the model type's default
    if not getattr(config, "tie_word_embeddings", False):
        return set()
    tied = getattr(_model_class(config), "_tied_weights_keys", None)
    if not isinstance(tied, dict):
        return set()
    return {target for target, source in tied.items()
            if target in shapes and source in shapes and shapes[target][0] == shapes[source][0]}


def _llm_fields(config, shapes: Shapes) -> dict:
    """LLM dims from its config, params from its stored shapes (names without any composite prefix)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    copies = _tied_copies(shapes, config)
    counted = {name: value for name, value in shapes.items() if name not in copies}
    fields = {
        "model_type": getattr(config, "model_type", None),
        "architectures": getattr(config, "architectures", None),
        "hidden_size": _field(text, "hidden_size", "d_model", "n_embd", "dim"),
        "vocab_size": _field(text, "vocab_size"),
        "num_layers": _field(text, "num_hidden_layers", "num_layers", "n_layer", "n_layers"),
        "is_encoder_decoder": bool(getattr(config, "is_encoder_decoder", False)),
        "params": _count(counted),
        "dtype": _dtype(shapes),
    }
    if fields["is_encoder_decoder"]:
        fields["num_decoder_layers"] = _field(text, "num_decoder_layers")
    return fields


def _vision_from_config(config, shapes: Shapes, prefix: str) -> dict:
    return {"width": _field(config, "hidden_size"), "layers": _field(config, "num_hidden_layers"),
            "image_size": _field(config, "image_size"), "patch_size": _field(config, "patch_size"),
            "params": _count(shapes, prefix, exclude=(prefix + "post_layernorm.",))}


def _layer_indices(shapes: Shapes, pattern: str) -> list[int]:
    return sorted({int(m.group(1)) for name in shapes for m in [re.match(pattern, name)] if m})


def _vision_from_shapes(shapes: Shapes) -> dict:
    """ViT dims of converted LAVIS weights (a .pth carries no config)."""
    width = shapes["vision_model.embeddings.class_embedding"][0][-1]
    patch = shapes["vision_model.embeddings.patch_embedding.weight"][0][-1]
    positions = shapes["vision_model.embeddings.position_embedding"][0][-2]  # 1 (CLS) + (image/patch)^2
    return {"width": width, "layers": len(_layer_indices(shapes, r"vision_model\.encoder\.layers\.(\d+)\.")),
            "image_size": math.isqrt(positions - 1) * patch, "patch_size": patch,
            "params": _count(shapes, "vision_model.", exclude=(LN_VISION,))}


def _qformer_from_shapes(shapes: Shapes) -> dict:
    layers = _layer_indices(shapes, r"qformer\.encoder\.layer\.(\d+)\.")
    cross = _layer_indices(shapes, r"qformer\.encoder\.layer\.(\d+)\.crossattention\.")
    return {"width": shapes["query_tokens"][0][-1], "layers": len(layers),
            "cross_attention_frequency": cross[1] - cross[0] if len(cross) > 1 else len(layers) if cross else None,
            "params": _count(shapes, "qformer.")}


def _vpg_fields(shapes: Shapes, vision: dict | None, qformer: dict) -> dict:
    vpg = _subset(shapes, lambda n: n == "query_tokens" or n.startswith(("qformer.", LN_VISION)))
    fields = {} if vision is None else {"vision": vision}
    return {**fields, "qformer": qformer, "num_query_tokens": shapes["query_tokens"][0][-2],
            "params": _count(vpg), "dtype": _dtype(vpg)}


def _projector_fields(shapes: Shapes, prefix: str = "language_projection.") -> dict:
    if prefix + "weight" not in shapes:
        return {}
    out_dim, in_dim = shapes[prefix + "weight"][0]  # (D_llm, D_q)
    return {"in": in_dim, "out": out_dim, "params": _count(shapes, prefix)}


def _require(shapes: Shapes, names: list[str], path: Path, what: str) -> None:
    missing = [n for n in names if n not in shapes]
    if missing:
        raise VpgtransError(f"{path}: not a complete {what}: missing tensors {', '.join(missing)}")


# ---------------------------------------------------------------------------------------- formats

def _inspect_blip2(path: Path) -> dict:
    """HF BLIP-2 / InstructBLIP directory: configs + safetensors headers."""
    raw = read_config(path)
    shapes = tensor_shapes(path)
    _require(shapes, ["query_tokens", "language_projection.weight"], path, "BLIP-2 checkpoint")
    vision_config = _hf_config(raw.get("vision_config") or {"model_type": "blip_2_vision_model"}, VISION_FIELDS)
    qformer_config = _hf_config(raw.get("qformer_config") or {"model_type": "blip_2_qformer"}, QFORMER_FIELDS)
    text_config = _hf_config(raw.get("text_config") or {}, LLM_FIELDS)
    qformer = {"width": _field(qformer_config, "hidden_size"), "layers": _field(qformer_config, "num_hidden_layers"),
               "cross_attention_frequency": _field(qformer_config, "cross_attention_frequency"),
               "params": _count(shapes, "qformer.")}
    vision = _vision_from_config(vision_config, shapes, "vision_model.")
    llm_shapes = {n[len("language_model."):]: v for n, v in shapes.items() if n.startswith("language_model.")}
    info = {"vpg": _vpg_fields(shapes, vision, qformer), "projector": _projector_fields(shapes),
            "llm": _llm_fields(text_config, llm_shapes)}
    info["params"] = vision["params"] + info["vpg"]["params"] + info["projector"]["params"] + info["llm"]["params"]
    return info


def _inspect_vision(path: Path) -> dict:
    """A standalone ViT directory (``Blip2VisionModel``); ``post_layernorm`` is the VPG's ln_vision."""
    shapes = tensor_shapes(path)
    prefix = "vision_model." if any(n.startswith("vision_model.") for n in shapes) else ""
    vision = _vision_from_config(_hf_config(read_config(path), VISION_FIELDS), shapes, prefix)
    return {"vision": {**vision, "post_layernorm_params": _count(shapes, prefix + "post_layernorm."),
                       "dtype": _dtype(shapes)},
            "params": _count(shapes)}


def _inspect_llm(path: Path) -> dict:
    """An HF causal LM or seq2seq LM directory (described from its config: its own code never runs)."""
    raw = read_config(path)
    info = {"llm": _llm_fields(_hf_config(raw, LLM_FIELDS), tensor_shapes(path))}
    code = custom_code(raw)
    if code:
        info["llm"]["custom_code"] = code
        info["notes"] = [f"config.json auto_map points at the model's own code ({', '.join(code[:3])}); vpgtrans "
                         "runs it only with --trust-remote-code"]
    return info


def _inspect_pth(path: Path) -> dict:
    """A LAVIS / VPGTrans ``.pth``: read (weights_only), converted to HF names, described by shapes."""
    from vpgtrans.formats import lavis

    state = lavis.load_pth(path)
    kind = lavis.checkpoint_kind(state)
    hf_state, dropped = lavis.lavis_to_hf(state, keep_qformer_embeddings=kind == "instructblip")
    shapes = {n: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in hf_state.items()}
    _require(shapes, ["query_tokens", "language_projection.weight"], path, "BLIP-2 stage-2 checkpoint")
    vision = _vision_from_shapes(shapes) if "vision_model.embeddings.class_embedding" in shapes else None
    vpg = _vpg_fields(shapes, vision, _qformer_from_shapes(shapes))
    projector = _projector_fields(shapes)
    prefixes = sorted({k.split(".")[0] for k in state if k.split(".")[0] in lavis.PROJECTION_PREFIXES})
    return {
        "kind": kind,
        "vpg": vpg,
        "projector": projector,
        "llm": None,
        "checkpoint": {"projection_prefix": prefixes[0] if len(prefixes) == 1 else prefixes or None,
                       "tensors": len(state), "dropped_keys": len(dropped), "dropped_examples": sorted(dropped)[:5]},
        "params": (vision["params"] if vision else 0) + vpg["params"] + projector["params"],
        "notes": [PTH_NOTE],
    }


def _file_params(path: Path) -> dict:
    """Parameter count of one bundle file from its safetensors header; a damaged file is described."""
    if not path.is_file():
        return {"error": "missing"}
    try:
        header = safetensors_header(path)
        shapes = {n: (tuple(v["shape"]), v["dtype"]) for n, v in header.items()}
    except (VpgtransError, KeyError, TypeError) as exc:
        return {"error": str(exc)}
    return {"tensors": len(shapes), "params": _count(shapes), "dtype": _dtype(shapes)}


def _obj(value) -> dict:
    """A manifest section as a dict — ``{}`` when a hand edit made it something else."""
    return value if isinstance(value, dict) else {}


def _inspect_bundle(path: Path) -> dict:
    """A vpgtrans bundle: manifest + safetensors headers; a damaged bundle is described, ``valid`` says why."""
    manifest = read_manifest(path)  # unreadable JSON or no manifest at all: nothing to describe
    try:
        check_references(path, validate_bundle(path, check_references=True))  # the frozen models, headers only
        valid = True
    except VpgtransError as exc:
        valid = str(exc)
    except (KeyError, TypeError, AttributeError) as exc:  # a manifest with the right keys but wrong contents
        valid = f"{path}: invalid bundle: malformed manifest ({type(exc).__name__}: {exc})"
    model = upgrade(_obj(manifest.get("model")))  # a format-1 manifest reads as the qformer kind
    vision_config = SimpleNamespace(**_obj(_obj(model.get("vision")).get("config")))
    visual = _obj(model.get("visual"))
    vpg_section = _obj(visual.get("vpg"))
    qformer_config = SimpleNamespace(**_obj(vpg_section.get("qformer_config")))
    connector, llm = _obj(visual.get("connector")), _obj(model.get("llm"))
    adapters = model.get("adapters") if isinstance(model.get("adapters"), list) else []
    part_file_names = [f"{name}.safetensors" for name in part_names(model)]
    files = {name: _file_params(path / name) if Path(name).name == name else {"error": "not a plain file name"}
             for name in _obj(manifest.get("files"))}
    references = {role: {**ref, "exists": isinstance(ref.get("path"), str) and bool(ref["path"])
                         and Path(ref["path"]).exists()}
                  for role, ref in _obj(manifest.get("references")).items() if isinstance(ref, dict)}
    parent = manifest.get("parent")
    return {
        "stage": manifest.get("stage"),
        "vpgtrans_version": manifest.get("vpgtrans_version"),
        "created": manifest.get("created"),
        "parent": None if not isinstance(parent, dict) else {
            "path": parent.get("path"),
            "exists": isinstance(parent.get("path"), str) and bool(parent["path"]) and Path(parent["path"]).exists()},
        "valid": valid,
        "visual": visual.get("type"),
        "adapters": [entry for entry in adapters if isinstance(entry, dict)],
        "vpg": {
            "kind": vpg_section.get("kind"),
            "vision": {"width": _field(vision_config, "hidden_size"), "layers": _field(vision_config, "num_hidden_layers"),
                       "image_size": _field(vision_config, "image_size"), "patch_size": _field(vision_config, "patch_size")},
            "qformer": {"width": _field(qformer_config, "hidden_size"),
                        "layers": _field(qformer_config, "num_hidden_layers"),
                        "cross_attention_frequency": _field(qformer_config, "cross_attention_frequency")},
            "num_query_tokens": vpg_section.get("num_query_tokens"),
            "params": files.get(VPG_FILE, {}).get("params"),
            "dtype": files.get(VPG_FILE, {}).get("dtype"),
        },
        "connector": {"type": connector.get("type"), "in": connector.get("in_dim"), "out": connector.get("out_dim"),
                      "params": files.get(CONNECTOR_FILE, {}).get("params")},
        "llm": {k: llm.get(k) for k in ("model_type", "hidden_size", "vocab_size", "is_encoder_decoder")},
        "references": references,
        "files": files,
        # Unknown (None) when a trained part's file is missing or unreadable.
        "trainable_params": None if not part_file_names or any(files.get(f, {}).get("params") is None
                                                                for f in part_file_names)
        else sum(files[f]["params"] for f in part_file_names),
        "metrics": _obj(manifest.get("metrics")),
        "curve_length": len(manifest["curve"]) if isinstance(manifest.get("curve"), list) else None,
        **({"pool": {key: visual.get(key) for key in ("grid", "pool_size", "adaptive", "hidden", "init")}}
           if visual.get("type") == "pool" else {}),
        **({"notes": [f"visual kind {visual.get('type')!r}: the Q-Former is not used (the bundle holds no "
                      f"{VPG_FILE}); trained parts: {', '.join(part_names(model)) or 'none'}"]}
           if visual.get("type") not in (None, "qformer") else {}),
    }


INSPECTORS = {"bundle": _inspect_bundle, "hf-blip2": _inspect_blip2, "hf-instructblip": _inspect_blip2,
              "hf-vision": _inspect_vision, "hf-llm": _inspect_llm, "lavis-pth": _inspect_pth}


# ---------------------------------------------------------------------------------------- render

def _format_value(key: str, value) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int) and (key.endswith("params") or value >= 10_000):
        return f"{value:,}" + (f"  ({_human(value)})" if value >= 10_000 else "")
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_format_value(key, v) for v in value) or "—"
    return str(value)


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _flatten(value, prefix: str = ""):
    """(dotted key, leaf value) pairs of nested dicts."""
    if isinstance(value, dict) and value:
        for key, item in value.items():
            yield from _flatten(item, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, value


def render(info: dict):
    """A key | value table of ``inspect_path``'s dict, one section per top-level part."""
    from rich.table import Table
    from rich.text import Text

    # Text(...) everywhere: paths and messages are data, never rich markup.
    table = Table(title=Text(f"{info['path']}  ({info['format']})", style="bold"), show_header=False,
                  title_justify="left")
    table.add_column("key", style="cyan", no_wrap=True)
    table.add_column("value", overflow="fold")
    general = {k: v for k, v in info.items() if not isinstance(v, dict) and k not in ("path", "format", "valid", "notes")}
    for key, value in general.items():
        table.add_row(key, Text(_format_value(key, value)))
    if "valid" in info:
        ok = info["valid"] is True
        table.add_row("valid", Text("yes" if ok else str(info["valid"]), style="green" if ok else "bold red"))
    for section, value in info.items():
        if not isinstance(value, dict):
            continue
        table.add_section()
        table.add_row(Text(section, style="bold"), "")
        for key, leaf in _flatten(value):
            table.add_row("  " + key, Text(_format_value(key, leaf)))
    for note in info.get("notes") or []:
        table.add_section()
        table.add_row("note", Text(note, style="yellow"))
    return table
