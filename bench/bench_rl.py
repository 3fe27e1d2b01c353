"""Time of one GRPO step at the default settings and its breakdown (rollout, reward, update).

    python bench/bench_rl.py [--steps 12] [--threads 2]

Runs rl.train on the built-in simulator with the default RLConfig (conditions x group, T, noise ...) from
a generator pretrained for a few steps (timing does not depend on the weights), then prints the median of
each phase over the steps after the first two. The verifiers' share is the 'reward' phase.
"""
import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (see flow.py)
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import flow  # noqa: E402
import rl  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = flow.train(flow.FlowConfig(steps=2, out=f"{tmp}/flow.pt", progress=False, eval_every=10**9))
        cfg = rl.RLConfig(ckpt=ckpt, out=f"{tmp}/rl.pt", steps=a.steps, eval_every=10**9, progress=False)
        rl.train(cfg)
        hist = [h for h in torch.load(f"{tmp}/rl_last.pt", weights_only=True)["extra"]["history"] if "time/rollout" in h]
    hist = hist[2:]
    med = {k: statistics.median(h[f"time/{k}"] for h in hist) for k in ("rollout", "reward", "update")}
    total = sum(med.values())
    print(f"GRPO step, defaults: {cfg.conds} conditions x {cfg.group} rollouts, T={cfg.T}, t_frac={cfg.t_frac}, "
          f"{a.threads} thread(s), median of {len(hist)} steps")
    for k, v in med.items():
        print(f"  {k:8s} {v * 1000:8.1f} ms  ({100 * v / total:4.1f}%)")
    print(f"  {'total':8s} {total * 1000:8.1f} ms")


if __name__ == "__main__":
    main()
