"""Defaults are chosen on every benchmark at once: pretrain + GRPO for 3 seeds on each, one table.

    python bench/suite.py                       # every benchmark, seeds 0,1,2 (about an hour on 2 CPU cores)
    python bench/suite.py --only sim,mcfaline23 --seeds 0

Benchmarks (test conditions held out; the real subsets are read from ../shared/data and skipped when absent):
  sim          the genetic simulator, additive split: combinations whose singles are seen
  sim-pairs    the same with every combination held out (85% test, 15% validation): no training example of a
               combination, the situation of a user who screened singles and wants the unmeasured pairs
  chem-pairs   the chemical simulator: drug pairs at seen doses
  chem-doses   the chemical simulator: a held-out dose of each drug between two seen ones
  mcfaline23   McFaline-Figueroa et al. 2023 CRISPRi, three glioblastoma lines: cell-line transfer
  norman19     Norman et al. 2019 CRISPRa (the shared subset), random split: unseen singles and doubles
Per benchmark the table gives the best simple baseline (by Pearson of mean deltas: control, training mean or
additive), the pretrained generator and the RL one (mean ± sd over seeds): Pearson of mean deltas, energy
distance, effect ratio and DE direction (a held-out metric that is no reward); and the steps RL checkpoints came
from (0: selection kept the pretrained weights). Checkpoints go to runs/seeds/ (--reuse evaluates them again).
"""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import data  # noqa: E402
from seeds import mean_sd, parse_kv, run_seeds  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
BENCHMARKS = {
    "sim": dict(),
    "sim-pairs": dict(split="additive", test_frac=0.85, val_frac=0.15),
    "chem-pairs": dict(kind="chemical"),
    "chem-doses": dict(kind="chemical", split="dose"),
    "mcfaline23": dict(data=str(SHARED / "mcfaline23_gbm_crispri.h5ad")),
    "norman19": dict(data=str(SHARED / "norman19_k562_crispra.h5ad"), split="random"),
}
COLS = ["pearson_delta", "energy", "effect_ratio", "de_direction"]


def fmt(v):
    return f"{v[0]:.3f} ± {v[1]:.3f}" if v else "n/a"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated benchmark names")
    p.add_argument("--seeds", default="0,1,2", help="weight/sampling seeds (the splits stay fixed)")
    p.add_argument("--flow", default="", help="FlowConfig overrides for every benchmark, e.g. steps=500")
    p.add_argument("--rl", default="", help="RLConfig overrides for every benchmark, e.g. steps=50")
    p.add_argument("--tag", default="suite", help="name part of runs/seeds/ files")
    p.add_argument("--reuse", action="store_true", help="evaluate the checkpoints of an earlier run again")
    a = p.parse_args()
    rows = []
    for name in a.only.split(","):
        opts = BENCHMARKS[name]
        if "data" in opts and not Path(opts["data"]).exists():
            print(f"{name}: {opts['data']} not found, skipped", flush=True)
            continue
        print(f"== {name}", flush=True)
        per_seed, ds, kept = run_seeds(opts, [int(s) for s in a.seeds.split(",")], f"{name}_{a.tag}",
                                       parse_kv(a.flow), parse_kv(a.rl), a.reuse)
        base = max(["control", "train_mean", "additive"], key=lambda m: (mean_sd(per_seed, m, "pearson_delta")
                                                                          or (-9, 0))[0])
        rows.append([name, str(len(ds.split["test"])), base] + [fmt(mean_sd(per_seed, m, c)) for m in
                    (base, "pretrained", "rl") for c in COLS] + [",".join(map(str, kept))])
    head = ["benchmark", "test keys", "best baseline"] + [f"{m} {c}" for m in ("baseline", "pretrained", "rl")
                                                          for c in COLS] + ["RL steps kept"]
    print(f"\nseeds {a.seeds}, mean ± sd over seeds, held-out test conditions, ODE sampler\n")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    data.cli(main)
