"""Peak memory and wall time on large synthetic sparse screens: load, 100 flow steps, 5 GRPO steps.

    python bench/bench_data.py                     # 100,000 cells x 5,000 genes, ~10% non-zero counts
    python bench/bench_data.py --cells 1000000     # the million-cell screen
    python bench/bench_data.py --lazy              # load with --lazy (X read from disk in row chunks)
    python bench/bench_data.py --only load         # just the load (also: --stages, peak after each step)
    python bench/bench_data.py --root DIR          # measure another checkout's code on the same file

The screen: raw counts ~ Poisson(lib_c exp(mu_g + e_kg)), mu_g ~ N(log 0.06, 1.2) (about 10% of entries non-zero,
like real Perturb-seq), 15% control cells, 100 single knock-downs of named genes (the target's rate x 0.1 and 30
other genes shifted) and 130 pairs (the sum of the singles' effects); gene names partly PROGENy genes so the
pathway reward has gene sets. It is written in blocks of 5,000 cells straight into the h5ad's CSR datasets
(never the whole matrix in memory) and cached in /tmp/prl_bench. Every measurement runs in a fresh subprocess,
so ru_maxrss (peak resident set size) belongs to that step alone; the flow and GRPO runs include their load,
the pretraining's zero calibration and validation, and GRPO's two validations (with --ref-cells 500 real cells
per condition: the metrics compare every pair of real cells, 4,300 per condition at 1M cells).
"""
import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import h5py
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402

LIMIT_GIB = 8.0

PRELUDE = """
import sys, time, resource, json, os
sys.path.insert(0, {root!r})
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20     # GiB (ru_maxrss is KiB)
t0 = time.perf_counter()
"""

LOAD = PRELUDE + """
import data
if {stages}:                                   # wrap the stages to print the peak after each one
    for name in ["read_h5ad", "check_values", "is_counts", "log_normalise", "gene_stats", "select_genes"]:
        if hasattr(data, name):
            f = getattr(data, name)
            def wrapped(*a, _f=f, _n=name, _seen=set(), **k):
                out = _f(*a, **k)
                if _n not in _seen:                # the first call of each (gene_stats also runs per reference)
                    _seen.add(_n)
                    print(f"  after {{_n:14s}} {{time.perf_counter() - t0:6.1f}} s  peak {{peak():.2f}} GiB",
                          file=sys.stderr)
                return out
            setattr(data, name, wrapped)
kw = {{**(dict(lazy=True) if {lazy} else {{}}), **(dict(ref_cells={ref}) if {ref} else {{}})}}   # (older code: neither)
t0 = time.perf_counter()
ds = data.load_dataset(data.DataConfig(data={path!r}, n_genes=2000, **kw))
print(json.dumps(dict(t=time.perf_counter() - t0, peak=peak(), shape=ds.X.shape, keys=len(ds.keys))))
"""

FLOW = PRELUDE + """
import flow
t0 = time.perf_counter()
flow.train(flow.FlowConfig(data={path!r}, n_genes=2000, lazy={lazy}, ref_cells={ref}, steps=100, out={out!r},
                           progress=False, eval_every=100, save_every=100))
print(json.dumps(dict(t=time.perf_counter() - t0, peak=peak())))
"""

GRPO = PRELUDE + """
import rl
t0 = time.perf_counter()
rl.train(rl.RLConfig(ckpt={ckpt!r}, out={out!r}, steps=5, eval_every=5, progress=False))
print(json.dumps(dict(t=time.perf_counter() - t0, peak=peak())))
"""


def synthesize(path, n_cells, n_genes, n_singles=100, n_combos=130, block=5000, seed=0):
    """Write the synthetic screen to `path` block by block (see the module docstring); returns nnz."""
    rng = np.random.default_rng(seed)
    progeny = np.genfromtxt(ROOT / "pathways" / "progeny_human_top500.csv", delimiter=",", names=True,
                            dtype=None, encoding="utf-8")["gene"]
    named = list(dict.fromkeys(progeny))[: int(0.6 * n_genes)]
    genes = np.array(named + [f"SYN{i:05d}" for i in range(n_genes - len(named))], dtype=object)
    mu = rng.normal(np.log(0.06), 1.2, n_genes)
    targets = rng.choice(np.argsort(-mu)[: n_genes // 4], n_singles, replace=False)   # expressed genes
    E = np.zeros((n_singles, n_genes))
    for i, g in enumerate(targets):                                   # once per single perturbation
        E[i, rng.choice(n_genes, 30, replace=False)] = rng.normal(0, 0.5, 30)
        E[i, g] = np.log(0.1)
    pairs = set()
    while len(pairs) < n_combos:
        pairs.add(tuple(sorted(rng.choice(n_singles, 2, replace=False))))
    pairs = sorted(pairs)
    E = np.vstack([E, [E[a] + E[b] for a, b in pairs]]).astype(np.float32)               # (K, G)
    names = [f"{genes[g]}+ctrl" for g in targets] + [f"{genes[targets[a]]}+{genes[targets[b]]}" for a, b in pairs]
    k_of = np.where(rng.random(n_cells) < 0.15, -1, rng.integers(len(names), size=n_cells))
    tmp = str(path) + ".tmp"
    nnz = 0
    with h5py.File(tmp, "w") as f:
        data._enc(f, "anndata", "0.1.0")
        x = data._enc(f.create_group("X"), "csr_matrix", "0.1.0")
        x.attrs["shape"] = np.array([n_cells, n_genes], dtype=np.int64)
        dv = x.create_dataset("data", (0,), np.float32, maxshape=(None,), chunks=(1 << 20,))
        di = x.create_dataset("indices", (0,), np.int32, maxshape=(None,), chunks=(1 << 20,))
        indptr = [np.zeros(1, np.int64)]
        for s in range(0, n_cells, block):                             # blocks of cells, not a cell loop
            k = k_of[s:s + block]
            lib = np.exp(rng.normal(0, 0.3, len(k)))[:, None]
            rate = lib * np.exp(mu + np.where(k[:, None] >= 0, E[np.maximum(k, 0)], 0))    # (b, G)
            counts = rng.poisson(rate.astype(np.float32))
            r, c = np.nonzero(counts)                                   # row-major: CSR order
            v = counts[r, c].astype(np.float32)
            dv.resize((nnz + len(v),))
            di.resize((nnz + len(v),))
            dv[nnz:], di[nnz:] = v, c.astype(np.int32)
            indptr.append(nnz + np.cumsum(np.bincount(r, minlength=len(k))))
            nnz += len(v)
        x.create_dataset("indptr", data=np.concatenate(indptr))
        cond = np.array(["ctrl"] + names, dtype=object)[k_of + 1]
        data._write_frame(f.create_group("obs"), np.char.add("c", np.arange(n_cells).astype(str)).astype(object),
                          {"condition": cond}, n_cells, None)
        data._write_frame(f.create_group("var"), genes, {}, n_genes, None)
        for g in ("layers", "obsm", "obsp", "varm", "varp", "uns"):
            data._enc(f.create_group(g), "dict", "0.1.0")
    os.replace(tmp, path)
    return nnz


def run(code, root):
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(root)})
    if out.returncode:
        sys.exit(out.stderr[-3000:])
    err = [ln for ln in out.stderr.splitlines() if ln.startswith("  after")]
    if err:
        print("\n".join(err))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cells", type=int, default=100_000)
    p.add_argument("--genes", type=int, default=5000)
    p.add_argument("--lazy", action="store_true", help="load with --lazy")
    p.add_argument("--only", choices=["load", "all"], default="all")
    p.add_argument("--stages", action="store_true", help="print peak RSS after each load stage")
    p.add_argument("--ref-cells", type=int, default=500, help="--ref-cells: the validation metrics are O(N^2) in "
                   "the real cells of a condition (4,300 here at 1M cells)")
    p.add_argument("--root", default=str(ROOT), help="the checkout whose code is measured (older code: --only load "
                   "--ref-cells 0)")
    a = p.parse_args()
    root = os.path.abspath(a.root)
    path = pathlib.Path(f"/tmp/prl_bench/sparse_{a.cells}x{a.genes}.h5ad")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        nnz = synthesize(path, a.cells, a.genes)
        print(f"wrote {path}: {time.perf_counter() - t0:.0f} s, nnz {nnz:,} (density {nnz / a.cells / a.genes:.3f})")
    print(f"file {path} ({path.stat().st_size / 2**30:.2f} GiB on disk); code {root}; lazy={a.lazy}, "
          f"ref_cells={a.ref_cells}")
    ok = lambda r: "OK" if r["peak"] < LIMIT_GIB else f"OVER {LIMIT_GIB:g} GiB"  # noqa: E731
    r = run(LOAD.format(root=root, path=str(path), stages=a.stages, lazy=a.lazy, ref=a.ref_cells), root)
    print(f"load_dataset(n_genes=2000):     {r['t']:7.1f} s, peak RSS {r['peak']:.2f} GiB ({ok(r)}); "
          f"X {r['shape'][0]} x {r['shape'][1]}, {r['keys']} keys")
    if a.only == "load":
        return
    with tempfile.TemporaryDirectory() as tmp:
        cache = {"PERTURBCELLRL_CACHE": tmp}
        os.environ.update(cache)
        r = run(FLOW.format(root=root, path=str(path), lazy=a.lazy, ref=a.ref_cells, out=f"{tmp}/flow.pt"), root)
        print(f"flow.py, 100 steps (with load): {r['t']:7.1f} s, peak RSS {r['peak']:.2f} GiB ({ok(r)})")
        r = run(GRPO.format(root=root, ckpt=f"{tmp}/flow.pt", out=f"{tmp}/rl.pt"), root)
        print(f"rl.py, 5 GRPO steps (with load): {r['t']:6.1f} s, peak RSS {r['peak']:.2f} GiB ({ok(r)})")


if __name__ == "__main__":
    main()
