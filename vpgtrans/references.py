"""Where the frozen models are: local paths or Hugging Face Hub ids, and references that move with a bundle.

A model argument (``--source``, ``--target-llm``, ``--vision``, ``--source-llm``) is a local path when one
exists, else a Hub id (``owner/name``, ``--revision`` optional) resolved through huggingface_hub's cache
(``HF_HOME`` / ``HF_HUB_CACHE`` honoured): found there when ``HF_HUB_OFFLINE=1``, downloaded otherwise.

A bundle's reference records the absolute path, the path relative to the bundle, and for Hub models
``repo_id`` + the commit ``revision``. Reading a bundle resolves each reference in that order, so a bundle
copied together with its models, or to a machine whose HF cache holds the same commit, still loads.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from vpgtrans.errors import VpgtransError

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
# What vpgtrans reads of a model repository (weights in safetensors or .bin, configs, tokenizers, processors).
MODEL_FILES = ["*.json", "*.safetensors", "*.bin", "*.model", "*.txt", "*.tiktoken", "README.md"]


def is_repo_id(name) -> bool:
    return bool(REPO_ID.match(str(name))) and not Path(name).exists()


def resolve_model(name, revision: str | None = None, what: str = "model") -> tuple[Path, dict]:
    """``(local directory or file, {"repo_id", "revision"} or {})`` for a path or a Hub id; a Hub id may name
    its revision (branch, tag or commit) as ``owner/name@revision``."""
    path = Path(name)
    if revision is None and "@" in str(name) and not path.exists():
        name, revision = str(name).rsplit("@", 1)
        path = Path(name)
    if path.exists() or not is_repo_id(name):
        if revision is not None:
            raise VpgtransError(f"{name}: --revision applies to Hub ids, and this is a local path")
        return path, {}
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    offline = bool(constants.HF_HUB_OFFLINE)
    try:
        local = snapshot_download(str(name), revision=revision, allow_patterns=MODEL_FILES, local_files_only=offline)
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise VpgtransError(f"{name}: no such {what} on the Hub{f' at revision {revision}' if revision else ''} "
                            f"({type(exc).__name__}); a local path must exist") from None
    except LocalEntryNotFoundError:
        where = constants.HF_HUB_CACHE
        raise VpgtransError(f"{name}: not a local path, and not in the Hugging Face cache ({where})"
                            + ("; HF_HUB_OFFLINE is set, so nothing is downloaded" if offline else "")) from None
    except (HfHubHTTPError, OSError) as exc:
        raise VpgtransError(f"{name}: cannot fetch it from the Hub ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    local = Path(local)
    return local, {"repo_id": str(name), "revision": local.name}  # a snapshot directory is named by its commit


def reference(path: Path, hub: dict, bundle_dir: Path) -> dict:
    """The portable part of a bundle's reference to ``path``: absolute, relative to the bundle, and the Hub
    id and commit when it came from the Hub."""
    path = Path(path).resolve()
    return {"path": str(path), "relative_path": os.path.relpath(path, Path(bundle_dir).resolve()), **hub}


def locate(ref: dict, bundle_dir: Path) -> str | None:
    """The existing path a reference points at, trying its absolute path, its path relative to the bundle,
    then the HF cache for its ``repo_id`` at its ``revision`` (never downloading); None when none exists."""
    path = ref.get("path")
    if isinstance(path, str) and path and Path(path).exists():
        return path
    relative = ref.get("relative_path")
    if isinstance(relative, str) and relative and (Path(bundle_dir) / relative).exists():
        return str((Path(bundle_dir) / relative).resolve())
    repo_id, revision = ref.get("repo_id"), ref.get("revision")
    if isinstance(repo_id, str) and isinstance(revision, str):
        from huggingface_hub import snapshot_download

        try:
            return snapshot_download(repo_id, revision=revision, allow_patterns=MODEL_FILES, local_files_only=True)
        except Exception:  # noqa: BLE001 - not in this machine's cache: reported as not found by the caller
            return None
    return None


def locate_references(manifest: dict, bundle_dir: Path) -> dict:
    """The manifest with each reference's ``path`` replaced by where it is found on this machine (unchanged
    where it is not found: validation then names it)."""
    references = {}
    for role, ref in manifest.get("references", {}).items():
        # (a reference without a path string is a damaged manifest: validation names it, nothing is guessed)
        found = locate(ref, bundle_dir) if isinstance(ref, dict) and isinstance(ref.get("path"), str) and ref["path"] else None
        references[role] = {**ref, "path": found} if found and found != ref.get("path") else ref
    return {**manifest, "references": references}
