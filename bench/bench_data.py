"""Peak memory and wall time of load_dataset on a Norman-sized simulated screen, and simulate() time.

    python bench/bench_data.py                   # 100,000 cells x 5,000 genes, 100 singles, 130 combos
    python bench/bench_data.py --cells 20000     # smaller
    python bench/bench_data.py --stages          # also print RSS after each stage of load_dataset

The file is simulated once and cached in /tmp (regenerated when missing). Every measurement runs in a
fresh subprocess, so ru_maxrss (peak resident set size) belongs to that step alone.
"""
import argparse
import json
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
LIMIT_GIB = 4.0

SIMULATE = """
import sys, time, resource, json
sys.path.insert(0, {root!r})
import data
t0 = time.perf_counter()
h = data.simulate(n_cells={cells}, n_genes={genes}, n_singles={singles}, n_combos={combos},
                  n_covariates={covs}, seed=0)
t_sim = time.perf_counter() - t0
if {path!r}:
    data.write_h5ad({path!r}, h)
print(json.dumps(dict(t_sim=t_sim, t_total=time.perf_counter() - t0, nnz=int(h.X.nnz), shape=h.X.shape,
                      peak=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)))
"""

LOAD = """
import sys, time, resource, json
sys.path.insert(0, {root!r})
import data
t0 = time.perf_counter()
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20     # GiB (ru_maxrss is KiB)
if {stages}:                                   # wrap the stages to print the peak after each one
    for name in ["read_h5ad", "check_values", "is_counts", "log_normalise", "gene_stats", "select_genes"]:
        f = getattr(data, name)
        def wrapped(*a, _f=f, _n=name, **k):
            out = _f(*a, **k)
            print(f"  after {{_n:14s}} {{time.perf_counter() - t0:6.1f}} s  peak {{peak():.2f}} GiB", file=sys.stderr)
            return out
        setattr(data, name, wrapped)
t0 = time.perf_counter()
ds = data.load_dataset(data.DataConfig(data={path!r}, n_genes=2000))
t = time.perf_counter() - t0
print(json.dumps(dict(t=t, peak=peak(), shape=ds.X.shape, keys=len(ds.keys))))
"""


def run(code):
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode:
        sys.exit(out.stderr)
    if out.stderr.strip():
        print(out.stderr.rstrip())
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cells", type=int, default=100_000)
    p.add_argument("--genes", type=int, default=5000)
    p.add_argument("--singles", type=int, default=100)
    p.add_argument("--combos", type=int, default=130)
    p.add_argument("--covariates", type=int, default=1)
    p.add_argument("--stages", action="store_true", help="print peak RSS after each load stage")
    args = p.parse_args()
    path = pathlib.Path(f"/tmp/prl_bench/sim_{args.cells}x{args.genes}_{args.singles}s{args.combos}c"
                        f"_{args.covariates}cov.h5ad")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        r = run(SIMULATE.format(root=str(ROOT), cells=args.cells, genes=args.genes, singles=args.singles,
                                combos=args.combos, covs=args.covariates, path=str(path)))
        print(f"simulate {args.cells} x {args.genes}: {r['t_sim']:.1f} s (+ write {r['t_total'] - r['t_sim']:.1f}"
              f" s), peak {r['peak']:.2f} GiB, nnz {r['nnz']:,} (density {r['nnz'] / args.cells / args.genes:.3f})")
    print(f"file {path} ({path.stat().st_size / 2**30:.2f} GiB on disk)")
    r = run(LOAD.format(root=str(ROOT), path=str(path), stages=args.stages))
    ok = "OK" if r["peak"] < LIMIT_GIB else f"OVER the {LIMIT_GIB} GiB limit"
    print(f"load_dataset(n_genes=2000): {r['t']:.1f} s, peak RSS {r['peak']:.2f} GiB ({ok}); "
          f"X {r['shape'][0]} x {r['shape'][1]}, {r['keys']} keys")
    r = run(SIMULATE.format(root=str(ROOT), cells=6000, genes=1000, singles=40, combos=30, covs=1, path=""))
    print(f"simulate() default 6000 x 1000: {r['t_sim']:.2f} s, peak {r['peak']:.2f} GiB, "
          f"density {r['nnz'] / 6000 / 1000:.3f}")


if __name__ == "__main__":
    main()
