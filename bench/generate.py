#!/usr/bin/env python3
"""Seeded generator of Criteo-shaped CTR data with a hidden "teacher".

Output: TSV, no header, 40 columns ``label, I1..I13, C1..C26`` (the Criteo
Kaggle/Terabyte layout).

* ``I1..I13``: non-negative heavy-tailed counts (zero-inflated log-normal),
  ~10-40% empty cells per column; ``I2`` also takes -1..-3 now and then, like
  Criteo's I2.
* ``C1..C26``: 8-hex-char hash strings, Zipf-distributed per column, with
  vocabulary sizes shaped after Criteo's (3 .. 1e5 distinct values; the big
  Criteo fields are capped at 1e5), and a Criteo-like share of empty cells.
* ``label``: Bernoulli(sigmoid(teacher_logit)).  The teacher is a random FM
  (first-order + pairwise) plus a small MLP over per-field vectors.  Each
  categorical value's weights are a pure function of ``(seed, column, value)``
  (a hash), each numeric column's of ``(seed, column)``, so files produced from
  one seed -- including the train/valid/test files of ``--split`` -- share the
  same teacher.  The teacher's bias and component scales are calibrated on a
  fixed, seed-derived sample (independent of ``--rows``) to a ~25% click rate.

A JSON sidecar ``<out-stem>.json`` records rows, click rate and the teacher's
own AUC/logloss on exactly the rows written (exact AUC: all teacher scores are
kept as float32 and ranked with tie-averaging at the end; 5 bytes/row, i.e.
~225 MB at 45M rows -- everything else is streamed in 65,536-row blocks).

The output is a function of ``--seed`` and ``--rows`` only (row i always comes
from block i // 65536 seeded by (seed, block)), so the first N rows of a bigger
file equal a file of N rows.

Usage::

    python bench/generate.py --rows 200000 --seed 1 --out bench/.data/c200k.tsv
    python bench/generate.py --rows 1000000 --seed 1 --out bench/.data/c1m.tsv --split
        # -> c1m_train.tsv (80%), c1m_valid.tsv (10%), c1m_test.tsv (10%), c1m.json
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import sys
import time

# Parallelism comes from worker processes (one block each); keep BLAS single-threaded.
for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import numpy as np  # noqa: E402

N_INT = 13
N_CAT = 26
BLOCK = 65536
EMB_K = 8          # teacher's latent dimension
MLP_HIDDEN = 64    # teacher's MLP width
TARGET_CTR = 0.25
CALIB_ROWS = 262144

# Criteo Kaggle vocabulary sizes, capped at 1e5.
CRITEO_VOCAB = [1460, 583, 100000, 100000, 305, 24, 12517, 633, 3, 93145,
                5683, 100000, 3194, 27, 14992, 100000, 10, 5652, 2173, 4,
                100000, 18, 15, 100000, 105, 100000]
# Criteo-like share of empty categorical cells (roughly the real ones).
CRITEO_CAT_MISSING = [0.0, 0.0, 0.03, 0.03, 0.0, 0.12, 0.0, 0.0, 0.0, 0.0,
                      0.0, 0.03, 0.0, 0.0, 0.0, 0.03, 0.0, 0.0, 0.44, 0.44,
                      0.03, 0.76, 0.0, 0.03, 0.44, 0.44]

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """Vectorised SplitMix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return z


def hash_key(seed: int, *parts) -> np.ndarray:
    """Chain SplitMix64 over (seed, parts...); parts may be arrays (broadcast)."""
    h = splitmix64(np.uint64(seed & 0xFFFFFFFFFFFFFFFF))
    for p in parts:
        with np.errstate(over="ignore"):
            h = splitmix64(h ^ np.asarray(p, dtype=np.uint64))
    return h


def hash_normals(keys: np.ndarray, n: int) -> np.ndarray:
    """n standard normals per uint64 key (Box-Muller on hashed uniforms) -> [len, n]."""
    keys = np.asarray(keys, dtype=np.uint64)
    j = np.arange(n, dtype=np.uint64)
    h1 = splitmix64(keys[:, None] ^ (j[None, :] * np.uint64(0x632BE59BD9B4E019) + np.uint64(1)))
    h2 = splitmix64(h1 ^ np.uint64(0xD6E8FEB86659FD93))
    u1 = ((h1 >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)
    u2 = (h2 >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return (np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)).astype(np.float32)


class Spec:
    """Column distributions + teacher, all fixed by the seed."""

    def __init__(self, seed: int, ctr: float = TARGET_CTR):
        self.seed = seed
        rng = np.random.default_rng([seed, 0xC0FFEE])
        # --- integer columns -------------------------------------------------
        self.int_mu = rng.uniform(0.0, 5.0, N_INT)          # log-scale location
        self.int_sigma = rng.uniform(0.8, 2.2, N_INT)       # log-scale spread
        self.int_zero = rng.uniform(0.05, 0.45, N_INT)      # zero inflation
        self.int_missing = rng.uniform(0.10, 0.40, N_INT)   # empty cells
        self.int_neg = np.zeros(N_INT); self.int_neg[1] = 0.04   # I2: -1..-3
        # --- categorical columns ---------------------------------------------
        jitter = rng.uniform(0.8, 1.0, N_CAT)
        self.vocab = np.maximum(3, np.round(np.array(CRITEO_VOCAB) *
                                            np.where(np.array(CRITEO_VOCAB) > 50, jitter, 1.0))).astype(np.int64)
        self.zipf_s = rng.uniform(1.05, 1.4, N_CAT)
        self.zipf_q = rng.uniform(1.0, 10.0, N_CAT)          # Zipf-Mandelbrot offset
        one_s = 1.0 - self.zipf_s
        self.zipf_a = self.zipf_q ** one_s                      # F(0) envelope
        self.zipf_b = (self.vocab + self.zipf_q) ** one_s       # F(V) envelope
        self.zipf_e = 1.0 / one_s
        self.cat_missing = np.clip(np.array(CRITEO_CAT_MISSING) + rng.uniform(0, 0.02, N_CAT), 0, 0.9)
        self.cat_hash = []      # [V] uint32 value hashes (the 8-hex strings)
        self.cat_hex = []       # [V, 8] uint8 ascii
        for c in range(N_CAT):
            V = int(self.vocab[c])
            h = (hash_key(seed, 0xCA7, c, np.arange(V, dtype=np.uint64)) & np.uint64(0xFFFFFFFF))
            self.cat_hash.append(h.astype(np.uint64))
            self.cat_hex.append(hex8(h))
        # Pre-rendered TSV cells per value ("xxxxxxxx<sep>"; row V = empty cell).
        self.cat_cells, self.cat_len = [], []
        for c in range(N_CAT):
            V = int(self.vocab[c])
            sep = ord("\n") if c == N_CAT - 1 else ord("\t")
            table = np.empty((V + 1, 9), dtype=np.uint8)
            table[:-1, :8] = self.cat_hex[c]
            table[:, 8] = sep
            table[-1, 0] = sep
            self.cat_cells.append(np.ascontiguousarray(table).view("V9").ravel())
            self.cat_len.append(np.append(np.full(V, 9, dtype=np.uint8), 1).astype(np.uint8))
        # --- teacher -----------------------------------------------------------
        trng = np.random.default_rng([seed, 0x7EAC4E2])
        F = N_INT + N_CAT
        # Field importances: a few fields matter a lot, many little (log-normal).
        self.field_scale = np.exp(trng.normal(0.0, 0.6, F)).astype(np.float32)
        # Numeric columns: a direction for the value and one for "missing".
        self.int_u = trng.normal(0, 1, (N_INT, EMB_K + 1)).astype(np.float32)
        self.int_m = trng.normal(0, 1, (N_INT, EMB_K + 1)).astype(np.float32)
        # Categorical per-value weights are hashed from (seed, column, value):
        # column c's table row r is weights(value = cat_hash[c][r]); row V is
        # the weights of the empty cell.
        self.cat_w = []
        for c in range(N_CAT):
            keys = np.concatenate([self.cat_hash[c], np.array([1 << 40], dtype=np.uint64)])
            self.cat_w.append(teacher_value_weights(seed, c, keys))
        # Field-scaled views used by the vectorised teacher.
        self.cat_lin = [w[:, 0] * self.field_scale[N_INT + c] for c, w in enumerate(self.cat_w)]
        self.cat_vec = [np.ascontiguousarray(w[:, 1:] * self.field_scale[N_INT + c]) for c, w in enumerate(self.cat_w)]
        self.cat_sq = [(v * v).sum(axis=1) for v in self.cat_vec]
        self.W1 = (trng.normal(0, 1, (F * EMB_K, MLP_HIDDEN)) / math.sqrt(F * EMB_K)).astype(np.float32)
        self.b1 = trng.normal(0, 0.5, MLP_HIDDEN).astype(np.float32)
        self.W2 = (trng.normal(0, 1, MLP_HIDDEN) / math.sqrt(MLP_HIDDEN)).astype(np.float32)
        # Calibration (component scales then bias) on a fixed seed-derived sample.
        self.scale = np.ones(3, dtype=np.float32)
        self.bias = 0.0
        X = self.sample_block(np.random.default_rng([seed, 0xCA1B]), CALIB_ROWS)
        parts = self.teacher_parts(*X)
        target = np.array([1.0, 0.9, 0.9], dtype=np.float32)   # std of lin, fm, mlp
        self.scale = (target / (parts.std(axis=0) + 1e-9)).astype(np.float32)
        self.center = float((parts @ self.scale).mean())
        z = parts @ self.scale - self.center
        lo, hi = -10.0, 10.0
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            if (1.0 / (1.0 + np.exp(-(z + mid)))).mean() > ctr:
                hi = mid
            else:
                lo = mid
        self.bias = float(0.5 * (lo + hi))

    # ------------------------------------------------------------------ sampling
    def sample_block(self, rng: np.random.Generator, n: int):
        ints = np.empty((n, N_INT), dtype=np.int64)
        int_missing = np.empty((n, N_INT), dtype=bool)
        Z = rng.standard_normal((N_INT, n), dtype=np.float32)
        U = rng.random((2, N_INT, n), dtype=np.float32)
        for j in range(N_INT):
            v = np.exp(Z[j] * self.int_sigma[j] + self.int_mu[j]).astype(np.int64)
            v[U[0, j] < self.int_zero[j]] = 0
            if self.int_neg[j] > 0:
                neg = U[0, j] > 1.0 - self.int_neg[j]
                v[neg] = -rng.integers(1, 4, int(neg.sum()))
            np.minimum(v, 2_000_000_000, out=v)
            ints[:, j] = v
            int_missing[:, j] = U[1, j] < self.int_missing[j]
        cats = np.empty((n, N_CAT), dtype=np.int64)   # rank, or V == empty cell
        U = rng.random((2, N_CAT, n))
        for c in range(N_CAT):
            # Zipf-Mandelbrot ranks p(r) ~ (r + q)^-s via the inverse CDF of its
            # continuous (Pareto) envelope, floored: closed form, no table search.
            a, b, e = self.zipf_a[c], self.zipf_b[c], self.zipf_e[c]
            r = (np.power(a - U[0, c] * (a - b), e) - self.zipf_q[c]).astype(np.int64)
            np.clip(r, 0, self.vocab[c] - 1, out=r)
            r[U[1, c] < self.cat_missing[c]] = self.vocab[c]
            cats[:, c] = r
        return ints, int_missing, cats

    # ------------------------------------------------------------------ teacher
    def teacher_parts(self, ints, int_missing, cats, sub: int = 8192) -> np.ndarray:
        """[n, 3] unscaled (linear, fm, mlp) parts of the teacher logit (cache-sized sub-blocks)."""
        n = ints.shape[0]
        F = N_INT + N_CAT
        out = np.empty((n, 3), dtype=np.float32)
        fs = self.field_scale
        for lo in range(0, n, sub):
            hi = min(n, lo + sub); m = hi - lo
            X = np.empty((m, F, EMB_K), dtype=np.float32)
            lin = np.zeros(m, dtype=np.float32)
            sq = np.zeros(m, dtype=np.float32)
            iv = ints[lo:hi]; im = int_missing[lo:hi]
            t = np.sign(iv) * np.log1p(np.abs(iv))
            t = ((t - self.int_mu) / (self.int_sigma + 1.0)).astype(np.float32)
            E = np.where(im[:, :, None], self.int_m[None], t[:, :, None] * self.int_u[None]) * fs[None, :N_INT, None]
            X[:, :N_INT, :] = E[:, :, 1:]
            lin += E[:, :, 0].sum(axis=1)
            sq += (E[:, :, 1:] ** 2).sum(axis=(1, 2))
            for c in range(N_CAT):
                idx = cats[lo:hi, c]
                np.take(self.cat_vec[c], idx, axis=0, out=X[:, N_INT + c, :])
                lin += self.cat_lin[c][idx]
                sq += self.cat_sq[c][idx]
            s = X.sum(axis=1)
            out[lo:hi, 0] = lin / math.sqrt(F)
            out[lo:hi, 1] = 0.5 * ((s * s).sum(axis=1) - sq) / F
            h = X.reshape(m, F * EMB_K) @ self.W1
            h += self.b1
            np.maximum(h, 0.0, out=h)
            out[lo:hi, 2] = h @ self.W2
        return out

    def teacher_logit(self, ints, int_missing, cats) -> np.ndarray:
        z = self.teacher_parts(ints, int_missing, cats) @ self.scale
        return (z - self.center + self.bias).astype(np.float32)


def teacher_value_weights(seed: int, column: int, value_keys: np.ndarray) -> np.ndarray:
    """Teacher weights [len, 1 + EMB_K] of categorical values: hash of (seed, column, value)."""
    keys = hash_key(seed, 0x7EAC, column, value_keys)
    return hash_normals(keys, EMB_K + 1)


def hex8(h: np.ndarray) -> np.ndarray:
    """uint64 (low 32 bits used) -> [len, 8] uint8 lowercase hex ascii."""
    h = np.asarray(h, dtype=np.uint64)
    shifts = np.arange(28, -1, -4, dtype=np.uint64)
    nib = ((h[:, None] >> shifts[None, :]) & np.uint64(0xF)).astype(np.uint8)
    return np.where(nib < 10, nib + ord("0"), nib - 10 + ord("a")).astype(np.uint8)


_POW10 = 10 ** np.arange(19, dtype=np.int64)
_ARANGE = np.arange(64, dtype=np.uint8)
INT_W = 12            # cell width: up to 11 chars ("-" + 10 digits) + separator
_INT_TABLE_N = 1 << 20
_int_table = None


def _format_ints_slow(v: np.ndarray, sep: int, width: int = INT_W - 1):
    """Vectorised int -> ascii cells [n, width+1] (left-aligned, then sep) + lengths."""
    n = v.shape[0]
    neg = (v < 0).astype(np.int64)
    a = np.abs(v)
    nd = np.ones(n, dtype=np.int64)
    for e in range(1, width):
        nd += a >= _POW10[e]
    cells = np.empty((n, width + 1), dtype=np.uint8)
    for p in range(width + 1):
        q = p - neg
        e = np.clip(nd - 1 - q, 0, 18)
        d = ((a // _POW10[e]) % 10 + ord("0")).astype(np.uint8)
        cells[:, p] = np.where(q < 0, ord("-"), np.where(q < nd, d, sep))
    return cells, neg + nd + 1


def format_ints(v: np.ndarray, missing: np.ndarray, sep: int):
    """int column -> (cells as 'V12' void [n], lengths incl. sep). Table lookup for 0..2^20."""
    global _int_table
    if _int_table is None or _int_table[2] != sep:
        cells, lens = _format_ints_slow(np.arange(_INT_TABLE_N, dtype=np.int64), sep)
        _int_table = (np.ascontiguousarray(cells).view(f"V{INT_W}").ravel(), lens, sep)
    tab, tlen, _ = _int_table
    small = (v >= 0) & (v < _INT_TABLE_N)
    vi = np.where(small, v, 0)
    out = tab[vi]
    length = tlen[vi]
    if not small.all():
        big = np.flatnonzero(~small)
        c, L = _format_ints_slow(v[big], sep)
        out[big] = np.ascontiguousarray(c).view(f"V{INT_W}").ravel()
        length[big] = L
    length = np.where(missing, 1, length)
    out[missing] = tab[0]          # first byte of the cell is then overwritten below
    return out, length


def format_block(spec: Spec, labels, ints, int_missing, cats) -> bytes:
    """Whole block -> TSV bytes without any per-row Python (fixed-width cells, masked gather)."""
    n = labels.shape[0]
    widths = [2] + [INT_W] * N_INT + [9] * N_CAT
    offs = np.concatenate([[0], np.cumsum(widths)])
    M = np.empty((n, int(offs[-1])), dtype=np.uint8)
    L = np.empty((n, len(widths)), dtype=np.uint8)
    M[:, 0] = labels.astype(np.uint8) + ord("0"); M[:, 1] = ord("\t"); L[:, 0] = 2
    for j in range(N_INT):
        cells, L[:, 1 + j] = format_ints(ints[:, j], int_missing[:, j], ord("\t"))
        o = offs[1 + j]
        M[:, o:o + INT_W] = cells.view(np.uint8).reshape(n, INT_W)
        M[int_missing[:, j], o] = ord("\t")
    for c in range(N_CAT):
        tab = spec.cat_cells[c]
        r = cats[:, c]
        o = offs[1 + N_INT + c]
        M[:, o:o + 9] = tab[r].view(np.uint8).reshape(n, 9)
        L[:, 1 + N_INT + c] = spec.cat_len[c][r]
    # keep byte p of column j iff p < L[:, j]; one boolean gather in row-major order
    mask = np.empty(M.shape, dtype=bool)
    for j, w in enumerate(widths):
        np.less(_ARANGE[:w][None, :], L[:, j:j + 1], out=mask[:, offs[j]:offs[j] + w])
    return M[mask].tobytes()


def exact_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney AUC with tie-averaged ranks (exact for the given float32 scores)."""
    order = np.argsort(scores, kind="stable")
    s = scores[order]
    y = labels[order].astype(np.float64)
    n = s.shape[0]
    # tie groups
    boundary = np.empty(n, dtype=bool); boundary[0] = True
    boundary[1:] = s[1:] != s[:-1]
    gid = np.cumsum(boundary) - 1
    starts = np.flatnonzero(boundary)
    ends = np.append(starts[1:], n)
    avg_rank = (starts + ends + 1) / 2.0          # 1-based average rank
    ranks = avg_rank[gid]
    P = y.sum(); N = n - P
    if P == 0 or N == 0:
        return float("nan")
    return float(((ranks * y).sum() - P * (P + 1) / 2.0) / (P * N))


def logloss_from_logits(z: np.ndarray, y: np.ndarray) -> float:
    z = z.astype(np.float64)
    # -[y log s(z) + (1-y) log(1-s(z))] = softplus(z) - y z
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


_SPEC = None
_ARGS = None


def _gen_block(b: int):
    """Block b (rows b*BLOCK ..): (teacher logits, labels, [(split, tsv bytes)])."""
    spec = _SPEC
    seed, N, bounds, first_block = _ARGS
    lo = b * BLOCK; hi = min(N, lo + BLOCK)
    rng = np.random.default_rng([seed, 0xB10C, b + first_block])
    ints, imiss, cats = spec.sample_block(rng, BLOCK)   # always a full block: prefix-stable
    z = spec.teacher_logit(ints, imiss, cats)
    y = (rng.random(BLOCK) < 1.0 / (1.0 + np.exp(-z.astype(np.float64)))).astype(np.uint8)
    chunks = []
    for name, s, e in bounds:
        a, c = max(s, lo), min(e, hi)
        if a < c:
            sl = slice(a - lo, c - lo)
            chunks.append((name, format_block(spec, y[sl], ints[sl], imiss[sl], cats[sl])))
    return z[:hi - lo], y[:hi - lo], chunks


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="output .tsv path (stem for --split)")
    ap.add_argument("--split", action="store_true", help="write <stem>_train/_valid/_test.tsv 80/10/10")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                    help="worker processes (output does not depend on it)")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--ctr", type=float, default=TARGET_CTR,
                    help="the click rate the teacher's bias is calibrated to (default 0.25, Criteo's)")
    ap.add_argument("--first-block", type=int, default=0,
                    help="start at this block of the seed's row stream (same teacher, rows unseen by a file "
                         "that starts at block 0): e.g. a held-out test file for a big training file")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    spec = Spec(args.seed, args.ctr)
    t_spec = time.perf_counter() - t0
    out = args.out
    stem = out[:-4] if out.endswith(".tsv") else out
    os.makedirs(os.path.dirname(os.path.abspath(out)) or ".", exist_ok=True)
    N = args.rows
    if args.split:
        n_train = int(round(N * 0.8)); n_valid = int(round(N * 0.1))
        bounds = [("train", 0, n_train), ("valid", n_train, n_train + n_valid), ("test", n_train + n_valid, N)]
        paths = {name: f"{stem}_{name}.tsv" for name, _, _ in bounds}
    else:
        bounds = [("all", 0, N)]
        paths = {"all": out}
    files = {name: open(paths[name], "wb", buffering=1 << 22) for name in paths}
    logits = np.empty(N, dtype=np.float32)
    labels = np.empty(N, dtype=np.uint8)
    nbytes = 0
    n_blocks = (N + BLOCK - 1) // BLOCK
    global _SPEC, _ARGS
    _SPEC, _ARGS = spec, (args.seed, N, bounds, args.first_block)
    workers = max(1, min(args.workers, n_blocks))
    t1 = time.perf_counter()
    if workers > 1:
        pool = mp.get_context("fork").Pool(workers)
        it = pool.imap(_gen_block, range(n_blocks))      # ordered; ~workers blocks in flight
    else:
        pool = None
        it = map(_gen_block, range(n_blocks))
    for b, (z, y, chunks) in enumerate(it):
        lo = b * BLOCK; hi = lo + len(z)
        logits[lo:hi] = z; labels[lo:hi] = y
        for name, data in chunks:
            files[name].write(data); nbytes += len(data)
        if not args.quiet and b % 32 == 31:
            el = time.perf_counter() - t1
            print(f"  {hi:,} rows  {hi / el:,.0f} rows/s", file=sys.stderr)
    if pool is not None:
        pool.close(); pool.join()
    for f in files.values():
        f.close()
    t_gen = time.perf_counter() - t1

    def stats(s, e):
        return {"rows": int(e - s), "click_rate": float(labels[s:e].mean()),
                "teacher_auc": exact_auc(logits[s:e], labels[s:e]),
                "teacher_logloss": logloss_from_logits(logits[s:e], labels[s:e].astype(np.float64)),
                "base_logloss": float(-(lambda p: p * math.log(p) + (1 - p) * math.log(1 - p))(float(labels[s:e].mean())))}

    side = {"seed": args.seed, **stats(0, N),
            "files": {name: os.path.abspath(p) for name, p in paths.items()},
            "bytes": nbytes, "gen_seconds": round(t_gen, 3), "setup_seconds": round(t_spec, 3),
            "rows_per_s": round(N / t_gen, 1),
            "columns": ["label"] + [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)],
            "vocab_sizes": [int(v) for v in spec.vocab],
            "teacher": {"kind": "FM(linear+pairwise, k=%d) + MLP(%d->%d->1)" % (EMB_K, (N_INT + N_CAT) * EMB_K, MLP_HIDDEN),
                        "component_scales": [float(x) for x in spec.scale], "bias": spec.bias,
                        "target_ctr": args.ctr, "calibration_rows": CALIB_ROWS}}
    if args.split:
        side["splits"] = {name: stats(s, e) for name, s, e in bounds}
    with open(stem + ".json", "w") as f:
        json.dump(side, f, indent=2)
    if not args.quiet:
        print(json.dumps({k: side[k] for k in ("rows", "click_rate", "teacher_auc", "teacher_logloss", "rows_per_s")}))


if __name__ == "__main__":
    main()
