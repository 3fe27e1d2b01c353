"""Defaults are chosen on every benchmark at once: pretrain + GRPO for 3 seeds on each, three tables.

    python bench/suite.py                       # every benchmark, seeds 0,1,2 (hours on 2 CPU cores)
    python bench/suite.py --only sim,mcfaline23 --seeds 0
    python bench/suite.py --reuse --oracle      # the same checkpoints again, with the oracle diagnostic

Benchmarks (test conditions held out; the real subsets are read from ../shared/data and skipped when absent):
  sim               the genetic simulator, additive split: combinations whose singles are seen
  sim-pairs         the same with every combination held out (85% test, 15% validation): no training example of a
                    combination, the situation of a user who screened singles and wants the unmeasured pairs
  chem-pairs        the chemical simulator: drug pairs at seen doses
  chem-doses        the chemical simulator: a held-out dose of each drug between two seen ones
  mcfaline23        McFaline-Figueroa et al. 2023 CRISPRi, three glioblastoma lines: (gene, line) pairs whose gene is
                    seen in another line
  mcfaline23-line   the same data, one cell line held out whole (A172): another cell line, as a new cell type
  norman19          Norman et al. 2019 CRISPRa (the shared subset), random split: unseen singles and doubles
  norman19-doubles  the same data, its three doubles with one seen single held out (the subset has none with both:
                    those are withheld), validated on the one other double there is
Table 1, population: the best simple baseline (control, training mean or additive, by Pearson of mean deltas), the
start predictor alone (control + Dataset.start: the generator with no residual trust), the pretrained generator and
RL: Pearson of mean deltas / energy distance / effect ratio, mean ± sd over seeds, and whether the bar holds
(pretrained pΔ >= baseline - 0.01, energy <= 1.5 x baseline's). Table 2, what RL changes on held-out conditions:
RL - pretrained for the five rewards and the three held-out metrics that are no reward (mean ± sd over seeds, and in
how many seeds it rose), the RL step kept per seed and the residual trust (lam of validated / unvalidated held-out
keys, with the validation keys behind it). Table 3 (--oracle, a diagnostic, never a result): GRPO trained on the
test conditions' own cells from the same pretrained generator, its last step: the ceiling the real rows are read
against. Checkpoints go to runs/seeds/ (--reuse evaluates them again).
"""
import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import data  # noqa: E402
from seeds import mean_sd, parse_kv, run_seeds  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
MCF, NORMAN = str(SHARED / "mcfaline23_gbm_crispri.h5ad"), str(SHARED / "norman19_k562_crispra.h5ad")
GENES = "MAP2K3 MAP2K6 MAP3K21 MAP4K3 MAP4K5 MAPK1 PLK4 SGK1 TGFBR2".split()
BENCHMARKS = {
    "sim": dict(),
    "sim-pairs": dict(split="additive", test_frac=0.85, val_frac=0.15),
    "chem-pairs": dict(kind="chemical"),
    "chem-doses": dict(kind="chemical", split="dose"),
    "mcfaline23": dict(data=MCF),
    "mcfaline23-line": dict(data=MCF, test=",".join(f"{g}:A172" for g in GENES)),
    "norman19": dict(data=NORMAN, split="random"),
    "norman19-doubles": dict(data=NORMAN, test="CNN1+MAPK1,KLF1+SET,SGK1+TBX3"),
}
REWARDS = ["reward/pearson", "reward/rmse", "reward/spearman", "reward/pathway", "reward/energy"]
HELD_OUT = ["de_direction", "de_overlap", "discrimination"]


def fmt(v, d=3):
    return f"{v[0]:.{d}f} ± {v[1]:.{d}f}" if v else "n/a"


def delta(per_seed, a, b, col):
    """(mean, sd, seeds where it rose) of b - a over seeds."""
    d = [s[b][col] - s[a][col] for s in per_seed if col in s.get(a, {}) and col in s.get(b, {})]
    return (float(np.mean(d)), float(np.std(d)), sum(x > 0 for x in d)) if d else None


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated benchmark names")
    p.add_argument("--seeds", default="0,1,2", help="weight/sampling seeds (the splits stay fixed)")
    p.add_argument("--flow", default="", help="FlowConfig overrides for every benchmark, e.g. steps=500")
    p.add_argument("--rl", default="", help="RLConfig overrides for every benchmark, e.g. steps=50")
    p.add_argument("--tag", default="suite", help="name part of runs/seeds/ files")
    p.add_argument("--reuse", action="store_true", help="evaluate the checkpoints of an earlier run again")
    p.add_argument("--oracle", action="store_true", help="also GRPO on the test conditions' own cells (a diagnostic)")
    a = p.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    t1, t2, t3 = [], [], []
    for name in a.only.split(","):
        opts = BENCHMARKS[name]
        if "data" in opts and not Path(opts["data"]).exists():
            print(f"{name}: {opts['data']} not found, skipped", flush=True)
            continue
        print(f"== {name}", flush=True)
        per_seed, ds, info = run_seeds(opts, seeds, f"{name}_{a.tag}", parse_kv(a.flow), parse_kv(a.rl), a.reuse,
                                       oracle=a.oracle)
        base = max(["control", "train_mean", "additive"],
                   key=lambda m: (mean_sd(per_seed, m, "pearson_delta") or (-9, 0))[0])
        pb, eb = mean_sd(per_seed, base, "pearson_delta")[0], mean_sd(per_seed, base, "energy")[0]
        pp, ep = mean_sd(per_seed, "pretrained", "pearson_delta")[0], mean_sd(per_seed, "pretrained", "energy")[0]
        cells = [" / ".join(fmt(mean_sd(per_seed, m, c)) for c in ("pearson_delta", "energy", "effect_ratio"))
                 for m in (base, "start", "pretrained", "rl")]
        t1.append([name, str(len(ds.split["test"])), base, *cells,
                   "yes" if pp >= pb - 0.01 and ep <= 1.5 * eb else "NO"])
        lam = " ".join(f"{np.mean(v):.2f}" for v in zip(*[i["lam"] for i in info]))
        t2.append([name] + [fmt_delta(delta(per_seed, "pretrained", "rl", c), len(seeds)) for c in REWARDS + HELD_OUT]
                  + [",".join(str(i["kept"]) for i in info), f"{lam} ({info[0]['evidence']})"])
        if a.oracle:
            t3.append([name] + [fmt_delta(delta(per_seed, "pretrained", "oracle", c), len(seeds))
                                for c in REWARDS + HELD_OUT + ["pearson_delta", "energy"]])
    print(f"\nseeds {a.seeds}, mean ± sd over seeds, held-out test conditions, ODE sampler\n")
    table(["benchmark", "test keys", "best baseline", "baseline pΔ / energy / effect", "start predictor alone",
           "pretrained", "RL", "bar"], t1)
    print()
    table(["benchmark"] + [c.replace("reward/", "r:") for c in REWARDS + HELD_OUT]
          + ["RL steps kept", "lam validated, unvalidated (validation keys)"], t2)
    if t3:
        print("\noracle (GRPO on the test conditions' own cells; a diagnostic): oracle - pretrained\n")
        table(["benchmark"] + [c.replace("reward/", "r:") for c in REWARDS + HELD_OUT] + ["pΔ", "energy"], t3)


def fmt_delta(d, n):
    return f"{d[0]:+.4f} ± {d[1]:.4f} ({d[2]}/{n})" if d else "n/a"


def table(head, rows):
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    data.cli(main)
