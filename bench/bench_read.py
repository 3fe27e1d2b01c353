"""Median read time of our h5py read_h5ad vs anndata.read_h5ad (5 interleaved repeats per file).

    python bench/bench_read.py            # shared real file (when present) + generated 50,000 x 2,000 CSR
    python bench/bench_read.py --cells 5000
"""
import argparse
import pathlib
import sys
import tempfile
import time
import warnings

import numpy as np
import scipy.sparse as sp

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from data import read_h5ad  # noqa: E402

import anndata  # noqa: E402  (benchmark only)
import pandas as pd  # noqa: E402

warnings.filterwarnings("ignore")


def bench(path, repeats=5):
    """Interleave ours / anndata so both see the same page-cache and machine load."""
    t_ours, t_ad = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        read_h5ad(path)
        t_ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        anndata.read_h5ad(path)
        t_ad.append(time.perf_counter() - t0)
    m_ours, m_ad = np.median(t_ours), np.median(t_ad)
    print(f"{path.name:40s} ours {m_ours * 1e3:8.1f} ms   anndata {m_ad * 1e3:8.1f} ms   "
          f"ratio ours/anndata {m_ours / m_ad:.2f}", flush=True)


def generate(path, n_cells, n_genes, density, compression, seed=0):
    """Counts-like CSR written by anndata: Poisson counts at ~density, obs with a categorical."""
    rng = np.random.default_rng(seed)
    X = sp.random(n_cells, n_genes, density=density, format="csr", dtype=np.float32, random_state=rng,
                  data_rvs=lambda k: rng.poisson(2.0, k) + 1.0)  # (n_cells, n_genes)
    obs = pd.DataFrame({"condition": pd.Categorical(rng.choice(["ctrl", "A+ctrl", "A+B"], n_cells)),
                        "n_counts": np.asarray(X.sum(1)).ravel()},
                       index=[f"cell{i}" for i in range(n_cells)])
    var = pd.DataFrame(index=[f"gene{j}" for j in range(n_genes)])
    anndata.AnnData(X=X, obs=obs, var=var).write_h5ad(path, compression=compression)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--cells", type=int, default=50_000)
    p.add_argument("--genes", type=int, default=2_000)
    p.add_argument("--density", type=float, default=0.1)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    real = ROOT.parent / "shared" / "data" / "mcfaline23_gbm_crispri.h5ad"
    if real.exists():
        bench(real, args.repeats)
    with tempfile.TemporaryDirectory() as d:
        for comp in (None, "gzip"):
            path = pathlib.Path(d) / f"sparse_{args.cells}x{args.genes}_{comp or 'raw'}.h5ad"
            generate(path, args.cells, args.genes, args.density, comp)
            bench(path, args.repeats)
