"""The word converter: a linear map g(x) = W x + b from the source LLM's input-embedding space to the
target's, fitted in closed form on tokens both vocabularies share, and merged into the projector.

The reference fits it by SGD on caption text, pairing tokens by position only when both tokenisations
of a caption have the same length. Here tokens are paired by their surface string (space markers
``Ġ``/``▁`` and byte-level encoding undone, exact case first, lower case as a fallback; real pieces before
SentencePiece byte tokens), tokens that are not text (a lone byte >= 0x80, a partial UTF-8 sequence) by
their bytes, special tokens by role; the map is a ridge least-squares solution; its quality is reported as
the mean cosine between converted and true target embeddings on held-out pairs.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

from vpgtrans.errors import VpgtransError

SPECIAL_ROLES = ("bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id")


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode table (byte-level BPE writes bytes as printable chars)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {chr(code): byte for byte, code in zip(printable, codes)}


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    return "ByteLevel" in json.dumps(decoder)


def _byte_fallback_value(token: str) -> int | None:
    """The byte of a SentencePiece byte-fallback token ``<0xNN>``, else None."""
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        try:
            return int(token[3:5], 16)
        except ValueError:
            return None
    return None


def _forms_and_bytes(tokenizer) -> tuple[dict[str, int], dict[bytes, int]]:
    """(surface text -> id, raw bytes -> id of a token that is bytes but not text).

    Real pieces win over byte tokens for the same text, whatever the id order: LLaMA-style vocabularies put
    ``<0x00>``..``<0xFF>`` at low ids, and ``<0x2C>`` must not take "," from the piece "," (the tokenizer
    never emits a byte token for a character it has a piece for, so that row is untrained). A byte token
    < 0x80 stands for its ASCII character only where no real piece has that text (LLaMA writes "\\n" only
    as ``<0x0A>``). A lone byte >= 0x80 is not a character (not Latin-1 ``chr(b)``: a fragment of a UTF-8
    sequence), and neither is a byte-level token holding part of one ("âĢ" = e2 80, the start of "—"):
    they get no text and are returned by their bytes, to pair only with a token of the same bytes.
    Vocabulary entries are visited by token string, not id, so ties never depend on the id order.
    """
    byte_level = _is_byte_level(tokenizer)
    byte_decoder = _byte_decoder() if byte_level else {}
    special = set(tokenizer.all_special_ids)
    pieces: dict[str, int] = {}  # text -> id of a real piece
    ascii_bytes: dict[str, int] = {}  # text -> id of a byte-fallback token < 0x80
    raw_bytes: dict[bytes, int] = {}  # bytes that are not text -> id
    for token, token_id in sorted(tokenizer.get_vocab().items()):
        if token_id in special:
            continue
        if byte_level:
            try:
                raw = bytes(byte_decoder[ch] for ch in token)
            except KeyError:
                continue  # not written in the byte alphabet (an added token)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raw_bytes[raw] = token_id  # a lone byte >= 0x80 or a partial UTF-8 sequence
                continue
            if text:
                pieces.setdefault(text, token_id)
        elif (byte := _byte_fallback_value(token)) is not None:
            if byte < 0x80:
                ascii_bytes[chr(byte)] = token_id
            else:
                raw_bytes[bytes([byte])] = token_id
        elif text := token.replace("▁", " "):
            pieces.setdefault(text, token_id)
    forms = dict(pieces)
    for text, token_id in ascii_bytes.items():
        forms.setdefault(text, token_id)
    return forms, raw_bytes


def surface_forms(tokenizer) -> dict[str, int]:
    """Map each token's surface text (leading space kept, so "▁the" == "Ġthe" == " the") to its id; real
    pieces before byte tokens, no text for a lone byte >= 0x80 or a partial UTF-8 sequence (see
    ``_forms_and_bytes``)."""
    return _forms_and_bytes(tokenizer)[0]


def _case_distance(a: str, b: str) -> int:
    """Positions where two strings that are equal in lower case differ (in case)."""
    return sum(x != y for x, y in zip(a, b)) + abs(len(a) - len(b))


@dataclass
class TokenPairs:
    source_ids: torch.Tensor  # (n,)
    target_ids: torch.Tensor  # (n,)
    weights: torch.Tensor  # (n,)
    exact: int
    lowercase: int
    special: int
    byte: int = 0  # tokens that are bytes but not text (a lone byte >= 0x80, ...), paired by their bytes


def pair_tokens(source_tokenizer, target_tokenizer, lowercase_fallback: bool = True,
                corpus: list[str] | None = None) -> TokenPairs:
    """Pairs (source id, target id) of tokens with the same surface text; weights from corpus counts."""
    source_forms, source_bytes = _forms_and_bytes(source_tokenizer)
    target_forms, target_bytes = _forms_and_bytes(target_tokenizer)
    pairs: dict[int, int] = {}  # target id -> source id
    for text, target_id in target_forms.items():
        if text in source_forms:
            pairs[target_id] = source_forms[text]
    exact = len(pairs)
    if lowercase_fallback:
        by_lower: dict[str, list[str]] = {}
        for text in source_forms:
            by_lower.setdefault(text.lower(), []).append(text)
        for text, target_id in target_forms.items():
            candidates = by_lower.get(text.lower())
            if target_id not in pairs and candidates:
                # The closest case wins ("The" over "THE" for "the"), then the smaller string: not the id order.
                closest = min(candidates, key=lambda candidate: (_case_distance(candidate, text), candidate))
                pairs[target_id] = source_forms[closest]
    lowercase = len(pairs) - exact
    # A lone byte >= 0x80 pairs with the same byte only (SentencePiece's <0xE9>, byte-level BPE's lone 0xE9,
    # "é" in GPT-2's alphabet): both are the one input unit "byte 0xE9 of a character the vocabulary has no
    # piece for", so the pair is as legitimate as "the" with "the"; with anything else it would be noise.
    # Likewise a partial UTF-8 sequence, which only another byte-level vocabulary can hold.
    for raw, target_id in target_bytes.items():
        if raw in source_bytes:
            pairs[target_id] = source_bytes[raw]
    n_bytes = len(pairs) - exact - lowercase
    special = 0
    for role in SPECIAL_ROLES:
        s, t = getattr(source_tokenizer, role, None), getattr(target_tokenizer, role, None)
        if s is not None and t is not None and t not in pairs:
            pairs[t] = s
            special += 1
    if not pairs:
        raise VpgtransError("the source and target tokenizers share no tokens; use --converter gw (it needs no "
                            "shared tokens) or --converter none")
    target_ids = torch.tensor(sorted(pairs), dtype=torch.long)
    source_ids = torch.tensor([pairs[int(t)] for t in target_ids], dtype=torch.long)
    weights = torch.ones(len(target_ids), dtype=torch.float64)
    if corpus:
        counts = torch.zeros(len(target_tokenizer), dtype=torch.float64)
        for line in corpus:
            ids = target_tokenizer(line, add_special_tokens=False)["input_ids"]
            counts.index_add_(0, torch.tensor(ids, dtype=torch.long), torch.ones(len(ids), dtype=torch.float64))
        weights = 1.0 + torch.log1p(counts[target_ids])  # frequent tokens count more, rare ones still count
    return TokenPairs(source_ids, target_ids, weights, exact, lowercase, special, n_bytes)


CHUNK_ROWS = 4096  # pairs per block: (4096, 4096) fp32 = 64 MB of scratch at 7B widths


@dataclass
class _Moments:
    """Weighted sums over a set of pairs (float64), x measured from a fixed ``centre`` c: the sufficient
    statistics of the ridge fit. Sums over disjoint sets add, so the held-out fit and the fit on all
    pairs share one pass over the data (all = train + held-out)."""

    weight: torch.Tensor  # () sum w
    x: torch.Tensor  # (D_s,) sum w (x - c)
    y: torch.Tensor  # (D_t,) sum w y
    xx: torch.Tensor  # (D_s, D_s) sum w (x - c)(x - c)^T
    xy: torch.Tensor  # (D_s, D_t) sum w (x - c) y^T

    def __add__(self, other: "_Moments") -> "_Moments":
        return _Moments(*(a + b for a, b in zip(vars(self).values(), vars(other).values())))


def _compute_dtype(*tables: torch.Tensor) -> torch.dtype:
    """float64 when an input is float64, else float32 (bf16 / fp16 tables are read in float32 blocks)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tables) else torch.float32


def _weighted_mean(table: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(D,) float64 weighted mean of ``table[ids]``, block by block."""
    total = torch.zeros(table.shape[1], dtype=torch.float64)
    for start in range(0, len(ids), CHUNK_ROWS):
        block = table[ids[start:start + CHUNK_ROWS]].double()  # (b, D)
        total += weights[start:start + CHUNK_ROWS].double() @ block
    return total / weights.double().sum()


def _moments(x_table, y_table, x_ids, y_ids, weights, centre: torch.Tensor) -> _Moments:
    """The moments of pairs (x_table[x_ids], y_table[y_ids]) with ``weights``, block by block: only a
    block of rows is ever gathered or converted. The two big products run in float32 on float32 (or
    lower) tables, as before (benchmarks/converter_fit: they lose nothing that matters on centred data),
    each block's result accumulated in float64."""
    dtype = _compute_dtype(x_table, y_table)
    d_s, d_t = x_table.shape[1], y_table.shape[1]
    sums = _Moments(torch.zeros((), dtype=torch.float64), torch.zeros(d_s, dtype=torch.float64),
                    torch.zeros(d_t, dtype=torch.float64), torch.zeros(d_s, d_s, dtype=torch.float64),
                    torch.zeros(d_s, d_t, dtype=torch.float64))
    shift = centre.to(dtype)
    for start in range(0, len(x_ids), CHUNK_ROWS):
        rows = slice(start, start + CHUNK_ROWS)
        w = weights[rows].to(dtype)  # (b,)
        x = x_table[x_ids[rows]].to(dtype) - shift  # (b, D_s)
        y = y_table[y_ids[rows]].to(dtype)  # (b, D_t)
        xw = x * w[:, None]
        sums.weight += w.double().sum()
        sums.x += xw.sum(0).double()
        sums.y += (w @ y).double()
        sums.xx += (xw.T @ x).double()
        sums.xy += (xw.T @ y).double()
    return sums


def _solve(sums: _Moments, centre: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """W (D_t, D_s), b (D_t,) float64 of the weighted ridge fit whose moments are ``sums``.

    The penalty is ``ridge`` times the mean of the weighted Gram matrix's diagonal, sum_i w_i x_ij^2
    (uncentred, scale-free); the bias is not penalised, which is the same as centring x and y on their
    weighted means and solving for W alone."""
    x_mean = sums.x / sums.weight  # (D_s,), from the centre
    gram = sums.xx - torch.outer(sums.x, x_mean)  # (D_s, D_s) centred on the weighted mean
    # sum w (x - mean) (y - y_mean)^T = sum w (x - mean) y^T, as the weighted centred x sum to zero.
    rhs = sums.xy - torch.outer(x_mean, sums.y)  # (D_s, D_t)
    penalty = ridge * float((sums.xx.diagonal() + 2 * centre * sums.x + sums.weight * centre.square()).mean())
    gram = gram + penalty * torch.eye(len(gram), dtype=torch.float64)
    weight = torch.linalg.solve(gram, rhs).T  # (D_t, D_s)
    bias = sums.y / sums.weight - weight @ (centre + x_mean)
    return weight.contiguous(), bias.contiguous()


def fit_ridge(x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor | None = None,
              ridge: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted ridge least squares for y ≈ x W^T + b. x (n, D_s), y (n, D_t) -> W (D_t, D_s), b (D_t,).

    See ``_solve`` for the penalty. Means, the penalty and the (D_s, D_s) solve are float64; the two big
    products (X^T W X and X^T W Y, ~99% of the time at 32k x 2560 -> 4096) run in the inputs' precision
    when that is float32 or lower, on x centred on its weighted mean."""
    ids = torch.arange(len(x))
    w = torch.ones(len(x), dtype=torch.float64) if weights is None else weights.double()
    centre = _weighted_mean(x, ids, w)
    return _solve(_moments(x, y, ids, ids, w, centre), centre, ridge)


def mean_cosine(predicted: torch.Tensor, target: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(predicted.double(), target.double(), dim=-1).mean())


def _mapped_cosine(x_table, y_table, x_ids, y_ids, weight: torch.Tensor, bias: torch.Tensor) -> float:
    """Mean cosine between x W^T + b and y over the pairs, in blocks (float32 on float32 or lower tables)."""
    dtype = _compute_dtype(x_table, y_table)
    w, b = weight.to(dtype).T, bias.to(dtype)
    total = 0.0
    for start in range(0, len(x_ids), CHUNK_ROWS):
        predicted = torch.addmm(b, x_table[x_ids[start:start + CHUNK_ROWS]].to(dtype), w)  # (b, D_t)
        truth = y_table[y_ids[start:start + CHUNK_ROWS]].to(dtype)
        total += float(torch.nn.functional.cosine_similarity(predicted, truth, dim=-1).double().sum())
    return total / len(x_ids)


def fit_converter(source_embeddings: torch.Tensor, target_embeddings: torch.Tensor, pairs: TokenPairs,
                  ridge: float = 1e-3, heldout_fraction: float = 0.1, seed: int = 0):
    """Fit W, b on the pairs; report the held-out cosine of a fit on the rest, and the fit on all pairs.

    The tables are read in blocks of pairs, never gathered whole (at 7B widths the gathered pairs would
    double the memory), and may stay in their stored dtype. One pass computes the moments of the training
    and the held-out pairs apart; the held-out fit solves the first, the final fit their sum — the same
    solutions as two separate fits, for one pass instead of two. Diagnostics run in float32 blocks."""
    n = len(pairs.source_ids)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_heldout = max(1, int(round(n * heldout_fraction))) if n >= 10 else 0
    d_s, d_t = source_embeddings.shape[1], target_embeddings.shape[1]
    stats = {"pairs": n, "exact_pairs": pairs.exact, "lowercase_pairs": pairs.lowercase,
             "special_pairs": pairs.special, "byte_pairs": pairs.byte, "ridge": ridge, "source_dim": d_s,
             "target_dim": d_t}
    weights = pairs.weights.double()
    centre = _weighted_mean(source_embeddings, pairs.source_ids, weights)  # (D_s,) of all pairs

    def moments(subset):
        return _moments(source_embeddings, target_embeddings, pairs.source_ids[subset], pairs.target_ids[subset],
                        weights[subset], centre)

    held, train = order[:n_heldout], order[n_heldout:]
    sums = moments(train)
    if n_heldout:
        weight, bias = _solve(sums, centre, ridge)
        stats["heldout_pairs"] = n_heldout
        stats["heldout_cosine"] = _mapped_cosine(source_embeddings, target_embeddings, pairs.source_ids[held],
                                                 pairs.target_ids[held], weight, bias)
        sums = sums + moments(held)
    weight, bias = _solve(sums, centre, ridge)
    stats["train_cosine"] = _mapped_cosine(source_embeddings, target_embeddings, pairs.source_ids,
                                           pairs.target_ids, weight, bias)
    if n < 2 * d_s:
        stats["warning"] = f"only {n} pairs for a {d_s}-dim source space: the fit leans on the ridge"
    if not all(math.isfinite(v) for v in (stats.get("heldout_cosine", 0.0), stats["train_cosine"])):
        raise VpgtransError("the converter fit produced non-finite values; check the embedding tables")
    return weight.float(), bias.float(), stats


def merge_projector(converter_weight, converter_bias, projector_weight, projector_bias):
    """Apply the converter after the source projector: W_t = W_w W_s, b_t = W_w b_s + b_w.

    Shapes: W_w (D_t, D_s), b_w (D_t,), W_s (D_s, D_q), b_s (D_s,) -> W_t (D_t, D_q), b_t (D_t,).
    """
    if converter_weight.shape[1] != projector_weight.shape[0]:
        raise VpgtransError(f"converter input dim {converter_weight.shape[1]} != source projector output dim "
                            f"{projector_weight.shape[0]}")
    w_w, b_w = converter_weight.double(), converter_bias.double()
    weight = w_w @ projector_weight.double()
    bias = w_w @ projector_bias.double() + b_w
    return weight.float(), bias.float()
