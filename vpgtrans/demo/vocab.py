"""Tokenizers trained locally on the world corpus: two as different as OPT's and LLaMA's, and a
character-level one that shares only single characters with the OPT-style one.

- OPT style: byte-level BPE (``Ġ`` marks a leading space, "\\n" is ``Ċ``), ids 0-3 =
  ``<s> <pad> </s> <unk>``, and like OPT the BOS it prepends is ``</s>`` (= EOS).
- LLaMA style: Metaspace BPE (``▁`` marks a leading space, prepended to the first word), ids 0-2 =
  ``<unk> <s> </s>``, then 256 byte-fallback tokens ``<0x00>``..``<0xFF>`` ("\\n" is ``<0x0A>``), no
  pad token; its merges run over punctuation ("▁circle?"), byte-level BPE's do not.

- Characters: LLaMA's layout and pre-tokenizer, one token per character of the corpus ("▁" for a space), no
  merges, no byte fallback (issue 12's target "whose tokenizer shares few tokens with the source's").

All add BOS with ``add_special_tokens=True`` and encode "\\n" as one token (BLIP-2 OPT appends "\\n" to
targets and stops generating on it). All are plain ``PreTrainedTokenizerFast`` (one ``tokenizer.json``).
``vocabulary_overlap`` measures what two of them share.
"""

from __future__ import annotations

import json

OPT_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
LLAMA_SPECIALS = ("<unk>", "<s>", "</s>")


def train_opt_tokenizer(corpus: list[str], vocab_size: int = 400):
    """Byte-level BPE like OPT/GPT-2, trained on ``corpus``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(OPT_SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.decoder = decoders.ByteLevel()
    bos = OPT_SPECIALS.index("</s>")
    tokenizer.post_processor = processors.TemplateProcessing(single="</s> $A", pair="</s> $A </s> $B",
                                                             special_tokens=[("</s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="</s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")


def _llama_pre_tokenizer():
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True),
        # "\n" alone must stay one token: drop the "▁" Metaspace puts in front of a leading "\n"
        # (the price: a space right before a newline does not round-trip).
        pre_tokenizers.Split(Regex("▁(?=\n)"), behavior="removed"),
        pre_tokenizers.Split(Regex("\n"), behavior="isolated"),
    ])


def train_llama_tokenizer(corpus: list[str], vocab_size: int = 200):
    """Metaspace BPE with byte fallback like LLaMA's; ``vocab_size`` counts the learned part only (the
    256 byte tokens come on top)."""
    from tokenizers import Tokenizer, models, trainers

    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    learner.pre_tokenizer = _llama_pre_tokenizer()
    learner.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                            special_tokens=list(LLAMA_SPECIALS)))
    learned = json.loads(learner.to_str())["model"]
    # Re-number as LLaMA lays it out: specials, 256 byte tokens, then the learned pieces.
    vocab = {token: i for i, token in enumerate(LLAMA_SPECIALS)}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for token in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(token, len(vocab))
    return _llama_layout(vocab, [tuple(m) for m in learned["merges"]], byte_fallback=True)


def train_char_tokenizer(corpus: list[str]):
    """Character-level, LLaMA's layout otherwise: ids 0-2 ``<unk> <s> </s>``, then "▁" (a space, Metaspace as
    LLaMA) and every other character of ``corpus`` plus "\\n", one token each; no merges, no byte fallback (a
    character the corpus lacks is ``<unk>``). Trained on the text the OPT-style tokenizer was, it shares only
    single characters with it: every word that vocabulary holds whole (``Ġsquare``) is spelt out here."""
    vocab = {token: i for i, token in enumerate(LLAMA_SPECIALS)}
    for character in ["▁", *sorted(set("".join(corpus)) - {" "} | {"\n"})]:
        vocab.setdefault(character, len(vocab))
    return _llama_layout(vocab, [], byte_fallback=False)


def _llama_layout(vocab: dict[str, int], merges: list[tuple[str, str]], byte_fallback: bool):
    """A ``PreTrainedTokenizerFast`` over a BPE ``vocab`` / ``merges`` laid out like LLaMA's: Metaspace, BOS
    ``<s>`` added, "\\n" one token, the decoder undoing "▁" (and byte tokens with ``byte_fallback``)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=byte_fallback,
                                     fuse_unk=True))
    tokenizer.pre_tokenizer = _llama_pre_tokenizer()
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "),
                                           *([decoders.ByteFallback()] if byte_fallback else []), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    bos = LLAMA_SPECIALS.index("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                             special_tokens=[("<s>", bos)])
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA_SPECIALS])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def vocabulary_overlap(source_tokenizer, target_tokenizer, lines: list[str]) -> dict:
    """What two vocabularies share, as the word converter sees it (``vpgtrans.converter.pair_tokens``): the
    vocabulary sizes, the shared-token pairs by kind, how many of them are text of two characters or more
    (space markers aside), and the share of each tokenizer's tokens over ``lines`` that have a twin (the rows
    a shared-token fit reads were trained that often)."""
    import torch

    from vpgtrans.converter import pair_tokens, surface_forms

    pairs = pair_tokens(source_tokenizer, target_tokenizer)
    text = {i: form for form, i in surface_forms(target_tokenizer).items()}  # no specials, no bytes >= 0x80
    share = {}
    for side, tokenizer, ids in (("source", source_tokenizer, pairs.source_ids),
                                 ("target", target_tokenizer, pairs.target_ids)):
        used = torch.tensor([t for line in lines for t in tokenizer(line, add_special_tokens=False)["input_ids"]])
        share[f"{side}_occurrence_share"] = round(float(torch.isin(used, ids).double().mean()), 4)
    return {"source_vocab": len(source_tokenizer), "target_vocab": len(target_tokenizer),
            "shared": len(pairs.target_ids), "exact": pairs.exact, "lowercase": pairs.lowercase,
            "special": pairs.special, "byte": pairs.byte,
            "shared_multi_character": sum(len(text.get(int(i), "").strip()) > 1 for i in pairs.target_ids), **share}
