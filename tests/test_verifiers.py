"""Tests for verifiers.py: each verifier against an independent numpy / scipy computation,
closed-form identities, invariances, gene-set loading and alignment, and discrimination on the
simulator's ground truth."""
import argparse
import dataclasses
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import verifiers as V  # noqa: E402
from data import UserError, Reference  # noqa: E402

HALLMARK = V.GENE_SETS["hallmark"]                                   # bundled in pathways/


def make_reference(ctrl, cells, n_de, std_floor=0.1):
    """Reference from numpy control cells (M, G) and perturbed cells (N, G), computed here in numpy."""
    mu_c, mu_p = ctrl.mean(0), cells.mean(0)
    vc, vp = ctrl.var(0, ddof=1), cells.var(0, ddof=1)
    t = (mu_p - mu_c) / np.sqrt(vc / len(ctrl) + vp / len(cells) + 1e-12)
    de = np.argsort(-np.abs(t), kind="stable")[:n_de]
    f = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
    return Reference(f(mu_c), f(np.maximum(ctrl.std(0, ddof=1), std_floor)), f(mu_p), f(mu_p - mu_c), f(t),
                     torch.as_tensor(de, dtype=torch.long), f(cells))


def int_ref(seed=0, G=40, N=30, n_de=12):
    """A small Reference whose values are integers (ties in deltas and in t), plus generated cells x."""
    rng = np.random.default_rng(seed)
    ctrl_mean = rng.integers(0, 4, G).astype(np.float64)
    cells = ctrl_mean + rng.integers(-2, 3, (N, G))
    t = rng.integers(-3, 4, G).astype(np.float64)  # many ties
    de = rng.permutation(G)[:n_de]
    f = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    ref = Reference(f(ctrl_mean), f(rng.uniform(0, 1, G)), f(cells.mean(0)), f(cells.mean(0) - ctrl_mean),
                    f(t), torch.as_tensor(de), f(cells))
    x = ctrl_mean + rng.integers(-2, 3, (8, G))
    return ref, f(x)


def np_deltas(x, ref):
    de, c = ref.de_idx.numpy(), ref.ctrl_mean.numpy().astype(np.float64)
    return x.numpy().astype(np.float64)[:, de] - c[de], ref.dense_cells().numpy().astype(np.float64)[:, de] - c[de]


# ------------------------------------------------------------------ each verifier vs numpy / scipy

def topk_mean(r, k, largest=True):
    """Mean of the k largest (smallest) entries of each row, numpy."""
    r = np.sort(r, axis=1)
    return (r[:, ::-1] if largest else r)[:, :min(k, r.shape[1])].mean(1)


@pytest.mark.parametrize("k", [1, 5, 1000])
def test_pearson_topk_matches_numpy(k):
    ref, x = int_ref()
    xd, yd = np_deltas(x, ref)
    d = ref.delta.numpy()[ref.de_idx.numpy()]
    r = np.array([[np.corrcoef(a, b)[0, 1] for b in yd] for a in xd])  # (B, N)
    r0 = np.array([[np.corrcoef(a, b - d)[0, 1] for b in yd] for a in xd])  # the counterfactual controls
    np.testing.assert_allclose(V.pearson_topk(x, ref, k).numpy(), topk_mean(r, k) - topk_mean(r0, k), atol=1e-5)


def test_pearson_zero_variance_row_is_zero():
    ref, x = int_ref()
    x[0] = ref.ctrl_mean  # delta exactly 0 on every gene
    x[1] = ref.ctrl_mean + 2.5  # constant delta
    out = V.pearson_topk(x, ref, 3)
    assert torch.isfinite(out).all() and out[0] == 0 and out[1] == 0


@pytest.mark.parametrize("k", [1, 5])
def test_rmse_topk_matches_numpy(k):
    ref, x = int_ref(1)
    xd, yd = np_deltas(x, ref)
    d = ref.delta.numpy()[ref.de_idx.numpy()]
    dk = lambda y: topk_mean(np.sqrt(((xd[:, None] - y[None]) ** 2).mean(-1)), k, largest=False)  # noqa: E731
    want = np.minimum(dk(yd - d), dk(yd + d)) - dk(yd)
    np.testing.assert_allclose(V.rmse_topk(x, ref, k).numpy(), want, rtol=1e-4, atol=1e-5)
    # triangle inequality: |reward| <= ||d|| / sqrt(D), for any cell, near or far
    far = torch.cat([x, 50 * x])
    assert (V.rmse_topk(far, ref, k).abs() <= np.linalg.norm(d) / len(d) ** 0.5 + 1e-5).all()


def test_de_spearman_matches_scipy_with_ties():
    ref, x = int_ref(2)
    xd, _ = np_deltas(x, ref)
    t = ref.t.numpy()[ref.de_idx.numpy()]
    assert len(np.unique(t)) < len(t) and all(len(np.unique(r)) < len(r) for r in xd)  # ties present
    want = [scipy.stats.spearmanr(a, t).statistic for a in xd]
    np.testing.assert_allclose(V.de_spearman(x, ref).numpy(), want, atol=1e-5)
    x[0] = ref.ctrl_mean + 1.0  # constant delta -> 0
    assert V.de_spearman(x, ref)[0] == 0


def test_pathway_activity_matches_numpy():
    ref, x = int_ref(3)
    rng = np.random.default_rng(3)
    W = rng.normal(size=(6, x.shape[1])) * (rng.random((6, x.shape[1])) < 0.4)  # sparse signed
    sd = ref.ctrl_std.numpy().copy()
    sd[:5] = 0.0  # below the defensive floor
    ref.ctrl_std = torch.as_tensor(sd)
    mu, sdf = ref.ctrl_mean.numpy(), np.maximum(sd, 1e-2)
    Wn = W / np.linalg.norm(W, axis=1, keepdims=True)
    ax = ((x.numpy() - mu) / sdf) @ Wn.T
    ay = ((ref.dense_cells().numpy() - mu) / sdf) @ Wn.T
    m, s2 = ay.mean(0), ay.var(0, ddof=1).mean()
    # isotropic Gaussian log-likelihood ratio, condition N(m, s2 I) against control N(0, s2 I), by scipy
    llr = lambda a: (scipy.stats.multivariate_normal(m, s2).logpdf(a)  # noqa: E731
                     - scipy.stats.multivariate_normal(np.zeros_like(m), s2).logpdf(a))
    top = np.quantile(llr(ay), 0.9)
    want = np.minimum(llr(ax), 2 * top - llr(ax))
    got = V.pathway_activity(x, ref, torch.as_tensor(W, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # reflected beyond the real cells: moving further along the effect than 90% of them lowers the reward
    y = ref.dense_cells()[:1] + torch.linspace(0, 20, 9)[:, None] * ref.delta
    r = V.pathway_activity(y, ref, torch.as_tensor(W, dtype=torch.float32))  # a tent along the change
    top = int(r.argmax())
    assert 0 < top < 8 and (r[1:top + 1] > r[:top]).all() and (r[top + 1:] < r[top:-1]).all()


def test_energy_witness_matches_loop_and_group_identity():
    ref, x = int_ref(4)
    X, Y = x.numpy().astype(np.float64), ref.dense_cells().numpy().astype(np.float64)
    B, N = len(X), len(Y)
    D = lambda a, b: np.linalg.norm(a[:, None] - b[None], axis=-1)  # noqa: E731
    m_xx = D(X, X).sum() / (B * (B - 1))
    witness = np.zeros(B)
    for i in range(B):
        dxy = np.mean([np.linalg.norm(X[i] - Y[j]) for j in range(N)])
        dxx = np.mean([np.linalg.norm(X[i] - X[k]) for k in range(B) if k != i])
        witness[i] = -(dxy - dxx)
    r = V.energy_witness(x, ref).numpy()
    np.testing.assert_allclose(r, witness - m_xx / 2, rtol=1e-5, atol=1e-4)
    # Energy distance E = 2 m_xy - m_xx - m_yy (U-statistics): mean_i r_i = -(m_xy - m_xx / 2) = -(E + m_yy) / 2.
    m_xy = D(X, Y).mean()
    m_yy = D(Y, Y).sum() / (N * (N - 1))
    E = 2 * m_xy - m_xx - m_yy
    np.testing.assert_allclose(r.mean(), -(E + m_yy) / 2, rtol=1e-5)
    # the group constant is invisible to GRPO: the advantages within the group are the witness's
    z = lambda v: (v - v.mean()) / v.std()  # noqa: E731
    np.testing.assert_allclose(z(r), z(witness), atol=1e-4)
    # B = 1: no within-group term
    np.testing.assert_allclose(V.energy_witness(x[:1], ref).numpy(), -D(X[:1], Y).mean(1), rtol=1e-5)


# ------------------------------------------------------------------ what the rewards pay for

def weak_screen(seed=5, G=60, n=400):
    """Controls (tight, sd 0.5), a condition with a weak effect and a wider spread (sd 1), its held-out cells, and
    the same cells exaggerated: the setting where a reward best at the mode of the real cells pays control cells."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(2, 4, G)
    effect = np.where(np.arange(G) < 20, rng.choice([-0.6, 0.6], G), 0.0)
    ctrl = base + rng.normal(0, 0.5, (n, G))
    pert = base + effect + rng.normal(0, 1.0, (2 * n, G))
    ref = make_reference(ctrl, pert[:n], n_de=20)
    f = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    real, ctrl_new = f(pert[n:]), f(base + rng.normal(0, 0.5, (n, G)))
    return ref, real, ctrl_new, ref.ctrl_mean + 2 * (real - ref.ctrl_mean)


def test_rewards_pay_the_response_not_typicality():
    """A condition's held-out cells beat new control cells that are tighter than them on every reward (the earlier
    distance-based rmse and pathway rewards, best at the mode of the real cells, paid the tight controls more)."""
    ref, real, ctrl, _ = weak_screen()
    W = torch.as_tensor(np.random.default_rng(0).normal(size=(4, real.shape[1])), dtype=torch.float32)
    for name, f in {"pearson": V.pearson_topk, "rmse": V.rmse_topk, "spearman": V.de_spearman,
                    "pathway": lambda x, r: V.pathway_activity(x, r, W), "energy": V.energy_witness}.items():
        assert f(real, ref).mean() > f(ctrl, ref).mean(), name
    # a reward best at the mode fails this test: minus the mean distance to the 5 nearest real cells (DE genes)
    de = ref.de_idx
    old = lambda x: -torch.cdist(x[:, de], ref.dense_cells()[:, de]).topk(5, largest=False).values.mean(1)  # noqa: E731
    assert old(real).mean() < old(ctrl).mean()


def test_exaggerated_effects_are_not_paid_more():
    ref, real, _, big = weak_screen()
    W = torch.as_tensor(np.random.default_rng(0).normal(size=(4, real.shape[1])), dtype=torch.float32)
    for f in (V.rmse_topk, V.energy_witness, lambda x, r: V.pathway_activity(x, r, W)):
        assert f(big, ref).mean() < f(real, ref).mean()
    # Pearson over the DE genes is scale-blind: doubling every delta changes nothing.
    np.testing.assert_allclose(V.pearson_topk(big, ref).numpy(), V.pearson_topk(real, ref).numpy(), atol=1e-5)


# ------------------------------------------------------------------ gene sets

def test_progeny_bundled_tables():
    s100, s500 = V.load_progeny(), V.load_progeny(top=500)
    assert len(s100) == 14 and all(len(g) == 100 for g in s100.values())
    assert len(s500) == 14 and all(len(g) == 500 for g in s500.values())
    assert s100["Androgen"]["TMPRSS2"] == pytest.approx(11.4906307374)
    assert all(set(s100[p]) <= set(s500[p]) for p in s100)
    with pytest.raises(UserError, match="100 or 500"):
        V.load_progeny(top=200)


def test_align_case_missing_and_duplicates(tmp_path):
    p = tmp_path / "sets.csv"
    p.write_text("gene,pathway,weight,p_value\n"
                 "A1,P1,1.5,0\nA2,P1,-2,0\nA1,P1,9,0\na2,P1,7,0\nA3,P1,3,0\nMISSING,P1,4,0\n"
                 "B1,P2,1,0\nB2,P2,1,0\n")
    sets = V.load_gene_sets(p)
    genes = ["x0", "a3", "a1", "A2", "b1", "b2", "a1"]  # lower case, a duplicated symbol
    with pytest.warns(UserWarning, match="P2"):
        W, names, cov = V.align_gene_sets(sets, genes, min_genes=3)
    assert names == ["P1"] and W.shape == (1, len(genes))
    want = torch.tensor([[0, 3, 1.5, -2, 0, 0, 0]])  # first weights kept; duplicate column -> first
    torch.testing.assert_close(W, want)
    assert cov == {"P1": (3, 4), "P2": (2, 2)}
    # a dict built elsewhere may still hold case variants of one gene: first one wins
    W2, _, cov2 = V.align_gene_sets({"P": {"A1": 1.5, "a1": 9.0, "A2": 2.0}}, ["a2", "a1"], min_genes=1)
    torch.testing.assert_close(W2, torch.tensor([[2.0, 1.5]]))
    assert cov2 == {"P": (2, 2)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        V.align_gene_sets(sets, genes, min_genes=2)  # nothing dropped -> no warning
    with pytest.raises(UserError, match="--gene-symbols"):
        V.align_gene_sets(sets, ["ENSG00000141510", "ENSG00000012048"], min_genes=1)


def test_auto_table_choice(capsys):
    s100, s500 = V.load_progeny(), V.load_progeny(top=500)
    in100 = {g for s in s100.values() for g in s}
    genes = sorted({g for s in s500.values() for g in s} - in100)[:3000]
    v = V.Verifier(genes)
    assert "top-500" in capsys.readouterr().out and v.W.shape == (14, len(genes))
    v = V.Verifier([g.lower() for g in sorted(in100)])
    assert "top-100" in capsys.readouterr().out and v.W.shape == (14, len(in100))
    half = sorted({g for p in sorted(s100)[:7] for g in s100[p]})          # top-100 covers 7 of 14 pathways
    V.Verifier(half)
    assert "top-500" in capsys.readouterr().out
    assert V.Verifier(genes, {"rmse": 1}).W is None  # pathway weight 0 -> no table needed


def test_gmt_loader_and_errors(tmp_path):
    p = tmp_path / "small.gmt"
    p.write_text("SET_A\tdesc\tG1\tG2\tG3\tg1\n\nSET_B\thttp://x\tG4\tG5\n")
    sets = V.load_gene_sets(p)
    assert sets == {"SET_A": {"G1": 1.0, "G2": 1.0, "G3": 1.0}, "SET_B": {"G4": 1.0, "G5": 1.0}}
    W, names, _ = V.align_gene_sets(sets, ["g5", "G1", "G2", "G4", "G3"], min_genes=2)
    torch.testing.assert_close(W, torch.tensor([[0, 1, 1, 0, 1], [1, 0, 0, 1, 0.]]))
    bad = tmp_path / "bad.gmt"
    bad.write_text("ONLY_NAME\n")
    with pytest.raises(UserError, match="GMT"):
        V.load_gene_sets(bad)
    with pytest.raises(UserError, match="unknown gene-set file type"):
        V.load_gene_sets(tmp_path / "sets.xlsx")
    with pytest.raises(UserError, match="not found"):
        V.load_gene_sets(tmp_path / "absent.gmt")
    nocol = tmp_path / "nocol.tsv"
    nocol.write_text("symbol\tset\nA\tB\n")
    with pytest.raises(UserError, match="gene,pathway,weight"):
        V.load_gene_sets(nocol)
    nonnum = tmp_path / "nonnum.csv"
    nonnum.write_text("gene,pathway,weight\nA,P,high\n")
    with pytest.raises(UserError, match="line 2"):
        V.load_gene_sets(nonnum)


def test_a_gene_set_file_is_parsed_once_while_unchanged(tmp_path, monkeypatch):
    """rl.py and evaluate.py load --gene-sets early to fail fast and Verifier loads it again: the second load parses
    nothing; a changed file is parsed anew; each caller gets its own copy."""
    p, calls, real = tmp_path / "sets.gmt", [], V.load_gmt
    p.write_text("S\td\tA\tB\tC\n")
    monkeypatch.setattr(V, "load_gmt", lambda path: calls.append(path) or real(path))
    first = V.load_gene_sets(p)
    first["S"]["A"] = 5.0                                               # the caller's copy, not the one kept
    assert V.load_gene_sets(str(p)) == {"S": {"A": 1.0, "B": 1.0, "C": 1.0}} and len(calls) == 1
    p.write_text("S\td\tA\tB\tC\tD\n")                                  # another size: parsed again
    assert V.load_gene_sets(p) == {"S": {"A": 1.0, "B": 1.0, "C": 1.0, "D": 1.0}} and len(calls) == 2


def test_hallmark_gmt():
    sets = V.load_gmt(HALLMARK)
    assert len(sets) == 50 and all(n.startswith("HALLMARK_") for n in sets)
    assert "NFKBIA" in sets["HALLMARK_TNFA_SIGNALING_VIA_NFKB"]


# ------------------------------------------------------------------ invariances, Verifier

def small_gmt(tmp_path, G):
    """Three gene sets over genes g0..g{G-1}, as a GMT file."""
    p = tmp_path / "sets.gmt"
    p.write_text("".join(f"S{s}\tdesc\t" + "\t".join(f"g{i}" for i in range(s, G, 3)) + "\n" for s in range(3)))
    return p


def test_permutation_and_independence(tmp_path):
    ref, x = int_ref(6)
    x = x + torch.rand(x.shape)  # break ties so no verifier relies on order
    v = V.Verifier([f"g{i}" for i in range(x.shape[1])], gene_sets=small_gmt(tmp_path, x.shape[1]))
    assert v.W.shape == (3, x.shape[1])
    perm = torch.randperm(len(x))
    _, c = v(x, ref)
    _, cp = v(x[perm], ref)
    for name in V.REWARDS:
        torch.testing.assert_close(cp[name], c[name][perm], rtol=1e-5, atol=1e-5)
    for name in ("pearson", "rmse", "spearman", "pathway"):  # per-cell rewards ignore the other cells
        _, c1 = v(x[2:3], ref)
        torch.testing.assert_close(c1[name], c[name][2:3], rtol=1e-5, atol=1e-5)


def test_finite_on_constant_cells_and_zero_control_std(tmp_path):
    ref, x = int_ref(7)
    ref.ctrl_std = torch.zeros_like(ref.ctrl_std)
    ref.X[:, :5] = 1.0
    x[:] = 1.0  # every generated cell identical and constant
    weights = {"pearson": 1, "rmse": 0.5, "spearman": 1, "pathway": 2, "energy": 3}
    v = V.Verifier([f"g{i}" for i in range(x.shape[1])], weights, small_gmt(tmp_path, x.shape[1]))
    total, scores = v(x, ref)
    assert torch.isfinite(total).all() and all(torch.isfinite(s).all() for s in scores.values())
    torch.testing.assert_close(total, sum(w * scores[n] for n, w in v.weights.items()))
    assert set(v._W) == {"cpu"}


def test_parse_weights_and_args():
    assert V.parse_weights("pearson=1, rmse=0.5,energy") == {"pearson": 1.0, "rmse": 0.5, "energy": 1.0}
    with pytest.raises(UserError, match="'pearsn'.*pearson, rmse, spearman, pathway, energy"):
        V.parse_weights("pearsn=1")
    with pytest.raises(UserError, match="not a number"):
        V.parse_weights("rmse=abc")
    with pytest.raises(UserError, match="finite"):
        V.parse_weights("rmse=nan")
    with pytest.raises(UserError, match="nonzero"):
        V.parse_weights("rmse=0")
    with pytest.raises(UserError, match="unknown reward"):
        V.Verifier(["a"], {"bogus": 1})
    with pytest.raises(UserError, match=r"expected \(B, 2\)"):
        V.Verifier(["a", "b"], {"rmse": 1})(torch.zeros(3, 5), None)
    p = argparse.ArgumentParser()
    data.add_args(p, V.RewardConfig)
    args = p.parse_args(["--rewards", "rmse=2,energy=1", "--topk", "3"])
    v = V.Verifier(["a", "b"], V.parse_weights(args.rewards), args.gene_sets, args.topk)
    assert v.weights == {"rmse": 2.0, "energy": 1.0} and v.k == 3 and v.W is None


# ------------------------------------------------------------------ discrimination on simulated data

@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    h = data.simulate(n_cells=3000, n_genes=400, n_singles=8, n_combos=2, seed=1)
    path = tmp_path_factory.mktemp("sim") / "sim.h5ad"
    data.write_h5ad(path, h)
    return h.uns["truth"], data.load_dataset(data.DataConfig(data=str(path), n_genes=0))


def test_discrimination_on_simulated_data(sim):
    """Held-out real cells of a condition beat control cells and cells of a perturbation acting on
    another pathway, with the Reference's real cells restricted to the other half of the condition."""
    truth, ds = sim
    X = torch.from_numpy(np.asarray(ds.X))
    v = V.Verifier(ds.genes)  # PROGENy auto: the simulator's genes are PROGENy footprint genes
    paths = list(truth["pathways"])
    singles = [(name.split("+")[0], pw, abs(truth["footprints"][paths.index(pw)] @ e))
               for name, pw, e in zip(truth["conditions"], truth["pathway"], truth["effects"]) if pw]
    strongest = max(singles, key=lambda s: s[2])  # drives its pathway the most
    for a, pw, drive in singles:
        key = (a, ds.covariates[0])
        idx = ds.cell_idx[key]
        ref = dataclasses.replace(ds.refs[key], X=X[idx[: len(idx) // 2]])
        real = X[idx[len(idx) // 2:]]
        other = max((s for s in singles if s[1] != pw), key=lambda s: s[2])[0]
        groups = {"ctrl": X[ds.ctrl_idx[key[1]]][: len(real)],
                  "other": X[ds.cell_idx[(other, key[1])]][: len(real)]}
        _, c_real = v(real, ref)
        names = V.REWARDS if a == strongest[0] else ("pearson", "spearman")  # all five on the strongest
        for g, cells in groups.items():
            _, c = v(cells, ref)
            for n in names:
                assert c_real[n].mean() > c[n].mean(), (a, g, n)


def test_check_ranks_real_cells_first_and_catches_a_flipped_reward(sim, monkeypatch, capsys):
    """verifiers.check (the `python verifiers.py` table): the real rewards rank a condition's held-out real cells
    above control cells and another condition's cells in most conditions; the same reward with its sign flipped
    (a bug a fork could make) wins in almost none, and the CLI prints one row per reward and the sum."""
    _, ds = sim
    monkeypatch.setitem(V.REWARDS, "flipped", lambda x, ref, v: -V.pearson_topk(x, ref, v.k))
    ver = V.Verifier(ds.genes, {"pearson": 1, "spearman": 1, "flipped": 1})
    res = V.check(ds, ver, ds.keys, n_cells=32)
    assert res["pearson"]["wins"] >= 0.8 and res["spearman"]["wins"] >= 0.8, res
    assert res["flipped"]["wins"] <= 0.2 and res["flipped"]["real"] == pytest.approx(-res["pearson"]["real"])
    assert res["pearson"]["real"] > max(res["pearson"]["other"], res["pearson"]["control"])
    V.main(["--data", ds.meta["path"], "--n-genes", "0", "--rewards", "pearson,flipped=0.5", "--check-cells", "16"])
    out = capsys.readouterr().out.splitlines()
    assert out[-4].split()[:2] == ["pearson", "1"] and out[-3].split()[:2] == ["flipped", "0.5"]
    assert out[-2].split()[0] == "sum" and out[-1].startswith("sum:")


def test_check_flags_rewards_that_pay_for_exaggeration_or_collapse(sim, monkeypatch):
    """The exaggerated and collapsed columns: a reward linear along the response (the projection of the change on
    the mean change, an unbounded likelihood ratio) pays the exaggerated cells, and one best at the real mean pays
    the collapsed cells; the default five, summed at GRPO's scale, rank the real cells above both. The sum does
    not depend on a reward's units (each is divided by its std over the real cells)."""
    _, ds = sim
    monkeypatch.setitem(V.REWARDS, "linear", lambda x, ref, v: (x - ref.ctrl_mean) @ ref.delta)
    monkeypatch.setitem(V.REWARDS, "to_mean", lambda x, ref, v: -(x - ref.mean).norm(dim=1))
    monkeypatch.setitem(V.REWARDS, "to_mean_x10", lambda x, ref, v: -10 * (x - ref.mean).norm(dim=1))
    res = V.check(ds, V.Verifier(ds.genes, {"linear": 1, "to_mean": 2}), ds.keys, n_cells=32)
    assert res["linear"]["vs_exaggerated"] == 0 and res["linear"]["exaggerated"] > res["linear"]["real"]
    assert res["to_mean"]["vs_collapsed"] == 0 and res["to_mean"]["vs_exaggerated"] == 1
    res10 = V.check(ds, V.Verifier(ds.genes, {"linear": 1, "to_mean_x10": 2}), ds.keys, n_cells=32)
    for g in V.GROUPS:
        assert res10["sum"][g] == pytest.approx(res["sum"][g], rel=1e-4), g
    res = V.check(ds, V.Verifier(ds.genes, V.parse_weights(V.DEFAULT_REWARDS)), ds.keys, n_cells=32)  # the five
    assert res["sum"]["vs_exaggerated"] >= 0.9 and res["sum"]["vs_collapsed"] >= 0.9, res["sum"]
    assert res["sum"]["wins"] >= 0.9 and res["energy"]["vs_collapsed"] == 1


def test_check_scores_control_cells_left_out_of_the_statistics(sim, monkeypatch):
    """The scored control cells are never among the control cells of the Reference they are scored against (the
    statistics of in-sample control cells flatter any reward relative to control: README)."""
    _, ds = sim
    events, reference, ver = [], data.reference, V.Verifier(ds.genes, {"rmse": 1})
    monkeypatch.setattr(data, "reference", lambda cells, ctrl, *a: (events.append(set(ctrl.tolist())),
                                                                    reference(cells, ctrl, *a))[1])
    record = lambda x, ref: (events.append(x.numpy()), V.Verifier.__call__(ver, x, ref))[1]  # noqa: E731
    res = V.check(ds, type("Rec", (), {"weights": ver.weights, "__call__": staticmethod(record)})(), ds.keys[:4], 16)
    row_of = {ds.X[[i]].tobytes(): i for i in np.flatnonzero(ds.is_ctrl)}
    refs = [i for i, e in enumerate(events) if isinstance(e, set)] + [len(events)]
    for a, b in zip(refs[:-1], refs[1:]):                              # one condition: its Reference, then its groups
        groups = [{row_of.get(r.tobytes()) for r in x[:, None]} for x in events[a + 1:b]]
        scored = [g for g in groups if None not in g]                   # the group made of control cells
        assert len(scored) == 1 and len(scored[0]) == 16 and not scored[0] & events[a] and len(events[a]) >= 16
    assert res["rmse"]["n"] == 4


def test_check_runs_with_one_condition_per_covariate(tmp_path, capsys):
    """A stimulation measured in three cell lines: no other condition shares a covariate, so real cells are
    compared with control cells only (and with their exaggeration and collapse)."""
    path = tmp_path / "one.h5ad"
    data.write_h5ad(path, data.simulate(n_cells=900, n_genes=300, n_singles=1, n_combos=0, n_covariates=3, seed=2))
    ds = data.load_dataset(data.DataConfig(data=str(path), n_genes=0))
    assert len(ds.keys) == 3 and len({k[1] for k in ds.keys}) == 3
    res = V.check(ds, V.Verifier(ds.genes), ds.keys, n_cells=32)
    for name, r in res.items():
        assert r["n"] == 3 and r["n_other"] == 0 and np.isnan(r["other"]), name
    assert res["sum"]["wins"] == 1 and res["sum"]["vs_exaggerated"] == 1 and res["sum"]["vs_collapsed"] == 1
    assert res["pathway"]["real"] > res["pathway"]["control"]
    V.main(["--data", str(path), "--n-genes", "0", "--rewards", "rmse", "--check-cells", "16"])
    out = capsys.readouterr().out.splitlines()
    assert "0 with other conditions" in out[-5] and out[-3].split()[:4] == ["rmse", "1", out[-3].split()[2], "-"]
