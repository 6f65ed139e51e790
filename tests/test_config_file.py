"""Config files and option types on the command line: ``--config run.yaml`` under the command line's own
options, ``--print-config`` that round-trips, relative paths against the file, one-line errors naming the
file and the key; choice options that show their choices and refuse others in one line; flags shown as
flags; shell completion offered and completing the choices."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from vpgtrans import cli
from vpgtrans.cli import app
from test_cli import _ok, _user_error

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "docs" / "examples" / "transfer-vicuna7b.yaml"

# Each command that takes --config, with options that differ from its defaults (relative paths, lists,
# flags, choices): what --print-config must echo back.
COMMANDS = {
    "inherit": ["inherit", "--source", "src", "--target-llm", "llm", "--out", "o", "--converter", "gw",
                "--connector", "plora", "--lora-rank", "4", "--template", "vl-vicuna", "--ridge", "0.01",
                "--force"],
    "warmup-projector": ["warmup-projector", "b", "--data", "d", "--out", "o", "--max-steps", "3", "--lr", "1e-3",
                         "--dtype", "bf16", "--report-to", "tensorboard", "--bbox-format", "xywh", "--resume"],
    "finetune": ["finetune", "b", "--data", "d", "--out", "o", "--epochs", "2.5", "--from-scratch",
                 "--eval-data", "../e", "--eval-every", "5", "--seed", "7"],
    "transfer": ["transfer", "--source", "Salesforce/blip2-opt-2.7b", "--target-llm", "llm", "--data", "d",
                 "--out", "o", "--stage-set", "instruct.lr=1e-4", "--stage-set", "align.max_steps=2",
                 "--stage-trainable", "multitask=pool_adapter", "--connector", "infmllm", "--recipe", "infmllm",
                 "--template", "my_template.json", "--load-in-8bit", "--finetune-max-steps", "9"],
    "eval": ["eval", "b", "--data", "d", "--task", "vqa", "--tokenizer", "ptb", "--device-map", "auto", "--json",
             "--out", "s.json", "--num-beams", "2"],
    "export": ["export", "b", "--out", "o", "--format", "lavis", "--dtype", "fp16", "--merge-lora"],
}


def _cli(*args, env=None):
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


def _printed(*args) -> dict:
    result = _ok(_cli(*args, "--print-config"))
    assert result.stdout.startswith(f"# vpgtrans {args[0]}: effective configuration")
    return yaml.safe_load(result.stdout)


def _keys(command: str) -> set[str]:
    """The command's options and arguments as the help names them (independent of the config code)."""
    result = _ok(_cli(command, "--help", env={"COLUMNS": "250"}))
    options = set(re.findall(r"--([a-z0-9-]+)", result.stdout)) - {"help", "config", "print-config"}
    arguments = set(re.findall(r"\{(\w+)\}", result.stdout.splitlines()[1]))  # Usage: vpgtrans c [OPTIONS] {bundle}
    # help texts mention other commands' options too (e.g. "--epochs" in --max-steps' help); keep the rows
    rows = {m for m in options if re.search(rf"^\W*\*?\s*--{m}\s", result.stdout, flags=re.M)}
    return {name.replace("-", "_") for name in rows} | arguments


@pytest.mark.parametrize("command", list(COMMANDS))
def test_print_config_round_trips(command, tmp_path, monkeypatch):
    (tmp_path / "here").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "here" / "my_template.json").write_text("{}")
    monkeypatch.chdir(tmp_path / "here")
    printed = _printed(*COMMANDS[command])
    assert set(printed) == _keys(command)
    # the values given, paths absolute against the directory the command ran in
    args = COMMANDS[command][1:]
    given = {}
    for i, arg in enumerate(args):
        if arg.startswith("--"):
            value = args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("--") else True
            key = arg[2:].replace("-", "_")
            given.setdefault(key, []).append(value)
    here = tmp_path / "here"
    for key, values in given.items():
        shown = printed[key]
        expected = values if isinstance(shown, list) else values[-1]
        if key in ("data", "out", "eval_data", "target_llm", "source") and expected != "Salesforce/blip2-opt-2.7b":
            expected = os.path.normpath(here / expected)
        elif key == "template" and expected == "my_template.json":
            expected = str(here / expected)
        if isinstance(shown, (int, float)) and not isinstance(shown, bool):
            expected = type(shown)(expected)
        assert shown == expected, (key, shown, expected)
    if command in ("warmup-projector", "finetune", "eval", "export"):
        assert printed["bundle"] == str(here / "b")
    # ... and fed back from another directory, the same effective configuration
    config = tmp_path / "elsewhere" / "run.yaml"
    config.write_text(yaml.safe_dump(printed))
    monkeypatch.chdir(tmp_path)
    assert _printed(command, "--config", config) == printed


def test_command_line_overrides_the_file(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("bundle: b\ndata: d\nout: o\nbatch-size: 3\ndtype: bf16\nmax_steps: 10\nforce: true\n")
    printed = _printed("warmup-projector", "--config", config, "--batch-size", "5", "--data", "/abs/data")
    assert (printed["batch_size"], printed["dtype"], printed["max_steps"], printed["force"]) == (5, "bf16", 10, True)
    assert printed["data"] == "/abs/data" and printed["bundle"] == str(tmp_path / "b")
    # a positional argument given on the command line wins too
    assert _printed("warmup-projector", "other", "--config", config)["bundle"] == os.path.abspath("other")


def test_paths_in_the_file_are_relative_to_the_file(tmp_path, monkeypatch):
    run = tmp_path / "project" / "configs"
    (run / "models" / "llm").mkdir(parents=True)
    (run / "tpl.json").write_text("{}")
    config = run / "run.yaml"
    config.write_text("source: Salesforce/blip2-opt-2.7b@main\ntarget_llm: models/llm\ndata: ../data\n"
                      "out: /abs/out\neval_data: ~/eval\ntemplate: tpl.json\nvision: org/vit\n")
    monkeypatch.chdir(tmp_path)
    printed = _printed("transfer", "--config", "project/configs/run.yaml")
    assert printed["source"] == "Salesforce/blip2-opt-2.7b@main"  # a Hub id (no such path beside the file)
    assert printed["vision"] == "org/vit"
    assert printed["target_llm"] == str(run / "models" / "llm")
    assert printed["data"] == str(tmp_path / "project" / "data")
    assert printed["out"] == "/abs/out"
    assert printed["eval_data"] == os.path.expanduser("~/eval")
    assert printed["template"] == str(run / "tpl.json")
    # a model directory beside the file wins over the Hub id of the same spelling
    (run / "org" / "vit").mkdir(parents=True)
    assert _printed("transfer", "--config", config)["vision"] == str(run / "org" / "vit")
    # built-in template names stay names
    config.write_text("source: s\ntarget_llm: t\ndata: d\nout: o\ntemplate: vl-vicuna\n")
    assert _printed("transfer", "--config", config)["template"] == "vl-vicuna"


BAD = [  # (file text, what the one line names besides the file)
    ("max_step: 3\n", ["unknown key 'max_step'", "did you mean 'max_steps'"]),
    ("max_steps: 1\nmax-steps: 2\n", ["key 'max_steps' is given twice"]),
    ("max_steps: 1\nmax_steps: 2\n", ["not valid YAML", "key 'max_steps' is given twice", "line 2"]),
    ("stage_set: {a: 1}\n", ["unknown key 'stage_set'"]),  # a transfer key: files are per command
    ("batch_size: abc\n", ["key 'batch_size'", "(got 'abc')"]),
    ("batch_size: 2.5\n", ["key 'batch_size'", "'2.5'"]),
    ("batch_size: [1, 2]\n", ["key 'batch_size'", "not a list"]),
    ("dtype: int3\n", ["key 'dtype' must be one of fp32, bf16, fp16 (got 'int3')"]),
    ("report_to: {a: 1}\n", ["key 'report_to'", "not a mapping"]),
    ("force: 'yes please'\n", ["key 'force'", "true or false"]),
    ("eval_data: 3\n", ["key 'eval_data'", "a path is a non-empty string"]),
    ("- max_steps: 1\n", ["a config file is a mapping"]),
    ("max_steps: [1\n", ["not valid YAML", "line 2"]),
    ("config: other.yaml\n", ["unknown key 'config'"]),
]


@pytest.mark.parametrize("text, fragments", BAD)
def test_bad_config_files_are_one_line(text, fragments, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(text)
    _user_error(_cli("warmup-projector", "b", "--data", "d", "--out", tmp_path / "o", "--config", config),
                str(config), *fragments)
    assert not (tmp_path / "o").exists()


def test_missing_config_file_is_one_line(tmp_path):
    _user_error(_cli("eval", "b", "--data", "d", "--config", tmp_path / "nope.yaml"), "nope.yaml", "no such file")
    _user_error(_cli("eval", "b", "--data", "d", "--config", tmp_path), "not a YAML file")


def test_a_bad_value_from_the_file_names_the_file(inherited, tiny, tmp_path):
    """Domain checks made by the library (not by the option's type) name the file too."""
    config = tmp_path / "run.yaml"
    config.write_text(f"data: {tiny['caption']}\nepochs: -1\n")
    _user_error(_cli("warmup-projector", inherited, "--out", tmp_path / "o", "--config", config),
                "epochs must be a finite number > 0", f"(epochs from {config})")
    assert not (tmp_path / "o").exists()
    # the same value on the command line (and an empty file): no file named
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    line = _user_error(_cli("warmup-projector", inherited, "--data", tiny["caption"], "--out", tmp_path / "o",
                            "--epochs", "-1", "--config", empty), "epochs must be a finite number > 0")
    assert "empty.yaml" not in line


def test_a_run_from_a_config_file_records_the_same_run(inherited, tiny, tmp_path, monkeypatch):
    """config.record (what --resume compares) and the training config of a run made from a file equal
    those of the same run made with flags."""
    flags = _ok(_cli("warmup-projector", inherited, "--data", tiny["caption"], "--out", tmp_path / "flags",
                     "--max-steps", "2", "--batch-size", "4", "--lr", "1e-3", "--seed", "3"))
    assert "bundle written" in flags.stdout
    run = tmp_path / "cfg"
    run.mkdir()
    config = run / "run.yaml"
    config.write_text(yaml.safe_dump({"bundle": os.path.relpath(inherited, run),
                                      "data": os.path.relpath(tiny["caption"], run), "out": "../file",
                                      "max-steps": 2, "batch_size": 4, "lr": 1e-3, "seed": 3}))
    monkeypatch.chdir(tmp_path)
    _ok(_cli("warmup-projector", "--config", config))
    ours, theirs = (json.loads((tmp_path / name / "manifest.json").read_text())["config"] for name in ("file", "flags"))
    assert ours["record"] == theirs["record"]
    assert ours["train"] == theirs["train"] and ours["train"]["lr"] == 1e-3 and ours["train"]["max_steps"] == 2


def test_the_example_config_is_valid():
    printed = _printed("transfer", "--config", EXAMPLE)
    example = yaml.safe_load(EXAMPLE.read_text())
    assert printed["source"] == example["source"] == "Salesforce/blip2-opt-2.7b"
    assert printed["data"] == str(EXAMPLE.parent / example["data"])
    for key in ("batch_size", "grad_accum", "finetune_max_steps", "dtype", "save_every", "eval_every"):
        assert printed[key] == example[key]


# --- option types ----------------------------------------------------------------------------------------

CHOICES = {  # option -> (a command that has it, the library's registry it must equal)
    "--dtype": ("warmup-projector", "vpgtrans.training", "DTYPES"),
    "--report-to": ("finetune", "vpgtrans.training", "REPORT_TO"),
    "--bbox-format": ("eval", "vpgtrans.refexp", "BBOX_FORMATS"),
    "--format": ("export", "vpgtrans.export", "EXPORTERS"),
    "--tokenizer": ("eval", "vpgtrans.metrics", "CAPTION_TOKENIZERS"),
    "--choice-scoring": ("eval", "vpgtrans.evaluate", "CHOICE_SCORING"),
    "--task": ("eval", "vpgtrans.data", "TASKS"),
    "--connector": ("inherit", "vpgtrans.model.connectors", "CONNECTORS"),
    "--recipe": ("transfer", "vpgtrans.recipes", "RECIPES"),
    "--converter": ("transfer", "vpgtrans.config", "CONVERTERS"),
    "--t5-caption-split": ("finetune", "vpgtrans.config", "T5_CAPTION_SPLITS"),
    "--choice-answer": ("eval", "vpgtrans.config", "CHOICE_ANSWERS"),
    "--template": ("inherit", "vpgtrans.config", "TEMPLATES"),
}


@pytest.mark.parametrize("option", list(CHOICES))
def test_choice_options_show_and_check_their_choices(option, tmp_path):
    import importlib

    command, module, registry = CHOICES[option]
    choices = tuple(getattr(importlib.import_module(module), registry))
    shown = _ok(_cli(command, "--help", env={"COLUMNS": "250"})).stdout
    row = re.search(rf"^\W*{re.escape(option)}\s+<([^>]+)>", shown, flags=re.M)
    assert row is not None, shown
    listed = tuple(row.group(1).split("|"))
    args = {"inherit": ["--source", "s", "--target-llm", "t", "--out", tmp_path / "o"],
            "transfer": ["--source", "s", "--target-llm", "t", "--data", "d", "--out", tmp_path / "o"]}.get(
        command, ["b", "--data", "d", "--out", tmp_path / "o"] if command != "export" else ["b", "--out", tmp_path / "o"])
    if option == "--template":  # names or a FILE
        assert listed == (*choices, "FILE")
        _user_error(_cli(command, *args, option, "no-such-template"), "neither a template name")
    elif option in ("--connector", "--recipe"):  # registries Python code may extend: the library checks
        assert listed == choices
        _user_error(_cli(command, *args, option, "bogus"), f"unknown {option[2:]} 'bogus'; available: "
                                                           f"{', '.join(choices)}")
    else:
        assert listed == choices
        _user_error(_cli(command, *args, option, "bogus"), f"{option} must be one of {', '.join(choices)} (got 'bogus')")
    assert not (tmp_path / "o").exists()


def test_flags_show_as_flags():
    for command in ["", *COMMANDS, "inspect", "demo"]:
        shown = _ok(_cli(*command.split(), "--help", env={"COLUMNS": "250"})).stdout
        assert "<bool>" not in shown, command
        assert re.search(r"--help\s+Show this message", shown)
    shown = _ok(_cli("finetune", "--help", env={"COLUMNS": "250"})).stdout
    assert re.search(r"--from-scratch\s+Re-initialise", shown)  # no type column for a flag


def test_usage_errors_are_one_line():
    _user_error(_cli("eval", "b", "--data", "d", "--batch-size", "many"), "--batch-size", "eval --help')")
    _user_error(_cli("eval", "b", "--data", "d", "--bogus"), "No such option: --bogus")
    _user_error(_cli("eval", "--data", "d"), "Missing argument")
    _user_error(_cli("no-such-command"), "No such command")


def test_shell_completion_is_offered_installs_and_completes_choices(tmp_path, monkeypatch):
    assert "--install-completion" in _ok(_cli("--help", env={"COLUMNS": "250"})).stdout
    # installed for bash into a home of our own (shell named, not detected from the test's parent process)
    monkeypatch.setenv("_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION", "1")
    monkeypatch.setenv("HOME", str(tmp_path))
    installed = CliRunner().invoke(app, ["--install-completion", "bash"], prog_name="vpgtrans")
    assert installed.exit_code == 0, installed.output
    script = tmp_path / ".bash_completions" / "vpgtrans.sh"
    assert f"source '{script}'" in (tmp_path / ".bashrc").read_text()
    assert "complete -o default -F _vpgtrans_completion vpgtrans" in script.read_text()
    monkeypatch.delenv("_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION")
    script = CliRunner().invoke(app, ["--show-completion", "bash"], prog_name="vpgtrans")
    assert script.exit_code == 0 and "_VPGTRANS_COMPLETE=complete_bash" in script.stdout
    completed = CliRunner().invoke(app, [], prog_name="vpgtrans", env={
        "_VPGTRANS_COMPLETE": "complete_bash", "COMP_WORDS": "vpgtrans eval b --dtype ", "COMP_CWORD": "4"})
    assert completed.stdout.split() == list(cli.DTYPES)
    completed = CliRunner().invoke(app, [], prog_name="vpgtrans", env={
        "_VPGTRANS_COMPLETE": "complete_bash", "COMP_WORDS": "vpgtrans transfer --connector l", "COMP_CWORD": "3"})
    assert completed.stdout.split() == ["linear", "lavin", "lavin-llm"]
