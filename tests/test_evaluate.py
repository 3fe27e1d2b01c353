"""Tests for evaluate.py: every metric against a direct numpy / scipy computation, the perfect value of
every metric for identical prediction and truth, the discrimination score on constructed cases with a
known rank, the baselines (the additive one is exact without interactions), flow.generate, the table, the CLI
and its --write-pred h5ad (read back with anndata), and a cross-check of pearson_delta / mae with cell-eval."""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.spatial.distance
import scipy.stats
import torch

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
import data  # noqa: E402
import evaluate  # noqa: E402
import flow  # noqa: E402
from data import UserError  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def sim(tiny_screen):
    """A small simulated screen (additive split: 15 train, 1 val, 2 test keys) and a tiny generator."""
    return dict(tiny_screen)


def random_reference(seed=0, G=40, N=30, M=50, n_de=25, shift=0.8):
    """A Reference built by data.reference from random control and perturbed cells (all ctrl std > floor)."""
    rng = np.random.default_rng(seed)
    ctrl = rng.normal(2.0, 1.0, (M, G)).astype(np.float32)
    eff = np.where(rng.random(G) < 0.4, rng.normal(0, shift, G), 0.0)
    cells = (rng.normal(2.0, 1.0, (N, G)) + eff).astype(np.float32)
    ref = data.reference(cells, np.arange(M), ctrl.mean(0), ctrl.std(0, ddof=1), n_de, 0.1)
    return ref, ctrl, cells


# ----------------------------------------------------------------------------- energy and MMD
def energy_loop(x, y):
    """2 E||X - Y|| - E||X - X'|| - E||Y - Y'|| with U-statistics (i != j) within samples, as double loops."""
    n, m = len(x), len(y)
    dxy = sum(np.linalg.norm(x[i] - y[j]) for i in range(n) for j in range(m)) / (n * m)
    dxx = sum(np.linalg.norm(x[i] - x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    dyy = sum(np.linalg.norm(y[i] - y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    return 2 * dxy - dxx - dyy


def mmd_numpy(x, y, scales=(0.5, 1.0, 2.0), median_of=None):
    """Unbiased MMD^2 (Gretton et al. 2012, eq. 3), RBF bandwidths s * median of real pairwise distances
    (of `median_of` instead, to show the choice matters)."""
    dyy = scipy.spatial.distance.cdist(y, y)
    w = y if median_of is None else median_of
    m = np.median(scipy.spatial.distance.cdist(w, w)[~np.eye(len(w), dtype=bool)])
    k = lambda d: sum(np.exp(-d ** 2 / (2 * (s * m) ** 2)) for s in scales)  # noqa: E731
    kxx, kyy, kxy = k(scipy.spatial.distance.cdist(x, x)), k(dyy), k(scipy.spatial.distance.cdist(x, y))
    n, p = len(x), len(y)
    return ((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (p * (p - 1))
            - 2 * kxy.mean())


def test_energy_distance_matches_double_loop():
    rng = np.random.default_rng(0)
    x, y = rng.normal(0, 1, (7, 5)), rng.normal(0.5, 1.5, (9, 5))
    got = data.energy_distance(torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64))
    assert got == pytest.approx(energy_loop(x, y), rel=1e-10, abs=1e-12)
    # symmetric in its arguments
    assert data.energy_distance(torch.tensor(y), torch.tensor(x)) == pytest.approx(got, rel=1e-10)


def test_energy_distance_of_a_sample_with_itself_and_with_a_shift():
    """E(Y, Y) = 2 S / n^2 - 2 S / (n (n - 1)) = -(2 / n) * mean_{i != j} ||y_i - y_j|| (the cross term keeps the
    zero diagonal, the U-statistics drop it); shifting one copy by c u makes E grow with c."""
    rng = np.random.default_rng(1)
    y = torch.tensor(rng.normal(0, 1, (12, 6)))
    d = torch.cdist(y, y)
    mean_off = float(d.sum() / (12 * 11))
    assert data.energy_distance(y, y) == pytest.approx(-2 / 12 * mean_off, rel=1e-10)
    u = torch.tensor(rng.normal(0, 1, 6))
    es = [data.energy_distance(y + c * u, y) for c in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert all(a < b for a, b in zip(es, es[1:])), es


def test_energy_distance_float32_is_accurate():
    rng = np.random.default_rng(4)
    x, y = rng.normal(2.3, 1, (30, 40)), rng.normal(2, 1, (30, 40))
    want = energy_loop(x, y)
    got = data.energy_distance(torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32))
    assert got == pytest.approx(want, rel=1e-4)


def test_mmd_matches_numpy_with_the_stated_bandwidths():
    # 10 real cells: 45 distinct pairwise distances (odd), so the median of the off-diagonal is unique
    # (torch.median returns the lower middle value, numpy the average of the two; they agree here)
    rng = np.random.default_rng(2)
    x, y = rng.normal(0, 3, (8, 4)), rng.normal(1, 1, (10, 4))
    got = evaluate.mmd_rbf(torch.tensor(x), torch.tensor(y))
    assert got == pytest.approx(mmd_numpy(x, y), rel=1e-9, abs=1e-12)
    # the bandwidth comes from the REAL cells (second argument): x's median (3x larger here) gives another value
    assert abs(mmd_numpy(x, y, median_of=x) - got) > 1e-2
    got3 = evaluate.mmd_rbf(torch.tensor(x), torch.tensor(y), scales=(1.0,))
    assert got3 == pytest.approx(mmd_numpy(x, y, (1.0,)), rel=1e-9, abs=1e-12)


def test_mmd_of_a_sample_with_itself_and_far_samples():
    """MMD(Y, Y) with the unbiased within-terms and the full cross term = (2 / n) (mean_{i != j} k_ij - 3):
    slightly negative, -> 0 as n grows; far-apart samples give about mean_offdiag(k_yy) + 0 - 0 > 0."""
    rng = np.random.default_rng(3)
    y = rng.normal(0, 1, (15, 5))
    dyy = scipy.spatial.distance.cdist(y, y)
    m = np.median(dyy[~np.eye(15, dtype=bool)])
    k = sum(np.exp(-dyy ** 2 / (2 * (s * m) ** 2)) for s in (0.5, 1, 2))
    off = (k.sum() - np.trace(k)) / (15 * 14)
    assert evaluate.mmd_rbf(torch.tensor(y), torch.tensor(y)) == pytest.approx(2 / 15 * (off - 3), rel=1e-9)
    far = evaluate.mmd_rbf(torch.tensor(y + 100.0), torch.tensor(y))
    assert far == pytest.approx(2 * off, rel=1e-6)    # k_xx and k_yy off-diagonals equal, k_xy ~ 0


# ----------------------------------------------------------------------------- metrics()
def test_metrics_identical_prediction_and_truth_are_perfect(sim):
    ds = sim["ds"]
    for k in ds.split["test"] + ds.split["val"]:
        ref = ds.refs[k]
        n = len(ref.dense_cells())
        m = evaluate.metrics(ref.dense_cells().clone(), ref, len(ds.ctrl_idx[k[1]]))
        assert m["pearson_delta"] == pytest.approx(1, abs=1e-5)
        assert m["pearson_delta_de20"] == pytest.approx(1, abs=1e-5)
        assert m["mse"] == pytest.approx(0, abs=1e-10)
        assert m["mae"] == pytest.approx(0, abs=1e-5)
        assert m["r2"] == pytest.approx(1, abs=1e-5)
        assert m["de_direction"] == 1.0
        assert m["de_overlap"] == 1.0
        assert m["effect_ratio"] == pytest.approx(1, abs=1e-5)
        assert m["spread_ratio"] == pytest.approx(1, abs=1e-6)
        # the U-statistic of a sample against itself: E = -(2/n) mean_{i!=j} d_ij, MMD = (2/n)(mean k_ij - 3)
        d = torch.cdist(ref.dense_cells().double(), ref.dense_cells().double())
        mean_off = float(d.sum() / (n * (n - 1)))
        assert m["energy"] == pytest.approx(-2 / n * mean_off, rel=1e-3)
        assert abs(m["energy"]) < 0.05 * mean_off
        assert m["mmd"] <= 0 and abs(m["mmd"]) < 6 / n


def test_metrics_identical_perfect_de_overlap_when_the_std_floor_binds():
    """A gene with no variance in the controls (a CRISPRa target unexpressed in controls, say) where the
    perturbed cells move it a little: the real Welch t (data.reference, raw control std) ranks it first,
    the metric's t (floored ctrl_std) does not; with x = the real cells de_overlap must still be 1."""
    rng = np.random.default_rng(0)
    G, M, N = 30, 50, 40
    ctrl = rng.normal(3.0, 1.0, (M, G)).astype(np.float32)
    ctrl[:, 0] = 0.0                                             # constant in the controls: raw std 0
    cells = rng.normal(3.0, 1.0, (N, G)).astype(np.float32)
    cells[:, 0] = rng.normal(0.05, 0.01, N)                      # a small, very consistent change
    cells[:, 1:11] += 2.0                                        # ten clearly DE genes
    ref = data.reference(cells, np.arange(M), ctrl.mean(0), ctrl.std(0, ddof=1), 5, 0.1)
    assert int(ref.de_idx[0]) != 0                               # the floor keeps gene 0 from dominating
    m = evaluate.metrics(ref.dense_cells().clone(), ref, M)
    assert m["pearson_delta"] == pytest.approx(1, abs=1e-5)
    assert m["de_overlap"] == 1.0




def test_metrics_against_numpy_and_scipy():
    ref, ctrl, cells = random_reference(seed=4)
    rng = np.random.default_rng(5)
    x = np.clip(cells[:20] + rng.normal(0.3, 0.5, (20, cells.shape[1])), 0, None).astype(np.float32)
    m = evaluate.metrics(torch.from_numpy(x), ref, len(ctrl))
    cm, rm, pm = ctrl.mean(0).astype(np.float64), cells.mean(0).astype(np.float64), x.mean(0).astype(np.float64)
    pd, rd = pm - cm, rm - cm
    de = ref.de_idx.numpy()
    assert m["pearson_delta"] == pytest.approx(scipy.stats.pearsonr(pd, rd)[0], abs=1e-5)
    assert m["pearson_delta_de20"] == pytest.approx(scipy.stats.pearsonr(pd[de[:20]], rd[de[:20]])[0], abs=1e-5)
    assert m["mse"] == pytest.approx(np.mean((pm - rm) ** 2), rel=1e-5)
    assert m["mae"] == pytest.approx(np.mean(np.abs(pm - rm)), rel=1e-5)
    assert m["r2"] == pytest.approx(1 - ((pd - rd) ** 2).sum() / ((rd - rd.mean()) ** 2).sum(), abs=1e-4)  # on deltas
    assert m["de_direction"] == pytest.approx(np.mean(np.sign(pd[de]) == np.sign(rd[de])))
    t_pred = scipy.stats.ttest_ind(x, ctrl, equal_var=False).statistic       # Welch t, predicted vs control
    top = np.argsort(-np.abs(t_pred))[:len(de)]
    assert m["de_overlap"] == pytest.approx(len(set(top) & set(de)) / len(de))
    assert 0 < m["de_overlap"] < 1                                           # a case that can be wrong
    assert m["effect_ratio"] == pytest.approx(np.linalg.norm(pd) / np.linalg.norm(rd), rel=1e-5)
    assert m["spread_ratio"] == pytest.approx(x.std(0, ddof=1).mean() / cells.std(0, ddof=1).mean(), rel=1e-5)
    # float32 torch.cdist's matrix-product path (> 25 rows) is off by ~1e-2 per distance, so energy_distance uses the
    # exact path (test_energy_distance_float32_is_accurate); what is left is float32 rounding
    assert m["energy"] == pytest.approx(energy_loop(x.astype(np.float64), cells.astype(np.float64)), rel=5e-3)
    assert m["mmd"] == pytest.approx(mmd_numpy(x.astype(np.float64), cells.astype(np.float64)), rel=1e-3, abs=1e-6)


def test_metrics_diagnostics_see_caricatures_and_collapse():
    ref, ctrl, cells = random_reference(seed=6)
    c = torch.from_numpy(ctrl.mean(0))
    caricature = c + 2 * (ref.dense_cells() - c)               # every cell's delta doubled
    m = evaluate.metrics(caricature, ref, len(ctrl))
    assert m["effect_ratio"] == pytest.approx(2, rel=1e-5)
    assert m["pearson_delta"] == pytest.approx(1, abs=1e-5)    # Pearson is blind to the scale
    collapsed = ref.mean.expand(10, -1).clone()                # all cells at the real mean
    m = evaluate.metrics(collapsed, ref, len(ctrl))
    assert m["spread_ratio"] == pytest.approx(0, abs=1e-6)
    assert m["mse"] == pytest.approx(0, abs=1e-10)


def test_metrics_adds_the_verifier_rewards(sim):
    import verifiers
    ds = sim["ds"]
    k = ds.split["test"][0]
    v = verifiers.Verifier(ds.genes, {"pearson": 1.0, "rmse": 1.0})
    x = ds.refs[k].dense_cells()[:16]
    m = evaluate.metrics(x, ds.refs[k], len(ds.ctrl_idx[k[1]]), v)
    _, scores = v(x, ds.refs[k])
    assert set(m) >= {"reward/pearson", "reward/rmse"} and "reward/energy" not in m
    assert m["reward/rmse"] == pytest.approx(float(scores["rmse"].mean()))


# ----------------------------------------------------------------------------- discrimination
def discrimination_loop(P, R, exclude):
    K, out = len(P), []
    for i in range(K):
        keep = np.setdiff1d(np.arange(P.shape[1]), exclude[i])
        d = [np.abs(P[i, keep] - R[j, keep]).sum() for j in range(K)]
        out.append(1 - sum(dj < d[i] for dj in d) / K)
    return np.array(out)


def test_discrimination_known_rank_and_excluded_genes():
    """R_j = 10 e_j (genes 0..3), condition 0 also moves its own gene 5 by 50. P_0 = R_2 + 50 e_5 (right own
    gene, otherwise condition 2's profile): with gene 5 excluded for row 0, only R_2 is nearer than R_0 ->
    rank 1 -> 1 - 1/4 = 0.75; P_i = R_i elsewhere -> 1."""
    K, G = 4, 6
    R = torch.zeros(K, G)
    R[torch.arange(K), torch.arange(K)] = 10.0
    R[0, 5] = 50.0
    P = R.clone()
    P[0] = R[2]
    P[0, 5] = 50.0
    exclude = [[5], [], [], []]
    s = evaluate.discrimination(P, R, exclude)
    assert s.tolist() == pytest.approx([0.75, 1.0, 1.0, 1.0])
    # the excluded gene really is excluded: any value there leaves the score unchanged
    for v in (-1e6, 0.0, 1e6):
        P2 = P.clone()
        P2[0, 5] = v
        assert evaluate.discrimination(P2, R, exclude).tolist() == pytest.approx([0.75, 1.0, 1.0, 1.0])
    # not excluded, the own gene (50 apart from R_2) makes condition 0 nearest again: score 1
    assert evaluate.discrimination(P, R, [[], [], [], []])[0] == pytest.approx(1.0)
    # exclusion is per row: excluding gene 5 only for row 1 does not exclude it for row 0
    assert evaluate.discrimination(P, R, [[], [5], [], []])[0] == pytest.approx(1.0)
    # the worst case: the predicted profile is farthest from its own real one -> rank K - 1 -> 1/K
    R4 = 10.0 * torch.eye(K)
    P4 = R4.clone()
    P4[1] = torch.tensor([5.0, -10.0, 5.0, 5.0])                # 35 from R4_1, 25 from every other R4_j
    assert evaluate.discrimination(P4, R4, [[]] * K).tolist() == pytest.approx([1.0, 1 / K, 1.0, 1.0])


def test_discrimination_matches_numpy_on_random_data():
    rng = np.random.default_rng(7)
    K, G = 9, 25
    R = rng.normal(0, 1, (K, G))
    P = R + rng.normal(0, 1.2, (K, G))
    exclude = [list(rng.choice(G, rng.integers(0, 3), replace=False)) for _ in range(K)]
    got = evaluate.discrimination(torch.tensor(P), torch.tensor(R), exclude).numpy()
    want = discrimination_loop(P, R, exclude)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert want.min() < 1                                       # not every row trivially first


# ----------------------------------------------------------------------------- baselines
def test_additive_baseline_is_exact_without_interactions(tmp_path):
    """All cells respond and no pair interacts: a combination's log-rate effect is e_A + e_B. After library
    normalisation and log1p of counts the mean deltas are not exactly additive (log1p(lam) is not linear in
    log lam at low counts, the normalisation couples genes), so the check is a correlation > 0.9 over the
    real top DE genes plus a scale within 25%, not equality; the prior itself is the sum of the singles'
    reference deltas exactly."""
    path = tmp_path / "noint.h5ad"
    data.write_h5ad(path, data.simulate(n_cells=3000, n_genes=150, n_singles=6, n_combos=4, seed=1,
                                        interaction_frac=0.0, responder_frac=1.0))
    ds = data.load_dataset(data.DataConfig(data=str(path), n_genes=0, split="additive", test_frac=0.5,
                                           val_frac=0.0))
    keys = ds.split["test"]
    assert keys and all("+" in k[0] for k in keys)
    base = evaluate.baselines(ds, keys, seed=0)
    table = ds.key_table(keys)
    for i, k in enumerate(keys):
        a, b = k[0].split("+")
        want = ds.refs[(a, k[1])].delta.numpy() + ds.refs[(b, k[1])].delta.numpy()
        np.testing.assert_allclose(ds.additive_delta(k), want, rtol=0, atol=1e-6)
        np.testing.assert_allclose(table["prior"][i].numpy(), want, rtol=0, atol=1e-6)
        ref = ds.refs[k]
        add_delta = base["additive"][k].mean(0) - ref.ctrl_mean                       # (G,)
        de = ref.de_idx
        r = np.corrcoef(add_delta[de].numpy(), ref.delta[de].numpy())[0, 1]
        assert r > 0.9, (k, r)
        ratio = float(add_delta[de].norm() / ref.delta[de].norm())
        assert 0.75 < ratio < 1.25, (k, ratio)
        # the control baseline on the same DE genes is far worse (a check that can fail)
        ctrl_delta = base["control"][k].mean(0) - ref.ctrl_mean
        assert float((ctrl_delta[de] - ref.delta[de]).norm()) > 2 * float((add_delta[de] - ref.delta[de]).norm())


def test_control_and_train_mean_baselines_use_the_right_covariate(tmp_path):
    path = tmp_path / "twolines.h5ad"
    data.write_h5ad(path, data.simulate(n_cells=1600, n_genes=80, n_singles=6, n_combos=4, n_covariates=2,
                                        seed=2))
    ds = data.load_dataset(data.DataConfig(data=str(path), n_genes=0, split="random", test_frac=0.3))
    keys = ds.split["test"]
    assert {k[1] for k in keys} == set(ds.covariates)            # both lines among the held-out keys
    base = evaluate.baselines(ds, keys, n_cells=25, seed=3)
    assert set(base) == {"control", "train_mean", "additive", "start"}
    for k in keys:                                               # the start row: the same control cells + Dataset.start
        np.testing.assert_allclose(base["start"][k].numpy(), np.maximum(base["control"][k].numpy() + ds.start(k), 0))
    train = ds.split["train"]
    for k in keys:
        x = base["control"][k]
        assert x.shape == (25, len(ds.genes))
        own = torch.from_numpy(ds.X[ds.ctrl_idx[k[1]]])
        other = torch.from_numpy(np.concatenate([ds.X[ds.ctrl_idx[c]] for c in ds.covariates if c != k[1]]))
        assert (x[:, None, :] == own[None]).all(-1).any(1).all()      # every cell is a control of its line
        assert not (x[:, None, :] == other[None]).all(-1).any(1).any()
        md = torch.stack([ds.refs[j].delta for j in train if j[1] == k[1]]).mean(0)
        torch.testing.assert_close(base["train_mean"][k], (x + md).clamp(min=0))
    # write_pred keeps the covariate column: anndata reads the controls of both lines and the labels back
    ad = pytest.importorskip("anndata")
    evaluate.write_pred(tmp_path / "p.h5ad", ds, base["train_mean"])
    a = ad.read_h5ad(tmp_path / "p.h5ad")
    cov, pert = a.obs[ds.meta["cov_key"]], a.obs[ds.meta["pert_key"]]
    is_c = np.asarray(pert == ds.meta["control"])
    assert {c: int((np.asarray(cov == c) & is_c).sum()) for c in ds.covariates} == \
        {c: len(ds.ctrl_idx[c]) for c in ds.covariates}
    assert a.n_obs == is_c.sum() + 25 * len(keys)
    for k in keys:
        sel = np.asarray(pert == ds.meta["labels"][k[0]]) & np.asarray(cov == k[1])
        np.testing.assert_array_equal(np.asarray(a.X[sel]), base["train_mean"][k].numpy())
    # deterministic for a seed, different for another
    again = evaluate.baselines(ds, keys, n_cells=25, seed=3)
    other_seed = evaluate.baselines(ds, keys, n_cells=25, seed=4)
    assert all(torch.equal(again["control"][k], base["control"][k]) for k in keys)
    assert not all(torch.equal(other_seed["control"][k], base["control"][k]) for k in keys)


# ----------------------------------------------------------------------------- flow.generate
def test_predict_counts_determinism_and_sde(sim):
    ds, model = sim["ds"], sim["model"]
    keys = ds.split["test"]
    p = flow.generate(model, ds, keys, steps=4, seed=0)
    assert list(p) == keys
    for k in keys:
        assert p[k].shape == (len(ds.cell_idx[k]), len(ds.genes))
        assert torch.isfinite(p[k]).all() and (p[k] >= 0).all()
    q = flow.generate(model, ds, keys, steps=4, seed=0)
    assert all(torch.equal(p[k], q[k]) for k in keys)
    r = flow.generate(model, ds, keys, steps=4, seed=1)
    assert not torch.equal(p[keys[0]], r[keys[0]])
    s = flow.generate(model, ds, keys, n_cells=5, steps=4, noise_level=0.7, seed=0)
    assert all(s[k].shape == (5, len(ds.genes)) and torch.isfinite(s[k]).all() and (s[k] >= 0).all() for k in keys)
    # chunks: each draws its own noise, so the cells differ from one batch, but each key keeps its count
    c = flow.generate(model, ds, keys, steps=4, seed=0, chunk=17)
    assert all(c[k].shape == p[k].shape and (c[k] >= 0).all() for k in keys)


def zero_network(model):
    """A copy of `model` whose output layer is zero: paired generation then gives control cell + shift exactly."""
    z = copy.deepcopy(model)
    torch.nn.init.zeros_(z.out.weight)
    torch.nn.init.zeros_(z.out.bias)
    return z


def keys_with_distinct_shifts(ds, n=4):
    """n keys whose start predictors (Dataset.start) all differ, so cells given another key's shift are seen."""
    keys = [k for k in ds.split["test"] + ds.split["val"] + ds.split["train"] if np.abs(ds.start(k)).max() > 0.1]
    keys = keys[:n]
    S = np.stack([ds.start(k) for k in keys])
    assert len(keys) == n and min(np.abs(S[i] - S[j]).max() for i in range(n) for j in range(i)) > 0.1
    return keys


def drawn_control_rows(ds, keys, n, seed):
    """The control-cell rows generation draws: n[i] rows per key, with replacement, from one seeded torch generator,
    key after key (data.control_rows)."""
    g = torch.Generator().manual_seed(seed)
    return [ds.ctrl_idx[k[1]][torch.randint(len(ds.ctrl_idx[k[1]]), (m,), generator=g).numpy()] for k, m in zip(keys, n)]


@pytest.mark.parametrize("method, noise", [("midpoint", 0.0), ("euler", 1e-6)], ids=["ODE", "SDE"])
def test_predict_keeps_each_key_with_its_own_condition(sim, method, noise):
    """With a zero network every generated cell is exactly its control cell plus its OWN key's shift, row for row
    (ODE and the RL SDE at a negligible noise level: paired, the SDE noise moves the condition's path only; several
    chunks, unequal counts), so a key paired with another key's condition, or with
    another key's control cells, fails."""
    ds = sim["ds"]
    model = zero_network(sim["model"])
    keys = keys_with_distinct_shifts(ds)
    n = [5, 7, 3, 6]
    got = flow.generate(model, ds, keys, n, steps=3, method=method, noise_level=noise, seed=4, chunk=4)
    assert list(got) == keys
    for k, rows in zip(keys, drawn_control_rows(ds, keys, n, seed=4)):
        want = np.maximum(ds.X[rows] + ds.start(k), 0)
        np.testing.assert_allclose(got[k].numpy(), want, atol=1e-4, rtol=0, err_msg=str(k))
    # the trained network adds its own change on top, per key (not zero, not the same for every key)
    real = flow.generate(sim["model"], ds, keys, n, steps=3, method=method, noise_level=noise, seed=4, chunk=4)
    moved = [float((real[k] - got[k]).abs().mean()) for k in keys]
    assert min(moved) > 1e-3


# ----------------------------------------------------------------------------- summary and table
def test_summarize_and_report_mark_missing_metrics_na(sim):
    """Explicit split holding out the single CTSF and two combinations: the additive baseline has no
    prediction for CTSF and CTSF+TMPRSS2 (CTSF unseen), one for KLK3+MIRLET7A2; so no discrimination (it
    needs every condition) -> n/a in that column only."""
    ds = data.load_dataset(data.DataConfig(data=str(sim["path"]), n_genes=0,
                                           test="CTSF,CTSF+TMPRSS2,KLK3+MIRLET7A2", val_frac=0.0))
    keys = ds.split["test"]
    assert len(keys) == 3
    preds = evaluate.baselines(ds, keys, n_cells=20, seed=0)
    assert preds["additive"][("CTSF", "all")] is None and preds["additive"][("CTSF+TMPRSS2", "all")] is None
    assert preds["additive"][("KLK3+MIRLET7A2", "all")] is not None
    rows = evaluate.evaluate_methods(ds, preds, keys)
    assert len(rows) == 3 + 3 + 3 + 1                             # control, train_mean, start: all; additive: one
    summary = evaluate.summarize(rows)
    assert [summary[m]["n"] for m in ("control", "train_mean", "additive")] == [3, 3, 1]
    ctrl_rows = [r for r in rows if r["method"] == "control"]
    assert summary["control"]["mae"] == pytest.approx(np.mean([r["mae"] for r in ctrl_rows]))
    assert "discrimination" in summary["control"] and "discrimination" not in summary["additive"]
    table = evaluate.report(summary)
    lines = table.splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head[:2] == ["method", "n"] and "discrimination" in head and "pearson_delta" in head
    body = {ln.split("|")[1].strip(): [c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]}
    assert set(body) == {"control", "train_mean", "additive", "start"} and len(lines) == 6
    j = head.index("discrimination")
    assert body["additive"][j] == "n/a" and body["control"][j] != "n/a"
    assert sum(c == "n/a" for c in body["additive"]) == 1
    assert body["control"][head.index("mae")] == f"{summary['control']['mae']:.3f}"


# ----------------------------------------------------------------------------- CLI and --write-pred
def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "evaluate.py", *args], cwd=cwd, capture_output=True, text=True,
                          env=ENV, timeout=300)


def test_cli_table_json_and_write_pred_roundtrip(sim):
    ad = pytest.importorskip("anndata")
    tmp, ds = sim["tmp"], sim["ds"]
    out, pred = tmp / "r.json", tmp / "pred.h5ad"
    res = run_cli("--ckpt", sim["ckpt"], "--out", str(out), "--write-pred", str(pred), "--ode-steps", "4")
    assert res.returncode == 0, res.stderr
    rows = [ln for ln in res.stdout.splitlines() if ln.startswith("|")]
    names = [ln.split("|")[1].strip() for ln in rows[2:]]
    assert names[:3] == ["control", "train_mean", "additive"]
    assert sim["ckpt"] in names and any(n.startswith(sim["ckpt"] + " (SDE") for n in names)
    res_json = json.loads(out.read_text())
    keys = ds.split["test"]
    ck_rows = [r for r in res_json["rows"] if r["method"] == sim["ckpt"]]
    assert sorted((r["condition"], r["covariate"]) for r in ck_rows) == sorted(keys)
    assert set(res_json["summary"]) == set(names)
    model, _ = flow.load_checkpoint(sim["ckpt"])                         # the control check, as flow.py logs it
    assert res_json["control_check"][sim["ckpt"]] == pytest.approx(flow.control_check(model, ds, seed=0), rel=1e-6)
    assert "control condition vs held-out control cells" in res.stdout
    # the prediction file: read back with anndata
    a = ad.read_h5ad(pred)
    assert list(a.var_names) == ds.genes
    col = a.obs[ds.meta["pert_key"]]
    assert str(col.dtype) == "category"
    n_ctrl = len(ds.ctrl_idx["all"])
    assert (col == ds.meta["control"]).sum() == n_ctrl
    np.testing.assert_array_equal(np.asarray(a.X[:n_ctrl]), ds.X[ds.ctrl_idx["all"]])
    want = flow.generate(sim["model"], ds, keys, steps=4, seed=0)
    for k in keys:
        label = ds.meta["labels"][k[0]]
        sel = np.asarray(col == label)
        assert sel.sum() == len(ds.cell_idx[k])
        np.testing.assert_allclose(np.asarray(a.X[sel]), want[k].numpy(), atol=1e-5)
    assert set(col.cat.categories) == {ds.meta["control"]} | {ds.meta["labels"][k[0]] for k in keys}


@pytest.fixture(scope="module")
def missing_ckpt_run(tmp_path_factory):
    return run_cli("--ckpt", str(tmp_path_factory.mktemp("cli") / "nope.pt"))


def test_cli_missing_checkpoint_one_line_error(missing_ckpt_run):
    res = missing_ckpt_run
    assert res.returncode != 0
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "nope.pt" in err[0], res.stderr
    assert "Traceback" not in res.stderr


def test_cli_missing_checkpoint_exit_code_2(missing_ckpt_run):
    assert missing_ckpt_run.returncode == 2


def test_main_raises_data_error_for_a_missing_checkpoint(tmp_path):
    with pytest.raises(UserError, match="not found"):
        evaluate.main(["--ckpt", str(tmp_path / "nope.pt")])


# ----------------------------------------------------------------------------- cell-eval cross-check
CELL_EVAL_SCRIPT = r"""
import json, sys
from cell_eval import MetricsEvaluator
from cell_eval._types import MetricType
from cell_eval.metrics import metrics_registry
real, pred, ctrl, col, outdir = sys.argv[1:6]
ev = MetricsEvaluator(adata_pred=pred, adata_real=real, control_pert=ctrl, pert_col=col, skip_de=True,
                      outdir=outdir, num_threads=1)
want = ["pearson_delta", "mse", "mae"]
skip = [m for m in metrics_registry.list_metrics(MetricType.ANNDATA_PAIR) if m not in want]
res, _ = ev.compute(profile="anndata", skip_metrics=skip, write_csv=False)
print("JSON" + json.dumps({r["perturbation"]: {m: r[m] for m in want} for r in res.to_dicts()}))
"""


def cell_eval_python():
    """An interpreter with cell-eval: this one if it imports cell_eval, else $CELL_EVAL_PYTHON (a separate
    venv: cell-eval pulls in scanpy, numba, polars, pyarrow)."""
    try:
        import cell_eval  # noqa: F401
        return sys.executable
    except ImportError:
        return os.environ.get("CELL_EVAL_PYTHON")


def test_pearson_delta_and_mae_agree_with_cell_eval(sim):
    py = cell_eval_python()
    if not py:
        pytest.skip("cell-eval not importable and CELL_EVAL_PYTHON not set")
    tmp, ds = sim["tmp"], sim["ds"]
    keys = ds.split["test"] + ds.split["val"]
    preds = flow.generate(sim["model"], ds, keys, n_cells=40, steps=4, seed=0)
    real = {k: ds.refs[k].dense_cells() for k in keys}
    evaluate.write_pred(tmp / "ce_real.h5ad", ds, real)
    evaluate.write_pred(tmp / "ce_pred.h5ad", ds, preds)
    res = subprocess.run([py, "-c", CELL_EVAL_SCRIPT, str(tmp / "ce_real.h5ad"), str(tmp / "ce_pred.h5ad"),
                          ds.meta["control"], ds.meta["pert_key"], str(tmp / "ce_out")],
                         capture_output=True, text=True, env=ENV, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    theirs = json.loads(next(ln for ln in res.stdout.splitlines() if ln.startswith("JSON"))[4:])
    assert len(theirs) == len(keys)
    for k in keys:
        ours = evaluate.metrics(preds[k], ds.refs[k], len(ds.ctrl_idx[k[1]]))
        t = theirs[ds.meta["labels"][k[0]]]
        assert ours["pearson_delta"] == pytest.approx(t["pearson_delta"], abs=1e-4), k
        assert ours["mae"] == pytest.approx(t["mae"], abs=1e-4), k
        assert ours["mse"] == pytest.approx(t["mse"], abs=1e-4), k


# ----------------------------------------------------------------------------- r2, interaction, selection
def test_r2_is_on_deltas_so_control_cells_score_about_zero():
    ref, ctrl, cells = random_reference(seed=3)
    m = evaluate.metrics(torch.from_numpy(ctrl), ref, len(ctrl))
    pd = ctrl.mean(0) - ref.ctrl_mean.numpy()
    d = ref.delta.numpy()
    assert m["r2"] == pytest.approx(1 - ((pd - d) ** 2).sum() / ((d - d.mean()) ** 2).sum(), rel=1e-4)
    assert m["r2"] < 0.05                                      # on raw means the control baseline scored ~0.96


def test_interaction_score_against_lstsq_and_its_zero_for_additive_predictions():
    rng = np.random.default_rng(0)
    dA, dB = rng.normal(0, 1, 300), rng.normal(0, 1, 300)
    e_real = np.where(rng.random(300) < 0.1, rng.normal(0, 2, 300), 0.0)
    real = 0.8 * dA + 1.1 * dB + e_real
    S = torch.tensor(np.stack([dA, dB]))
    t = lambda a: torch.tensor(a)  # noqa: E731
    # an independent implementation: numpy least squares, then Pearson of the two residuals
    D = np.stack([dA, dB], 1)
    res = lambda d: d - D @ np.linalg.lstsq(D, d, rcond=None)[0]  # noqa: E731
    pred = 0.5 * dA + 0.5 * dB + 0.7 * e_real + rng.normal(0, 0.3, 300)
    assert evaluate.interaction(t(pred), t(real), S) == pytest.approx(np.corrcoef(res(pred), res(real))[0, 1], abs=1e-6)
    assert evaluate.interaction(t(real), t(real), S) == pytest.approx(1, abs=1e-6)
    for shrunk in (dA + dB, 0.6 * (dA + dB), 2 * dA - 0.3 * dB):   # any scaled/shrunk additive prediction: 0
        assert abs(evaluate.interaction(t(shrunk), t(real), S)) < 1e-6


def typical_sample(rng, mean, s, n):
    """n cells whose sample mean is `mean` and whose per-gene sample variance (ddof 1) is exactly s^2."""
    D = rng.normal(size=(n, len(s)))
    D = (D - D.mean(0)) / D.std(0, ddof=1) * s                       # column means 0, sample std s exactly
    return mean + D


