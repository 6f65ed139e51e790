"""Reading Hugging Face model directories without materialising the model.

Weights are read tensor by tensor from safetensors (one tensor of a sharded 70B checkpoint costs only
that tensor); shapes come from the safetensors headers. ``pytorch_model.bin`` is read with
``weights_only=True``.
"""

from __future__ import annotations

import json
from pathlib import Path

from vpgtrans.errors import VpgtransError

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
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise VpgtransError(f"{path}: not valid JSON ({exc})") from None


def weight_files(model_dir: Path) -> dict[str, Path]:
    """Map tensor name -> file holding it, from the index or the single weight file."""
    model_dir = Path(model_dir)
    for index_name in (WEIGHT_INDEX, BIN_INDEX):
        index = model_dir / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise VpgtransError(f"{index}: unreadable weight index ({exc})") from None
            return {name: model_dir / file for name, file in weight_map.items()}
    single = model_dir / WEIGHT_FILE
    if single.is_file():
        return {name: single for name in safetensors_header(single)}
    binary = model_dir / BIN_FILE
    if binary.is_file():
        return {name: binary for name in _load_bin(binary)}
    raise VpgtransError(f"{model_dir}: no model.safetensors, sharded index or pytorch_model.bin found")


def safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file: name -> {dtype, shape, data_offsets}."""
    try:
        with open(path, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            if size <= 0 or size > 100_000_000 or size + 8 > path.stat().st_size:
                raise ValueError("bad header length")
            header = json.loads(fh.read(size))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise VpgtransError(f"{path}: not a readable safetensors file ({exc})") from None
    header.pop("__metadata__", None)
    return header


_BIN_CACHE: dict[Path, dict] = {}


def _load_bin(path: Path) -> dict:
    if path not in _BIN_CACHE:
        import torch

        try:
            _BIN_CACHE.clear()
            _BIN_CACHE[path] = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure is a user-facing refusal
            raise VpgtransError(f"{path}: refused or unreadable pickle ({type(exc).__name__}); "
                                "vpgtrans loads .bin files with weights_only=True only") from None
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
            try:
                with safe_open(str(file), framework="pt") as fh:
                    for name in file_names:
                        out[name] = fh.get_tensor(name)
            except Exception as exc:  # noqa: BLE001 - corrupt file
                raise VpgtransError(f"{file}: unreadable safetensors ({exc})") from None
        else:
            state = _load_bin(file)
            out.update({name: state[name] for name in file_names})
    if prefix and strip_prefix:
        out = {name[len(prefix):]: tensor for name, tensor in out.items()}
    return out


def embedding_param_name(hf_config) -> str:
    """The parameter name of an LLM's input-embedding table, found by building the model on the meta
    device from its config and asking it — no guessing from names, works for any HF architecture."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    auto = AutoModelForSeq2SeqLM if getattr(hf_config, "is_encoder_decoder", False) else AutoModelForCausalLM
    try:
        with torch.device("meta"):
            model = auto.from_config(hf_config)
    except Exception as exc:  # noqa: BLE001
        raise VpgtransError(f"model_type '{hf_config.model_type}' is not a causal or seq2seq LM "
                            f"transformers can build ({exc})") from None
    embeddings = model.get_input_embeddings()
    if embeddings is None or not hasattr(embeddings, "weight"):
        raise VpgtransError(f"model_type '{hf_config.model_type}' has no input-embedding table")
    # The module's own name, not the parameter's: a tied lm_head shares the same tensor.
    name = next(n for n, m in model.named_modules() if m is embeddings)
    return f"{name}.weight"


def read_input_embeddings(model_dir: Path, hf_config=None, prefix: str = ""):
    """The (vocab, hidden) float input-embedding table of an LLM, read alone from its directory.

    ``hf_config`` is the LLM's config (read from ``model_dir`` when omitted); ``prefix`` is where the
    LLM sits inside a composite checkpoint (``"language_model."`` in a BLIP-2 directory).
    """
    if hf_config is None:
        from transformers import AutoConfig

        try:
            hf_config = AutoConfig.from_pretrained(model_dir)
        except Exception as exc:  # noqa: BLE001
            raise VpgtransError(f"{model_dir}: cannot read the model config ({exc})") from None
    name = embedding_param_name(hf_config)
    stored = weight_files(model_dir)
    # Checkpoints are saved with or without the base-model prefix ("model.decoder.embed_tokens" vs
    # "decoder.embed_tokens"); T5 ties "shared" with the encoder's embed_tokens.
    candidates = [name, name.split(".", 1)[-1], "shared.weight", "encoder.embed_tokens.weight"]
    for candidate in candidates:
        if prefix + candidate in stored:
            return read_tensors(model_dir, [prefix + candidate])[prefix + candidate].float()
    raise VpgtransError(f"{model_dir}: input embeddings '{prefix}{name}' not found among the stored tensors")
