"""Issue 15: the real-shapes benchmark's smoke preset, and the fixes it led to (inspect without
transformers, the ViT loaded once in the run's dtype, the export sharded in one dtype)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_inspect_reads_headers_without_importing_transformers(tiny):
    """The header path of inspect (an HF BLIP-2 and an LLM directory) must not import transformers or
    torch: seconds of imports, where a 7B checkpoint's headers take milliseconds."""
    code = ("import sys, json; from vpgtrans.inspect import inspect_path; "
            f"infos = [inspect_path({str(tiny['source'])!r}), inspect_path({str(tiny['llama'])!r})]; "
            "print(json.dumps([sorted(m for m in ('torch', 'transformers') if m in sys.modules), "
            "infos[0]['llm']['params'], infos[1]['llm']['num_layers']]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    imported, source_llm_params, layers = json.loads(done.stdout.splitlines()[-1])
    assert imported == []
    from safetensors import safe_open  # the counts still come out right: against the stored tensors

    with safe_open(str(tiny["source"] / "model.safetensors"), "pt") as fh:
        stored = {k: fh.get_slice(k).get_shape() for k in fh.keys() if k.startswith("language_model.")}
    assert source_llm_params == sum(torch.Size(s).numel() for s in stored.values())
    assert layers == json.loads((tiny["llama"] / "config.json").read_text())["num_hidden_layers"]


def test_the_vit_is_loaded_once_in_the_runs_dtype(inherited, tiny):
    """load_model builds the ViT on the meta device and gives it the checkpoint's tensors: fp32 by default
    (exactly the stored values), bf16 with dtype=bf16 (eval --dtype bf16), whose visual tokens then stay
    close to the fp32 ones; the trained parts stay fp32 either way."""
    from safetensors.torch import load_file

    from vpgtrans.bundle import load_model

    stored = {k[len("vision_model."):]: v for k, v in load_file(tiny["source"] / "model.safetensors").items()
              if k.startswith("vision_model.") and "post_layernorm" not in k}
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tokens = {}
    for dtype in (None, torch.bfloat16):
        model = load_model(inherited, dtype=dtype)
        state = model.vision.state_dict()
        assert sorted(state) == sorted(stored)
        for name, tensor in stored.items():
            assert state[name].dtype == (dtype or torch.float32)
            assert torch.equal(state[name], tensor.to(dtype or torch.float32))
        assert {p.dtype for p in model.visual.parameters()} == {torch.float32}
        with torch.no_grad():
            tokens[dtype] = model.encode_images(pixels.to(next(model.vision.parameters()).dtype))
    assert tokens[torch.bfloat16].dtype == torch.float32
    torch.testing.assert_close(tokens[torch.bfloat16], tokens[None], atol=0.1, rtol=0.05)


def test_export_is_sharded_in_one_dtype_and_loads_in_transformers(inherited, tmp_path):
    """--max-shard-size splits the weights as save_pretrained would (index + shards), every tensor in the
    one dtype config.json names, and the shards hold exactly the unsharded export's tensors."""
    from safetensors.torch import load_file
    from transformers import Blip2ForConditionalGeneration
    from typer.testing import CliRunner

    from test_cli import _ok, _run

    _ok(_run(CliRunner(), "export", inherited, "--out", tmp_path / "one"))
    _ok(_run(CliRunner(), "export", inherited, "--out", tmp_path / "sharded", "--max-shard-size", "300KB",
             "--dtype", "bf16"))
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    assert all((tmp_path / "sharded" / s).stat().st_size <= 300_000 + 50_000 for s in shards)  # + a header
    sharded = {k: v for s in shards for k, v in load_file(tmp_path / "sharded" / s).items()}
    whole = load_file(tmp_path / "one" / "model.safetensors")
    assert sorted(sharded) == sorted(whole) == sorted(index["weight_map"])
    assert {v.dtype for v in sharded.values()} == {torch.bfloat16}
    assert {v.dtype for v in whole.values()} == {torch.float32}  # the tiny LLM is stored in fp32
    assert all(torch.equal(sharded[k], whole[k].bfloat16()) for k in whole)
    assert json.loads((tmp_path / "sharded" / "config.json").read_text())["dtype"] == "bfloat16"
    model = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "sharded")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.equal(model.language_projection.weight, sharded["language_projection.weight"])


@pytest.mark.parametrize("value", ["5 apples", "0", "-3GB"])
def test_a_bad_shard_size_is_one_line_and_writes_nothing(inherited, tmp_path, value):
    from typer.testing import CliRunner

    from test_cli import _run, _user_error

    _user_error(_run(CliRunner(), "export", inherited, "--out", tmp_path / "x", "--max-shard-size", value),
                "--max-shard-size")
    assert not (tmp_path / "x").exists()
    _user_error(_run(CliRunner(), "export", inherited, "--format", "lavis", "--out", tmp_path / "x.pth",
                     "--max-shard-size", "1GB"), "--max-shard-size applies to --format hf")


def test_bf16_training_on_a_cpu_without_bf16_matmul_is_warned_about(monkeypatch):
    from vpgtrans import training

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    native = "avx512_bf16" in flags or "amx_bf16" in flags or "BF16" in torch.backends.cpu.get_cpu_capability()
    warning = training.slow_bf16_warning("bf16", torch.device("cpu"))
    assert (warning is None) == native
    assert training.slow_bf16_warning("no", torch.device("cpu")) is None
    assert training.slow_bf16_warning("bf16", torch.device("cuda", 0)) is None
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512_BF16")
    assert training.slow_bf16_warning("bf16", torch.device("cpu")) is None
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: "flags\t: fpu sse avx2 fma")
    warning = training.slow_bf16_warning("bf16", torch.device("cpu"))
    assert warning is not None and "\n" not in warning and "fp32" in warning


def test_bitsandbytes_cast_message_is_logged_once(caplog):
    """log_once on a fresh logger: repeats of a message are dropped, other messages pass; the 8-bit / 4-bit
    quantization config installs it (once) on bitsandbytes' matmul logger."""
    import logging

    from vpgtrans.model.assemble import _FirstOnly, log_once, quantization_config

    logger = logging.getLogger("vpgtrans.tests.real_shapes.once")
    log_once(logger)
    log_once(logger)  # idempotent: one filter
    with caplog.at_level(logging.WARNING, logger=logger.name):
        for _ in range(5):
            logger.warning("MatMul8bitLt: inputs will be cast from %s to float16 during quantization", torch.float32)
        logger.warning("another message")
    messages = [r.getMessage() for r in caplog.records if r.name == logger.name]
    assert len(messages) == 2 and messages[0].startswith("MatMul8bitLt: inputs will be cast from torch.float32")
    assert "logged once" in messages[0] and messages[1].startswith("another message")
    pytest.importorskip("bitsandbytes")
    quantization_config("8bit")
    quantization_config("4bit")
    bnb = logging.getLogger("bitsandbytes.autograd._functions")
    assert sum(isinstance(f, _FirstOnly) for f in bnb.filters) == 1


def test_the_small_preset_runs_every_command_and_cleans_up(tmp_path):
    """The benchmark end to end at tiny shapes (bf16 random checkpoints written one tensor at a time): every
    command succeeds, its memory readings are consistent, the export loads in one dtype, the 8-bit step
    logs bitsandbytes' message once, the table comes from the JSON, and the work dir is emptied."""
    out, work = tmp_path / "real_shapes.json", tmp_path / "work"
    done = subprocess.run([sys.executable, "-m", "benchmarks.real_shapes", "--preset", "small", "--steps", "8bit", "8bit-vit-bf16",
                           "--work-dir", str(work), "--out", str(out)], capture_output=True, text=True, cwd=ROOT,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())["small"]
    names = [r["name"] for r in result["commands"]]
    assert names == ["inspect source", "inspect target", "inherit", "export", "load export", "train step 8bit",
                     "train step 8bit-vit-bf16"]
    for record in result["commands"]:
        assert record["returncode"] == 0, record
        assert record["peak_rss_mib"] >= max(record["peak_anon_mib"], record["peak_file_mib"]) > 0
    load = next(r for r in result["commands"] if r["name"] == "load export")
    assert load["loaded"]["dtypes"] == ["torch.bfloat16"]
    assert result["export"]["config_dtype"] == "bfloat16" and len(result["export"]["files"]) > 1
    for step in ("train step 8bit", "train step 8bit-vit-bf16"):
        # bitsandbytes' per-call cast warning once; on a CPU with AVX512-BF16 bitsandbytes also says once, at
        # import, that it found no optional CPU kernel package: no message twice
        warnings = next(r for r in result["commands"] if r["name"] == step)["warnings"]
        assert sum("MatMul8bitLt" in w for w in warnings) == 1 and len(set(warnings)) == len(warnings) <= 2, warnings
    assert result["checkpoints"]["source"]["files"] > 2  # sharded at the preset's shard size, with an index
    from benchmarks.real_shapes import markdown

    table = markdown({"small": result})
    assert all(f"| small | {name} |" in table for name in names)
    assert sorted(p.name for p in work.iterdir()) == ["logs"]  # checkpoints, bundle, export, data removed


def test_a_run_that_fails_midway_leaves_no_checkpoint_behind(tmp_path, monkeypatch):
    """The checkpoints are ~35 GB at real shapes: a run that dies after writing them (here: the first
    measured command raises) must still delete them, or the next preset runs out of disk."""
    from benchmarks import real_shapes

    def write_one(preset, root, dtype):
        for name in ("source", "target"):
            (root / name).mkdir()
            (root / name / "model.safetensors").write_bytes(b"0" * 1024)
        raise RuntimeError("killed while measuring")

    monkeypatch.setattr(real_shapes, "build_checkpoints", write_one)
    with pytest.raises(RuntimeError, match="killed while measuring"):
        real_shapes.run("small", tmp_path, "bf16", ["8bit"], keep=False)
    assert list(tmp_path.iterdir()) == []


def test_step_weights_count_the_vit_in_the_dtype_the_step_holds_it():
    from benchmarks.real_shapes import STEPS, step_weights

    expected = {"target_8bit": 700, "target_4bit": 400, "target_fp32": 2800, "vision_and_vpg_fp32": 44,
                "vision_bf16_and_vpg_fp32": 24}
    assert {step: step_weights(expected, step) for step in STEPS} == {
        "fp32": 2844, "8bit": 744, "4bit": 444, "8bit-vit-bf16": 724, "4bit-vit-bf16": 424}


def test_the_docs_table_is_the_one_the_results_json_gives():
    from benchmarks.real_shapes import DOC_BEGIN, DOC_END, markdown

    results = ROOT / "benchmarks" / "results" / "real_shapes.json"
    if not results.is_file():
        pytest.skip("no real-shapes run recorded")
    docs = (ROOT / "docs" / "benchmarks.md").read_text()
    block = docs.split(DOC_BEGIN, 1)[1].split(DOC_END, 1)[0].strip()
    assert block == markdown(json.loads(results.read_text())).strip()
