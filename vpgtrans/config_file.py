"""Run configuration files: ``--config run.yaml`` gives a command's options, ``--print-config`` prints them.

A config file is a YAML mapping from option names to values, the same options the command takes on the
command line (``max_steps`` or ``max-steps``; a positional argument by its name, e.g. ``bundle``). Options
given on the command line override the file. Relative paths in the file are relative to the file's own
directory, so a run directory can hold its config next to its data; a model option (``--source``, ...)
whose value is not a path there but reads as a Hub id (``owner/name[@revision]``) stays a Hub id, and
``--template`` keeps its built-in names.

The printed configuration lists every option of the command with its effective value, paths absolute, so
feeding it back through ``--config`` (from any directory) gives the same run.

This module knows nothing of the command-line framework: ``vpgtrans.cli_commands`` describes each command's
options as ``Setting`` rows and hands the values over.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path

from vpgtrans.errors import VpgtransError

# How a value is read from a file: a plain value, a flag (true / false), a path (relative to the file),
# a model (a path, else a Hub id), a template (a built-in name, else a JSON file).
KINDS = ("value", "flag", "path", "model", "template")


@dataclass(frozen=True)
class Setting:
    """One option of a command as a config file sees it."""

    key: str  # the name in the file: the long option without dashes, e.g. max_steps (or the argument's name)
    name: str  # the command's parameter that receives it, e.g. as_json for --json
    kind: str = "value"
    multiple: bool = False  # a repeatable option: a list in the file
    builtin: tuple[str, ...] = ()  # kind "template": the names that are not files


def _spelling(key: str) -> str:
    return key.replace("-", "_")


def read_config(path: Path, settings: list[Setting]) -> dict[str, object]:
    """The values ``path`` gives, by parameter name, with relative paths made absolute against the file's
    directory. Every problem is one ``VpgtransError`` naming the file and the key."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise VpgtransError(f"--config {path}: no such file") from None
    except IsADirectoryError:
        raise VpgtransError(f"--config {path}: a directory, not a YAML file") from None
    except UnicodeDecodeError:
        raise VpgtransError(f"{path}: not a text (UTF-8) YAML file") from None
    except OSError as exc:
        raise VpgtransError(f"--config {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.load(text, Loader=_unique_keys_loader())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise VpgtransError(f"{path}: not valid YAML ({problem}{where})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise VpgtransError(f"{path}: a config file is a mapping of option names to values (got a "
                            f"{type(data).__name__})")
    by_key = {setting.key: setting for setting in settings}
    values: dict[str, object] = {}
    seen: dict[str, str] = {}
    for raw_key, value in data.items():
        if not isinstance(raw_key, str):
            raise VpgtransError(f"{path}: key {raw_key!r} is not an option name")
        setting = by_key.get(_spelling(raw_key))
        if setting is None:
            close = difflib.get_close_matches(_spelling(raw_key), list(by_key), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else f" (keys: {', '.join(by_key)})"
            raise VpgtransError(f"{path}: unknown key {raw_key!r}{hint}")
        if setting.key in seen:
            raise VpgtransError(f"{path}: key {setting.key!r} is given twice ({seen[setting.key]!r} and {raw_key!r})")
        seen[setting.key] = raw_key
        values[setting.name] = _read_value(path, raw_key, setting, value)
    return values


def _unique_keys_loader():
    """PyYAML's safe loader, refusing a key given twice in one mapping (it would keep the last silently)."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                if isinstance(key_node, yaml.ScalarNode):
                    if key_node.value in seen:
                        raise yaml.constructor.ConstructorError(None, None, f"key {key_node.value!r} is given twice",
                                                                key_node.start_mark)
                    seen.add(key_node.value)
            return super().construct_mapping(node, deep=deep)

    return Loader


def _read_value(path: Path, raw_key: str, setting: Setting, value):
    """One value of the file, checked for its shape (the command line then checks its type and domain)."""
    where = f"{path}: key {raw_key!r}"
    if value is None:
        return None
    if isinstance(value, dict):
        raise VpgtransError(f"{where}: takes a value, not a mapping")
    if setting.multiple:
        items = value if isinstance(value, list) else [value]
        return [_read_scalar(path, where, setting, item) for item in items]
    if isinstance(value, list):
        raise VpgtransError(f"{where}: takes one value, not a list")
    return _read_scalar(path, where, setting, value)


def _read_scalar(path: Path, where: str, setting: Setting, value):
    if isinstance(value, (list, dict)):
        raise VpgtransError(f"{where}: a list inside the list is not a value")
    if setting.kind == "flag":
        if not isinstance(value, bool):
            raise VpgtransError(f"{where}: is a flag: true or false (got {value!r})")
        return value
    if setting.kind == "value":
        return value if isinstance(value, str) else _yaml_scalar_text(value)
    if not isinstance(value, str) or not value:
        raise VpgtransError(f"{where}: a path is a non-empty string (got {value!r})")
    return _resolve(Path(path).parent, value, setting)


def _yaml_scalar_text(value) -> str:
    """A YAML scalar as the command line would have received it (the option's own type then reads it:
    ``batch_size: 8`` and ``--batch-size 8`` are one thing, and so are their errors)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _resolve(base: Path, value: str, setting: Setting) -> str:
    """A path of the file made absolute against its directory; a model's Hub id and a built-in template
    name stay as they are."""
    if setting.kind == "template" and value in setting.builtin:
        return value
    candidate = Path(os.path.expanduser(value))
    if candidate.is_absolute():
        return str(candidate)
    joined = base / candidate
    if setting.kind == "model" and not joined.exists() and _is_hub_id(value):
        return value
    return _absolute(joined)


def _is_hub_id(value: str) -> bool:
    from vpgtrans.references import REPO_ID

    return bool(REPO_ID.match(value.rsplit("@", 1)[0]))


def _absolute(path) -> str:
    """An absolute, normalised path (``..`` folded, links kept: the user's spelling of where it is)."""
    return os.path.normpath(os.path.abspath(os.path.expanduser(str(path))))


def effective_config(values: dict[str, object], settings: list[Setting]) -> dict[str, object]:
    """What ``--print-config`` prints: every setting's value by key, in the command's order, paths absolute
    (against the current directory, where the command line's relative paths are), so that the result read
    back by ``read_config`` gives the same values from any directory."""
    config = {}
    for setting in settings:
        value = values.get(setting.name)
        if isinstance(value, tuple):
            value = list(value)
        if setting.kind in ("path", "model", "template") and value is not None:
            value = [_printable_path(item, setting) for item in value] if setting.multiple else \
                _printable_path(value, setting)
        elif isinstance(value, Path):
            value = str(value)
        config[setting.key] = value
    return config


def _printable_path(value, setting: Setting) -> str:
    text = str(value)
    if setting.kind == "template" and text in setting.builtin:
        return text
    if setting.kind == "model" and not Path(text).exists() and _is_hub_id(text):
        return text
    return _absolute(text)


def dump_config(config: dict[str, object], command: str) -> str:
    """``config`` as YAML under a comment naming the command (``yaml.safe_load`` reads it back as is)."""
    import yaml

    header = f"# vpgtrans {command}: effective configuration (vpgtrans {command} --config FILE)\n"
    return header + yaml.safe_dump(config, sort_keys=False, allow_unicode=True, default_flow_style=False)
