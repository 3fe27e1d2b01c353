"""Issue 10, drugs and doses end to end: obs layouts (sci-Plex, ComboSciPlex strings and slots), units, bad doses,
log-dose interpolation of the additive prior, dose/drug splits and --test with doses, the dose-response embedding,
the chemical simulator, and one small end-to-end run. Expected values are hand computations or properties a
wrong implementation fails."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import evaluate  # noqa: E402
import flow  # noqa: E402
from data import DataConfig, UserError  # noqa: E402


def write(path, obs: dict, n_genes=12, seed=0):
    """A small raw-count h5ad (our writer) with the given obs columns; each distinct (label, dose) row block gets
    its own mean shift on its own gene, so conditions differ."""
    rng = np.random.default_rng(seed)
    n = len(next(iter(obs.values())))
    X = rng.poisson(4.0, (n, n_genes)).astype(np.float32)
    data.write_h5ad(path, data.H5AD(X=X, obs={k: np.asarray(v) for k, v in obs.items()}, var={},
                                    obs_names=np.array([f"c{i}" for i in range(n)], dtype=object),
                                    var_names=np.array([f"G{j}" for j in range(n_genes)], dtype=object)))
    return str(path)


def load(path, **kw):
    return data.load_dataset(DataConfig(data=str(path), n_genes=0, min_cells=5, **kw))


def block(spec, m=10):
    """[(label, dose), ...] -> obs columns with m cells each."""
    labels = np.array([l for l, _ in spec for _ in range(m)], dtype=object)
    doses = np.array([d for _, d in spec for _ in range(m)], dtype=object)
    return labels, doses


# ----------------------------------------------------------------------------- layouts and units
def test_sciplex_layout_nanomolar_to_micromolar(tmp_path):
    labels, doses = block([("Vehicle", 0.0), ("D", 10.0), ("D", 100.0), ("D", 1000.0), ("D", 10000.0), ("E", 100.0)])
    p = write(tmp_path / "sciplex.h5ad", {"product_name": labels, "dose": doses.astype(float),
                                          "cell_type": np.full(len(labels), "A549", dtype=object)})
    ds = load(p)
    m = ds.meta
    assert (m["pert_key"], m["dose_key"], m["dose_unit"], m["control"], m["cov_key"]) == \
        ("product_name", "dose", "nM", "Vehicle", "cell_type")               # 10000 > 1000: nM
    assert [k[0] for k in ds.keys] == ["D@0.01", "D@0.1", "D@1", "D@10", "E@0.1"]
    assert m["dose_range"] == (0.01, 10.0)
    assert [k[0] for k in load(p, dose_unit="uM").keys][:2] == ["D@10", "D@100"]
    u = ds.key_table([("D@0.01", "A549"), ("D@1", "A549"), ("D@10", "A549")])["dose"][:, 0]
    np.testing.assert_allclose(u.numpy(), [0.0, 2 / 3, 1.0], atol=1e-6)      # 1 + log10(d / 10) / 3 decades
    with pytest.raises(UserError, match="--dose-unit 'mg'"):
        load(p, dose_unit="mg")


def test_unit_from_column_name_and_concentration_key(tmp_path):
    labels, doses = block([("DMSO", 0.0), ("D", 10.0), ("D", 100.0)])
    ds = load(write(tmp_path / "c.h5ad", {"drug": labels, "concentration_nM": doses.astype(float)}),
              dose_key="concentration_nM")
    assert ds.meta["dose_unit"] == "nM" and [k[0] for k in ds.keys] == ["D@0.01", "D@0.1"]


def test_combination_dose_strings_follow_their_drugs(tmp_path):
    """'A+B' at '1+10' and 'B+A' at '10+1' are one condition; 'A+B' at '10+1' is another (doses swap with drugs)."""
    labels, doses = block([("control", "0"), ("A+B", "1+10"), ("B+A", "10+1"), ("A+B", "10+1"), ("A", "1"),
                           ("A+ctrl", "10+0")])
    ds = load(write(tmp_path / "combo.h5ad", {"condition": labels, "dose": doses}))
    assert ds.meta["dose_unit"] == "uM"
    assert sorted(k[0] for k in ds.keys) == ["A@1", "A@1+B@10", "A@10", "A@10+B@1"]
    assert len(ds.cell_idx[("A@1+B@10", "all")]) == 20 and len(ds.cell_idx[("A@10", "all")]) == 10
    assert data.parse_condition("B+A", "ctrl", dose=[10.0, 1.0]) == data.parse_condition("A+B", "ctrl", dose=[1.0, 10.0])
    assert data.parse_condition("A+B", "ctrl", dose=[1.0, 0.0]) == ("A@1",)   # dose 0: no drug


def test_one_column_per_slot(tmp_path):
    """CellFlow's ComboSciPlex layout (Drug1/Drug2/Dose1/Dose2) is detected and parsed like 'A+B' / 'dA+dB'."""
    d1 = np.array(["control"] * 10 + ["A"] * 10 + ["B"] * 10 + ["A"] * 10, dtype=object)
    d2 = np.array([None] * 10 + ["B"] * 10 + ["A"] * 10 + [None] * 10, dtype=object)
    s1 = np.r_[np.zeros(10), np.full(10, 0.1), np.full(10, 1.0), np.full(10, 0.1)]
    s2 = np.r_[np.zeros(10), np.full(10, 1.0), np.full(10, 0.1), np.full(10, np.nan)]
    p = write(tmp_path / "slots.h5ad", {"Drug1": d1, "Drug2": d2, "Dose1": s1, "Dose2": s2})
    ds = load(p)
    assert ds.meta["dose_key"] == "Dose1,Dose2" and sorted(k[0] for k in ds.keys) == ["A@0.1", "A@0.1+B@1"]
    assert len(ds.cell_idx[("A@0.1+B@1", "all")]) == 20 and ds.is_ctrl.sum() == 10
    assert sorted(k[0] for k in load(p, pert_key="Drug1,Drug2", dose_key="Dose1,Dose2").keys) == ["A@0.1", "A@0.1+B@1"]


# ----------------------------------------------------------------------------- bad input: one line, exit 2
@pytest.mark.parametrize("doses, match", [
    (["0", "1", "high", "10"], r"columns 'condition'/'dose': dose 'high' of 'D' is not a number"),
    (["0", "1", "-1", "10"], r"dose '-1' of 'D' is negative"),
    (["0", "1", "1+10", "10"], r"'A\+B' has 2 part\(s\) but its dose '10' has 1"),
])
def test_bad_doses_fail_with_one_line_and_write_nothing(tmp_path, capsys, doses, match):
    labels = ["ctrl", "D", "D" if "high" in doses or "-1" in doses else "A+B", "A+B"]
    lab, dose = block(list(zip(labels, doses)))
    p = write(tmp_path / "bad.h5ad", {"condition": lab, "dose": dose})
    with pytest.raises(UserError, match=match):
        load(p)
    out = tmp_path / "flow.pt"
    with pytest.raises(SystemExit) as e:
        data.cli(lambda: flow.main(["--data", p, "--out", str(out), "--steps", "2", "--no-progress"]))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and not out.exists()


# ----------------------------------------------------------------------------- the additive prior at doses
def test_interpolate_log_dose_hand_computed():
    deltas = [np.array([1.0, 0.0]), np.array([3.0, 2.0]), np.array([5.0, 10.0])]     # at 0.1, 1, 10 uM
    doses = [1.0, 10.0, 0.1]
    dl = [deltas[1], deltas[2], deltas[0]]                                            # unsorted on purpose
    w = np.log(0.3 / 0.1) / np.log(1 / 0.1)                                          # 0.4771
    np.testing.assert_allclose(data.interpolate_log_dose(doses, dl, 0.3), (1 - w) * deltas[0] + w * deltas[1])
    np.testing.assert_allclose(data.interpolate_log_dose(doses, dl, 3.0), [3 + 2 * np.log10(3), 2 + 8 * np.log10(3)])
    np.testing.assert_allclose(data.interpolate_log_dose(doses, dl, 1.0), deltas[1])  # seen: exact
    np.testing.assert_allclose(data.interpolate_log_dose(doses, dl, 0.01), deltas[0])  # below: nearest
    np.testing.assert_allclose(data.interpolate_log_dose(doses, dl, 100.0), deltas[2])  # above: nearest


@pytest.fixture(scope="module")
def doses_ds(tmp_path_factory):
    """Singles A at 0.1 and 10 uM (1 uM missing), B at 1; combination A@1+B@1 held out."""
    lab, dose = block([("ctrl", "0"), ("A", "0.1"), ("A", "10"), ("B", "1"), ("B", "3"), ("A+B", "1+1")], m=12)
    p = write(tmp_path_factory.mktemp("doses") / "d.h5ad", {"condition": lab, "dose": dose}, seed=3)
    return load(p, test="A+B@1+1")


def test_combination_prior_interpolates_the_missing_single_dose(doses_ds):
    ds = doses_ds
    assert ds.split["test"] == [("A@1+B@1", "all")]
    r = lambda l: ds.refs[(l, "all")].delta.numpy()  # noqa: E731
    want = 0.5 * r("A@0.1") + 0.5 * r("A@10") + r("B@1")       # w = log(1/0.1) / log(10/0.1) = 1/2
    key = ("A@1+B@1", "all")
    assert sorted(ds.split["train"]) == [(l, "all") for l in ("A@0.1", "A@10", "B@1", "B@3")]
    np.testing.assert_allclose(ds.additive_delta(key), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ds.key_table([key])["prior"][0].numpy(), want, rtol=1e-5, atol=1e-6)
    assert ds.prior_kind(key) == "additive"
    # leave-self-out: a training single's prior comes from the drug's other doses, never itself
    train = ds.split["train"]
    for l, other in [("B@1", "B@3"), ("B@3", "B@1"), ("A@0.1", "A@10")]:
        np.testing.assert_allclose(ds.component_deltas((l, "all"))[0], r(other))       # nearest other dose
        assert (l, "all") in train and ds.prior_kind((l, "all")) == "dose"
    assert data.prior_kind(("A@1", "x"), [("A@1", "x")]) == "none"                     # only itself
    assert data.prior_kind(("A@1", "x"), [("A@1", "x"), ("A@3", "y")]) == "transfer"


# ----------------------------------------------------------------------------- splits
def dose_keys():
    keys = [(f"D{i}@{d}", c) for i in range(4) for d in (0.01, 0.1, 1, 10)[: 3 + i % 2] for c in ("x", "y")]
    return keys + [("D0@0.1+D1@1", "x"), ("D2@1+D3@0.1", "y")]


def test_dose_split_holds_out_an_inner_dose_of_every_drug():
    keys = dose_keys()
    s = data.make_split(keys, "dose", seed=0)
    by = data.single_index(keys)
    assert len(s["test"]) == len(by)                                       # one per (drug, covariate)
    for k in s["test"] + s["val"]:
        (name, d), = data.components_of(k[0])
        seen = sorted(by[(name, k[1])])
        assert seen[0] < d < seen[-1]                                       # never the lowest or highest
        assert data.prior_kind(k, s["train"]) == "dose"                     # from the drug's other doses
    assert s["val"] and not set(s["val"]) & set(s["test"])
    with pytest.raises(UserError, match="needs a drug with >= 3 doses"):
        data.make_split([("D@1", "x"), ("D@10", "x")], "dose")


def test_drug_split_holds_out_whole_drugs():
    keys = dose_keys()
    s = data.make_split(keys, "drug", test_frac=0.25, val_frac=0.25, seed=1)
    names = lambda ks: {n for l, _ in ks for n, _ in data.components_of(l)}  # noqa: E731
    test_drugs = {n for l, _ in s["test"] for n, _ in data.components_of(l) if all(
        n not in {m for m, _ in data.components_of(t)} for t, _ in s["train"])}
    assert test_drugs and not test_drugs & names(s["train"]) and not test_drugs & names(s["val"])
    assert all(data.prior_kind(k, s["train"]) not in ("additive", "dose") for k in s["test"] if "+" not in k[0])


def test_explicit_test_with_doses(tmp_path):
    lab, dose = block([("ctrl", "0"), ("A", "0.1"), ("A", "1"), ("A", "10"), ("B", "1"), ("A+B", "1+1"),
                       ("A+B", "10+1")], m=6)
    p = write(tmp_path / "t.h5ad", {"condition": lab, "dose": dose})
    assert load(p, test="B+A@1+1").split["test"] == [("A@1+B@1", "all")]
    assert load(p, test="A@10+B@1").split["test"] == [("A@10+B@1", "all")]
    assert load(p, test="A@0.1").split["test"] == [("A@0.1", "all")]
    assert load(p, test="A").split["test"] == [("A@0.1", "all"), ("A@1", "all"), ("A@10", "all")]  # every dose
    with pytest.raises(UserError, match="2 drug\\(s\\) but 3 doses"):
        load(p, test="A+B@1+1+1")
    with pytest.raises(UserError, match="not found"):
        load(p, test="A@3")


# ----------------------------------------------------------------------------- the model
def dose_model(seed=0):
    torch.manual_seed(seed)
    m = flow.VelocityField(flow.ModelConfig(G=6, n_comp=4, n_cov=1, width=16, depth=1, d_pert=8, gene_feat_dim=3, doses=True), torch.randn(4, 3))
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return m


def test_dose_embedding_order_invariance_and_padding():
    m = dose_model()
    emb = lambda c, d: m.embed_perturbation(torch.tensor(c), torch.tensor(d))  # noqa: E731
    torch.testing.assert_close(emb([[1, 2]], [[0.2, 0.9]]), emb([[2, 1]], [[0.9, 0.2]]))     # A+B == B+A, doses along
    torch.testing.assert_close(emb([[3, 0]], [[0.5, 0.7]]), emb([[3]], [[0.5]]))               # padding adds nothing
    assert not torch.allclose(emb([[1, 2]], [[0.2, 0.9]]), emb([[1, 2]], [[0.9, 0.2]]), atol=1e-4)  # doses swapped alone
    assert not torch.allclose(emb([[1]], [[0.2]]), emb([[1]], [[0.4]]), atol=1e-4)               # the dose matters
    assert flow.build_model(dict(m.hparams)).dose_mlp is not None                                # stored with the model
    assert flow.VelocityField(flow.ModelConfig(G=6, n_comp=4, n_cov=1, width=16, depth=1, d_pert=8)).dose_mlp is None             # genetic: as before


def test_dose_embedding_interpolates_an_unseen_dose():
    """Fit the embedding (and a linear read-out) to a response whose direction turns with log-dose, on four of
    five doses: at the held-out middle dose the prediction lies near the truth, much nearer than the nearest
    seen dose's response, which a per-dose lookup would return."""
    torch.manual_seed(0)
    m = flow.VelocityField(flow.ModelConfig(G=4, n_comp=1, n_cov=1, width=32, depth=1, d_pert=8, doses=True))
    head = torch.nn.Linear(32, 2)
    resp = lambda u: torch.stack([torch.sigmoid(8 * (u - 0.5)), torch.sigmoid(8 * (u - 0.7)) - 0.5], -1)  # noqa: E731
    seen, held = torch.tensor([0.0, 0.25, 0.75, 1.0]), torch.tensor([0.5])
    opt = torch.optim.Adam([*m.parameters(), *head.parameters()], lr=1e-2)
    for _ in range(400):
        opt.zero_grad()
        pred = head(m.embed_perturbation(torch.ones(4, 1, dtype=torch.long), seen[:, None]))
        (pred - resp(seen)).pow(2).mean().backward()
        opt.step()
    with torch.no_grad():
        got = head(m.embed_perturbation(torch.ones(1, 1, dtype=torch.long), held[:, None]))
    err = (got - resp(held)).norm()
    nearest = min((resp(seen[i:i + 1]) - resp(held)).norm() for i in (1, 2))
    assert err < 0.6 * nearest, (float(err), float(nearest))       # seeds 0-4: 0.22-0.48 of it


def test_drugs_have_no_gene_features_and_no_excluded_genes(chem):
    ds = chem["ds"]
    assert not data.gene_features(ds, 4).any()                      # drugs are not genes
    gene_pos = {g: i for i, g in enumerate(ds.genes)}
    assert all(n not in gene_pos for n in ds.components)                   # discrimination excludes nothing


# ----------------------------------------------------------------------------- simulator and end to end
@pytest.fixture(scope="module")
def chem(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chem")
    path = tmp / "chem.h5ad"
    data.main(["--simulate", str(path), "--kind", "chemical", "--sim-cells", "2500", "--sim-genes", "200"])
    ds = data.load_dataset(DataConfig(data=str(path), n_genes=0))
    return {"tmp": tmp, "path": path, "h": data.read_h5ad(path), "ds": ds}


def test_chemical_simulator_sciplex_layout_and_hill_truth(chem):
    h, ds = chem["h"], chem["ds"]
    t = h.uns["truth"]
    assert set(h.obs) == {"product_name", "dose", "cell_type"}
    vehicle = h.obs["product_name"] == "Vehicle"
    assert vehicle.sum() == 250 and set(h.obs["dose"][vehicle]) == {"0"}
    assert ds.meta["dose_unit"] == "uM" and ds.meta["control"] == "Vehicle"
    singles = [k for k in ds.keys if "+" not in k[0]]
    per = {}
    for l, _ in singles:
        (n, d), = data.components_of(l)
        per.setdefault(n, []).append(d)
    assert len(per) == 12 and all(4 <= len(v) <= 6 for v in per.values())
    assert sum("+" in k[0] for k in ds.keys) == 20
    # Hill: the on-target part of the truth grows monotonically with dose, EC50 inside the measured range
    for i, n in enumerate(t["drugs"]):
        d = np.array(sorted(per[n]))
        f = data.hill(d, t["ec50"][i], t["hill"][i])
        assert np.all(np.diff(f) > 0) and d[0] < t["ec50"][i] < d[-1]
    # the data follow the truth: the real mean deltas correlate with the true effects
    cond = list(t["conditions"])
    gi = {g: j for j, g in enumerate(h.var_names)}
    cols = [gi[g] for g in ds.genes]
    r = [np.corrcoef(ds.refs[k].delta.numpy(), t["effects"][cond.index(k[0])][cols])[0, 1] for k in ds.keys
         if np.linalg.norm(t["effects"][cond.index(k[0])]) > 2]
    assert np.median(r) > 0.5


def test_data_cli_reports_doses_and_kind(chem, capsys, tmp_path):
    data.main(["--data", str(chem["path"]), "--n-genes", "0"])
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("doses"))
    ds = chem["ds"]
    d0 = sorted(d for l, _ in ds.keys if "+" not in l for n, d in data.components_of(l) if n == "drug00")
    assert "column 'dose' in uM" in line and f"drug00 {','.join(data.fmt_dose(d) for d in d0)};" in line
    with pytest.raises(UserError, match="--kind 'protein': use genetic or chemical"):
        data.main(["--simulate", str(tmp_path / "x.h5ad"), "--kind", "protein"])
    assert not (tmp_path / "x.h5ad").exists()


def test_chemical_end_to_end_with_best_of(chem, capsys):
    tmp = chem["tmp"]
    ckpt = flow.train(flow.FlowConfig(data=str(chem["path"]), n_genes=0, split="dose", steps=40, width=32, depth=1,
                                      batch_size=64, out=str(tmp / "flow.pt"), progress=False, eval_every=1000))
    model, ck = flow.load_checkpoint(ckpt)
    assert model.dose_mlp is not None and tuple(ck["dose_range"]) == (0.01, 10.0)
    out, pred = tmp / "res.json", tmp / "pred.h5ad"
    evaluate.main(["--ckpt", ckpt, "--sde-noise", "0", "--best-of", "1,2", "--out", str(out), "--write-pred", str(pred),
                   "--rewards", "pearson=1,rmse=1,spearman=1,pathway=1"])
    text = capsys.readouterr().out
    assert f"| {ckpt} best-of-2 |" in text and "| additive |" in text
    ds = evaluate.dataset_for(ck)
    p = data.read_h5ad(pred)
    got = {(l, d) for l, d in zip(p.obs["product_name"], p.obs["dose"])} - {("Vehicle", "0")}
    assert got == {(data.names_of(k[0]), data.fmt_dose(data.components_of(k[0])[0][1])) for k in ds.split["test"]}
