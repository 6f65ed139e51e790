"""What is at a path: a vpgtrans bundle, an HF BLIP-2 / InstructBLIP / vision / LLM directory, or a
LAVIS ``.pth``. Decided from ``config.json`` / the manifest / the file suffix — never from substrings
of the path."""

from __future__ import annotations

from pathlib import Path

from vpgtrans.errors import VpgtransError
from vpgtrans.formats.hf import read_config, weight_files

BLIP2_TYPES = {"blip-2": "hf-blip2", "instructblip": "hf-instructblip"}
VISION_TYPES = {"blip_2_vision_model", "instructblip_vision_model"}
PTH_SUFFIXES = (".pth", ".pt", ".ckpt")


def detect_format(path: str | Path) -> str:
    """One of ``bundle``, ``hf-blip2``, ``hf-instructblip``, ``hf-vision``, ``hf-llm``, ``lavis-pth``."""
    path = Path(path)
    if not path.exists():
        raise VpgtransError(f"{path}: no such file or directory")
    if path.is_file():
        if path.suffix in PTH_SUFFIXES:
            return "lavis-pth"
        raise VpgtransError(f"{path}: unrecognised file (expected a LAVIS/VPGTrans .pth or a model directory)")
    if (path / "manifest.json").is_file():
        return "bundle"
    config_path = path / "config.json"
    if not config_path.is_file():
        raise VpgtransError(f"{path}: directory holds no config.json or manifest.json — not a model or bundle")
    config = read_config(path)
    model_type = config.get("model_type")
    if not model_type or not isinstance(model_type, str):
        raise VpgtransError(f"{config_path}: no model_type — not a Hugging Face model config")
    if model_type in BLIP2_TYPES:
        return BLIP2_TYPES[model_type]
    if model_type in VISION_TYPES:
        return "hf-vision"
    return "hf-llm"


def weight_names(path: Path) -> list[str]:
    return list(weight_files(path))
