"""Regenerate tests/data/norman19_subset.h5ad from the shared PerturBench file (needs ../shared beside the repo):

    python tests/data/make_norman19_subset.py [--src ../shared/data/norman19_k562_crispra.h5ad]

The subset: every control cell of the source (100), and 35 cells drawn without replacement (numpy default_rng(0), in
the order of CONDITIONS) from each of eight conditions: five single activations and three doubles; all 500 genes,
expression cast to float32 (the source stores float64 log1p values), obs columns condition and cell_type, the var
index (gene symbols) only. Cells keep the source's order and names. Written with the repository's own h5ad writer,
gzip-compressed. The tests read the result, never this script; README.md beside it gives provenance and licence.
"""
import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
import data  # noqa: E402

CONDITIONS = ["KLF1", "SGK1", "KMT2A", "IER5L", "TMSB4X", "SET+KLF1", "BPGM+SAMD1", "PTPN12+PTPN9"]
PER_CONDITION = 35


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--src", default=str(HERE.parents[2] / "shared" / "data" / "norman19_k562_crispra.h5ad"))
    p.add_argument("--out", default=str(HERE / "norman19_subset.h5ad"))
    a = p.parse_args(argv)
    h = data.read_h5ad(a.src)
    cond = h.obs["condition"].astype(str)
    rng = np.random.default_rng(0)
    keep = [np.flatnonzero(cond == "control")]
    for c in CONDITIONS:
        rows = np.flatnonzero(cond == c)
        keep.append(rng.choice(rows, PER_CONDITION, replace=False))
    rows = np.sort(np.concatenate(keep))
    X = h.X[rows].astype(np.float32).tocsr()
    X.sort_indices()
    sub = data.H5AD(X=X, obs={"condition": cond[rows].astype(object), "cell_type": h.obs["cell_type"][rows]},
                    var={}, obs_names=h.obs_names[rows], var_names=h.var_names)
    data.write_h5ad(a.out, sub, compression="gzip")
    print(f"wrote {a.out}: {X.shape[0]} cells x {X.shape[1]} genes, {X.nnz} non-zeros")


if __name__ == "__main__":
    main()
