"""A word converter that needs no shared tokens: Gromov-Wasserstein (GW) alignment of the two embedding
tables, then least squares on the aligned pairs, refined a few rounds (Alvarez-Melis & Jaakkola 2018).

GW compares only the distance matrices inside each space, so it works across tokenizers that share nothing.

    1. anchors: the ``n`` most frequent tokens of each side in ``--corpus`` (without one: the first ``n``
       non-special ids, which in BPE / SentencePiece vocabularies are the earliest merges, roughly the most
       frequent pieces), most frequent first
    2. cosine distances inside each side's first ``solve`` anchors, divided by their mean (GW costs about
       n^3 time and n^2 memory: it is solved on the most frequent ``solve`` anchors only)
    3. initial coupling: optimal transport between those anchors' sorted-distance profiles (each anchor's
       distance quantiles: a lower bound of GW that is invariant to rotations), then the GW coupling by
       POT's conditional-gradient solver (``ot.gromov.gromov_wasserstein``, square loss) from it
    4. pairs: mutual best matches of the coupling; ridge least squares source -> target on them
    5. refinement (``rounds``): map all the source anchors, take mutual nearest neighbours by cosine among
       all the target anchors, refit

POT is an optional dependency (``pip install -e ".[gw]"``). Quality is reported as for the shared-token
converter: the mean cosine of converted vs true target embeddings on whatever true pairs exist (none of them
is used by the fit, so all are held out), and the retrieval accuracy of those pairs (is the converted
source embedding's nearest target embedding, among the pairs' targets, the right one).
"""

from __future__ import annotations

import time

import torch

from vpgtrans.converter import fit_ridge, mean_cosine
from vpgtrans.errors import VpgtransError

DEFAULT_ANCHORS = 2000
DEFAULT_SOLVE = 1000  # GW is solved on this many of the anchors (the most frequent); refinement uses all
DEFAULT_ROUNDS = 3
PROFILE_QUANTILES = 32


def _import_ot():
    try:
        import ot
    except ImportError:
        raise VpgtransError('--converter gw needs POT: pip install -e ".[gw]" (or pip install "pot>=0.9")') from None
    return ot


def anchor_ids(vocab_size: int, special: set[int], n: int, counts: torch.Tensor | None = None) -> torch.Tensor:
    """The ``n`` anchor token ids, most frequent first in ``counts`` (ties and unseen tokens by id), else
    the first ``n`` non-special ids."""
    ids = torch.tensor([i for i in range(vocab_size) if i not in special], dtype=torch.long)
    if counts is not None:
        order = torch.argsort(-counts[ids].double(), stable=True)
        ids = ids[order]
    return ids[:n]


def _distances(x: torch.Tensor) -> torch.Tensor:
    """(n, D) -> (n, n) cosine distances divided by their mean (float64)."""
    unit = torch.nn.functional.normalize(x.double(), dim=-1)
    distance = (1.0 - unit @ unit.T).clamp(min=0.0)
    distance.fill_diagonal_(0.0)
    return distance / distance.mean().clamp(min=1e-12)


def _profile_coupling(ot, c_s: torch.Tensor, c_t: torch.Tensor):
    """Optimal transport between the rows' distance quantiles: rotation-invariant start for GW."""
    levels = torch.linspace(0, 1, PROFILE_QUANTILES, dtype=torch.float64)
    q_s = torch.quantile(c_s, levels, dim=1).T  # (n_s, Q)
    q_t = torch.quantile(c_t, levels, dim=1).T  # (n_t, Q)
    cost = torch.cdist(q_s, q_t).square().numpy()
    p, q = ot.unif(len(q_s)), ot.unif(len(q_t))
    return ot.emd(p, q, cost)


def _mutual_best(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index pairs (i, j) where j is i's best column and i is j's best row."""
    best_col = scores.argmax(dim=1)
    best_row = scores.argmax(dim=0)
    rows = torch.arange(scores.shape[0])
    keep = best_row[best_col] == rows
    return rows[keep], best_col[keep]


def fit_gw_converter(source_embeddings: torch.Tensor, target_embeddings: torch.Tensor, source_anchors: torch.Tensor,
                     target_anchors: torch.Tensor, true_pairs=None, ridge: float = 1e-3,
                     rounds: int = DEFAULT_ROUNDS, solve: int = DEFAULT_SOLVE, max_iter: int = 1000):
    """W (D_t, D_s), b (D_t,) and stats, from the anchors' GW coupling (no pairs used). Anchors come most
    frequent first; GW is solved on the first ``solve`` of each side. ``true_pairs`` (a ``TokenPairs``,
    optional) only measures the result."""
    ot = _import_ot()
    start = time.perf_counter()
    # float32 rows: the ridge fits' big products and the refinement's mappings run in float32 (as the
    # shared-token fit's do; means, penalty and solve stay float64), the GW distances in float64
    x = source_embeddings[source_anchors].float()  # (n_s, D_s)
    y = target_embeddings[target_anchors].float()  # (n_t, D_t)
    if min(len(x), len(y)) < 4:
        raise VpgtransError(f"--converter gw needs at least 4 anchor tokens per side (got {len(x)}, {len(y)})")
    k_s, k_t = min(solve, len(x)), min(solve, len(y))
    c_s, c_t = _distances(x[:k_s]), _distances(y[:k_t])
    g0 = _profile_coupling(ot, c_s, c_t)
    coupling = ot.gromov.gromov_wasserstein(c_s.numpy(), c_t.numpy(), ot.unif(k_s), ot.unif(k_t),
                                            loss_fun="square_loss", G0=g0, max_iter=max_iter)
    coupling = torch.as_tensor(coupling, dtype=torch.float64)  # (k_s, k_t)
    gw_seconds = time.perf_counter() - start
    i, j = _mutual_best(coupling)
    if len(i) < 2:
        raise VpgtransError("the GW coupling matched fewer than 2 anchor pairs; try more anchors (--corpus helps)")
    history = [len(i)]
    weight, bias = fit_ridge(x[i], y[j], coupling[i, j] * k_s, ridge)
    unit_y = torch.nn.functional.normalize(y, dim=-1)
    for _ in range(rounds):
        mapped = torch.nn.functional.normalize(torch.addmm(bias.float(), x, weight.float().T), dim=-1)
        i, j = _mutual_best(mapped @ unit_y.T)  # (n_s, n_t) cosines
        history.append(len(i))
        weight, bias = fit_ridge(x[i], y[j], None, ridge)
    stats = {"method": "gw", "anchors": [len(x), len(y)], "solved_anchors": [k_s, k_t], "gw_pairs": history[0],
             "refined_pairs": history[1:],
             "rounds": rounds, "ridge": ridge, "gw_seconds": round(gw_seconds, 3),
             "seconds": round(time.perf_counter() - start, 3), "source_dim": x.shape[1], "target_dim": y.shape[1],
             "train_cosine": mean_cosine(torch.addmm(bias.float(), x[i], weight.float().T), y[j])}
    if true_pairs is not None and len(true_pairs.source_ids):
        stats.update(measure(weight, bias, source_embeddings, target_embeddings, true_pairs))
    return weight.float(), bias.float(), stats


def measure(weight, bias, source_embeddings, target_embeddings, pairs, max_pairs: int = 2000) -> dict:
    """Held-out cosine and retrieval accuracy on true pairs the fit did not use."""
    source_ids, target_ids = pairs.source_ids[:max_pairs], pairs.target_ids[:max_pairs]
    mapped = torch.addmm(bias.float(), source_embeddings[source_ids].float(), weight.float().T)  # (n, D_t)
    truth = target_embeddings[target_ids].float()
    scores = torch.nn.functional.normalize(mapped, dim=-1) @ torch.nn.functional.normalize(truth, dim=-1).T
    hits = (scores.argmax(dim=1) == torch.arange(len(target_ids))).double().mean()
    return {"heldout_pairs": len(target_ids), "heldout_cosine": mean_cosine(mapped, truth),
            "retrieval_accuracy": float(hits), "retrieval_candidates": len(target_ids)}
