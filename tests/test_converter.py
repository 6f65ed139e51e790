"""The word converter: token pairing by surface form, the ridge fit, the projector merge."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import _byte_level_tokenizer, _metaspace_tokenizer
from vpgtrans.converter import (TokenPairs, fit_converter, fit_ridge, merge_projector, pair_tokens,
                                surface_forms)
from vpgtrans.errors import VpgtransError


@pytest.fixture(scope="module")
def tokenizers():
    return _byte_level_tokenizer(), _metaspace_tokenizer()


def _reference_ridge(x, y, w, ridge):
    """Independent weighted ridge: sqrt-weighted rows, penalty rows appended, solved by lstsq in numpy."""
    x, y, w = x.double().numpy(), y.double().numpy(), w.double().numpy()
    n, d = x.shape
    xa = np.concatenate([x, np.ones((n, 1))], axis=1)
    lam = ridge * np.mean((x ** 2 * w[:, None]).sum(axis=0))  # ridge x mean diagonal of the weighted Gram
    sw = np.sqrt(w)[:, None]
    penalty = np.concatenate([np.sqrt(lam) * np.eye(d), np.zeros((d, 1))], axis=1)  # bias not penalised
    a = np.concatenate([xa * sw, penalty])
    b = np.concatenate([y * sw, np.zeros((d, y.shape[1]))])
    solution, *_ = np.linalg.lstsq(a, b, rcond=None)
    return solution[:d].T, solution[d]


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-8), (torch.float32, 2e-5)])
@pytest.mark.parametrize("ridge", [0.0, 1e-3, 0.5])
def test_fit_ridge_matches_independent_weighted_least_squares(ridge, dtype, rtol):
    # float64 inputs: float64 throughout; float32 tables: the two big products in float32 (the speed-up
    # benchmarks/converter_fit measures), so agreement to float32 rounding only.
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(80, 6, generator=g) * 3 + 1, torch.randn(80, 5, generator=g)
    w = torch.rand(80, generator=g) * 4 + 0.1
    weight, bias = fit_ridge(x.to(dtype), y.to(dtype), w, ridge)
    ref_weight, ref_bias = _reference_ridge(x, y, w, ridge)
    assert weight.shape == (5, 6) and bias.shape == (5,)
    np.testing.assert_allclose(weight.numpy(), ref_weight, rtol=rtol, atol=rtol * 1e-2)
    np.testing.assert_allclose(bias.numpy(), ref_bias, rtol=rtol, atol=rtol * 1e-2)


def test_fit_ridge_unweighted_equals_torch_lstsq():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(50, 4, generator=g, dtype=torch.float64), torch.randn(50, 3, generator=g, dtype=torch.float64)
    weight, bias = fit_ridge(x, y, ridge=0.0)
    solution = torch.linalg.lstsq(torch.cat([x, torch.ones(50, 1, dtype=torch.float64)], 1), y).solution
    torch.testing.assert_close(weight, solution[:4].T)
    torch.testing.assert_close(bias, solution[4])


def test_fit_converter_recovers_an_exact_linear_map():
    g = torch.Generator().manual_seed(2)
    source = torch.randn(300, 12, generator=g)
    a, b = torch.randn(9, 12, generator=g), torch.randn(9, generator=g)
    target = source @ a.T + b  # vocab aligned: token i of the source is token i of the target
    ids = torch.arange(300)
    pairs = TokenPairs(ids, ids, torch.ones(300, dtype=torch.float64), exact=300, lowercase=0, special=0)
    weight, bias, stats = fit_converter(source, target, pairs, ridge=1e-10, heldout_fraction=0.1)
    torch.testing.assert_close(weight, a, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(bias, b, atol=1e-4, rtol=1e-4)
    assert stats["heldout_pairs"] == 30
    assert stats["heldout_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert stats["train_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert "warning" not in stats


def test_fit_converter_heldout_cosine_is_low_for_unrelated_spaces():
    g = torch.Generator().manual_seed(3)
    source, target = torch.randn(200, 8, generator=g), torch.randn(200, 8, generator=g)
    ids = torch.arange(200)
    pairs = TokenPairs(ids, ids, torch.ones(200, dtype=torch.float64), 200, 0, 0)
    _, _, stats = fit_converter(source, target, pairs)
    assert stats["heldout_cosine"] < 0.5  # nothing to learn: the report must say so


def test_merge_projector_is_converter_after_projector():
    g = torch.Generator().manual_seed(4)
    w_s, b_s = torch.randn(7, 5, generator=g), torch.randn(7, generator=g)  # projector: D_q 5 -> D_s 7
    w_w, b_w = torch.randn(6, 7, generator=g), torch.randn(6, generator=g)  # converter: D_s 7 -> D_t 6
    w_t, b_t = merge_projector(w_w, b_w, w_s, b_s)
    assert w_t.shape == (6, 5) and b_t.shape == (6,)
    x = torch.randn(10, 5, generator=g)
    expected = (x @ w_s.T + b_s) @ w_w.T + b_w  # g(f(x))
    torch.testing.assert_close(x @ w_t.T + b_t, expected, atol=1e-5, rtol=1e-5)


def test_merge_projector_rejects_mismatched_dims():
    with pytest.raises(VpgtransError, match="converter input dim 7"):
        merge_projector(torch.zeros(6, 7), torch.zeros(6), torch.zeros(8, 5), torch.zeros(8))


def test_surface_forms_undo_byte_level_and_metaspace_markers(tokenizers):
    byte_level, metaspace = tokenizers
    assert "Ġred" in byte_level.get_vocab() and "▁red" in metaspace.get_vocab()
    byte_forms, meta_forms = surface_forms(byte_level), surface_forms(metaspace)
    assert byte_forms[" red"] == byte_level.convert_tokens_to_ids("Ġred")
    assert meta_forms[" red"] == metaspace.convert_tokens_to_ids("▁red")
    for forms, tok in ((byte_forms, byte_level), (meta_forms, metaspace)):
        assert not set(forms.values()) & set(tok.all_special_ids)  # specials are paired by role only


def test_pair_tokens_pairs_same_words_and_specials_by_role(tokenizers):
    byte_level, metaspace = tokenizers
    pairs = pair_tokens(byte_level, metaspace)
    mapping = dict(zip(pairs.target_ids.tolist(), pairs.source_ids.tolist()))
    for word in ("red", "circle", "square", "blue"):
        assert mapping[metaspace.convert_tokens_to_ids("▁" + word)] == byte_level.convert_tokens_to_ids("Ġ" + word)
    # Special tokens by role: the target's BOS <s> and EOS </s> both map to the source's </s> (BOS = EOS there).
    assert mapping[metaspace.bos_token_id] == byte_level.bos_token_id
    assert mapping[metaspace.eos_token_id] == byte_level.eos_token_id
    assert mapping[metaspace.unk_token_id] == byte_level.unk_token_id
    assert pairs.special == 3  # bos, eos, unk (the target's pad is its eos, already paired)
    assert pairs.exact + pairs.lowercase + pairs.special + pairs.byte == len(pairs.target_ids)
    assert len(set(pairs.target_ids.tolist())) == len(pairs.target_ids)
    torch.testing.assert_close(pairs.weights, torch.ones(len(pairs.target_ids), dtype=torch.float64))


def _train(kind, texts, vocab_size, specials):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>" if kind == "metaspace" else None))
    if kind == "byte":
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
        alphabet = []
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                        initial_alphabet=alphabet))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def test_non_ascii_survives_byte_level_decoding():
    texts = ["un café au lait, été, éléphant"] * 20
    byte_level = _train("byte", texts, 300, ["<unk>"])
    metaspace = _train("metaspace", texts, 120, ["<unk>"])
    byte_forms = surface_forms(byte_level)
    assert "é" in byte_forms  # two bytes "Ã©" decoded to one character
    assert byte_level.convert_ids_to_tokens(byte_forms["é"]) == "Ã©"
    café = [t for t in byte_forms if "café" in t]
    assert café, "a merged token holding 'café' should keep its accent"
    pairs = pair_tokens(byte_level, metaspace)
    mapping = dict(zip(pairs.target_ids.tolist(), pairs.source_ids.tolist()))
    assert mapping[metaspace.convert_tokens_to_ids("é")] == byte_forms["é"]


def test_corpus_weights_change_the_fit(tokenizers):
    byte_level, metaspace = tokenizers
    plain = pair_tokens(byte_level, metaspace)
    weighted = pair_tokens(byte_level, metaspace, corpus=["a red circle"] * 50 + ["a blue square"])
    assert torch.equal(plain.target_ids, weighted.target_ids)
    red = (weighted.target_ids == metaspace.convert_tokens_to_ids("▁red")).nonzero().item()
    blue = (weighted.target_ids == metaspace.convert_tokens_to_ids("▁blue")).nonzero().item()
    assert weighted.weights[red] > weighted.weights[blue] > 1.0
    assert weighted.weights.min() == 1.0  # unseen tokens keep weight 1
    g = torch.Generator().manual_seed(5)
    source, target = torch.randn(len(byte_level), 8, generator=g), torch.randn(len(metaspace), 6, generator=g)
    w_plain, _, _ = fit_converter(source, target, plain)
    w_weighted, _, _ = fit_converter(source, target, weighted)
    assert not torch.allclose(w_plain, w_weighted, atol=1e-4)


def test_no_shared_tokens_is_an_error():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    left = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"xa": 0, "xb": 1})))
    right = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"yc": 0, "yd": 1})))
    with pytest.raises(VpgtransError, match="share no tokens"):
        pair_tokens(left, right)


def _word_level(vocab, **special):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token=special.get("unk_token"))),
                                   **special)


def test_lowercase_fallback_only_when_no_exact_match():
    source = _word_level({"red": 0, "Blue": 1, "blue": 2})
    target = _word_level({"Red": 0, "Blue": 1, "green": 2})
    pairs = pair_tokens(source, target)
    assert dict(zip(pairs.target_ids.tolist(), pairs.source_ids.tolist())) == {0: 0, 1: 1}  # Blue stays exact
    assert (pairs.exact, pairs.lowercase, pairs.special) == (1, 1, 0)
    strict = pair_tokens(source, target, lowercase_fallback=False)
    assert strict.target_ids.tolist() == [1] and strict.source_ids.tolist() == [1]


def test_specials_alone_are_paired_by_role():
    source = _word_level({"<unk>": 0, "xa": 1}, unk_token="<unk>")
    target = _word_level({"yb": 0, "[UNK]": 1}, unk_token="[UNK]")
    pairs = pair_tokens(source, target)
    assert (pairs.target_ids.tolist(), pairs.source_ids.tolist(), pairs.special) == ([1], [0], 1)


def _pairs_on_tables(n_pairs=600, d_s=24, d_t=40, seed=0):
    """Tables with shared rows related by a noisy linear map; pairs at shuffled ids, random weights."""
    g = torch.Generator().manual_seed(seed)
    source = torch.randn(900, d_s, generator=g) + 0.7  # an offset, as real embedding tables have
    target = torch.randn(800, d_t, generator=g)
    source_ids, target_ids = torch.randperm(900, generator=g)[:n_pairs], torch.randperm(800, generator=g)[:n_pairs]
    target[target_ids] = source[source_ids] @ torch.randn(d_t, d_s, generator=g).T + 0.4 * torch.randn(n_pairs, d_t, generator=g)
    pairs = TokenPairs(source_ids, target_ids, 1 + torch.rand(n_pairs, generator=g).double(), n_pairs, 0, 0)
    return source, target, pairs


def test_fit_converter_is_a_heldout_fit_and_a_fit_on_all_pairs(monkeypatch):
    """One pass of moments (train and held-out apart, then summed) gives the two fits it replaces: checked
    against independent numpy weighted least squares on the split the seed makes, in blocks smaller than
    the data so the block sums are exercised."""
    import vpgtrans.converter as converter

    monkeypatch.setattr(converter, "CHUNK_ROWS", 128)
    source, target, pairs = _pairs_on_tables()
    weight, bias, stats = fit_converter(source, target, pairs, ridge=1e-3, heldout_fraction=0.1, seed=3)
    order = torch.randperm(600, generator=torch.Generator().manual_seed(3))
    held, train = order[:60], order[60:]
    x, y, w = source[pairs.source_ids].double(), target[pairs.target_ids].double(), pairs.weights
    ref_w, ref_b = _reference_ridge(x, y, w, 1e-3)
    np.testing.assert_allclose(weight.numpy(), ref_w, rtol=0, atol=1e-4)
    np.testing.assert_allclose(bias.numpy(), ref_b, rtol=0, atol=1e-4)
    held_w, held_b = _reference_ridge(x[train], y[train], w[train], 1e-3)
    predicted = x[held].numpy() @ held_w.T + held_b
    truth = y[held].numpy()
    cosine = (predicted * truth).sum(1) / np.linalg.norm(predicted, axis=1) / np.linalg.norm(truth, axis=1)
    assert stats["heldout_pairs"] == 60 and stats["heldout_cosine"] == pytest.approx(cosine.mean(), abs=1e-5)
    predicted = x.numpy() @ ref_w.T + ref_b
    truth = y.numpy()
    cosine = (predicted * truth).sum(1) / np.linalg.norm(predicted, axis=1) / np.linalg.norm(truth, axis=1)
    assert stats["train_cosine"] == pytest.approx(cosine.mean(), abs=1e-5)


def test_fit_converter_reads_bf16_tables_as_their_float32_values():
    """Tables kept in their stored bf16 (half the memory) are read in float32 blocks: exactly the fit of
    the float32 copies."""
    source, target, pairs = _pairs_on_tables()
    source, target = source.bfloat16(), target.bfloat16()
    ours = fit_converter(source, target, pairs)
    copies = fit_converter(source.float(), target.float(), pairs)
    assert torch.equal(ours[0], copies[0]) and torch.equal(ours[1], copies[1]) and ours[2] == copies[2]
