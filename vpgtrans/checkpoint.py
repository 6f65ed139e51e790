"""Training checkpoints: what ``--save-every N`` writes and ``--resume`` reads.

A checkpoint is a directory ``OUT/checkpoints/step-000120/`` holding everything an interrupted run
needs to continue as if it had never stopped::

    vpg.safetensors / connector.safetensors   the trained parts (fp32), as in a bundle
    optimizer.pt                              optimizer state (tensors and numbers only: read back
                                              with torch.load(weights_only=True), no pickle code runs)
    state.json                                step, data position (epoch, cursor), scheduler state,
                                              RNG states of every process, loss history, eval curve,
                                              metrics records, counters, and the run record it must match

It is written to a temporary sibling, every file and the directory fsync'ed, then renamed into
place: a run killed mid-save (even ``kill -9``) leaves the previous checkpoint intact, and a reader
never sees half a checkpoint. Only the last ``keep`` checkpoints are kept.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import torch

from vpgtrans.io import fsync_path, fsync_tree, save_tensors
from vpgtrans.outputs import output_errors
from vpgtrans.errors import VpgtransError

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.pt"
_NAME = re.compile(r"^step-(\d{6,})$")


def checkpoint_dir(out_dir: Path) -> Path:
    return Path(out_dir) / CHECKPOINTS


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints under ``out_dir``, oldest first (temporary directories are not listed)."""
    root = checkpoint_dir(out_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out_dir: Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def save_checkpoint(out_dir: Path, step: int, tensors: dict[str, dict], optimizer_state: dict, state: dict,
                    keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically; drop all but the newest ``keep``. Returns its path."""
    root = checkpoint_dir(out_dir)
    final = root / f"step-{step:06d}"
    with output_errors(final):
        root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    for stale in root.glob(".step-*.tmp-*"):  # left by a run killed mid-save (one run writes here at a time)
        shutil.rmtree(stale, ignore_errors=True)
    with output_errors(final):
        tmp.mkdir()
    try:
        with output_errors(final, tmp):
            for file_name, tensor_state in tensors.items():
                save_tensors(tensor_state, tmp / file_name)  # (the step is in state.json)
            torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
            (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step}) + "\n")
            fsync_tree(tmp)
            if final.exists():  # a re-run of the same step (after a resume): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_path(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(out_dir)[:-max(1, keep)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# What state.json must hold for a resume (key -> type); anything else is a damaged checkpoint.
_STATE_SCHEMA = {"record": dict, "step": int, "scheduler": dict, "position": dict, "losses": list, "curve": list,
                 "records": list, "skipped": list, "seconds": (int, float), "data_stats": dict, "rng": list,
                 "num_processes": int}


def damaged(path: Path, what: str) -> VpgtransError:
    """The one-line error for a checkpoint that cannot be resumed from, with what to do."""
    return VpgtransError(f"{path}: damaged checkpoint ({what}); delete this step directory to resume from the one "
                         "before it, or run with --force to start over")


def read_state(path: Path) -> dict:
    """A checkpoint's ``state.json``, checked: a JSON object with every key a resume reads, of its type."""
    path = Path(path)
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except FileNotFoundError:
        raise damaged(path, f"no {STATE_FILE}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise damaged(path, f"{STATE_FILE} is not valid JSON: {str(exc).splitlines()[0]}") from None
    if not isinstance(state, dict):
        raise damaged(path, f"{STATE_FILE} is not a JSON object")
    wrong = [f"{key} ({'missing' if key not in state else type(state[key]).__name__})"
             for key, kind in _STATE_SCHEMA.items()
             if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool)]
    position = state.get("position", {})
    if isinstance(position, dict) and not all(isinstance(position.get(k), int) and position[k] >= 0
                                              for k in ("epoch", "cursor")):
        wrong.append("position (epoch / cursor)")
    if isinstance(state.get("rng"), list) and (not state["rng"] or not all(isinstance(r, dict) for r in state["rng"])):
        wrong.append("rng (one state per process)")
    if wrong:
        raise damaged(path, f"{STATE_FILE} lacks or mistypes {', '.join(wrong)}")
    return state


def load_checkpoint(path: Path, tensor_files: list[str]) -> dict:
    """``{"tensors": {file: state}, "optimizer": state_dict, "state": dict}`` of a checkpoint."""
    from safetensors.torch import load_file

    path = Path(path)
    state = read_state(path)
    try:
        tensors = {name: load_file(str(path / name)) for name in tensor_files}
        optimizer = torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise VpgtransError(f"{path}: incomplete checkpoint ({Path(exc.filename or '?').name} missing)") from None
    except Exception as exc:  # noqa: BLE001 - a damaged file, or one torch refuses to unpickle safely
        raise VpgtransError(f"{path}: unreadable checkpoint ({str(exc).splitlines()[0]})") from None
    return {"tensors": tensors, "optimizer": optimizer, "state": state}


def check_optimizer_state(saved, optimizer, path: Path) -> None:
    """The saved optimizer state fits this run's optimizer: the same parameter groups, each moment shaped
    like its parameter (an optimizer file from another model or other trained parts would otherwise fail
    at the first step, or worse, not at all)."""
    if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict) or not isinstance(
            saved.get("param_groups"), list):
        raise damaged(path, f"{OPTIMIZER_FILE} is not an optimizer state")
    groups = [len(group.get("params", [])) if isinstance(group, dict) else -1 for group in saved["param_groups"]]
    ours = [len(group["params"]) for group in optimizer.param_groups]
    if groups != ours:
        raise damaged(path, f"{OPTIMIZER_FILE} holds parameter groups of sizes {groups}, this run trains {ours}: "
                            "it was saved by a run training other parts")
    params = [param for group in optimizer.param_groups for param in group["params"]]
    for index, entry in saved["state"].items():
        param = params[int(index)] if str(index).isdigit() and int(index) < len(params) else None
        if param is None or not isinstance(entry, dict):
            raise damaged(path, f"{OPTIMIZER_FILE} has state for a parameter this run does not have ({index})")
        for key, value in entry.items():
            if torch.is_tensor(value) and value.dim() > 0 and tuple(value.shape) != tuple(param.shape):
                raise damaged(path, f"{OPTIMIZER_FILE}: {key} of parameter {index} is {tuple(value.shape)}, the "
                                    f"parameter {tuple(param.shape)}")


def clear_checkpoints(out_dir: Path) -> None:
    shutil.rmtree(checkpoint_dir(out_dir), ignore_errors=True)


# --- RNG states as JSON ---------------------------------------------------------------------------

def rng_state() -> dict:
    """This process's RNG states (torch CPU and CUDA, Python, NumPy) as JSON-ready lists."""
    state = {"torch": torch.get_rng_state().tolist(), "python": _to_lists(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    try:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)]
    except ImportError:
        pass
    return state


def set_rng_state(state: dict, where: Path | None = None) -> None:
    """Restore what ``rng_state`` saved; a state that is not one (a damaged checkpoint) is one line."""
    try:
        _set_rng_state(state)
    except (KeyError, TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise damaged(where or Path("checkpoint"), f"its RNG state cannot be restored: {type(exc).__name__}") from None


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))


def _to_lists(value):
    return [_to_lists(v) for v in value] if isinstance(value, (tuple, list)) else value


def _to_tuples(value):
    return tuple(_to_tuples(v) for v in value) if isinstance(value, list) else value
