"""Misuse: existing outputs are refused without --force; --force never deletes anything but a previous
vpgtrans output at exactly --out; inputs are never modified (every file hashed before and after each
command); paths with spaces and unicode work end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vpgtrans.bundle import MANIFEST, file_sha256, read_manifest
from vpgtrans.cli import app
from test_cli import _user_error  # exit 2, one "error: ..." line, no traceback

BUDGET = ["--max-steps", "1", "--batch-size", "4"]


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _ok(result):
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return result


def tree_hashes(root: Path) -> dict[str, str]:
    """Every file and link under ``root`` (relative path -> sha256, or the link target)."""
    out = {}
    for path in sorted(Path(root).rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            out[key] = "-> " + str(path.readlink())
        elif path.is_file():
            out[key] = file_sha256(path)
        else:
            out[key] = "dir"
    return out


@pytest.fixture
def bundle(inherited, tmp_path):
    """A private copy of the inherit bundle under ``tmp_path/work``."""
    return shutil.copytree(inherited, tmp_path / "work" / "bundle")


def _commands(bundle, tiny, out):
    """Every command that writes an --out, reading ``bundle`` (or the tiny source for inherit/transfer)."""
    return {
        "inherit": ["inherit", "--source", tiny["source"], "--target-llm", tiny["llama"], "--out", out,
                    "--converter", "none"],
        "warmup-projector": ["warmup-projector", bundle, "--data", tiny["caption"], "--out", out, *BUDGET],
        "finetune": ["finetune", bundle, "--data", tiny["caption"], "--out", out, *BUDGET],
        "transfer": ["transfer", "--source", tiny["source"], "--target-llm", tiny["llama"], "--data", tiny["caption"],
                     "--out", out, "--converter", "none", *BUDGET],
        "export-hf": ["export", bundle, "--out", out],
    }


def _file_commands(bundle, tiny, out):
    return {
        "eval": ["eval", bundle, "--data", tiny["caption"], "--max-samples", "2", "--max-new-tokens", "2", "--out", out],
        "export-lavis": ["export", bundle, "--format", "lavis", "--out", out],
    }


# --- existing outputs ---------------------------------------------------------------------------------


def test_every_command_refuses_existing_output_without_force(bundle, tiny, tmp_path):
    out = tmp_path / "existing"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    for name, args in _commands(bundle, tiny, out).items():
        _user_error(_cli(*args), "already exists", "--force")
    out_file = tmp_path / "existing.pth"
    out_file.write_text("keep")
    for name, args in _file_commands(bundle, tiny, out_file).items():
        _user_error(_cli(*args), "already exists", "--force")
    assert tree_hashes(out) == {"mine.txt": file_sha256(out / "mine.txt")} and out_file.read_text() == "keep"


def test_force_replaces_a_previous_output_of_the_same_command(bundle, tiny, tmp_path):
    out = tmp_path / "lavis.pth"
    args = _file_commands(bundle, tiny, out)["export-lavis"]
    _ok(_cli(*args))
    out.write_bytes(b"an older export")
    _ok(_cli(*args, "--force"))
    assert out.read_bytes() != b"an older export" and sorted(p.name for p in tmp_path.iterdir()) == ["lavis.pth", "work"]


# --- what --force may never touch ----------------------------------------------------------------------


def _protected(tmp_path: Path, bundle: Path) -> dict[str, tuple[list, str]]:
    """--out values --force must refuse, with the words of the refusal. Built fresh per command."""
    user = tmp_path / "user-files"
    user.mkdir(exist_ok=True)
    (user / "thesis.tex").write_text("years of work")
    (user / "data").mkdir(exist_ok=True)
    (user / "data" / "x.csv").write_text("1,2")
    link = tmp_path / "link-to-user-files"
    if not link.is_symlink():
        link.symlink_to(user, target_is_directory=True)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("notes")
    return {
        "a-directory-of-user-files": (user, "is not a vpgtrans output"),
        "a-symlink-to-it": (link, "is a symbolic link"),
        "the-root": (Path("/"), "is the filesystem root"),
        "the-input-bundle": (bundle, "is an input of this command"),
        "a-parent-of-the-input": (bundle.parent, "contains an input of this command"),
        "inside-the-input": (bundle / "sub", "is inside an input of this command"),
        "a-file": (a_file, "exists and is not a directory"),
    }


@pytest.mark.parametrize("command", ["inherit", "warmup-projector", "finetune", "transfer", "export-hf"])
def test_force_never_deletes_outside_the_output(command, bundle, tiny, tmp_path):
    before = tree_hashes(tmp_path)
    sources = {name: tree_hashes(tiny[name]) for name in ("source", "llama")}
    for case, (out, fragment) in _protected(tmp_path, bundle).items():
        if command in ("inherit", "transfer") and case in ("the-input-bundle", "a-parent-of-the-input",
                                                           "inside-the-input"):
            out = {"the-input-bundle": tiny["llama"], "a-parent-of-the-input": tiny["llama"].parent,
                   "inside-the-input": tiny["source"] / "run"}[case]  # their inputs are the models
        args = _commands(bundle, tiny, out)[command] + ["--force"]
        _user_error(_cli(*args), str(out), fragment)
    after = tree_hashes(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing that was there changed
    assert set(after) - set(before) <= {"user-files", "user-files/thesis.tex", "user-files/data",
                                         "user-files/data/x.csv", "link-to-user-files", "notes.txt"}
    assert {name: tree_hashes(tiny[name]) for name in sources} == sources


@pytest.mark.parametrize("command", ["eval", "export-lavis"])
def test_file_outputs_never_replace_links_directories_or_inputs(command, bundle, tiny, tmp_path):
    target = tmp_path / "precious.json"
    target.write_text("precious")
    link = tmp_path / "link.pth"
    link.symlink_to(target)
    cases = {link: "is a symbolic link", bundle / "scores.pth": "is inside an input of this command",
             tmp_path / "work": "contains an input" if command == "eval" else "a LAVIS export is a single .pth file"}
    before = tree_hashes(tmp_path)
    for out, fragment in cases.items():
        _user_error(_cli(*_file_commands(bundle, tiny, out)[command], "--force"), fragment)
    assert tree_hashes(tmp_path) == before


def test_out_inside_the_training_data_is_refused_before_training(bundle, tiny, tmp_path):
    data = shutil.copytree(tiny["caption"], tmp_path / "data")
    before = tree_hashes(data)
    _user_error(_cli("warmup-projector", bundle, "--data", data, "--out", data / "run", *BUDGET),
                "is inside an input of this command")
    _user_error(_cli("warmup-projector", bundle, "--data", data, "--out", data, "--force", *BUDGET),
                "is an input of this command")
    assert tree_hashes(data) == before


# --- inputs are never modified; spaces and unicode all the way ----------------------------------------


def test_unicode_paths_end_to_end_and_inputs_never_modified(tiny, tmp_path):
    """inherit -> warmup -> finetune -> eval -> export (hf, lavis) -> inspect under 'my runs/ünïcødé 模型 ✓/',
    hashing every input before and after each command."""
    root = tmp_path / "my runs" / "ünïcødé 模型 ✓"
    source = shutil.copytree(tiny["source"], root / "source blip2 (opt)")
    llm = shutil.copytree(tiny["llama"], root / "target llämа")
    data = root / "däta set"
    (data / "imägës dir").mkdir(parents=True)
    rows = []
    for line in (tiny["caption"] / "data.jsonl").read_text().splitlines():
        row = json.loads(line)
        name = f"imägës dir/bïld {Path(row['image']).stem}.png"
        shutil.copy(tiny["caption"] / row["image"], data / name)
        rows.append({**row, "image": name, "caption": row["caption"] + " — ok ✓"})
    (data / "data.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")

    def run(args, *inputs):
        before = [tree_hashes(p) for p in inputs]
        result = _ok(_cli(*args))
        assert [tree_hashes(p) for p in inputs] == before, args[0]
        return result

    inherited = root / "inherit bündle"
    run(["inherit", "--source", source, "--target-llm", llm, "--out", inherited], source, llm)
    warm, fine = root / "warm úp", root / "fine tüne"
    run(["warmup-projector", inherited, "--data", data, "--out", warm, *BUDGET], inherited, data, source, llm)
    run(["finetune", warm, "--data", data, "--out", fine, *BUDGET], warm, inherited, data)
    scores = root / "scörës 1.json"
    run(["eval", fine, "--data", data, "--max-samples", "2", "--max-new-tokens", "2", "--out", scores], fine, data)
    hf = root / "export hf ✓"
    run(["export", fine, "--out", hf], fine, source, llm)
    pth = root / "vpg ✓.pth"
    run(["export", fine, "--format", "lavis", "--out", pth], fine)
    info = json.loads(run(["inspect", fine, "--json"], fine).stdout)
    assert info["valid"] is True and info["path"] == str(fine)
    manifest = read_manifest(fine)
    assert manifest["parent"]["path"] == str(warm) and manifest["config"]["data"] == str(data)
    assert manifest["data"]["rows"] == 24 and manifest["references"]["llm"]["path"] == str(llm)
    assert json.loads(scores.read_text())["data"] == str(data)
    assert json.loads((hf / "vpgtrans_export.json").read_text())["bundle"]["path"] == str(fine)
    assert pth.is_file() and (hf / MANIFEST).exists() is False


def test_a_prompt_longer_than_the_llms_positions_is_one_line(inherited, tiny, tmp_path):
    """The tiny OPT and LLaMA have 96 positions. OPT's are a learned table: a question that does not fit is
    refused in one line at eval and in training (prompts are never truncated; it used to fail with an
    IndexError inside torch.embedding). LLaMA's are rotary: it runs past them, with one warning."""
    from vpgtrans.stages.inherit import inherit

    data = tmp_path / "long"
    shutil.copytree(tiny["vqa"], data)
    rows = [json.loads(line) for line in (data / "data.jsonl").read_text().splitlines()]
    for row in rows:
        row["question"] = " ".join(["what colour is the circle"] * 30)
    (data / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    opt = inherit(tiny["source"], tiny["opt"], tmp_path / "opt-bundle")
    message = _user_error(_cli("eval", opt, "--data", data, "--max-new-tokens", "4"))
    assert "exceeds the LLM's 96 positions" in message and "--max-new-tokens" in message
    result = _cli("warmup-projector", opt, "--data", data, "--out", tmp_path / "w", "--max-steps", "1",
                  "--batch-size", "2")
    assert "exceeds the LLM's 96 positions" in _user_error(result)
    assert not (tmp_path / "w").exists()
    result = _ok(_cli("eval", inherited, "--data", data, "--max-new-tokens", "4", "--max-samples", "2"))
    assert " ".join(result.stderr.split()).count("runs past the 96 positions") == 1, result.stderr
