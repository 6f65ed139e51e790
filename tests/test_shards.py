"""The one-tensor-at-a-time writer (``vpgtrans.formats.shards``) against the libraries that own the
format: its files must be byte-identical to ``safetensors.torch.save_file``'s and to ``save_pretrained``'s."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from vpgtrans.formats.shards import save_state_metas, write_safetensors, write_sharded


def test_a_file_is_byte_identical_to_safetensors_save_file(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {"b.weight": torch.randn(3, 5, generator=gen).to(torch.bfloat16),
               "a.weight": torch.randn(7, generator=gen),
               "ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
               "mask": torch.tensor([True, False, True]),
               "h": torch.randn(2, 2, generator=gen).half(),
               "q": torch.randint(-128, 127, (4, 3), generator=gen, dtype=torch.int8),
               "empty": torch.zeros(0, 4)}
    save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    produced = []

    def produce(name):
        produced.append(name)
        return tensors[name]

    size = write_safetensors(tmp_path / "ours.safetensors", {k: v.to("meta") for k, v in tensors.items()}, produce)
    ours, ref = (tmp_path / "ours.safetensors").read_bytes(), (tmp_path / "ref.safetensors").read_bytes()
    assert ours == ref and size == len(ref)
    assert sorted(produced) == sorted(tensors)  # each tensor asked for exactly once


def test_a_wrong_tensor_is_refused(tmp_path):
    with pytest.raises(ValueError, match="expected"):
        write_safetensors(tmp_path / "x.safetensors", {"w": torch.empty(2, 3, device="meta")},
                          lambda name: torch.zeros(3, 2))


def _tiny_models():
    from transformers import Blip2Config, Blip2ForConditionalGeneration, LlamaConfig, OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    opt = OPTForCausalLM(OPTConfig(hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=2,
                                   vocab_size=300, word_embed_proj_dim=32, max_position_embeddings=64))
    llama = LlamaConfig(hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_attention_heads=2,
                        num_key_value_heads=2, vocab_size=300, tie_word_embeddings=False)
    blip2 = Blip2ForConditionalGeneration(Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        qformer_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            encoder_hidden_size=32),
        text_config=llama.to_dict(), num_query_tokens=4))
    return {"opt": opt.to(torch.bfloat16), "blip2": blip2}


@pytest.mark.parametrize("shard_size", ["20KB", "50GB"])
def test_sharded_weights_are_those_of_save_pretrained(tmp_path, shard_size):
    for name, model in _tiny_models().items():
        ref, ours = tmp_path / name / "ref", tmp_path / name / "ours"
        model.save_pretrained(ref, max_shard_size=shard_size)
        ours.mkdir(parents=True)
        state = model.state_dict()
        metas = save_state_metas(model)
        files = write_sharded(ours, {k: v.to("meta") for k, v in metas.items()}, lambda key: state[key],
                              shard_size, model.num_parameters())
        written = sorted(f.name for f in files)
        assert written == sorted(p.name for p in ref.iterdir() if p.name.startswith("model"))
        assert (len(written) > 1) == (shard_size == "20KB")
        for file_name in written:
            assert (ours / file_name).read_bytes() == (ref / file_name).read_bytes(), (name, file_name)
        if len(written) > 1:
            index = json.loads((ours / "model.safetensors.index.json").read_text())
            assert len(index["weight_map"]) == len(metas)
