"""Issue 10: Best-of-N selection at test time (a training-only pseudo-reference), the bundled Hallmark gene sets
and --gene-sets names, and the bad-input rows for --best-of and --gene-sets."""
import copy
import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import evaluate  # noqa: E402
import flow  # noqa: E402
import rl  # noqa: E402
import verifiers as V  # noqa: E402
from data import UserError  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"


class HeldOut(dict):
    """A dict without the held-out keys: reading one fails the test (the real cells must never be used)."""

    def __missing__(self, key):
        raise AssertionError(f"best-of-N read the held-out condition {key}")


def guarded(ds):
    held = set(ds.split["test"]) | set(ds.split["val"])
    keep = lambda d: HeldOut({k: v for k, v in d.items() if k not in held})  # noqa: E731
    return dataclasses.replace(ds, refs=keep(ds.refs), cell_idx=keep(ds.cell_idx))


def trusted(ds, c=1.0):
    """ds with every prior kind trusted by a fixed c (the --prior-trust option), so the shift has a closed form."""
    return dataclasses.replace(ds, meta={**ds.meta, "prior_trust": c})


def additive_shift(ds, key, c=1.0):
    """c x the sum of the key's singles' mean deltas, from ds.X rows: each single's cells' mean minus the mean of
    the covariate's control cells (every single must be a training key: an additive split's held-out pair)."""
    ctrl = ds.X[ds.ctrl_idx[key[1]]].mean(0)
    singles = [(g, key[1]) for g in key[0].split("+")]
    assert len(singles) > 1 and all(s in ds.split["train"] for s in singles)
    return c * sum(ds.X[ds.cell_idx[s]].mean(0) - ctrl for s in singles)


def shifted_reference(ds, key, n_de=50, std_floor=0.1):
    """The pseudo-reference built here: the covariate's control cells plus additive_shift, clamped at 0, with its
    statistics against those control cells (a Reference: data.reference)."""
    rows = ds.ctrl_idx[key[1]]
    ctrl = ds.X[rows]
    cells = np.maximum(ctrl + additive_shift(ds, key), 0).astype(np.float32)
    return data.reference(cells, rows, ctrl.mean(0), ctrl.std(0, ddof=1), n_de, std_floor)


def test_pseudo_reference_is_control_plus_trusted_shift(tiny_screen):
    """Against the shifted control cells built from ds.X here: the cells, their control mean and delta, and the DE
    genes (top |Welch t| against the control cells, control std floored at 0.1, computed in numpy)."""
    ds = trusted(tiny_screen["ds"])
    key = ds.split["test"][0]
    ref = evaluate.pseudo_reference(guarded(ds), key, ds.prior_trust(), n_de=20)
    ctrl = ds.X[ds.ctrl_idx[key[1]]].astype(np.float64)
    want = np.maximum(ctrl + additive_shift(ds, key), 0)
    np.testing.assert_allclose(ref.dense_cells().numpy(), want, atol=1e-5)
    np.testing.assert_allclose(ref.ctrl_mean.numpy(), ctrl.mean(0), atol=1e-5)
    np.testing.assert_allclose(ref.delta.numpy(), want.mean(0) - ctrl.mean(0), atol=1e-5)
    t = (want.mean(0) - ctrl.mean(0)) / np.sqrt(want.var(0, ddof=1) / len(want)
                                                 + np.maximum(ctrl.std(0, ddof=1), 0.1) ** 2 / len(ctrl))
    assert set(ref.de_idx.tolist()) == set(np.argsort(-np.abs(t))[:20].tolist())
    # nothing trusted to build on: no pseudo-reference, so no selection
    assert evaluate.pseudo_reference(ds, ("UNSEEN", key[1]), dict.fromkeys(ds.prior_trust(), 0.0)) is None


def test_best_of_n_raises_the_selected_reward_without_reading_held_out_cells(tiny_screen):
    """Scored against the pseudo-reference built here (shifted_reference), best-of-16 beats best-of-1 on the
    reward it selects on (per cell, so the comparison does not depend on the group), for every held-out
    condition; held-out cells are never read."""
    ds, model = trusted(tiny_screen["ds"]), tiny_screen["model"]
    gds, keys = guarded(ds), ds.split["test"]
    ver = V.Verifier(ds.genes, {"pearson": 1.0, "rmse": 1.0})
    one = evaluate.best_of_n(model, gds, keys, 1, ver, n_cells=32, steps=8, seed=3)
    best = evaluate.best_of_n(model, gds, keys, 16, ver, n_cells=32, steps=8, seed=3)
    for k in keys:
        truth = shifted_reference(ds, k)
        r1, r16 = (ver(x, truth)[1] for x in (one[k], best[k]))
        z = lambda r: sum((r[n] - r1[n].mean()) / r1[n].std() for n in r)  # noqa: E731  same scale for both
        assert one[k].shape == best[k].shape == (32, len(ds.genes))
        assert z(r16).mean() > z(r1).mean() + 0.5, k
        assert r16["pearson"].mean() > r1["pearson"].mean() and r16["rmse"].mean() > r1["rmse"].mean()
    # N = 1 is the plain sampler, cell for cell
    plain = flow.generate(model, ds, keys, 32, 8, seed=3)
    assert all(torch.equal(plain[k], one[k]) for k in keys)


def test_best_of_n_keeps_the_one_candidate_that_matches_the_pseudo_reference(tiny_screen, monkeypatch):
    """Candidates constructed here (flow.generate patched): of every cell's 4, exactly one is a control cell plus
    its key's shift (additive_shift), at a random place; the others are a control cell, a control cell minus the
    shift, and a control cell plus the OTHER held-out key's shift. Selection must keep the matching one, for every
    cell of both keys."""
    ds = trusted(tiny_screen["ds"])
    keys, N, n = ds.split["test"], 4, 6
    assert len(keys) == 2
    shift = {k: additive_shift(ds, k) for k in keys}
    rng = np.random.default_rng(0)
    cand, match = {}, {}
    for k, other in zip(keys, keys[::-1]):
        c = ds.X[rng.choice(ds.ctrl_idx[k[1]], n * N)].reshape(n, N, -1)          # (n, N, G) control cells
        kinds = np.stack([c[:, 0] + shift[k], c[:, 1], c[:, 2] - shift[k], c[:, 3] + shift[other]], 1)
        order = np.stack([rng.permutation(N) for _ in range(n)])                  # kind order[i, j] at place j
        x = np.maximum(np.take_along_axis(kinds, order[:, :, None], 1), 0)       # (n, N, G)
        cand[k] = torch.from_numpy(x.reshape(n * N, -1).astype(np.float32))      # consecutive rows: one cell's N
        match[k] = x[np.arange(n), np.argmax(order == 0, 1)]                      # (n, G) the matching candidates

    def generate(model, ds_, keys_, n_cells, steps, method, noise, seed, repeat=1, **kw):
        assert list(keys_) == keys and n_cells == n and repeat == N
        return {k: cand[k] for k in keys_}
    monkeypatch.setattr(flow, "generate", generate)
    ver = V.Verifier(ds.genes, {"pearson": 1.0, "rmse": 1.0})
    got = evaluate.best_of_n(None, guarded(ds), keys, N, ver, n_cells=n)
    for k in keys:
        np.testing.assert_allclose(got[k].numpy(), match[k], atol=1e-6, err_msg=str(k))


def test_best_of_n_keeps_each_key_with_its_own_condition(tiny_screen):
    """With a zero output layer every candidate is its control cell plus its key's shift, so every selected cell must
    be one of ITS N candidates: the control cells drawn for it (data.control_rows' draw, N per cell, seeded) plus
    its own key's shift."""
    ds = tiny_screen["ds"]
    model = copy.deepcopy(tiny_screen["model"])
    torch.nn.init.zeros_(model.out.weight)
    torch.nn.init.zeros_(model.out.bias)
    keys, N, n = ds.split["test"] + ds.split["val"], 3, 5
    S = np.stack([ds.start(k) for k in keys])
    assert min(np.abs(S[i] - S[j]).max() for i in range(len(keys)) for j in range(i)) > 0.1
    got = evaluate.best_of_n(model, ds, keys, N, V.Verifier(ds.genes, {"pearson": 1.0}), n_cells=n, steps=3, seed=2)
    g = torch.Generator().manual_seed(2)
    for k in keys:
        rows = ds.ctrl_idx[k[1]][torch.randint(len(ds.ctrl_idx[k[1]]), (n * N,), generator=g).numpy()]
        cands = np.maximum(ds.X[rows] + ds.start(k), 0).reshape(n, N, -1)          # (n, N, G)
        err = np.abs(cands - got[k].numpy()[:, None]).max(-1).min(1)              # (n,) nearest own candidate
        assert err.max() < 1e-4, (k, err)


@pytest.mark.parametrize("argv, match", [
    (["--best-of", "0"], r"--best-of 0: N must be integers >= 1"),
    (["--best-of", "1,four"], r"--best-of 1,four: N must be integers >= 1"),
    (["--gene-sets", "reactome"], r"--gene-sets 'reactome': unknown gene-set table; use progeny \(default\), hallmark"),
])
def test_bad_best_of_and_gene_sets_one_line_exit_2_nothing_written(tiny_screen, capsys, argv, match):
    out, pred = tiny_screen["tmp"] / "bad.json", tiny_screen["tmp"] / "bad.h5ad"
    with pytest.raises(SystemExit) as e:
        data.cli(lambda: evaluate.main(["--ckpt", tiny_screen["ckpt"], "--out", str(out), "--write-pred", str(pred),
                                        *argv]))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1
    import re
    assert re.search(match, err[0]) and not out.exists() and not pred.exists()


def test_rl_unknown_gene_sets_fails_before_any_work(tiny_screen, capsys):
    out = tiny_screen["tmp"] / "rl_bad.pt"
    with pytest.raises(SystemExit) as e:
        data.cli(lambda: rl.main(["--ckpt", tiny_screen["ckpt"], "--out", str(out), "--gene-sets", "kegg", "--steps", "1"]))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--gene-sets 'kegg'" in err[0]
    assert not out.exists() and not out.with_name("rl_bad_last.pt").exists()


# ----------------------------------------------------------------------------- Hallmark
def test_hallmark_bundled_with_attribution():
    path = V.GENE_SETS["hallmark"]
    sets = V.load_gmt(path)
    assert len(sets) == 50 and all(n.startswith("HALLMARK_") for n in sets)
    readme = (path.parent / "README.md").read_text()
    for s in ("Liberzon", "Cell Systems 1:417", "CC BY 4.0", "https://creativecommons.org/licenses/by/4.0/", "v7.0",
              "unmodified"):
        assert s in readme, s
    if (SHARED / "pathways" / path.name).is_file():                       # unmodified copy
        assert (SHARED / "pathways" / path.name).read_bytes() == path.read_bytes()
    assert V.gene_set_path("progeny") is None and V.gene_set_path(None) is None
    assert V.gene_set_path("Hallmark") == path and V.gene_set_path("x/sets.gmt") == Path("x/sets.gmt")


def test_hallmark_activity_is_the_mean_z_score():
    """Unweighted sets: a_p = mean of the set's z-scores (weighted PROGENy rows keep z . W_p / ||W_p||)."""
    sets = V.load_gmt(V.GENE_SETS["hallmark"])
    genes = sorted({g for s in list(sets.values())[:6] for g in s})[:300]
    v = V.Verifier(genes, {"pathway": 1.0}, "hallmark", k=3)
    assert 0 < len(v.pathways) <= 50 and set(v.W.unique().tolist()) == {0.0, 1.0}
    g = torch.Generator().manual_seed(0)
    G = len(genes)
    ref = data.Reference(torch.rand(G, generator=g) + 1, torch.rand(G, generator=g) + 0.5, torch.zeros(G), torch.zeros(G),
                         torch.zeros(G), torch.arange(5), torch.rand(7, G, generator=g) * 3)
    x = torch.rand(4, G, generator=g) * 3
    W = v.W.numpy().astype(bool)
    act = lambda c: np.stack([((c - ref.ctrl_mean.numpy()) / ref.ctrl_std.numpy())[:, w].mean(1) for w in W], 1)  # noqa: E731
    np.testing.assert_allclose(V.pathway_scores(x, ref, v.W).numpy(), act(x.numpy()), rtol=1e-4, atol=1e-5)
    ay = act(ref.dense_cells().numpy())                                  # the reward on them (pathway_activity)
    m, s2 = ay.mean(0), ay.var(0, ddof=1).mean()
    llr = lambda a: (a - m / 2) @ m / s2  # noqa: E731
    top = np.quantile(llr(ay), 0.9)
    want = np.minimum(llr(act(x.numpy())), 2 * top - llr(act(x.numpy())))
    np.testing.assert_allclose(v(x, ref)[1]["pathway"].numpy(), want, rtol=1e-4, atol=1e-4)
