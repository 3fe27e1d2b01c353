"""The GRPO settings behind rl.py's defaults: validation metrics after a short run for each setting.

    python bench/rl_sweep.py --ckpt runs/flow_simulated_<hash>.pt [--steps 60]

Each row starts from the same pretrained generator (e.g. the one `python rl.py` pretrains and caches)
and changes one setting from the defaults. The numbers are on validation conditions (never rolled out),
ODE sampler, at the last step (not the best one), so the drift of each setting shows.
"""
import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import rl  # noqa: E402
import torch  # noqa: E402

SETTINGS = {
    "defaults (beta=2, epochs=2)": {},
    "weak KL (beta=0.01)": {"beta": 0.01},
    "weak KL, energy weight 3": {"beta": 0.01, "rewards": "pearson=1,rmse=1,spearman=1,pathway=1,energy=3"},
    "beta=0.5": {"beta": 0.5},
    "lr 2e-3": {"lr": 2e-3},
    "beta=0.5, lr 2e-3": {"beta": 0.5, "lr": 2e-3},
    "one pass (epochs=1)": {"epochs": 1},
    "SDE noise 0.4": {"sde_noise": 0.4},
}
COLS = ["score", "pearson_delta", "energy", "effect_ratio", "reward/pearson", "reward/spearman", "reward/pathway", "reward/rmse"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt", required=True, help="a pretrained generator, e.g. the runs/flow_simulated_*.pt of `python rl.py`")
    p.add_argument("--steps", type=int, default=60)
    a = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, kw in SETTINGS.items():
            cfg = rl.RLConfig(ckpt=a.ckpt, out=f"{tmp}/rl.pt", steps=a.steps, progress=False, log_every=10**9, **kw)
            rl.train(cfg)
            hist = torch.load(f"{tmp}/rl_last.pt", weights_only=True)["extra"]["history"]
            val = [h for h in hist if "val/score" in h]
            rows.append((name, val[0], val[-1]))
    print(f"\nvalidation metrics, step 0 -> step {a.steps}\n")
    print("| setting | " + " | ".join(c.replace("reward/", "") for c in COLS) + " |")
    print("|---|" + "---|" * len(COLS))
    for name, v0, v1 in rows:
        print(f"| {name} | " + " | ".join(f"{v0['val/' + c]:.3f} -> {v1['val/' + c]:.3f}" for c in COLS) + " |")


if __name__ == "__main__":
    main()
