"""Why a distance to the nearest real cells' pathway activities (the pathway reward until issue 20) paid control
cells on real data (README, "The rewards and how to add one"): the spread of pathway activities
(verifiers.pathway_scores) of each condition's perturbed cells against its covariate's control cells, as the mean
distance of a cell's activities to the group's centre.

    python bench/pathway_spread.py --data ../shared/data/mcfaline23_gbm_crispri.h5ad
"""
import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import verifiers  # noqa: E402


def spread(a):
    """Mean distance of the rows of a (n, P) to their mean."""
    return float((a - a.mean(0)).norm(dim=1).mean())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=None, help="h5ad (default: the built-in simulator)")
    a = p.parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = data.load_dataset(data.DataConfig(data=a.data))
        W = verifiers.Verifier(ds.genes, {"pathway": 1}).W             # (P, G) the reward's gene sets
    pert, ctrl = [], []
    for k in ds.keys:                                                  # a loop over conditions, batched cells
        ref = ds.refs[k]
        pert.append(spread(verifiers.pathway_scores(torch.from_numpy(ds.X[ds.cell_idx[k]]), ref, W)))
        ctrl.append(spread(verifiers.pathway_scores(torch.from_numpy(ds.X[ds.ctrl_idx[k[1]]]), ref, W)))
    pert, ctrl = np.array(pert), np.array(ctrl)
    print(f"{ds.meta['path']}: pathway-activity spread, perturbed {pert.mean():.2f} vs control {ctrl.mean():.2f}; "
          f"perturbed larger in {int((pert > ctrl).sum())} of {len(pert)} conditions")


if __name__ == "__main__":
    data.cli(main)
