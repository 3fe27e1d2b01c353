"""data.py beyond h5ad I/O: parsing, preprocessing, splits, reference statistics, simulator, errors, CLI.

Fixtures are small h5ad files written by anndata (or the simulator) into tmp dirs; every expected value
comes from a direct numpy computation or a property a wrong implementation fails.
"""
import os
import subprocess
import sys
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.sparse as sp
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
from data import DataConfig, UserError, load_dataset, make_split, parse_condition  # noqa: E402

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "mcfaline23_gbm_crispri.h5ad"


# ----------------------------------------------------------------------------- helpers
def write_ad(path, X, obs: dict, var_names=None, var: dict | None = None, layers=None):
    """Write an h5ad with anndata (the reference writer); string obs columns become categoricals."""
    ad = pytest.importorskip("anndata")
    import pandas as pd
    n, g = X.shape
    obs_df = pd.DataFrame({k: pd.Categorical(v) if np.asarray(v).dtype.kind in "OU" else v
                           for k, v in obs.items()}, index=[f"c{i}" for i in range(n)])
    var_df = pd.DataFrame(var or {}, index=list(var_names) if var_names is not None else
                          [f"G{j}" for j in range(g)])
    ad.AnnData(X=X, obs=obs_df, var=var_df, layers=layers).write_h5ad(path)
    return str(path)


def cp10k(counts):
    """Independent log1p(10,000 * x / total) on a dense count matrix (float64)."""
    counts = np.asarray(counts, dtype=np.float64)
    return np.log1p(1e4 * counts / counts.sum(1, keepdims=True))


def load(path, **kw):
    kw.setdefault("n_genes", 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_dataset(DataConfig(data=str(path), **kw))


@pytest.fixture(scope="module")
def sim_path(tmp_path_factory):
    """A small simulated screen (counts, GEARS labels, one covariate)."""
    p = tmp_path_factory.mktemp("sim") / "sim.h5ad"
    data.write_h5ad(p, data.simulate(n_cells=2400, n_genes=300, n_singles=12, n_combos=12, seed=0))
    return str(p)


@pytest.fixture(scope="module")
def sim_ds(sim_path):
    return load(sim_path)


@pytest.fixture(scope="module")
def default_sim():
    """The default-size simulation (also reused as the CLI's cached built-in benchmark)."""
    return data.simulate()


# ----------------------------------------------------------------------------- parsing
def test_parse_condition_cases():
    assert parse_condition("A+B", "ctrl") == parse_condition("B+A", "ctrl") == ("A", "B")
    assert parse_condition("A+ctrl", "ctrl") == ("A",)
    assert parse_condition("ctrl+B", "ctrl") == ("B",)
    assert parse_condition("ctrl", "ctrl") == ()
    assert parse_condition("non-targeting", "non-targeting") == ()
    assert parse_condition("A+control", "non-targeting") == ("A",)             # GEARS spelling too
    assert parse_condition("D", "DMSO", dose=10.0) == ("D@10",)
    assert parse_condition("B+A", "ctrl", dose=2.5) == ("A@2.5", "B@2.5")
    assert parse_condition("D", "DMSO", dose=float("nan")) == ("D",)
    assert parse_condition("DMSO", "DMSO", dose=0.0) == ()                     # control stays control
    assert parse_condition("A_B", "ctrl", sep="_") == ("A", "B")
    assert parse_condition("non_targeting", "non_targeting", sep="_") == ()   # control holding the sep


def test_detect_sep():
    assert data.detect_sep(["ctrl", "A", "B", "A_B"], "ctrl") == "_"
    assert data.detect_sep(["ctrl", "HLA_X", "B"], "ctrl") == "+"              # a gene named HLA_X
    assert data.detect_sep(["ctrl", "A", "HLA_X"], "ctrl") == "+"              # one part only
    assert data.detect_sep(["ctrl", "A+ctrl", "A_B"], "ctrl") == "+"           # '+' wins
    assert data.detect_sep(["non_targeting", "A", "B", "A_B"], "non_targeting") == "_"


def test_find_control():
    for lab in ["ctrl", "CTRL", "Control", "non-targeting", "Non-Targeting", "DMSO", "dmso"]:
        labels = np.array(["A"] * 5 + [lab] * 3 + ["B"], dtype=object)
        assert data.find_control(labels) == lab
    labels = np.array(["A"] * 5 + ["B"] * 3 + ["C"], dtype=object)
    with pytest.raises(UserError, match=r"most frequent labels: \['A', 'B', 'C'\]"):
        data.find_control(labels)
    with pytest.raises(UserError, match=r"control label 'zz' not found.*'A'"):
        data.find_control(labels, "zz")
    assert data.find_control(labels, "B") == "B"


# ----------------------------------------------------------------------------- loading & preprocessing
def _three_groups(rng, n_genes=20, shuffle=True):
    labels = np.array(["ctrl"] * 30 + ["G1"] * 20 + ["G2+G3"] * 15 + ["G2"] * 15 + ["G3"] * 15, dtype=object)
    if shuffle:
        labels = labels[rng.permutation(len(labels))]
    X = rng.poisson(3.0, (len(labels), n_genes)).astype(np.float32)
    return labels, X


def test_counts_are_log_normalised(tmp_path):
    rng = np.random.default_rng(0)
    labels, X = _three_groups(rng)
    p = write_ad(tmp_path / "c.h5ad", sp.csr_matrix(X), {"condition": labels})
    ds = load(p)
    assert ds.meta["counts"] and ds.X.dtype == np.float32
    want = cp10k(X)
    for lab, key in [("G1", ("G1", "all")), ("G2+G3", ("G2+G3", "all"))]:   # stable order within a key
        np.testing.assert_allclose(ds.X[ds.cell_idx[key]], want[labels == lab], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ds.X[ds.ctrl_idx["all"]], want[labels == "ctrl"], rtol=1e-5, atol=1e-5)
    assert ds.genes == [f"G{j}" for j in range(20)]


def test_log_data_used_as_is(tmp_path):
    rng = np.random.default_rng(1)
    labels, X = _three_groups(rng)
    L = cp10k(X).astype(np.float32)
    ds = load(write_ad(tmp_path / "l.h5ad", L, {"condition": labels}))
    assert not ds.meta["counts"]
    np.testing.assert_array_equal(ds.X[ds.cell_idx[("G1", "all")]], L[labels == "G1"])


def test_layer_option(tmp_path):
    rng = np.random.default_rng(2)
    labels, X = _three_groups(rng)
    junk = rng.random(X.shape).astype(np.float32)                               # X is not what we want
    p = write_ad(tmp_path / "layer.h5ad", junk, {"condition": labels}, layers={"counts": sp.csr_matrix(X)})
    ds = load(p, layer="counts")
    assert ds.meta["counts"]
    np.testing.assert_allclose(ds.X[ds.cell_idx[("G1", "all")]], cp10k(X)[labels == "G1"], atol=1e-5)
    with pytest.raises(UserError, match="no layer 'raw'.*counts"):
        load(p, layer="raw")


def test_gene_symbols_from_ensembl_and_override(tmp_path):
    rng = np.random.default_rng(3)
    labels, X = _three_groups(rng, n_genes=6)
    ens = [f"ENSG{j:011d}" for j in range(6)]
    sym = ["G1", "G2", "G3", "TP53", "MYC", "MYC"]
    for col in ["gene_symbols", "feature_name"]:
        ds = load(write_ad(tmp_path / f"{col}.h5ad", X, {"condition": labels}, ens, {col: sym}))
        assert ds.genes == ["G1", "G2", "G3", "TP53", "MYC", "MYC-1"]        # duplicates made unique
    # --gene-symbols: a column even when the index is not Ensembl
    p = write_ad(tmp_path / "ov.h5ad", X, {"condition": labels}, [f"x{j}" for j in range(6)],
                 {"sym": sym, "other": [f"o{j}" for j in range(6)]})
    assert load(p, gene_symbols="sym").genes[:4] == ["G1", "G2", "G3", "TP53"]
    assert load(p).genes[0] == "x0"
    with pytest.raises(UserError, match="'nope' not in var.*sym"):
        load(p, gene_symbols="nope")
    p = write_ad(tmp_path / "ensonly.h5ad", X, {"condition": labels}, ens, {"other": sym})
    with pytest.raises(UserError, match="Ensembl.*--gene-symbols"):
        load(p)


def test_gene_selection_uses_training_cells_only(tmp_path):
    rng = np.random.default_rng(13)
    labels, X = _three_groups(rng, n_genes=60)
    X[:, 50] = 0.0
    X[labels == "G2+G3", 50] = rng.choice([1, 300], (labels == "G2+G3").sum())   # expressed only in G2+G3
    p = write_ad(tmp_path / "tr.h5ad", sp.csr_matrix(X), {"condition": labels})
    assert "G50" not in load(p, n_genes=30, test="G2+G3").genes              # held out: all-zero gene
    assert "G50" in load(p, n_genes=30, test="G1").genes                     # in training: top of its bin


@pytest.mark.parametrize("fmt", ["dense", "csr", "csc"])
def test_gene_stats_blocks(fmt):
    rng = np.random.default_rng(12)
    X = rng.poisson(0.7, (53, 11)).astype(np.float32)
    rows = np.sort(rng.choice(53, 30, replace=False))
    M = {"dense": X, "csr": sp.csr_matrix(X), "csc": sp.csc_matrix(X)}[fmt]
    mean, var = data.gene_stats(M, rows, chunk=7)                            # several partial blocks
    np.testing.assert_allclose(mean, X[rows].astype(np.float64).mean(0), rtol=1e-10)
    np.testing.assert_allclose(var, X[rows].astype(np.float64).var(0), rtol=1e-8, atol=1e-12)


def test_n_genes_keeps_targets(tmp_path):
    rng = np.random.default_rng(4)
    labels, X = _three_groups(rng, n_genes=60)
    X[:, 1:4] = 5.0                                   # the targets G1..G3: constant, lowest dispersion
    X[:, 10:15] = rng.poisson(rng.choice([1, 40], (len(labels), 5)))         # very overdispersed
    ds = load(write_ad(tmp_path / "hv.h5ad", sp.csr_matrix(X), {"condition": labels}), n_genes=10,
              test_frac=0.0, val_frac=0.0)
    assert len(ds.genes) == 10 and ds.X.shape[1] == 10
    assert {"G1", "G2", "G3"} <= set(ds.genes)
    # independent Seurat normalised dispersion on the dense log data (all rows are training rows here)
    L = cp10k(X)
    mean, var = L.mean(0), L.var(0)
    disp = np.where(mean > 0, np.log(var / np.maximum(mean, 1e-12) + 1e-12), -np.inf)
    bins = np.searchsorted(np.quantile(mean, np.linspace(0, 1, 21)[1:-1]), mean)
    z = np.full(60, -np.inf)
    for b in np.unique(bins):
        m = (bins == b) & np.isfinite(disp)
        z[m] = (disp[m] - disp[m].mean()) / (disp[m].std() + 1e-12) if m.sum() > 1 else 0.0
    z[1:4] = np.inf
    assert set(ds.genes) == {f"G{j}" for j in np.argsort(-z, kind="stable")[:10]}
    assert ds.genes == sorted(ds.genes, key=lambda g: int(g[1:]))            # original gene order
    # the stored columns are the selected genes' values
    idx = [int(g[1:]) for g in ds.genes]
    np.testing.assert_allclose(ds.X[ds.cell_idx[("G1", "all")]], cp10k(X)[labels == "G1"][:, idx], atol=1e-5)


def test_covariates_controls_matched(tmp_path):
    rng = np.random.default_rng(5)
    labels = np.array((["ctrl"] * 20 + ["A"] * 12) * 2, dtype=object)
    cells = np.array(["K562"] * 32 + ["RPE1"] * 32, dtype=object)
    X = rng.poisson(3.0, (64, 10)).astype(np.float32)
    X[cells == "RPE1", 0] += 20                                              # lines differ
    ds = load(write_ad(tmp_path / "cov.h5ad", X, {"condition": labels, "cell_line": cells}))
    assert ds.meta["cov_key"] == "cell_line" and ds.covariates == ["K562", "RPE1"]
    assert ds.keys == [("A", "K562"), ("A", "RPE1")]
    want = cp10k(X)
    for c in ds.covariates:
        i = ds.ctrl_idx[c]
        assert len(i) == 20 and ds.is_ctrl[i].all() and (ds.cov[i] == c).all()
        np.testing.assert_allclose(ds.refs[("A", c)].ctrl_mean.numpy(),
                                   want[(labels == "ctrl") & (cells == c)].mean(0), atol=1e-5)
    assert not np.allclose(ds.refs[("A", "K562")].ctrl_mean, ds.refs[("A", "RPE1")].ctrl_mean)
    assert load(write_ad(tmp_path / "cov.h5ad", X, {"condition": labels, "cell_line": cells}),
                covariate_key="none").covariates == ["all"]


def test_dose_numeric_used_constant_ignored(tmp_path):
    rng = np.random.default_rng(6)
    labels = np.array(["DMSO"] * 20 + ["D"] * 24 + ["E"] * 12, dtype=object)
    dose = np.r_[np.zeros(20), np.full(12, 10.0), np.full(12, 100.0), np.full(12, 10.0)]
    X = rng.poisson(3.0, (56, 8)).astype(np.float32)
    ds = load(write_ad(tmp_path / "dose.h5ad", X, {"treatment": labels, "dose": dose}))
    assert ds.meta["dose_key"] == "dose" and ds.meta["pert_key"] == "treatment"
    assert sorted(k[0] for k in ds.keys) == ["D@10", "D@100", "E@10"]
    assert ds.components == ["D", "E"]
    tab = ds.key_table([("D@10", "all"), ("D@100", "all")])
    np.testing.assert_allclose(tab["dose"][:, 0].numpy(), [0.0, 1.0], rtol=1e-6)   # 1 + log10(d / 100) / 1 decade
    assert tab["comps"][:, 0].tolist() == [1, 1]
    # a constant dose stored as strings (like the real file's '1') is not a dose
    ds = load(write_ad(tmp_path / "dose1.h5ad", X, {"treatment": labels,
                                                     "dose": np.full(56, "1", dtype=object)}))
    assert ds.meta["dose_key"] is None and sorted(k[0] for k in ds.keys) == ["D", "E"]
    # categorical strings in a dose column are an error (issue 10), unless it is switched off
    path = write_ad(tmp_path / "dose2.h5ad", X, {"treatment": labels, "dose": np.where(dose > 50, "hi", "lo").astype(object)})
    with pytest.raises(UserError, match="'treatment'/'dose'.*not a number"):
        load(path)
    assert load(path, dose_key="none").meta["dose_key"] is None


def test_underscore_combinations(tmp_path):
    rng = np.random.default_rng(7)
    labels = np.array(["ctrl"] * 20 + ["A"] * 12 + ["B"] * 12 + ["A_B"] * 12 + ["B_A"] * 12, dtype=object)
    X = rng.poisson(3.0, (len(labels), 6)).astype(np.float32)
    ds = load(write_ad(tmp_path / "us.h5ad", X, {"perturbation": labels}))
    assert ds.meta["sep"] == "_"
    assert [k[0] for k in ds.keys] == ["A", "A+B", "B"]
    assert len(ds.cell_idx[("A+B", "all")]) == 24                            # A_B == B_A
    # a gene called HLA_X is a single, not a combination
    labels = np.array(["ctrl"] * 20 + ["HLA_X"] * 12 + ["B"] * 12, dtype=object)
    ds = load(write_ad(tmp_path / "us2.h5ad", X[:44], {"perturbation": labels}), split="random")
    assert [k[0] for k in ds.keys] == ["B", "HLA_X"]


# ----------------------------------------------------------------------------- splits
def test_split_deterministic_disjoint_covering(sim_ds):
    keys = sim_ds.keys
    a, b = make_split(keys, "additive", seed=0), make_split(keys, "additive", seed=0)
    assert a == b and a == sim_ds.split
    assert make_split(keys, "additive", seed=1) != a
    assert make_split(keys, "random", seed=0) == make_split(keys, "random", seed=0)
    assert make_split(keys, "random", seed=0) != make_split(keys, "random", seed=3)
    for s in [a, make_split(keys, "random", seed=0)]:
        parts = [set(s[n]) for n in ("train", "val", "test")]
        assert all(len(p) == len(s[n]) for p, n in zip(parts, ("train", "val", "test")))
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
        assert parts[0] | parts[1] | parts[2] == set(keys)
        assert s["test"] and s["val"]


def test_split_additive(sim_ds):
    s = sim_ds.split
    train = set(s["train"])
    singles = [k for k in sim_ds.keys if "+" not in k[0]]
    assert singles and all(k in train for k in singles)
    for k in s["test"] + s["val"]:
        comps = k[0].split("+")
        assert len(comps) == 2 and all((c, k[1]) in train for c in comps)
    n_combo = len(sim_ds.keys) - len(singles)
    assert len(s["test"]) == round(0.25 * n_combo)


def test_split_random_keeps_every_condition_somewhere():
    keys = [(f"P{i}", c) for i in range(9) for c in ["A172", "T98G", "U87MG"]]
    for seed in range(5):
        s = make_split(keys, "random", seed=seed)
        train = set(s["train"])
        held = s["test"] + s["val"]
        assert s["test"] and s["val"]
        for l, c in held:
            assert any((l, c2) in train for c2 in ["A172", "T98G", "U87MG"] if c2 != c), (l, c)
        for cov in ["A172", "T98G", "U87MG"]:                                  # a fraction per covariate
            assert any(k[1] == cov for k in s["test"])


def test_split_explicit():
    keys = [(l, c) for l in ["A", "B", "C", "D", "A+B", "C+D", "A+C", "B+D"] for c in ["x", "y"]]
    s = make_split(keys, test="B+A, D+C")
    assert s["test"] == [("A+B", "x"), ("A+B", "y"), ("C+D", "x"), ("C+D", "y")]
    s = make_split(keys, "additive", test="A+B:y")                          # --test wins over the mode
    assert s["test"] == [("A+B", "y")] and ("A+B", "x") not in s["test"]
    assert set(s["train"]) | set(s["val"]) | set(s["test"]) == set(keys)
    with pytest.raises(UserError, match="'E\\+F' not found"):
        make_split(keys, test="A+B,E+F")
    with pytest.raises(UserError, match="--test"):
        make_split(keys, "explicit")
    with pytest.raises(UserError, match="--split random"):
        make_split([("A", "x"), ("B", "x"), ("C", "x")], "additive")


def test_split_explicit_through_load(sim_path):
    h = data.read_h5ad(sim_path)
    combos = sorted({c for c in h.obs["condition"] if "ctrl" not in c})[:2]
    ds = load(sim_path, test=",".join(combos))
    assert [k[0] for k in ds.split["test"]] == combos
    with pytest.raises(UserError, match="not found"):
        load(sim_path, test="NOPE1+NOPE2")


# ----------------------------------------------------------------------------- references
def test_reference_statistics_numpy(sim_ds):
    ds = sim_ds
    for key in [ds.split["test"][0], ds.keys[0]]:
        r = ds.refs[key]
        xc = ds.X[ds.ctrl_idx[key[1]]].astype(np.float64)                   # (Nc, G)
        xp = ds.X[ds.cell_idx[key]].astype(np.float64)                      # (Np, G)
        mc, sc = xc.mean(0), xc.std(0, ddof=1)
        mp, vp = xp.mean(0), xp.var(0, ddof=1)
        t = (mp - mc) / np.sqrt(vp / len(xp) + np.maximum(sc, 0.1) ** 2 / len(xc))   # floored control std
        t6 = (mp - mc) / np.sqrt(vp / len(xp) + np.maximum(sc, 0.6) ** 2 / len(xc))
        np.testing.assert_allclose(r.ctrl_mean.numpy(), mc, atol=1e-5)
        np.testing.assert_allclose(r.ctrl_std.numpy(), np.maximum(sc, 0.1), atol=1e-5)
        r2 = data.reference(xp.astype(np.float32), ds.ctrl_idx[key[1]], mc, sc, 50, 0.6)
        np.testing.assert_allclose(r2.ctrl_std.numpy(), np.maximum(sc, 0.6), atol=1e-6)
        assert (sc < 0.6).any() and (sc > 0.6).any()                          # the floor binds somewhere
        np.testing.assert_allclose(r2.t.numpy(), t6, rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(r.mean.numpy(), mp, atol=1e-5)
        np.testing.assert_allclose(r.delta.numpy(), mp - mc, atol=1e-5)
        ok = np.abs(t) < 1e3                                                 # genes off in both groups aside
        np.testing.assert_allclose(r.t.numpy()[ok], t[ok], rtol=1e-3, atol=1e-3)
        de = np.argsort(-np.abs(t), kind="stable")[:50]
        assert len(r.de_idx) == 50 and set(r.de_idx.tolist()) == set(de.tolist())
        assert np.all(np.diff(np.abs(r.t.numpy()[r.de_idx.numpy()])) <= 1e-6)   # descending |t|
        np.testing.assert_array_equal(r.dense_cells().numpy(), ds.X[ds.cell_idx[key]])
        assert r.X.layout == torch.sparse_csr and np.shares_memory(r.X.values().numpy(), ds.X.csr.data)  # a view
        assert r.dense_cells().dtype == r.mean.dtype == r.t.dtype and r.de_idx.dtype.is_floating_point is False


def test_n_de_option(sim_path):
    ds = load(sim_path, n_de=7)
    assert all(len(r.de_idx) == 7 for r in ds.refs.values())


def test_key_table_prior(sim_ds):
    ds = sim_ds
    key = ds.split["test"][0]
    a, b = key[0].split("+")
    tab = ds.key_table([key, (a, key[1])])
    want = ds.refs[(a, key[1])].delta + ds.refs[(b, key[1])].delta
    np.testing.assert_allclose(tab["prior"][0].numpy(), want.numpy(), atol=1e-6)
    np.testing.assert_allclose(ds.additive_delta(key), want.numpy(), atol=1e-6)
    assert tab["comps"][0].tolist() == [ds.components.index(a) + 1, ds.components.index(b) + 1]
    assert tab["comps"][1].tolist() == [ds.components.index(a) + 1, 0]       # padding
    assert tab["dose"].tolist() == [[1.0, 1.0], [1.0, 0.0]]                  # no dose: 1, padding: 0
    assert tab["cov"].tolist() == [0, 0] and tab["prior"].shape == (2, len(ds.genes))
    # an unseen component contributes zero
    np.testing.assert_allclose(ds.additive_delta((f"{a}+UNSEEN", key[1])), ds.refs[(a, key[1])].delta.numpy())
    np.testing.assert_array_equal(ds.additive_delta(("UNSEEN", key[1])), 0.0)


def test_key_table_cross_covariate_fallback(tmp_path):
    p = tmp_path / "sim2.h5ad"
    data.write_h5ad(p, data.simulate(n_cells=2000, n_genes=200, n_singles=6, n_combos=4, n_covariates=2))
    ds = load(p)
    assert ds.covariates == ["line0", "line1"]
    combo = next(k for k in ds.keys if "+" in k[0] and k[1] == "line0")
    a, b = combo[0].split("+")
    assert (a, "line1") in ds.keys
    ds.split = {"train": [k for k in ds.keys if k != (a, "line0") and k != combo],
                "val": [], "test": [(a, "line0"), combo]}                    # a unseen in line0 only
    want = ds.refs[(a, "line1")].delta + ds.refs[(b, "line0")].delta
    np.testing.assert_allclose(ds.key_table([combo])["prior"][0].numpy(), want.numpy(), atol=1e-6)
    assert not np.allclose(ds.refs[(a, "line1")].delta, ds.refs[(a, "line0")].delta)


# ----------------------------------------------------------------------------- simulator
def test_simulator_deterministic():
    a = data.simulate(n_cells=600, n_genes=150, n_singles=5, n_combos=3, seed=4)
    b = data.simulate(n_cells=600, n_genes=150, n_singles=5, n_combos=3, seed=4)
    c = data.simulate(n_cells=600, n_genes=150, n_singles=5, n_combos=3, seed=5)
    assert (a.X != b.X).nnz == 0 and list(a.obs["condition"]) == list(b.obs["condition"])
    np.testing.assert_array_equal(a.uns["truth"]["effects"], b.uns["truth"]["effects"])
    assert (a.X != c.X).nnz > 0
    assert a.X.dtype == np.float32 and np.all(a.X.data == np.round(a.X.data))  # raw counts
    labs = set(a.obs["condition"])
    assert "ctrl" in labs and all(l == "ctrl" or "+" in l for l in labs)     # GEARS style


@pytest.mark.parametrize("mode,sign", [("a", 1), ("i", -1)])
def test_simulator_effects_direction(tmp_path, mode, sign):
    h = data.simulate(n_cells=1500, n_genes=300, n_singles=8, n_combos=4, seed=1, mode=mode)
    data.write_h5ad(tmp_path / "s.h5ad", h)
    ds = load(tmp_path / "s.h5ad")
    tr = h.uns["truth"]
    gi = {g: i for i, g in enumerate(ds.genes)}
    for name, e in zip(tr["conditions"], tr["effects"]):
        if not name.endswith("+ctrl"):
            continue
        a = name.split("+")[0]
        d = ds.refs[(a, "all")].delta.numpy()
        assert sign * d[gi[a]] > 0.5, (name, d[gi[a]])                       # own gene, right direction
        big = np.abs(e) > 0.4
        big[gi[a]] = False
        assert np.mean(np.sign(d[big]) == np.sign(e[big])) > 0.8            # footprint follows weights


def test_simulator_combinations_additive_without_interaction(sim_path, sim_ds):
    tr = data.read_h5ad(sim_path).uns["truth"]
    E = dict(zip(tr["conditions"], tr["effects"]))
    kinds = dict(zip(tr["conditions"], tr["interaction"]))
    none = [c for c, k in kinds.items() if k == "none"]
    inter = [c for c, k in kinds.items() if k not in ("none", "single")]
    assert none and inter                                                    # both kinds are drawn
    for c in none:
        a, b = c.split("+")
        np.testing.assert_allclose(E[c], E[f"{a}+ctrl"] + E[f"{b}+ctrl"], atol=1e-6)
        obs = sim_ds.refs[(c, "all")].delta.numpy()
        add = sim_ds.refs[(a, "all")].delta.numpy() + sim_ds.refs[(b, "all")].delta.numpy()
        hit = np.abs(E[c]) > 0.3
        assert np.corrcoef(obs[hit], add[hit])[0, 1] > 0.9, c
    for c in inter:                                                          # interactions are not additive
        a, b = c.split("+")
        assert np.abs(E[c] - E[f"{a}+ctrl"] - E[f"{b}+ctrl"]).max() > 0.1


def test_simulator_default_size(default_sim):
    """The defaults: 6000 cells x 1000 genes of raw counts (sparse), int(0.15 x 6000) = 900 controls, 40 singles
    (GEARS 'A+ctrl') and 30 pairs sharing the other cells evenly (5100 / 70: 72 or 73 each)."""
    h = default_sim
    assert h.X.shape == (6000, 1000) and sp.issparse(h.X) and np.array_equal(h.X.data, np.round(h.X.data))
    labels, counts = np.unique(h.obs["condition"].astype(str), return_counts=True)
    n = dict(zip(labels, counts))
    assert n.pop("ctrl") == 900
    assert sum(l.endswith("+ctrl") for l in n) == 40 and sum(not l.endswith("+ctrl") for l in n) == 30
    assert set(n.values()) == {72, 73}


# ----------------------------------------------------------------------------- errors
def test_file_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load(tmp_path / "missing.h5ad")
    (tmp_path / "text.h5ad").write_text("hello")
    with pytest.raises(UserError, match="not an HDF5"):
        load(tmp_path / "text.h5ad")
    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(UserError, match="not an h5ad.*obs/var"):
        load(tmp_path / "plain.h5")
    rng = np.random.default_rng(8)
    labels, X = _three_groups(rng)
    p = write_ad(tmp_path / "nox.h5ad", sp.csr_matrix(X), {"condition": labels})
    q = write_ad(tmp_path / "enc.h5ad", sp.csr_matrix(X), {"condition": labels})
    with h5py.File(p, "a") as f:
        del f["X"]
    with pytest.raises(UserError, match="no X"):
        load(p)
    with h5py.File(q, "a") as f:
        f["X"].attrs["encoding-type"] = "weird_matrix"
    with pytest.raises(UserError, match="weird_matrix"):
        load(q)


def test_obs_errors(tmp_path):
    rng = np.random.default_rng(9)
    labels, X = _three_groups(rng)
    p = write_ad(tmp_path / "o.h5ad", X, {"guide": labels, "batch": np.zeros(len(labels))})
    with pytest.raises(UserError, match=r"no perturbation column.*\['guide', 'batch'\].*--pert-key"):
        load(p)
    with pytest.raises(UserError, match=r"'cond' not in obs.*\['guide', 'batch'\]"):
        load(p, pert_key="cond")
    assert load(p, pert_key="guide").meta["pert_key"] == "guide"
    nc = np.where(labels == "ctrl", "G0", labels).astype(object)
    q = write_ad(tmp_path / "nc.h5ad", X, {"condition": nc})
    with pytest.raises(UserError, match=r"no control label.*most frequent labels: \['G0'"):
        load(q)
    with pytest.raises(UserError, match="'NT' not found.*G0"):
        load(q, control="NT")
    # a covariate with no control cells
    cells = np.where(labels == "G1", "U87", "A172").astype(object)
    r = write_ad(tmp_path / "cv.h5ad", X, {"condition": labels, "cell_type": cells})
    with pytest.raises(UserError, match="cell_type='U87' has no control"):
        load(r)


@pytest.mark.parametrize("fmt", ["dense", "csr", "csc"])
@pytest.mark.parametrize("bad,word", [(np.nan, "NaN"), (np.inf, "Inf"), (-1.0, "negative")])
def test_bad_values(tmp_path, fmt, bad, word):
    rng = np.random.default_rng(10)
    labels, X = _three_groups(rng)
    X = X + 1                                                                # no explicit zeros
    X[7, 4] = X[9, 2] = bad
    M = {"dense": X, "csr": sp.csr_matrix(X), "csc": sp.csc_matrix(X)}[fmt]
    p = write_ad(tmp_path / "bad.h5ad", M, {"condition": labels})
    with pytest.raises(UserError, match=f"2 {word} value.*first at cell (7|9), gene (4|2)") as e:
        load(p)
    import re
    loc = tuple(map(int, re.search(r"cell (\d+), gene (\d+)", str(e.value)).groups()))
    assert loc == ((9, 2) if fmt == "csc" else (7, 4))                      # first in storage order


def test_min_cells_dropped_with_warning(tmp_path):
    rng = np.random.default_rng(11)
    labels = np.array(["ctrl"] * 20 + ["A"] * 12 + ["RARE"] * 3 + ["B"] * 11, dtype=object)
    X = rng.poisson(3.0, (len(labels), 6)).astype(np.float32)
    p = write_ad(tmp_path / "mc.h5ad", X, {"condition": labels})
    with pytest.warns(UserWarning, match="RARE"):
        ds = load_dataset(DataConfig(data=p, n_genes=0))
    assert [k[0] for k in ds.keys] == ["A", "B"] and "RARE" not in set(ds.label)
    assert ds.X.shape[0] == 43
    with pytest.warns(UserWarning, match="'A|all \\(12\\)'|B"):
        ds = load_dataset(DataConfig(data=p, n_genes=0, min_cells=12))
    assert [k[0] for k in ds.keys] == ["A"]


def test_checkpoint_genes(sim_path, sim_ds):
    genes = sim_ds.genes[::3]
    ds = load_dataset(DataConfig(data=sim_path), genes=genes, split=sim_ds.split)
    assert ds.genes == genes and ds.split == sim_ds.split
    np.testing.assert_allclose(ds.X, sim_ds.X[:, ::3])
    with pytest.raises(UserError, match="2 of the checkpoint's.*not in the data.*NOTAGENE"):
        load_dataset(DataConfig(data=sim_path), genes=genes + ["NOTAGENE", "NOTAGENE2"])


def test_cli_summary_and_error_exit(tmp_path, default_sim):
    """`python data.py` prints the summary of the built-in benchmark; a bad --data exits 2 with one line."""
    cache = tmp_path / "cache"
    cache.mkdir()
    data.write_h5ad(cache / "simulated_v1_seed0.h5ad", default_sim)       # pre-seed the built-in cache
    env = dict(os.environ, PERTURBCELLRL_CACHE=str(cache))
    run = lambda *a: subprocess.Popen([sys.executable, str(ROOT / "data.py"), *a], env=env, cwd=tmp_path,  # noqa: E731
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ok, bad = run(), run("--data", str(tmp_path / "missing.h5ad"))        # both at once: torch import
    (out, err), (bout, berr) = ok.communicate(timeout=120), bad.communicate(timeout=120)
    assert ok.returncode == 0, err
    assert "6000 cells x 1000 genes" in out and "raw counts" in out
    # the counts derived from the labels and the additive split's rule (make_split): test = round(test_frac x the
    # pairs whose singles are both in the data), validation = round(val_frac / (1 - test_frac) x the pairs left)
    labels = set(default_sim.obs["condition"].astype(str)) - {"ctrl"}
    singles = {l.split("+")[0] for l in labels if l.endswith("+ctrl")}
    pairs = [l for l in labels if not l.endswith("+ctrl")]
    ready = [l for l in pairs if set(l.split("+")) <= singles]
    cfg = DataConfig()
    n_test = round(cfg.test_frac * len(ready))
    n_val = round(cfg.val_frac / (1 - cfg.test_frac) * (len(ready) - n_test))
    assert f"{len(labels)} (condition, covariate) pairs: {len(singles)} singles, {len(pairs)} combinations" in out
    assert f"split       train={len(labels) - n_test - n_val}  val={n_val}  test={n_test}" in out
    assert os.listdir(cache) == ["simulated_v1_seed0.h5ad"]                 # the cache was used
    assert bad.returncode == 2 and bout == ""
    lines = berr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "not found" in lines[0]
    assert "Traceback" not in berr


# ----------------------------------------------------------------------------- real file
@pytest.mark.skipif(not REAL.exists(), reason="shared real file not present")
def test_real_file():
    ds = load(REAL, n_genes=2000)
    m = ds.meta
    assert (m["pert_key"], m["control"], m["cov_key"], m["dose_key"]) == ("condition", "control", "cell_type", None)
    assert not m["counts"] and len(ds.genes) == 500
    assert len(ds.keys) == 27 and ds.covariates == ["A172", "T98G", "U87MG"]
    assert all(len(ds.ctrl_idx[c]) == 100 for c in ds.covariates)
    assert len(ds.components) == 9 and not any("+" in k[0] for k in ds.keys)
    train = set(ds.split["train"])
    held = ds.split["test"] + ds.split["val"]
    assert ds.split["test"] and held
    for l, c in held:                                                        # seen in another cell line
        assert any((l, c2) in train for c2 in ds.covariates if c2 != c), (l, c)


# ----------------------------------------------------------------------------- the prior and its trust
def test_prior_never_contains_the_key_itself_and_its_kind(sim_ds):
    ds = sim_ds
    single = next(k for k in ds.split["train"] if "+" not in k[0])
    combo = next(k for k in ds.split["train"] if "+" in k[0])
    np.testing.assert_array_equal(ds.additive_delta(single), 0.0)            # one covariate: no other source
    a, b = combo[0].split("+")
    want = ds.refs[(a, combo[1])].delta + ds.refs[(b, combo[1])].delta
    np.testing.assert_allclose(ds.additive_delta(combo), want.numpy(), atol=1e-6)
    assert ds.prior_kind(combo) == "additive" and ds.prior_kind(single) == "none"
    assert data.prior_kind(("A", "x"), [("A", "y")]) == "transfer"
    assert data.prior_kind(("A+B", "x"), [("A", "x"), ("B", "y")]) == "transfer"
    assert data.prior_kind(("A+B", "x"), [("A", "x"), ("B", "x")]) == "additive"
    assert data.prior_kind(("A+B", "x"), [("A", "x")]) == "none"


def test_prior_trust_matches_the_size_of_informative_priors(sim_ds):
    """rho = sum <d, p> / sqrt(sum |d|^2 sum |p|^2) over the training keys of a kind, c = min(1, sqrt(sum |d|^2 /
    sum |p|^2)) when rho >= min_corr, else 0; computed here from the references by hand. The table's shift is
    c * prior."""
    ds = sim_ds
    train = ds.split["train"]
    combos = [k for k in train if "+" in k[0] and all((p, k[1]) in train for p in k[0].split("+"))]
    P = np.stack([sum(ds.refs[(p, k[1])].delta.numpy().astype(np.float64) for p in k[0].split("+")) for k in combos])
    D = np.stack([ds.refs[k].delta.numpy() for k in combos])
    rho, c = (P * D).sum() / np.sqrt((P * P).sum() * (D * D).sum()), min(1.0, np.sqrt((D * D).sum() / (P * P).sum()))
    trust = ds.prior_trust()
    assert rho > 0.2 and 0 < c < 1 and abs(trust["additive"] - c) < 1e-6
    assert trust["none"] == 0.0 and trust["transfer"] == 0.0                   # one covariate: no transfer keys
    assert ds.prior_trust(min_corr=rho + 0.01)["additive"] == 0.0             # an uninformative prior is not used
    tab = ds.key_table(ds.split["test"])
    torch.testing.assert_close(tab["start"], c * tab["prior"])                # a trusted prior: the start
    # a single (no prior of its own in one covariate): the training-mean delta without itself, if trusted
    single = next(k for k in train if "+" not in k[0])
    mean = np.mean([ds.refs[k].delta.numpy() for k in train if k != single], axis=0)
    assert trust["mean"] > 0
    np.testing.assert_allclose(ds.key_table([single])["start"][0].numpy(), trust["mean"] * mean, atol=1e-6)


def test_a_prior_kind_no_training_key_has_gets_the_plain_prior(sim_path):
    """Every combination held out: no training key is 'additive', so its trust cannot be fitted; the rule gives
    c = 1 (the plain sum), not 0, and says so through untrained_kinds; fitted kinds are unchanged."""
    ds = data.load_dataset(data.DataConfig(data=sim_path, n_genes=0, split="additive", test_frac=0.85,
                                           val_frac=0.15))
    assert not any("+" in k[0] for k in ds.split["train"]) and ds.untrained_kinds() == {"additive"}
    trust = ds.prior_trust()
    assert trust["additive"] == 1.0 and trust["none"] == 0.0
    k = ds.split["test"][0]
    np.testing.assert_allclose(ds.start(k), sum(ds.component_deltas(k)), atol=1e-6)
    default = data.load_dataset(data.DataConfig(data=sim_path, n_genes=0))    # combinations in training: fitted
    assert default.untrained_kinds() == set() and 0 < default.prior_trust()["additive"] < 1


def test_cross_fitted_own_priors_never_contain_the_cells_they_train(sim_path):
    """fold_deltas: the prior of fold f is the mean delta of fold f's cells only, so changing the cells of the other
    fold (the ones trained with it) leaves it unchanged, and the two folds split the key's cells in halves."""
    ds = data.load_dataset(data.DataConfig(data=sim_path, n_genes=0))
    key = next(k for k in ds.split["train"] if "+" not in k[0])
    fold, deltas = ds.fold_deltas(key, seed=3)
    rows = ds.cell_idx[key]
    assert abs(int(fold.sum()) - len(rows) / 2) <= 0.5 and np.array_equal(fold, ds.fold_deltas(key, seed=3)[0])
    X = np.asarray(ds.X)
    for f in (0, 1):
        np.testing.assert_allclose(deltas[f], X[rows[fold == f]].mean(0) - ds.refs[key].ctrl_mean.numpy(), atol=1e-5)
    csr = ds.X.csr.tolil()
    csr[rows[fold == 1]] = 7.0                                                # new cells in fold 1
    ds.X = data.SparseRows(csr.tocsr())
    changed = ds.fold_deltas(key, seed=3)[1]
    np.testing.assert_array_equal(changed[0], deltas[0])                      # fold 0's prior: unchanged
    assert not np.allclose(changed[1], deltas[1])


def test_validation_conditions_look_like_the_test():
    """--test doubles whose singles are seen: validation doubles must have their singles in training too (not the
    doubles without singles, whose prior is zero); when there are none, a warning and the old pool."""
    keys = [(l, "x") for l in ["A", "B", "C", "D", "E", "A+B", "C+D", "A+E", "F+G", "H+I", "J+K", "L+M"]]
    for seed in range(5):
        s = make_split(keys, test="A+B", val_frac=0.5, seed=seed)
        assert s["val"] and all(v[0] in ("C+D", "A+E") for v in s["val"]), s
    with pytest.warns(UserWarning, match="no validation condition has a prior like the test's"):
        s = make_split([k for k in keys if k[0] not in ("C+D", "A+E")], test="A+B", val_frac=0.5)
    assert s["val"]


def test_split_seed_not_seed_chooses_the_split(sim_path):
    a, b, c = load(sim_path, seed=0), load(sim_path, seed=5), load(sim_path, split_seed=5)
    assert a.split == b.split and a.split != c.split


def test_auto_split_falls_back_to_random_without_additive_candidates():
    keys = [(l, "x") for l in ["A", "B", "C", "D", "E", "F", "A+Z", "B+Y"]]
    with pytest.warns(UserWarning, match="random split"):
        s = make_split(keys, "auto")
    assert s["test"] and set(s["train"]) | set(s["val"]) | set(s["test"]) == set(keys)


# ----------------------------------------------------------------------------- the summary CLI on awkward data
def test_summary_of_data_that_cannot_be_trained_on(tmp_path, capsys):
    """A GEARS-style file with a few cells per condition and doubles whose singles are missing: the summary
    is printed (exit 0) and the problem follows as a warning."""
    rng = np.random.default_rng(0)
    labels = ["ctrl"] * 30 + ["A+ctrl"] * 3 + ["B+ctrl"] * 4 + ["C+D"] * 3 + ["E+ctrl"] * 5
    X = rng.poisson(2, (len(labels), 20)).astype(np.float32)
    p = write_ad(tmp_path / "few.h5ad", X, {"condition": np.array(labels, dtype=object)})
    data.main(["--data", p, "--n-genes", "0"])
    out, err = capsys.readouterr()
    assert "conditions  4 (condition, covariate) pairs: 3 singles, 1 combinations" in out
    assert "warning: this data cannot be used as it is:" in err and "--min-cells" in err


def test_unknown_x_encoding_is_refused(tmp_path):
    p = tmp_path / "awk.h5ad"
    data.write_h5ad(p, data.simulate(n_cells=300, n_genes=50, n_singles=3, n_combos=1))
    with h5py.File(p, "r+") as f:
        X = f["X"]
        dense = np.zeros((300, 50), np.float32)
        del f["X"]
        f.create_dataset("X", data=dense).attrs["encoding-type"] = "awkward-array"
    with pytest.raises(UserError, match="unsupported encoding-type 'awkward-array'"):
        data.read_h5ad(p)


def test_summary_of_an_anndata07_file_with_target_gene_and_non_targeting(tmp_path, capsys):
    """anndata 0.7 layout written by hand (categorical = codes + `categories` object reference, index '_index' in
    a 0.1.0 dataframe): the summary finds target_gene, the non-targeting control and GEARS-less '_' combinations
    of known genes, and exits normally."""
    rng = np.random.default_rng(0)
    labels = ["non-targeting"] * 40 + ["G1"] * 12 + ["G2"] * 12 + ["G1_G2"] * 12
    cats = np.array(sorted(set(labels)), dtype=object)
    codes = np.searchsorted(cats.astype(str), labels).astype(np.int8)
    X = rng.poisson(2, (len(labels), 30)).astype(np.float32)
    vlen = h5py.string_dtype()
    p = tmp_path / "v07.h5ad"
    with h5py.File(p, "w") as f:
        f["X"] = X
        for name, cols in (("obs", {"target_gene": (codes, cats)}), ("var", {})):
            g = f.create_group(name)
            n = len(labels) if name == "obs" else X.shape[1]
            idx = [f"c{i}" for i in range(n)] if name == "obs" else ["G1", "G2"] + [f"X{j}" for j in range(n - 2)]
            g.attrs.update({"encoding-type": "dataframe", "encoding-version": "0.1.0", "_index": "_index",
                            "column-order": np.array(list(cols), dtype=vlen)})
            g.create_dataset("_index", data=np.array(idx, dtype=object), dtype=vlen)
            for k, (c, cat) in cols.items():
                g.create_group("__categories").create_dataset(k, data=cat, dtype=vlen)
                g[k] = c
                g[k].attrs["categories"] = g[f"__categories/{k}"].ref
        f.create_group("uns")
    data.main(["--data", str(p), "--n-genes", "0"])
    out, err = capsys.readouterr()
    assert "keys        perturbation='target_gene' control='non-targeting'" in out and "separator='_'" in out
    assert "3 (condition, covariate) pairs: 2 singles, 1 combinations" in out and "cannot be used" not in err
    ds = load(p)
    assert sorted(k[0] for k in ds.keys) == ["G1", "G1+G2", "G2"] and ds.is_ctrl.sum() == 40


def test_held_out_keys_the_validation_keys_say_nothing_about_are_unvalidated(sim_ds):
    """Dataset.unvalidated: a held-out combination whose singles are seen is unvalidated when no validation key has
    its prior kind (so the network's change is not applied to it: flow.calibrate), validated once one has; a novel
    key (no component trained) always is; training keys never are."""
    import dataclasses
    train = sim_ds.split["train"]
    singles = [k for k in train if "+" not in k[0]]
    combos = [k for k in sim_ds.split["test"] if sim_ds.prior_kind(k) == "additive"]
    val = [k for k in train if "+" in k[0]][:2]                                   # validation: combinations
    rest = [k for k in train if k not in val]
    only_singles = dataclasses.replace(sim_ds, split={"train": [k for k in rest if k not in singles[:2]],
                                                      "val": singles[:2], "test": combos})
    assert {only_singles.prior_kind(k) for k in only_singles.split["val"]} == {"none"}
    assert combos and all(only_singles.unvalidated(k) for k in combos)
    assert not any(only_singles.unvalidated(k) for k in only_singles.split["train"])
    assert (only_singles.key_table(combos)["evidence"] == 2).all()                  # their residual trust: lam[2]
    assert (only_singles.key_table(only_singles.split["train"])["evidence"] == 0).all()  # trained on: 1
    with_combos = dataclasses.replace(sim_ds, split={"train": rest, "val": val, "test": combos})
    assert not any(with_combos.unvalidated(k) for k in combos) and (with_combos.key_table(combos)["evidence"] == 1).all()
    novel = ("NOTAGENE", combos[0][1])
    assert with_combos.unvalidated(novel) and with_combos.novel(novel)


def test_a_training_step_sees_the_prior_of_the_other_fold(sim_path):
    """data.training_rows with every combination held out: a training single's cell of fold f is paired with the
    table row whose prior is the mean change of fold 1 - f only (recomputed here from the cells), never of its own
    fold; that row's start is c x prior with c = 1 (the untrained kind's plain prior) and its condition the single's."""
    ds = data.load_dataset(data.DataConfig(data=sim_path, n_genes=0, split="additive", test_frac=0.85, val_frac=0.15))
    keys = ds.split["train"]
    table, cells = data.training_rows(ds, keys, self_prior=0.5, seed=4)
    X, k = np.asarray(ds.X), keys[0]
    fold, _ = ds.fold_deltas(k, 4)
    rows = ds.cell_idx[k]
    at = {r: i for i, r in enumerate(cells["row"])}
    for f in (0, 1):
        other = X[rows[fold == 1 - f]].mean(0) - ds.refs[k].ctrl_mean.numpy()
        own_rows = {int(cells["own"][at[r]]) for r in rows[fold == f]}
        assert len(own_rows) == 1
        j = own_rows.pop()
        np.testing.assert_allclose(table["prior"][j].numpy(), other, atol=1e-5)
        np.testing.assert_allclose(table["start"][j].numpy(), other, atol=1e-5)     # c = 1
        assert torch.equal(table["comps"][j], table["comps"][keys.index(k)]) and table["cov"][j] == table["cov"][0]
