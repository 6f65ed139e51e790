"""The bundle: the directory one stage hands to the next.

A bundle stores only what was trained, as safetensors, plus ``manifest.json``::

    manifest.json          format, toolkit version, stage, config, parent, references, the model spec
                           (``vpgtrans.model.spec``), template, file hashes, metrics, eval curve, data stats
    <part>.safetensors     one file per trainable part of the parts table (``vpgtrans.model.parts``); the
                           qformer visual kind: vpg.safetensors (ln_vision.*, query_tokens, qformer.*) and
                           connector.safetensors (proj.weight, proj.bias); an adapter: its weights under
                           their wrapper's path in the LLM
    converter.safetensors  (inherit only, when fitted) weight (D_t, D_s), bias (D_t,)

Format 2 describes the model as ``model.visual`` + ``model.adapters``; format-1 bundles (``model.vpg`` +
``model.connector``) still load, as the qformer kind without adapters.

The frozen vision encoder and LLM are referenced by path plus a content fingerprint. Bundles are
written to a temporary sibling directory, fsync'ed and renamed into place: a reader never sees half a
bundle (``vpgtrans.outputs`` says what ``--force`` may replace). ``validate_bundle`` checks the
manifest's structure, the file hashes and the references, and names every problem at once.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from vpgtrans import __version__
from vpgtrans.errors import VpgtransError
from vpgtrans.io import save_tensors
from vpgtrans.outputs import commit_out_dir, output_errors, prepare_out_dir

log = logging.getLogger(__name__)

FORMAT = "vpgtrans-bundle"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
VPG_FILE = "vpg.safetensors"
CONNECTOR_FILE = "connector.safetensors"
CONVERTER_FILE = "converter.safetensors"
REQUIRED_KEYS = ("format", "format_version", "vpgtrans_version", "stage", "model", "references", "template", "files")
_KEY_TYPES = {"format_version": int, "stage": str, "model": dict, "references": dict, "template": dict, "files": dict}

_REFERENCE_SCHEMA = {"vision": {"path": str, "kind": str}, "llm": {"path": str}}

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
    return fingerprint_files(files)


def fingerprint_files(files: list[Path]) -> str:
    """``fingerprint`` of a list of files (names, sizes, contents as described there)."""
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


def write_bundle(out_dir: Path, *, stage: str, tensors: dict[str, dict], model: dict, references: dict,
                 template: dict, config: dict, parent: Path | None = None, metrics: dict | None = None,
                 curve: list | None = None, data: dict | None = None, force: bool = False) -> Path:
    """Write a complete bundle. ``tensors`` maps file name -> {tensor name: tensor}."""
    if not stage.replace("-", "_").isidentifier():
        raise ValueError(f"a stage name is a plain word (got {stage!r})")
    inputs = [parent] + [ref.get("path") for ref in references.values() if isinstance(ref, dict)]
    # Each reference also records its path relative to this bundle: a bundle moved with its models resolves.
    references = {role: {**ref, "relative_path": os.path.relpath(Path(ref["path"]).resolve(), Path(out_dir).resolve())}
                  if isinstance(ref, dict) and isinstance(ref.get("path"), str) else ref
                  for role, ref in references.items()}
    tmp = prepare_out_dir(out_dir, force, inputs=inputs)
    try:
        with output_errors(out_dir, tmp):
            hashes = {}
            for file_name, state in tensors.items():
                save_tensors(state, tmp / file_name)  # same weights, same bytes (the stage is in the manifest)
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
    with output_errors(out_dir, tmp):
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
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise VpgtransError(f"{path}: not valid JSON ({str(exc).splitlines()[0]}); the bundle is damaged") from None
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
    from vpgtrans.references import locate_references

    return locate_references(manifest, bundle_dir)  # the frozen models where they are on this machine


def model_problems(manifest: dict) -> list[str]:
    """What in the manifest's ``model`` / ``references`` / ``template`` sections ``load_model`` could
    not build from (wrong or missing keys, an invalid prompt template); [] when nothing."""
    from vpgtrans.config import PromptTemplate, from_dict
    from vpgtrans.model.assemble import VISION_KINDS
    from vpgtrans.model.spec import model_problems as spec_problems, schema_problems, upgrade

    problems = spec_problems(upgrade(manifest["model"]))
    problems += schema_problems(manifest["references"], _REFERENCE_SCHEMA, "references")
    vision = manifest["references"].get("vision")
    if isinstance(vision, dict) and isinstance(vision.get("kind"), str) and vision["kind"] not in VISION_KINDS:
        problems.append(f"references.vision.kind should be one of {', '.join(VISION_KINDS)} (is {vision['kind']!r:.40})")
    try:
        from_dict(PromptTemplate, manifest["template"], "template")
    except VpgtransError as exc:
        problems.append(str(exc))
    return problems


def part_files(manifest: dict) -> dict[str, str]:
    """``{part name: file}`` of the trainable parts the manifest's model has (``model_problems`` first)."""
    from vpgtrans.model.spec import part_names, upgrade

    return {name: f"{name}.safetensors" for name in part_names(upgrade(manifest["model"]))}


def validate_bundle(bundle_dir: Path, check_references: bool = True, check_model: bool = True) -> dict:
    """Check a bundle and report every problem at once; return its manifest.

    ``check_model``: the sections ``load_model`` builds from (``model_problems``); ``check_references``:
    the referenced vision encoder and LLM exist."""
    from vpgtrans.formats.hf import safetensors_header

    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    problems = model_problems(manifest) if check_model else []
    for file_name, expected in manifest["files"].items():
        path = bundle_dir / file_name
        if Path(file_name).name != file_name or not isinstance(expected, str):
            problems.append(f"manifest file entry {file_name!r} is not a plain file name with a hash")
        elif not path.is_file():
            problems.append(f"missing {file_name}")
        elif file_sha256(path) != expected:
            problems.append(f"{file_name} does not match its manifest hash (changed or corrupt)")
        elif file_name.endswith(".safetensors"):  # hash and file agree, but is it a sound safetensors file?
            try:
                safetensors_header(path)
            except VpgtransError as exc:
                problems.append(str(exc).replace(str(path), file_name, 1))
    for required in part_files(manifest).values():
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
    """The tensors of one bundle file; NaN / Inf in them (a damaged or tampered part) is one line naming them."""
    from safetensors.torch import load_file

    from vpgtrans.model.parts import check_finite

    path = Path(bundle_dir) / file_name
    try:
        state = load_file(str(path))
    except Exception as exc:  # noqa: BLE001
        raise VpgtransError(f"{path}: unreadable safetensors ({str(exc).splitlines()[0] if str(exc) else exc!r})") from None
    check_finite(state, str(path))
    return state


def load_model(bundle_dir, device=None, dtype=None, check_fingerprints: bool = False, vision_dtype=None,
               **llm_options):
    """Assemble the ``VisionLanguageModel`` of a bundle: trained parts from the bundle, frozen
    vision encoder and LLM from their references. Vision and LLM come back frozen; the whole model
    comes back in eval mode, on ``device`` (None: accelerate's device for this process, a GPU where
    there is one). ``vision_dtype``: the frozen ViT's torch dtype when not ``dtype``'s. ``llm_options`` (``quantization="8bit"|"4bit"``,
    ``gradient_checkpointing``, ``device_map="auto"``) go to ``vpgtrans.model.assemble.load_llm``."""
    from vpgtrans.model.assemble import assemble_model

    bundle_dir = Path(bundle_dir)
    manifest = validate_bundle(bundle_dir)
    check_references(bundle_dir, manifest)
    if check_fingerprints:
        for role in ("vision", "llm"):
            ref = manifest["references"][role]
            if ref.get("fingerprint") and fingerprint(Path(ref["path"])) != ref["fingerprint"]:
                raise VpgtransError(f"{bundle_dir}: referenced {role} at {ref['path']} changed since the bundle was made")
    states = {name: load_tensors(bundle_dir, file) for name, file in part_files(manifest).items()}
    with reference_errors(manifest):
        return assemble_model(manifest, states, device=device, dtype=dtype, vision_dtype=vision_dtype, **llm_options)


def check_references(bundle_dir: Path, manifest: dict) -> None:
    """Before the frozen parts are loaded: their configs and safetensors headers are sound, the LLM needs no
    code of its own unless the bundle was made with --trust-remote-code, and both models hold the tensors
    their configs imply with the shapes the bundle recorded (``vpgtrans.formats.frozen``, headers only)."""
    from vpgtrans.formats.frozen import check_frozen
    from vpgtrans.formats.hf import check_model_dir, require_trusted_code

    refs = manifest["references"]
    for role in ("vision", "llm"):
        check_model_dir(Path(refs[role]["path"]))
    llm_path, remote = Path(refs["llm"]["path"]), refs["llm"].get("trust_remote_code") is True
    require_trusted_code(llm_path, remote)
    if remote:
        log.warning("%s: the bundle was made with --trust-remote-code: the LLM's own code at %s runs again",
                    bundle_dir, llm_path)
    check_frozen(manifest)


def _refused_pickle(llm_path: str, exc) -> VpgtransError:
    from vpgtrans.formats.torchfile import refused_global

    what = f"they name {refused_global(exc)}, not only tensors" if refused_global(exc) else "corrupt pickle"
    return VpgtransError(f"{llm_path}: refused to unpickle the LLM weights ({what}); vpgtrans never executes "
                         "pickled code — convert them to safetensors in a trusted environment")


@contextlib.contextmanager
def reference_errors(manifest: dict):
    """Turn what transformers raises for a hostile or damaged referenced LLM into one-line errors."""
    import pickle

    from safetensors import SafetensorError

    from vpgtrans.formats.torchfile import first_line

    llm_path = manifest["references"]["llm"]["path"]
    try:
        yield
    except pickle.UnpicklingError as exc:  # transformers reads pytorch_model.bin with weights_only=True
        raise _refused_pickle(llm_path, exc) from None
    except SafetensorError as exc:
        raise VpgtransError(f"{llm_path}: a referenced safetensors file is unreadable ({first_line(exc)})") from None
