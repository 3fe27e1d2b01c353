"""The pipeline on real cells kept in the repository: tests/data/norman19_subset.h5ad, 380 K562 cells (100 controls,
eight CRISPRa conditions, 500 genes) from Norman et al. 2019 via PerturBench (BSD-3-Clause; provenance, subsampling
and licence in tests/data/README.md). It is always there, so these tests run in a fresh clone and in CI: loading
agrees with anndata, the training-mean baseline beats the control baseline on held-out conditions (a property of
these data: most activations share K562's common response), and a tiny pretraining, GRPO run and evaluation run end
to end, with the generator starting exactly from its start predictor and finite control diagnostics."""
import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
import data  # noqa: E402
import evaluate  # noqa: E402
import flow  # noqa: E402
import rl  # noqa: E402

HERE = Path(__file__).resolve().parent / "data"
FIXTURE = HERE / "norman19_subset.h5ad"
SOURCE = ROOT.parent / "shared" / "data" / "norman19_k562_crispra.h5ad"
TEST = "IER5L,SET+KLF1"                                              # a single and a double held out


@pytest.fixture(scope="module")
def real():
    """The fixture read by anndata (the reference reader) and by load_dataset with IER5L and SET+KLF1 held out."""
    ad = pytest.importorskip("anndata")
    a = ad.read_h5ad(FIXTURE)
    return {"X": a.X.toarray().astype(np.float64), "labels": a.obs["condition"].astype(str).to_numpy(),
            "genes": list(a.var_names), "ds": data.load_dataset(data.DataConfig(data=str(FIXTURE), n_genes=0, test=TEST))}


def canonical(label):
    return "+".join(sorted(label.split("+")))


def test_the_fixture_is_small_and_ships_its_provenance_and_licence(tmp_path):
    assert FIXTURE.stat().st_size < 200_000
    readme, licence = (HERE / "README.md").read_text(), (HERE / "LICENSE_perturbench_BSD-3").read_text()
    assert "BSD 3-Clause License" in licence and "Altos Labs" in licence
    for s in ("Norman et al. 2019", "PerturBench", "make_norman19_subset.py", "default_rng(0)", "BSD-3-Clause"):
        assert s in readme, s
    if SOURCE.is_file():                                              # the script regenerates it byte for byte
        out = tmp_path / "again.h5ad"
        subprocess.run([sys.executable, str(HERE / "make_norman19_subset.py"), "--src", str(SOURCE), "--out", str(out)],
                       check=True, capture_output=True)
        assert out.read_bytes() == FIXTURE.read_bytes()


def test_loading_agrees_with_anndata(real):
    """Labels, controls, genes and every condition's mean change from control, against numpy on anndata's read."""
    ds, X, labels = real["ds"], real["X"], real["labels"]
    assert not ds.meta["counts"] and ds.meta["control"] == "control" and ds.genes == real["genes"]
    assert ds.X.shape == X.shape and ds.covariates == ["k562"]
    assert len(ds.ctrl_idx["k562"]) == int((labels == "control").sum()) == 100
    assert {k[0] for k in ds.keys} == {canonical(l) for l in set(labels) - {"control"}}
    assert sum("+" in k[0] for k in ds.keys) == 3 and len(ds.keys) == 8
    assert ds.split["test"] == [("IER5L", "k562"), ("KLF1+SET", "k562")]
    ctrl = X[labels == "control"].mean(0)
    for k in ds.keys:
        mine = np.array([canonical(l) == k[0] for l in labels])
        assert len(ds.cell_idx[k]) == mine.sum() == 35
        np.testing.assert_allclose(ds.refs[k].delta.numpy(), X[mine].mean(0) - ctrl, atol=1e-5, err_msg=str(k))


def test_training_mean_baseline_beats_control_on_held_out_real_deltas(real):
    """Computed in numpy on anndata's read, the mean change of the training conditions correlates with each held-out
    condition's change (Pearson > 0.5 over the 500 genes); the evaluation shows the same: the training-mean
    baseline's Pearson of mean deltas is far above the control baseline's (0.84 vs 0.23 here)."""
    ds, X, labels = real["ds"], real["X"], real["labels"]
    ctrl = X[labels == "control"].mean(0)
    delta = lambda k: X[np.array([canonical(l) == k for l in labels])].mean(0) - ctrl  # noqa: E731
    train_mean = np.mean([delta(k[0]) for k in ds.split["train"]], axis=0)
    for k in ds.split["test"]:
        assert np.corrcoef(train_mean, delta(k[0]))[0, 1] > 0.5, k
    keys = ds.split["test"]
    preds = evaluate.baselines(ds, keys, seed=0)
    assert all(v is None for v in preds["additive"].values())          # no double has both singles here
    summary = evaluate.summarize(evaluate.evaluate_methods(ds, {m: preds[m] for m in ("control", "train_mean")}, keys))
    assert summary["train_mean"]["pearson_delta"] > summary["control"]["pearson_delta"] + 0.3, summary


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny generator pretrained on the fixture (40 steps)."""
    out = tmp_path_factory.mktemp("real") / "flow.pt"
    flow.train(flow.FlowConfig(data=str(FIXTURE), n_genes=0, test=TEST, steps=40, width=32, depth=1, batch_size=64,
                               gene_feat_dim=8, eval_every=20, eval_cells=32, save_every=1000, progress=False, out=str(out)))
    return out


def test_pretraining_on_real_cells_starts_from_the_start_predictor(pretrained):
    """The generator's diagnostics are finite (control reproduction, residual trust, validation); with its output
    layer at zero, paired generation gives each key's drawn control cells plus its own start predictor (here the
    trusted training-mean delta: Dataset.start), and the trained layer adds a finite change on top."""
    model, ck = flow.load_checkpoint(pretrained)
    ds = evaluate.dataset_for(ck)
    hist = ck["extra"]["history"]
    ctl = next(h for h in hist if "control/bias" in h)
    assert all(np.isfinite(ctl[f"control/{k}"]) for k in ("bias", "bias_ratio", "energy"))
    assert all(0 <= lam <= 1 for lam in ctl["residual_trust"])
    assert all(np.isfinite(h["pearson_delta"]) for h in hist if "pearson_delta" in h)
    assert ds.prior_trust()["mean"] > 0                                 # the start predictor is not the control
    keys = ds.split["train"][:3] + ds.split["test"][:1]
    S = np.stack([ds.start(k) for k in keys])
    assert min(np.abs(S[i] - S[j]).max() for i in range(len(keys)) for j in range(i)) > 0.01
    zero = copy.deepcopy(model)
    torch.nn.init.zeros_(zero.out.weight)
    torch.nn.init.zeros_(zero.out.bias)
    n = [6, 4, 5, 7]
    got = flow.generate(zero, ds, keys, n, steps=4, seed=1)
    g = torch.Generator().manual_seed(1)
    for k, m in zip(keys, n):
        rows = ds.ctrl_idx[k[1]][torch.randint(len(ds.ctrl_idx[k[1]]), (m,), generator=g).numpy()]
        np.testing.assert_allclose(got[k].numpy(), np.maximum(ds.X[rows] + ds.start(k), 0), atol=1e-4, rtol=0)
    trained = flow.generate(model, ds, keys, n, steps=4, seed=1)
    assert all(torch.isfinite(trained[k]).all() and (trained[k] >= 0).all() for k in keys)


def test_grpo_and_evaluation_on_real_cells(pretrained, tmp_path, capsys):
    """Two GRPO steps on the pretrained generator, then evaluate.py on both checkpoints: every method's metrics are
    finite, and the training-mean baseline still beats control in the table."""
    out = rl.train(rl.RLConfig(ckpt=str(pretrained), out=str(tmp_path / "rl.pt"), steps=2, conds=2, group=4, T=3,
                               eval_every=2, eval_cells=8, eval_steps=4, progress=False))
    hist = torch.load(tmp_path / "rl_last.pt", weights_only=True)["extra"]["history"]
    assert [h["step"] for h in hist if "reward/total" in h] == [1, 2]
    assert all(np.isfinite(v) for h in hist for v in h.values() if isinstance(v, float))
    evaluate.main(["--ckpt", str(pretrained), out, "--ode-steps", "4", "--sde-noise", "0", "--out", str(tmp_path / "r.json")])
    summary = json.loads((tmp_path / "r.json").read_text())["summary"]
    assert set(summary) == {"control", "train_mean", "start", str(pretrained), out}
    for m, row in summary.items():
        for metric in ("pearson_delta", "energy", "mmd", "de_direction", "effect_ratio", "reward/pearson"):
            assert row[metric] is not None and np.isfinite(row[metric]), (m, metric)
    assert summary["train_mean"]["pearson_delta"] > summary["control"]["pearson_delta"]
    capsys.readouterr()
