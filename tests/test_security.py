"""Hostile and damaged files on every command that reads them: pickled code never runs (the planted
marker file is never created), a model's own code runs only with --trust-remote-code, and each damaged
file is one ``error:`` line naming the file and the problem, exit code 2, nothing written."""

from __future__ import annotations

import json
import pathlib
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from vpgtrans.bundle import MANIFEST, VPG_FILE, file_sha256
from vpgtrans.cli import app
from vpgtrans.config import InheritConfig
from vpgtrans.stages.inherit import inherit
from test_cli import _user_error  # exit 2, one "error: ..." line, no traceback

BUDGET = ["--max-steps", "1", "--batch-size", "4"]


class Touch:
    """Unpickling this creates ``target`` — the stand-in for code in a malicious checkpoint."""

    def __init__(self, target: pathlib.Path):
        self.target = target

    def __reduce__(self):
        return pathlib.Path.touch, (self.target,)


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


# --- pickled code ------------------------------------------------------------------------------------


@pytest.fixture
def planted(tmp_path):
    """An evil .pth, an HF LLM directory whose pytorch_model.bin carries the same payload, and the marker."""
    marker = tmp_path / "PWNED"
    pth = tmp_path / "evil.pth"
    torch.save({"model": {"query_tokens": torch.ones(1, 4, 64)}, "config": Touch(marker)}, pth)
    return {"marker": marker, "pth": pth, "root": tmp_path}


def _evil_bin_llm(llm_dir: pathlib.Path, marker: pathlib.Path, source: pathlib.Path) -> pathlib.Path:
    """``llm_dir``: the tiny LLaMA with its safetensors replaced by a pytorch_model.bin holding a payload."""
    shutil.copytree(source, llm_dir, dirs_exist_ok=True)
    state = load_file(str(llm_dir / "model.safetensors"))
    (llm_dir / "model.safetensors").unlink()
    torch.save({**state, "evil": Touch(marker)}, llm_dir / "pytorch_model.bin")
    return llm_dir


def test_the_plant_is_live(planted):
    torch.load(planted["pth"], weights_only=False)  # an unsafe load runs it
    assert planted["marker"].exists()


def test_evil_pth_on_every_entry_point(planted, tiny):
    pth, out = planted["pth"], planted["root"] / "out"
    refused = "refused to unpickle"
    _user_error(_cli("inspect", pth), "evil.pth", refused, "never executes pickled code")
    _user_error(_cli("inherit", "--source", pth, "--vision", tiny["source"], "--target-llm", tiny["llama"],
                     "--out", out, "--converter", "none"), refused)
    _user_error(_cli("transfer", "--source", pth, "--vision", tiny["source"], "--target-llm", tiny["llama"],
                     "--data", tiny["caption"], "--out", out, "--converter", "none", *BUDGET), refused)
    # where a .pth cannot go, it is refused without being opened
    _user_error(_cli("inherit", "--source", tiny["source"], "--vision", pth, "--target-llm", tiny["llama"],
                     "--out", out), "--vision must be an HF BLIP-2", "found lavis-pth")
    _user_error(_cli("inherit", "--source", tiny["source"], "--source-llm", pth, "--target-llm", tiny["llama"],
                     "--out", out), "evil.pth: no config.json")
    _user_error(_cli("inherit", "--source", tiny["source"], "--target-llm", pth, "--out", out),
                "--target-llm must be an HF causal LM", "found lavis-pth")
    assert not planted["marker"].exists()
    assert not out.exists()


def test_evil_pytorch_model_bin_in_an_llm_directory(planted, tiny):
    llm = _evil_bin_llm(planted["root"] / "llm", planted["marker"], tiny["llama"])
    out = planted["root"] / "out"
    _user_error(_cli("inspect", llm), "pytorch_model.bin", "refused to unpickle", "never executes pickled code")
    _user_error(_cli("inherit", "--source", tiny["source"], "--target-llm", llm, "--out", out),
                "pytorch_model.bin", "refused to unpickle")
    assert not planted["marker"].exists() and not out.exists()


def test_evil_bin_behind_a_bundle_reference(planted, tiny, tmp_path):
    """The bundle is sound; the LLM it points to was swapped for a hostile pytorch_model.bin. Loading
    goes through transformers, which also reads .bin weights with weights_only=True."""
    llm = shutil.copytree(tiny["llama"], tmp_path / "llm")
    bundle = inherit(tiny["source"], llm, tmp_path / "bundle", InheritConfig(converter="none"))
    _evil_bin_llm(llm, planted["marker"], tiny["llama"])
    _user_error(_cli("eval", bundle, "--data", tiny["caption"], "--max-samples", "2"), str(llm),
                "refused to unpickle the LLM weights")
    _user_error(_cli("warmup-projector", bundle, "--data", tiny["caption"], "--out", tmp_path / "w", *BUDGET),
                "refused to unpickle the LLM weights")
    _user_error(_cli("export", bundle, "--out", tmp_path / "hf"), "refused to unpickle the LLM weights")
    assert not planted["marker"].exists()
    assert not (tmp_path / "w").exists() and not (tmp_path / "hf").exists()


# --- a model's own code -----------------------------------------------------------------------------

CUSTOM_CODE = '''import pathlib
pathlib.Path({marker!r}).touch()
from transformers import PretrainedConfig


class EvilConfig(PretrainedConfig):
    model_type = {model_type!r}
'''


def _custom_code_llm(path: pathlib.Path, marker: pathlib.Path, model_type: str, source: pathlib.Path) -> pathlib.Path:
    """An LLM directory whose config.json auto_map points at modules that create ``marker`` on import."""
    shutil.copytree(source, path)
    config = json.loads((path / "config.json").read_text())
    config.update(model_type=model_type, auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                                                   "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    (path / "config.json").write_text(json.dumps(config))
    for module in ("configuration_evil", "modeling_evil"):
        (path / f"{module}.py").write_text(CUSTOM_CODE.format(marker=str(marker), model_type=model_type))
    return path


def test_custom_code_is_refused_without_the_flag(tiny, tmp_path):
    marker = tmp_path / "PWNED"
    llm = _custom_code_llm(tmp_path / "custom", marker, "vpgtrans_custom", tiny["llama"])
    out = tmp_path / "out"
    flag = "--trust-remote-code"
    _user_error(_cli("inherit", "--source", tiny["source"], "--target-llm", llm, "--out", out), flag,
                "'vpgtrans_custom' needs the model's own Python code", "configuration_evil.EvilConfig")
    _user_error(_cli("transfer", "--source", tiny["source"], "--target-llm", llm, "--data", tiny["caption"],
                     "--out", out, *BUDGET), flag)
    _user_error(_cli("inherit", "--source", tiny["source"], "--source-llm", llm, "--target-llm", tiny["llama"],
                     "--out", out), "does not run for a source LLM")
    info = json.loads(_cli("inspect", llm, "--json").stdout)  # described from config.json alone
    assert info["llm"]["custom_code"] == ["configuration_evil.EvilConfig", "modeling_evil.EvilForCausalLM"]
    assert flag in info["notes"][0]
    assert not marker.exists() and not out.exists()

    from transformers import AutoConfig

    AutoConfig.from_pretrained(llm, trust_remote_code=True)  # what the flag allows: the plant is live
    assert marker.exists()


def test_known_model_type_with_auto_map_uses_the_builtin_code(tiny, tmp_path):
    import vpgtrans

    marker = tmp_path / "PWNED"
    llm = _custom_code_llm(tmp_path / "llama-with-auto-map", marker, "llama", tiny["llama"])
    result = _cli("inherit", "--source", tiny["source"], "--target-llm", llm, "--out", tmp_path / "b",
                  "--converter", "none")
    assert result.exit_code == 0, result.output
    model = vpgtrans.load_model(tmp_path / "b")
    assert type(model.llm).__module__.startswith("transformers.models.llama")
    assert not marker.exists()


# --- damaged files: one line naming the file and the problem, on every command that reads them -----


def _truncate(path: pathlib.Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_last_byte(path: pathlib.Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _safetensors_bytes(header: dict, data: bytes) -> bytes:
    """A safetensors file as its format defines it: the header's length (8 bytes, little-endian), the JSON
    header, then the tensor bytes."""
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


def _grow_first_shape(path: pathlib.Path) -> None:
    """Double the first dimension of the first tensor in the file's header; bytes and offsets unchanged, so
    the header still describes exactly the file's size but that tensor's shape needs twice its bytes."""
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    name = next(name for name, entry in header.items() if name != "__metadata__" and entry["shape"])
    header[name]["shape"][0] *= 2
    path.write_bytes(_safetensors_bytes(header, data[8 + length:]))


def _edit_manifest(bundle: pathlib.Path, edit) -> None:
    manifest = json.loads((bundle / MANIFEST).read_text())
    edit(manifest)
    (bundle / MANIFEST).write_text(json.dumps(manifest))


def _truncate_and_rehash(bundle: pathlib.Path) -> None:
    _truncate(bundle / VPG_FILE)
    _edit_manifest(bundle, lambda m: m["files"].update({VPG_FILE: file_sha256(bundle / VPG_FILE)}))


def _grow_first_shape_and_rehash(bundle: pathlib.Path) -> None:
    _grow_first_shape(bundle / VPG_FILE)
    _edit_manifest(bundle, lambda m: m["files"].update({VPG_FILE: file_sha256(bundle / VPG_FILE)}))


def _set(*keys, value):
    def edit(manifest):
        target = manifest
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
    return edit


BUNDLE_DAMAGE = {
    "truncated-vpg": (lambda b: _truncate(b / VPG_FILE), [f"{VPG_FILE} does not match its manifest hash"]),
    "flipped-byte": (lambda b: _flip_last_byte(b / VPG_FILE), [f"{VPG_FILE} does not match its manifest hash"]),
    "truncated-and-rehashed": (_truncate_and_rehash, [f"{VPG_FILE}: truncated: its header describes"]),
    "shape-disagrees-with-bytes-and-rehashed": (_grow_first_shape_and_rehash,
                                                [f"{VPG_FILE}: damaged safetensors header"]),
    "manifest-not-json": (lambda b: (b / MANIFEST).write_text('{"format": "vpgtrans-bundle", '),
                          [f"{MANIFEST}: not valid JSON"]),
    "manifest-section-nonsense": (lambda b: _edit_manifest(b, _set("model", "visual", "vpg", value="nonsense")),
                                  ["model.visual.vpg should be an object"]),
    "manifest-value-nonsense": (lambda b: _edit_manifest(b, _set("model", "visual", "vpg", "num_query_tokens", value="four")),
                                ["model.visual.vpg.num_query_tokens should be a positive int"]),
    "manifest-template-nonsense": (lambda b: _edit_manifest(b, _set("template", "vqa", value="no slots")),
                                   ["prompt template 'vqa' must contain {image}"]),
}


def _bundle_commands(bundle, tiny, out):
    return {
        "inspect": ["inspect", bundle],
        "eval": ["eval", bundle, "--data", tiny["caption"], "--max-samples", "2"],
        "export-hf": ["export", bundle, "--out", out],
        "export-lavis": ["export", bundle, "--format", "lavis", "--out", out.with_suffix(".pth")],
        "warmup-projector": ["warmup-projector", bundle, "--data", tiny["caption"], "--out", out, *BUDGET],
        "finetune": ["finetune", bundle, "--data", tiny["caption"], "--out", out, *BUDGET],
    }


@pytest.mark.parametrize("damage", sorted(BUNDLE_DAMAGE))
def test_damaged_bundle_on_every_command(damage, inherited, tiny, tmp_path):
    bundle = shutil.copytree(inherited, tmp_path / "bundle")
    make, fragments = BUNDLE_DAMAGE[damage]
    make(bundle)
    out = tmp_path / "out"
    for name, args in _bundle_commands(bundle, tiny, out).items():
        line = _user_error(_cli(*args), *fragments)
        assert str(bundle) in line, (name, line)
        assert not out.exists() and not out.with_suffix(".pth").exists(), name


LLM_DAMAGE = {
    "truncated-safetensors": (lambda llm: _truncate(llm / "model.safetensors"), ["model.safetensors", "truncated"]),
    "shape-disagrees-with-bytes": (lambda llm: _grow_first_shape(llm / "model.safetensors"),
                                   ["model.safetensors: damaged safetensors header"]),
    "config-not-json": (lambda llm: (llm / "config.json").write_text("{'model_type': 'llama',"),
                        ["config.json: not valid JSON"]),
    "config-not-an-object": (lambda llm: (llm / "config.json").write_text('["llama"]'),
                             ["config.json: not a model config (a JSON list, not an object)"]),
}


@pytest.mark.parametrize("damage", sorted(LLM_DAMAGE))
def test_damaged_llm_directory_on_every_command(damage, tiny, tmp_path):
    """The LLM a bundle references (and inherit's --target-llm) damaged after the bundle was made."""
    llm = shutil.copytree(tiny["llama"], tmp_path / "llm")
    bundle = inherit(tiny["source"], llm, tmp_path / "bundle", InheritConfig(converter="none"))
    make, fragments = LLM_DAMAGE[damage]
    make(llm)
    out = tmp_path / "out"
    commands = _bundle_commands(bundle, tiny, out)
    del commands["inspect"], commands["export-lavis"]  # they read the bundle only, not the LLM
    commands["inspect-llm"] = ["inspect", llm]
    commands["inherit"] = ["inherit", "--source", tiny["source"], "--target-llm", llm, "--out", out]
    for name, args in commands.items():
        line = _user_error(_cli(*args), *fragments)
        assert str(llm) in line, (name, line)
        assert not out.exists(), name


def test_damaged_hf_source_directory(tiny, tmp_path):
    source = shutil.copytree(tiny["source"], tmp_path / "source")
    _truncate(source / "model.safetensors")
    out = tmp_path / "out"
    for args in (["inspect", source], ["inherit", "--source", source, "--target-llm", tiny["llama"], "--out", out]):
        _user_error(_cli(*args), "source/model.safetensors", "truncated")
    (source / "config.json").write_text(json.dumps({"model_type": "blip-2", "vision_config": [1]}))
    _user_error(_cli("inherit", "--source", source, "--target-llm", tiny["llama"], "--out", out),
                "config.json", "vision_config, qformer_config, text_config as JSON objects")
    assert not out.exists()


def test_safetensors_with_trailing_bytes_or_a_bad_header(tmp_path):
    from vpgtrans.errors import VpgtransError
    from vpgtrans.formats.hf import safetensors_header

    path = tmp_path / "x.safetensors"
    save_file({"a": torch.ones(3)}, str(path))
    assert set(safetensors_header(path)) == {"a"}
    with open(path, "ab") as fh:
        fh.write(b"junk")
    with pytest.raises(VpgtransError, match="has trailing bytes"):
        safetensors_header(path)
    for data in (b"", b"\x05\x00", (10**12).to_bytes(8, "little") + b"{}",
                 (2).to_bytes(8, "little") + b"[]", (27).to_bytes(8, "little") + b'{"a": {"dtype": "F32"}}    '):
        path.write_bytes(data)
        with pytest.raises(VpgtransError) as err:
            safetensors_header(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)


F32_PAIR = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}  # two float32: bytes 0..8


@pytest.mark.parametrize("header, data, named", [
    ({"first": {**F32_PAIR, "shape": [3]}}, bytes(8), None),  # 3 float32 need 12 bytes, the range holds 8
    ({"first": F32_PAIR, "second": {**F32_PAIR, "data_offsets": [4, 12]}}, bytes(12), "second"),  # overlap
    ({"first": {**F32_PAIR, "dtype": "F99"}}, bytes(8), None),  # no such dtype (named by newer safetensors only)
], ids=["shape-disagrees-with-bytes", "overlapping-ranges", "unknown-dtype"])
def test_safetensors_header_that_contradicts_itself(tmp_path, header, data, named):
    """Headers that describe exactly the file's size, so only safetensors' own parser can refuse them."""
    from vpgtrans.errors import VpgtransError
    from vpgtrans.formats.hf import safetensors_header

    path = tmp_path / "x.safetensors"
    path.write_bytes(_safetensors_bytes(header, data))
    with pytest.raises(VpgtransError) as err:
        safetensors_header(path)
    message = str(err.value)
    assert message.startswith(f"{path}: damaged safetensors header (") and "\n" not in message, message
    assert named is None or named in message, message
