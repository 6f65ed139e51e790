"""The frozen models a bundle references, checked from their safetensors headers alone.

At ``inherit`` and whenever a bundle is loaded (training stages, ``eval``, ``export``, ``inspect``), the
target LLM and the vision encoder are compared with what their configs imply, without reading a weight:
the model is built on the meta device from its config (no memory), and its state-dict names, shapes and
dtype kinds are compared with the tensors the safetensors headers describe. transformers' own rules
decide what counts as present: checkpoint key conversions (transformers 5's renamings and converters,
e.g. per-expert MoE tensors fused into one), a checkpoint saved with or without the base-model prefix,
tied weights (a missing ``lm_head.weight`` under ``tie_word_embeddings``), and the model's
``_keys_to_ignore_on_load_missing`` / ``_keys_to_ignore_on_load_unexpected``.

Each check returns a **header summary** (``{"digest", "tensors", "parameters"}``: a SHA-256 over the
sorted names, shapes and dtypes) that ``inherit`` records in the bundle's references; later commands
compare it, so an LLM replaced at the referenced path by one with other shapes is one line, not a run
with wrong-width soft prompts. Changed *values* under the same shapes are the fingerprint's business
(a documented warning). Not checked: ``pytorch_model.bin`` weights (their names need unpickling: they
are checked when transformers loads them), pre-quantized checkpoints (``quantization_config``: shapes
are the quantizer's) and models that run their own code.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
from pathlib import Path

from vpgtrans.errors import VpgtransError
from vpgtrans.formats.hf import (WEIGHT_FILE, WEIGHT_INDEX, check_model_dir, meta_model, safetensors_header,
                                 weight_files)

log = logging.getLogger(__name__)

SHOWN = 5  # names shown per kind of problem in the one-line error
# safetensors dtype names -> the kind of value they hold (a float weight stored as int8 is refused)
_DTYPE_KIND = {"F64": "float", "F32": "float", "F16": "float", "BF16": "float", "F8_E4M3": "float",
               "F8_E5M2": "float", "F8_E8M0": "float", "F6_E2M3": "float", "F6_E3M2": "float", "F4": "float",
               "I64": "int", "I32": "int", "I16": "int", "I8": "int", "U64": "int", "U32": "int", "U16": "int",
               "U8": "int", "BOOL": "bool", "C64": "complex"}
_CACHE: dict[tuple, dict] = {}  # one check per model directory and header state per process


def header_summary(shapes: dict[str, tuple[tuple[int, ...], str]]) -> dict:
    """``{"digest": "sha256:...", "tensors": N, "parameters": P}`` of ``{name: (shape, dtype)}``."""
    digest = hashlib.sha256()
    for name in sorted(shapes):
        shape, dtype = shapes[name]
        digest.update(f"{name}\t{dtype}\t{','.join(map(str, shape))}\n".encode())
    return {"digest": "sha256:" + digest.hexdigest(), "tensors": len(shapes),
            "parameters": sum(math.prod(shape) for shape, _ in shapes.values())}


def stored_shapes(model_dir: Path) -> dict[str, tuple[tuple[int, ...], str]] | None:
    """``{name: (shape, dtype)}`` of every tensor in a directory's safetensors weights, from their headers
    (each checked by ``safetensors_header``); None when the weights are ``pytorch_model.bin``. A shard the
    index names that is missing, or that lacks a tensor the index puts in it, is one line."""
    model_dir = Path(model_dir)
    if not (model_dir / WEIGHT_INDEX).is_file() and not (model_dir / WEIGHT_FILE).is_file():
        return None
    check_model_dir(model_dir)  # config.json, every shard the index names present, headers sound
    by_file: dict[Path, list[str]] = {}
    for name, file in weight_files(model_dir).items():
        by_file.setdefault(file, []).append(name)
    shapes, absent = {}, []
    for file in sorted(by_file):
        header = safetensors_header(file)
        absent += [f"{name} (in {file.name})" for name in by_file[file] if name not in header]
        shapes.update({name: (tuple(entry["shape"]), entry["dtype"]) for name, entry in header.items()})
    if absent:
        raise VpgtransError(f"{model_dir}: the weight index names tensors its shards do not hold: "
                            f"{', '.join(sorted(absent)[:SHOWN])}{_more(absent)}; re-download the model")
    return shapes


def _more(items) -> str:
    return f" (+{len(items) - SHOWN} more)" if len(items) > SHOWN else ""


def _state_shapes(model) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{name: (shape, dtype kind)}`` of a (meta-device) model's state dict."""
    import torch

    return {name: (tuple(t.shape), "bool" if t.dtype == torch.bool else "float" if t.dtype.is_floating_point else "int")
            for name, t in model.state_dict().items()}


def _problems(model_dir: Path, what: str, missing, unexpected, mismatched, wrong_kind, unbuildable=()) -> None:
    """Raise one line naming every class of problem (first names of each), or return."""
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shapes differ", mismatched),
                         ("wrong dtype", wrong_kind), ("cannot be assembled", unbuildable)):
        items = sorted(items)
        if items:
            parts.append(f"{label}: {', '.join(items[:SHOWN])}{_more(items)}")
    if parts:
        raise VpgtransError(f"{model_dir}: the {what} weights do not match its config ({'; '.join(parts)}); "
                            "re-download or re-save the model, or fix its config.json")


def _kind_problems(shapes: dict, expected_kinds: dict[str, str]) -> list[str]:
    """Stored tensors whose dtype holds another kind of value than the model's tensor of that name."""
    return [f"{name} is {shapes[name][1]}, the model holds {kind}" for name, kind in expected_kinds.items()
            if name in shapes and _DTYPE_KIND.get(shapes[name][1], "unknown") != kind]


def _cache_key(model_dir: Path, extra) -> tuple:
    files = sorted(p for p in Path(model_dir).iterdir() if p.suffix in (".json", ".safetensors"))
    return (str(Path(model_dir).resolve()), repr(extra),
            tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files))


@contextlib.contextmanager
def _quiet_transformers():
    """No 'Loading weights' progress bar or load report while the meta model is matched with the headers."""
    from transformers.utils import logging as hf_logging

    shown, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if shown:
            hf_logging.enable_progress_bar()


def check_llm(model_dir: Path, hf_config=None, trust_remote_code: bool = False) -> dict | None:
    """Check an HF LLM directory's weights against its config from the headers alone; its header summary,
    or None when the check does not apply (``.bin`` weights, a pre-quantized checkpoint, the model's own
    code — logged at debug level). A missing, unexpected, mis-shaped or wrong-kind tensor is one line."""
    model_dir = Path(model_dir)
    if trust_remote_code:
        log.debug("%s: runs its own code; its weights are checked when it loads", model_dir)
        return None
    key = _cache_key(model_dir, "llm")
    if key not in _CACHE:
        _CACHE[key] = _check_llm(model_dir, hf_config)
    return _CACHE[key]


def _check_llm(model_dir: Path, hf_config) -> dict | None:
    from transformers import AutoConfig

    shapes = stored_shapes(model_dir)
    if shapes is None:
        log.debug("%s: pytorch_model.bin weights; their names are checked when transformers loads them", model_dir)
        return None
    if hf_config is None:
        try:
            hf_config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
        except Exception as exc:  # noqa: BLE001 - the user's config file to fix
            raise VpgtransError(f"{model_dir}: cannot read the LLM config ({str(exc).splitlines()[0]})") from None
    if getattr(hf_config, "quantization_config", None) is not None:
        log.debug("%s: a pre-quantized checkpoint; its shapes are the quantizer's", model_dir)
        return header_summary(shapes)
    try:
        with _quiet_transformers():
            model = meta_model(hf_config)
    except VpgtransError as exc:
        raise VpgtransError(f"{model_dir}: {exc}") from None
    expected = _state_shapes(model)
    try:
        with _quiet_transformers():
            missing, unexpected, mismatched, unbuildable, targets = _match(model, shapes)
    except Exception as exc:  # noqa: BLE001 - transformers' loader internals on an architecture they do not fit
        log.warning("%s: could not match the weights with the config from the headers (%s: %s); transformers "
                    "checks them when it loads the model", model_dir, type(exc).__name__, str(exc)[:200])
        return header_summary(shapes)
    # Tied weights: a group (source + its targets) is present when any member is (transformers ties the rest).
    groups: dict[str, set[str]] = {}
    for target, source in (getattr(model, "all_tied_weights_keys", None) or _legacy_tied(model)).items():
        groups.setdefault(source, {source}).add(target)
    for members in groups.values():
        if members - missing:
            missing -= members
    missing = {k for k in missing if not _ignored(k, getattr(model, "_keys_to_ignore_on_load_missing", None))}
    unexpected = {k for k in unexpected if not _ignored(k, _ignore_unexpected(model))}
    wrong_kind = _kind_problems({targets.get(n, n): s for n, s in shapes.items()},
                                {name: kind for name, (_, kind) in expected.items()})
    _problems(model_dir, "LLM", missing, unexpected, mismatched, wrong_kind, unbuildable)
    return header_summary(shapes)


def _ignored(key: str, patterns) -> bool:
    import re

    return any(re.search(pattern, key) for pattern in (patterns or ()))


def _ignore_unexpected(model) -> set[str]:
    """The model's ``_keys_to_ignore_on_load_unexpected`` plus what transformers always ignores: the per-layer
    rotary ``inv_freq`` and ``position_ids`` buffers old checkpoints hold."""
    patterns = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
    buffers = [name for name, _ in model.named_buffers()]
    if any(name.endswith("rotary_emb.inv_freq") for name in buffers):
        patterns.add(r"rotary_emb\.inv_freq")
    if any(name.endswith("position_ids") for name in buffers):
        patterns.add(r"(^|\.)position_ids$")
    return patterns


def _legacy_tied(model) -> dict[str, str]:
    """transformers 4: ``_tied_weights_keys`` lists the targets tied to the input embeddings."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return {}
    embeddings = model.get_input_embeddings()
    source = next((f"{n}.weight" for n, m in model.named_modules() if m is embeddings), None)
    return {key: source for key in (getattr(model, "_tied_weights_keys", None) or ())} if source else {}


def _match(model, shapes: dict) -> tuple[set, set, set, set, dict]:
    """(missing, unexpected, shape mismatches, targets that cannot be assembled, {stored name: model name})
    of the stored ``shapes`` against a meta-device ``model``, by transformers' own loading rules."""
    import torch

    dtypes = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (WeightConverter, convert_and_load_state_dict_in_model,
                                                     rename_source_key)
        from transformers.modeling_utils import LoadStateDictConfig
    except ImportError:  # transformers 4: prefixes and key_mapping only
        return _match_v4(model, shapes)
    mapping = get_model_conversion_mapping(model)
    expected = model.state_dict()
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    renamings = [m for m in mapping if not isinstance(m, WeightConverter)]
    targets = {name: rename_source_key(name, renamings, converters, model.base_model_prefix, expected)[0]
               for name in shapes}
    # Meta tensors in place of the stored ones: transformers renames, converts (stacks experts, splits qkv...)
    # and assigns them exactly as it would the real weights, and reports what does not fit; nothing is read.
    state = {name: torch.empty(shape, dtype=dtypes.get(dtype, torch.float32), device="meta")
             for name, (shape, dtype) in shapes.items()}
    info, _ = convert_and_load_state_dict_in_model(
        model, state, LoadStateDictConfig(device_map={"": "meta"}, weight_mapping=mapping))
    mismatched = {f"{name} {tuple(stored)} stored, {tuple(wanted)} from the config"
                  for name, stored, wanted in info.mismatched_keys}
    unbuildable = set(info.conversion_errors)
    return set(info.missing_keys) - unbuildable, set(info.unexpected_keys), mismatched, unbuildable, targets


def _match_v4(model, shapes: dict) -> tuple[set, set, set, set, dict]:
    """``_match`` for transformers 4 (no conversion machinery): the base-model prefix added or removed, and the
    model's ``_checkpoint_conversion_mapping`` regexes applied."""
    import re

    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    prefix = model.base_model_prefix
    targets = {}
    for name in shapes:
        renamed = name
        for pattern, replacement in (getattr(model, "_checkpoint_conversion_mapping", None) or {}).items():
            renamed = re.sub(pattern, replacement, renamed)
        if renamed not in expected and f"{prefix}.{renamed}" in expected:
            renamed = f"{prefix}.{renamed}"
        elif renamed not in expected and renamed.startswith(f"{prefix}.") and renamed[len(prefix) + 1:] in expected:
            renamed = renamed[len(prefix) + 1:]
        targets[name] = renamed
    found = set(targets.values())
    mismatched = {f"{targets[n]} {tuple(s)} stored, {expected[targets[n]]} from the config"
                  for n, (s, _) in shapes.items() if targets[n] in expected and tuple(s) != expected[targets[n]]}
    return set(expected) - found, found - set(expected), mismatched, set(), targets


def check_vision(ref: dict, vision_config: dict) -> dict:
    """Check a referenced BLIP-2 ViT (``{"path", "kind"}``) against ``vision_config`` from the headers
    alone; its header summary (of the ViT's own tensors). A missing, unexpected or mis-shaped tensor is one
    line. ``.bin`` weights are read whole later (and checked strictly then): None here."""
    path = Path(ref["path"])
    key = _cache_key(path, ("vision", ref.get("kind"), sorted(vision_config.items(), key=str)))
    if key not in _CACHE:
        _CACHE[key] = _check_vision(path, ref.get("kind"), vision_config)
    return _CACHE[key]


def _check_vision(path: Path, kind: str, vision_config: dict) -> dict | None:
    import torch

    from vpgtrans.model.vlm import build_vision_encoder
    from vpgtrans.naming import vision_state

    shapes = stored_shapes(path)
    if shapes is None:
        log.debug("%s: pytorch_model.bin weights; the vision encoder is checked when it loads", path)
        return None
    shapes = vision_state(shapes, kind == "hf-blip2")
    try:
        with torch.device("meta"):
            vision = build_vision_encoder(vision_config)
    except Exception as exc:  # noqa: BLE001 - a damaged vision config
        raise VpgtransError(f"{path}: cannot build the vision encoder its config describes ({exc})") from None
    expected = _state_shapes(vision)
    mismatched = [f"{name} {shapes[name][0]} stored, {shape} from the config" for name, (shape, _) in expected.items()
                  if name in shapes and shapes[name][0] != shape]
    _problems(path, "vision encoder", set(expected) - set(shapes), set(shapes) - set(expected), mismatched,
              _kind_problems(shapes, {name: kind for name, (_, kind) in expected.items()}))
    return header_summary(shapes)


def check_frozen(manifest: dict) -> None:
    """Check the ViT and the LLM a bundle references (``check_vision`` / ``check_llm``, headers only) and compare
    them with what the bundle recorded: the LLM's width and vocabulary (``model.llm``) and, for bundles that
    recorded them, both header summaries. A change of shapes or tensor set is one line naming it; a bundle
    from before header summaries is compared by width only (nothing said)."""
    from vpgtrans.model.spec import ModelSpec

    spec, refs = ModelSpec.from_manifest(manifest["model"]), manifest["references"]
    vision_ref, llm_ref = refs["vision"], refs["llm"]
    remote = llm_ref.get("trust_remote_code") is True
    now = {"vision": check_vision(vision_ref, spec.vision["config"]),
           "llm": check_llm(Path(llm_ref["path"]), trust_remote_code=remote)}
    if not remote:
        _compare_width(Path(llm_ref["path"]), spec.llm)
    for role, ref in (("vision", vision_ref), ("llm", llm_ref)):
        recorded = ref.get("header")
        if not isinstance(recorded, dict) or now[role] is None:
            log.debug("%s: no header summary recorded or computable for the %s; not compared", ref["path"], role)
            continue
        if recorded.get("digest") != now[role]["digest"]:
            raise VpgtransError(
                f"{ref['path']}: the {'vision encoder' if role == 'vision' else 'LLM'}'s tensors changed since the "
                f"bundle was made ({_counts(recorded)} then, {_counts(now[role])} now; header digest differs); point "
                "the bundle at the model it was made with, or re-run inherit for this one")


def _counts(summary: dict) -> str:
    return f"{summary.get('tensors')} tensors / {summary.get('parameters')} parameters"


def _compare_width(llm_path: Path, llm: dict) -> None:
    """The LLM at the referenced path has the width and vocabulary the bundle was made for (``model.llm``)."""
    from transformers import AutoConfig

    try:
        text = AutoConfig.from_pretrained(llm_path, trust_remote_code=False).get_text_config()
    except Exception as exc:  # noqa: BLE001 - the user's config file to fix
        raise VpgtransError(f"{llm_path}: cannot read the LLM config ({str(exc).splitlines()[0]})") from None
    changed = [f"{key} {llm.get(key)} -> {getattr(text, key, None)}" for key in ("hidden_size", "vocab_size")
               if llm.get(key) != getattr(text, key, None)]
    if changed:
        raise VpgtransError(f"{llm_path}: not the LLM this bundle was made for ({', '.join(changed)}); point the "
                            "bundle at the model it was made with, or re-run inherit for this one")
