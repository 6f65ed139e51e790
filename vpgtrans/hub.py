"""The Hugging Face Hub side of an export: the model card written beside it, and ``--push-to-hub``.

The card is huggingface_hub's ``ModelCard`` (YAML front matter the Hub indexes, then text): the base
models and their licences (read from their own cards where they have one), the data each stage trained
on, the scores the bundle recorded, the stages with their settings, and how to load the export. Uploads go
through ``HfApi`` (token from ``HF_TOKEN`` or ``huggingface-cli login``); nothing here runs unless asked.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from vpgtrans import __version__
from vpgtrans.errors import VpgtransError

log = logging.getLogger(__name__)

MAX_LINEAGE = 20  # bundles followed up the parent chain for the card


def _licence(model_dir: str | None) -> str | None:
    """The ``license`` of a model directory's own card (README.md front matter), if it states one."""
    from huggingface_hub import ModelCard

    readme = Path(model_dir) / "README.md" if model_dir else None
    if readme is None or not readme.is_file():
        return None
    try:
        return ModelCard.load(readme).data.to_dict().get("license")
    except Exception:  # noqa: BLE001 - a malformed card only costs the licence line
        return None


def _lineage(bundle_dir: Path, manifest: dict) -> list[dict]:
    """The manifests from the inherit bundle to this one (as far as the parent chain still exists)."""
    chain, current, seen = [manifest], manifest, {str(Path(bundle_dir).resolve())}
    while isinstance(current.get("parent"), dict) and len(chain) < MAX_LINEAGE:
        parent = current["parent"].get("path")
        if not isinstance(parent, str) or parent in seen or not (Path(parent) / "manifest.json").is_file():
            break
        seen.add(parent)
        try:
            current = json.loads((Path(parent) / "manifest.json").read_text())
        except (OSError, json.JSONDecodeError):
            break
        chain.append(current)
    return chain[::-1]


def _stage_line(manifest: dict) -> str:
    config = manifest.get("config", {})
    train = config.get("train")
    if manifest.get("stage") == "inherit" or not isinstance(train, dict):
        converter = manifest.get("metrics", {}).get("converter", {})
        cosine = converter.get("heldout_cosine")
        return ("- **inherit**: the source's vision side; word converter: "
                + (f"{converter.get('pairs')} token pairs, held-out cosine {cosine:.3f}" if cosine is not None
                   else "none"))
    done = manifest.get("metrics", {}).get("train", {})
    data = config.get("data")
    return (f"- **{manifest['stage']}**: trains {', '.join(train.get('trainable', []))}; lr {train.get('lr')}"
            + (f" cosine to {train['min_lr']}" if train.get("min_lr") is not None else " constant")
            + f"; {done.get('steps')} steps of {train.get('batch_size')} samples"
            + (f" on `{Path(data).name}`" if isinstance(data, str) else ""))


def model_card(bundle_dir: Path, manifest: dict, export_format: str, usage: str):
    """The export's ``huggingface_hub.ModelCard``."""
    from huggingface_hub import ModelCard, ModelCardData

    refs, model = manifest["references"], manifest["model"]
    bases = {role: refs[role] for role in ("source", "llm", "vision") if isinstance(refs.get(role), dict)}
    licences = {role: _licence(ref.get("path")) for role, ref in bases.items()}
    known = sorted({value for value in licences.values() if value})
    chain = _lineage(bundle_dir, manifest)
    datasets = sorted({Path(m["config"]["data"]).name for m in chain
                       if isinstance(m.get("config", {}).get("data"), str)})
    scores = manifest.get("metrics", {}).get("eval", {})
    data = ModelCardData(
        license=known[0] if len(known) == 1 else "other",
        base_model=sorted({ref.get("repo_id") or Path(ref["path"]).name for ref in bases.values() if ref.get("path")}),
        pipeline_tag="image-to-text", library_name="transformers" if export_format == "hf" else "vpgtrans",
        tags=["vpgtrans", "visual-prompt-generator", model["visual"]["type"]], datasets=datasets or None)
    licence_lines = "\n".join(f"- {role}: `{bases[role].get('path')}` — licence "
                              f"{licences[role] or 'not stated in its card: check it before you share this model'}"
                              for role in bases)
    score_lines = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in scores.items())
    text = f"""---
{data.to_yaml()}
---

# {Path(refs['llm']['path']).name} with vision, by vpgtrans

A `{model['visual']['type']}` visual side{' and adapters ' + ', '.join(a['type'] for a in model.get('adapters', []))
    if model.get('adapters') else ''} attached to `{Path(refs['llm']['path']).name}` by
[vpgtrans](https://github.com/) {__version__} (VPGTrans, Zhang et al. 2023), exported as `{export_format}`.

## Base models and their licences

{licence_lines}

This model is derived from them: their licences apply to it.

## How it was made

{chr(10).join(_stage_line(m) for m in chain)}

Evaluation recorded in the bundle: {score_lines or 'none'}.

## Use

{usage}
"""
    return ModelCard(text)


def _offline_error(repo_id: str, path: Path) -> VpgtransError:
    return VpgtransError(f"--push-to-hub {repo_id}: HF_HUB_OFFLINE is set; the export is written at {path}, "
                         "upload it later with huggingface-cli upload")


def push_to_hub(path: Path, repo_id: str, private: bool = False) -> str:
    """Upload an export (a directory, or a LAVIS ``.pth``) to a Hub model repository; returns the commit URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    from huggingface_hub import constants

    path = Path(path)
    if constants.HF_HUB_OFFLINE:
        raise _offline_error(repo_id, path)
    api = HfApi()
    message = f"Upload {path.name} (vpgtrans {__version__} export)"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if path.is_dir():
            info = api.upload_folder(folder_path=str(path), repo_id=repo_id, commit_message=message)
        else:
            info = api.upload_file(path_or_fileobj=str(path), path_in_repo=path.name, repo_id=repo_id,
                                   commit_message=message)
    except OfflineModeIsEnabled:
        raise _offline_error(repo_id, path) from None
    except HfHubHTTPError as exc:
        raise VpgtransError(f"--push-to-hub {repo_id}: the Hub refused the upload ({str(exc).splitlines()[0]}); "
                            f"the export is written at {path}") from None
    except Exception as exc:  # noqa: BLE001 - no route to the Hub, a proxy, a timeout: one line, the export kept
        raise VpgtransError(f"--push-to-hub {repo_id}: could not reach the Hub ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}); the export is written at {path}") from None
    url = getattr(info, "commit_url", None) or str(info)
    log.info("pushed %s to %s", path, url)
    return url
