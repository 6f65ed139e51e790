"""The bundle: the directory one stage hands to the next.

A bundle stores only what was trained, as safetensors, plus ``manifest.json``::

    manifest.json          format, toolkit version, stage, config, parent, references, model dims,
                           template, file hashes, metrics, eval curve, data stats
    vpg.safetensors        ln_vision.*, query_tokens, qformer.*
    connector.safetensors  the connector's weights (linear: proj.weight, proj.bias)
    converter.safetensors  (inherit only, when fitted) weight (D_t, D_s), bias (D_t,)

The frozen vision encoder and LLM are referenced by path plus a content fingerprint. Bundles are
written to a temporary sibling directory and renamed into place: a reader never sees half a bundle.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
from pathlib import Path

from vpgtrans import __version__
from vpgtrans.errors import VpgtransError

FORMAT = "vpgtrans-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
VPG_FILE = "vpg.safetensors"
CONNECTOR_FILE = "connector.safetensors"
CONVERTER_FILE = "converter.safetensors"
STAGES = ("inherit", "warmup", "finetune", "scratch")
REQUIRED_KEYS = ("format", "format_version", "vpgtrans_version", "stage", "model", "references", "template", "files")
_KEY_TYPES = {"format_version": int, "stage": str, "model": dict, "references": dict, "template": dict, "files": dict}

_FULL_HASH_LIMIT = 256 * 2**20
_CHUNK = 2**20


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(path: Path) -> str:
    """A content fingerprint of a model file or directory (config + weights).

    Files up to 256 MiB are hashed whole; larger weight files are hashed by size, their first and
    last MiB (which hold the safetensors header and the end of the data) — enough to tell two
    checkpoints apart without reading 140 GB for a 70B LLM. ``vpgtrans inspect`` shows it.
    """
    path = Path(path)
    files = [path] if path.is_file() else sorted(
        p for p in path.iterdir() if p.is_file() and (p.suffix in (".safetensors", ".bin", ".pth", ".pt")
                                                      or p.name in ("config.json", "model.safetensors.index.json")))
    digest = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name}\0{size}\0".encode())
        if size <= _FULL_HASH_LIMIT:
            digest.update(bytes.fromhex(file_sha256(file)))
        else:
            with open(file, "rb") as fh:
                digest.update(fh.read(_CHUNK))
                fh.seek(size - _CHUNK)
                digest.update(fh.read(_CHUNK))
    return "sha256:" + digest.hexdigest()


def prepare_out_dir(out_dir: Path, force: bool) -> Path:
    """Refuse an existing ``out_dir`` unless ``force``; return the temporary directory to write into."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise VpgtransError(f"{out_dir}: already exists; choose a new --out or pass --force to replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise VpgtransError(f"{out_dir}: exists and is not a directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def commit_out_dir(tmp: Path, out_dir: Path) -> Path:
    """Move a finished temporary directory into place (replacing an old ``out_dir`` only now)."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out_dir)
    return out_dir


def write_bundle(out_dir: Path, *, stage: str, tensors: dict[str, dict], model: dict, references: dict,
                 template: dict, config: dict, parent: Path | None = None, metrics: dict | None = None,
                 curve: list | None = None, data: dict | None = None, force: bool = False) -> Path:
    """Write a complete bundle. ``tensors`` maps file name -> {tensor name: tensor}."""
    from safetensors.torch import save_file

    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage}")
    tmp = prepare_out_dir(out_dir, force)
    try:
        hashes = {}
        for file_name, state in tensors.items():
            state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
            save_file(state, str(tmp / file_name), metadata={"format": "pt", "vpgtrans_stage": stage})
            hashes[file_name] = file_sha256(tmp / file_name)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "vpgtrans_version": __version__,
            "stage": stage,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "parent": None if parent is None else {
                "path": str(Path(parent).resolve()),
                "manifest_sha256": file_sha256(Path(parent) / MANIFEST)},
            "references": references,
            "model": model,
            "template": template,
            "config": config,
            "files": hashes,
            "metrics": metrics or {},
            "curve": curve or [],
            "data": data or {},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return commit_out_dir(tmp, out_dir)


def read_manifest(bundle_dir: Path) -> dict:
    """The manifest of a bundle, checked for the keys every bundle has."""
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST
    if not bundle_dir.is_dir():
        raise VpgtransError(f"{bundle_dir}: bundle directory not found")
    if not path.is_file():
        raise VpgtransError(f"{bundle_dir}: no {MANIFEST} — not a vpgtrans bundle")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise VpgtransError(f"{path}: not valid JSON ({exc}); the bundle is damaged") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise VpgtransError(f"{path}: not a vpgtrans bundle manifest (format != {FORMAT!r})")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise VpgtransError(f"{path}: manifest lacks {', '.join(missing)}; the bundle is damaged")
    wrong_types = [f"{key} should be {kind.__name__}" for key, kind in _KEY_TYPES.items()
                   if not isinstance(manifest[key], kind) or isinstance(manifest[key], bool)]
    if wrong_types:
        raise VpgtransError(f"{path}: manifest is damaged: {'; '.join(wrong_types)}")
    if manifest["format_version"] > FORMAT_VERSION:
        raise VpgtransError(f"{path}: bundle format {manifest['format_version']} is newer than this vpgtrans "
                            f"({__version__}) reads; upgrade vpgtrans")
    return manifest


def validate_bundle(bundle_dir: Path, check_references: bool = True) -> dict:
    """Check a bundle and report every problem at once; return its manifest."""
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    problems = []
    for file_name, expected in manifest["files"].items():
        path = bundle_dir / file_name
        if Path(file_name).name != file_name or not isinstance(expected, str):
            problems.append(f"manifest file entry {file_name!r} is not a plain file name with a hash")
        elif not path.is_file():
            problems.append(f"missing {file_name}")
        elif file_sha256(path) != expected:
            problems.append(f"{file_name} does not match its manifest hash (changed or corrupt)")
    for required in (VPG_FILE, CONNECTOR_FILE):
        if required not in manifest["files"]:
            problems.append(f"manifest lists no {required}")
    if check_references:
        for role in ("vision", "llm"):
            ref = manifest["references"].get(role)
            ref_path = ref.get("path") if isinstance(ref, dict) else None
            if not isinstance(ref_path, str) or not ref_path or not Path(ref_path).exists():
                problems.append(f"referenced {role} not found: {ref_path!r}; move it back or re-run inherit")
    if problems:
        raise VpgtransError(f"{bundle_dir}: invalid bundle: " + "; ".join(problems))
    return manifest


def load_tensors(bundle_dir: Path, file_name: str) -> dict:
    from safetensors.torch import load_file

    path = Path(bundle_dir) / file_name
    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001
        raise VpgtransError(f"{path}: unreadable safetensors ({exc})") from None


def load_model(bundle_dir, device: str = "cpu", dtype=None, check_fingerprints: bool = False, **llm_options):
    """Assemble the ``VisionLanguageModel`` of a bundle: trained parts from the bundle, frozen
    vision encoder and LLM from their references. Vision and LLM come back frozen; the whole model
    comes back in eval mode. ``llm_options`` (``quantization="8bit"|"4bit"``,
    ``gradient_checkpointing``) go to ``vpgtrans.model.assemble.load_llm``."""
    from vpgtrans.model.assemble import assemble_model

    bundle_dir = Path(bundle_dir)
    manifest = validate_bundle(bundle_dir)
    if check_fingerprints:
        for role in ("vision", "llm"):
            ref = manifest["references"][role]
            if ref.get("fingerprint") and fingerprint(Path(ref["path"])) != ref["fingerprint"]:
                raise VpgtransError(f"{bundle_dir}: referenced {role} at {ref['path']} changed since the bundle was made")
    vpg_state = load_tensors(bundle_dir, VPG_FILE)
    connector_state = load_tensors(bundle_dir, CONNECTOR_FILE)
    return assemble_model(manifest, vpg_state, connector_state, device=device, dtype=dtype, **llm_options)
