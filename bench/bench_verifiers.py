"""Time the verifiers: 1,024 generated cells scored against 100 real cells over 2,000 genes, n_de = 50.

    python bench/bench_verifiers.py [--threads 1] [--cells 16 --genes 1000]   # the second: one GRPO group

Prints the median wall time (ms) over 20 repeats after one warm-up call, per verifier and for the
full Verifier (all five rewards, PROGENy pathway weights), on CPU.
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (see flow.py)
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import verifiers as V  # noqa: E402
from data import Reference  # noqa: E402


def median_ms(f, repeats=20):
    f()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 gives stable figures on a shared machine)")
    p.add_argument("--cells", type=int, default=1024, help="generated cells scored at once (a GRPO group: 16)")
    p.add_argument("--genes", type=int, default=2000, help="genes (rl.py's defaults: 1,000)")
    p.add_argument("--real", type=int, default=100, help="real cells of the condition")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    B, N, G, n_de = args.cells, args.real, args.genes, 50
    g = torch.Generator().manual_seed(0)
    genes = sorted({s for sets in V.load_progeny(top=500).values() for s in sets})[:G]  # real symbols
    ctrl_mean = torch.rand(G, generator=g) * 2
    ctrl_std = 0.1 + torch.rand(G, generator=g) * 0.5
    effect = torch.randn(G, generator=g) * (torch.rand(G, generator=g) < 0.1)
    cells = (ctrl_mean + effect + ctrl_std * torch.randn(N, G, generator=g)).clamp_min(0)  # (N, G)
    t = (cells.mean(0) - ctrl_mean) / (ctrl_std / N ** 0.5)
    ref = Reference(ctrl_mean, ctrl_std, cells.mean(0), cells.mean(0) - ctrl_mean, t,
                    t.abs().argsort(descending=True)[:n_de], cells)
    x = (ctrl_mean + effect + ctrl_std * torch.randn(B, G, generator=g)).clamp_min(0)  # (B, G)
    v = V.Verifier(genes)
    W = v.W
    print(f"B={B} generated, N={N} real, G={G} genes, n_de={n_de}, P={W.shape[0]} pathways, "
          f"threads={torch.get_num_threads()}, torch {torch.__version__}")
    runs = {
        "pearson_topk": lambda: V.pearson_topk(x, ref),
        "rmse_topk": lambda: V.rmse_topk(x, ref),
        "de_spearman": lambda: V.de_spearman(x, ref),
        "pathway_activity": lambda: V.pathway_activity(x, ref, W),
        "energy_witness": lambda: V.energy_witness(x, ref),
        "Verifier (all five)": lambda: v(x, ref),
    }
    with torch.no_grad():
        for name, f in runs.items():
            print(f"{name:22s} {median_ms(f):8.2f} ms")


if __name__ == "__main__":
    main()
