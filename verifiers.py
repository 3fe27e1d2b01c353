"""Verifiers: cell-level rewards for generated perturbed cells.

What it does. Each verifier scores a batch of generated cells of ONE condition, `x` of shape
(B, G) in log1p expression space, against that condition's `data.Reference` (real cells and
statistics) and returns a (B,) tensor, higher is better:

    pearson   pearson_topk      top-k Pearson with real cells minus that with real cells without the mean change
    rmse      rmse_topk         top-k RMSE to real cells, against the real cells with the change removed or doubled
    spearman  de_spearman       Spearman of the cell's change from control with the real t statistic
    pathway   pathway_activity  pathway log-likelihood ratio, condition vs control, falling beyond the real cells
    energy    energy_witness    the cell's share of the energy distance between generated and real cells

Each compares the cell with the condition's real cells relative to control (a contrast), so a cell is paid for
showing THIS condition's response, not for being typical (a control cell can be more typical of a weak
response than the condition's own cells), and none pays more for an exaggerated response than for the real
one: Pearson and Spearman are blind to effect size (they pay it the same), RMSE and pathway pay it less, and
the energy witness guards the group (spread, collapse, exaggeration). README, "The rewards and how to add one".

How it is used.

    v = Verifier(ds.genes, parse_weights(DEFAULT_REWARDS))   # pearson=1,rmse=1,spearman=1,pathway=1,energy=2
    total, scores = v(x, ds.refs[key])     # (B,), {name: (B,)}

`total` is the raw weighted sum of the rewards' scores. GRPO (rl.group_advantages) normalises each reward
within its group before weighting, so it reads `scores`, not `total`. Pathway weights come from the
bundled PROGENy tables (pathways/, default), the bundled MSigDB Hallmark sets (`gene_sets="hallmark"`)
or any GMT / CSV given as `gene_sets`.

Adding a reward: write f(x, ref) -> (B,) and add one line `name: lambda x, ref, v: f(x, ref)` to REWARDS
(section "REWARD LOGIC"); v is the Verifier, which carries the options (v.k, the pathway matrix v.W_on(device)).
Before training with a new reward, check that it ranks real cells first (`check`):

    python verifiers.py [--data X.h5ad] [--rewards pearson=1,new=1]

prints, per reward, its mean on a condition's held-out real cells, on another condition's cells, on control
cells, on the real cells exaggerated and collapsed, and how often the real cells win (training and validation
conditions only), and the same for the weighted sum, each reward divided by about GRPO's scale.

Left out: learned verifiers, gene-set enrichment statistics (GSEA-style), per-cell DE tests, and
weighting rewards by their own reliability. The functions are batched torch code without Python
loops over cells or genes; they run on any device and under no_grad in `Verifier`.
"""
from __future__ import annotations

import argparse
import csv
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import data
from data import UserError, Reference

# ----------------------------------------------------------------------------------------------
# Helpers

def _de_deltas(x, ref: Reference):
    """Change from the control mean over the reference's DE genes, generated and real."""
    c = ref.ctrl_mean[ref.de_idx].to(x.dtype)
    xd = x[:, ref.de_idx] - c  # (B, D)
    yd = ref.dense_cells()[:, ref.de_idx].to(x.dtype) - c  # (N, D)
    return xd, yd


def _unit_rows(a):
    """Centre each row and scale it to unit L2 norm, so Pearson r = dot product of unit rows.

    Rows without spread (constant up to float rounding) become 0, so their correlations are 0.
    """
    ac = a - a.mean(-1, keepdim=True)  # (R, D)
    n = ac.norm(dim=-1, keepdim=True)  # (R, 1)
    tol = 8 * torch.finfo(a.dtype).eps * a.abs().amax(-1, keepdim=True) * a.shape[-1] ** 0.5 + 1e-30
    return torch.where(n > tol, ac / n.clamp_min(1e-30), torch.zeros_like(ac))


def _ranks(a):
    """Ranks 1..D along the last dim of a (R, D); ties get their average rank.

    With lo_i = #{a_j < a_i} and hi_i = #{a_j <= a_i}, the tied block holds ranks lo_i + 1 .. hi_i,
    so r_i = (lo_i + 1 + hi_i) / 2. Both counts are binary searches in the sorted rows.
    """
    s = a.sort(-1).values.contiguous()  # (R, D)
    lo = torch.searchsorted(s, a.contiguous())  # (R, D)
    hi = torch.searchsorted(s, a.contiguous(), right=True)  # (R, D)
    return (lo + 1 + hi).to(a.dtype) / 2


def _mean_topk(d, k: int, largest: bool):
    """Mean of the k largest (or smallest) entries of each row of d (B, N); k clipped to [1, N]."""
    k = max(1, min(int(k), d.shape[1]))
    return d.topk(k, dim=1, largest=largest).values.mean(1)  # (B,)


# ----------------------------------------------------------------------------------------------
# The verifiers: f(x (B, G), ref) -> (B,), higher is better

def pearson_topk(x, ref: Reference, k: int = 5):
    """Pearson top-k similarity to the real cells minus the same to the real cells with the condition's mean change
    removed: what the cell shares with THIS condition's response, not with any cell.

    Over the D = n_de DE genes, with deltas from the control mean u = x - mu_ctrl, v_j = y_j - mu_ctrl, and the mean
    change d = ref.delta[de]:
        r_ij = Pearson(u_i, v_j),   r0_ij = Pearson(u_i, v_j - d),   reward_i = mean top-k_j r_ij - mean top-k_j r0_ij.
    The v_j - d are counterfactual controls: the real cells' own variation around the control mean. A cell whose
    change is unrelated to the response (a control cell) scores about 0, however tight or spread its cloud; one that
    shares it scores > 0. Top-k asks each cell to resemble SOME real cells (diversity). Scale-blind: u -> c u, c > 0,
    leaves r and r0 unchanged, so an exaggerated effect is paid as much as the real one, not more.
    Zero-variance rows -> r = 0.
    """
    xd, yd = _de_deltas(x, ref)
    ux = _unit_rows(xd)  # (B, D)
    d = ref.delta[ref.de_idx].to(x.dtype)  # (D,)
    return _mean_topk(ux @ _unit_rows(yd).T, k, True) - _mean_topk(ux @ _unit_rows(yd - d).T, k, True)


def rmse_topk(x, ref: Reference, k: int = 5):
    """RMSE top-k proximity to the real cells, against the same cells with their mean change removed or doubled.

    Over the D DE genes, with d_k(x, Y) = mean of the k smallest ||x[de] - y_j[de]|| / sqrt(D) over y_j in Y and the
    mean change d = ref.delta[de]:
        reward_i = min(d_k(x_i, Y - d), d_k(x_i, Y + d)) - d_k(x_i, Y).
    Y - d and Y + d have the real cells' spread around no change and around twice the change, so a cell is paid for
    being nearer the real cells than both: a tight control cloud is near Y - d (no reward for typicality), an
    exaggerated cell near Y + d. |reward_i| <= ||d|| / sqrt(D) (triangle inequality).
    """
    xd, yd = _de_deltas(x, ref)
    d = ref.delta[ref.de_idx].to(x.dtype)  # (D,)
    dk = lambda y: _mean_topk(data.cdist(xd, y) / xd.shape[1] ** 0.5, k, largest=False)  # noqa: E731  (B,)
    return torch.minimum(dk(yd - d), dk(yd + d)) - dk(yd)


def de_spearman(x, ref: Reference):
    """Spearman correlation of the cell's delta with the real Welch t statistic over the DE genes.

        rho_i = Pearson(rank(x_i[de] - mu_ctrl[de]), rank(t[de])), average ranks for ties.
    Average ranks come from one sort and two binary searches per row (see _ranks).
    A constant delta has all ranks equal -> rho = 0. A contrast already (both sides are changes from control: a
    control cell scores about 0); scale-blind, like pearson_topk.
    """
    xd, _ = _de_deltas(x, ref)
    rx = _unit_rows(_ranks(xd))  # (B, D)
    rt = _unit_rows(_ranks(ref.t[ref.de_idx].to(x.dtype))[None])  # (1, D)
    return (rx * rt).sum(-1)  # (B,)


def pathway_activity(x, ref: Reference, W, q: float = 0.9):
    """Log-likelihood ratio of the cell's pathway activities, condition vs control, reflected beyond the real cells.

        a = pathway_scores(x) (P,)   activities of z-scored expression: the control mean has a = 0
        m = mean_j a(y_j),  s^2 = mean over pathways of the real cells' variance of a
        l(a) = log N(a; m, s^2 I) - log N(a; 0, s^2 I) = m . (a - m / 2) / s^2     (control: the same spread at 0)
        reward = min(l, 2 l_q - l),   l_q = the q-quantile (0.9) of l over the real cells
    l rises as the activities move from the control's towards the condition's, in expectation >= 0 for real cells
    and <= 0 for control cells whatever their spread; beyond what 90% of the real cells reach it falls again, so an
    exaggerated effect loses.
    """
    ax, ay = pathway_scores(x, ref, W), pathway_scores(ref.dense_cells().to(x.dtype), ref, W)  # (B, P), (N, P)
    m = ay.mean(0)  # (P,)
    s2 = (ay.var(0).mean() if len(ay) > 1 else ay.new_ones(())).clamp_min(1e-8)
    ll, ll_real = (ax - m / 2) @ m / s2, (ay - m / 2) @ m / s2  # (B,), (N,)
    top = torch.quantile(ll_real, q)
    return torch.minimum(ll, 2 * top - ll)


def pathway_scores(x, ref: Reference, W):
    """(B, P) pathway activities a = z Wn^T of cells x (B, G), z-scored against ref's controls (pathway_activity)."""
    W = W.to(x.device, x.dtype)
    unweighted = ((W == 0) | (W == 1)).all(1, keepdim=True)  # (P, 1)
    Wn = W / torch.where(unweighted, W.sum(1, keepdim=True), W.norm(dim=1, keepdim=True)).clamp_min(1e-12)  # (P, G)
    mu = ref.ctrl_mean.to(x.dtype)
    sd = ref.ctrl_std.to(x.dtype).clamp_min(1e-2)
    return ((x - mu) / sd) @ Wn.T  # (B, P)


def energy_witness(x, ref: Reference):
    """Each cell's share of the energy distance between the generated group X and real cells Y, plus a group constant.

        r_i = -( mean_j ||x_i - y_j||  -  mean_{k != i} ||x_i - x_k|| )  -  m_xx / 2,  m_xx = mean_{k!=l} ||x_k - x_l||,
    over all G genes. The first part is minus the first variation (witness) of the energy distance
        E(X, Y) = 2 E||X - Y|| - E||X - X'|| - E||Y - Y'||      (Szekely & Rizzo 2013):
    with X ~ p_theta, grad E = 2 E_x[grad log p_theta(x) (E_y||x - y|| - E_x'||x - x'||)], so the
    REINFORCE gradient of the summed r_i, E_x[grad log p_theta(x) r(x)], equals -1/2 grad E.
    Within a group it punishes cells far from real ones and rewards spread (punishes collapse). The constant
    -m_xx / 2 is the same for every cell of the group, so GRPO, which normalises within a group, does not see it; it
    makes the group mean minus half the energy distance (plus m_yy, a constant of the condition):
        mean_i r_i = -(m_xy - m_xx / 2) = -(E + m_yy) / 2,
    so groups of one condition compare on E (verifiers.check): real cells beat exaggerated, collapsed and control
    ones. Without the constant the mean is -(E + m_yy - m_xx) / 2, which pays a dispersed (exaggerated) group.
    B = 1: r = -mean_j ||x - y_j||. Cost O(B^2 G) for the within-group distances: cheap for GRPO
    groups (B ~ 8-64), the dominant cost for one group of 1,024 cells (bench/bench_verifiers.py).
    """
    y = ref.dense_cells().to(x.dtype)
    m_xy = data.cdist(x, y).mean(1)  # (B,)
    B = x.shape[0]
    if B == 1:
        return -m_xy
    dxx = data.cdist(x, x)  # (B, B)
    m_xx = (dxx * (1 - torch.eye(B, dtype=x.dtype, device=x.device))).sum(1) / (B - 1)  # (B,) exact zero diagonal
    return -(m_xy - m_xx) - m_xx.mean() / 2


# ----------------------------------------------------------------------------------------------
# REWARD LOGIC: edit here. A reward is f(x (B, G), ref) -> (B,), higher is better; its line here calls it as
# name: lambda x, ref, v: f(x, ref, ...options), v the Verifier (v.k, v.W_on(device)). To add a sixth reward, write
# f above and add one line here; it is then valid in --rewards. Then check it: python verifiers.py --rewards ...

REWARDS = {
    "pearson": lambda x, ref, v: pearson_topk(x, ref, v.k),
    "rmse": lambda x, ref, v: rmse_topk(x, ref, v.k),
    "spearman": lambda x, ref, v: de_spearman(x, ref),
    "pathway": lambda x, ref, v: pathway_activity(x, ref, v.W_on(x.device)),
    "energy": lambda x, ref, v: energy_witness(x, ref),
}
# energy 2: it alone guards the group, and the four per-cell rewards all pay a collapsed group (README)
DEFAULT_REWARDS = "pearson=1,rmse=1,spearman=1,pathway=1,energy=2"

# ----------------------------------------------------------------------------------------------


def parse_weights(spec: str) -> dict[str, float]:
    """'pearson=1,rmse=0.5' -> {'pearson': 1.0, 'rmse': 0.5}; a bare name means weight 1."""
    weights = {}
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        name, _, val = item.partition("=")
        name = name.strip()
        if name not in REWARDS:
            raise UserError(f"unknown reward '{name}' in '{spec}'; valid rewards: {', '.join(REWARDS)}")
        try:
            w = float(val) if val.strip() else 1.0
        except ValueError:
            raise UserError(f"reward weight '{item}' is not a number; write name=number, e.g. {name}=1") from None
        if w != w or abs(w) == float("inf"):
            raise UserError(f"reward weight '{item}' must be finite")
        weights[name] = w
    if not any(weights.values()):
        raise UserError(f"no nonzero reward weight in '{spec}'; e.g. --rewards {DEFAULT_REWARDS}")
    return weights


class Verifier:
    """Weighted combination of the rewards in REWARDS.

    weights: {name: w}, None -> every reward with weight 1; rewards with weight 0 are not computed.
    gene_sets: 'progeny' or None (bundled PROGENy, auto top-100/top-500), 'hallmark' (bundled MSigDB Hallmark),
    or the path of a .gmt / .csv / .tsv gene-set file (gene_set_path).
    The pathway matrix W is built only when the pathway weight is nonzero.
    """

    def __init__(self, genes, weights: dict | None = None, gene_sets=None, k: int = 5, min_genes: int = 5):
        weights = {name: 1.0 for name in REWARDS} if weights is None else dict(weights)
        bad = [n for n in weights if n not in REWARDS]
        if bad:
            raise UserError(f"unknown reward(s) {bad}; valid rewards: {', '.join(REWARDS)}")
        self.weights = {n: float(w) for n, w in weights.items() if w != 0}
        if not self.weights:
            raise UserError("all reward weights are zero; give at least one nonzero weight")
        self.genes, self.k = list(genes), int(k)
        self.W, self.pathways, self.coverage, self._W = None, [], {}, {}
        gene_sets = gene_set_path(gene_sets)
        if "pathway" in self.weights:
            if gene_sets is None:
                self.W, self.pathways, self.coverage = progeny_auto(self.genes, min_genes)
            else:
                sets = load_gene_sets(gene_sets)
                self.W, self.pathways, self.coverage = align_gene_sets(sets, self.genes, min_genes)
                name = "MSigDB Hallmark v7.0" if gene_sets == GENE_SETS["hallmark"] else gene_sets
                print(f"verifiers: pathway gene sets = {name} ({len(self.pathways)}/{len(sets)} sets kept)")

    def W_on(self, device):
        """W (P, G) on `device`, copied once per device."""
        key = str(device)
        if key not in self._W:
            self._W[key] = self.W.to(device)
        return self._W[key]

    @torch.no_grad()
    def __call__(self, x, ref: Reference):
        """x (B, G) cells of one condition -> (total (B,), scores {name: (B,)}); total = sum_n w_n scores[n]."""
        if x.ndim != 2 or x.shape[1] != len(self.genes):
            raise UserError(f"cells have shape {tuple(x.shape)}, expected (B, {len(self.genes)}) for this Verifier's genes")
        ref = ref.dense()  # sparse reference cells (data.load_dataset) densified once, on their device
        scores = {name: REWARDS[name](x, ref, self) for name in self.weights}
        total = sum(w * scores[name] for name, w in self.weights.items())
        return total, scores


# ---------------------------------------------------------------------------------------------- CLI
@dataclass
class RewardConfig:
    # rewards
    rewards: str = DEFAULT_REWARDS  # reward weights name=w,...: pearson, rmse, spearman, pathway, energy, or one you add
    gene_sets: str = "progeny"      # pathway reward gene sets: progeny or hallmark (bundled), or a .gmt/.csv/.tsv path
    topk: int = 5                   # k of the top-k rewards (pearson, rmse)


@dataclass
class CheckConfig(RewardConfig, data.DataConfig):
    # check
    check_cells: int = 64           # real cells scored per condition (the rest of its cells are the reference)
    group: int = 16                 # GRPO's group (rl.py --group): the sum row's scale, a reward's std in such groups


GROUPS = ("real", "other", "control", "exaggerated", "collapsed")


def check(ds, verifier: Verifier, keys, n_cells: int = 64, seed: int = 0, std_floor: float = 0.1,
          group: int = 16) -> dict:
    """Does each reward rank a condition's real cells first, and does it pay for an exaggerated or collapsed response?

    For each key with N >= 4 real cells, n = min(n_cells, N // 2) of them are held out and scored ('real') against a
    Reference built from the other N - n and from the covariate's control cells except the m = min(n, M // 2) scored
    ones ('control'; no scored cell is in the statistics it is scored against); so are n cells drawn without
    replacement from the other conditions of `keys` in its covariate, pooled ('other'; a covariate with one condition
    has none: real is then compared with control only), the real cells with their change from the control mean
    doubled ('exaggerated': max(c + 2 (x - c), 0)) and n copies of the real cells' mean ('collapsed').
    'sum' is the weighted sum of the rewards, each divided by s + 1e-6, s^2 the mean (population) variance of the reward
    within groups of `group` real cells (rl.py's --group): an estimate of the std + 1e-6 a group's rewards are divided
    by in rl.group_advantages when generated cells look like real ones (the energy witness is noisier in small groups),
    so 'sum' ranks the groups about as the advantage GRPO climbs does. The Reference is smaller than the one rl.py uses,
    so values are not those RL logs. Returns {reward | 'sum': {group: mean over keys of the group's mean score (nan: no
    key had it), 'wins': share of keys where real beats other and control, 'vs_exaggerated', 'vs_collapsed': shares
    where real beats them, 'n': keys scored, 'n_other': keys with other conditions}}."""
    rng = np.random.default_rng(seed)
    names = [*verifier.weights, "sum"]
    means = {name: {g: [] for g in GROUPS} for name in names}          # {reward | 'sum': {group: per-key means}}
    for key in keys:                                                   # a loop over conditions, batched cells
        scores = check_key(ds, verifier, key, keys, rng, n_cells, std_floor, group)
        for g in GROUPS if scores is not None else ():
            for name in names:
                means[name][g].append(float(scores[g][name].mean()) if g in scores else np.nan)
    n_scored = len(means["sum"]["real"])
    if not n_scored:
        raise UserError(f"no condition could be checked: each needs >= 4 cells and >= 4 control cells in its "
                        f"covariate, among the {len(keys)} given")
    out = {}
    for name, s in means.items():
        a = {g: np.array(v) for g, v in s.items()}
        beats = {g: a["real"] > a[g] for g in GROUPS[1:]}
        with warnings.catch_warnings():                               # no 'other' anywhere: mean of nothing
            warnings.simplefilter("ignore", RuntimeWarning)
            out[name] = {g: float(np.nanmean(v)) for g, v in a.items()}
        out[name].update(wins=float(np.mean((beats["other"] | np.isnan(a["other"])) & beats["control"])),
                         vs_exaggerated=float(beats["exaggerated"].mean()),
                         vs_collapsed=float(beats["collapsed"].mean()),
                         n=n_scored, n_other=int((~np.isnan(a["other"])).sum()))
    return out


def check_key(ds, verifier, key, keys, rng, n_cells, std_floor, group):
    """check() for one key: {group: {reward | 'sum': (n,) scores}} of its real, control, other, exaggerated and
    collapsed cells against a Reference of the rest, or None when it has too few cells."""
    rows, ctrl = ds.cell_idx[key], ds.ctrl_idx[key[1]]
    others = [ds.cell_idx[k] for k in keys if k[1] == key[1] and k != key]
    if len(rows) < 4 or len(ctrl) < 4:
        return None
    perm, cperm = rng.permutation(rows), rng.permutation(ctrl)
    n, m = min(n_cells, len(rows) // 2), min(n_cells, len(rows) // 2, len(ctrl) // 2)
    mean, var = data.sample_stats(ds.X[cperm[m:]])                    # controls left after the scored ones
    ref = data.reference(ds.X[perm[n:]], cperm[m:], mean, np.sqrt(var), len(ds.refs[key].de_idx), std_floor)
    x = {"real": ds.X[perm[:n]], "control": ds.X[cperm[:m]]}
    if others:
        pool = np.concatenate(others)
        x["other"] = ds.X[rng.choice(pool, min(n, len(pool)), replace=False)]
    c = ref.ctrl_mean.numpy()
    x["exaggerated"] = np.maximum(c + 2 * (x["real"] - c), 0)
    x["collapsed"] = np.repeat(x["real"].mean(0, keepdims=True), n, axis=0)  # (n, G)
    scores = {g: verifier(torch.from_numpy(np.ascontiguousarray(v)), ref)[1] for g, v in x.items()}
    real = torch.from_numpy(x["real"])
    parts = [verifier(real[i:i + group], ref)[1] for i in range(0, n - group + 1, group)] or [scores["real"]]
    scale = {name: float(torch.stack([p[name].var(unbiased=False) for p in parts]).mean().sqrt()) + 1e-6
             for name in verifier.weights}                            # pooled within-group std (population)
    for g in scores:
        scores[g]["sum"] = sum(w * scores[g][name] / scale[name] for name, w in verifier.weights.items())
    return scores


def main(argv=None):
    """Print check() on the training and validation conditions (the test ones are never looked at)."""
    p = argparse.ArgumentParser(description="check the rewards on real cells: do they rank a condition's real "
                                            "cells above control cells and another condition's cells, and above "
                                            "the real cells exaggerated or collapsed?")
    data.add_args(p, CheckConfig)
    cfg = CheckConfig(**vars(p.parse_args(argv)))
    data.check_args(cfg)
    ds = data.load_dataset(cfg)
    ver = Verifier(ds.genes, parse_weights(cfg.rewards), cfg.gene_sets, cfg.topk)
    keys = ds.split["train"] + ds.split["val"]
    res = check(ds, ver, keys, cfg.check_cells, cfg.seed, cfg.std_floor, cfg.group)
    r0 = res["sum"]
    print(f"{ds.meta['path']}: {r0['n']} of {len(keys)} training and validation conditions scored ({r0['n_other']} "
          f"with other conditions in their covariate; real wins = beats other and control), {len(ds.genes)} genes")
    print(f"{'reward':<10}{'weight':>7}{'real':>9}{'other':>9}{'control':>9}{'exagg.':>9}{'collapsed':>10}"
          f"{'real wins':>11}{'> exagg.':>10}{'> collapsed':>12}")
    for name, r in res.items():
        vals = "".join(f"{r[g]:>{w}.3f}" if r[g] == r[g] else f"{'-':>{w}}" for g, w in zip(GROUPS, (9, 9, 9, 9, 10)))
        weight = f"{ver.weights[name]:g}" if name in ver.weights else ""
        print(f"{name:<10}{weight:>7}{vals}{r['wins']:>11.0%}{r['vs_exaggerated']:>10.0%}{r['vs_collapsed']:>12.0%}")
    print(f"sum: the weighted sum of the rewards, each divided by its std within groups of {cfg.group} real cells "
          "(about what GRPO divides by)")


# ---------------------------------------------------------------------------------------------- gene sets
# The pathway reward's tables (read by Verifier): name -> {gene: weight}, insertion-ordered. Below the rewards:
# file reading, which no reader of the method needs.
PATHWAY_DIR = Path(__file__).resolve().parent / "pathways"
GENE_SETS = {"progeny": None, "hallmark": PATHWAY_DIR / "h.all.v7.0.symbols.gmt"}  # --gene-sets names; None: PROGENy auto


def _add(sets: dict, seen: dict, name: str, gene: str, weight: float) -> None:
    """Add one (set, gene, weight); a gene seen before in the same set (any case) keeps its FIRST weight."""
    if gene.upper() not in seen.setdefault(name, set()):
        seen[name].add(gene.upper())
        sets.setdefault(name, {})[gene] = weight


def _text(path: Path) -> str:
    """A gene-set file's text, UTF-8 (with or without a byte-order mark); anything else is one line."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"gene-set file {path} is not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r}); "
                        "save it as UTF-8, or check it is a .gmt/.csv/.tsv text file (not compressed)") from None


def load_progeny(path=None, top: int = 100) -> dict[str, dict[str, float]]:
    """Read a long table `gene,pathway,weight[,p_value]` (CSV, or TSV by extension) -> {pathway: {gene: weight}}.

    path=None reads the bundled PROGENy table pathways/progeny_human_top{top}.csv (top = 100 or 500).
    Column aliases `target` (gene) and `source` (pathway) are accepted (decoupler's naming).
    """
    if path is None:
        if top not in (100, 500):
            raise UserError(f"no bundled PROGENy table for top={top}: use 100 or 500, or pass a path")
        path = PATHWAY_DIR / f"progeny_human_top{top}.csv"
    path = Path(path)
    if not path.is_file():
        raise UserError(f"gene-set file {path} not found")
    delim = "\t" if path.suffix.lower() in (".tsv", ".txt") else ","
    rows = list(csv.reader(_text(path).splitlines(), delimiter=delim))
    if not rows:
        raise UserError(f"gene-set file {path} is empty")
    head = [c.strip().lower() for c in rows[0]]
    head = [{"target": "gene", "source": "pathway"}.get(c, c) for c in head]
    if not {"gene", "pathway", "weight"} <= set(head):
        raise UserError(f"gene-set table {path} needs columns gene,pathway,weight; found {rows[0]} "
                        "(for a .gmt file keep the .gmt extension)")
    ig, ip, iw = head.index("gene"), head.index("pathway"), head.index("weight")
    sets: dict[str, dict[str, float]] = {}
    seen: dict[str, set] = {}
    for n, row in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in row):
            continue
        try:
            if not np.isfinite(w := float(row[iw])):                # a NaN weight makes every pathway reward NaN
                raise ValueError
            _add(sets, seen, row[ip].strip(), row[ig].strip(), w)
        except (IndexError, ValueError):
            raise UserError(f"{path} line {n}: expected gene,pathway,weight with a finite numeric weight, got {row}"
                            ) from None
    if not sets:
        raise UserError(f"gene-set table {path} has a header but no rows")
    return sets


def load_gmt(path) -> dict[str, dict[str, float]]:
    """Read a GMT file (tab-separated: set name, description, genes...) -> {set: {gene: 1.0}}."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"gene-set file {path} not found")
    sets: dict[str, dict[str, float]] = {}
    seen: dict[str, set] = {}
    for n, line in enumerate(_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        fields = [c.strip() for c in line.split("\t")]
        genes = [g for g in fields[2:] if g]
        if len(fields) < 3 or not fields[0] or not genes:
            raise UserError(f"{path} line {n}: a GMT line is 'name<TAB>description<TAB>gene<TAB>gene...'")
        for g in genes:
            _add(sets, seen, fields[0], g, 1.0)
    if not sets:
        raise UserError(f"GMT file {path} holds no gene sets")
    return sets


def gene_set_path(spec):
    """--gene-sets -> None (bundled PROGENy, top-100 or top-500: progeny_auto), the bundled MSigDB Hallmark GMT
    ('hallmark'), or the given file. A bare name that is neither bundled nor an existing file is one line."""
    if spec is None or str(spec).lower() in GENE_SETS:
        return GENE_SETS[str(spec).lower()] if spec is not None else None
    if not Path(spec).suffix and not Path(spec).exists():
        raise UserError(f"--gene-sets {spec!r}: unknown gene-set table; use progeny (default), hallmark, or the "
                        "path of a .gmt / .csv / .tsv file")
    return Path(spec)


GENE_SET_FILES: dict = {}  # what load_gene_sets read: (resolved path, size, mtime, inode) -> {set: {gene: weight}}


def load_gene_sets(path) -> dict[str, dict[str, float]]:
    """Load gene sets by extension: .gmt -> load_gmt; .csv / .tsv / .txt -> load_progeny (long table). A file is
    parsed once while unchanged (same size, modification time and inode; GENE_SET_FILES): rl.py and evaluate.py
    load --gene-sets early to fail fast, then Verifier loads it again. Returns a copy."""
    ext = Path(path).suffix.lower()
    if ext not in (".gmt", ".csv", ".tsv", ".txt"):
        raise UserError(f"unknown gene-set file type '{ext}' for {path}: use a .gmt file or a "
                        ".csv/.tsv table with columns gene,pathway,weight")
    if not (file := Path(path).resolve()).is_file():
        raise UserError(f"gene-set file {path} not found")
    key = (file, (st := file.stat()).st_size, st.st_mtime_ns, st.st_ino)
    if key not in GENE_SET_FILES:
        GENE_SET_FILES[key] = load_gmt(path) if ext == ".gmt" else load_progeny(path)
    return {name: dict(genes) for name, genes in GENE_SET_FILES[key].items()}


def align_gene_sets(sets: dict, genes, min_genes: int = 5):
    """Gene sets -> weight matrix over the data's genes.

    Returns W (P, G) float32 with W[p, g] = weight of gene g in set p (0 if absent), the P kept set
    names, and coverage {set: (n_genes_covered, n_genes_in_set)} for EVERY set (dropped ones too).
    Symbols match case-insensitively. Duplicates keep the first occurrence: a gene listed twice in
    a set keeps its first weight; a symbol appearing twice in `genes` maps to its first column.
    Sets with fewer than `min_genes` covered genes are dropped with a warning naming them.
    """
    col: dict[str, int] = {}
    for j, g in enumerate(genes):
        col.setdefault(str(g).upper(), j)
    rows, names, coverage, dropped = [], [], {}, []
    for name, members in sets.items():
        hit: dict[int, float] = {}
        seen = set()
        for g, w in members.items():
            u = g.upper()
            if u in seen:
                continue
            seen.add(u)
            if u in col:
                hit[col[u]] = float(w)
        coverage[name] = (len(hit), len(seen))
        if len(hit) < min_genes:
            dropped.append(name)
            continue
        w = torch.zeros(len(genes))
        w[list(hit)] = torch.tensor(list(hit.values()))
        rows.append(w)
        names.append(name)
    if not rows:
        head = [str(g) for g in list(genes)[:200]]
        ensembl = 2 * sum(bool(re.match(r"ENS[A-Z]*G\d{6,}", g)) for g in head) > len(head)
        n_in = len(set(col) & {g.upper() for s in sets.values() for g in s})
        raise UserError(f"no gene set has >= {min_genes} genes among the data's {len(genes)} genes (first genes: "
                        f"{head[:3]}); " + ("they look like Ensembl IDs: pass the var column with gene symbols via "
                        "--gene-symbols" if ensembl else f"{n_in} of them are in any set, too few: keep more genes "
                        "(raise --n-genes; 0 keeps all) or drop pathway from --rewards"))
    if dropped:
        warnings.warn(f"dropped {len(dropped)} gene set(s) with < {min_genes} genes in the data: "
                      + ", ".join(dropped))
    return torch.stack(rows), names, coverage  # (P, G)


def progeny_auto(genes, min_genes: int = 5):
    """Default pathway weights: PROGENy top-100, or top-500 when top-100 is too thin for these genes.

    Rule: top-100 is used when at least 3/4 of its pathways keep >= min_genes of the data's genes;
    otherwise the top-500 table (superset, more genes per pathway): with 500 HVGs of a real screen,
    top-100 keeps only 7 of the 14 pathways. Prints which table was chosen.
    """
    upper = {str(g).upper() for g in genes}
    for top in (100, 500):
        sets = load_progeny(top=top)
        n_ok = sum(len({g.upper() for g in s} & upper) >= min_genes for s in sets.values())
        if 4 * n_ok >= 3 * len(sets) or top == 500:
            print(f"verifiers: pathway gene sets = PROGENy top-{top} "
                  f"({n_ok}/{len(sets)} pathways with >= {min_genes} of the {len(genes)} genes)")
            return align_gene_sets(sets, genes, min_genes)



if __name__ == "__main__":
    data.cli(main)
