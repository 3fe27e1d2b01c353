"""What RL buys and what it costs: held-out reward gain against the change in energy distance and effect ratio,
for a few KL weights and energy-witness weights (the guards), 3 seeds each, with the pretrained generator and the
simple baselines marked.

    python bench/rl_tradeoff.py                      # genetic simulator, seeds 0,1,2 (~1 h on 2 CPU cores)
    python bench/rl_tradeoff.py --kind chemical --seeds 0 --png /tmp/t.png

Every setting starts from the same pretrained generator per seed (runs/seeds/sim_suite_flow_s<seed>.pt, the one
bench/suite.py trains, pretrained here when missing; the default setting reuses suite's RL run) and is judged at its LAST step (the policy the setting makes,
not the step validation keeps). Held-out test conditions, ODE sampler. The gain is the mean over the five rewards
of (RL - pretrained) / (the pretrained reward's sd over test conditions): a scale-free effect size. Prints a table
and writes the picture (matplotlib, a test/bench tool) to --png.
"""
import argparse
import sys
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import evaluate  # noqa: E402
import flow  # noqa: E402
import rl  # noqa: E402
import verifiers  # noqa: E402

SETTINGS = {                                     # label -> RLConfig overrides (the defaults: beta 0.5, energy 2)
    "KL 0.1": {"beta": 0.1},
    "KL 0.5 (default)": {},
    "KL 2": {"beta": 2.0},
    "energy 0": {"rewards": "pearson=1,rmse=1,spearman=1,pathway=1,energy=0"},
    "energy 6": {"rewards": "pearson=1,rmse=1,spearman=1,pathway=1,energy=6"},
}
REWARDS = ["reward/pearson", "reward/rmse", "reward/spearman", "reward/pathway", "reward/energy"]


def point(rows, method, ref="pretrained"):
    """(reward gain in sd over conditions, energy change %, |log effect ratio| change) of method against ref."""
    by = lambda m, c: np.array([r[c] for r in rows if r["method"] == m], dtype=float)  # noqa: E731  per condition
    gain = np.mean([(by(method, c).mean() - by(ref, c).mean()) / max(by(ref, c).std(), 1e-9) for c in REWARDS])
    energy = 100 * (by(method, "energy").mean() / by(ref, "energy").mean() - 1)
    effect = np.abs(np.log(by(method, "effect_ratio"))).mean() - np.abs(np.log(by(ref, "effect_ratio"))).mean()
    return float(gain), float(energy), float(effect)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kind", default="genetic", help="genetic | chemical (the built-in simulators)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--png", default=str(ROOT / "bench" / "rl_tradeoff.png"))
    a = p.parse_args()
    out, stem = ROOT / "runs" / "seeds", {"genetic": "sim", "chemical": "chem-pairs"}[a.kind]
    out.mkdir(parents=True, exist_ok=True)
    pts = {}                                                   # label -> [(gain, energy %, effect) per seed]
    for seed in map(int, a.seeds.split(",")):
        fck = out / f"{stem}_suite_flow_s{seed}.pt"
        if not fck.exists():
            flow.train(flow.FlowConfig(kind=a.kind, seed=seed, out=str(fck), progress=False))
        base, ck = flow.load_checkpoint(fck)
        ds = evaluate.dataset_for(ck)
        keys = ds.split["test"]
        preds = evaluate.baselines(ds, keys, seed=seed)
        preds["pretrained"] = flow.generate(base, ds, keys, steps=20, seed=seed)
        for label, kw in SETTINGS.items():
            rck = out / (f"{stem}_suite_rl_s{seed}.pt" if not kw else  # the default: bench/suite.py's run, if made
                         f"{stem}_tradeoff_{label.replace(' ', '')}_s{seed}.pt")
            last = Path(str(rck).replace(".pt", "_last.pt"))
            if not (last.exists() and data.read_checkpoint(str(last))["step"] >= rl.RLConfig.steps):  # else: reused
                rl.train(rl.RLConfig(kind=a.kind, seed=seed, ckpt=str(fck), out=str(rck), progress=False,
                                     log_every=50, **kw))
            model, _ = flow.load_checkpoint(str(last))
            preds[label] = flow.generate(model, ds, keys, steps=20, seed=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rows = evaluate.evaluate_methods(ds, preds, keys, verifiers.Verifier(ds.genes, None))
        for m in preds:
            if m != "pretrained" and all(preds[m][k] is not None for k in keys):
                pts.setdefault(m, []).append(point(rows, m))
    print(f"\n{a.kind} simulator, seeds {a.seeds}, held-out test conditions, last RL step: mean ± sd over seeds\n")
    print("| method | reward gain (sd over conditions) | energy distance change (%) | abs log effect ratio change |")
    print("|---|---|---|---|")
    for m, v in pts.items():
        v = np.array(v)
        print(f"| {m} | " + " | ".join(f"{x:+.3f} ± {s:.3f}" for x, s in zip(v.mean(0), v.std(0))) + " |")
    picture(pts, a.png)


def picture(pts, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, j, xlabel in ((axes[0], 1, "energy distance change vs pretrained (%)"),
                          (axes[1], 2, "|log effect ratio| change vs pretrained")):
        ax.axhline(0, color="0.8", lw=0.8)
        ax.axvline(0, color="0.8", lw=0.8)
        ax.plot(0, 0, "k*", ms=12, label="pretrained")
        for m, v in pts.items():
            v = np.array(v)
            rl_run = m in SETTINGS
            ax.errorbar(v[:, j].mean(), v[:, 0].mean(), xerr=v[:, j].std(), yerr=v[:, 0].std(),
                        fmt="o" if rl_run else "s", ms=6, capsize=2, label=("RL, " if rl_run else "baseline: ") + m)
        ax.set_xlabel(xlabel)
        ax.set_xscale("symlog", linthresh=1.0 if j == 1 else 0.01)
        ax.set_yscale("symlog", linthresh=0.05)                # RL's gains beside the baselines' losses
    axes[0].set_ylabel("held-out reward gain (sd over conditions)")
    axes[1].legend(fontsize=7, loc="best")
    fig.suptitle("What GRPO buys (up) and what it costs (right); mean ± sd over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    data.cli(main)
