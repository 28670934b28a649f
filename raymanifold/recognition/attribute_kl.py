"""The attribute vs recognition manifold study of Sec. 4.3 (seed 000, lines 373-408, Fig. 17) as pure functions.

The paper's eight steps, and where each one is done::

    1. build a recognition manifold by contrastive learning      raymanifold.recognition (the family)
    2. a data set with binary attribute labels                   raymanifold.recognition.attributes
    3. insert the samples onto the recognition manifold          recipe.encode (embed)
    4. nearest neighbour of every sample on that manifold        nearest_neighbours / nn_block + merge_nn
    5. p(a) over the whole set, per attribute a                  attribute_table
    6. p(a | a of the nearest neighbour = 0)                     attribute_table (and = 1)
    7. KL divergence between the two                             attribute_table (both directions)
    8. rank attributes by that KL                                rank
       ... with uncertainty (not in the paper)                   permutation_null, bootstrap_ranks, ranking_with_ties

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

* **Uncertainty of the ranking** (not in the paper). :func:`permutation_null` shuffles the neighbours'
  attributes across examples (a_nn of example i becomes that of a random other example's neighbour): the
  null of "the manifold's neighbour says nothing about the attribute", with the base rate kept, so each
  statistic gets its chance level and a permutation p-value. :func:`bootstrap_ranks` resamples the
  (example, neighbour) pairs with replacement (the neighbours found on the whole set are kept: a
  simplification, the search is not redone) and ranks every replicate; :func:`ranking_with_ties` joins
  neighbours in the ranking whose bootstrap difference interval contains 0 into one tie group.

Bernoulli KL (nats): D_KL(Ber(p) || Ber(q)) = p log(p/q) + (1 - p) log((1 - p)/(1 - q)), with 0 log 0 = 0.

Shapes: ``A`` is (N, K) with values in {0, 1}; embeddings ``z`` are (N, d) float; indices are int64.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch

DISTANCES = ("euclidean", "cosine")
RANK_KEYS = ("kl_nn0", "kl_nn0_reverse", "kl_nn1", "kl_nn1_reverse", "mutual_information", "mi_normalized",
             "kl_nn0_fraction")


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
    ``mi_normalized`` = I(a; a_nn) / H(a) (normalised mutual information, Theil's U), ``kl_nn0_max`` =
    -log(1 - p), the largest KL_0 an attribute of base rate p can have (reached when p(a | a_nn = 0) = 0),
    and ``kl_nn0_fraction`` = KL_0 / kl_nn0_max.
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
                     "mutual_information": mi, "mi_normalized": mi / h if h > 0 else float("nan"),
                     "kl_nn0_max": float(-np.log1p(-p)) if p < 1 else float("inf"),
                     "kl_nn0_fraction": kl0 / float(-np.log1p(-p)) if 0 < p < 1 else float("nan")})
    return rows


# ----------------------------------------------------------------------------- uncertainty of step 8
def pair_stats(a: np.ndarray, b: np.ndarray, alpha: float = 1.0) -> dict:
    """The statistics of :func:`attribute_table` for all K attributes at once, from the example attributes
    ``a`` (N, K) and their neighbours' ``b`` (N, K) (0/1): {key: (K,) float64} for ``kl_nn0``,
    ``kl_nn0_fraction``, ``mutual_information``, ``mi_normalized``, ``p``, ``p_nn0``, ``p_nn1`` (equal to the
    table's values; used by the permutation null and the bootstrap)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    n = len(a)
    n1 = b.sum(0)
    n0 = n - n1
    k_all, k1 = a.sum(0), (a * b).sum(0)
    k0 = k_all - k1
    p, p0, p1 = smoothed(k_all, n, alpha), smoothed(k0, n0, alpha), smoothed(k1, n1, alpha)
    w1 = smoothed(n1, n, alpha)
    kl0, kl1 = bernoulli_kl(p0, p), bernoulli_kl(p1, p)
    mi = np.nan_to_num((1 - w1) * kl0) + np.nan_to_num(w1 * kl1)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(np.where(p > 0, p * np.log(p), 0.0) + np.where(p < 1, (1 - p) * np.log1p(-p), 0.0))
        cap = -np.log1p(-p)
        return {"kl_nn0": kl0, "kl_nn0_fraction": np.where((p > 0) & (p < 1), kl0 / cap, np.nan),
                "mutual_information": mi, "mi_normalized": np.where(h > 0, mi / h, np.nan), "p": p, "p_nn0": p0,
                "p_nn1": p1}


def _check_pairs(A, nn_index, names):
    A = check_binary(A, names)
    nn = np.asarray(nn_index, dtype=np.int64)
    if nn.shape != (len(A),) or (nn < 0).any() or (nn >= len(A)).any():
        raise ValueError(f"nn_index: expected ({len(A)},) indices in [0, N)")
    return A, A[nn]


def permutation_null(A, nn_index, names: Sequence[str], *, alpha: float = 1.0, keys=("kl_nn0", "mi_normalized"),
                     permutations: int = 200, generator: Optional[np.random.Generator] = None) -> dict:
    """The permutation null of each statistic: the neighbours' attribute rows are shuffled across examples
    (one permutation of the N rows per replicate, shared by all attributes), which keeps every base rate and
    breaks the link between an example and its neighbour.

    Returns {key: {"observed" (K,), "null_mean" (K,), "null_q95" (K,), "p" (K,)}} with the permutation
    p-value p = (1 + #{null >= observed}) / (1 + permutations)."""
    if permutations < 1:
        raise ValueError(f"permutations: must be >= 1, got {permutations}")
    A, B = _check_pairs(A, nn_index, names)
    rng = generator if generator is not None else np.random.default_rng(0)
    obs = pair_stats(A, B, alpha)
    null = {k: np.empty((permutations, A.shape[1])) for k in keys}
    for r in range(permutations):
        st = pair_stats(A, B[rng.permutation(len(B))], alpha)
        for k in keys:
            null[k][r] = st[k]
    return {k: {"observed": obs[k], "null_mean": null[k].mean(0), "null_q95": np.quantile(null[k], 0.95, axis=0),
                "p": (1 + (null[k] >= obs[k][None]).sum(0)) / (1 + permutations)} for k in keys}


def _ranks(values: np.ndarray) -> np.ndarray:
    """(R, K) 1-based ranks of each row, largest first (NaN last; exact ties by column order)."""
    v = np.where(np.isnan(values), -np.inf, np.atleast_2d(values))
    order = np.argsort(-v, axis=1, kind="stable")
    ranks = np.empty(v.shape, dtype=np.int64)
    ranks[np.arange(len(v))[:, None], order] = np.arange(1, v.shape[1] + 1)[None]
    return ranks


def bootstrap_ranks(A, nn_index, names: Sequence[str], *, alpha: float = 1.0, keys=("kl_nn0", "mi_normalized"),
                    replicates: int = 1000, level: float = 0.95,
                    generator: Optional[np.random.Generator] = None) -> dict:
    """Bootstrap of the ranking: the N (example, neighbour) pairs are resampled with replacement
    ``replicates`` times and the K attributes ranked in each replicate by each key.

    Returns {key: {"values" (R, K), "ranks" (R, K) int, "rank_lo", "rank_hi" (K,) (the ``level`` percentile
    interval of each attribute's rank), "rank_median" (K,), "value_lo", "value_hi" (K,)}}."""
    if replicates < 2:
        raise ValueError(f"bootstrap: need at least 2 replicates, got {replicates}")
    A, B = _check_pairs(A, nn_index, names)
    rng = generator if generator is not None else np.random.default_rng(0)
    vals = {k: np.empty((replicates, A.shape[1])) for k in keys}
    for r in range(replicates):
        idx = rng.integers(0, len(A), len(A))
        st = pair_stats(A[idx], B[idx], alpha)
        for k in keys:
            vals[k][r] = st[k]
    q = ((1 - level) / 2, 1 - (1 - level) / 2)
    out = {}
    for k in keys:
        rk = _ranks(vals[k])
        lo, hi = np.quantile(rk, q, axis=0, method="inverted_cdf")
        vlo, vhi = np.nanquantile(vals[k], q, axis=0)
        out[k] = {"values": vals[k], "ranks": rk, "rank_lo": lo.astype(int), "rank_hi": hi.astype(int),
                  "rank_median": np.median(rk, axis=0), "value_lo": vlo, "value_hi": vhi}
    return out


def ranking_with_ties(names: Sequence[str], observed: np.ndarray, boot_values: np.ndarray,
                      level: float = 0.95) -> list[dict]:
    """The ranking by ``observed`` (K,) (largest first) with tie groups: two attributes adjacent in the ranking
    are tied when the ``level`` bootstrap percentile interval of their difference (from ``boot_values`` (R, K),
    the same replicates for both) contains 0; chains of ties form one group, whose members share the rank
    label "a-b" (positions a..b). Returns one dict per attribute in ranked order: ``attribute``, ``value``,
    ``position`` (1-based), ``group`` (1-based tie group), ``rank_label``, ``tied_with_next`` (bool)."""
    obs = np.asarray(observed, dtype=float)
    order = [int(i) for i in np.argsort(-np.where(np.isnan(obs), -np.inf, obs), kind="stable")]
    q = ((1 - level) / 2, 1 - (1 - level) / 2)
    tied_next = []
    for i, j in zip(order[:-1], order[1:]):
        d = boot_values[:, i] - boot_values[:, j]
        d = d[~np.isnan(d)]
        lo, hi = np.quantile(d, q) if len(d) else (np.nan, np.nan)
        tied_next.append(bool(lo <= 0 <= hi) if len(d) else True)
    tied_next.append(False)
    groups, g = [], 1
    for pos in range(len(order)):
        groups.append(g)
        if not tied_next[pos]:
            g += 1
    rows = []
    for pos, i in enumerate(order):
        members = [p for p in range(len(order)) if groups[p] == groups[pos]]
        label = f"{members[0] + 1}" if len(members) == 1 else f"{members[0] + 1}-{members[-1] + 1}"
        rows.append({"attribute": names[i], "value": float(obs[i]), "position": pos + 1, "group": groups[pos],
                     "rank_label": label, "tied_with_next": tied_next[pos]})
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
