"""Pickled PyTorch files (``.pth``, ``.pt``, ``.ckpt``, ``pytorch_model.bin``): the one place vpgtrans
unpickles anything, always with ``torch.load(weights_only=True)``.

``weights_only`` unpickles tensors, plain containers and numbers only; a pickle that names any other
callable (``os.system``, ``pathlib.Path.touch``, a class with ``__reduce__``...) is refused before that
callable is looked up, so nothing in the file runs. The refusal becomes a one-line ``VpgtransError``.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

from vpgtrans.errors import VpgtransError


def load_weights_only(path: str | Path):
    """``torch.load(path, map_location="cpu", weights_only=True)`` with user-facing errors."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise VpgtransError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch reports a refused object as "Weights only load failed ... GLOBAL module.name ...".
        found = refused_global(exc)
        if found:
            raise VpgtransError(
                f"{path}: refused to unpickle {found} (it holds objects other than tensors and plain "
                "containers; vpgtrans never executes pickled code). Re-save it with "
                "torch.save({'model': state_dict}) from a trusted environment, or convert it to safetensors") from None
        raise VpgtransError(f"{path}: unreadable checkpoint — corrupt, truncated or not a PyTorch file "
                            f"({first_line(exc)})") from None
    except Exception as exc:  # noqa: BLE001 - zip/EOF/key errors from a damaged file are the user's to fix
        raise VpgtransError(f"{path}: unreadable checkpoint — corrupt, truncated or not a PyTorch file "
                            f"({type(exc).__name__}: {first_line(exc)})") from None


def refused_global(exc: BaseException) -> str | None:
    """The callable a refused pickle names (``"os.system"``), from torch's weights_only error; else None."""
    text = str(exc)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    return found.group(1) if "Weights only load failed" in text and found else None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
