"""Reading Hugging Face model directories without materialising the model.

Weights are read tensor by tensor from safetensors (one tensor of a sharded 70B checkpoint costs only
that tensor); shapes come from the safetensors headers, which are checked against the file size (a
truncated file is named as such before any tensor is read). ``pytorch_model.bin`` is read with
``weights_only=True``. A model whose config needs its own code (``auto_map`` with a ``model_type``
transformers does not know) is refused unless the user passed ``--trust-remote-code``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from vpgtrans.errors import VpgtransError
from vpgtrans.formats.torchfile import first_line, load_weights_only

log = logging.getLogger(__name__)

WEIGHT_INDEX = "model.safetensors.index.json"
WEIGHT_FILE = "model.safetensors"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"


def read_config(model_dir: Path) -> dict:
    """The ``config.json`` of an HF directory, as a dict."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise VpgtransError(f"{model_dir}: no config.json — not a Hugging Face model directory")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise VpgtransError(f"{path}: not valid JSON ({first_line(exc)})") from None
    except OSError as exc:
        raise VpgtransError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not isinstance(config, dict):
        raise VpgtransError(f"{path}: not a model config (a JSON {type(config).__name__}, not an object)")
    return config


def custom_code(config: dict) -> list[str]:
    """The code a config's ``auto_map`` points at (``"modeling_x.XForCausalLM"``, ...); [] when none."""
    auto_map = config.get("auto_map") if isinstance(config, dict) else None
    if isinstance(auto_map, dict):
        refs = [v for value in auto_map.values() for v in (value if isinstance(value, (list, tuple)) else [value])]
    elif isinstance(auto_map, (list, tuple)):
        refs = list(auto_map)
    else:
        return []
    return sorted({str(ref) for ref in refs if ref})


def require_trusted_code(model_dir: Path, trust_remote_code: bool = False, config: dict | None = None) -> None:
    """Refuse a model that needs its own Python code (``auto_map`` and a ``model_type`` transformers
    does not know) unless ``trust_remote_code``. Nothing is imported or run here. When transformers
    knows the type, its built-in implementation is used and the custom code is ignored (logged)."""
    config = read_config(model_dir) if config is None else config
    code = custom_code(config)
    if not code or trust_remote_code:
        return
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING_NAMES:
        raise VpgtransError(f"{model_dir}: model_type {model_type!r} needs the model's own Python code "
                            f"({', '.join(code[:3])} in config.json auto_map); vpgtrans runs it only with "
                            "--trust-remote-code (trust_remote_code=True in Python) — read that code first")
    log.warning("%s: config.json auto_map points at custom code (%s); using transformers' built-in %r "
                "implementation instead (pass --trust-remote-code to run the model's own code)",
                model_dir, ", ".join(code[:3]), model_type)


def weight_files(model_dir: Path) -> dict[str, Path]:
    """Map tensor name -> file holding it, from the index or the single weight file."""
    model_dir = Path(model_dir)
    for index_name in (WEIGHT_INDEX, BIN_INDEX):
        index = model_dir / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
                raise VpgtransError(f"{index}: unreadable weight index ({type(exc).__name__}: {first_line(exc)})") from None
            bad = [f"{name!r}: {file!r}" for name, file in (weight_map.items() if isinstance(weight_map, dict) else [])
                   if not isinstance(name, str) or not isinstance(file, str) or Path(file).name != file]
            if not isinstance(weight_map, dict) or bad:
                raise VpgtransError(f"{index}: weight_map must map tensor names to file names in this directory"
                                    + (f" (bad entries: {', '.join(bad[:3])})" if bad else ""))
            return {name: model_dir / file for name, file in weight_map.items()}
    single = model_dir / WEIGHT_FILE
    if single.is_file():
        return {name: single for name in safetensors_header(single)}
    binary = model_dir / BIN_FILE
    if binary.is_file():
        return {name: binary for name in _load_bin(binary)}
    raise VpgtransError(f"{model_dir}: no model.safetensors, sharded index or pytorch_model.bin found")


def safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file: name -> {dtype, shape, data_offsets}.

    Checked without reading tensor data: a header that is not a JSON object of well-formed entries, or
    tensor data that does not end exactly where the file ends (truncated, or bytes appended), is a
    ``VpgtransError`` naming the file and the problem. Then safetensors itself parses the header
    (``safe_open``): an unknown dtype, a shape whose size disagrees with the tensor's byte range, or
    ranges that overlap or leave gaps are refused the same way."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            length = int.from_bytes(fh.read(8), "little")
            if size < 8 or length <= 0 or length > 100_000_000 or length + 8 > size:
                raise ValueError(f"bad header length {length} for a {size}-byte file (truncated or not safetensors)")
            header = json.loads(fh.read(length))
    except FileNotFoundError:
        raise VpgtransError(f"{path}: missing") from None
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise VpgtransError(f"{path}: not a readable safetensors file ({first_line(exc)})") from None
    if not isinstance(header, dict):
        raise VpgtransError(f"{path}: not a readable safetensors file (header is not a JSON object)")
    header.pop("__metadata__", None)
    end = 0
    for name, entry in header.items():
        try:
            start, stop = entry["data_offsets"]
            ok = isinstance(entry["dtype"], str) and all(isinstance(d, int) and d >= 0 for d in entry["shape"]) \
                and isinstance(start, int) and isinstance(stop, int) and 0 <= start <= stop
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise VpgtransError(f"{path}: damaged safetensors header (entry {name!r} is malformed)")
        end = max(end, stop)
    if 8 + length + end != size:
        problem = "truncated" if 8 + length + end > size else "has trailing bytes"
        raise VpgtransError(f"{path}: {problem}: its header describes {end} bytes of tensor data, the file holds "
                            f"{size - 8 - length}; re-download or re-save it")
    problem = _safe_open_problem(path)
    if problem:
        raise VpgtransError(f"{path}: damaged safetensors header ({problem}); re-download or re-save it")
    return header


def _safe_open_problem(path: Path) -> str | None:
    """What safetensors' own header parser refuses in ``path`` (one line), or None. No tensor is read:
    the file is memory-mapped and only its header parsed."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy"):
            return None
    except Exception as exc:  # noqa: BLE001 - SafetensorError and OSError: the user's file to fix
        problem = first_line(exc).removeprefix("Error while deserializing header: ")
        return problem.split(", expected one of")[0]  # an unknown dtype: drop the list of every known one


def check_model_dir(model_dir: Path) -> dict:
    """Check an HF model directory without loading it: ``config.json`` is a JSON object, every weight
    file the index names exists, every safetensors header is sound and matches its file's size.
    Returns the config. ``pytorch_model.bin`` files are left to be checked when they are read (with
    ``weights_only``): listing their tensors would mean unpickling them."""
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    if (model_dir / WEIGHT_INDEX).is_file() or (model_dir / WEIGHT_FILE).is_file():
        files = set(weight_files(model_dir).values()) if (model_dir / WEIGHT_INDEX).is_file() \
            else {model_dir / WEIGHT_FILE}
        missing = sorted(file.name for file in files if not file.is_file())
        if missing:
            raise VpgtransError(f"{model_dir}: weight file(s) named by the index are missing: {', '.join(missing[:5])}")
        for file in sorted(files):
            if file.suffix == ".safetensors":
                safetensors_header(file)
    elif not (model_dir / BIN_FILE).is_file() and not (model_dir / BIN_INDEX).is_file():
        raise VpgtransError(f"{model_dir}: no model.safetensors, sharded index or pytorch_model.bin found")
    return config


_BIN_CACHE: dict[Path, dict] = {}


def _load_bin(path: Path) -> dict:
    """A ``pytorch_model.bin`` state dict, unpickled with ``weights_only=True`` (cached: one file)."""
    if path not in _BIN_CACHE:
        import torch

        _BIN_CACHE.clear()
        state = load_weights_only(path)
        if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
            raise VpgtransError(f"{path}: not a state dict of named tensors")
        _BIN_CACHE[path] = state
    return _BIN_CACHE[path]


def tensor_shapes(model_dir: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Map tensor name -> (shape, dtype) without reading tensor data (safetensors headers)."""
    shapes = {}
    by_file: dict[Path, list[str]] = {}
    for name, file in weight_files(model_dir).items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        if file.suffix == ".safetensors":
            header = safetensors_header(file)
            for name in names:
                if name in header:
                    shapes[name] = (tuple(header[name]["shape"]), header[name]["dtype"])
        else:
            state = _load_bin(file)
            for name in names:
                shapes[name] = (tuple(state[name].shape), str(state[name].dtype).replace("torch.", ""))
    return shapes


def read_tensors(model_dir: Path, names=None, prefix: str | None = None, strip_prefix: bool = True) -> dict:
    """Read the named tensors (or all with ``prefix``) from an HF directory; nothing else is loaded."""
    from safetensors import safe_open

    files = weight_files(model_dir)
    if names is None:
        names = [n for n in files if prefix is None or n.startswith(prefix)]
    missing = [n for n in names if n not in files]
    if missing:
        raise VpgtransError(f"{model_dir}: tensors not found: {', '.join(missing[:10])}")
    out = {}
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    for file, file_names in by_file.items():
        if file.suffix == ".safetensors":
            safetensors_header(file)  # a truncated or damaged file is named before safe_open reads it
            try:
                with safe_open(str(file), framework="pt") as fh:
                    for name in file_names:
                        out[name] = fh.get_tensor(name)
            except Exception as exc:  # noqa: BLE001 - corrupt file
                raise VpgtransError(f"{file}: unreadable safetensors ({first_line(exc)})") from None
        else:
            state = _load_bin(file)
            out.update({name: state[name] for name in file_names})
    if prefix and strip_prefix:
        out = {name[len(prefix):]: tensor for name, tensor in out.items()}
    return out


def meta_model(hf_config):
    """The LLM a config describes, built on the meta device (no memory, no weight initialisation: a 7B
    LLaMA in a fraction of a second instead of ~10 s of initialising tensors that hold nothing)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4
        from transformers.modeling_utils import no_init_weights

    auto = AutoModelForSeq2SeqLM if getattr(hf_config, "is_encoder_decoder", False) else AutoModelForCausalLM
    # A config class from a model's own code exists only because the user trusted that code already.
    remote = type(hf_config).__module__.startswith("transformers_modules")
    try:
        with torch.device("meta"), no_init_weights():
            return auto.from_config(hf_config, trust_remote_code=remote)
    except Exception as exc:  # noqa: BLE001
        raise VpgtransError(f"model_type '{hf_config.model_type}' is not a causal or seq2seq LM "
                            f"transformers can build ({first_line(exc)})") from None


def embedding_param_name(hf_config) -> str:
    """The parameter name of an LLM's input-embedding table, found by building the model on the meta
    device from its config and asking it — no guessing from names, works for any HF architecture."""
    model = meta_model(hf_config)
    embeddings = model.get_input_embeddings()
    if embeddings is None or not hasattr(embeddings, "weight"):
        raise VpgtransError(f"model_type '{hf_config.model_type}' has no input-embedding table")
    # The module's own name, not the parameter's: a tied lm_head shares the same tensor.
    name = next(n for n, m in model.named_modules() if m is embeddings)
    return f"{name}.weight"


def read_input_embeddings(model_dir: Path, hf_config=None, prefix: str = "", as_float: bool = True):
    """The (vocab, hidden) input-embedding table of an LLM, read alone from its directory: float32, or
    in its stored dtype when not ``as_float`` (half the memory of a bf16 table; the converter fit reads
    it in float32 blocks).

    ``hf_config`` is the LLM's config (read from ``model_dir`` when omitted); ``prefix`` is where the
    LLM sits inside a composite checkpoint (``"language_model."`` in a BLIP-2 directory).
    """
    if hf_config is None:
        from transformers import AutoConfig

        try:
            hf_config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
        except Exception as exc:  # noqa: BLE001
            raise VpgtransError(f"{model_dir}: cannot read the model config ({first_line(exc)})") from None
    name = embedding_param_name(hf_config)
    stored = weight_files(model_dir)
    # Checkpoints are saved with or without the base-model prefix ("model.decoder.embed_tokens" vs
    # "decoder.embed_tokens"); T5 ties "shared" with the encoder's embed_tokens.
    candidates = [name, name.split(".", 1)[-1], "shared.weight", "encoder.embed_tokens.weight"]
    for candidate in candidates:
        if prefix + candidate in stored:
            table = read_tensors(model_dir, [prefix + candidate])[prefix + candidate]
            return table.float() if as_float else table
    raise VpgtransError(f"{model_dir}: input embeddings '{prefix}{name}' not found among the stored tensors")
