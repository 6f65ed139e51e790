"""Where data rows come from: every form a ``--data`` / ``--eval-data`` argument may take.

    form                            recognised by                               rows, and images relative to
    directory with one *.jsonl      a directory (none of the two below)         that file; the directory
    HF imagefolder                  DIR/metadata.jsonl or DIR/<split>/metadata.jsonl   metadata.jsonl, file_name as
                                                                                the image; metadata.jsonl's directory
    datasets.save_to_disk dir       dataset_info.json, state.json or            datasets.load_from_disk (a
                                    dataset_dict.json in the directory          DatasetDict: the split)
    .jsonl file                     a file named *.jsonl                        the file; its directory
    LAVIS annotation JSON           a file named *.json holding a JSON list     the list, ``answer`` read as
                                    of objects                                  ``answers``; LAVIS's layout
                                                                                (ann/../images), else the file's dir
    datasets name                   no such path; ``name``, ``owner/name``,     datasets.load_dataset(name, split)
                                    optionally ``:split`` (``owner/name:validation[:500]``), from the local HF cache
                                    (``HF_DATASETS_OFFLINE=1``: nothing is downloaded)

``--image-root`` replaces the directory relative image paths are read from (jsonl, imagefolder, LAVIS, and
string image columns of datasets). ``--data-columns ours=theirs,...`` renames the source's keys or columns
to ours (``caption=text,image=img``) before anything else is read. ``--data-split`` picks the split of an
imagefolder with split directories, of a ``DatasetDict`` directory and of a datasets name without ``:split``
(default ``train``).

This module finds the source and yields its raw rows; ``vpgtrans.data`` checks and cleans them.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from vpgtrans.errors import VpgtransError
from vpgtrans.formats.torchfile import first_line

MAX_LINE_BYTES = 1 << 20  # a jsonl line longer than this is a bad row, never parsed
MAX_JSON_BYTES = 2 << 30  # a LAVIS annotation file is parsed whole: refuse what cannot be one
DATASETS_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
IMAGEFOLDER_METADATA = "metadata.jsonl"
DEFAULT_SPLIT = "train"
# A datasets name: "name" or "owner/name", then an optional ":split" in datasets' split syntax ("validation[:10%]").
DATASET_NAME = re.compile(r"^(?P<name>[A-Za-z0-9][\w.-]{0,95}(?:/[A-Za-z0-9][\w.-]{0,95})?)"
                          r"(?::(?P<split>[\w.-]+(?:\[[\w%:+-]*\])?))?$")


@dataclass
class DataOptions:
    """How to read a data location: its image root, split and column renames (``ours: theirs``)."""

    image_root: Path | None = None
    split: str | None = None
    columns: dict = field(default_factory=dict)

    def is_default(self) -> bool:
        return self.image_root is None and self.split is None and not self.columns

    def to_dict(self) -> dict:
        return {"image_root": None if self.image_root is None else str(Path(self.image_root).resolve()),
                "split": self.split, "columns": dict(sorted(self.columns.items()))}


def parse_columns(spec: str | dict | None) -> dict:
    """``"caption=text,image=img"`` -> ``{"caption": "text", "image": "img"}`` (ours = the source's)."""
    if spec is None:
        return {}
    if isinstance(spec, dict):
        return dict(spec)
    columns = {}
    for item in spec.split(","):
        ours, sep, theirs = item.partition("=")
        if not item.strip():
            continue
        if not sep or not ours.strip() or not theirs.strip():
            raise VpgtransError(f"--data-columns takes OURS=THEIRS pairs, comma-separated, e.g. caption=text,image=img "
                                f"(got {item.strip()!r:.60})")
        columns[ours.strip()] = theirs.strip()
    theirs = list(columns.values())
    if len(set(theirs)) != len(theirs):
        raise VpgtransError(f"--data-columns maps one column to two of ours ({spec!r:.80})")
    return columns


@dataclass
class DataSource:
    """A located data argument: ``kind`` (jsonl, imagefolder, lavis, datasets-dir, datasets-name), the file or
    directory (``path``) or dataset ``name``, the split, and where relative image paths start."""

    kind: str
    where: str  # how rows are named in problems ("data.jsonl", "coco_karpathy_train.json", "owner/name")
    path: Path | None = None
    name: str | None = None
    split: str | None = None
    image_root: Path | None = None


def regular_file(path) -> bool:
    """A regular file (links followed): never a FIFO or a device, which would block or never end when read."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):  # missing, a name over the system's limits, a NUL byte
        return False


def _lavis_image_root(annotation: Path) -> Path:
    """LAVIS stores ``<root>/coco/annotations/*.json`` beside ``<root>/coco/images/``: that, else the file's dir."""
    images = annotation.parent.parent / "images"
    return images if images.is_dir() else annotation.parent


def _jsonl_in(directory: Path, split: str | None) -> Path:
    files = sorted(directory.glob("*.jsonl"))
    if not files:  # an imagefolder with split directories: DIR/train/metadata.jsonl, DIR/validation/...
        splits = sorted(p.parent.name for p in directory.glob(f"*/{IMAGEFOLDER_METADATA}"))
        if splits:
            chosen = split or DEFAULT_SPLIT
            if chosen not in splits:
                raise VpgtransError(f"{directory}: an imagefolder without a {chosen!r} split (it has "
                                    f"{', '.join(splits)}); pass --data-split")
            return directory / chosen / IMAGEFOLDER_METADATA
    if len(files) != 1:
        found = ", ".join(f.name for f in files) or "none"
        raise VpgtransError(f"{directory}: expected exactly one *.jsonl file (found {found}), an imagefolder "
                            f"{IMAGEFOLDER_METADATA} or a datasets directory")
    return files[0]


def locate(location, options: DataOptions | None = None) -> DataSource:
    """What kind of data ``location`` (a path or a datasets name) is; one line when it is none of them."""
    options = options or DataOptions()
    text = os.fspath(location)
    path = Path(text)
    root = Path(options.image_root) if options.image_root is not None else None
    if root is not None and not root.is_dir():
        raise VpgtransError(f"--image-root {root}: no such directory")
    if path.is_dir():
        if any((path / marker).is_file() for marker in DATASETS_MARKERS):
            return DataSource("datasets-dir", path.name, path=path, split=options.split, image_root=root)
        file = _jsonl_in(path, options.split)
        kind = "imagefolder" if file.name == IMAGEFOLDER_METADATA else "jsonl"
        return DataSource(kind, file.name, path=file, image_root=root or file.parent)
    if path.exists() or path.is_symlink():
        if not regular_file(path):
            raise VpgtransError(f"{path}: not a regular file (a FIFO, a device or a link to one); give a .jsonl file")
        if path.suffix == ".jsonl":
            return DataSource("jsonl", path.name, path=path, image_root=root or path.parent)
        if path.suffix == ".json":
            return DataSource("lavis", path.name, path=path, image_root=root or _lavis_image_root(path))
        raise VpgtransError(f"{path}: not a data file (a .jsonl file, a LAVIS annotation .json, or a directory)")
    found = DATASET_NAME.match(text)
    if found is None:
        raise VpgtransError(f"{text}: no such data directory or file")
    split = found.group("split") or options.split or DEFAULT_SPLIT
    return DataSource("datasets-name", found.group("name"), name=found.group("name"), split=split, image_root=root)


# ------------------------------------------------------------------------------------------ raw rows

def read_lines(path: Path):
    """(line number, bytes) of each non-blank line; ``None`` for a line over ``MAX_LINE_BYTES``."""
    if not regular_file(path):
        raise VpgtransError(f"{path}: not a regular file (a FIFO, a device or a link to one); give a .jsonl file")
    with open(path, "rb") as fh:
        line_no = 0
        while True:
            line = fh.readline(MAX_LINE_BYTES + 1)
            if not line:
                return
            line_no += 1
            if len(line) > MAX_LINE_BYTES:
                while line and not line.endswith(b"\n"):  # drop the rest of the line unread
                    line = fh.readline(MAX_LINE_BYTES)
                yield line_no, None
            elif line.strip():
                yield line_no, line


def parse_line(line: bytes | None, first: bool) -> tuple[object, str | None]:
    """(JSON value, None) or (None, what is wrong)."""
    if line is None:
        return None, f"line longer than {MAX_LINE_BYTES} bytes"
    try:
        text = line.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as exc:
        return None, f"not valid UTF-8 (byte {exc.start})"
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly nested JSON
        return None, f"not valid JSON ({first_line(exc)})"
    if not isinstance(value, dict):
        return None, f"not a JSON object (a {type(value).__name__})"
    return value, None


def rename(row: dict, columns: dict) -> dict:
    """``row`` with the source's keys renamed to ours (``columns``: ours -> theirs)."""
    if not columns:
        return row
    row = dict(row)
    for ours, theirs in columns.items():
        if theirs in row:
            row[ours] = row.pop(theirs)
    return row


def _lavis_list(path: Path) -> list:
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise VpgtransError(f"{path}: {size} bytes is over the {MAX_JSON_BYTES}-byte limit of a LAVIS annotation file; "
                            "split it, or write it as .jsonl")
    try:
        value = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise VpgtransError(f"{path}: not valid UTF-8 (byte {exc.start})") from None
    except (ValueError, RecursionError) as exc:
        raise VpgtransError(f"{path}: not valid JSON ({first_line(exc)})") from None
    if isinstance(value, dict) and isinstance(value.get("annotations"), list):
        how = "vqav2" if "question_id" in str(value["annotations"][:1]) else "coco-captions"
        raise VpgtransError(f"{path}: an official COCO/VQA annotation file, not a LAVIS list of rows; convert it with "
                            f"vpgtrans data convert {how} (docs/data.md)")
    if not isinstance(value, list):
        raise VpgtransError(f"{path}: not a LAVIS annotation file (a JSON list of row objects; this holds a "
                            f"{type(value).__name__})")
    return value


def raw_rows(source: DataSource, columns: dict):
    """``(where, row, problem)`` for each row of a jsonl, imagefolder or LAVIS source: ``row`` a dict with
    the source's keys renamed to ours, or ``problem`` saying why the line is no row."""
    if source.kind == "lavis":
        for index, value in enumerate(_lavis_list(source.path)):
            where = f"{source.where}[{index}]"
            if not isinstance(value, dict):
                yield where, None, f"not a JSON object (a {type(value).__name__})"
                continue
            row = rename(value, columns)
            if "answers" not in row and "answer" in row and "question" in row:  # LAVIS's VQA key
                row["answers"] = row.pop("answer")
            yield where, row, None
        return
    try:
        for line_no, line in read_lines(source.path):
            value, problem = parse_line(line, first=line_no == 1)
            where = f"{source.where}:{line_no}"
            if problem:
                yield where, None, problem
                continue
            row = rename(value, columns)
            if source.kind == "imagefolder" and "image" not in row and "file_name" in row:
                row["image"] = row.pop("file_name")
            yield where, row, None
    except OSError as exc:
        raise VpgtransError(f"{source.path}: cannot read ({exc.strerror or exc})") from None


def load_dataset(source: DataSource, columns: dict):
    """The ``datasets.Dataset`` of a datasets directory or name, the source's columns renamed to ours."""
    import datasets

    if source.kind == "datasets-dir":
        try:
            dataset = datasets.load_from_disk(str(source.path))
        except Exception as exc:  # noqa: BLE001 - whatever datasets raises for a damaged directory
            raise VpgtransError(f"{source.path}: not a readable datasets directory ({first_line(exc)})") from None
        if isinstance(dataset, datasets.DatasetDict):
            if source.split is not None and source.split not in dataset:
                raise VpgtransError(f"{source.path}: no split {source.split!r} (it has {', '.join(dataset)}); "
                                    "pass --data-split")
            split = source.split or (DEFAULT_SPLIT if DEFAULT_SPLIT in dataset else next(iter(dataset)))
            dataset = dataset[split]
    else:
        dataset = _cached_dataset(source.name, source.split)
    renames = {theirs: ours for ours, theirs in columns.items() if theirs in dataset.column_names}
    clash = [ours for theirs, ours in renames.items() if ours in dataset.column_names and ours not in renames]
    if clash:
        raise VpgtransError(f"{source.where}: --data-columns renames onto {', '.join(clash)}, which the dataset already "
                            "has; map that column too, or drop it")
    return dataset.rename_columns(renames) if renames else dataset


def _cached_dataset(name: str, split: str):
    """``datasets.load_dataset(name, split=split)``: from the local HF datasets cache when offline."""
    import datasets

    offline = bool(datasets.config.HF_HUB_OFFLINE)
    try:
        dataset = datasets.load_dataset(name, split=split)
    except (ValueError, KeyError) as exc:  # an unknown split, a bad split expression
        raise VpgtransError(f"{name}: cannot read split {split!r} ({first_line(exc)}); pass --data-split or "
                            f"{name}:SPLIT") from None
    except Exception as exc:  # noqa: BLE001 - not cached / not on the Hub / no network: one line
        cache = datasets.config.HF_DATASETS_CACHE
        raise VpgtransError(f"{name}: no such data directory or file, nor a dataset in the local HF datasets cache "
                            f"({cache}{'; HF_DATASETS_OFFLINE is set, nothing is downloaded' if offline else ''}: "
                            f"{type(exc).__name__})") from None
    if not isinstance(dataset, datasets.Dataset):
        raise VpgtransError(f"{name}: split {split!r} is not one table (got {type(dataset).__name__})")
    return dataset


# ------------------------------------------------------------------------------------------ fingerprint

def source_files(source: DataSource, dataset=None) -> list[Path]:
    """The files a source's rows come from (images excepted): what ``data_fingerprint`` hashes."""
    if source.kind in ("jsonl", "imagefolder", "lavis"):
        return [source.path]
    if source.kind == "datasets-dir":
        return sorted(p for p in source.path.rglob("*") if p.suffix in (".arrow", ".json") and regular_file(p))
    return sorted({Path(entry["filename"]) for entry in dataset.cache_files})
