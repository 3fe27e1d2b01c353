"""Time of one GRPO step at the default settings and its breakdown (rollout, reward, update), on any device.

    python bench/bench_rl.py [--steps 12] [--threads 2] [--device cuda] [--genes 2000]

Runs rl.train on the built-in simulator (or --data) with the default RLConfig (conditions x group, T, noise ...)
from a generator pretrained for a few steps (timing does not depend on the weights), then prints the median of
each phase over the steps after the first two. The verifiers' share is the 'reward' phase. On CUDA rl.train
synchronises the device at each phase boundary (rl.now), so the phases are the GPU's time, not launch time.
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
    p.add_argument("--device", default="cpu", help="cpu | cuda | mps | auto")
    p.add_argument("--data", default=None, help="an h5ad (default: the built-in simulator)")
    p.add_argument("--genes", type=int, default=2000, help="--n-genes of the generator (the simulator has 1000)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = flow.train(flow.FlowConfig(data=a.data, n_genes=a.genes, steps=2, out=f"{tmp}/flow.pt", progress=False,
                                          eval_every=10**9, device=a.device))
        cfg = rl.RLConfig(ckpt=ckpt, out=f"{tmp}/rl.pt", steps=a.steps, eval_every=10**9, progress=False,
                          device=a.device)
        rl.train(cfg)
        hist = [h for h in torch.load(f"{tmp}/rl_last.pt", weights_only=True)["extra"]["history"] if "time/rollout" in h]
        n_genes = len(torch.load(ckpt, weights_only=True)["genes"])
    hist = hist[2:]
    med = {k: statistics.median(h[f"time/{k}"] for h in hist) for k in ("rollout", "reward", "update")}
    total = sum(med.values())
    print(f"GRPO step, defaults: {cfg.conds} conditions x {cfg.group} rollouts, T={cfg.T}, t_frac={cfg.t_frac}, "
          f"{n_genes} genes, device {a.device}, {a.threads} thread(s), median of {len(hist)} steps")
    for k, v in med.items():
        print(f"  {k:8s} {v * 1000:8.1f} ms  ({100 * v / total:4.1f}%)")
    print(f"  {'total':8s} {total * 1000:8.1f} ms")


if __name__ == "__main__":
    main()
