"""The LaVIN connector: multi-layer [CLS] visual tokens + mixture-of-modality adapters in the frozen LLM."""

from __future__ import annotations

import json
import math
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from test_cli import _user_error
from vpgtrans import load_model
from vpgtrans.cli import app
from vpgtrans.config import InheritConfig
from vpgtrans.errors import VpgtransError
from vpgtrans.model.adapters.mma import GroupedUp, MixtureOfModalityLayer
from vpgtrans.model.visual.lavin import pick_layers
from vpgtrans.model.vlm import IMAGE_TOKEN_ID
from vpgtrans.stages.inherit import inherit

IDS = torch.tensor([[1, 7, 12, 30, 5, 9], [1, 4, 4, 8, 21, 2]])


@pytest.fixture(scope="module")
def lavin_bundles(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("lavin")
    return {name: inherit(tiny["source"], tiny[name], root / name, InheritConfig(connector="lavin"))
            for name in ("llama", "opt")}


def _base_logits(llm_path, ids):
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(llm_path).eval()(input_ids=ids).logits


@pytest.mark.parametrize("name", ["llama", "opt"])
def test_text_only_logits_equal_the_base_llm_at_init(lavin_bundles, tiny, name):
    model = load_model(lavin_bundles[name], device="cpu")
    wrapped = [m for m in model.llm.modules() if isinstance(m, MixtureOfModalityLayer)]
    assert len(wrapped) == 2  # one per decoder block
    with torch.no_grad():
        ours = model(input_ids=IDS).logits
    assert ours.shape[-1] == model.llm.config.vocab_size
    assert torch.equal(ours, _base_logits(tiny[name], IDS))


def test_manifest_parts_and_layers(lavin_bundles):
    manifest = json.loads((lavin_bundles["llama"] / "manifest.json").read_text())
    assert manifest["model"]["visual"] == {"type": "lavin", "layers": [1, 2], "hidden": 128}
    settings = {"rank": 8, "groups": 2, "tau": 10.0, "scale": 1.0, "dropout": 0.1}
    assert manifest["model"]["adapters"] == [{"type": "mma", **settings}, {"type": "mma-vision", **settings}]
    assert set(manifest["files"]) == {"connector.safetensors", "mma.safetensors", "mma-vision.safetensors"}
    vit = load_file(str(lavin_bundles["llama"] / "mma-vision.safetensors"))
    assert sorted(k for k in vit if k.endswith("router.weight")) == [
        f"encoder.layers.{i}.layer_norm1.router.weight" for i in (0, 1)]  # one per ViT block, no modality embedding
    assert not any("modality" in k for k in vit) and not any(vit[k].any() for k in vit if ".up." in k)
    mma = load_file(str(lavin_bundles["llama"] / "mma.safetensors"))
    # The modality embedding is saved once, with the first block's adapter.
    assert [k for k in mma if "modality" in k] == ["model.layers.0.input_layernorm.modality.weight"]
    assert not any(mma[k].any() for k in mma if ".up." in k)  # experts start at zero
    assert mma["model.layers.1.input_layernorm.up.0.weight"].shape == (40, 4)  # block-diagonal: D x r/groups
    opt = load_file(str(lavin_bundles["opt"] / "mma.safetensors"))
    assert "model.decoder.layers.1.self_attn_layer_norm.router.weight" in opt
    connector = load_file(str(lavin_bundles["llama"] / "connector.safetensors"))
    assert connector["fc1.weight"].shape == (128, 32) and connector["fc2.weight"].shape == (40, 128)


def test_pick_layers_follows_lavin():
    assert pick_layers(24, 6) == [4, 8, 12, 16, 20, 24]  # LaVIN: every 4th of ViT-L's 24
    assert pick_layers(32, 6) == [6, 11, 16, 22, 27, 32]
    assert pick_layers(2, 6) == [1, 2]


def test_grouped_up_is_a_block_diagonal_conv():
    up = GroupedUp(8, 12, 2)
    conv = torch.nn.Conv1d(8, 12, 1, groups=2)
    with torch.no_grad():
        up.weight.copy_(torch.randn(12, 4))
        up.bias.copy_(torch.randn(12))
        conv.weight.copy_(up.weight[:, :, None])
        conv.bias.copy_(up.bias)
    z = torch.randn(3, 5, 8)
    torch.testing.assert_close(up(z), conv(z.transpose(1, 2)).transpose(1, 2))


def _trained_like(model, seed=0):
    """Give every expert non-zero weights (as after training)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.llm.modules():
            if isinstance(module, MixtureOfModalityLayer):
                for up in module.adapter.up:
                    up.weight.copy_(torch.randn(up.weight.shape, generator=generator) * 0.5)
                    up.bias.copy_(torch.randn(up.bias.shape, generator=generator) * 0.5)


def test_adapter_output_against_a_hand_computation(lavin_bundles):
    model = load_model(lavin_bundles["llama"], device="cpu")
    _trained_like(model)
    layer = model.llm.model.layers[1].input_layernorm
    adapter = layer.adapter
    x = torch.randn(2, 3, 40)
    model.token_context.modality = torch.tensor([1, 0])
    with torch.no_grad():
        ours = layer(x)
        h = layer.base_layer(x)
        embedding = model.llm.model.layers[0].input_layernorm.adapter.modality.weight  # shared, owned by block 0
        for b, m in enumerate((1, 0)):
            logits = adapter.router.weight @ embedding[m] + adapter.router.bias
            w = torch.exp(logits / 10.0) / torch.exp(logits / 10.0).sum()
            z = adapter.down.weight @ h[b].T + adapter.down.bias[:, None]  # (r, T)
            delta = 0
            for k in range(2):
                W = adapter.up[k].weight  # (D, r/2): rows 0..19 read z[0:4], rows 20..39 read z[4:8]
                out = torch.cat([W[:20] @ z[:4], W[20:] @ z[4:]], dim=0) + adapter.up[k].bias[:, None]
                delta = delta + w[k] * out
            torch.testing.assert_close(ours[b], h[b] + delta.T, rtol=1e-5, atol=1e-5)
    model.token_context.modality = None


def test_vision_adapter_is_routed_by_each_image_cls(lavin_bundles):
    model = load_model(lavin_bundles["llama"], device="cpu")
    layer = model.vision.encoder.layers[1].layer_norm1
    with torch.no_grad():
        for up in layer.adapter.up:
            up.weight.normal_(0, 0.5)
        x = torch.randn(2, 17, 32)
        h = layer.base_layer(x)
        ours = layer(x)
        for b in range(2):
            w = torch.softmax((layer.adapter.router.weight @ h[b, 0] + layer.adapter.router.bias) / 10.0, dim=0)
            z = layer.adapter.down(h[b])
            delta = sum(w[k] * layer.adapter.up[k](z) for k in range(2))
            torch.testing.assert_close(ours[b], h[b] + delta, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(ours, h)


def test_mixed_batch_matches_each_sample_alone(lavin_bundles):
    """A batch with an image sample and a text-only sample ("Image: N/A", no slot) computes what each
    computes alone; the modality routes each sample to its own mixture."""
    model = load_model(lavin_bundles["llama"], device="cpu")
    _trained_like(model)
    n = model.num_image_tokens
    image_ids = torch.tensor([[1] + [IMAGE_TOKEN_ID] * n + [7, 12, 30]])
    text_ids = torch.tensor([[1, 4, 4, 8, 21, 2]])
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    width = max(image_ids.shape[1], text_ids.shape[1])
    pad = lambda ids: torch.cat([ids, torch.zeros(1, width - ids.shape[1], dtype=torch.long)], 1)  # noqa: E731
    mask = lambda ids: torch.cat([torch.ones_like(ids), torch.zeros(1, width - ids.shape[1], dtype=torch.long)], 1)  # noqa: E731
    with torch.no_grad():
        both = model(input_ids=torch.cat([pad(text_ids), pad(image_ids)]), pixel_values=pixels,
                     attention_mask=torch.cat([mask(text_ids), mask(image_ids)])).logits
        alone_text = model(input_ids=text_ids).logits
        alone_image = model(input_ids=image_ids, pixel_values=pixels).logits
        as_image = model.llm(inputs_embeds=model.llm.get_input_embeddings()(text_ids)).logits  # modality None: text
    torch.testing.assert_close(both[0, :text_ids.shape[1]], alone_text[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(both[1, :image_ids.shape[1]], alone_image[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(as_image, alone_text)
    # After training the experts, the text path changes too (LaVIN adapts text-only samples): only the
    # untrained model is exactly the base LLM.
    assert not torch.allclose(alone_text, load_model(lavin_bundles["llama"], device="cpu")(input_ids=text_ids).logits)
    with torch.no_grad():  # the image modality routes differently from the text one
        routed = {m: model.llm.model.layers[0].input_layernorm.adapter.weights(torch.tensor([m])) for m in (0, 1)}
    assert not torch.allclose(routed[0], routed[1])
    with pytest.raises(ValueError, match="exactly 2 image slots, or none"):
        model(input_ids=torch.tensor([[IMAGE_TOKEN_ID, 1, 2, 3], [1, 2, 3, 4]]), pixel_values=pixels)
    with pytest.raises(ValueError, match="1 samples hold image slots but 2 images"):
        model(input_ids=pad(image_ids), pixel_values=pixels.repeat(2, 1, 1, 1))


def test_generation_with_cache_equals_a_greedy_loop(lavin_bundles):
    model = load_model(lavin_bundles["llama"], device="cpu")
    _trained_like(model)
    n = model.num_image_tokens
    ids = torch.tensor([[1] + [IMAGE_TOKEN_ID] * n + [7, 12]])
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        generated = model.generate(ids, pixels, torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4,
                                   do_sample=False, pad_token_id=0)
        sequence = ids
        for _ in range(4):
            logits = model(input_ids=sequence, pixel_values=pixels).logits
            sequence = torch.cat([sequence, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert generated[0].tolist() == sequence[0, ids.shape[1]:].tolist()
    with torch.no_grad():  # beams: the modality is repeated with the batch (image sample + text-only sample)
        text = torch.tensor([[1, 7, 12] + [4] * n])
        beams = model.generate(torch.cat([ids, text]), pixels, torch.ones(2, ids.shape[1], dtype=torch.long),
                               max_new_tokens=3, num_beams=2, do_sample=False, pad_token_id=0)
        alone = model.generate(text, None, torch.ones_like(text), max_new_tokens=3, num_beams=2, do_sample=False,
                               pad_token_id=0)
    assert beams.shape[0] == 2 and beams[1].tolist() == alone[0].tolist()


def test_adapter_export_loads_and_computes_the_same(lavin_bundles, tiny, tmp_path):
    from vpgtrans.export import export_bundle
    from vpgtrans.recipes import stage
    from vpgtrans.stages.train import run_stage

    trained = run_stage(lavin_bundles["llama"], tiny["vqa"], tmp_path / "trained", stage("lavin", "finetune").config(
        max_steps=2, batch_size=4, lr=1e-2, warmup_fraction=0.0), "finetune")
    assert any(v.any() for k, v in load_file(str(trained / "mma.safetensors")).items() if ".up." in k)
    exported = export_bundle(trained, tmp_path / "export", format="adapter")
    model = load_model(trained, device="cpu")
    ids = torch.tensor([[1] + [IMAGE_TOKEN_ID] * model.num_image_tokens + [7, 12, 30], [1, 4, 4, 8, 21, 2]])
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(input_ids=ids, pixel_values=pixels).logits
        assert torch.equal(load_model(exported, device="cpu")(input_ids=ids, pixel_values=pixels).logits, expected)


def test_unknown_block_layouts_and_bad_options_are_one_line_errors(tiny, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from vpgtrans.model.adapters import TokenContext, insert_adapters
    from vpgtrans.model.connectors import CONNECTORS

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50))
    with pytest.raises(VpgtransError, match="does not know the decoder blocks of a gpt2 model"):
        insert_adapters(gpt2, list(CONNECTORS["lavin"].adapters), TokenContext())
    for options, expected in (({"mma": {"rank": 7}}, "rank 7 must be divisible by groups 2"),
                              ({"mma": {"tau": 0}}, "tau must be a positive number"),
                              ({"mma": {"dropout": 1.5}}, "dropout must be in"),
                              ({"mma": {"nope": 1}}, "mma has no option 'nope'")):
        with pytest.raises(VpgtransError, match=expected):
            inherit(tiny["source"], tiny["llama"], tmp_path / "bad", InheritConfig(connector="lavin",
                                                                                  adapter_options=options))
        assert not (tmp_path / "bad").exists()
    for options, expected in (({"layers": [0, 5]}, "indices in 0..2"), ({"hidden": 0}, "hidden must be"),
                              ({"pool": 2}, "no option 'pool'")):
        with pytest.raises(VpgtransError, match=expected):
            inherit(tiny["source"], tiny["llama"], tmp_path / "bad", InheritConfig(connector="lavin",
                                                                                  visual_options=options))


def test_options_reach_the_bundle(tiny, tmp_path):
    out = inherit(tiny["source"], tiny["llama"], tmp_path / "o", InheritConfig(
        connector="lavin", visual_options={"hidden": 16, "layers": [0, 1, 2]}, adapter_options={"mma": {"rank": 4,
                                                                                                     "tau": 5.0}}))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["visual"] == {"type": "lavin", "layers": [0, 1, 2], "hidden": 16}
    assert manifest["model"]["adapters"][0]["rank"] == 4 and manifest["model"]["adapters"][0]["tau"] == 5.0
    assert load_model(out, device="cpu").num_image_tokens == 3


def test_parameter_count_for_llama_7b_shapes_on_the_meta_device():
    """LaVIN-7B's trainable parameters, from shapes only (LLaMA-7B and ViT-L/14 built on the meta device
    from their configs, the connector's adapters inserted as for a bundle). LaVIN's own count is 3,781,296:
    32 LLM blocks x 81,930 (down 4096*8+8, two block-diagonal ups 2*(4096*4+4096), router 4096*2+2)
    + the modality embedding 2*4096 + 24 ViT-L blocks x 20,490 (the same adapter at width 1024)
    + the connector 1024*128+128 + 128*4096+4096."""
    from transformers import LlamaConfig

    from vpgtrans.model.assemble import build_model, build_visual
    from vpgtrans.model.connectors import CONNECTORS
    from vpgtrans.model.spec import ModelSpec
    from vpgtrans.model.vlm import build_vision_encoder

    vit_l = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
             "image_size": 224, "patch_size": 14}
    spec = ModelSpec(vision={"config": vit_l}, visual={"type": "lavin", "layers": pick_layers(24, 6), "hidden": 128},
                     llm={"model_type": "llama", "hidden_size": 4096, "vocab_size": 32000, "is_encoder_decoder": False},
                     image_processor={"image_size": 224, "image_mean": [0.5] * 3, "image_std": [0.5] * 3},
                     adapters=list(CONNECTORS["lavin"].adapters))
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=4096, intermediate_size=11008,
                                                           num_hidden_layers=32, num_attention_heads=32, vocab_size=32000))
        vision = build_vision_encoder(vit_l)
        visual = build_visual(spec)
    model = build_model(spec, vision, visual, llm)
    counts = {part.name: sum(p.numel() for p in part.parameters(model)) for part in model.parts}
    assert counts == {"connector": 1024 * 128 + 128 + 128 * 4096 + 4096, "mma": 32 * 81_930 + 2 * 4096,
                      "mma-vision": 24 * 20_490}
    assert sum(counts.values()) == 3_781_296
    # Each parameter is in exactly one part (the shared modality embedding once), and the frozen bases hold none.
    ids = [id(p) for part in model.parts for p in part.parameters(model)]
    assert len(ids) == len(set(ids))
    assert model.num_image_tokens == 6


def test_cli_transfer_with_lavin_flags_and_4bit(tiny, tmp_path):
    """``transfer --connector lavin`` with the friendly flags, on a 4-bit (NF4, bitsandbytes on the CPU)
    frozen LLM: the options reach the bundle, the recipe's lr follows the batch, the adapters train."""
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["transfer", "--source", str(tiny["source"]), "--target-llm", str(tiny["llama"]),
                                      "--data", str(tiny["vqa"]), "--out", str(out), "--connector", "lavin",
                                      "--lavin-hidden", "16", "--lavin-layers", "0,2", "--mma-rank", "4",
                                      "--mma-tau", "5", "--max-steps", "2", "--batch-size", "4", "--load-in-4bit"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "finetune" / "manifest.json").read_text())
    assert manifest["model"]["visual"] == {"type": "lavin", "layers": [0, 2], "hidden": 16}
    assert [(a["type"], a["rank"], a["tau"]) for a in manifest["model"]["adapters"]] == [("mma", 4, 5.0),
                                                                                         ("mma-vision", 4, 5.0)]
    train = manifest["config"]["train"]
    assert train["lr"] == pytest.approx(9e-3 * 4 / 256) and train["betas"] == [0.9, 0.95]
    assert train["weight_decay"] == 0.02 and train["trainable"] == ["connector", "mma", "mma-vision"]
    assert manifest["config"]["run"]["load_in_4bit"] is True
    assert manifest["metrics"]["train"]["steps"] == 2 and math.isfinite(manifest["metrics"]["train"]["final_loss"])
    start = load_file(str(out / "inherit" / "mma.safetensors"))
    trained = load_file(str(out / "finetune" / "mma.safetensors"))
    ups = [k for k in start if ".up." in k and k.endswith("weight")]
    assert not any(start[k].any() for k in ups) and all(trained[k].any() for k in ups)


@pytest.mark.parametrize("args, fragments", [
    (["--lavin-layers", "a,b"], ("--lavin-layers must be comma-separated",)),
    (["--mma-rank", "3"], ("mma rank 3 must be divisible by groups 2",)),
    (["--lavin-hidden", "16", "--connector", "linear"], ("qformer visual kind takes no options",)),
    (["--mma-rank", "4", "--connector", "linear"], ("no 'mma' adapter",)),
])
def test_cli_lavin_flag_errors(tiny, tmp_path, args, fragments):
    command = ["inherit", "--source", str(tiny["source"]), "--target-llm", str(tiny["llama"]), "--out", str(tmp_path / "o")]
    if "--connector" not in args:
        command += ["--connector", "lavin"]
    _user_error(CliRunner().invoke(app, command + args), *fragments)
    assert not (tmp_path / "o").exists()


def test_inspect_counts_the_trainable_parameters(lavin_bundles):
    """``inspect --json`` on a LaVIN bundle: per part and in total, against the shapes' formula
    (tiny LLaMA: D 40, 2 blocks; tiny ViT: 32 wide, 2 blocks; rank 8, 2 groups, hidden 128)."""
    def adapter(d, r=8, g=2):
        return (d * r + r) + 2 * (d * (r // g) + d) + (d * 2 + 2)  # down, two block-diagonal ups, router

    result = CliRunner().invoke(app, ["inspect", str(lavin_bundles["llama"]), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    files = {name: entry["params"] for name, entry in info["files"].items()}
    assert files == {"connector.safetensors": 32 * 128 + 128 + 128 * 40 + 40,
                     "mma.safetensors": 2 * adapter(40) + 2 * 40,  # + the modality embedding, once
                     "mma-vision.safetensors": 2 * adapter(32)}
    assert info["trainable_params"] == sum(files.values()) == 12_384


def test_resume_after_a_crash_is_bit_identical(lavin_bundles, tmp_path):
    """A LaVIN stage (dropout in both adapters, rows with and without images, warm-up then cosine) killed
    after step 3 and resumed from its step-2 checkpoint ends with the uninterrupted run's exact weights."""
    from vpgtrans.demo.choices import make_choice_split
    from vpgtrans.recipes import stage
    from vpgtrans.stages.train import run_stage
    from vpgtrans.training import RunOptions

    data = make_choice_split(tmp_path / "mc", 16, seed=3, text_fraction=0.4)
    config = stage("lavin", "finetune").config(max_steps=5, batch_size=4, log_every=1)

    class Injected(Exception):
        pass

    def fail_at_3(done, steps, loss, lr=None):
        if done == 3:
            raise Injected

    reference = run_stage(lavin_bundles["llama"], data, tmp_path / "reference", config, "finetune")
    with pytest.raises(Injected):
        run_stage(lavin_bundles["llama"], data, tmp_path / "run", config, "finetune", progress=fail_at_3,
                  options=RunOptions(save_every=2))
    resumed = run_stage(lavin_bundles["llama"], data, tmp_path / "run", config, "finetune",
                        options=RunOptions(save_every=2, resume=True))
    for name in ("connector", "mma", "mma-vision"):
        ours, theirs = load_file(str(resumed / f"{name}.safetensors")), load_file(str(reference / f"{name}.safetensors"))
        assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours), name
    assert json.loads((resumed / "manifest.json").read_text())["metrics"]["train"]["resumed"] is True


def test_two_processes_equal_one_process(tiny, tmp_path):
    """``transfer --connector lavin`` under torchrun with 2 processes (gloo on CPU) trains the same weights as
    one process (adapter dropout 0: dropout streams differ per process by design)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from vpgtrans.demo.choices import make_choice_split

    script = Path(sys.executable).parent / "vpgtrans"
    if not script.is_file():
        pytest.skip("the vpgtrans console script is not installed next to this Python (pip install -e .)")
    data = make_choice_split(tmp_path / "mc", 16, seed=3, text_fraction=0.4)
    args = ["transfer", "--source", str(tiny["source"]), "--target-llm", str(tiny["llama"]), "--data", str(data),
            "--connector", "lavin", "--mma-dropout", "0", "--max-steps", "3", "--batch-size", "4"]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), *args,
                           "--out", str(tmp_path / "two")], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = CliRunner().invoke(app, args + ["--out", str(tmp_path / "one")])
    assert result.exit_code == 0, result.output
    two, one = tmp_path / "two" / "finetune", tmp_path / "one" / "finetune"
    assert json.loads((two / "manifest.json").read_text())["config"]["num_processes"] == 2
    for name in ("connector", "mma", "mma-vision"):
        x, y = load_file(str(two / f"{name}.safetensors")), load_file(str(one / f"{name}.safetensors"))
        for key in x:
            torch.testing.assert_close(x[key], y[key], atol=1e-6, rtol=0, msg=f"{name}:{key}")
    start = load_file(str(tmp_path / "one" / "inherit" / "mma.safetensors"))
    assert any(not torch.equal(start[k], x) for k, x in load_file(str(one / "mma.safetensors")).items())


def test_8bit_training_step(lavin_bundles, tiny, tmp_path):
    """A LaVIN step on an 8-bit (LLM.int8, bitsandbytes on the CPU) frozen LLM trains the adapters."""
    from vpgtrans.recipes import stage
    from vpgtrans.stages.train import run_stage
    from vpgtrans.training import RunOptions

    out = run_stage(lavin_bundles["opt"], tiny["vqa"], tmp_path / "run", stage("lavin", "finetune").config(
        max_steps=1, batch_size=4, lr=1e-2, warmup_fraction=0.0), "finetune", options=RunOptions(load_in_8bit=True))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["run"]["load_in_8bit"] is True and math.isfinite(manifest["metrics"]["train"]["final_loss"])
    trained = load_file(str(out / "mma.safetensors"))
    assert all(trained[k].any() for k in trained if k.endswith("up.0.weight"))
    model = load_model(out, device="cpu", quantization="8bit")
    assert any(type(m).__name__ == "Linear8bitLt" for m in model.llm.modules())


def test_gradient_checkpointing_gives_the_same_step(lavin_bundles, tmp_path):
    """With --gradient-checkpointing the backward pass recomputes the blocks after the call that set the
    modality has returned: the step must still route every sample by its own modality (mixed rows)."""
    from vpgtrans.demo.choices import make_choice_split
    from vpgtrans.recipes import stage
    from vpgtrans.stages.train import run_stage
    from vpgtrans.training import RunOptions

    data = make_choice_split(tmp_path / "mc", 8, seed=4, text_fraction=0.5)
    config = stage("lavin", "finetune").config(max_steps=2, batch_size=8, lr=1e-2, warmup_fraction=0.0)
    plain = run_stage(lavin_bundles["llama"], data, tmp_path / "plain", config, "finetune")
    ckpt = run_stage(lavin_bundles["llama"], data, tmp_path / "ckpt", config, "finetune",
                     options=RunOptions(gradient_checkpointing=True))
    for name in ("connector", "mma", "mma-vision"):
        x, y = load_file(str(plain / f"{name}.safetensors")), load_file(str(ckpt / f"{name}.safetensors"))
        for key in x:
            torch.testing.assert_close(x[key], y[key], rtol=1e-5, atol=1e-6, msg=f"{name}:{key}")


def test_a_text_only_batch_gives_the_visual_parts_zero_gradients(lavin_bundles):
    """Under DDP every process must give every trained parameter a gradient, even when its micro-batch has
    no image: the visual parts get exact zeros and the logits keep their values."""
    from vpgtrans.training import set_trainable

    model = load_model(lavin_bundles["llama"], device="cpu")
    set_trainable(model, ["connector", "mma", "mma-vision"])
    out = model(input_ids=IDS)
    out.logits.float().sum().backward()
    for name in ("connector", "mma-vision"):
        grads = [p.grad for p in model.part(name).parameters(model)]
        assert all(g is not None and not g.any() for g in grads), name
    assert any(p.grad.any() for p in model.part("mma").parameters(model))
    with torch.no_grad():
        assert torch.equal(out.logits, model(input_ids=IDS).logits)


def test_lavin_llm_has_no_vit_adapters(tiny, tmp_path):
    """``--connector lavin-llm``: LaVIN without the ViT adapters; its recipe trains connector + mma."""
    from vpgtrans.recipes import stage

    out = inherit(tiny["source"], tiny["llama"], tmp_path / "o", InheritConfig(connector="lavin-llm"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert [a["type"] for a in manifest["model"]["adapters"]] == ["mma"]
    assert set(manifest["files"]) == {"connector.safetensors", "mma.safetensors"}
    assert stage("lavin-llm", "finetune").config().trainable == ["connector", "mma"]
    model = load_model(out, device="cpu")
    assert not any(isinstance(m, MixtureOfModalityLayer) for m in model.vision.modules())
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, _base_logits(tiny["llama"], IDS))


@pytest.mark.parametrize("options", [dict(dtype="bf16"), dict(vision_dtype="bf16")], ids=["dtype", "vision-dtype"])
def test_vit_adapters_keep_fp32_master_weights_when_the_vit_is_16_bit(lavin_bundles, tiny, tmp_path, monkeypatch,
                                                                      options):
    """With the ViT stored in bf16 (--dtype bf16, or --vision-dtype bf16 with fp32 compute) the mma-vision
    adapters trained inside it keep fp32 weights: the step trains them and saves fp32 updates finer than bf16's
    resolution."""
    from vpgtrans.recipes import stage
    from vpgtrans.stages import train as train_module
    from vpgtrans.stages.train import run_stage
    from vpgtrans.training import RunOptions

    captured, real = {}, train_module.load_model
    monkeypatch.setattr(train_module, "load_model", lambda *a, **k: captured.setdefault("model", real(*a, **k)))
    config = stage("lavin", "finetune").config(max_steps=1, batch_size=4, lr=1e-2, warmup_fraction=0.0)
    out = run_stage(lavin_bundles["llama"], tiny["vqa"], tmp_path / "run", config, "finetune",
                    options=RunOptions(**options))
    vision = captured["model"].vision
    trained = {n for n, p in vision.named_parameters() if p.requires_grad}
    assert trained and all(".adapter." in n for n in trained)
    assert {p.dtype for n, p in vision.named_parameters() if n in trained} == {torch.float32}
    assert {p.dtype for n, p in vision.named_parameters() if n not in trained and ".adapter." not in n} == {torch.bfloat16}
    before = load_file(str(lavin_bundles["llama"] / "mma-vision.safetensors"))
    after = load_file(str(out / "mma-vision.safetensors"))
    assert {t.dtype for t in after.values()} == {torch.float32}
    changed = [k for k in after if not torch.equal(before[k], after[k])]
    assert changed and any(not torch.equal(after[k], after[k].bfloat16().float()) for k in changed)
