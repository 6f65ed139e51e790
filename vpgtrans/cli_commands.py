"""The command classes behind ``vpgtrans``'s Typer app (imported by ``vpgtrans.cli`` only; no torch here).

- ``Group``: a usage error (unknown option, wrong type, a value outside an option's choices, a missing
  option) is one ``error: ...`` line and exit code 2, like the library's own errors, instead of a
  framed usage panel;
- ``Command``: a flag shows as a flag in ``--help`` (Typer's rich help prints ``--force <bool>``);
- ``ConfigCommand``: also ``--config FILE`` (a YAML file of the command's options, under the command line's
  own; see ``vpgtrans.config_file``) and ``--print-config`` (print the effective options as YAML, run nothing).
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import re
import typing
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperCommand, TyperGroup

from vpgtrans.config import TEMPLATES
from vpgtrans.config_file import Setting, dump_config, effective_config, read_config
from vpgtrans.errors import VpgtransError

CONFIG_FILE = "vpgtrans.config_file"  # ctx.meta: the --config file of this command
PRINT_CONFIG = "vpgtrans.print_config"  # ctx.meta: --print-config was given
MODEL_OPTIONS = ("source", "target_llm", "vision", "source_llm")  # also take Hub ids (vpgtrans.references)

# (config file, keys it set) of the command running: a library error about one of them names the file.
_FROM_FILE: contextvars.ContextVar[tuple[str, tuple[str, ...]] | None] = contextvars.ContextVar("from_file",
                                                                                                 default=None)


def one_line(message: str) -> str:
    """A message as one line: a newline inside a user's file name or key must not split it."""
    return message.replace("\r", "\\r").replace("\n", "\\n")


def config_note(message: str) -> str:
    """`` (KEY from FILE)`` when ``message`` names options the running command's config file set, else ''."""
    origin = _FROM_FILE.get()
    if origin is None:
        return ""
    path, keys = origin
    named = [key for key in keys
             if re.search(rf"(?<![\w-])(--)?({re.escape(key)}|{re.escape(key.replace('_', '-'))})(?![\w-])", message)]
    return f" ({', '.join(named)} from {path})" if named else ""


# --- one-line usage errors -----------------------------------------------------------------------------


def _usage_message(exc) -> str:
    """The one line for a usage error; a bad value the config file gave names the file and the key."""
    ctx, param = getattr(exc, "ctx", None), getattr(exc, "param", None)
    message = exc.format_message()
    problem = getattr(exc, "message", None)
    if ctx is not None and param is not None and param.name and problem:
        problem = problem.replace("Value error, ", "").rstrip(".")  # pydantic's prefix on Typer's choice errors
        choice = _choice_problem(ctx.command, param.name, problem)
        if _from_file(ctx, param.name):
            key = next((s.key for s in settings_of(ctx.command) if s.name == param.name), param.name)
            given = (ctx.default_map or {}).get(param.name)
            message = f"{ctx.meta[CONFIG_FILE]}: key {key!r}" + (f" {choice}" if choice else f": {problem} (got {given!r})")
        elif choice:
            message = f"{next((opt for opt in param.opts if opt.startswith('--')), param.name)} {choice}"
    message = message.rstrip(".")
    if ctx is not None:
        message += f" (see '{ctx.command_path} --help')"
    return one_line(message)


@contextlib.contextmanager
def _one_line_errors():
    try:
        yield
    except typer.TyperException as exc:  # the framework's usage errors (click's, vendored by Typer)
        if type(exc).__name__ == "NoArgsIsHelpError":  # `vpgtrans` alone: the help, as Typer prints it
            raise
        typer.echo(f"error: {_usage_message(exc)}", err=True)
        raise typer.Exit(getattr(exc, "exit_code", 2)) from None
    except VpgtransError as exc:  # a config file refused while the options were read
        typer.echo(f"error: {one_line(str(exc))}", err=True)
        raise typer.Exit(2) from None


def _plain_flags(params: list) -> list:
    """``params`` with their flags shown as flags: a flag takes no value, so no type in the help (an empty
    metavar: Typer's rich help prints the metavar in place of the type; the usage line omits options)."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class Group(TyperGroup):
    """The ``vpgtrans`` group: usage errors of the group and of every command in one line."""

    def get_params(self, ctx):
        return _plain_flags(super().get_params(ctx))  # also --help and Typer's completion options

    def make_context(self, info_name, args, parent=None, **extra):
        with _one_line_errors():
            return super().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx):
        with _one_line_errors():  # a command's options are parsed inside the group's invoke
            return super().invoke(ctx)


class Command(TyperCommand):
    """A ``vpgtrans`` command: flags shown as flags."""

    def get_params(self, ctx):
        return _plain_flags(super().get_params(ctx))


# --- --config / --print-config -------------------------------------------------------------------------


def _load_config(ctx: typer.Context, value: Optional[Path]) -> None:
    """``--config`` (eager: read before any other option): the file's values become the command's defaults,
    so the command line still overrides them (click's ``default_map``)."""
    if value is None or ctx.resilient_parsing:
        return
    values = read_config(value, settings_of(ctx.command))
    ctx.meta[CONFIG_FILE] = str(value)
    ctx.default_map = {**(ctx.default_map or {}), **values}


def _ask_print(ctx: typer.Context, value: bool) -> None:
    if value:
        ctx.meta[PRINT_CONFIG] = True


def _config_options(
        config: Annotated[Optional[Path], typer.Option(
            "--config", metavar="FILE", is_eager=True, expose_value=False, callback=_load_config,
            help="YAML file of this command's options (keys: the option names; relative paths are relative to "
                 "the file). Options given here override it.")] = None,
        print_config: Annotated[bool, typer.Option(
            "--print-config", expose_value=False, callback=_ask_print,
            help="Print the effective options as YAML (for --config) and exit.")] = False):
    """The two options every ``ConfigCommand`` adds (built by Typer from this signature)."""


def _build_config_params() -> list:
    app = typer.Typer(add_completion=False)
    app.command()(_config_options)
    return list(typer.main.get_command(app).params)


CONFIG_PARAMS = _build_config_params()


class ConfigCommand(Command):
    """A command that also takes ``--config FILE`` and ``--print-config``."""

    def __init__(self, *args, params=None, **kwargs):
        super().__init__(*args, params=[*(params or []), *CONFIG_PARAMS], **kwargs)

    def invoke(self, ctx):
        settings = settings_of(self)
        if ctx.meta.get(PRINT_CONFIG):
            typer.echo(dump_config(effective_config(ctx.params, settings), ctx.info_name), nl=False)
            return None
        from_file = tuple(s.key for s in settings if _from_file(ctx, s.name))
        token = _FROM_FILE.set((ctx.meta[CONFIG_FILE], from_file) if from_file else None)
        try:
            return super().invoke(ctx)
        finally:
            _FROM_FILE.reset(token)


def _from_file(ctx, name: str) -> bool:
    """Whether the value of parameter ``name`` came from the --config file (click's default map)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "DEFAULT_MAP" and CONFIG_FILE in ctx.meta


def settings_of(command) -> list[Setting]:
    """The command's options as a config file sees them (its own parameters, not --config / --help)."""
    hints = _annotations(command)
    settings = []
    for param in command.params:
        if not param.expose_value or not param.name:
            continue
        long = [opt for opt in param.opts if opt.startswith("--")]
        key = (long[0][2:] if long else param.name).replace("-", "_")
        multiple = bool(getattr(param, "multiple", False))
        if getattr(param, "is_flag", False):
            kind = "flag"
        elif param.name in MODEL_OPTIONS:
            kind = "model"
        elif param.name == "template":
            kind = "template"
        else:
            kind = "path" if _is_path(hints.get(param.name)) else "value"
        settings.append(Setting(key=key, name=param.name, kind=kind, multiple=multiple,
                                builtin=tuple(TEMPLATES) if kind == "template" else ()))
    return settings


def _choice_problem(command, name: str, problem: str) -> str | None:
    """``must be one of a, b (got 'x')`` for Typer's "'x' is not one of 'a', 'b'" on a choice option (the
    wording of the library's own choice errors), else None."""
    choices = _choices(_annotations(command).get(name))
    found = re.match(r"(.*) is not one of ", problem)
    return f"must be one of {', '.join(choices)} (got {found.group(1)})" if choices and found else None


def _annotations(command) -> dict:
    """The annotations of the function behind a command (through its wrappers), by parameter name."""
    return typing.get_type_hints(inspect.unwrap(command.callback), include_extras=True)


def _choices(annotation) -> tuple:
    """The values of the ``Literal`` inside ``annotation`` (through ``Annotated``, ``Optional``, ``list``)."""
    if annotation is None or isinstance(annotation, (str, bool, int, float)):
        return ()
    if typing.get_origin(annotation) is typing.Literal:
        return typing.get_args(annotation)
    return next((found for arg in typing.get_args(annotation) if (found := _choices(arg))), ())


def _is_path(annotation) -> bool:
    """``Path``, ``Optional[Path]``, ``list[Path]`` (inside ``Annotated``)."""
    if annotation is None:
        return False
    if typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    if isinstance(annotation, type):
        return issubclass(annotation, Path)
    return any(_is_path(arg) for arg in typing.get_args(annotation))
