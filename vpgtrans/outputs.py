"""Where a command may write, and how it replaces what is there.

Every output (a bundle, an HF export, a LAVIS ``.pth``, an eval report) is written next to its final
path under a hidden temporary name, fsync'ed, and renamed into place. ``--force`` replaces an existing
output only when all of these hold — otherwise the command refuses before writing anything:

- it is not a symbolic link (a link is never followed to, nor replaced by, an output);
- it is not the filesystem root, the current directory or one of its parents;
- it is not an input of the command, does not contain one, and is not inside one
  (stages never modify their input);
- a directory output replaces only an empty directory or one vpgtrans wrote: a bundle
  (``manifest.json`` of format ``vpgtrans-bundle``), an HF export (``vpgtrans_export.json``), the
  checkpoints of a training run, a ``transfer`` run directory of those, or a converted data directory
  (``data.jsonl`` + ``vpgtrans_data.json``, nothing else); a file output replaces only a file.

So ``--force`` deletes nothing but a previous vpgtrans output at exactly the ``--out`` path.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from vpgtrans.errors import VpgtransError
from vpgtrans.io import fsync_path, fsync_tree, honour_umask_tree

BUNDLE_FORMAT = "vpgtrans-bundle"
EXPORT_INFO = "vpgtrans_export.json"
DATA_INFO = "vpgtrans_data.json"  # beside the data.jsonl that ``vpgtrans data convert`` writes
RUN_ENTRIES = {"checkpoints", "metrics.jsonl", "logs"}  # what a training run writes under --out before its bundle
# Hidden leftovers of vpgtrans's own interrupted writes (.NAME.tmp-*, .NAME.old-*, .NAME.logs-aside).
_LEFTOVER = re.compile(r"^\.[^/]+\.(tmp-[^/]*|old-[^/]*|logs-aside)$")
TRANSFER_ENTRIES = {"inherit", "warmup", "finetune", "scratch", "transfer.json"}  # a transfer run: one dir per stage


def _transfer_entries() -> set[str]:
    """``TRANSFER_ENTRIES`` and the stage directories of every recipe (infmllm's align / multitask / instruct, ...)."""
    from vpgtrans.recipes import RECIPES

    return TRANSFER_ENTRIES | {stage.name for stages in RECIPES.values() for stage in stages}


def _absolute(path: Path) -> Path:
    return Path(os.path.abspath(path))


def _related(out: Path, other: Path) -> str | None:
    """How ``out`` relates to an input path, lexically or after resolving links; None if unrelated."""
    for a, b in ((_absolute(out), _absolute(other)), (out.resolve(), other.resolve())):
        if a == b:
            return "is"
        if a in b.parents:
            return "contains"
        if b in a.parents:
            return "inside"
    return None


def vpgtrans_output_kind(path: Path) -> str | None:
    """What vpgtrans wrote at a directory ``path`` (``bundle``, ``export``, ``run``, ``transfer``, ``data``, ``empty``),
    else None."""
    try:
        entries = {p.name for p in path.iterdir() if not _LEFTOVER.match(p.name)}
    except OSError:
        return None
    if not entries:
        return "empty"
    manifest = path / "manifest.json"
    if manifest.is_file():
        try:
            if json.loads(manifest.read_text()).get("format") == BUNDLE_FORMAT:
                return "bundle"
        except (ValueError, UnicodeDecodeError, AttributeError, OSError):
            pass
    if (path / EXPORT_INFO).is_file():
        return "export"
    if entries == {"data.jsonl", DATA_INFO}:
        return "data"
    if entries <= RUN_ENTRIES and entries & {"checkpoints", "metrics.jsonl"}:
        return "run"
    if entries <= _transfer_entries() and all(vpgtrans_output_kind(path / name) for name in entries - {"transfer.json"}):
        return "transfer"
    return None


def check_out_dir(out: str | os.PathLike, force: bool, inputs=(), is_file: bool = False) -> Path:
    """Refuse an ``--out`` this command must not write (see the module docstring); return it."""
    out = Path(out)
    if out.is_symlink():
        raise VpgtransError(f"{out}: is a symbolic link; vpgtrans neither writes through nor replaces links — "
                            "give the real path, or remove the link")
    absolute = _absolute(out)
    if absolute.parent == absolute:
        raise VpgtransError(f"{out}: is the filesystem root; choose a new --out")
    cwd = Path.cwd()
    if absolute == cwd or absolute in cwd.parents:
        raise VpgtransError(f"{out}: is the current directory or one of its parents; choose a new --out")
    for path in inputs:
        if path is None or not Path(path).exists():
            continue
        relation = _related(out, Path(path))
        if relation == "is":
            raise VpgtransError(f"{out}: is an input of this command ({path}); inputs are never modified — "
                                "choose a new --out")
        if relation == "contains":
            raise VpgtransError(f"{out}: contains an input of this command ({path}); replacing it would delete that "
                                "input — choose a new --out")
        if relation == "inside":
            raise VpgtransError(f"{out}: is inside an input of this command ({path}); inputs are never modified — "
                                "choose a new --out")
    if not out.exists():
        return out
    if not force:
        raise exists_error(out)
    if is_file:
        if not out.is_file():
            raise VpgtransError(f"{out}: exists and is not a file; --force replaces only a file here")
        return out
    if not out.is_dir():
        raise VpgtransError(f"{out}: exists and is not a directory; --force does not replace it")
    if vpgtrans_output_kind(out) is None:
        shown = sorted(p.name for p in out.iterdir())
        more = f", ... ({len(shown)} entries)" if len(shown) > 3 else ""
        raise VpgtransError(f"{out}: is not a vpgtrans output (it holds {', '.join(shown[:3])}{more}); --force "
                            "replaces only vpgtrans bundles, exports and run checkpoints — delete it yourself or "
                            "choose a new --out")
    return out


def prepare_out_dir(out_dir: Path, force: bool, inputs=()) -> Path:
    """Check ``out_dir`` (``check_out_dir``); return a new hidden temporary directory beside it to write into."""
    out_dir = check_out_dir(out_dir, force, inputs)
    parent = _absolute(out_dir).parent
    with output_errors(out_dir):
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=parent, prefix=f".{out_dir.name}.tmp-"))


# What a write can fail with that is the output's fault: a read-only or full file system (or quota), no
# permission, a name or file too large.
WRITE_ERRNOS = {errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.ENAMETOOLONG, errno.EFBIG}


def write_error(exc: BaseException) -> str | None:
    """What went wrong on the output side, in a few words, when ``exc`` is a failed write (a read-only or
    full file system, no permission, a name too long — also as safetensors reports them); else None."""
    if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
        return exc.strerror or os.strerror(exc.errno)
    text = str(exc)
    if type(exc).__name__ == "SafetensorError" and ("IoError" in text or "os error" in text.lower()):
        found = re.search(r"os error (\d+)|code: (\d+)", text)  # "I/O error: ... (os error 28)"
        code = int(found.group(1) or found.group(2)) if found else None
        return os.strerror(code) if code in WRITE_ERRNOS else None
    return None


@contextmanager
def output_lock(out: Path):
    """Hold an advisory lock on ``out`` (a hidden ``.NAME.lock`` file beside it, removed when released) for one
    writer: a second run on the same output is one line at once, instead of the two deleting each other's
    temporaries. Under torchrun / accelerate launch only the main process (``RANK`` 0) locks."""
    import fcntl

    if os.environ.get("RANK", "0") != "0":
        yield
        return
    lock = _absolute(Path(out)).parent / f".{Path(out).name}.lock"
    with output_errors(out):
        lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):  # the file a holder removes on release may be replaced under us: lock the one on disk
        with output_errors(out):
            handle = open(lock, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise VpgtransError(f"{out}: another vpgtrans run is writing it (lock {lock}); wait for that run to end, "
                                "or choose another --out") from None
        try:
            same = os.stat(lock).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        handle.close()
    else:
        raise VpgtransError(f"{out}: could not take its lock {lock} (another run keeps replacing it)")
    try:
        yield
    finally:
        try:
            lock.unlink()  # while still holding it: nobody locks a file that is being removed
        except FileNotFoundError:
            pass
        handle.close()


def check_writable(out: Path) -> None:
    """Before the work that produces ``out``: its directory can be created and written in (a read-only or full
    file system is one line now, not after an evaluation or a training step). Leaves nothing behind but the
    directory ``out`` goes in."""
    parent = _absolute(Path(out)).parent
    with output_errors(out):
        parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=parent, prefix=f".{Path(out).name}.probe-")
        os.close(fd)
        os.unlink(probe)


@contextmanager
def output_errors(out: Path, partial: Path | None = None):
    """Around writing an output: a failed write is one line naming ``out`` (never blamed on an input), and
    the ``partial`` output (a temporary directory or file) is removed."""
    try:
        yield
    except VpgtransError:
        raise
    except Exception as exc:  # noqa: BLE001 - only write failures are turned into a line; the rest re-raised
        reason = write_error(exc)
        if reason is None:
            raise
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True) if Path(partial).is_dir() else Path(partial).unlink(missing_ok=True)
        raise VpgtransError(f"{out}: cannot write ({reason}); nothing was written there") from None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def commit_out_dir(tmp: Path, out_dir: Path) -> Path:
    """Move a finished temporary directory into place. An old ``out_dir`` is swapped out atomically where
    the OS allows (Linux), so ``out_dir`` always holds a complete old or new output, and deleted after."""
    out_dir = Path(out_dir)
    honour_umask_tree(tmp)  # the modes an ordinary write gives, whichever library wrote the files
    fsync_tree(tmp)
    if out_dir.exists():
        if _exchange(tmp, out_dir):
            shutil.rmtree(tmp)  # now the old output
        else:
            old = Path(tempfile.mkdtemp(dir=_absolute(out_dir).parent, prefix=f".{out_dir.name}.old-"))
            os.replace(out_dir, old)  # replaces the empty placeholder
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
    else:
        os.replace(tmp, out_dir)
    fsync_path(_absolute(out_dir).parent)
    return out_dir


def exists_error(out: Path, resumable: bool = False) -> VpgtransError:
    """The one-line refusal of an existing output (``resumable``: a training output ``--resume`` continues)."""
    how = ("choose a new --out, pass --resume to continue it, or --force to replace it" if resumable
           else "choose a new --out or pass --force to replace it")
    return VpgtransError(f"{out}: already exists; {how}")
