"""Atomic, durable writes: a temp file (or directory) next to the target, fsync, rename, fsync the parent.

A reader — or a run restarted after ``kill -9`` or a power cut — sees the old file or the new one,
never half of one. Leftovers of an interrupted write are hidden siblings named ``.NAME.*.tmp`` (files)
or ``.NAME.tmp-*`` (directories); nothing reads them and they can be deleted.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's contents and metadata to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories; the data files were synced
        if not os.path.isdir(path):
            raise
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (files first, then their directories)."""
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                fsync_path(Path(path))
        fsync_path(Path(dirpath))


def umask() -> int:
    """The process's file-mode creation mask (read from /proc on Linux: setting it to learn it is not
    thread-safe)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


def honour_umask(path: Path, directory: bool = False) -> None:
    """Give a file or directory made through ``tempfile`` (0600 / 0700, private by design) the mode an
    ordinary ``open`` / ``mkdir`` would have given it: 0666 / 0777 without the umask's bits."""
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


def honour_umask_tree(root: Path) -> None:
    """``honour_umask`` for a directory output and everything in it: safetensors (and so transformers'
    ``save_pretrained``) creates its files 0600, and ``tempfile`` the directory 0700."""
    for dirpath, _dirnames, filenames in os.walk(root):
        honour_umask(Path(dirpath), directory=True)
        for name in filenames:
            if not os.path.islink(os.path.join(dirpath, name)):
                honour_umask(Path(dirpath) / name)


def atomic_write(path: Path, write) -> Path:
    """Call ``write(temp_path)`` to produce the file, then fsync it and rename it to ``path``. The file gets
    the mode the umask gives new files (not tempfile's 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        honour_umask(Path(tmp))
        write(Path(tmp))
        fsync_path(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_path(path.parent)
    return path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_tensors(tensors: dict, path: Path) -> None:
    """Write ``tensors`` (moved to the CPU) as a safetensors file whose bytes depend only on them: the one
    metadata key transformers writes too (``format: pt``). safetensors stores metadata keys in a random
    order, so with more than one, identical weights would give files of different bytes and hashes."""
    from safetensors.torch import save_file

    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
    honour_umask(Path(path))  # safetensors creates its files 0600
