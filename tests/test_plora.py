"""``--connector plora``: LoRA at visual-token positions only, on a dense LLM (LLaMA) and on the fused experts of
MoE LLMs (Mixtral, Qwen2-MoE, OLMoE). Text-only logits stay bit-identical to the untouched LLM after training;
at visual positions the adapted weights compute what merged weights ``W + (α/r) B A`` compute."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import _metaspace_tokenizer, _randomise
from test_cli import _user_error
from vpgtrans import load_model
from vpgtrans.cli import app
from vpgtrans.errors import VpgtransError
from vpgtrans.model.adapters import TokenContext, insert_adapters
from vpgtrans.model.adapters.plora import MaskedLoRAExperts, MaskedLoRALinear, PLoRA
from vpgtrans.model.vlm import IMAGE_TOKEN_ID

IDS = torch.tensor([[1, 7, 12, 30, 5, 9], [1, 4, 4, 8, 21, 2]])


def _moe_config(model_type: str, vocab_size: int, tokenizer):
    from transformers import MixtralConfig, OlmoeConfig, Qwen2MoeConfig

    common = dict(hidden_size=40, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                  vocab_size=vocab_size, max_position_embeddings=96, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    if model_type == "mixtral":
        return MixtralConfig(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, **common)
    if model_type == "olmoe":
        return OlmoeConfig(intermediate_size=24, num_experts=4, num_experts_per_tok=2, **common)
    # Qwen2-MoE: layer 0 keeps a dense MLP (mlp_only_layers), layer 1 has routed experts + a shared expert.
    return Qwen2MoeConfig(intermediate_size=48, moe_intermediate_size=24, shared_expert_intermediate_size=32,
                          num_experts=4, num_experts_per_tok=2, mlp_only_layers=[0], **common)


def make_moe(path, model_type: str, seed: int = 5):
    from transformers import AutoModelForCausalLM

    tokenizer = _metaspace_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_moe_config(model_type, len(tokenizer), tokenizer))
    _randomise(model, seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {kind: make_moe(root / kind, kind) for kind in ("mixtral", "qwen2_moe", "olmoe")}


def _wrapped(path, entry, seed=0):
    """The LLM at ``path`` with plora inserted, its B (and A) set to random non-zero values."""
    from transformers import AutoModelForCausalLM

    llm = AutoModelForCausalLM.from_pretrained(path).eval()
    context = TokenContext()
    insert_adapters(llm, [entry], context)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in llm.named_parameters():
            if ".adapter." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return llm, context


def _merged(path, llm):
    """The untouched LLM with every wrapped weight replaced by ``W + (α/r) B A`` (per expert for experts)."""
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        for name, module in llm.named_modules():
            target = merged.get_submodule(name) if isinstance(module, (MaskedLoRALinear, MaskedLoRAExperts)) else None
            if isinstance(module, MaskedLoRALinear):
                a = module.adapter
                target.weight += a.scale * a.lora_B @ a.lora_A
            elif isinstance(module, MaskedLoRAExperts):
                a = module.adapter
                target.gate_up_proj += a.scale * a.gate_up_B @ a.gate_up_A
                target.down_proj += a.scale * a.down_B @ a.down_A
    return merged


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "olmoe"])
def test_moe_text_path_is_exact_and_visual_rows_compute_the_merged_experts(moe, model_type):
    from transformers import AutoModelForCausalLM

    llm, context = _wrapped(moe[model_type], {"type": "plora", "rank": 2, "alpha": 4, "dropout": 0.0,
                                              "targets": ["attention", "mlp"]})
    wrappers = {type(m).__name__ for m in llm.modules() if isinstance(m, (MaskedLoRALinear, MaskedLoRAExperts))}
    assert wrappers == {"MaskedLoRALinear", "MaskedLoRAExperts"}
    assert not any(".gate." in name and ".adapter." in name for name, _ in llm.named_parameters())  # routers untouched
    base = AutoModelForCausalLM.from_pretrained(moe[model_type]).eval()
    with torch.no_grad():
        assert torch.equal(llm(input_ids=IDS).logits, base(input_ids=IDS).logits)
        # Every position visual: each wrapped layer computes the merged weights' function (up to float order).
        everything = torch.ones_like(IDS, dtype=torch.bool)
        with context.call(everything):
            adapted = llm(input_ids=IDS).logits
        merged = _merged(moe[model_type], llm)(input_ids=IDS).logits
    torch.testing.assert_close(adapted, merged, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(adapted, base(input_ids=IDS).logits, atol=1e-3)


def test_moe_experts_wrapper_calls_the_original_forward_when_nothing_is_visual(moe, monkeypatch):
    llm, _ = _wrapped(moe["olmoe"], {"type": "plora", "targets": ["mlp.experts"]})
    experts = [m for m in llm.modules() if isinstance(m, MaskedLoRAExperts)]
    assert len(experts) == 2 and all(type(m.base_layer).__name__ == "OlmoeExperts" for m in experts)
    calls = []
    original = type(experts[0].base_layer).forward
    monkeypatch.setattr(type(experts[0].base_layer), "forward",
                        lambda self, *args: calls.append(args[0].shape) or original(self, *args))
    with torch.no_grad():
        llm(input_ids=IDS)
    assert calls == [(12, 40), (12, 40)]  # the flattened (B*T, D) tokens, once per layer


def test_target_table_refuses_unknown_types_and_names(moe, tiny):
    from transformers import AutoModelForCausalLM, GPT2Config

    with torch.device("meta"):
        gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=10))
    with pytest.raises(VpgtransError, match="no target table for LLMs of model type 'gpt2' .known: llama"):
        PLoRA.targets(gpt2, {"type": "plora"})
    llama = AutoModelForCausalLM.from_pretrained(tiny["llama"])
    with pytest.raises(VpgtransError, match=r"plora targets \['experts'\] are not known for llama"):
        PLoRA.targets(llama, {"type": "plora", "targets": ["experts"]})
    assert PLoRA.targets(llama, {"type": "plora", "targets": ["self_attn.v_proj"]}) == [
        "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]
    qwen = AutoModelForCausalLM.from_pretrained(moe["qwen2_moe"])
    paths = PLoRA.targets(qwen, {"type": "plora", "targets": ["mlp"]})
    assert paths == ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj",
                     "model.layers.1.mlp.experts", "model.layers.1.mlp.shared_expert.gate_proj",
                     "model.layers.1.mlp.shared_expert.up_proj", "model.layers.1.mlp.shared_expert.down_proj"]
    assert PLoRA.problems({"type": "plora", "rank": 0, "alpha": -1, "dropout": 1.5, "targets": [], "x": 1}) == [
        "plora has unknown keys ['x'] (it takes alpha, dropout, rank, targets)",
        "plora rank must be an integer >= 1 (got 0)", "plora alpha must be > 0 (got -1)",
        "plora dropout must be in [0, 1) (got 1.5)", "plora targets must be a non-empty list of names (got [])"]


def _text_logits_equal(bundle, llm_path, **load_options):
    from transformers import AutoModelForCausalLM

    ours = load_model(bundle, device="cpu", **load_options)
    if load_options.get("quantization"):
        from vpgtrans.model.assemble import keep_generic_4bit_path, quantization_config

        theirs = AutoModelForCausalLM.from_pretrained(llm_path, quantization_config=quantization_config(
            load_options["quantization"]), device_map={"": "cpu"}).eval()
        keep_generic_4bit_path(theirs)  # the same bitsandbytes kernel per layer as ours (see its docstring)
    else:
        theirs = AutoModelForCausalLM.from_pretrained(llm_path).eval()
    with torch.no_grad():
        assert torch.equal(ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits)


def _transfer(runner, tiny, target, out, *extra):
    result = runner.invoke(app, ["transfer", "--source", str(tiny["source"]), "--target-llm", str(target),
                                 "--data", str(tiny["caption"]), "--out", str(out), "--connector", "plora",
                                 "--max-steps", "3", "--batch-size", "4", "--finetune-lr", "3e-3", *extra])
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("target", ["llama", "mixtral"])
def test_plora_transfer_keeps_the_text_path_exact_and_changes_visual_positions(tiny, moe, tmp_path, target):
    runner = CliRunner()
    llm_path = tiny["llama"] if target == "llama" else moe[target]
    out = _transfer(runner, tiny, llm_path, tmp_path / "run", "--lora-rank", "4", "--lora-alpha", "8")
    summary = json.loads((out / "transfer.json").read_text())
    assert list(summary["stages"]) == ["inherit", "warmup", "finetune"] and summary["recipe"] == "plora"
    final = out / "finetune"
    manifest = json.loads((final / "manifest.json").read_text())
    assert manifest["model"]["adapters"] == [{"type": "plora", "rank": 4, "alpha": 8.0, "dropout": 0.05,
                                              "targets": ["attention", "mlp"]}]
    assert manifest["config"]["train"]["trainable"] == ["vpg", "connector", "plora"]
    start, trained = load_file(str(out / "inherit" / "plora.safetensors")), load_file(str(final / "plora.safetensors"))
    ups = [key for key in start if key.endswith("_B")]
    assert sorted(start) == sorted(trained) and ups and not any(start[key].any() for key in ups)  # B starts at 0
    # Every B of layer 0 trained (experts' included). In the last layer only k_proj / v_proj do: the other
    # outputs at visual positions reach no loss (their logits carry no label), so their gradient is exactly 0.
    moved = {key for key in ups if trained[key].abs().sum() > 0}
    assert {key for key in ups if key.startswith("model.layers.0.")} <= moved
    assert {key for key in ups if key.startswith("model.layers.1.")} & moved == {
        "model.layers.1.self_attn.k_proj.lora_B", "model.layers.1.self_attn.v_proj.lora_B"}
    if target == "mixtral":
        assert trained["model.layers.0.mlp.experts.gate_up_B"].shape == (4, 48, 4)
        assert not any(".gate." in key for key in trained)  # the router is no part of it
    # Text-only logits: bit-identical to the untouched LLM at init and after training.
    _text_logits_equal(out / "inherit", llm_path)
    _text_logits_equal(final, llm_path)

    model = load_model(final, device="cpu")
    ids = torch.tensor([[IMAGE_TOKEN_ID] * model.num_image_tokens + [1, 7, 12]])
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = model(input_ids=ids, pixel_values=pixels).logits
        for name, param in model.llm.named_parameters():
            if name.endswith("_B"):
                param.zero_()
        without = model(input_ids=ids, pixel_values=pixels).logits
    visual = model.num_image_tokens
    assert not torch.allclose(adapted[0, :visual], without[0, :visual], atol=1e-4)

    # Generation with the KV cache (prefill sees the mask, decode steps are text) equals a no-cache greedy loop.
    model = load_model(final, device="cpu")
    with torch.no_grad():
        generated = model.generate(ids, pixels, torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4,
                                   do_sample=False, pad_token_id=0)
        sequence = ids
        for _ in range(4):
            logits = model(input_ids=sequence, pixel_values=pixels).logits
            sequence = torch.cat([sequence, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        beams = model.generate(ids.repeat(2, 1), pixels.repeat(2, 1, 1, 1),
                               torch.ones(2, ids.shape[1], dtype=torch.long), max_new_tokens=3, num_beams=2,
                               do_sample=False, pad_token_id=0)
    assert generated[0].tolist() == sequence[0, ids.shape[1]:].tolist()
    assert beams.shape[0] == 2 and torch.equal(beams[0], beams[1])


def test_lora_flags_reach_the_manifest_and_bad_values_are_one_line_errors(tiny, tmp_path):
    runner = CliRunner()
    out = tmp_path / "inherit"
    result = runner.invoke(app, ["inherit", "--source", str(tiny["source"]), "--target-llm", str(tiny["llama"]),
                                 "--out", str(out), "--connector", "plora", "--lora-rank", "2",
                                 "--lora-dropout", "0", "--lora-targets", "self_attn.q_proj, self_attn.v_proj"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["adapters"] == [{"type": "plora", "rank": 2, "alpha": 16, "dropout": 0.0,
                                              "targets": ["self_attn.q_proj", "self_attn.v_proj"]}]
    assert sorted(load_file(str(out / "plora.safetensors"))) == sorted(
        f"model.layers.{i}.self_attn.{p}_proj.lora_{m}" for i in (0, 1) for p in "qv" for m in "AB")
    _user_error(runner.invoke(app, ["inherit", "--source", str(tiny["source"]), "--target-llm", str(tiny["llama"]),
                                    "--out", str(tmp_path / "bad"), "--connector", "plora", "--lora-rank", "0"]),
                "plora rank must be an integer >= 1")
    _user_error(runner.invoke(app, ["inherit", "--source", str(tiny["source"]), "--target-llm", str(tiny["llama"]),
                                    "--out", str(tmp_path / "bad"), "--lora-rank", "4"]),
                "it has no 'plora' adapter")
    assert not (tmp_path / "bad").exists()


@pytest.fixture(scope="module")
def plora_inherited(tiny, tmp_path_factory):
    from vpgtrans.config import InheritConfig
    from vpgtrans.stages.inherit import inherit

    return inherit(tiny["source"], tiny["llama"], tmp_path_factory.mktemp("plora") / "inherit",
                   InheritConfig(connector="plora", adapter_options={"plora": {"rank": 2}}))


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_plora_trains_on_a_quantised_llm_and_keeps_its_text_path(plora_inherited, tiny, tmp_path, quantization):
    pytest.importorskip("bitsandbytes")
    from vpgtrans.config import TrainConfig
    from vpgtrans.stages.train import run_stage
    from vpgtrans.training import RunOptions

    options = RunOptions(load_in_8bit=quantization == "8bit", load_in_4bit=quantization == "4bit")
    out = run_stage(plora_inherited, tiny["caption"], tmp_path / "q", TrainConfig(
        trainable=["connector", "plora"], lr=3e-3, max_steps=2, batch_size=4), "finetune", options=options)
    trained = load_file(str(out / "plora.safetensors"))
    assert all(trained[key].abs().sum() > 0 for key in trained if key.endswith("_B") and "layers.0." in key)
    model = load_model(out, device="cpu", quantization=quantization)
    layer = model.llm.get_submodule("model.layers.0.self_attn.q_proj")
    assert type(layer.base_layer).__name__ == ("Linear8bitLt" if quantization == "8bit" else "Linear4bit")
    _text_logits_equal(out, tiny["llama"], quantization=quantization)


def test_plora_resume_is_bit_identical(plora_inherited, tiny, tmp_path):
    from vpgtrans.config import TrainConfig
    from vpgtrans.stages.train import run_stage
    from vpgtrans.training import RunOptions

    config = TrainConfig(trainable=["vpg", "connector", "plora"], lr=3e-3, max_steps=4, batch_size=4)  # dropout 0.05

    class Injected(Exception):
        pass

    def fail_at_3(done, *_):  # (step, steps, loss[, lr])
        if done == 3:
            raise Injected

    reference = run_stage(plora_inherited, tiny["caption"], tmp_path / "ref", config, "finetune")
    with pytest.raises(Injected):  # after step 3: the checkpoint of step 2 is the latest
        run_stage(plora_inherited, tiny["caption"], tmp_path / "run", config, "finetune", progress=fail_at_3,
                  options=RunOptions(save_every=2))
    resumed = run_stage(plora_inherited, tiny["caption"], tmp_path / "run", config, "finetune",
                        options=RunOptions(save_every=2, resume=True))
    for name in ("plora.safetensors", "vpg.safetensors", "connector.safetensors"):
        ours, theirs = load_file(str(resumed / name)), load_file(str(reference / name))
        assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours), name


def _check(bundle, *extra):
    result = CliRunner().invoke(app, ["inspect", str(bundle), "--check-text-path", "--json", *extra])
    return result.exit_code, (json.loads(result.stdout) if result.stdout.startswith("{") else result.output)


def test_check_text_path_command(plora_inherited, inherited, tiny, tmp_path, monkeypatch):
    from vpgtrans.config import InheritConfig, TrainConfig
    from vpgtrans.stages.inherit import inherit
    from vpgtrans.stages.train import run_stage

    # plora after training (B != 0): promised and exact, on the built-in probes and on a given text.
    trained = run_stage(plora_inherited, tiny["caption"], tmp_path / "trained", TrainConfig(
        trainable=["plora"], lr=3e-3, max_steps=1, batch_size=4), "finetune")
    code, report = _check(trained, "--text", "a large blue circle on the right", "--text", "Question: ok?")
    assert code == 0 and report["promised"] and report["exact"] and report["max_abs_diff"] == 0.0
    assert [row["text"] for row in report["texts"]] == ["a large blue circle on the right", "Question: ok?"]
    assert report["adapters"] == ["plora"] and all(row["tokens"] > 1 for row in report["texts"])
    # linear: no adapter, exact.
    code, report = _check(inherited)
    assert code == 0 and report["promised"] and report["exact"] and len(report["texts"]) == 3
    # lavin at init: exact, but its adapters promise nothing (text routes through their own mixture).
    lavin = inherit(tiny["source"], tiny["llama"], tmp_path / "lavin", InheritConfig(connector="lavin"))
    code, report = _check(lavin)
    assert code == 0 and not report["promised"] and report["exact"]
    # A wrapper that breaks the promise (adds its delta everywhere) is caught: exit 1, the difference printed.
    from vpgtrans.model.adapters.plora import MaskedLoRALinear

    monkeypatch.setattr(MaskedLoRALinear, "forward", lambda self, x: self.base_layer(x) + self.adapter(x))
    result = CliRunner().invoke(app, ["inspect", str(trained), "--check-text-path"])
    assert result.exit_code == 1 and "DIFFERS (promised)" in result.stdout
    assert "promise exactly 0" in result.output
    _user_error(CliRunner().invoke(app, ["inspect", str(trained), "--text", "x"]), "go with --check-text-path")


def test_gradient_checkpointing_recomputes_with_the_token_context(plora_inherited, tiny, tmp_path):
    """The backward pass recomputes each block after the forward call (and its token context) has returned:
    the recomputation must see the original context (before the fix, checkpoint refused: 85 saved tensors in
    the forward, 29 in the recomputation without the LoRA)."""
    from vpgtrans.config import TrainConfig
    from vpgtrans.stages.train import run_stage
    from vpgtrans.training import RunOptions

    config = TrainConfig(trainable=["connector", "plora"], lr=3e-3, max_steps=2, batch_size=4)
    plain = run_stage(plora_inherited, tiny["caption"], tmp_path / "plain", config, "finetune")
    recomputed = run_stage(plora_inherited, tiny["caption"], tmp_path / "ckpt", config, "finetune",
                           options=RunOptions(gradient_checkpointing=True))
    ours, theirs = load_file(str(recomputed / "plora.safetensors")), load_file(str(plain / "plora.safetensors"))
    assert any(theirs[key].any() for key in theirs if key.endswith("_B"))
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-7)


def test_routing_report_counts_each_tokens_top_k_by_modality(moe, tiny, tmp_path):
    """Counts against an independent recount from the LLM's own router logits (output_router_logits)."""
    from vpgtrans.collate import Collator
    from vpgtrans.config import InheritConfig
    from vpgtrans.data import load_rows
    from vpgtrans.routing import routing_report
    from vpgtrans.stages.inherit import inherit

    bundle = inherit(tiny["source"], moe["mixtral"], tmp_path / "inherit", InheritConfig(connector="plora"))
    report = routing_report(bundle, tiny["caption"], max_samples=6, batch_size=6)
    assert (report["num_experts"], report["top_k"], report["samples"]) == (4, 2, 6)
    assert report["tokens"]["visual"] == 6 * 4  # 4 image slots per sample

    model = load_model(bundle, device="cpu")
    dataset, task, _ = load_rows(tiny["caption"])
    batch = Collator(model.tokenizer, model.template, task, model.num_image_tokens, model.image_processor,
                     False, mode="train")([dataset[i] for i in range(6)])
    kinds = torch.where(batch["attention_mask"] == 0, -1, (batch["input_ids"] == IMAGE_TOKEN_ID).long()).reshape(-1)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                    attention_mask=batch["attention_mask"], output_router_logits=True)
    assert report["tokens"]["text"] == int((kinds == 0).sum())
    for layer, logits in zip(report["layers"], out.router_logits):  # (B*T, E) per layer
        chosen = torch.topk(torch.softmax(logits.float(), -1), 2, dim=-1).indices
        for kind, key in ((1, "visual"), (0, "text")):
            expected = torch.bincount(chosen[kinds == kind].reshape(-1), minlength=4).tolist()
            assert [e[key] for e in layer["experts"]] == expected
        assert sum(e["visual"] for e in layer["experts"]) == 2 * report["tokens"]["visual"]
        assert sum(e["visual_load"] for e in layer["experts"]) == pytest.approx(1.0)
        assert all(e["visual_preference"] is None or 0 <= e["visual_preference"] <= 1 for e in layer["experts"])

    # The command: table, JSON and the heat map; a dense bundle is refused in one line.
    runner, out_dir = CliRunner(), tmp_path / "routing"
    result = runner.invoke(app, ["inspect", str(bundle), "--routing", "--data", str(tiny["caption"]), "--out",
                                 str(out_dir), "--max-samples", "6"])
    assert result.exit_code == 0, result.output
    assert "visual load | text load" in result.stdout
    saved = json.loads((out_dir / "routing.json").read_text())
    assert [[e["visual"] for e in layer["experts"]] for layer in saved["layers"]] == [
        [e["visual"] for e in layer["experts"]] for layer in report["layers"]]
    assert (out_dir / "routing.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # any form --data takes (issue 14): the .jsonl file itself gives the same counts
    result = runner.invoke(app, ["inspect", str(bundle), "--routing", "--data", str(tiny["caption"] / "data.jsonl"),
                                 "--json", "--max-samples", "6"])
    assert result.exit_code == 0, result.output
    assert [[e["visual"] for e in layer["experts"]] for layer in json.loads(result.stdout)["layers"]] == [
        [e["visual"] for e in layer["experts"]] for layer in report["layers"]]
    _user_error(runner.invoke(app, ["inspect", str(bundle.parent / "inherit"), "--routing"]), "--routing needs --data")
    dense = inherit(tiny["source"], tiny["llama"], tmp_path / "dense", InheritConfig(connector="plora"))
    _user_error(runner.invoke(app, ["inspect", str(dense), "--routing", "--data", str(tiny["caption"])]),
                "routing analysis needs an MoE LLM", "'llama'")


def test_benchmark_smoke_runs_every_arm_and_checks_the_text_path(tmp_path):
    """benchmarks/plora.py --smoke (random-weight tiny zoo + MoE, a few steps): plumbing; every arm's own lr
    search on the dev split; the text perplexity it reports is the base LLM's for linear and plora, not for LoRA
    on every token; a second call on the same --work-dir trains nothing; the docs section is the JSON's numbers."""
    import re
    import shutil
    from pathlib import Path

    from benchmarks import plora
    from benchmarks.common import fmt_spread, write_docs_section

    work = tmp_path / "work"
    argv = ["--smoke", "--no-plot", "--work-dir", str(work)]
    result = plora.main([*argv, "--out", str(tmp_path / "plora.json")])
    pairs = {(t, a) for t in ("llama-s", "moe-s") for a in ("linear", "plora", "lora-all")}
    rows = {(row["target"], row["arm"]): row for row in result["summary"]}
    assert set(rows) == pairs
    for target in ("llama-s", "moe-s"):
        assert rows[target, "linear"]["text_unchanged"] and rows[target, "plora"]["text_unchanged"]
        assert not rows[target, "lora-all"]["text_unchanged"]
        assert rows[target, "linear"]["llm_trainable"] == 0 and rows[target, "plora"]["llm_trainable"] > 0
    for run in result["runs"]:  # exactly the base LLM's perplexity, run by run
        perplexity = run["text_perplexity"]
        assert (perplexity["final"] == perplexity["base"]) is (run["arm"] != "lora-all")
    # every arm on every target searched the whole grid on the dev split (search seed, not a measured seed)
    # and picked its best final dev CIDEr (then best; ties: the smaller lr); its seeds trained at that lr
    searches = {(s["target"], s["arm"]): s for s in result["lr_search"]}
    assert set(searches) == pairs
    for key, search in searches.items():
        assert search["grid"] == [t["lr"] for t in search["trials"]] == [1e-3, 2e-3] and search["extended"] == []
        assert search["seed"] == 100 not in result["config"]["seeds"]
        assert {t["scored_on"] for t in search["trials"]} == {"caption_dev"}
        assert [p["step"] for p in search["trials"][0]["curve"]] == [p["step"] for p in result["runs"][0]["curve"]]
        best = max(search["trials"], key=lambda t: (t["final"], t["best"]))  # (max keeps the first: smaller lr)
        assert search["chosen_lr"] == best["lr"] == rows[key]["lr"]
        assert {(r["lr"], r["scored_on"]) for r in result["runs"] if (r["target"], r["arm"]) == key} == {
            (best["lr"], "caption_eval")}
    saved = json.loads((tmp_path / "plora.json").read_text())
    assert saved["summary"] == result["summary"] and saved["lr_search"] == result["lr_search"]
    # one record per trial and run; the training directories and the dev split are gone
    assert result["records"]["reused"] == 0 and len(list((work / "records").glob("*.json"))) == 12 + 6
    assert sorted(p.name for p in work.iterdir()) == ["records", "runs", "search"]
    assert not list((work / "runs").iterdir()) and not list((work / "search").iterdir())
    # a second call on the same work dir reads every trial and run back: nothing trains
    again = plora.main([*argv, "--out", str(tmp_path / "again.json")])
    assert again["records"]["reused"] == 12 + 6
    assert again["runs"] == result["runs"] and again["lr_search"] == result["lr_search"]
    # the docs section is the JSON's numbers, under the benchmark's heading in docs/benchmarks.md
    text = plora.markdown(saved)
    assert text.startswith(plora.DOCS_BEGIN) and text.endswith(plora.DOCS_END)
    for target in ("llama-s", "moe-s"):
        table = text.split(f"**{target}**")[1].split("lr search")[0]
        for row in (r for r in saved["summary"] if r["target"] == target):
            line = next(line for line in table.splitlines() if line.startswith(f"| {row['arm']} |"))
            edge = " (grid edge)" if row["at_grid_edge"] else ""  # (always, on a 2-lr grid)
            assert line.strip("| ").split(" | ")[1:] == [
                f"{row['lr']:g}{edge}", fmt_spread(row["final"]), fmt_spread(row["best"]),
                f"{row['perplexity_base']:.3f}", fmt_spread(row["perplexity_final"]),
                "yes" if row["text_unchanged"] else "no", f"{row['llm_trainable']:,}", fmt_spread(row["load"], 2)]
        for search in (s for s in saved["lr_search"] if s["target"] == target):
            trials = ", ".join(f"{t['lr']:g}: {t['final']:.3f}" for t in search["trials"])
            assert f"{search['arm']} {trials}" in text.split(f"**{target}**")[1]
    assert all(f"- {d}" in text for d in saved["deviations"]) and saved["deviations"][0].startswith("smoke run")
    docs = tmp_path / "benchmarks.md"
    shutil.copy(Path(__file__).parents[1] / "docs" / "benchmarks.md", docs)
    write_docs_section(text, plora.DOCS_BEGIN, plora.DOCS_END, docs)
    section = re.search(r"## plora on a dense and an MoE target \(issue 12\)\n(.*?)\n## ", docs.read_text(), re.S)
    assert section and text in section.group(1)


@pytest.mark.parametrize("name", ["llama", "opt"])
def test_dense_text_path_is_exact_and_visual_rows_compute_the_merged_weights(tiny, name):
    from transformers import AutoModelForCausalLM

    llm, context = _wrapped(tiny[name], {"type": "plora", "rank": 2, "alpha": 4, "dropout": 0.0})
    wrapped = [n for n, m in llm.named_modules() if isinstance(m, MaskedLoRALinear)]
    assert len(wrapped) == 2 * (4 + (3 if name == "llama" else 2))  # attention + mlp in both layers
    base = AutoModelForCausalLM.from_pretrained(tiny[name]).eval()
    with torch.no_grad():
        assert torch.equal(llm(input_ids=IDS).logits, base(input_ids=IDS).logits)
        # First three positions visual: the rest of each wrapped layer's rows keep the base output, so the
        # positions before the first visual one are the base model's exactly (causal attention).
        visual = torch.zeros_like(IDS, dtype=torch.bool)
        visual[:, 3:] = True
        with context.call(visual):
            mixed = llm(input_ids=IDS).logits
        everything = torch.ones_like(IDS, dtype=torch.bool)
        with context.call(everything):
            adapted = llm(input_ids=IDS).logits
        merged = _merged(tiny[name], llm)(input_ids=IDS).logits
        reference = base(input_ids=IDS).logits
    assert torch.equal(mixed[:, :3], reference[:, :3]) and not torch.allclose(mixed[:, 3:], reference[:, 3:])
    torch.testing.assert_close(adapted, merged, rtol=1e-4, atol=1e-4)


def test_finetune_command_trains_the_bundles_lora_too(plora_inherited, tiny, tmp_path):
    """warmup-projector -> finetune by hand on a plora bundle: stage 2 trains VPG + projector + the LoRA, as the
    plora recipe's fine-tune stage does (it trained VPG + projector only before)."""
    runner = CliRunner()
    warm, tuned = tmp_path / "warm", tmp_path / "tuned"
    for args in (["warmup-projector", str(plora_inherited), "--out", str(warm)],
                 ["finetune", str(warm), "--out", str(tuned), "--lr", "3e-3"]):
        result = runner.invoke(app, [*args, "--data", str(tiny["caption"]), "--max-steps", "2", "--batch-size", "4"])
        assert result.exit_code == 0, result.output
    assert json.loads((warm / "manifest.json").read_text())["config"]["train"]["trainable"] == ["connector"]
    assert json.loads((tuned / "manifest.json").read_text())["config"]["train"]["trainable"] == [
        "vpg", "connector", "plora"]
    trained = load_file(str(tuned / "plora.safetensors"))
    assert all(trained[key].any() for key in trained if key.endswith("_B") and "layers.0." in key)


@pytest.mark.parametrize("model_type", ["mistral", "qwen2", "qwen3"])
def test_the_other_llama_layout_types_of_the_table(tmp_path, model_type):
    """The table's other dense types (LLaMA's module names) wrap every attention + MLP linear and keep the
    text path exact; visual rows compute the merged weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=2, vocab_size=64, head_dim=16,
                                  max_position_embeddings=32, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / model_type)
    llm, context = _wrapped(tmp_path / model_type, {"type": "plora", "rank": 2, "alpha": 4, "dropout": 0.0})
    assert sum(isinstance(m, MaskedLoRALinear) for m in llm.modules()) == 2 * 7
    base = AutoModelForCausalLM.from_pretrained(tmp_path / model_type).eval()
    ids = IDS % 64
    with torch.no_grad():
        assert torch.equal(llm(input_ids=ids).logits, base(input_ids=ids).logits)
        with context.call(torch.ones_like(ids, dtype=torch.bool)):
            adapted = llm(input_ids=ids).logits
        merged = _merged(tmp_path / model_type, llm)(input_ids=ids).logits
    torch.testing.assert_close(adapted, merged, rtol=1e-4, atol=1e-4)
