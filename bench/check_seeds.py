"""The reward check (verifiers.check, `python verifiers.py`) over several seeds: which cells are held out and drawn.

    python bench/check_seeds.py --data X.h5ad --seeds 0,1,2,3,4 [--rewards ...]

With 20-odd conditions one seed's win shares move by about 10 points from seed to seed; this prints, per reward
and for the weighted sum, the mean and (in brackets) the lowest over seeds of: real wins, real > exaggerated, real
> collapsed, and the share of seeds in which the real cells' mean beats the control cells' mean.
"""
import argparse
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import verifiers  # noqa: E402


@dataclass
class SeedsConfig(verifiers.CheckConfig):
    # seeds
    seeds: str = "0,1,2,3,4"        # check seeds (cells held out and drawn); the split stays --split-seed's


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    data.add_args(p, SeedsConfig)
    cfg = SeedsConfig(**vars(p.parse_args(argv)))
    data.check_args(cfg)
    seeds = [int(s) for s in cfg.seeds.split(",") if s.strip()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = data.load_dataset(cfg)
        ver = verifiers.Verifier(ds.genes, verifiers.parse_weights(cfg.rewards), cfg.gene_sets, cfg.topk)
    keys = ds.split["train"] + ds.split["val"]
    rows = {}
    for seed in seeds:                                                 # a loop over seeds
        for name, r in verifiers.check(ds, ver, keys, cfg.check_cells, seed, cfg.std_floor, cfg.group).items():
            row = [r["wins"], r["vs_exaggerated"], r["vs_collapsed"], r["real"] > r["control"]]
            rows.setdefault(name, []).append(row)
    print(f"{ds.meta['path']}: {len(keys)} training and validation conditions, check seeds {cfg.seeds}: mean (lowest)")
    print("| reward | real wins | > exaggerated | > collapsed | mean real > control |\n|---|---|---|---|---|")
    for name, v in rows.items():
        v = np.array(v, dtype=float)
        print(f"| {name} | " + " | ".join(f"{m:.0%} ({lo:.0%})" for m, lo in zip(v.mean(0)[:3], v.min(0)[:3]))
              + f" | {v[:, 3].mean():.0%} of seeds |")


if __name__ == "__main__":
    data.cli(main)
