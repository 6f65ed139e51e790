"""The word converter: a linear map g(x) = W x + b from the source LLM's input-embedding space to the
target's, fitted in closed form on tokens both vocabularies share, and merged into the projector.

The reference fits it by SGD on caption text, pairing tokens by position only when both tokenisations
of a caption have the same length. Here tokens are paired by their surface string (space markers
``Ġ``/``▁`` and byte-level encoding undone, exact case first, lower case as a fallback), special tokens
by role, and the map is a ridge least-squares solution; its quality is reported as the mean cosine
between converted and true target embeddings on held-out pairs.
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


def surface_forms(tokenizer) -> dict[str, int]:
    """Map each token's surface text (leading space kept, so "▁the" == "Ġthe" == " the") to its id."""
    byte_level = _is_byte_level(tokenizer)
    byte_decoder = _byte_decoder() if byte_level else {}
    special = set(tokenizer.all_special_ids)
    forms: dict[str, int] = {}
    for token, token_id in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
        if token_id in special:
            continue
        if byte_level:
            try:
                text = bytes(byte_decoder[ch] for ch in token).decode("utf-8")
            except (KeyError, UnicodeDecodeError):
                continue  # a partial UTF-8 sequence: no standalone surface form
        elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            text = chr(int(token[3:5], 16))  # sentencepiece byte fallback
        else:
            text = token.replace("▁", " ")
        if text and text not in forms:
            forms[text] = token_id
    return forms


@dataclass
class TokenPairs:
    source_ids: torch.Tensor  # (n,)
    target_ids: torch.Tensor  # (n,)
    weights: torch.Tensor  # (n,)
    exact: int
    lowercase: int
    special: int


def pair_tokens(source_tokenizer, target_tokenizer, lowercase_fallback: bool = True,
                corpus: list[str] | None = None) -> TokenPairs:
    """Pairs (source id, target id) of tokens with the same surface text; weights from corpus counts."""
    source_forms, target_forms = surface_forms(source_tokenizer), surface_forms(target_tokenizer)
    pairs: dict[int, int] = {}  # target id -> source id
    for text, target_id in target_forms.items():
        if text in source_forms:
            pairs[target_id] = source_forms[text]
    exact = len(pairs)
    if lowercase_fallback:
        lowered: dict[str, int] = {}
        for text, source_id in source_forms.items():
            lowered.setdefault(text.lower(), source_id)
        for text, target_id in target_forms.items():
            if target_id not in pairs and text.lower() in lowered:
                pairs[target_id] = lowered[text.lower()]
    lowercase = len(pairs) - exact
    special = 0
    for role in SPECIAL_ROLES:
        s, t = getattr(source_tokenizer, role, None), getattr(target_tokenizer, role, None)
        if s is not None and t is not None and t not in pairs:
            pairs[t] = s
            special += 1
    if not pairs:
        raise VpgtransError("the source and target tokenizers share no tokens; use --converter none")
    target_ids = torch.tensor(sorted(pairs), dtype=torch.long)
    source_ids = torch.tensor([pairs[int(t)] for t in target_ids], dtype=torch.long)
    weights = torch.ones(len(target_ids), dtype=torch.float64)
    if corpus:
        counts = torch.zeros(len(target_tokenizer), dtype=torch.float64)
        for line in corpus:
            ids = target_tokenizer(line, add_special_tokens=False)["input_ids"]
            counts.index_add_(0, torch.tensor(ids, dtype=torch.long), torch.ones(len(ids), dtype=torch.float64))
        weights = 1.0 + torch.log1p(counts[target_ids])  # frequent tokens count more, rare ones still count
    return TokenPairs(source_ids, target_ids, weights, exact, lowercase, special)


def fit_ridge(x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor | None = None,
              ridge: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted ridge least squares for y ≈ x W^T + b. x (n, D_s), y (n, D_t) -> W (D_t, D_s), b (D_t,).

    The penalty is ``ridge`` times the mean of the weighted Gram matrix's diagonal, sum_i w_i x_ij^2
    (scale-free); the bias is not penalised, which is the same as centring x and y on their weighted
    means and solving for W alone. Means, the penalty and the (D_s, D_s) solve are float64; the two big
    products (X^T W X and X^T W Y, ~99% of the time at 32k x 2560 -> 4096) run in the inputs' precision
    when that is float32 or lower — on centred data they lose nothing that matters (benchmarks/converter_fit).
    """
    n, d_s = x.shape
    dtype = torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32
    x, y = x.to(dtype), y.to(dtype)
    w = torch.ones(n, dtype=dtype) if weights is None else weights.to(dtype)
    total = w.double().sum()
    x_mean = (w @ x).double() / total  # (D_s,)
    y_mean = (w @ y).double() / total  # (D_t,)
    penalty = ridge * float((w @ x.square()).double().mean())
    xc = x - x_mean.to(dtype)  # (n, D_s), centred
    xw = xc * w[:, None]  # (n, D_s), centred and weighted
    gram = (xw.T @ xc).double()  # (D_s, D_s)
    # The weighted centred columns sum to zero, so X_c^T W (Y - 1 y_mean^T) = X_c^T W Y: y needs no centred copy.
    rhs = (xw.T @ y).double()  # (D_s, D_t)
    gram += penalty * torch.eye(d_s, dtype=torch.float64)
    weight = torch.linalg.solve(gram, rhs).T  # (D_t, D_s)
    bias = y_mean - weight @ x_mean
    return weight.contiguous(), bias.contiguous()


def mean_cosine(predicted: torch.Tensor, target: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(predicted.double(), target.double(), dim=-1).mean())


def fit_converter(source_embeddings: torch.Tensor, target_embeddings: torch.Tensor, pairs: TokenPairs,
                  ridge: float = 1e-3, heldout_fraction: float = 0.1, seed: int = 0):
    """Fit W, b on the pairs; report held-out cosine (fit on the rest), then refit on all pairs."""
    x = source_embeddings[pairs.source_ids]  # (n, D_s)
    y = target_embeddings[pairs.target_ids]  # (n, D_t)
    n = len(x)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_heldout = max(1, int(round(n * heldout_fraction))) if n >= 10 else 0
    stats = {"pairs": n, "exact_pairs": pairs.exact, "lowercase_pairs": pairs.lowercase,
             "special_pairs": pairs.special, "ridge": ridge, "source_dim": x.shape[1], "target_dim": y.shape[1]}
    if n_heldout:
        held, train = order[:n_heldout], order[n_heldout:]
        weight, bias = fit_ridge(x[train], y[train], pairs.weights[train], ridge)
        stats["heldout_pairs"] = n_heldout
        stats["heldout_cosine"] = mean_cosine(x[held].double() @ weight.T + bias, y[held])
    weight, bias = fit_ridge(x, y, pairs.weights, ridge)
    stats["train_cosine"] = mean_cosine(x.double() @ weight.T + bias, y)
    if n < 2 * x.shape[1]:
        stats["warning"] = f"only {n} pairs for a {x.shape[1]}-dim source space: the fit leans on the ridge"
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
