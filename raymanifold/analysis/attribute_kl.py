"""The attribute vs recognition manifold study of Sec. 4.3 (seed 000, lines 373-408, Fig. 17) as pure functions.

The paper's eight steps, and where each one is done::

    1. build a recognition manifold by contrastive learning      raymanifold.recognition (the family)
    2. a data set with binary attribute labels                   raymanifold.analysis.attributes
    3. insert the samples onto the recognition manifold          recipe.encode (embed)
    4. nearest neighbour of every sample on that manifold        nearest_neighbours / nn_block + merge_nn
    5. p(a) over the whole set, per attribute a                  attribute_table
    6. p(a | a of the nearest neighbour = 0)                     attribute_table (and = 1)
    7. KL divergence between the two                             attribute_table (both directions)
    8. rank attributes by that KL                                rank

Choices the paper leaves open (REFERENCE.md, "Sec. 4.3"), stated here and in every report:

* **Self excluded.** Example i's neighbour is the closest *other* example (j != i); exact ties go to
  the lower index.
* **Distance**: ``euclidean`` (squared L2, same order as L2) or ``cosine`` (1 - cosine similarity).
* **Smoothing**: every probability is an additive (Laplace / Lidstone) estimate with ``alpha``
  pseudo-counts per outcome, p(a = 1) = (k + alpha) / (n + 2 alpha), so no probability is 0 or 1 and
  both KL directions are finite. ``alpha = 0`` gives raw frequencies (a KL may then be infinite).
* **KL direction.** Each attribute is a Bernoulli variable. The ranked quantity (Fig. 17b) is

      KL_0 = D_KL( p(a | a_nn = 0) || p(a) )        [nats]

  the information (in nats) that "the neighbour lacks the attribute" gives about the example's own
  attribute. The reverse direction D_KL(p(a) || p(a | a_nn = 0)), the same pair for a_nn = 1, and the
  mutual information I(a; a_nn) = sum_v p(a_nn = v) D_KL(p(a | a_nn = v) || p(a)) are reported beside it,
  and I(a; a_nn) / H(a) (``mi_normalized``, Theil's uncertainty coefficient, in [0, 1]).
* **Base rates.** KL_0 is bounded by the attribute's base rate: an attribute copied exactly by the
  neighbour has p(a | a_nn = 0) = 0 and KL_0 = -log(1 - p(a)), 0.69 nats at p = 1/2 but 0.29 at p = 1/4.
  So KL_0 ranks a perfectly identity-tied rare attribute below a balanced one that the neighbour shares
  only partly; ``mi_normalized`` is 1 for any attribute the neighbour determines and compares attributes
  of different base rates.

Bernoulli KL (nats): D_KL(Ber(p) || Ber(q)) = p log(p/q) + (1 - p) log((1 - p)/(1 - q)), with 0 log 0 = 0.

Shapes: ``A`` is (N, K) with values in {0, 1}; embeddings ``z`` are (N, d) float; indices are int64.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch

DISTANCES = ("euclidean", "cosine")
RANK_KEYS = ("kl_nn0", "kl_nn0_reverse", "kl_nn1", "kl_nn1_reverse", "mutual_information", "mi_normalized")


# ----------------------------------------------------------------------------- step 4: nearest neighbours
def _prepare(z: torch.Tensor, distance: str) -> torch.Tensor:
    if distance not in DISTANCES:
        raise ValueError(f"distance: unknown {distance!r}; allowed: {list(DISTANCES)}")
    z = torch.as_tensor(z, dtype=torch.float64)
    if z.ndim != 2:
        raise ValueError(f"embeddings: expected (N, d), got shape {tuple(z.shape)}")
    return torch.nn.functional.normalize(z, dim=1) if distance == "cosine" else z


def pairwise_distance(q: torch.Tensor, b: torch.Tensor, distance: str) -> torch.Tensor:
    """(Nq, Nb) distances between rows of prepared ``q`` and ``b``: squared L2 or 1 - cosine (float64)."""
    if distance == "cosine":
        return 1.0 - q @ b.T
    return (q * q).sum(1, keepdim=True) - 2.0 * q @ b.T + (b * b).sum(1)[None]


def nn_block(queries, query_ids, base, base_ids, distance: str = "euclidean", chunk: int = 4096):
    """Nearest base row of every query, excluding the base row with the same id (self).

    ``queries`` (Nq, d), ``query_ids`` (Nq,) int64, ``base`` (Nb, d), ``base_ids`` (Nb,) int64.
    Returns ``(index (Nq,) int64 into base_ids' values, distance (Nq,) float64)``: the *id* of the
    neighbour, so blocks of a sharded base merge with :func:`merge_nn`. A query whose only candidate is
    itself gets id -1 and distance +inf. Ties go to the lower id.
    """
    q = _prepare(queries, distance)
    b = _prepare(base, distance)
    qi = torch.as_tensor(np.asarray(query_ids), dtype=torch.int64)
    bi = torch.as_tensor(np.asarray(base_ids), dtype=torch.int64)
    # sort the base by id so that argmin's first-minimum rule breaks ties towards the lower id
    order = torch.argsort(bi)
    b, bi = b[order], bi[order]
    best_id = torch.full((len(q),), -1, dtype=torch.int64)
    best_d = torch.full((len(q),), math.inf, dtype=torch.float64)
    for s in range(0, len(q), chunk):
        d = pairwise_distance(q[s:s + chunk], b, distance)
        d[qi[s:s + chunk, None] == bi[None, :]] = math.inf   # self excluded
        if d.shape[1] == 0:
            continue
        m, j = d.min(dim=1)
        ok = torch.isfinite(m)
        best_id[s:s + chunk] = torch.where(ok, bi[j], torch.full_like(j, -1))
        best_d[s:s + chunk] = m
    return best_id.numpy(), best_d.numpy()


def merge_nn(a: tuple, b: tuple) -> tuple:
    """Elementwise better of two ``(ids, distances)`` results for the same queries (ties: lower id)."""
    ia, da = np.asarray(a[0]), np.asarray(a[1])
    ib, db = np.asarray(b[0]), np.asarray(b[1])
    take_b = (db < da) | ((db == da) & (ib >= 0) & ((ia < 0) | (ib < ia)))
    return np.where(take_b, ib, ia), np.where(take_b, db, da)


def nearest_neighbours(z, distance: str = "euclidean", chunk: int = 4096) -> np.ndarray:
    """Step 4 on one machine: (N,) index of each row's nearest *other* row of ``z`` (N, d)."""
    n = len(z)
    if n < 2:
        raise ValueError(f"embeddings: need at least 2 examples for a nearest neighbour, got {n}")
    ids = np.arange(n, dtype=np.int64)
    idx, _ = nn_block(z, ids, z, ids, distance, chunk)
    return idx


# ----------------------------------------------------------------------------- steps 5-7
def check_binary(A, names: Sequence[str]) -> np.ndarray:
    """``A`` as an (N, K) int64 array of 0/1; raises ValueError naming the first column with other values."""
    A = np.asarray(A)
    if A.ndim != 2 or A.shape[1] != len(names):
        raise ValueError(f"attributes: expected (N, {len(names)}) values, got shape {A.shape}")
    for k, name in enumerate(names):
        vals = np.unique(A[:, k])
        if not np.isin(vals, (0, 1)).all():
            shown = ", ".join(str(v) for v in vals[:6]) + (" ..." if len(vals) > 6 else "")
            raise ValueError(f"attributes: column {name!r} is not binary (values {shown}); "
                             f"the study needs 0/1 attributes")
    return A.astype(np.int64)


def bernoulli_kl(p, q) -> np.ndarray:
    """D_KL(Ber(p) || Ber(q)) in nats, elementwise (0 log 0 = 0; +inf where p > 0 = q or p < 1 = q)."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)

    def term(a, b):
        with np.errstate(divide="ignore", invalid="ignore"):
            t = a * (np.log(a) - np.log(b))
        return np.where(a == 0, 0.0, t)

    return term(p, q) + term(1 - p, 1 - q)


def smoothed(k, n, alpha: float) -> np.ndarray:
    """Additive estimate of p(a = 1) from k ones in n trials: (k + alpha) / (n + 2 alpha); NaN when n + 2 alpha = 0."""
    k, n = np.asarray(k, dtype=np.float64), np.asarray(n, dtype=np.float64)
    den = n + 2.0 * alpha
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, (k + alpha) / np.where(den > 0, den, 1.0), np.nan)


def attribute_table(A, nn_index, names: Sequence[str], alpha: float = 1.0) -> list[dict]:
    """Steps 5-7 for every attribute: one dict per column of ``A`` (N, K) given neighbours ``nn_index`` (N,).

    Keys: ``attribute``; ``p`` = p(a=1) over the set; ``p_nn0`` = p(a=1 | a_nn=0), ``p_nn1`` =
    p(a=1 | a_nn=1); the counts ``n``, ``n_nn0``, ``n_nn1``; ``agreement`` = fraction with a = a_nn;
    ``kl_nn0`` = D_KL(p(a|a_nn=0) || p(a)), ``kl_nn0_reverse`` = D_KL(p(a) || p(a|a_nn=0)), ``kl_nn1``,
    ``kl_nn1_reverse`` likewise, ``mutual_information`` = I(a; a_nn) (nats, with the smoothed estimates),
    ``mi_normalized`` = I(a; a_nn) / H(a).
    """
    A = check_binary(A, names)
    nn = np.asarray(nn_index, dtype=np.int64)
    if nn.shape != (len(A),):
        raise ValueError(f"nn_index: expected shape ({len(A)},), got {nn.shape}")
    if (nn < 0).any() or (nn >= len(A)).any():
        raise ValueError("nn_index: every example needs a neighbour index in [0, N)")
    if alpha < 0:
        raise ValueError(f"alpha: must be >= 0, got {alpha}")
    B = A[nn]                       # the neighbour's attributes
    n = len(A)
    rows = []
    for k, name in enumerate(names):
        a, b = A[:, k], B[:, k]
        n0, n1 = int((b == 0).sum()), int((b == 1).sum())
        k_all, k0, k1 = int(a.sum()), int(a[b == 0].sum()), int(a[b == 1].sum())
        p, p0, p1 = (float(smoothed(k_all, n, alpha)), float(smoothed(k0, n0, alpha)), float(smoothed(k1, n1, alpha)))
        w1 = float(smoothed(n1, n, alpha))   # p(a_nn = 1)
        kl0, kl1 = float(bernoulli_kl(p0, p)), float(bernoulli_kl(p1, p))
        mi = float(np.nansum([(1 - w1) * kl0, w1 * kl1]))
        h = float(-(p * np.log(p) if p > 0 else 0.0) - ((1 - p) * np.log(1 - p) if p < 1 else 0.0))
        rows.append({"attribute": name, "p": p, "p_nn0": p0, "p_nn1": p1, "n": n, "n_nn0": n0, "n_nn1": n1,
                     "agreement": float((a == b).mean()),
                     "kl_nn0": kl0, "kl_nn0_reverse": float(bernoulli_kl(p, p0)),
                     "kl_nn1": kl1, "kl_nn1_reverse": float(bernoulli_kl(p, p1)),
                     "mutual_information": mi, "mi_normalized": mi / h if h > 0 else float("nan")})
    return rows


# ----------------------------------------------------------------------------- step 8
def rank(rows: list[dict], key: str = "kl_nn0") -> list[dict]:
    """Rows sorted by ``key`` (largest first; NaN last), each with its 1-based ``rank``."""
    if key not in RANK_KEYS:
        raise ValueError(f"rank_by: unknown {key!r}; allowed: {list(RANK_KEYS)}")

    def sort_key(r):
        v = r[key]
        return (math.isnan(v), -v if not math.isnan(v) else 0.0, r["attribute"])

    out = [dict(r) for r in sorted(rows, key=sort_key)]
    for i, r in enumerate(out, 1):
        r["rank"] = i
    return out


def ranks_above(ranked: list[dict], tied: Sequence[str]) -> Optional[bool]:
    """True when every attribute in ``tied`` ranks above every other attribute of ``ranked`` (None when
    ``tied`` is empty or covers all rows: nothing to compare)."""
    names = [r["attribute"] for r in ranked]
    tied = [t for t in tied if t in names]
    if not tied or len(tied) == len(names):
        return None
    worst_tied = max(names.index(t) for t in tied)
    best_other = min(i for i, nm in enumerate(names) if nm not in tied)
    return worst_tied < best_other


def study(z, A, names: Sequence[str], *, distance: str = "euclidean", alpha: float = 1.0,
          rank_by: str = "kl_nn0", nn_index=None) -> dict:
    """Steps 4-8 on one machine: ``{"nn_index", "rows" (ranked)}`` for embeddings ``z`` and attributes ``A``."""
    A = check_binary(A, names)
    if len(z) != len(A):
        raise ValueError(f"embeddings: {len(z)} rows but {len(A)} attribute rows")
    nn = nearest_neighbours(z, distance) if nn_index is None else np.asarray(nn_index)
    return {"nn_index": nn, "rows": rank(attribute_table(A, nn, names, alpha), rank_by)}
