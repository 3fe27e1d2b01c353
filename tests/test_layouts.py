"""The public layouts README's "Where to get real data" names, written here with anndata as their sources ship
them (obs columns, control labels, combination separators, dose columns, gene ids), and what data.load_dataset
reads from each: the perturbation column, the control, the conditions, the covariate, the doses and the genes."""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402

ad = pytest.importorskip("anndata")
pd = pytest.importorskip("pandas")


def write(path, obs: dict, genes, counts=True, var=None, seed=0):
    """An h5ad of len(obs) cells: raw counts (or their log1p(CP10k)) with a per-label effect, so labels matter."""
    rng = np.random.default_rng(seed)
    n = len(next(iter(obs.values())))
    X = rng.poisson(3.0, (n, len(genes))).astype(np.float32)
    if not counts:
        X = np.log1p(X / X.sum(1, keepdims=True) * 1e4)
    a = ad.AnnData(X=X, obs=pd.DataFrame(obs, index=[f"c{i}" for i in range(n)]),
                   var=pd.DataFrame(var or {}, index=list(genes)))
    a.write_h5ad(path)
    return str(path)


GENES = ["CEBPE", "RUNX1T1", "KLF1", "MAP2K6"] + [f"G{i}" for i in range(36)]


def test_scperturb_norman(tmp_path):
    """scPerturb (scperturb.org, Zenodo): raw counts, obs 'perturbation' with 'control' and '_'-joined doubles,
    'celltype', 'nperts'."""
    labels = ["control"] * 40 + ["CEBPE"] * 20 + ["RUNX1T1"] * 20 + ["CEBPE_RUNX1T1"] * 20 + ["KLF1_MAP2K6"] * 20
    path = write(tmp_path / "norman_scperturb.h5ad", {"perturbation": labels, "celltype": ["K562"] * 120,
                                                      "nperts": [0 if l == "control" else l.count("_") + 1
                                                                 for l in labels]}, GENES)
    ds = data.load_dataset(data.DataConfig(data=path, n_genes=0, split="random"))
    m = ds.meta
    assert (m["pert_key"], m["control"], m["sep"], m["cov_key"], m["counts"]) == \
        ("perturbation", "control", "_", "celltype", True)
    assert sorted(ds.keys) == [("CEBPE", "K562"), ("CEBPE+RUNX1T1", "K562"), ("KLF1+MAP2K6", "K562"),
                               ("RUNX1T1", "K562")]


def test_gears_norman(tmp_path):
    """GEARS (Harvard Dataverse, `PertData.load('norman')`: perturb_processed.h5ad): log1p values, obs 'condition'
    with 'ctrl', 'A+ctrl' and 'A+B', 'cell_type', 'dose_val' ('1' or '1+1', not a dose), 'control' (0/1),
    'condition_name'; var index Ensembl ids with symbols in 'gene_name'."""
    labels = ["ctrl"] * 40 + ["CEBPE+ctrl"] * 20 + ["ctrl+RUNX1T1"] * 20 + ["CEBPE+RUNX1T1"] * 20
    ens = [f"ENSG{i:011d}" for i in range(len(GENES))]
    path = write(tmp_path / "perturb_processed.h5ad",
                 {"condition": labels, "cell_type": ["K562"] * 100,
                  "dose_val": ["1+1" if l.count("+") and "ctrl" not in l else "1" for l in labels],
                  "control": [int(l == "ctrl") for l in labels],
                  "condition_name": [f"K562_{l}_1+1" for l in labels]}, ens, counts=False,
                 var={"gene_name": GENES})
    ds = data.load_dataset(data.DataConfig(data=path, n_genes=0, split="random"))
    m = ds.meta
    assert (m["pert_key"], m["control"], m["sep"], m["dose_key"], m["counts"]) == ("condition", "ctrl", "+", None, False)
    assert sorted(k[0] for k in ds.keys) == ["CEBPE", "CEBPE+RUNX1T1", "RUNX1T1"] and ds.genes[:2] == GENES[:2]


def test_chemcpa_sciplex(tmp_path):
    """CPA / chemCPA sci-Plex 3: obs 'product_name' with 'Vehicle', 'dose' in nM (10 to 10,000; vehicle 0),
    'cell_type' (A549, K562, MCF7), 'control' (0/1)."""
    drugs = ["Vehicle"] * 60 + ["Dacinostat"] * 60 + ["Givinostat"] * 60
    dose = [0] * 60 + [10] * 20 + [100] * 20 + [10000] * 20 + [100] * 30 + [1000] * 30
    lines = (["A549", "K562", "MCF7"] * 60)[:180]
    path = write(tmp_path / "sciplex.h5ad", {"product_name": drugs, "dose": np.array(dose, float),
                                            "cell_type": lines, "control": [int(d == "Vehicle") for d in drugs]},
                 GENES)
    ds = data.load_dataset(data.DataConfig(data=path, n_genes=0, split="random", min_cells=5))
    m = ds.meta
    assert (m["pert_key"], m["control"], m["dose_key"], m["dose_unit"], m["cov_key"]) == \
        ("product_name", "Vehicle", "dose", "nM", "cell_type")
    assert {k[0] for k in ds.keys} == {"Dacinostat@0.01", "Dacinostat@0.1", "Dacinostat@10", "Givinostat@0.1",
                                       "Givinostat@1"}                     # labels in uM
    assert ds.covariates == ["A549", "K562", "MCF7"]
