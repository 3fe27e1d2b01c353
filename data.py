"""Data stage: from an .h5ad file to the `Dataset` the other stages consume, and the plumbing they share.

    python data.py --data X.h5ad            # summary: keys, labels, doses, conditions, split sizes
    python data.py --simulate sim.h5ad      # write the built-in synthetic benchmark (--kind chemical: a drug screen)

A `Dataset` holds the log1p expression of the selected genes (CSR, one row per cell, rows grouped by
(condition, covariate) key), the split, a `Reference` of real statistics per key (what verifiers and metrics
compare generated cells to) and the prior of every key (`Dataset.start`: where the generator starts).
Conditions are canonical labels: 'A', 'A+B' (components sorted), and for drug screens 'A@0.1+B@1' (doses in uM;
read_conditions). h5ad is read and written with h5py alone (no anndata at run time). Memory grows with the
non-zeros: a `Reference`'s cells are a view of the CSR matrix, and `--lazy` reads the file in blocks of cells.

Sections: the method first (config, Reference, Dataset and its priors, what flow.train draws, the comparisons and
noise every stage uses, splits), then a fence and what no reader comes for (loading: labels, doses, preprocessing and
h5ad I/O; torchrun, checkpoints, the CLI; simulators).

Left out: obsm/varm/obsp (never read), reading cells from disk per batch, MuData, zarr, multi-modal data,
gene-name harmonisation across species, dose units other than molar (uM, nM, mM).
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import os
import pickle
import re
import shutil
import signal
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, fields, replace
from datetime import timedelta
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: spinning threads stall a shared CPU

import h5py
import numpy as np
import scipy.sparse as sp
import torch
import torch.distributed as dist
from tqdm import tqdm


class UserError(ValueError):
    """An expected problem with what the user gave (data, options, checkpoints, devices): CLIs print the message as
    one `error:` line and exit 2, no traceback."""


# ---------------------------------------- the dataset: config, real statistics, priors
@dataclass
class DataConfig:
    data: str | None = None         # h5ad path; None -> the built-in simulator (cached)
    layer: str | None = None        # read this layer instead of X
    kind: str = "genetic"           # with no --data, the built-in simulator: genetic (Perturb-seq) | chemical (drug screen)
    pert_key: str | None = None     # perturbation column (auto-detected); 'Drug1,Drug2': one column per combination slot
    control: str | None = None      # control label (auto-detected)
    covariate_key: str | None = None  # covariate column, e.g. cell line (auto; 'none' disables)
    dose_key: str | None = None     # dose column (auto; ignored when constant; 'none' disables; 'Dose1,Dose2' per slot)
    dose_unit: str = "auto"         # unit of the doses: uM | nM | mM | auto (column name, else nM above 1000); labels in uM
    gene_symbols: str | None = None  # var column with gene symbols (auto when var names are Ensembl)
    n_genes: int = 2000             # highly variable genes to keep (0 = all)
    min_cells: int = 10             # conditions with fewer cells are dropped (with a warning)
    split: str = "auto"             # auto | additive | random | dose | drug | explicit
    test: str | None = None         # explicit test conditions 'A+B,C+D' (or 'A+B:COV', 'D@0.1', 'A+B@0.1+1')
    test_frac: float = 0.25         # fraction of candidate conditions held out for test
    val_frac: float = 0.15          # fraction held out for validation
    seed: int = 0                   # seed of weights and sampling (the split has its own)
    split_seed: int = 0             # seed of the split: which conditions are held out
    prior_trust: float | None = None  # fix the prior trust c of every prior kind (None: fitted, Dataset.prior_trust)
    n_de: int = 50                  # top DE genes per condition (by |Welch t|)
    std_floor: float = 0.1          # floor on control std (z-scores, Welch t)
    lazy: bool = False              # leave X on disk: read it in blocks of cells (twice), never the whole matrix
    ref_cells: int = 0              # real cells per condition kept for rewards and metrics (a seeded sample; 0 = all)


@dataclass
class Reference:
    """Real statistics of one (condition, covariate), in log1p expression space."""
    ctrl_mean: torch.Tensor  # (G,) mean of the covariate's control cells
    ctrl_std: torch.Tensor   # (G,) their std, floored
    mean: torch.Tensor       # (G,) mean of the real perturbed cells
    delta: torch.Tensor      # (G,) mean - ctrl_mean
    t: torch.Tensor          # (G,) Welch t statistic, perturbed vs control
    de_idx: torch.Tensor     # (n_de,) long, top genes by |t|, descending
    X: torch.Tensor          # (N, G) the real perturbed cells: dense, or sparse CSR (load_dataset: a view of ds.X)

    def dense_cells(self) -> torch.Tensor:             # (N, G) X itself, or a dense copy of a sparse X at every call
        return self.X.to_dense() if self.X.layout == torch.sparse_csr else self.X

    def dense(self) -> "Reference":                    # its cells densified once, for code that reads them often
        return replace(self, X=self.dense_cells())

    def to(self, device) -> "Reference":               # sparse cells stay sparse (densified there when read)
        return Reference(*(getattr(self, f.name).to(device) for f in fields(self)))


class SparseRows:
    """The expression matrix of the selected genes, (n_cells, G) float32 log1p, stored as CSR (`csr`): memory grows
    with the non-zeros. X[rows] densifies only what it selects ((len(rows), G) ndarray); np.asarray(X) all of it."""

    def __init__(self, csr: sp.csr_matrix):
        self.csr, self.shape, self.dtype = csr, csr.shape, csr.dtype

    def __getitem__(self, idx) -> np.ndarray:
        out = self.csr[idx].toarray()
        return out[0] if isinstance(idx, (int, np.integer)) else out

    def __array__(self, dtype=None, copy=None):
        return self.csr.toarray() if dtype is None else self.csr.toarray().astype(dtype)


PRIOR_MIN_CORR = 0.2   # the prior is trusted only when it correlates at least this well with training deltas


@dataclass
class Dataset:
    X: SparseRows                     # (n_cells, G) float32 log1p expression, CSR (X[rows] dense), rows grouped by key
    genes: list                       # (G,) gene symbols
    label: np.ndarray                 # (n_cells,) canonical label: '' (control), 'A', 'A+B' (sorted), 'D@10'
    cov: np.ndarray                   # (n_cells,) covariate label; 'all' without one
    is_ctrl: np.ndarray               # (n_cells,) bool
    keys: list                        # non-control (condition, covariate) pairs
    split: dict                       # 'train' / 'val' / 'test' -> keys
    components: list                  # perturbation vocabulary (names without dose)
    covariates: list
    refs: dict                        # key -> Reference
    ctrl_idx: dict                    # covariate -> row indices of its control cells
    cell_idx: dict                    # key -> row indices of its cells
    meta: dict = field(default_factory=dict)  # keys and labels found, for writing predictions

    def component_deltas(self, key) -> list:
        """Per component of `key`, its training single-perturbation mean delta (G,): the single of the same drug at
        the same dose in the same covariate, or interpolated in log-dose between that drug's neighbouring seen doses
        there (interpolate_log_dose), else the mean over the other covariates of the same, else None. A key is never
        its own prior: a training single gets what a held-out one would get, so training keys look like test ones."""
        index = self.single_index()

        def at(name, dose, c):                       # the drug's delta at `dose` from its singles in covariate c
            seen = [d for d in _available(index, key, name, c) if (d is None) == (dose is None)]
            deltas = [self.refs[index[(name, c)][d]].delta.numpy() for d in seen]
            return None if not seen else deltas[0] if dose is None else interpolate_log_dose(seen, deltas, dose)
        out = []
        for name, dose in components_of(key[0]):
            own = at(name, dose, key[1])
            other = [d for d in (at(name, dose, c) for c in self.covariates if c != key[1]) if d is not None]
            out.append(own if own is not None else np.mean(other, axis=0) if other else None)
        return out

    def _cached(self, name, make, *extra):             # make() once per split (its training, validation keys), extra
        key = (*(tuple(map(tuple, self.split[s])) for s in ("train", "val")), *extra)  # not a field: replace() forgets
        if (memo := self.__dict__.setdefault("_memo", {})).get(name, (None,))[0] != key:
            memo[name] = (key, make())
        return memo[name][1]

    def single_index(self) -> dict:                    # single_index of the training keys, once per split
        return self._cached("index", lambda: single_index(tuple(map(tuple, self.split["train"]))))

    def additive_delta(self, key) -> np.ndarray:       # the additive prior: the sum of component_deltas (None: 0)
        return sum((d for d in self.component_deltas(key) if d is not None),
                   np.zeros(len(self.genes), np.float32)).astype(np.float32)

    def prior_kind(self, key) -> str:
        return prior_kind(key, self.split["train"], self.single_index())

    def mean_delta(self, key, sums=None) -> np.ndarray:
        """The mean delta of the training perturbations of key's covariate, key itself left out (the training-mean
        baseline, the best simple predictor on mcfaline23's cell-line transfer); of every covariate's for a covariate
        with none (a cell line held out whole). sums: _delta_sums(), if known."""
        sums = sums or self._delta_sums()
        total, n = sums[key[1]] if sums[key[1]][1] > 0 else map(sum, zip(*sums.values()))
        if tuple(key) in set(map(tuple, self.split["train"])):          # leave the key itself out
            total, n = total - self.refs[tuple(key)].delta.numpy().astype(np.float64), n - 1
        return (total / n).astype(np.float32) if n > 0 else np.zeros(len(self.genes), np.float32)

    def _delta_sums(self) -> dict:                     # {covariate: (sum of its training deltas (G,) float64, count)}
        out = {c: (np.zeros(len(self.genes)), 0) for c in self.covariates}
        for k in self.split["train"]:
            total, n = out[k[1]]
            out[k[1]] = (total + self.refs[k].delta.numpy(), n + 1)
        return out

    def prior_trust(self, min_corr: float = PRIOR_MIN_CORR) -> dict:
        """{kind: c}: how far each kind of prior is trusted: the additive prior of an 'additive', 'dose' or
        'transfer' key (prior_kind), and the training-mean delta ('mean'). Fitted once per split on the training
        keys (whose priors never contain themselves), pooled over keys and genes d (real delta), p (prior):
            rho = sum <d, p> / sqrt(sum |d|^2 sum |p|^2),
            c = min(1, sqrt(sum |d|^2 / sum |p|^2)) if rho >= min_corr else 0,
        i.e. a prior whose direction carries information, scaled to the size of the real deltas. A kind that no
        training key has (untrained_kinds: e.g. every combination held out) cannot be fitted: it gets c = 1, the plain
        prior (for combinations the plain sum, which no published deep model beats on Norman's doubles), never a
        silent 0."""
        return dict(self._cached("trust", lambda: self._fit_trust(min_corr), min_corr, self.meta.get("prior_trust")))

    def _fit_trust(self, min_corr) -> dict:            # prior_trust, computed
        kinds = ("additive", "dose", "transfer", "mean")
        if self.meta.get("prior_trust") is not None:              # --prior-trust: fixed, for ablations
            return {**{k: float(self.meta["prior_trust"]) for k in kinds}, "none": 0.0}
        sums, totals = {kind: np.zeros(3) for kind in kinds}, self._delta_sums()  # sum <d, p>, |d|^2, |p|^2
        for k in self.split["train"]:
            d, kind = self.refs[k].delta.numpy().astype(np.float64), self.prior_kind(k)
            for kd, p in [(kind, self.additive_delta(k)), ("mean", self.mean_delta(k, totals))]:
                if kd != "none":
                    p = p.astype(np.float64)
                    sums[kd] += [p @ d, d @ d, p @ p]
        out = {"none": 0.0}
        for kind, (pd, dd, pp) in sums.items():
            ok = pp > 0 and dd > 0 and pd / np.sqrt(dd * pp) >= min_corr
            out[kind] = float(min(1.0, np.sqrt(dd / pp))) if ok else 0.0
        out.update({kind: 1.0 for kind in self.untrained_kinds()})   # no evidence: the plain prior
        return out

    def untrained_kinds(self) -> set:
        """Prior kinds of held-out (validation or test) keys that no training key has, so prior_trust cannot fit
        them and the generator never saw one in training (flow.train then makes training examples of them)."""
        return ({self.prior_kind(k) for k in self.split["val"] + self.split["test"]}
                - {self.prior_kind(k) for k in self.split["train"]} - {"none"})

    def novel(self, key) -> bool:
        """No component of `key` is in any training key: the generator knows it only by its gene features."""
        seen = self._cached("seen", lambda: {n for k in self.split["train"] for n, _ in components_of(k[0])})
        return not any(n in seen for n, _ in components_of(key[0]))

    def unvalidated(self, key) -> bool:
        """A held-out key the validation keys say nothing about: none of its components is in a training key (novel),
        or its prior kind is one no validation key has (--test doubles with seen singles when no validation double
        has its singles). Training keys never are. The network's change is trusted for these only as far as the
        novel validation keys show (flow.fit_lam): none without such keys, leaving the start predictor."""
        train, kinds = self._cached("val_kinds", lambda: (set(map(tuple, self.split["train"])),  # key_table: per key
                                                          {self.prior_kind(k) for k in self.split["val"]}))
        return tuple(key) not in train and (self.novel(key) or self.prior_kind(key) not in kinds)

    def unseen_components(self) -> set:
        """Components of held-out keys that no training key contains: their learned embedding is never trained."""
        return {n for k in self.split["val"] + self.split["test"] for n, _ in components_of(k[0]) if self.novel((n,))}

    def start(self, key, trust=None) -> np.ndarray:
        """Where the generator starts for `key` (G,): the best trusted simple predictor. c * its additive prior when
        that kind is trusted, else c_mean * the training-mean delta (mean_delta) when that is trusted, else zero
        (the control cell). With paired generation (flow.sample, ODE) a network that outputs zero generates exactly
        control cell + start (before decode's clip at 0)."""
        trust = trust or self.prior_trust()
        c = trust[self.prior_kind(key)]
        return (c * self.additive_delta(key) if c > 0 else trust["mean"] * self.mean_delta(key)).astype(np.float32)

    def held_out_controls(self, cov) -> np.ndarray:
        """A fixed tenth of the covariate's control cells (the same in every stage and run) that pretraining never
        uses, so the generator's control condition is checked on cells it never saw (flow.control_check)."""
        rows = self.ctrl_idx[cov]
        return np.sort(rows[np.random.default_rng(len(rows)).permutation(len(rows))[:max(1, len(rows) // 10)]])

    def fold_deltas(self, key, seed: int = 0):
        """Cross-fitting of a key's own prior: its cells split at random into two halves (fold (n,) 0/1, seeded) and
        the mean delta of each half, deltas (2, G). A cell of fold f is trained with the prior of fold 1 - f, so a
        training condition never sees its own target cells in its prior (flow.train)."""
        rows = self.cell_idx[tuple(key)]
        fold = np.zeros(len(rows), np.int64)
        fold[np.random.default_rng([seed, self.keys.index(tuple(key))]).permutation(len(rows))[len(rows) // 2:]] = 1
        ctrl = self.refs[tuple(key)].ctrl_mean.numpy()
        return fold, np.stack([np.asarray(self.X.csr[rows[fold == f]].mean(0)).ravel() - ctrl for f in (0, 1)]
                              ).astype(np.float32)

    def key_table(self, keys) -> dict:
        """Padded tensors describing each key: comps (K, C) 1 + index into components (0 = padding), dose (K, C)
        the log-dose feature u = 1 + log10(d / d_max) / max(log10(d_max / d_min), 1) over the data's doses in uM
        (d_max -> 1, d_min -> 0 or above; an unseen dose falls between its neighbours; a component without dose,
        e.g. a gene, is fixed at 1; padding 0), cov (K,), prior (K, G) expression space, start (K, G), where the
        generator starts (Dataset.start), and evidence (K,) long, what says how far the network's learned change carries
        to the key: 0 trained on (its own cells), 1 held out like validation keys, 2 held out and unvalidated
        (Dataset.unvalidated); flow.VelocityField.lam holds the residual trust of each class."""
        parsed, index = [components_of(k[0]) for k in keys], {c: i + 1 for i, c in enumerate(self.components)}
        lo, hi = self.meta.get("dose_range") or (1.0, 1.0)
        span, trust, train = max(np.log10(hi / lo), 1.0), self.prior_trust(), set(map(tuple, self.split["train"]))
        comps = torch.zeros(len(keys), max(map(len, parsed)), dtype=torch.long)
        dose = torch.zeros(comps.shape)
        for i, p in enumerate(parsed):
            for j, (name, d) in enumerate(p):
                comps[i, j], dose[i, j] = index.get(name, 0), 1.0 if d is None else float(1 + np.log10(d / hi) / span)
        return {"comps": comps, "dose": dose, "cov": torch.tensor([self.covariates.index(k[1]) for k in keys]),
                "prior": torch.from_numpy(np.stack([self.additive_delta(k) for k in keys])),            # (K, G)
                "start": torch.from_numpy(np.stack([self.start(k, trust) for k in keys])),              # (K, G)
                "evidence": torch.tensor([0 if tuple(k) in train else 1 + self.unvalidated(k) for k in keys])}


# ---------------------------------------- what the priors are made of
def components_of(label: str):
    """Canonical label 'A@10+B@1' -> [('A', 10.0), ('B', 1.0)]; no dose -> None."""
    return [(name, float(dose) if dose else None) for name, _, dose in (p.partition("@") for p in label.split("+"))]


def single_index(train) -> dict:
    """{(drug, covariate): {dose: key}} of the single-component keys in `train` (dose None without one)."""
    out = {}
    for k, comps in ((k, components_of(k[0])) for k in train):
        if len(comps) == 1:
            out.setdefault((comps[0][0], k[1]), {})[comps[0][1]] = tuple(k)
    return out


def _available(index, key, name, cov) -> list:
    """Doses of drug `name` seen as singles in `cov`, the key itself left out (a key is never its own prior)."""
    own = components_of(key[0])
    skip = own[0][1] if len(own) == 1 and own[0][0] == name and cov == key[1] else "-"
    return [d for d in index.get((name, cov), ()) if d != skip]


def prior_kind(key, train, index=None) -> str:
    """What the additive prior of `key` is made of, given the training keys: 'additive' when every component's
    drug has a training single in the key's covariate (at that dose, or at other doses it is interpolated from;
    'dose' for a single drug, whose prior is then its own response at other doses), 'transfer' when every one
    has one in some covariate, else 'none'. The key itself never counts. index: single_index(train), if known."""
    index = single_index(train) if index is None else index
    comps = components_of(key[0])
    if all(_available(index, key, n, key[1]) for n, _ in comps):
        return "additive" if len(comps) > 1 else "dose"                # 'dose': a drug at another dose
    transfer = all(any(_available(index, key, n, c) for m, c in index if m == n) for n, _ in comps)
    return "transfer" if transfer else "none"


def interpolate_log_dose(doses, deltas, d) -> np.ndarray:
    """The delta of a drug at dose d from its deltas at other doses (doses (n,) > 0, deltas n x (G,)): linear in
    log-dose between the two neighbouring seen doses,
        delta(d) = (1 - w) delta(d_lo) + w delta(d_hi),   w = log(d / d_lo) / log(d_hi / d_lo),
    and the nearest seen dose outside their range (no extrapolation: a Hill curve flattens at both ends)."""
    order = np.argsort(doses)
    x = np.asarray(doses, dtype=np.float64)[order]
    j = int(np.searchsorted(x, d))
    if j < len(x) and x[j] == d or j == 0 or j == len(x):
        return deltas[order[min(j, len(x) - 1)]]
    w = np.log(d / x[j - 1]) / np.log(x[j] / x[j - 1])
    return ((1 - w) * deltas[order[j - 1]] + w * deltas[order[j]]).astype(np.float32)


# ---------------------------------------- what flow.train draws; comparisons every stage makes
def training_rows(ds, keys, self_prior: float = 0.5, seed: int = 0):
    """What flow.train draws from: (table, cells). The key table holds the training keys, one empty-perturbation row
    per covariate (its control cells as targets: "no perturbation -> control") and, when held-out keys have a prior
    kind no training key has (Dataset.untrained_kinds, e.g. every combination held out), two rows per training single
    with its cross-fitted own prior as that kind (Dataset.fold_deltas: the prior of fold f serves the cells of fold
    1 - f), so the network learns what to add when a prior is present. cells: arrays over every usable cell (not the
    control_check ones): row (of ds.X), kid (its table row), own (its cross-fitted prior's table row, -1 if none)."""
    n_cov, table = len(ds.covariates), ds.key_table(keys)
    own_rows, extra, c = {}, [], 0.0
    if ds.untrained_kinds() and self_prior > 0:
        c = max(ds.prior_trust()[k] for k in ds.untrained_kinds())
        for k in keys:
            if len(components_of(k[0])) == 1:
                fold, deltas = ds.fold_deltas(k, seed)
                own_rows[k] = (fold, len(keys) + n_cov + len(extra))
                extra += [(keys.index(k), p) for p in deltas]                 # rows for fold 0's prior, fold 1's
    i = torch.tensor([j for j, _ in extra], dtype=torch.long)
    p = torch.from_numpy(np.stack([q for _, q in extra])) if extra else torch.zeros(0, len(ds.genes))
    table = {k: torch.cat([v, torch.arange(n_cov) if k == "cov" else v.new_zeros(n_cov, *v.shape[1:]),
                           p if k == "prior" else c * p if k == "start" else v[i]]) for k, v in table.items()}
    ctrl = [np.setdiff1d(ds.ctrl_idx[c], ds.held_out_controls(c)) for c in ds.covariates]
    row = np.concatenate([ds.cell_idx[k] for k in keys] + ctrl)
    kid = np.concatenate([np.full(len(ds.cell_idx[k]), j) for j, k in enumerate(keys)] +
                         [np.full(len(r), len(keys) + j) for j, r in enumerate(ctrl)])
    own = np.concatenate([own_rows[k][1] + 1 - own_rows[k][0] if k in own_rows else np.full(len(ds.cell_idx[k]), -1)
                          for k in keys] + [np.full(len(r), -1) for r in ctrl])  # fold f -> the prior of fold 1 - f
    ctrl_at = np.flatnonzero(kid >= len(keys))                         # positions of the control cells
    return table, {"row": row, "kid": kid, "own": own, "ctrl": ctrl_at, "pert": np.flatnonzero(kid < len(keys)),
                   "ctrl_cov": table["cov"].numpy()[kid[ctrl_at]], "cov": table["cov"].numpy()}


def draw_batch(cells, rng, n, ctrl_frac, self_prior):
    """n cells for one flow.train step, drawn like nanoGPT's get_batch: (target rows of ds.X, their key-table rows,
    control-cell rows of the same covariate as inputs). A fraction ctrl_frac are control cells as targets; a training
    single with a cross-fitted own prior uses it with probability self_prior."""
    pert, ctrl = cells["pert"], cells["ctrl"]  # computed once by training_rows, not per step
    i, j = pert[rng.integers(len(pert), size=n)], ctrl[rng.integers(len(ctrl), size=n)]
    pick = np.where(rng.random(n) < ctrl_frac, j, i)  # (n,) indices into cells
    kid = cells["kid"][pick]
    if (cells["own"] >= 0).any():  # drawn only when there are cross-fitted priors (no draw spent otherwise)
        kid = np.where((rng.random(n) < self_prior) & (cells["own"][pick] >= 0), cells["own"][pick], kid)
    cov, src = cells["cov"][kid], np.empty(n, np.int64)
    for c in np.unique(cov):  # a loop over covariates: a random control cell of the target's covariate
        mine, pool = np.flatnonzero(cov == c), ctrl[cells["ctrl_cov"] == c]
        src[mine] = cells["row"][pool[rng.integers(len(pool), size=len(mine))]]
    return cells["row"][pick], kid, src


def describe_start(ds, cells) -> str:
    """One line: the prior trust and what flow.train simulates of the held-out situation (cells: training_rows')."""
    trust = ", ".join(f"{k} {c:.2f}" for k, c in ds.prior_trust().items() if k != "none")
    val = ds.split["val"]
    r = pearson_rows(ds.key_table(val)["start"], torch.stack([ds.refs[k].delta for k in val])).mean() if val else np.nan
    untrained = ", ".join(sorted(ds.untrained_kinds()))
    return (f"{len(ds.split['train'])} train / {len(val)} val conditions; prior trust (start = c x prior): {trust}"
            + (f" ({untrained}: no training key, the plain prior; trained on cross-fitted own priors of "
                f"{int((cells['own'] >= 0).sum())} cells)" if untrained else "")
            + (f"; {len(ds.unseen_components())} held-out components never trained: training hides learned "
                "embeddings" if ds.unseen_components() else "")
            + f"; val Pearson(mean deltas) of the start predictor alone: {r:.3f}")


def control_rows(ds, keys, n, generator) -> list:
    """n[i] control-cell rows drawn (with replacement) from the covariate of keys[i]."""
    return [ds.ctrl_idx[k[1]][torch.randint(len(ds.ctrl_idx[k[1]]), (m,), generator=generator).numpy()]
            for k, m in zip(keys, n)]


def gene_features(ds, p: int = 32) -> torch.Tensor:
    """(n_components, p) prior features: a measured gene's correlation profile over control cells, corr(g, .) in R^G,
    reduced by PCA to p dims (zeros for drugs, unmeasured genes): with the correlation matrix C = V diag(lam) V^T,
    row g's coordinates on the top-p principal axes are V[g, :p] * lam[:p] (uncentred PCA)."""
    Xc = torch.from_numpy(ds.X[np.flatnonzero(ds.is_ctrl)[:4096]]).double()  # (n, G), <= 4096 cells suffice
    Z = (Xc - Xc.mean(0)) / Xc.std(0).clamp_min(1e-8)  # constant genes -> zero profile
    p = min(p, *Z.shape)
    with torch.random.fork_rng():  # C = Z^T Z / (n - 1) = V diag(S^2 / (n - 1)) V^T from a randomised SVD of Z
        torch.manual_seed(0)
        _, S, V = torch.svd_lowrank(Z, q=p + 8, niter=6)  # (q,), (G, q)
    lam, V = S[:p] ** 2 / max(len(Z) - 1, 1), V[:, :p]  # (p,), (G, p) top-p eigenpairs of C
    V = V * torch.sign(V[V.abs().argmax(0), torch.arange(p)])  # fix the eigenvector sign
    feat = V * lam  # (G, p) PCA coordinates of each gene's correlation profile
    feat = feat / feat.std().clamp_min(1e-8)
    pos = {g: i for i, g in enumerate(ds.genes)}
    return torch.stack([feat[pos[c]] if c in pos else feat.new_zeros(p) for c in ds.components]).float()


def pearson_rows(a, b):
    """Pearson correlation along the last dim of (..., G) tensors: (K, G) -> (K,), (G,) -> 0-d; a constant row -> 0."""
    a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-12)


def cdist(x, y):
    """(n, m) exact ||x_i - y_j|| of (n, G), (m, G) (torch's default, a matrix product beyond 25 rows, is off ~1e-2)."""
    return torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist")


def energy_distance(x, y) -> float:
    """E = 2 E||X - Y|| - E||X - X'|| - E||Y - Y'|| (Szekely & Rizzo 2013) over all genes, exact pairwise distances
    (cdist), within-sample means without i = j (U-statistics)."""
    dxy, dxx, dyy = (cdist(a, b) for a, b in [(x, y), (x, x), (y, y)])
    u = lambda d: d.sum() / max(d.shape[0] * (d.shape[0] - 1), 1)  # noqa: E731
    return float(2 * dxy.mean() - u(dxx) - u(dyy))


def welch_t(delta, var, n, ctrl_std, n_ctrl):
    """Welch t = (mean_p - mean_c) / sqrt(var_p/n_p + s_c^2/n_c + 1e-8) per gene; delta = mean_p - mean_c, any array."""
    return delta / (torch.sqrt if torch.is_tensor(delta) else np.sqrt)(var / n + ctrl_std ** 2 / n_ctrl + 1e-8)


def reference(cells, ctrl, ctrl_mean, ctrl_std, n_de, std_floor, keep=None) -> Reference:
    """Welch t (welch_t) of the cells against the controls, the control std s_c floored (as the verifiers and metrics
    floor it); top n_de by |t|. cells: (N, G) ndarray, or sparse CSR tensor (csr_rows) kept as it is; keep: the rows
    kept instead (--ref-cells: rewards and metrics cost O(N^2) in real cells; the statistics use all N)."""
    mean, var = sample_stats(cells)
    ctrl_std = np.maximum(ctrl_std, std_floor)
    t = welch_t(mean - ctrl_mean, var, cells.shape[0], ctrl_std, len(ctrl))
    de = np.argsort(-np.abs(t), kind="stable")[: min(n_de, len(t))]
    f = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    if isinstance(cells, np.ndarray):
        cells = torch.from_numpy(cells if keep is None else cells[keep])
    elif keep is not None:                                             # a copy of the kept rows
        cells = csr_rows(sp.csr_matrix((cells.values().numpy(), cells.col_indices().numpy(),
                                        cells.crow_indices().numpy()), shape=tuple(cells.shape))[keep], 0, len(keep))
    return Reference(f(ctrl_mean), f(ctrl_std), f(mean), f(mean - ctrl_mean), f(t),
                     torch.from_numpy(de.astype(np.int64)), cells)


def autocast(device):
    """bf16 autocast on CUDA (reductions stay float32); nothing elsewhere (bf16 matmuls are slow on most CPUs)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if torch.device(device).type == "cuda" else nullcontext()


def noise_source(generator, device, part=None):
    """draw(shape, uniform=False): N(0, 1) (or U(0, 1)) draws from `generator` moved to `device`, the one callable the
    math takes. part = (rows, n) (torchrun): draw one process's global batch of n rows and keep `rows`."""
    gdev = generator.device if generator is not None else device

    def draw(shape, uniform=False, dtype=torch.float32):
        x = (torch.rand if uniform else torch.randn)(shape if part is None else (part[1], *shape[1:]),
                                                     generator=generator, device=gdev, dtype=dtype)
        return (x if part is None else x[part[0]]).to(device)
    return draw


# ---------------------------------------- splits
def make_split(keys, mode="auto", test=None, test_frac=0.25, val_frac=0.15, seed=0):
    """Split (condition, covariate) keys by condition. additive: every single in training; combinations whose
    components all have singles (in that covariate, any dose: prior_kind 'additive') are test candidates. random: a
    fraction of conditions per covariate. dose: one dose of each (drug, covariate) held out, never its lowest or
    highest (the prior interpolates). drug: a fraction of the drugs held out with every condition containing them.
    explicit: `test` lists conditions ('A+B', 'A+B:COV', 'D@0.1', 'A@0.1+B@1'; a drug without dose: every dose)."""
    keys, rng, mode = sorted(keys), np.random.default_rng(seed), "explicit" if test else mode  # a list wins
    index = single_index(keys)
    additive_cand = [k for k in keys if "+" in k[0] and prior_kind(k, keys, index) == "additive"]
    if mode == "auto":
        mode = "additive" if additive_cand else "random"
        if not additive_cand and any("+" in l for l, _ in keys):
            warnings.warn("split auto: no combination has all its singles in the data, so no additive split; "
                          "using a random split")

    def take(pool, frac, least=3):                   # a random fraction of pool (>= 1 when it has >= least entries)
        pool = [pool[i] for i in rng.permutation(len(pool))]
        n = int(round(frac * len(pool)))
        n = max(n, 1) if len(pool) >= least and frac > 0 else n
        return pool[:n], pool[n:]
    if mode == "additive":
        if not additive_cand:
            raise UserError("split 'additive' needs combinations (A+B) whose singles are in the data; "
                            "this data has none: use --split random or --test")
        test_keys, rest = take(additive_cand, test_frac, least=1)
        val_keys, _ = take(rest, val_frac / max(1 - test_frac, 1e-9))   # combinations like the test's
        if not val_keys:
            warnings.warn("split additive: no combination left for validation; there is no validation set "
                          "(the last checkpoint is the result): lower --test-frac or add combinations")
    elif mode == "random":
        test_keys, val_keys = _random_split(keys, take, test_frac, val_frac)
    elif mode == "dose":
        doses = {dc: sorted(v.items()) for dc, v in sorted(index.items()) if None not in v}  # (drug, cov): [(d, key)]
        test_keys = [v[1:-1][rng.integers(len(v) - 2)][1] for v in doses.values() if len(v) >= 3]
        if not test_keys:
            raise UserError("split 'dose' needs a drug with >= 3 doses (one is held out between two seen ones); "
                            "this data has none: use --split random, drug or --test D@dose")
        rest = [[x for x in v if x[1] not in test_keys] for v in doses.values()]
        val_keys, _ = take([k for v in rest for _, k in v[1:-1]], val_frac)   # doses with seen doses on both sides
    elif mode == "drug":
        drugs = sorted({n for l, _ in keys for n, _ in components_of(l)})
        test_d, rest = take(drugs, test_frac)
        val_d, _ = take(rest, val_frac / max(1 - test_frac, 1e-9))
        has = lambda k, ds: any(n in ds for n, _ in components_of(k[0]))  # noqa: E731
        test_keys = [k for k in keys if has(k, test_d)]
        val_keys = [k for k in keys if has(k, val_d) and not has(k, test_d)]
    elif mode == "explicit":
        test_keys, val_keys = _explicit_split(keys, test, take, val_frac)
    else:
        raise UserError(f"unknown split {mode!r}; use additive, random, dose, drug or explicit (--test A+B,C+D)")
    held = set(test_keys) | set(val_keys)
    return {"train": [k for k in keys if k not in held], "val": sorted(val_keys), "test": sorted(test_keys)}


def _random_split(keys, take, test_frac, val_frac):
    """A fraction of the conditions of each covariate; a condition is held out in one covariate at most."""
    test_keys, val_keys, used = [], [], set()
    for cov in sorted({c for _, c in keys}):
        mine = [k for k in keys if k[1] == cov]
        fresh = [k for k in mine if k[0] not in used]
        t, _ = take(fresh if len(fresh) >= 3 else mine, test_frac)
        rest = [k for k in mine if k not in t]
        fresh = [k for k in rest if k[0] not in used | {x[0] for x in t}]
        v, _ = take(fresh if len(fresh) >= 3 else rest, val_frac)
        test_keys, val_keys, used = test_keys + t, val_keys + v, used | {k[0] for k in t + v}
    return test_keys, val_keys


def _explicit_split(keys, test, take, val_frac):
    """The --test conditions held out; validation: keys whose prior is of the test's kind once they are out."""
    if not test:
        raise UserError("split 'explicit' needs --test A+B,C+D (conditions to hold out)")
    test_keys = []
    for w in [w.strip() for w in (test.split(",") if isinstance(test, str) else test) if w.strip()]:
        lab, _, cov = w.partition(":")
        lab = "+".join(sorted(lab.split("+")))
        hit = [k for k in keys if (k[0] == lab or "@" not in lab and names_of(k[0]) == lab)
               and (not cov or k[1] == cov)]
        if not hit:
            raise UserError(f"--test condition {w!r} not found; examples: {[k[0] for k in keys[:8]]}")
        test_keys += hit
    rest = [k for k in keys if k not in test_keys]
    idx = single_index(rest)
    kinds, n_comp = {prior_kind(k, rest, idx) for k in test_keys}, {len(k[0].split("+")) for k in test_keys}
    pool = [k for k in rest if len(k[0].split("+")) in n_comp and prior_kind(k, rest, idx) in kinds]
    if not pool:
        pool = [k for k in rest if len(k[0].split("+")) in n_comp]
        warnings.warn(f"no validation condition has a prior like the test's ({sorted(kinds)}); validating "
                      f"on {len(pool)} other conditions with as many components instead")
    return test_keys, take(pool, val_frac)[0]


# =====================================================================================================================
# Below this line is what no reader comes for: loading a file (labels, doses, preprocessing, h5ad), the plumbing every
# stage shares (devices and torchrun, checkpoints, the CLI) and the simulators. A first reading stops here.
# =====================================================================================================================


# ---------------------------------------- loading: from a file to the Dataset and its reference statistics
def load_dataset(cfg: DataConfig, genes=None, split=None, resume=None) -> Dataset:
    """Read, parse labels, split, select genes, compute references. `genes` and `split` (a checkpoint's) override
    the selection and the split, so every stage sees the same ones; resume: the checkpoint whose run goes on."""
    path = os.path.abspath(cfg.data) if cfg.data else builtin_path(cfg.kind)
    if resume and resume.get("data_id") not in (None, file_identity(path)):    # size, time, first MiB: the same file
        raise UserError(f"--resume: {path} is not the data file the checkpoint was trained on (a run keeps its data)")
    h = read_h5ad(path, layer=cfg.layer, lazy=cfg.lazy)
    if min(h.X.shape) == 0 or h.X.shape[1] < 2:    # one gene: its CP10k is 10,000 in every cell, no Pearson, no DE
        raise UserError(f"{path}: X is {h.X.shape[0]} cells x {h.X.shape[1]} gene(s): " + (
            "the file has no cells" if h.X.shape[0] == 0 else "cells are compared over their genes, which needs at "
            "least 2") + "; check that it is the right file (or --layer)")
    symbols = gene_symbols(h, cfg.gene_symbols)
    lab = read_labels(h, cfg, symbols)
    keys, test = lab["keys"], cfg.test
    if split is not None:
        split = {k: [tuple(x) for x in v] for k, v in split.items()}
        if unknown := [k for v in split.values() for k in v if k not in set(keys)]:
            raise UserError(f"{len(unknown)} conditions of the checkpoint's split are not in this data (e.g. "
                            f"{unknown[:3]}); use the data (and --min-cells) the checkpoint was trained with")
    else:      # --test in canonical spelling: 'B+A', 'A+ctrl', 'A_B' -> 'A+B' / 'A'; 'A+B@1+2' -> 'A@1+B@2'
        test = test and ",".join(test_label(l, lab["control"], lab["sep"], lab["case"]) + (":" + cv if cv else "")
                                 for l, _, cv in (w.strip().partition(":") for w in test.split(",") if w.strip()))
        split = make_split(keys, cfg.split, test, cfg.test_frac, cfg.val_frac, cfg.split_seed)
    label, covs, is_ctrl, keep = lab["label"], lab["cov"], lab["is_ctrl"], lab["keep"]
    in_train = np.isin((label + "\x1f" + covs).astype(str), [f"{l}\x1f{c}" for l, c in split["train"]])
    train_rows = np.flatnonzero(keep & (is_ctrl | in_train))
    targets = {n for l, _ in keys for n, _ in components_of(l)}
    order = np.lexsort((label, covs, ~is_ctrl))                         # controls first, then key by key
    X, cols, counts_in = read_expression(h, cfg, symbols, genes, train_rows, targets, order[keep[order]])
    label, covs, is_ctrl = label[order][keep[order]], covs[order][keep[order]], is_ctrl[order][keep[order]]
    # rows are grouped by key, so each key's cells are one contiguous block (References are views of it)
    covariates = sorted(np.unique(covs).tolist())
    ctrl_idx = {c: np.flatnonzero(is_ctrl & (covs == c)) for c in covariates}
    bounds = np.flatnonzero(np.r_[True, (label[1:] != label[:-1]) | (covs[1:] != covs[:-1]), True])
    cell_idx = {(label[a], covs[a]): np.arange(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if not is_ctrl[a]}
    ctrl_stats = {c: (*sample_stats(csr_rows(X, i[0], i[-1] + 1)), i) for c, i in ctrl_idx.items()}  # contiguous
    if zero := [c for c, (m, _, _) in ctrl_stats.items() if not m.any()]:
        raise UserError(f"the control cells of {zero[0]!r} are all zero over the {len(cols)} genes kept: bad file?")
    refs, rng = {}, np.random.default_rng(cfg.seed)                    # rng: the cells a capped Reference keeps
    for k in keys:                                                     # one pass per condition
        (m, v, ci), n = ctrl_stats[k[1]], len(cell_idx[k])
        kept = np.sort(rng.choice(n, cfg.ref_cells, replace=False)) if 0 < cfg.ref_cells < n else None
        refs[k] = reference(csr_rows(X, cell_idx[k][0], cell_idx[k][-1] + 1), ci, m, np.sqrt(v), cfg.n_de,
                            cfg.std_floor, kept)
    dosed = [d for l, _ in keys for _, d in components_of(l) if d is not None]
    meta = dict(pert_key=lab["pert_key"], control=lab["control"], cov_key=lab["cov_key"], dose_key=lab["dose_key"],
                counts=counts_in, dose_unit=lab["dose_unit"], dose_factor=lab["dose_factor"], sep=lab["sep"],
                n_cells_in=len(lab["label"]), dose_range=(min(dosed), max(dosed)) if dosed else None,
                n_genes_in=len(symbols), path=path if cfg.data else f"built-in {cfg.kind} simulator",
                prior_trust=cfg.prior_trust, labels=lab["labels"], data_id=file_identity(path))
    return Dataset(SparseRows(X), [str(g) for g in symbols[cols]], label, covs, is_ctrl, keys, split,
                   sorted(targets), covariates, refs, ctrl_idx, cell_idx, meta)


BLOCK = 4096  # cells per block wherever a matrix is processed in blocks (statistics, --lazy reads)


def moment_sums(X, blocks, w=None):
    """Per-gene (S1, S2) = (sum_i w_i x_i, sum_i w_i x_i^2) in float64 over `blocks` of rows of X (an int: contiguous
    blocks of that size; slices; or index arrays for a non-CSR X); w (n_cells,) weights (None: 1; zero-weight blocks
    skipped). A CSR X is never densified (a bincount of its stored values per block); other X one dense block a time."""
    n, G = X.shape
    if isinstance(blocks, int):
        blocks = [slice(s, min(s + blocks, n)) for s in range(0, n, blocks)]
    if isinstance(X, torch.Tensor):
        X = (X.values().numpy(), X.col_indices().numpy(), X.crow_indices().numpy())
    elif sp.isspmatrix_csr(X):
        X = (X.data, X.indices, X.indptr)
    s1, s2 = np.zeros(G), np.zeros(G)
    for blk in blocks:
        wb = 1.0 if w is None else w[blk]
        if w is not None and not wb.any():
            continue
        if isinstance(X, tuple):                                       # the block's stored values, no copy of it
            (data, idx, ptr), (a, b) = X, (X[2][blk.start], X[2][blk.stop])
            v = data[a:b].astype(np.float64)
            wv = 1.0 if w is None else np.repeat(wb, np.diff(ptr[blk.start:blk.stop + 1]))
            s1, s2 = s1 + np.bincount(idx[a:b], v * wv, G), s2 + np.bincount(idx[a:b], v * v * wv, G)
            continue
        B = X[blk].astype(np.float64)
        if w is None:
            s1, s2 = s1 + B.sum(0), s2 + (B * B).sum(0)
        else:
            s1 = s1 + np.asarray(B.T @ wb).ravel()
            s2 = s2 + np.asarray((B.multiply(B) if sp.issparse(B) else B * B).T @ wb).ravel()
    return s1, s2


def sample_stats(X):
    """Per-gene mean and sample variance (ddof 1; 0 for one row) of X's rows (moment_sums over blocks of BLOCK rows)."""
    n, G = X.shape
    s1, s2 = moment_sums(X.tocsr() if sp.issparse(X) else X, BLOCK)
    mean = s1 / n
    return mean, np.maximum(s2 - n * mean ** 2, 0) / (n - 1) if n > 1 else np.zeros(G)


def gene_stats(X, rows: np.ndarray, chunk=None):
    """Per-gene mean and (population) variance over `rows`, for gene selection: moment_sums, blocks of `chunk` cells."""
    w = np.zeros(X.shape[0], np.float64)
    w[rows] = 1.0 / max(len(rows), 1)
    mean, ex2 = moment_sums(X, chunk or BLOCK, w)
    return mean, np.maximum(ex2 - mean ** 2, 0.0)


def fit_scaler(X, rows, chunk=16384):
    """Per-gene mean and std (floored at 1e-2) of X[rows] (the model's scaler): moment_sums over row chunks."""
    s1, s2 = moment_sums(X, [rows[i:i + chunk] for i in range(0, len(rows), chunk)])
    mean = s1 / len(rows)
    return torch.from_numpy(mean).float(), torch.from_numpy(np.sqrt(np.maximum(s2 / len(rows) - mean ** 2, 0))
                                                            ).float().clamp_min(1e-2)


def csr_rows(X: sp.csr_matrix, a: int, b: int) -> torch.Tensor:
    """Rows a..b of a CSR matrix as a torch sparse CSR tensor sharing its values and column indices (X[a:b] copies)."""
    p0, p1 = X.indptr[a], X.indptr[b]
    with warnings.catch_warnings():                                    # "sparse CSR support is in beta"
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(torch.from_numpy((X.indptr[a:b + 1] - p0).astype(X.indices.dtype)),
                                       torch.from_numpy(X.indices[p0:p1]), torch.from_numpy(X.data[p0:p1]),
                                       (b - a, X.shape[1]), check_invariants=False)


# ---------------------------------------- perturbation labels
CONTROL_LABELS = ["ctrl", "control", "non-targeting", "non_targeting", "nontargeting", "dmso", "vehicle", "nt",
                  "negative_control", "safe-targeting", "untreated"]
PERT_KEYS = ["condition", "perturbation", "target_gene", "gene", "perturbation_name", "product_name", "treatment",
             "guide_identity", "target", "drug", "compound"]
COV_KEYS = ["cell_type", "cell_line", "celltype", "cell_line_name", "cell_type_name"]
DOSE_KEYS = ["dose", "dose_value", "dose_val", "concentration"]
DOSE_UNIT_KEY = re.compile(r"^(dose|dose_value|dose_val|conc|concentration)[ _]?[(\[]?[nuµμm]m[)\]]?$", re.I)  # dose_nM
DRUG_SLOT = re.compile(r"^(drug|compound|product_name|treatment|perturbation|condition)[ _]?(\d+)$", re.I)  # Drug1
DOSE_SLOT = re.compile(r"^(dose|dose_val|dose_value|concentration)[ _]?(\d+)$", re.I)                      # Dose1
DOSE_UNITS = {"um": 1.0, "µm": 1.0, "nm": 1e-3, "mm": 1e3}    # -> uM, the unit of every label


def read_labels(h: H5AD, cfg: DataConfig, symbols) -> dict:
    """The label side of a file: read_conditions' canonical condition per cell, the covariate per cell, and the keys
    (condition, covariate) with at least --min-cells cells; keep (n_cells,) marks the cells used (controls, keys)."""
    rc = read_conditions(h, cfg, symbols)
    label, missing, control = rc["label"], rc["missing"], rc["control"]
    cov_key = None if cfg.covariate_key == "none" else find_key(h.obs, COV_KEYS, cfg.covariate_key,
                                                                "covariate", "--covariate-key")
    covs = _text(h.obs[cov_key], cov_key) if cov_key else np.full(len(label), "all", dtype=object)
    if cov_key and (none := _blank(covs) & ~missing).any():            # never a cell line named 'None'
        if none.sum() == (~missing).sum():
            raise UserError(f"covariate column {cov_key!r} has no value in any cell; name one with --covariate-key")
        warnings.warn(f"dropping {int(none.sum())} cells with no value (missing, NaN, empty) in {cov_key!r}")
        label, missing = np.where(none, "<missing>", label), missing | none
    is_ctrl = label == ""                                              # read_conditions' control
    if len(rc["spellings"]) > 1:                                       # every control label found, per cell line
        warnings.warn(f"{len(rc['spellings'])} control labels in {rc['pert_key']!r}, all read as control: " + "; ".join(
            f"{cv}: " + ", ".join(f"{str(s)!r} {n}" for s, n in zip(*np.unique(rc["raw"][is_ctrl & (covs == cv)].astype(
                str), return_counts=True))) for cv in np.unique(covs[is_ctrl])))
    for cv in np.unique(covs[~missing]):
        if not is_ctrl[covs == cv].any():
            raise UserError(f"covariate {cov_key}={cv!r} has no control cells ({control!r}); drop those "
                            f"cells or choose another --covariate-key (or 'none')")
    uniq, inv, counts = np.unique((label + "\x1f" + covs).astype(str), return_inverse=True, return_counts=True)
    perturbed = [((l, c), n) for (l, c), n in zip((tuple(u.split("\x1f")) for u in uniq), counts)
                 if l not in ("", "<missing>")]
    if small := [f"{l}|{c} ({n})" for (l, c), n in perturbed if n < cfg.min_cells]:
        warnings.warn(f"dropping {len(small)} condition(s) with < {cfg.min_cells} cells: {small[:20]}")
    if not (keys := sorted(k for k, n in perturbed if n >= cfg.min_cells)):
        raise UserError(f"no perturbed condition has >= {cfg.min_cells} cells (the largest has "
                        f"{max(n for _, n in perturbed)}); lower --min-cells" if perturbed else f"there are no "
                        f"perturbed cells: every cell's {rc['pert_key']!r} is the control {control!r} or missing; "
                        "check --pert-key and --control")
    keep = ((counts[inv.ravel()] >= cfg.min_cells) | is_ctrl) & ~missing
    return {**rc, "label": label, "missing": missing, "cov": covs, "cov_key": cov_key, "is_ctrl": is_ctrl, "keep": keep,
            "keys": keys}


def read_conditions(h: H5AD, cfg, symbols) -> dict:
    """obs -> the canonical condition of every cell: '' (control), 'A', 'A+B' (sorted), 'D@0.1', 'A@0.1+B@1'. Layouts:
    one perturbation column (PERT_KEYS or --pert-key), with an optional dose column (DOSE_KEYS or --dose-key; numbers,
    or strings 'dA+dB' for 'A+B'; a column with one value is not a dose); or one column per combination slot
    (CellFlow's ComboSciPlex: Drug1, Drug2 with Dose1, Dose2), detected when numbered drug columns come with numbered
    dose columns, or named (--pert-key Drug1,Drug2 [--dose-key Dose1,Dose2]). Labels are in uM; the input unit is
    --dose-unit, else the column name's (dose_nM), else nM above 1000 (sci-Plex: 10-10000 nM), else uM."""
    labels, missing, control, pert_key, dk, raw, spellings = read_perturbations(h.obs, cfg)
    if missing.any():                                 # never control
        warnings.warn(f"dropping {int(missing.sum())} cells with no value (missing, NaN, empty) in {pert_key!r}")
    dose_cols, dstr = read_doses(h.obs, dk, missing)
    dose_key, distinct = ",".join(dose_cols) or None, np.unique(labels[~missing].astype(str))
    sep = detect_sep(distinct, control, symbols)
    case = match_case({p for lab in distinct for p in parse_condition(lab, control, sep)}, symbols)
    uniq, inv = np.unique((labels + "\x1f" + dstr).astype(str), return_inverse=True)
    pairs, where = [u.split("\x1f", 1) for u in uniq], f"columns {pert_key!r}/{dose_key!r}"
    combo = len(dose_cols) > 1 or any("+" in d for _, d in pairs)
    doses = [None if not dose_key or not parse_condition(l, control, sep) else
             dose_values(d, l, len(split_label(l, sep)), combo, where) for l, d in pairs]
    rows = np.flatnonzero(np.isin(inv.ravel(), [j for j, ((l, _), d) in enumerate(zip(pairs, doses))
                                                if dose_key and undosed(l, d, control, sep)]) & ~missing)
    if len(rows):                                    # a perturbed cell without a dose is not a dose-less condition
        l, d = pairs[inv.ravel()[rows[0]]]
        raise UserError(f"{where}: {len(rows)} perturbed cell(s) have a NaN, Inf or missing dose, e.g. " + ", ".join(
            f"{h.obs_names[i]} (row {i})" for i in rows[:3]) + f": {l!r} at {d!r}; give each a finite dose "
            "(0 = vehicle), drop those cells, or --dose-key none")
    unit = dose_unit(cfg.dose_unit, dose_cols, doses)
    f = DOSE_UNITS[unit]
    if bad := [(l, d) for (l, _), d in zip(pairs, doses) if d is not None and any(     # never dose-less, nor 0
            not 0 < float(v) * f < np.inf for v in np.atleast_1d(d) if v > 0)]:
        raise UserError(f"{where}: the dose {bad[0][1]} {unit[0]}M of {bad[0][0]!r} is inf or 0 in uM: --dose-unit?")
    scale = lambda d: None if d is None else [v * f for v in d] if isinstance(d, list) else d * f  # noqa: E731
    canon = ["+".join(parse_condition(l, control, sep, scale(d), case)) for (l, _), d in zip(pairs, doses)]  # '': ctrl
    if bad := [(l, c) for c, (l, _) in zip(canon, pairs) if c and not re.fullmatch(r"[^@+]+(@\d*\.?\d+)?(\+[^@+]+(@\d*"
                                                                             r"\.?\d+)?)*", c)]:
        raise UserError(f"{pert_key!r}: {len(bad)} label(s) like {bad[0][0]!r} hold '@', which marks doses ('D@0.1')")
    label = np.array(canon, dtype=object)[inv.ravel()]
    label[missing] = "<missing>"                      # dropped later, never a key
    return dict(label=label, missing=missing, control=control, pert_key=pert_key, dose_key=dose_key, raw=raw, sep=sep,
                dose_unit=unit[0].replace("µ", "u") + "M" if dose_key else None, dose_factor=f, spellings=spellings,
                case=case, labels=dict(zip(canon, (l for l, _ in pairs))))


def _text(col, name="obs") -> np.ndarray:               # an obs column as strings, missing -> 'nan'; text only
    out = np.array(["nan" if v is None else str(v) for v in col], dtype=object)
    if bad := [u for u in set(out) if re.search(r"[\x00-\x1f\x7f]", u)]:   # '\x1f' joins keys (read_labels)
        raise UserError(f"{name!r}: {len(bad)} label(s) hold a control character, e.g. {bad[0]!r}; fix the column")
    return out


def _blank(a) -> np.ndarray:                            # (n,) bool: no value (missing, NaN, empty or whitespace)
    return np.isin(np.char.lower(np.char.strip(np.asarray(a).astype(str))), ["", "nan", "none"])


def read_perturbations(obs, cfg):
    """The raw perturbation label of every cell, from one column or from one per combination slot (joined with '+',
    an empty slot the control): (labels, missing (n,) bool (no value, NaN, empty: never control), control, pert_key,
    the dose column(s) given or paired, the labels as written, the control spellings: CONTROL_LABELS in any case)."""
    pk, dk = cfg.pert_key, cfg.dose_key
    slots = [c.strip() for c in pk.split(",")] if pk and "," in pk else None
    if pk is None:                                   # numbered drug columns with numbered dose columns
        drugs = {int(m[2]): c for c in obs if (m := DRUG_SLOT.match(c))}
        doses = {int(m[2]): c for c in obs if (m := DOSE_SLOT.match(c))}
        if len(drugs) >= 2 and (set(drugs) <= set(doses) or find_key(obs, PERT_KEYS, None, "", "") is None):
            slots = [drugs[i] for i in sorted(drugs)]
            dk = dk or (",".join(doses[i] for i in sorted(drugs)) if set(drugs) <= set(doses) else None)
    pert_key = "condition" if slots else find_key(obs, PERT_KEYS, pk, "perturbation", "--pert-key")
    if pert_key is None:
        raise UserError(f"no perturbation column found (tried {PERT_KEYS}); obs columns: {list(obs)}; "
                        f"name it with --pert-key")
    if absent := [c for c in slots or () if c not in obs]:
        raise UserError(f"perturbation column(s) {absent} not in obs; obs columns: {list(obs)}")
    cols = [_text(obs[c], c) for c in slots or [pert_key]]
    empty = [_blank(c) for c in cols]
    control = find_control(np.concatenate([c[~e] for c, e in zip(cols, empty)]), cfg.control)
    found = sorted({u for c, e in zip(cols, empty) for u in np.unique(c[~e]) if u.strip().lower() in CONTROL_LABELS})
    spellings = found if cfg.control is None else [control]
    if like := [u for u in found if u not in spellings and u.strip().lower() != control.lower()]:
        warnings.warn(f"--control {control!r} names one label; {like[:5]}, spelled like controls, stay perturbations")
    labels = raw = None
    for c, e in zip(cols, empty):
        part = np.where(e | np.isin(c, spellings), control, c)
        labels, raw = (part, c) if labels is None else (labels + "+" + part, raw + "+" + c)
    return labels, np.logical_and.reduce(empty), control, pert_key, dk, raw, spellings


def read_doses(obs, dk, missing):
    """(dose columns, the dose string of every cell in the input unit, 'nan' = none; parts joined with '+')."""
    n = len(missing)
    dose_cols = [] if dk == "none" else [c.strip() for c in dk.split(",")] if dk else \
        [c for c in [find_key(obs, DOSE_KEYS, None, "dose", "--dose-key", DOSE_UNIT_KEY)] if c]
    if absent := [c for c in dose_cols if c not in obs]:
        raise UserError(f"dose column(s) {absent} not in obs; obs columns: {list(obs)}")
    dstr = np.full(n, "nan", dtype=object)
    for i, col in enumerate(obs[c] for c in dose_cols):
        s = np.char.replace(np.char.mod("%.10g", col.astype(float)), "e+", "e").astype(object) if col.dtype.kind in \
            "biuf" else _text(col)                             # '1e+06' is one dose, not two
        dstr = s if i == 0 else dstr + "+" + s
    if dose_cols and len({p for s in np.unique(dstr[~missing].astype(str)) for p in s.split("+")}) < 2:
        if dk:
            raise UserError(f"dose column {dk!r} has a single value; it cannot be a dose: drop --dose-key")
        dose_cols, dstr = [], np.full(n, "nan", dtype=object)     # a constant '1' (or GEARS' '1' / '1+1') of CRISPR
    return dose_cols, dstr


def dose_unit(given, dose_cols, doses) -> str:
    """The unit of the input doses (a DOSE_UNITS key): --dose-unit, else the column name's, else nM above 1000."""
    unit = (given or "auto").lower().replace("μ", "µ")
    if unit == "auto":
        m = re.search(r"(?i)(?:^|[_ (\[])([nuµμm]m)[)\]]?$", dose_cols[0]) if dose_cols else None
        top = max([v for d in doses if d is not None for v in np.atleast_1d(d) if np.isfinite(v)], default=0)
        unit = m[1].lower().replace("μ", "µ") if m else "nm" if top > 1000 else "um"
    if unit not in DOSE_UNITS:
        raise UserError(f"--dose-unit {given!r}: use uM, nM, mM or auto")
    return unit


def find_key(columns, wanted, given, what, flag, pattern=None):
    """The obs column given (by `flag`), else the first of `wanted` (any case), else the first matching `pattern`."""
    if given is not None and given not in columns:
        raise UserError(f"{flag} {given}: {what} column {given!r} not in obs; obs columns: {list(columns)}")
    return given if given is not None else next((c for k in wanted for c in columns if c.lower() == k), None) or \
        next((c for c in columns if pattern is not None and pattern.match(c)), None)


def find_control(labels: np.ndarray, given=None) -> str:
    uniq, counts = np.unique(labels.astype(str), return_counts=True)
    top, lower = [str(u) for u in uniq[np.argsort(-counts, kind="stable")[:8]]], {u.lower(): u for u in uniq}
    if given is not None and given not in uniq:
        raise UserError(f"control label {given!r} not found; most frequent labels: {top}")
    if given is None and not any(c in lower for c in CONTROL_LABELS):
        raise UserError(f"no control label found (tried {CONTROL_LABELS}); most frequent labels: {top}; --control")
    return str(given) if given is not None else str(next(lower[c] for c in CONTROL_LABELS if c in lower))


def fmt_dose(d) -> str:
    """A dose as written in labels ('A@0.1'): 6 significant digits, never in exponent notation ('1e+06' has a '+')."""
    return np.format_float_positional(float(f"{d:.6g}"), trim="-")


def parse_condition(label: str, control: str, sep="+", dose=None, rename=None, part=False) -> tuple[str, ...]:
    """'A+B' == 'B+A' -> ('A', 'B'); GEARS 'A+ctrl' -> ('A',); the control -> () (a whole 'ctrl' or 'control' other
    than it, --control DMSO, is a condition; part: `label` is a part of a combination). dose: None, one number, or
    one per part, attached as 'A@10' (NaN: none); a component at dose 0 is no drug (vehicle); rename: match_case's."""
    parts = [p.strip() for p in split_label(label, sep)]
    ctrl = {control.lower()} | ({"ctrl", "control"} if part or len(parts) > 1 else set())
    if str(label).strip().lower() in ctrl:                             # 'non_targeting' with sep '_'
        return ()
    doses = list(dose) if isinstance(dose, (list, tuple)) else [dose] * len(parts)
    return tuple(sorted((rename or {}).get(p, p) + ("" if d is None or not np.isfinite(d) else f"@{fmt_dose(d)}")
                        for p, d in zip(parts, doses)
                        if p and p.lower() not in ctrl and not (d is not None and d == 0)))   # dose 0: vehicle


def split_label(label, sep: str) -> list:                # split at every separator character in sep ('+|')
    return re.split(f"[{re.escape(sep)}]", str(label))


def undosed(label, dose, control, sep) -> bool:
    """A perturbed part of `label` has no finite dose (dose: dose_values' None, one number or one per part)."""
    parts = split_label(label, sep)
    per = dose if isinstance(dose, list) else [dose] * len(parts)
    return any(parse_condition(p, control, sep, part=len(parts) > 1) and (v is None or not np.isfinite(v))
               for p, v in zip(parts, per))


def detect_sep(labels, control, genes=()) -> str:
    """The separators of a combination's components (parse_condition splits at each): '+' when a label has it, with '|'
    and ';' when every part of every label holding them is a label or gene, any case ('DUSP6|DUSP4' among 'A+B' is
    DUSP4+DUSP6); else the first of '|', ';', '_' passing that test ('A_B': A and B), else '+' (warns of a '|' kept)."""
    labels = set(map(str, labels)) - {control}
    known = {x.upper() for x in (*labels, *map(str, genes), control, "ctrl", "control")}

    def splits(sep, at):                             # labels hold sep, and each splits into known parts at `at`
        combos = [l for l in labels if sep in l]
        return bool(combos) and all(all(p.strip().upper() in known for p in split_label(l, at)) for l in combos)
    if any("+" in l for l in labels):
        seps = "+" + "".join(s for s in "|;" if splits(s, "+" + s))
    else:
        seps = next((s for s in "|;_" if splits(s, s)), "+")
    if whole := sorted(l for l in labels if any(c in l and c not in seps for c in "|;")):
        warnings.warn(f"{len(whole)} label(s) hold '|' or ';' but not every part is a label or a gene, so each is "
                      f"read as one perturbation: {whole[:5]}")
    return seps


def match_case(components, genes) -> dict:
    """{component: gene} for components that name a gene in another case ('tmsb4x' -> 'TMSB4X'), with a warning."""
    exact, upper = set(genes), {g.upper(): g for g in reversed(list(genes))}       # the first of a case wins
    if fix := {c: upper[c.upper()] for c in sorted(components) if c not in exact and c.upper() in upper}:
        warnings.warn(f"{len(fix)} perturbation label(s) name a gene in another case; using the gene names: "
                      + ", ".join(f"{a} -> {b}" for a, b in list(fix.items())[:10]))
    return fix


def names_of(label: str) -> str:                         # 'A@10+B@1' -> 'A+B': the drugs, without doses
    return "+".join(sorted(n for n, _ in components_of(label)))


def test_label(lab: str, control: str, sep: str = "+", rename=None) -> str:
    """A --test condition in canonical spelling: 'B+A', 'A+ctrl', 'A_B' -> 'A+B'; with doses in uM 'D@0.1', 'A+B@0.1+1'
    or 'A@0.1+B@1' -> 'A@0.1+B@1' (no dose on dosed data: every dose, make_split). The control is one line."""
    names, doses = lab, []
    if "@" in lab and all("@" in p for p in lab.split("+")):
        names, doses = zip(*(p.split("@", 1) for p in lab.split("+")))
        names = sep[0].join(names)
    elif "@" in lab:
        names, doses = lab.partition("@")[0], lab.partition("@")[2].split("+")
    try:
        d = [float(x) for x in doses] or [None]
    except ValueError:
        raise UserError(f"--test {lab!r}: doses must be numbers in uM, e.g. D@0.1 or A+B@0.1+1") from None
    if len(d) not in (1, len(split_label(names, sep))):
        raise UserError(f"--test {lab!r}: {len(split_label(names, sep))} drug(s) but {len(d)} doses; write A+B@dA+dB")
    if not (out := "+".join(parse_condition(names, control, sep, d if len(d) > 1 else d[0], rename))):
        raise UserError(f"--test {lab!r} is the control ({control!r}); --test names perturbed conditions to hold out "
                        "(A, A+B, D@0.1)")
    return out


def dose_values(text: str, label: str, n_parts: int, combo: bool, where: str):
    """The dose string of one cell -> None (none), a float (every component) or a list (one per part, combo=True:
    the column writes combinations as 'dA+dB'). One line for text, negative values or a wrong part count."""
    if text.strip().lower() in ("nan", "none", ""):
        return None
    try:
        vals = [float(v) for v in text.split("+")]
    except ValueError:
        raise UserError(f"{where}: dose {text!r} of {label!r} is not a number; doses are numbers ('dA+dB' for a "
                        "combination): fix the column, name the dose column with --dose-key, or --dose-key none"
                        ) from None
    if any(v < 0 for v in vals):
        raise UserError(f"{where}: dose {text!r} of {label!r} is negative; doses are >= 0 (0 = vehicle): fix the "
                        "column")
    if combo and len(vals) != n_parts:
        raise UserError(f"{where}: {label!r} has {n_parts} part(s) but its dose {text!r} has {len(vals)}; give one "
                        "dose per drug, 'dA+dB' for 'A+B', in the same order")
    return vals if combo else vals[0]


# ---------------------------------------- preprocessing
def read_expression(h: H5AD, cfg: DataConfig, symbols, genes, train_rows, targets, rows):
    """The expression side: check the values, log-normalise raw counts (a DiskX per block), select genes on the training
    rows (targets always kept; a checkpoint's `genes` win): (those columns of `rows` as float32 CSR, them, counts?)."""
    X = h.X
    if not cfg.lazy:
        check_values(X)
    counts_in = X.counts if cfg.lazy else is_counts(X)
    X = log_normalise(X) if counts_in and not cfg.lazy else X
    if genes is not None:
        pos = {g: i for i, g in enumerate(symbols)}
        if missing := [g for g in genes if g not in pos]:
            raise UserError(f"{len(missing)} of the checkpoint's {len(genes)} genes are not in the data "
                            f"(e.g. {missing[:5]}); use the data the checkpoint was trained on")
        cols = np.array([pos[g] for g in genes])
        if (j := np.flatnonzero(np.diff(cols) < 0)).size:             # a checkpoint's genes are in its file's order
            raise UserError(f"the data has the checkpoint's genes in another order ({genes[j[0] + 1]!r} first)")
    else:
        cols = select_genes(X, train_rows, cfg.n_genes, [i for i, g in enumerate(symbols) if g in targets])
        if len(cols) < 2:
            raise UserError(f"--n-genes {cfg.n_genes} keeps {len(cols)} gene; cells are compared over their genes, "
                            "which needs at least 2 (0 keeps all)")
    Xs = sp.vstack([sp.csr_matrix(X[s:s + BLOCK][:, cols]) for s in range(0, X.shape[0], BLOCK)], format="csr") \
        if cfg.lazy else sp.csr_matrix(X[:, cols])                     # (lazy: block by block) columns first
    h.X = X = None                                                     # free the full matrix
    if not Xs.data.any():
        raise UserError(f"X is all zeros over the {len(cols)} genes kept: nothing to learn; check the file or --layer")
    return Xs[rows].astype(np.float32, copy=False), cols, counts_in


def check_values(X, offset=0) -> None:
    """Fail on negative, NaN or Inf entries: how many, where the first is (X's rows start at cell `offset`)."""
    data, c = (X.data if sp.issparse(X) else X).reshape(-1), 1 << 24
    for what, test in (("NaN", np.isnan), ("Inf", np.isinf), ("negative", lambda a: a < 0)):
        if n := sum(int(test(data[i:i + c]).sum()) for i in range(0, data.size, c)):  # masks of 16M values, not nnz
            flat = int(np.flatnonzero(test(data))[0])                  # sparse: an index into X.data
            major, minor = (int(np.searchsorted(X.indptr, flat, side="right") - 1), int(X.indices[flat])) if \
                sp.issparse(X) else divmod(flat, X.shape[1])
            row, col = (minor, major) if sp.isspmatrix_csc(X) else (major, minor)
            raise UserError(f"X has {n} {what} value(s), first at cell {row + offset}, gene {col}; expression is raw "
                            "counts or log1p-normalised (>= 0, finite): pick another --layer or clean the file")


LOG_MAX = 30.0  # log-normalised values stay below this: log1p(CP10k) <= 9.2, log1p(CPM) 13.8, log2(CPM + 1) 19.9


def is_counts(X, n_max=200_000) -> bool:
    """Raw counts or log-normalised, from a strided sample of up to n_max non-zero values: counts when the maximum is
    above LOG_MAX, or >= 90% are integers and some exceed 1; a warning when they disagree (pseudo-counts, ambient)."""
    data = X.data if sp.issparse(X) else np.asarray(X).ravel()
    sample = data[:: max(1, data.size // n_max)]
    sample = sample[sample != 0]
    if sample.size == 0:
        return False
    frac, top = float(np.mean(sample == np.round(sample))), float(sample.max())
    counts = top > LOG_MAX or (frac >= 0.9 and top > 1)
    if (counts and frac < 1) or (not counts and frac >= 0.5 and top > 1):
        warnings.warn(f"X: {frac:.1%} of the values are integers and the largest is {top:g}, so it is read as " + (
            "raw counts (normalised to log1p(CP10k)), though some values are not integers" if counts else
            "log-normalised (used as is), though most values are integers") + "; if that is wrong, pick the right "
            "matrix with --layer", stacklevel=2)
    return counts


def log_normalise(X, target=1e4):
    """x <- log1p(target * counts / total counts of the cell), in place on the stored values."""
    X = X.astype(np.float32, copy=False)
    scale = (target / np.maximum(np.asarray(X.sum(axis=1)).ravel(), 1)).astype(np.float32)   # (n_cells,)
    if sp.isspmatrix_csr(X):
        for s in range(0, X.shape[0], BLOCK):                          # blocks of rows: no (nnz,) temporary
            a, b = X.indptr[s], X.indptr[min(s + BLOCK, X.shape[0])]
            X.data[a:b] *= np.repeat(scale[s:s + BLOCK], np.diff(X.indptr[s:s + BLOCK + 1]))
    elif sp.isspmatrix_csc(X):
        X.data *= scale[X.indices]
    else:
        X *= scale[:, None]
    np.log1p(X.data if sp.issparse(X) else X, out=X.data if sp.issparse(X) else X)
    return X


def select_genes(X, rows, n_genes, keep=()) -> np.ndarray:
    """Highly variable genes on the training rows (sorted column indices): dispersion log(var/mean) of the log1p values,
    z-scored within 20 bins of mean expression (Seurat v1's, not scanpy's on expm1); `keep` (targets) always kept."""
    G, keep = X.shape[1], sorted(set(keep))
    if n_genes <= 0 or n_genes >= G:
        return np.arange(G)
    if len(keep) > n_genes:
        warnings.warn(f"--n-genes {n_genes} is below the {len(keep)} perturbation targets: keeping all {len(keep)}")
    mean, var = gene_stats(X, rows)
    disp = np.log(var / np.maximum(mean, 1e-12) + 1e-12)
    disp[mean == 0] = -np.inf
    bins, score = np.searchsorted(np.quantile(mean, np.linspace(0, 1, 21)[1:-1]), mean), np.full(G, -np.inf)
    for b in np.unique(bins):                                          # 20 bins, not a loop over genes
        m = (bins == b) & np.isfinite(disp)
        if m.sum() > 1:
            score[m] = (disp[m] - disp[m].mean()) / (disp[m].std() + 1e-12)
        elif m.any():
            score[m] = 0.0
    score[np.asarray(keep, dtype=int)] = np.inf
    return np.sort(np.argsort(-score, kind="stable")[:max(n_genes, len(keep))])


SYMBOL_KEYS = ["gene_name", "gene_symbols", "feature_name", "gene_symbol", "gene_names", "symbol"]


def gene_symbols(h: H5AD, column=None) -> np.ndarray:
    """The var index, or a symbol column when the index holds Ensembl IDs (or --gene-symbols is given); a repeated
    name gets the first unused of -1, -2, ... (as anndata's var_names_make_unique), with a warning."""
    names = h.var_names
    if column is None and np.mean([bool(re.match(r"ENS[A-Z]*G\d{6,}", str(n))) for n in names[:200]]) > 0.5:
        column = next((c for c in SYMBOL_KEYS if c in h.var), None)
        if column is None:
            raise UserError(f"var names look like Ensembl IDs ({names[0]}) and no symbol column was found "
                            f"among {list(h.var)}; name one with --gene-symbols")
    if column is not None:
        if column not in h.var:
            raise UserError(f"gene-symbol column {column!r} not in var; var columns: {list(h.var)}")
        if (none := _blank(h.var[column])).any():                  # never genes named '', '-1', ...
            warnings.warn(f"{int(none.sum())} gene(s) have no symbol in {column!r}; using their var names")
        names = np.where(none, names, h.var[column])
    names, seen, renamed = np.array([str(n) for n in names], dtype=object), {}, []
    if (none := _blank(names)).any():
        raise UserError(f"{int(none.sum())} gene(s) have no name (e.g. var row {np.flatnonzero(none)[0]})")
    used = set(names)                                                  # a suffix never makes a name that exists
    for i, n in enumerate(names):                                      # runs once per gene at load
        if n in seen:
            seen[n] = next(k for k in range(seen[n], seen[n] + len(names) + 1) if f"{n}-{k}" not in used)
            names[i] = f"{n}-{seen[n]}"
            used.add(names[i]), renamed.append(f"{n} (var row {i}) -> {names[i]}")
        seen[n] = seen.get(n, 0) + 1
    if renamed:
        warnings.warn(f"{len(renamed)} duplicate gene name(s) renamed to be unique, e.g. {renamed[0]}")
    return names


# ---------------------------------------- h5ad I/O
# h5ad with h5py only (anndata's "On-disk format"): elements carry `encoding-type`/`-version`; sparse = group data/
# indices/indptr + `shape`; dataframe = group, `_index` names its index, `column-order` its columns; categorical = codes
# (-1: missing) + categories. anndata 0.7: `categories` refers to `__categories/<col>`; older: h5sparse, compound obs.
@dataclass
class H5AD:                                            # what read_h5ad returns and write_h5ad takes
    X: np.ndarray | sp.csr_matrix | sp.csc_matrix  # (n_obs, n_vars)
    obs: dict            # column -> (n_obs,) array; strings/categoricals: object array of str, missing None
    var: dict            # column -> (n_vars,) array, same kinds as obs
    obs_names: np.ndarray  # (n_obs,) object array of str
    var_names: np.ndarray  # (n_vars,) object array of str
    uns: dict = field(default_factory=dict)  # nested dict of arrays / str / numbers


def _attr(obj, key, default=None):                     # an HDF5 attribute, bytes decoded to str
    v = obj.attrs.get(key, default)
    return v.decode() if isinstance(v, bytes) else v


def _strings(a):
    """Any array -> object array of python str; bytes are decoded as UTF-8 without a Python loop."""
    a = np.asarray(a)
    if a.dtype.kind == "O" and a.size and isinstance(a.flat[0], bytes):
        a = a.astype("S")
    if a.dtype.kind == "S":
        try:
            return a.astype("U").astype(object)  # ASCII fast path (C cast)
        except UnicodeDecodeError:
            return np.char.decode(a, "utf-8").astype(object)
    return a.astype(str).astype(object)


def _categorical(codes, categories, name):             # -> (n,) object array of str; code -1 -> None
    codes, cats = np.asarray(codes), _strings(categories)
    if (bad := codes[~np.isfinite(codes) | (codes != np.round(codes))] if codes.dtype.kind == "f" else codes[:0] if
            codes.dtype.kind in "iu" else codes).size:                 # a cast would read 0.5 as 0
        raise UserError(f"{name}: categorical code {bad[0]} is {codes.dtype}, not an integer; rewrite it (anndata)")
    if (twice := (u := np.unique(cats, return_counts=True))[0][u[1] > 1]).size:
        raise UserError(f"{name}: category {twice[0]!r} is listed more than once, merging labels; rewrite it (anndata)")
    codes = codes.astype(np.int64)
    if codes.size and (codes.min() < -1 or codes.max() >= len(cats)):  # -2 would be the last category, silently
        raise UserError(f"{name}: categorical code {codes.min() if codes.min() < -1 else codes.max()} is outside [-1, "
                        f"{len(cats)}) (-1 = missing); rewrite it with anndata")
    return np.append(cats, None)[codes]


def _read_array(obj):
    """One obs/var column or uns leaf: numbers as stored; strings, categoricals -> object array of str (missing None);
    nullable-integer -> float64, NaN where masked; other nullables -> object, None where masked; 0-d -> str / number."""
    enc = _attr(obj, "encoding-type", "")
    if isinstance(obj, h5py.Dataset):
        if obj.shape == ():
            v = obj[()]
            return v.decode() if isinstance(v, bytes) else (v.item() if isinstance(v, np.generic) else v)
        if obj.dtype.kind == "S" or h5py.check_string_dtype(obj.dtype) is not None:
            return _strings(obj[...])
        ref = obj.attrs.get("categories")  # anndata 0.7: reference to __categories/<col>
        if isinstance(ref, h5py.Reference):
            return _categorical(obj[...], obj.file[ref][...], obj.name)
        return obj[...]
    if enc == "categorical":
        if absent := [k for k in ("codes", "categories") if not isinstance(obj.get(k), h5py.Dataset)]:
            raise UserError(f"{obj.name} is a categorical without {' or '.join(absent)}; rewrite it with anndata")
        return _categorical(obj["codes"][...], obj["categories"][...], obj.name)
    if enc in ("nullable-integer", "nullable-boolean", "nullable-string-array"):
        v, mask = _read_array(obj["values"]), obj["mask"][...].astype(bool)
        if mask.any():
            v = v.astype(np.float64 if enc == "nullable-integer" else object)
            v[mask] = np.nan if enc == "nullable-integer" else None
        return v
    raise UserError(f"{obj.name}: unsupported encoding-type {enc!r}; store it as a plain, categorical "
                    "or nullable column")


def _read_X(x):
    """Dense dataset -> ndarray; csr/csc group (or h5sparse) -> scipy sparse, its pointers and indices checked."""
    if isinstance(x, h5py.Dataset):
        return _f32(x[...])
    (enc, shape), ptr, idx = _sparse(x), x["indptr"][...], x["indices"][...]
    shape = tuple(int(n) for n in shape)
    _check_sparse(x.name, ptr, len(idx), True), _check_sparse(x.name, idx, shape["csr" in enc] - 1)
    return (sp.csr_matrix if "csr" in enc else sp.csc_matrix)((_f32(x["data"][...]), idx, ptr), shape=shape)


def _check_sparse(name, a, hi, ptr=False):             # before scipy trusts them (it reads memory it does not own):
    for s in range(0, len(a), 2 ** 20):                 # pointers rise within [0, hi], indices lie in it; 2^20 a time
        if (b := a[s:s + 2 ** 20 + ptr].astype(np.int64)).min() < 0 or b.max() > hi or ptr and (np.diff(b) < 0).any():
            raise UserError(f"{name}/{'indptr' if ptr else 'indices'} holds {b.min()} to {b.max()}" + " or falls" * ptr
                            + f", not {'pointers rising' if ptr else 'indices'} within [0, {hi}]; rewrite it (anndata)")
    return a


def _check_file(f, layer, lazy) -> None:
    """Before anything is read, one line for a link or virtual dataset where the reader reads (named, never opened: a
    pipe would hang), sizes beyond memory (gzip bombs), an X not numbers nor obs x var, a sparse X's parts at odds."""
    key, sizes = f"layers/{layer}" if layer is not None else "X", []

    def walk(name, deep):                               # X or the layer, obs, var, uns: what the reader reads
        link = f.get(name, getlink=True)
        obj = f[name] if deep and isinstance(link, h5py.HardLink) else None
        if not isinstance(link, h5py.HardLink) or getattr(obj, "is_virtual", False):
            to = ", ".join(f"{v.file_name}:{v.dset_name}" for v in obj.virtual_sources()) if obj else \
                f"{getattr(link, 'filename', '')}:{link.path}".lstrip(":")
            raise UserError(f"{name} is a {'virtual dataset' if obj else 'link'} reading {to}; neither is followed: "
                            "write the data into the file")
        for k in obj if isinstance(obj, h5py.Group) else ():
            walk(f"{name}/{k}", True)
        if isinstance(obj, h5py.Dataset):               # --lazy reads X in blocks of rows
            n = min(obj.size, BLOCK * int(np.prod(obj.shape[1:]))) if lazy and name.startswith(key) else obj.size
            sizes.append((n * obj.dtype.itemsize, name))
    for name in [n for n in dict.fromkeys(("layers", "X", "obs", "var", "uns", key)) if n in f]:
        walk(name, name in ("obs", "var", "uns", key))
    if (total := sum(n for n, _ in sizes)) > memory():
        big, where = max(sizes)
        raise UserError(f"X, obs, var and uns declare {total / 2 ** 30:,.1f} GiB ({where} {big / 2 ** 30:,.1f}), more "
                        f"than this machine's {memory() / 2 ** 30:,.1f} GiB (a read allocates a declared shape, "
                        "however small the file): " + "use --lazy or " * (where == key and not lazy) + "subset it")
    if g := [g for g in (f["obs"], f["var"]) if isinstance(g, h5py.Dataset) and (g.dtype.names is None or g.ndim > 1)]:
        raise UserError(f"{g[0].name} is a {g[0].dtype} array of shape {g[0].shape}, not a dataframe (a group of "
                        "columns, or an old anndata's compound table): rewrite it with anndata")
    if key not in f:
        layers = sorted(f["layers"]) if isinstance(f.get("layers"), h5py.Group) else []
        raise UserError((f"no layer {layer!r}" if layer else "no X matrix; pass a layer") + f" (layers: {layers})")
    x, n = f[key], tuple(len(g) if isinstance(g, h5py.Dataset) else len(g.get(_attr(g, "_index", "_index"), ()))
                         for g in (f["obs"], f["var"]))    # their index's length
    enc, shape = (_attr(x, "encoding-type") or "", x.shape) if (dense := isinstance(x, h5py.Dataset)) else _sparse(x)
    if enc not in (("", "array") if dense else ("csr_matrix", "csr", "csc_matrix", "csc")):
        raise UserError(f"{x.name}: unsupported encoding-type {enc!r}; this reader takes dense arrays and "
                        "csr_matrix/csc_matrix: convert it in anndata and write again")
    for k, d in ({"": x} if dense else {k: x.get(k) for k in ("data", "indices", "indptr")}).items():
        if not isinstance(d, h5py.Dataset) or d.ndim != 1 + dense or d.dtype.kind not in "iu" + "bf" * (k[:3] != "ind"):
            raise UserError(f"{x.name}/{k}".rstrip("/") + f" is {getattr(d, 'dtype', 'missing')} " + str(getattr(
                d, "shape", "")) + ": X holds numbers (sparse: 1-D data, integer indices and pointers); try --layer")
    if np.shape(shape) != (2,) or (shape := tuple(int(v) for v in shape)) != n:
        raise UserError(f"{x.name} has shape {shape}, which does not match {n[0]} obs x {n[1]} var: rewrite the file")
    if not dense and ((p := x["indptr"]).shape != (n["csc" in enc] + 1,) or p[0] != 0 or not p[-1] == len(x["data"])
                      == len(x["indices"])):            # one pointer per row (CSC: column) and one more
        raise UserError(f"{x.name} is a {enc} with {len(p)} pointers for {n['csc' in enc]} rows (CSC: columns), from "
                        f"{p[:1]} to {p[-1:]}, and {len(x['indices'])} indices for {len(x['data'])} values; it has one "
                        "pointer more, from 0 to the number of values: rewrite it with anndata")


def memory() -> float:                                  # physical memory in bytes (inf without sysconf: Windows)
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else float("inf")


def check_memory(what: str, n: int, fix: str) -> None:   # one line when n float32 values need over half of memory()
    if n * 4 > memory() / 2:
        raise UserError(f"{what}: {n:,} values at once need {n * 4 / 2 ** 30:,.1f} GiB, more than half of this "
                        f"machine's {memory() / 2 ** 30:,.1f} GiB; {fix}")


def _sparse(x):                                         # a sparse group's (format, shape), current or legacy attributes
    return _attr(x, "encoding-type", _attr(x, "h5sparse_format", "")), x.attrs.get("shape", _attr(x, "h5sparse_shape"))


def _f32(a):                                           # float16 -> float32 (scipy's sparse products lack float16)
    return a.astype(np.float32) if a.dtype == np.float16 else a


class DiskX:
    """X (or a layer) left on disk (--lazy): X[a:b] reads those cells (CSR or dense rows; CSC cannot be read by cells),
    checks them and log-normalises raw counts (detected once, on a strided sample). Read block by block, never whole."""

    def __init__(self, path, layer=None):
        self.path, self.key = path, f"layers/{layer}" if layer is not None else "X"
        with h5py.File(path, "r") as f:
            x = f[self.key]
            enc, shape = _sparse(x) if isinstance(x, h5py.Group) else ("dense", x.shape)
            if "csc" in enc:
                raise UserError(f"--lazy reads X by cells; {x.name} is {enc}: drop --lazy or rewrite it as CSR")
            self.sparse, self.shape, self.dtype = enc != "dense", tuple(int(n) for n in shape), np.dtype(np.float32)
            v, per = (x["data"], 1) if self.sparse else (x, self.shape[1])
            self.nnz, self.counts = len(v), is_counts(v[:: max(1, len(v) * per // 200_000)])  # a strided read, <= ~200k

    def __getitem__(self, rows: slice):
        a, b = rows.start or 0, min(rows.stop, self.shape[0])
        with h5py.File(self.path, "r") as f:
            x, at = f[self.key], f"{self.path}: /{self.key}"               # checked as read
            p = _check_sparse(at, x["indptr"][a:b + 1], self.nnz, True) if self.sparse else None
            B = sp.csr_matrix((_f32(x["data"][p[0]:p[-1]]), _check_sparse(at, x["indices"][p[0]:p[-1]], self.shape[
                1] - 1), p - p[0]), shape=(b - a, self.shape[1])) if self.sparse else _f32(x[a:b])
        check_values(B, a)
        return log_normalise(B) if self.counts else B


def _read_frame(g, uns=None):
    """obs/var -> (names (n,) object array of str, {column: (n,) array})."""
    if isinstance(g, h5py.Dataset):  # anndata < 0.7: compound dataset, categories in uns/<col>_categories
        rec = g[...]
        idx, cols = "index" if "index" in rec.dtype.names else rec.dtype.names[0], {}
        for c in (c for c in rec.dtype.names if c != idx):
            a, cat = np.ascontiguousarray(rec[c]), f"{c}_categories"
            cols[c] = (_categorical(a, uns[cat][...], f"{g.name}/{c}") if uns is not None and cat in uns
                       else _strings(a) if a.dtype.kind == "S" else a)
        return _strings(rec[idx]), cols
    idx, order = _attr(g, "_index", "_index"), g.attrs.get("column-order")
    keys = [k for k in g if k not in (idx, "__categories")] if order is None else \
        [k.decode() if isinstance(k, bytes) else str(k) for k in np.atleast_1d(order)]
    if absent := [k for k in keys if k not in g]:
        raise UserError(f"{g.name}: its column-order names {absent}, which it does not hold; rewrite it with anndata")
    names, cols = _strings(g[idx][...]), {k: _read_array(g[k]) for k in keys}
    if bad := next((k for k, v in cols.items() if np.shape(v) != names.shape), None):   # a short column shifts rows
        raise UserError(f"{g.name} column {bad!r} has shape {np.shape(cols[bad])}, not one value a row ({len(names)})")
    return names, cols


def _read_dict(g):
    """uns group -> nested dict; elements this reader does not understand are left out."""
    out = {}
    for k, obj in g.items():
        enc = _attr(obj, "encoding-type", "")
        try:
            out[k] = (_read_dict(obj) if isinstance(obj, h5py.Group) and enc in ("", "dict") else
                      _read_frame(obj)[1] if enc == "dataframe" else
                      _read_X(obj) if enc in ("csr_matrix", "csc_matrix") else _read_array(obj))
        except Exception:  # e.g. awkward arrays, broken references: uns is optional metadata
            continue
    return out


def read_h5ad(path, layer=None, lazy=False) -> H5AD:
    """An .h5ad file of any anndata version; `layer`: layers/<layer> as X; lazy: X stays on disk (a DiskX)."""
    if not os.path.isfile(path := os.fspath(path)):
        raise UserError(f"{path} is a folder; give the .h5ad file in it" if os.path.isdir(path) else
                        f"{path}: file not found; check the path to the .h5ad file")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise UserError(f"{path}: not an HDF5 file ({e}); pass an .h5ad file written by anndata") from None
    try:
        with f:
            if "obs" not in f or "var" not in f:
                raise UserError(f"HDF5 but not an h5ad (no obs/var; keys {sorted(f)}); write it with anndata")
            _check_file(f, layer, lazy)                       # before anything is read
            X = DiskX(path, layer) if lazy else _read_X(f["layers"][layer] if layer is not None else f["X"])
            uns_g = f["uns"] if isinstance(f.get("uns"), h5py.Group) else None
            (obs_names, obs), (var_names, var) = _read_frame(f["obs"], uns_g), _read_frame(f["var"], uns_g)
            uns = _read_dict(uns_g) if uns_g is not None else {}
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    return H5AD(X, obs, var, obs_names, var_names, uns)


def _enc(obj, kind, version):                          # set the anndata encoding attributes; returns obj
    obj.attrs["encoding-type"], obj.attrs["encoding-version"] = kind, version
    return obj


def _write_array(g, key, a, compression):
    """ndarray -> dataset: 'array' (numeric/bool) or 'string-array' (vlen UTF-8); HDF5 cannot chunk an empty one."""
    text = (a := np.asarray(a)).dtype.kind in "OUS"
    return _enc(g.create_dataset(key, data=_strings(a) if text else a, dtype=h5py.string_dtype() if text else None,
                                 compression=compression if a.size else None), "string-" * text + "array", "0.2.0")


def _write_sparse(g, key, X, compression):
    """scipy sparse -> csr_matrix / csc_matrix group (other formats go through CSR)."""
    X = X if X.format in ("csr", "csc") else X.tocsr()
    s = _enc(g.create_group(key), f"{X.format}_matrix", "0.1.0")
    s.attrs["shape"] = np.asarray(X.shape, dtype=np.int64)
    for k in ("data", "indices", "indptr"):
        s.create_dataset(k, data=getattr(X, k), compression=compression if getattr(X, k).size else None)


def _write_column(g, key, c, compression):
    """numeric/bool -> array; strings/objects -> categorical of their str values (None/NaN -> code -1)."""
    if c.dtype.kind not in "OUS":
        return _write_array(g, key, c, compression)
    miss = (np.equal(c, None) | (c != c)).astype(bool) if c.dtype.kind == "O" else np.zeros(len(c), bool)
    cats, inv = np.unique(_strings(c[~miss]).astype(str), return_inverse=True)
    codes = np.full(len(c), -1, dtype=np.min_scalar_type(-max(len(cats), 1)))
    codes[~miss] = inv.ravel()
    (h := _enc(g.create_group(key), "categorical", "0.2.0")).attrs["ordered"] = False
    _write_array(h, "codes", codes, compression)
    _write_array(h, "categories", cats, compression)


def _write_frame(g, names, cols, n, compression):
    _enc(g, "dataframe", "0.2.0").attrs["_index"] = "_index"
    g.attrs["column-order"] = np.array(list(cols), dtype=h5py.string_dtype()) if cols else np.zeros(0)
    _write_array(g, "_index", _strings(names), compression)
    for k, c in ((k, np.asarray(c)) for k, c in cols.items()):
        if k == "_index" or "/" in k or c.shape != (n,):
            raise UserError(f"{g.name} column {k!r} (shape {c.shape}) is not {n} values named without '/' and '_index'")
        _write_column(g, k, c, compression)


def _write_dict(g, d, compression):
    """uns dict -> dict groups; str -> 'string', number -> 'numeric-scalar', array/list -> array."""
    _enc(g, "dict", "0.1.0")
    for k, v in ((str(k), v) for k, v in d.items()):
        if isinstance(v, dict):
            _write_dict(g.create_group(k), v, compression)
        elif isinstance(v, (str, bool, int, float, complex, np.number, np.bool_)):
            text = isinstance(v, str)
            _enc(g.create_dataset(k, data=v, dtype=h5py.string_dtype() if text else None),
                 "string" if text else "numeric-scalar", "0.2.0")
        elif sp.issparse(v) or isinstance(v, (np.ndarray, list, tuple)):
            (_write_sparse if sp.issparse(v) else _write_array)(g, k, v, compression)
        else:
            raise UserError(f"uns entry {g.name}/{k} has type {type(v).__name__}, which h5ad cannot "
                            "store; convert it to a str, number, array or dict")


def write_h5ad(path, h: H5AD, compression=None) -> None:
    """Write `h` in the current anndata layout, atomically (atomic_write); compression: None or "gzip"."""
    n_obs, n_vars = h.X.shape
    if (len(h.obs_names), len(h.var_names)) != (n_obs, n_vars):
        raise UserError(f"X is {n_obs} x {n_vars}, for {len(h.obs_names)} obs_names, {len(h.var_names)} var_names")
    with atomic_write(path) as tmp, h5py.File(tmp, "w") as f:
        _enc(f, "anndata", "0.1.0")
        (_write_sparse if sp.issparse(h.X) else _write_array)(f, "X", h.X, compression)
        for k, names, cols, n in (("obs", h.obs_names, h.obs, n_obs), ("var", h.var_names, h.var, n_vars)):
            _write_frame(f.create_group(k), names, cols, n, compression)
        for k in ("layers", "obsm", "obsp", "varm", "varp"):
            _enc(f.create_group(k), "dict", "0.1.0")
        _write_dict(f.create_group("uns"), h.uns or {}, compression)


# ---------------------------------------- devices and torchrun
def pick_device(name: str = "auto") -> torch.device:
    """The one place that picks a device: auto is cuda, then mps, then cpu; one line for a device not here."""
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        dev = None
    n, kind = torch.cuda.device_count() if torch.cuda.is_available() else 0, dev and dev.type
    bad = ("unknown device; use cpu, cuda, cuda:N, mps or auto" if kind not in ("cpu", "cuda", "mps", "meta") else
           "no CUDA device visible to torch; use --device cpu or auto" if kind == "cuda" and
           not torch.cuda.is_available() else       # (meta: tests of device placement)
           f"{n} GPU(s) visible to torch: cuda:0 to cuda:{n - 1}" if kind == "cuda" and (dev.index or 0) >= n > 0 else
           "MPS (Apple GPU) is not available here; use --device cpu or auto" if kind == "mps" and not mps else None)
    if bad:
        raise UserError(f"--device {name}: {bad}")
    return dev


def distributed(device: str = "cpu", timeout: float = 1800):
    """(device, rank, world); under torchrun the process group (NCCL on CUDA, else gloo), ranks > 0 silent."""
    rank, world, local = (int(os.environ.get(k, d)) for k, d in [("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)])
    dev = pick_device(device)
    if world == 1:
        return dev, 0, 1
    if not dist.is_available():
        raise UserError("torchrun started this run, but this torch build has no torch.distributed; run one process")
    if dev.type == "cuda":
        if not dist.is_nccl_available():
            raise UserError("torchrun with --device cuda needs NCCL, which this torch build lacks; install a CUDA "
                            "build of torch with NCCL, or run the processes on CPU with --device cpu (gloo)")
        n_local = int(os.environ.get("LOCAL_WORLD_SIZE", local + 1))  # the same test on every process
        if n_local > torch.cuda.device_count():
            raise UserError(f"{n_local} processes on this machine but {torch.cuda.device_count()} GPU(s) visible: "
                            "start at most one per GPU (torchrun --nproc_per_node)")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    elif dev.type != "cpu":
        raise UserError(f"--device {dev.type}: torchrun runs on cuda (NCCL) or cpu (gloo)")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout))
    if rank > 0:
        sys.stdout = open(os.devnull, "w")
    return dev, rank, world


# ---------------------------------------- checkpoints (flow.pt and rl.pt: written atomically, read with one clear line)
FORMAT = 3  # checkpoint format version: 3 holds the residual trust in VelocityField.lam (2 folded it in)
NEEDS = {None: ["ema", "config", "config.model", "genes", "split"],  # what each use reads; "a.b" is ckpt["a"]["b"]
         "flow": ["model", "opt", "step", "rng.torch", "rng.numpy", "extra.history", "extra.loss_avg"],
         "rl": ["model", "opt", "step", "rng.torch", "rng.numpy", "extra.history", "extra.best"]}


def dataset_meta(ds) -> dict:
    return {"genes": list(ds.genes), "components": list(ds.components), "covariates": list(ds.covariates),
            "split": {k: [[l, c] for l, c in v] for k, v in ds.split.items()}, "dose_range": ds.meta.get("dose_range"),
            "data_id": ds.meta.get("data_id")}                  # the data file it was trained on (file_identity)


def make_checkpoint(model, ema, opt, step, cfg: dict, ds_meta: dict, extra=None, rng=None) -> dict:
    """The checkpoint dict, its tensors live (deepcopy it to keep one); config.model: the model's arguments."""
    return {"format": FORMAT, "model": model.state_dict(), "ema": (ema if ema is not None else model).state_dict(),
            "opt": opt.state_dict() if opt is not None else None, "step": int(step),
            "config": {**cfg, "data": cfg.get("data") and os.path.abspath(cfg["data"]), "model": dict(model.hparams)},
            **ds_meta, "rng": rng or {}, "extra": extra or {}}


def save_checkpoint(path, model, ema, opt, step, cfg: dict, ds_meta: dict, extra=None, rng=None) -> None:
    write_checkpoint(path, make_checkpoint(model, ema, opt, step, cfg, ds_meta, extra, rng))


def write_checkpoint(path, ckpt: dict) -> None:     # atomic: a crash, Ctrl-C or SIGTERM leaves no half checkpoint
    with atomic_write(path) as tmp:
        torch.save(ckpt, tmp)


os.umask(UMASK := os.umask(0o022))                    # read once (set back at once): the mode a new file gets


@contextmanager
def atomic_write(path):
    """The one way every stage writes a file: yields a new temporary path beside it (mkstemp) to write and close, then
    renames it to `path`; a failure or signal removes it, a failed write (a full disk) is one line, `path` as it was."""
    path, tmp, folder = os.fspath(path), None, os.path.dirname(os.path.abspath(os.fspath(path)))
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        os.close(fd)
        yield tmp
        os.chmod(tmp, os.stat(path).st_mode & 0o7777 if os.path.exists(path) else 0o666 & ~UMASK)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        why = (str(e).strip() or "no message").splitlines()[0][:160]
        free = f"{shutil.disk_usage(folder).free / 2 ** 20:.0f} MiB free in" if os.path.isdir(folder) else "no folder"
        raise UserError(f"writing {path} failed ({type(e).__name__}: {why}); {free} {folder}: if the disk is full, "
                        f"free space or write elsewhere; {path} was left as it was") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def file_identity(path) -> str | None:
    """A file's size, modification time (ns) and SHA-1 of its first MiB: what says it changed (None: not a file)."""
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return f"{(st := os.stat(path)).st_size}:{st.st_mtime_ns}:{hashlib.sha1(f.read(2 ** 20)).hexdigest()}"


def read_checkpoint(path, resume=None, genes=None) -> dict:
    """The checkpoint dict, checked for what its use reads (resume: None, "flow" or "rl"): one line for a missing,
    truncated, foreign, damaged, newer, older or other-stage checkpoint, or genes other than `genes` (the data's)."""
    if not os.path.isfile(path):
        raise UserError(f"{path} is a folder; give the checkpoint file in it" if os.path.isdir(path) else
                        f"checkpoint not found: {path}; train one with `python flow.py --data X.h5ad --out {path}`")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        with open(path, "rb") as f:  # torch.save writes a zip archive: one that does not load is cut short
            cut = f.read(4) in (b"", b"PK\x03\x04") and not isinstance(e, pickle.UnpicklingError)
        raise UserError(f"{path} is {'truncated or corrupt' if cut else 'not a PerturbCellRL checkpoint'} (torch.load "
                        f"failed: {type(e).__name__})" + ("; use another copy or retrain it" if cut else "")) from None
    if not isinstance(ckpt, dict) or not {"ema", "config"} <= set(ckpt):
        raise UserError(f"{path} is not a PerturbCellRL checkpoint (no ema/config entries)")
    fmt, extra = ckpt.get("format", 1), ckpt.get("extra") or {}
    if not isinstance(fmt, int):
        raise UserError(f"{path} has the format entry {fmt!r}, not a version number: damaged, or not a checkpoint")
    if nan := [f"{p}.{k}" for p in ("ema", "model") for k, v in (ckpt.get(p) or {}).items() if torch.is_tensor(v)
               and v.is_floating_point() and not torch.isfinite(v).all()]:       # every use, --resume too
        raise UserError(f"{path} has NaN/Inf weights ({', '.join(nan[:3])}): damaged, or saved after training "
                        "diverged; retrain it, or use an earlier copy")
    if fmt != FORMAT:
        raise UserError(f"{path} has checkpoint format {fmt}, this code reads {FORMAT}: " + (
            "update PerturbCellRL" if fmt > FORMAT else "an earlier version wrote it (its residual trust was folded "
            "into the weights); retrain it with flow.py (and rl.py)"))
    if resume == "flow" and "base" in extra:
        raise UserError(f"{path} is an RL checkpoint (rl.py); resume it with `python rl.py --resume --out "
                        f"{extra.get('rl_config', {}).get('out', path)}`")
    if resume == "rl" and "base" not in extra:
        raise UserError(f"{path} is not an RL run's state (it has no base checkpoint); start RL from it with "
                        f"`python rl.py --ckpt {path}` (no --resume)")
    has = lambda a, _, b: a in ckpt and (not b or isinstance(ckpt[a], dict) and b in ckpt[a])  # noqa: E731
    if missing := [k for k in NEEDS[None] + (NEEDS[resume] if resume else []) if not has(*k.partition("."))]:
        raise UserError(f"{path} (checkpoint format {fmt}, this code writes {FORMAT}) has no {', '.join(missing)}: "
                        "an older version wrote it; " + ("it cannot be resumed, run without --resume" if resume else
                                                         "retrain it with flow.py (and rl.py)"))
    if genes is not None and list(genes) != (ref := list(ckpt["genes"])):  # e.g. ds.genes: the data loaded for it
        diff = [(a, b) for a, b in zip(ref, genes) if a != b]
        raise UserError(f"genes of the data differ from the checkpoint {path}: {len(ref)} there, {len(genes)} given, "
                        f"{len(diff) + abs(len(ref) - len(genes))} positions differ (checkpoint, data: e.g. {diff[:3]})"
                        "; load the data with them (data.load_dataset(cfg, genes=ckpt['genes']))")
    return ckpt


def restore_run(ckpt, opt, gen, rng, seed) -> None:
    """Continue a run from its checkpoint: the optimiser and both random states (reseeded from another device)."""
    opt.load_state_dict(ckpt["opt"])
    rng.bit_generator.state = ckpt["rng"]["numpy"]
    try:
        gen.set_state(ckpt["rng"]["torch"])
    except (RuntimeError, ValueError):
        seed += ckpt["step"]
        warnings.warn(f"the checkpoint's random state was saved on another kind of device than {gen.device}; "
                      f"reseeding ({seed}): the resumed run is not bit-identical to an uninterrupted one")
        gen.manual_seed(seed)


# ---------------------------------------- CLI
def field_help(cls) -> dict:
    """{field: (group, help)}: a dataclass field's trailing comment, and the comment line above it (else 'data')."""
    out = {}
    for klass in (k for k in reversed(cls.__mro__) if "__dataclass_fields__" in vars(k)):
        group = "data"
        for line in inspect.getsource(klass).splitlines()[1:]:
            if m := re.match(r"^    #\s*(.+)$", line):
                group = m.group(1).strip()
            elif m := re.match(r"^    (\w+)\s*:[^#]*#\s*(.+)$", line):
                out[m.group(1)] = (group, m.group(2).strip())
    return out


def add_args(p: argparse.ArgumentParser, cls=DataConfig) -> None:
    """One flag per field of a stage's config dataclass, its help the field's comment (default shown), grouped alike."""
    docs, groups = field_help(cls), {}
    for f in fields(cls):
        group, text = docs.get(f.name, ("other", ""))
        if group == "set from the data":                    # e.g. the model's sizes: not options
            continue
        g = groups.get(group) or groups.setdefault(group, p.add_argument_group(group))
        typ = {"int": int, "float": float, "bool": None}.get(str(f.type).split(" ")[0], str)
        kw = (dict(action=argparse.BooleanOptionalAction, default=f.default) if f.type in ("bool",) or
              isinstance(f.default, bool) else dict(nargs="+", default=[]) if f.type == "list"  # --ckpt a.pt b.pt
              else dict(type=typ, default=f.default))
        act = g.add_argument("--" + f.name.replace("_", "-"), help=text, dest=f.name, **kw)
        if "%(default)" not in act.help:                    # some Pythons' BooleanOptionalAction add it
            act.help += " (default: %(default)s)"


# parse-time limits of every stage's numeric options, by name: name -> (test, what it must be); see check_args
LIMITS = {name: (test, what) for names, test, what in [
    ("steps save_every eval_every eval_steps log_every T epochs topk width depth d_pert n_de pretrain_steps "
     "sim_covariates ode_steps timeout", lambda v: v >= 1, "an integer >= 1"),
    ("batch_size eval_cells conds n_cells sim_cells sim_genes check_cells", lambda v: 1 <= v <= 2 ** 24, "an integer "
     "in [1, 2^24] (memory)"),
    ("n_genes min_cells gene_feat_dim warmup stop_at ref_cells", lambda v: v >= 0, "an integer >= 0"),
    ("lr clip adv_clip grad_clip std_floor sigma", lambda v: v > 0, "a finite number > 0"),
    ("beta weight_decay sde_noise trust", lambda v: v >= 0, "a finite number >= 0"),
    ("test_frac val_frac prior_dropout unseen_dropout self_prior ctrl_frac min_lr_frac ema_decay",
     lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    ("t_frac", lambda v: 0 < v <= 1, "a number in (0, 1]"),
    ("seed split_seed", lambda v: 0 <= v <= 2 ** 32 - 1, "an integer in [0, 2^32 - 1]"),
    ("group", lambda v: 2 <= v <= 2 ** 24, "an integer in [2, 2^24] (GRPO compares a group's cells)")] for name in
    names.split()}


CHOICES = {"t_dist": ("uniform", "logit_normal"), "source": ("noise", "ctrl"), "kind": ("genetic", "chemical")}


def check_args(args) -> None:
    """Every numeric option finite and within its LIMITS, every option with CHOICES one of them, else one line."""
    for name, v in vars(args).items():
        if (rule := LIMITS.get(name)) and isinstance(v, (int, float)) and not (
                (isinstance(v, int) or np.isfinite(v)) and rule[0](v)):
            raise UserError(f"--{name.replace('_', '-')} {v}: must be {rule[1]}")
        if name in CHOICES and v not in CHOICES[name]:
            raise UserError(f"--{name.replace('_', '-')} {v!r}: use {' or '.join(CHOICES[name])}")
    if getattr(args, "conds", 1) * getattr(args, "group", 2) > 2 ** 24:    # rollouts held at once (rl.py)
        raise UserError(f"--conds {args.conds} x --group {args.group}: more than 2^24 rollouts at once; lower one")


def check_fixed(cfg, stored: dict, names, source: str, fix: str) -> None:
    """A checkpoint fixes the options it was trained with: one line, "--NAME value: {source} name = stored; {fix}", for
    an option in `names` given (not its default) with another value than the stored config's."""
    defaults = {f.name: f.default for f in fields(cfg)}
    if bad := [n for n in names if n in stored and getattr(cfg, n) != defaults[n] and getattr(cfg, n) != stored[n]]:
        raise UserError(f"--{bad[0].replace('_', '-')} {getattr(cfg, bad[0])!r}: {source} {bad[0]} = "
                        f"{stored[bad[0]]!r}; {fix}")


def _same_file(a, b) -> bool:                          # equal once links are resolved, or the same inode (hard links)
    try:
        return os.path.realpath(a) == os.path.realpath(b) or os.path.samefile(a, b)
    except OSError:
        return False


def check_output(what, path) -> None:
    """One line for an output path that cannot name a file: empty, ending in a slash, or an existing folder."""
    path = os.fspath(path)
    if bad := "is empty" if not path.strip() else "is a folder" if os.path.isdir(path) else "names a folder" if \
            path.endswith(("/", os.sep)) or os.path.basename(path) in (".", "..") else None:
        raise UserError(f"{what} {path!r} {bad}; an output is a file: give the path of the file to write")


def check_outputs(outputs: dict, inputs: dict) -> None:
    """Before any work: refuse an output that cannot be a file (check_output), is an input or another output, or is
    write-protected (a rename would replace it); create its folder, and fail now if it cannot be written."""
    ins = [(k, os.fspath(p)) for k, v in inputs.items() for p in (v if isinstance(v, (list, tuple)) else [v]) if p]
    for what, path in ((w, p) for w, p in outputs.items() if p is not None):
        check_output(what, path)
        path = os.fspath(path)
        if clash := next((f"{k} {p}" for k, p in ins if _same_file(path, p)), None):
            raise UserError(f"{what} {path} is the same file as {clash}; writing it would destroy that file: "
                            "choose another output path")
        if os.path.exists(path) and not (os.access(path, os.W_OK) and os.stat(path).st_mode & 0o222):
            raise UserError(f"{what} {path} exists and is write-protected (mode {os.stat(path).st_mode & 0o777:o}); "
                            "make it writable to replace it (chmod u+w), or choose another path")
        folder = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(folder, exist_ok=True)
            tempfile.TemporaryFile(dir=folder).close()                # a read-only folder fails here, not at the end
        except OSError as e:
            raise UserError(f"{what} {path}: cannot write into {folder} ({e.strerror or e}" + ": a file is in the way"
                            * os.path.isfile(folder) + "); choose a writable location") from None
        ins.append((what, path))


say = tqdm.write                                       # say(msg): one log line on stdout, above a progress bar if drawn


def progress(enabled: bool, **kw) -> tqdm:
    """A tqdm progress bar, drawn only when `enabled` and on a terminal (tqdm's disable=None): no redraws in a log."""
    return tqdm(disable=None if enabled else True, dynamic_ncols=True, **kw)


@contextmanager
def sigterm_as_interrupt():
    """Within it SIGTERM (a batch scheduler's notice before a kill) raises KeyboardInterrupt, as Ctrl-C. Main thread."""
    def stop(signum, frame):
        raise KeyboardInterrupt("terminated (SIGTERM)")
    old = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def cli(main) -> None:
    """Run a stage's main(): an expected problem is one `error:` line on stderr, exit code 2; Ctrl-C or SIGTERM its
    resume hint, exit code 130 (under torchrun rank 0 prints them; the process group is closed on the way out)."""
    rank0 = int(os.environ.get("RANK", 0)) == 0
    warnings.filterwarnings("once", category=UserWarning)  # one `warning:` line per distinct warning per run
    warnings.formatwarning = lambda message, *a, **k: f"warning: {message}\n"
    try:
        with sigterm_as_interrupt():
            main()
    except UserError as e:
        if rank0:
            print(f"error: {e}", file=sys.stderr)
        else:
            time.sleep(2)  # torchrun stops every process when one exits: let rank 0 print first
        sys.exit(2)
    except KeyboardInterrupt as e:
        if rank0:
            print(f"\n{str(e) or 'interrupted'}", file=sys.stderr)
        sys.exit(130)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def describe(ds) -> str:
    """A stage's first line about its data: the file (absolute), its size, how expression was taken, what was kept."""
    m = ds.meta
    return (f"{m['path']}: {m['n_cells_in']} cells x {m['n_genes_in']} genes "
            f"({'raw counts -> log1p(CP10k)' if m['counts'] else 'log-normalised, used as is'}); kept "
            f"{ds.X.shape[0]} cells x {len(ds.genes)} genes")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_args(p)
    p.add_argument("--simulate", metavar="OUT", help="write the synthetic benchmark to OUT and exit")
    for name, default, what in [("cells", 6000, "cells"), ("genes", 1000, "genes"), ("covariates", 1, "cell lines")]:
        p.add_argument(f"--sim-{name}", type=int, default=default, help=f"with --simulate: number of {what}")
    check_args(args := p.parse_args(argv))
    if args.simulate is not None and (args.sim_genes < 50 or args.sim_cells * args.sim_genes > 2 ** 28):
        raise UserError(f"--sim-genes {args.sim_genes}: the simulator needs at least 50 genes (its programs use 50)" if
                        args.sim_genes < 50 else "--sim-cells x --sim-genes: over 2^28 values, beyond memory")
    check_outputs({"--simulate": args.simulate}, {"--data": args.data})
    if args.simulate:
        write_h5ad(args.simulate, (simulate if args.kind == "genetic" else simulate_chemical)(
            n_cells=args.sim_cells, n_genes=args.sim_genes, seed=args.seed, n_covariates=args.sim_covariates))
        print(f"wrote {args.simulate}")
        return
    cfg, problem = DataConfig(**{f.name: getattr(args, f.name) for f in fields(DataConfig)}), None
    try:
        ds = load_dataset(cfg)
    except UserError as e:  # a summary still describes data that cannot be trained on as it is: relax, then warn
        try:
            ds = load_dataset(replace(cfg, min_cells=1, split="random", test=None, val_frac=0.0))
        except UserError:
            raise e from None
        problem = f"{e} (the summary above is with --min-cells 1 --split random)"
    m, sizes = ds.meta, np.array([len(ds.cell_idx[k]) for k in ds.keys])
    n_single = sum("+" not in l for l, _ in ds.keys)
    print(f"file        {describe(ds)}")
    print(f"keys        perturbation={m['pert_key']!r} control={m['control']!r} covariate={m['cov_key']!r} "
          f"dose={m['dose_key']!r} separator={m['sep']!r}")
    print(f"conditions  {len(ds.keys)} (condition, covariate) pairs: {n_single} singles, "
          f"{len(ds.keys) - n_single} combinations; {len(ds.components)} components")
    if m["dose_key"]:                                   # each drug's doses
        per = {n: {d for l, _ in ds.keys for x, d in components_of(l) if x == n} for n in ds.components}
        print(f"doses       column {m['dose_key']!r} in {m['dose_unit']} (labels in uM): " + "; ".join(
            f"{n} " + ",".join(fmt_dose(d) for d in sorted(v - {None})) for n, v in sorted(per.items())[:20])
            + (f"; ... ({len(per)} drugs)" if len(per) > 20 else ""))
    print("covariates  " + ", ".join(f"{c} ({len(ds.ctrl_idx[c])} controls)" for c in ds.covariates))
    print(f"cells/cond  min {sizes.min()}  median {int(np.median(sizes))}  max {sizes.max()}")
    print("split       " + "  ".join(f"{s}={len(v)}" for s, v in ds.split.items()) +
          f"   test e.g. {[k[0] for k in ds.split['test'][:5]]}")
    if problem:
        print(f"warning: this data cannot be used as it is: {problem}", file=sys.stderr)


# ---------------------------------------- simulators
def builtin_path(kind: str = "genetic") -> str:
    """The built-in benchmark of `kind` (genetic: simulate, chemical: simulate_chemical), simulated once, cached."""
    sims = {"genetic": ("simulated_v1_seed0.h5ad", simulate), "chemical": ("chemical_v1_seed0.h5ad", simulate_chemical)}
    if kind not in sims:
        raise UserError(f"--kind {kind!r}: use genetic or chemical")
    path = Path(os.environ.get("PERTURBCELLRL_CACHE", Path.home() / ".cache" / "perturbcellrl")) / sims[kind][0]
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_h5ad(path, sims[kind][1](seed=0))
    return str(path)


def _footprints(n_genes):
    """Simulated genes: PROGENy footprint genes (about 60%, an equal share per pathway, strongest first), then SIM...
    Returns genes (G,), pathways (P,), W (P, G) signed footprints (max |w| = 1), {footprint gene: its pathway}."""
    table = np.genfromtxt(Path(__file__).resolve().parent / "pathways" / "progeny_human_top100.csv", delimiter=",",
                          names=True, dtype=None, encoding="utf-8")
    paths = sorted(set(table["pathway"]))
    per, fp_path = max(1, int(0.6 * n_genes) // len(paths)), {}
    for p in paths:                                                    # 14 pathways
        rows = table[table["pathway"] == p]
        for g in rows["gene"][np.argsort(-np.abs(rows["weight"]))][:per]:
            fp_path.setdefault(g, p)
    genes = np.array(list(fp_path)[:n_genes] + [f"SIM{i:05d}" for i in range(n_genes - len(fp_path))], dtype=object)
    gidx = {g: i for i, g in enumerate(genes)}
    W = np.zeros((len(paths), len(genes)))                             # (P, G) signed footprints
    for g, p, w in zip(table["gene"], table["pathway"], table["weight"]):
        if g in gidx:
            W[paths.index(p), gidx[g]] = w
    W /= np.abs(W).max(1, keepdims=True) + 1e-12
    return genes, paths, W, {g: p for g, p in fp_path.items() if g in gidx}


def _pairs(rng, pool, n, doses=None):
    """n distinct pairs (a, b), a < b, of `pool`, sorted; with doses (a list per item), one of each: (a, b, da, db)."""
    pairs = set()
    while len(pairs) < n:
        a, b = sorted(rng.choice(pool, 2, replace=False))
        pairs.add((a, b) if doses is None else (a, b, rng.choice(doses[a]), rng.choice(doses[b])))
    return sorted(pairs)


def _interact(rng, ea, eb, interaction_frac, G, on_b=None):
    """A combination's effect e = ea + eb plus, for a fraction of pairs, an interaction: synergy (+50% of the sum),
    buffering (-50%), epistasis (B's effect masked; on_b(e) adds back B's own-gene change) or neomorphic (new genes)."""
    e = ea + eb
    kind = rng.choice(["synergy", "buffering", "epistasis", "neomorphic"]) if rng.random() < interaction_frac else \
        "none"
    if kind in ("synergy", "buffering"):                              # e + (-0.5) y is exactly e - 0.5 y
        e = e + (0.5 if kind == "synergy" else -0.5) * (ea + eb)
    elif kind == "epistasis":
        e = e - eb
        if on_b is not None:
            on_b(e)
    elif kind == "neomorphic":
        e[rng.choice(G, 20, replace=False)] += rng.normal(0, 0.6, 20)
    return e, kind


def _screen(rng, genes, effects, labels, truth, n_cells, n_covariates, ctrl_frac, responder_frac, chunk,
            lines=True) -> H5AD:
    """The h5ad of a screen of conditions with effects E (K, G): log lam_cg = mu_g(line) + u_c . L_g + r_c e_g(cond.)
    with latent programs u_c (a cell-cycle-like one on 50 genes, a diffuse one), r_c = 1 for responders (a fraction
    `responder_frac`), else 0; counts ~ NB(lib_c lam_cg / sum lam, theta_g). Cell lines shift baselines and scale
    effects. obs: labels {column: (value per condition, the controls')}, cell_type; uns['truth'] = truth(E, scales)."""
    E, G = np.stack(effects), len(genes)                               # (K, G)
    mu = rng.normal(0.0, 1.0, G)
    L = np.zeros((2, G))
    L[0, rng.choice(G, 50, replace=False)] = rng.uniform(0.5, 1.0, 50)  # cell-cycle-like program
    L[1] = rng.normal(0, 0.15, G)                                      # diffuse program
    theta = np.exp(rng.normal(np.log(5.0), 0.5, G))
    mu_line = mu + rng.normal(0, 0.3, (n_covariates, G)) * (n_covariates > 1)
    scale_line = rng.uniform(0.7, 1.3, n_covariates) if n_covariates > 1 else np.ones(1)
    n_ctrl = int(ctrl_frac * n_cells)                                  # controls, then an even share per condition
    k_of = np.r_[np.full(n_ctrl, -1), rng.permutation(np.arange(n_cells - n_ctrl) % len(E))]
    line_of = rng.integers(0, n_covariates, n_cells)
    blocks = []
    for s in range(0, n_cells, chunk):                                 # chunks bound memory, not a cell loop
        k, ln = k_of[s:s + chunk], line_of[s:s + chunk]
        u = rng.normal(0, 1, (len(k), 2))
        resp = (rng.random(len(k)) < responder_frac) & (k >= 0)
        logit = mu_line[ln] + u @ L + np.where(resp[:, None], E[np.maximum(k, 0)] * scale_line[ln][:, None], 0.0)
        lam = np.exp(logit - logit.max(1, keepdims=True))
        lam /= lam.sum(1, keepdims=True)
        lib = np.exp(rng.normal(np.log(4000), 0.35, len(k)))[:, None]
        rate = rng.gamma(theta, lib * lam / theta)                     # NB as a gamma-Poisson mixture
        blocks.append(sp.csr_matrix(rng.poisson(rate).astype(np.float32)))
    obs = {c: np.array([ctl if k < 0 else v[k] for k in k_of], dtype=object) for c, (v, ctl) in labels.items()}
    if lines:
        obs["cell_type"] = np.array([f"line{i}" for i in line_of], dtype=object)
    return H5AD(sp.vstack(blocks, format="csr"), obs, {}, np.array([f"cell{i}" for i in range(n_cells)], dtype=object),
                genes, {"truth": truth(E, scale_line)})


def simulate(n_cells=6000, n_genes=1000, n_singles=40, n_combos=30, n_covariates=1, seed=0,
             mode="a", ctrl_frac=0.15, responder_frac=0.8, interaction_frac=0.5, chunk=5000) -> H5AD:
    """A Perturb-seq-like screen with known ground truth (raw counts, GEARS labels; genes: _footprints, cells, counts:
    _screen). A single perturbation of gene A (of pathway P): its own gene +2 (CRISPRa, mode 'a') or -2 ('i'), P's
    footprint by strength * sign * PROGENy weight / max|weight|, ~15 random genes a little. A+B = e_A + e_B + an
    interaction for a fraction of pairs (_interact). Cell lines shift baselines, scale effects. Truth: uns['truth']."""
    rng = np.random.default_rng(seed)
    genes, paths, W, fp_path = _footprints(n_genes)
    G, gidx = len(genes), {g: i for i, g in enumerate(genes)}
    targets = list(rng.choice(list(fp_path), size=min(n_singles, len(fp_path)), replace=False))  # across pathways
    effects, names, kinds, tpath, single, own = [], [], [], [], {}, 2.0 if mode == "a" else -2.0
    for a in targets:
        e = np.zeros(G) + rng.uniform(0.5, 1.0) * rng.choice([-1, 1]) * W[paths.index(fp_path[a])]
        e[rng.choice(G, 15, replace=False)] += rng.normal(0, 0.4, 15)
        e[gidx[a]] = own
        single[a] = e
        names.append(f"{a}+ctrl"), effects.append(e), kinds.append("single"), tpath.append(fp_path[a])
    for a, b in _pairs(rng, targets, min(n_combos, len(targets) * (len(targets) - 1) // 2)):
        e, kind = _interact(rng, single[a], single[b], interaction_frac, G,
                            lambda e: e.__setitem__(gidx[b], e[gidx[b]] + own))
        names.append(f"{a}+{b}"), effects.append(e), kinds.append(kind), tpath.append("")
    return _screen(rng, genes, effects, {"condition": (names, "ctrl")}, lambda E, scale: {
        "conditions": np.array(names, dtype=object), "effects": E.astype(np.float32),
        "interaction": np.array(kinds, dtype=object), "pathway": np.array(tpath, dtype=object),
        "pathways": np.array(paths, dtype=object), "footprints": W.astype(np.float32),
        "line_scale": scale.astype(np.float32), "responder_frac": float(responder_frac)},
        n_cells, n_covariates, ctrl_frac, responder_frac, chunk, lines=n_covariates > 1)


DOSE_GRID = np.array([0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0])   # uM, half-log steps (sci-Plex: 0.01-10 uM)


def hill(d, ec50, h):
    """Fraction of the maximal response at dose d: d^h / (EC50^h + d^h) (Hill 1910)."""
    return d ** h / (ec50 ** h + d ** h)


def simulate_chemical(n_cells=6000, n_genes=1000, n_drugs=12, n_pairs=20, n_covariates=1, seed=0,
                      ctrl_frac=0.1, responder_frac=0.9, interaction_frac=0.5, chunk=5000) -> H5AD:
    """A sci-Plex-like drug screen with known dose-responses (raw counts; obs product_name, dose in uM as text,
    cell_type; controls 'Vehicle' at dose 0). Genes, cells, counts as in simulate. Drug D acts on one PROGENy pathway
    P (strength s in [1, 2], a sign) and on 20 off-target genes o_D at a 3x weaker potency, so dose changes its shape:
        e_D(d) = H(d; EC50, h) s sign W_P + H(d; 3 EC50, h) o_D,     H(d; c, h) = d^h / (c^h + d^h),
    Hill slope h in [0.8, 3]. Each drug at 4-6 consecutive doses of DOSE_GRID, its EC50 log-uniform between its
    second-lowest and second-highest dose. Pairs 'A+B' at one seen dose of each ('dA+dB'): e_A(dA) + e_B(dB) plus,
    for a fraction, an interaction as in simulate (epistasis: A masks B). Same seed, same data; truth in uns."""
    rng = np.random.default_rng(seed)
    genes, paths, W, _ = _footprints(n_genes)
    G, drugs = len(genes), [f"drug{i:02d}" for i in range(n_drugs)]
    pw = rng.choice(len(paths), n_drugs, replace=n_drugs > len(paths))
    on = rng.uniform(1.0, 2.0, n_drugs)[:, None] * rng.choice([-1, 1], n_drugs)[:, None] * W[pw]    # (D, G)
    off = np.zeros((n_drugs, G))
    for i in range(n_drugs):                                            # a loop over drugs
        off[i, rng.choice(G, 20, replace=False)] = rng.normal(0, 0.8, 20)
    n_dose = rng.integers(4, 7, n_drugs)
    doses = [DOSE_GRID[s:s + m] for s, m in zip(rng.integers(0, len(DOSE_GRID) - n_dose + 1), n_dose)]
    ec50 = np.exp(rng.uniform(np.log([d[1] for d in doses]), np.log([d[-2] for d in doses])))
    slope = rng.uniform(0.8, 3.0, n_drugs)
    effect = lambda i, d: hill(d, ec50[i], slope[i]) * on[i] + hill(d, 3 * ec50[i], slope[i]) * off[i]  # noqa: E731
    names, dose_txt, effects, kinds = [], [], [], []
    for i, D in enumerate(drugs):
        for d in doses[i]:
            names.append(D), dose_txt.append(fmt_dose(d)), effects.append(effect(i, d)), kinds.append("single")
    for a, b, da, db in _pairs(rng, n_drugs, n_pairs, doses):
        e, kind = _interact(rng, effect(a, da), effect(b, db), interaction_frac, G)
        names.append(f"{drugs[a]}+{drugs[b]}"), dose_txt.append(f"{fmt_dose(da)}+{fmt_dose(db)}")
        effects.append(e), kinds.append(kind)
    canon = ["+".join(f"{n}@{d}" for n, d in zip(l.split("+"), t.split("+"))) for l, t in zip(names, dose_txt)]
    labels = {"product_name": (names, "Vehicle"), "dose": (dose_txt, "0")}
    return _screen(rng, genes, effects, labels, lambda E, scale: {
        "conditions": np.array(canon, dtype=object), "effects": E.astype(np.float32),  # canonical labels 'A@0.1+B@1'
        "interaction": np.array(kinds, dtype=object), "drugs": np.array(drugs, dtype=object),
        "pathway": np.array(paths, dtype=object)[pw], "ec50": ec50.astype(np.float32),
        "hill": slope.astype(np.float32), "on_target": on.astype(np.float32), "off_target": off.astype(np.float32),
        "line_scale": scale.astype(np.float32)},
        n_cells, n_covariates, ctrl_frac, responder_frac, chunk)


if __name__ == "__main__":
    cli(main)
