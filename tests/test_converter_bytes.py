"""Token pairing with byte tokens (issue 13): SentencePiece byte fallback (``<0x00>``..``<0xFF>`` at low ids,
as in LLaMA) and byte-level BPE (OPT / GPT-2). Real pieces win over byte tokens for the same text whatever
the id order; a lone byte >= 0x80 is not a character and pairs only with the same byte in the other vocabulary.
"""

from __future__ import annotations

import pytest

from vpgtrans.converter import pair_tokens, surface_forms

TEXTS = ["the cat sat on the mat, the dog ate the fish. a big red fox? yes: the end; then the tea",
         "un café, une crème brûlée. the café — the best — is the café"] * 20


def _llama_like(bytes_first: bool):
    """Metaspace BPE with byte fallback; ``bytes_first``: ids 0-2 specials, 3-258 ``<0x00>``..``<0xFF>``, then
    the learned pieces (LLaMA's layout); else the byte tokens after the learned pieces. Same merges either way."""
    import json

    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    learner.pre_tokenizer = pre_tokenizers.Metaspace()
    learner.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=150, special_tokens=specials,
                                                            show_progress=False))
    learned = json.loads(learner.to_str())["model"]
    byte_tokens = [f"<0x{byte:02X}>" for byte in range(256)]
    pieces = [t for t in sorted(learned["vocab"], key=learned["vocab"].get) if t not in specials]
    order = specials + (byte_tokens + pieces if bytes_first else pieces + byte_tokens)
    vocab = {token: i for i, token in enumerate(order)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m) for m in learned["merges"]], unk_token="<unk>",
                               byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _opt_like():
    """Byte-level BPE with GPT-2's full 256-byte alphabet, OPT's specials (BOS = EOS = ``</s>``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module")
def vocabularies():
    return {"low": _llama_like(bytes_first=True), "high": _llama_like(bytes_first=False), "opt": _opt_like()}


def _byte_of(token: str) -> int | None:
    return int(token[3:5], 16) if len(token) == 6 and token.startswith("<0x") and token.endswith(">") else None


# Real pieces of the LLaMA-like vocabulary whose text a byte token also spells (",": <0x2C>, "é": <0xE9>
# read as Latin-1, "▁": <0x20>), and their byte-level BPE spelling.
SHADOWED = {",": ",", ".": ".", "a": "a", "t": "t", "e": "e", "▁": "Ġ", "▁the": "Ġthe", "é": "Ã©"}


def test_vocabularies_are_what_the_tests_need(vocabularies):
    low, high, opt = vocabularies["low"], vocabularies["high"], vocabularies["opt"]
    assert low.convert_tokens_to_ids("<0x2C>") == 3 + 0x2C and high.convert_tokens_to_ids("<0x2C>") > 100
    for tok in (low, high):
        assert tok.tokenize("ß") == ["▁", "<0xC3>", "<0x9F>"]  # byte fallback is on, as in LLaMA
        for piece in SHADOWED:
            assert piece in tok.get_vocab()
    for piece in [*SHADOWED.values(), "é", "âĢ"]:  # "é" alone: GPT-2's character for the lone byte 0xE9;
        assert piece in opt.get_vocab()  # "âĢ": bytes e2 80, the first two of the three of "—"


@pytest.mark.parametrize("layout", ["low", "high"])
def test_real_pieces_win_over_byte_tokens(vocabularies, layout):
    tok = vocabularies[layout]
    forms = surface_forms(tok)
    for piece in SHADOWED:
        assert forms[piece.replace("▁", " ")] == tok.convert_tokens_to_ids(piece), piece
    # A byte token < 0x80 stands for its ASCII character where no real piece has that text ...
    assert forms["!"] == tok.convert_tokens_to_ids("<0x21>") and forms["\n"] == tok.convert_tokens_to_ids("<0x0A>")
    # ... and a byte >= 0x80 is not a character: it has no text at all.
    high_bytes = {tok.convert_tokens_to_ids(f"<0x{byte:02X}>") for byte in range(0x80, 0x100)}
    assert not high_bytes & set(forms.values())


def test_surface_forms_do_not_depend_on_id_order(vocabularies):
    low, high = vocabularies["low"], vocabularies["high"]
    by_text = [{text: tok.convert_ids_to_tokens(i) for text, i in surface_forms(tok).items()} for tok in (low, high)]
    assert by_text[0] == by_text[1]


def _pairs_by_token(source, target):
    pairs = pair_tokens(source, target)
    targets = target.convert_ids_to_tokens(pairs.target_ids.tolist())
    sources = source.convert_ids_to_tokens(pairs.source_ids.tolist())
    return dict(zip(targets, sources)), pairs


def test_byte_level_to_byte_fallback_pairs_real_pieces_and_bytes_by_value(vocabularies):
    opt = vocabularies["opt"]
    decoder = {ch: byte for byte, ch in enumerate(_gpt2_alphabet())}
    by_layout = {}
    for layout in ("low", "high"):
        mapping, pairs = _pairs_by_token(opt, vocabularies[layout])
        for piece, opt_piece in SHADOWED.items():
            assert mapping[piece] == opt_piece, piece
        assert mapping["<0x0A>"] == "Ċ"  # "\n": LLaMA has only its byte token, and uses it
        for target, source in mapping.items():
            source_bytes = bytes(decoder[ch] for ch in source) if all(ch in decoder for ch in source) else None
            target_is_high_byte = (_byte_of(target) or 0) >= 0x80
            source_is_high_byte = source_bytes is not None and len(source_bytes) == 1 and source_bytes[0] >= 0x80
            if target_is_high_byte or source_is_high_byte:  # a lone byte pairs only with the same byte
                assert target_is_high_byte and source_bytes == bytes([_byte_of(target)]), (target, source)
        assert mapping["<0xE9>"] == "é"  # the byte 0xE9 on both sides, not the character "é" ("Ã©")
        assert pairs.byte == 128  # every byte >= 0x80: both vocabularies hold all 256
        by_layout[layout] = mapping
    assert by_layout["low"] == by_layout["high"]


def test_two_byte_fallback_vocabularies_pair_token_for_token(vocabularies):
    mapping, pairs = _pairs_by_token(vocabularies["low"], vocabularies["high"])
    assert all(target == source for target, source in mapping.items()), \
        {t: s for t, s in mapping.items() if t != s}
    assert pairs.byte == 128
    # Byte tokens < 0x80 whose text a real piece holds are never produced by the tokenizer: left unpaired.
    assert "<0x2C>" not in mapping and "<0x21>" in mapping


def test_same_byte_level_vocabulary_pairs_every_token_with_itself(vocabularies):
    opt = vocabularies["opt"]
    mapping, pairs = _pairs_by_token(opt, opt)
    assert mapping == {token: token for token in opt.get_vocab()}  # specials by role, the rest by text or bytes
    assert pairs.byte == 128 + sum(len(token) > 1 and _not_text(token) for token in opt.get_vocab()) > 128
    assert mapping["é"] == "é" and mapping["âĢ"] == "âĢ"  # the lone byte 0xE9, a partial "—": not text


def _not_text(token: str) -> bool:
    decoder = {ch: byte for byte, ch in enumerate(_gpt2_alphabet())}
    try:
        bytes(decoder[ch] for ch in token).decode("utf-8")
    except (KeyError, UnicodeDecodeError):
        return True
    return False


def _gpt2_alphabet() -> list[str]:
    """GPT-2's bytes_to_unicode, written out independently: the character of byte b is list[b]."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return [chars[byte] for byte in range(256)]


def _word_level(vocab):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab)))


@pytest.mark.parametrize("source_vocab", [{"THE": 0, "The": 1, "tHe": 2}, {"tHe": 0, "The": 1, "THE": 2}],
                         ids=["THE-first", "tHe-first"])
def test_lowercase_fallback_picks_the_closest_case_whatever_the_id_order(source_vocab):
    source, target = _word_level(source_vocab), _word_level({"the": 0, "THe": 1})
    mapping, pairs = _pairs_by_token(source, target)
    # "the": "The" and "tHe" differ from it in one letter, "THE" in two; the tie goes to the smaller string.
    # "THe": all three differ in one letter; "THE" is the smallest.
    assert mapping == {"the": "The", "THe": "THE"}
    assert (pairs.exact, pairs.lowercase) == (0, 2)
