"""What is signal: pretrain + GRPO for several seeds on one file and one split, then mean and spread per metric.

    python bench/seeds.py                                       # the built-in simulator, seeds 0,1,2
    python bench/seeds.py --data X.h5ad --split random --seeds 0,1,2 --split-seed 0
    python bench/seeds.py --data X.h5ad --flow source=ctrl,sigma=0.5   # a generator variant

The split is fixed by --split-seed; --seeds change only the weights and the sampling, so the spread printed
is the method's, not the split's. Every seed's checkpoints go to runs/seeds/. The table is on the held-out
test conditions, ODE sampler, baselines included (they vary with the seed only through the control cells
they draw). Prints a markdown table: mean ± standard deviation over seeds (and, for the interaction score,
its spread over conditions averaged over seeds). bench/suite.py runs this on every benchmark.
"""
import argparse
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import evaluate  # noqa: E402
import flow  # noqa: E402
import rl  # noqa: E402
import verifiers  # noqa: E402

COLS = ["reward/pearson", "reward/spearman", "discrimination", "de_direction", "de_overlap", "pearson_delta",
        "pearson_delta_de20", "interaction", "energy", "effect_ratio", "spread_ratio"]


def parse_kv(spec):
    """'a=1,b=x' -> {'a': 1, 'b': 'x'} (numbers parsed)."""
    out = {}
    for item in filter(None, (s.strip() for s in (spec or "").split(","))):
        k, _, v = item.partition("=")
        try:
            out[k] = int(v)
        except ValueError:
            try:
                out[k] = float(v)
            except ValueError:
                out[k] = {"true": True, "false": False}.get(v.lower(), v)
    return out


def run_seeds(dopts: dict, seeds, stem: str, flow_kv=None, rl_kv=None, reuse=False, out=Path("runs/seeds"),
              oracle=False):
    """Pretrain + GRPO per seed on one split (dopts: data options), evaluate the test keys beside the baselines.
    Returns ([{method: {metric: mean over conditions}} per seed], the dataset of the last seed, [{kept: the RL step
    kept, lam: its residual trust of validated and unvalidated keys, evidence: the validation keys behind them}]).
    oracle: also GRPO on the test keys' own cells (oracle_train), rows 'oracle start' and 'oracle'."""
    out.mkdir(parents=True, exist_ok=True)
    per_seed, info = [], []
    for seed in seeds:
        fck, rck, ock = (str(out / f"{stem}_{m}_s{seed}.pt") for m in ("flow", "rl", "oracle"))
        rcfg = rl.RLConfig(**dopts, seed=seed, ckpt=fck, out=rck, progress=False, **(rl_kv or {}))
        if not reuse:
            flow.train(flow.FlowConfig(**dopts, seed=seed, out=fck, progress=False, **(flow_kv or {})))
            rl.train(rcfg)
        if oracle and not (reuse and Path(ock).exists()):
            oracle_train(replace(rcfg, out=ock))
        base, ck = flow.load_checkpoint(fck)
        model, rk = flow.load_checkpoint(rck)
        ds = evaluate.dataset_for(ck, dopts.get("data"))
        keys = ds.split["test"]
        preds = evaluate.baselines(ds, keys, seed=seed)
        preds["pretrained"] = flow.generate(base, ds, keys, steps=20, seed=seed)
        preds["rl"] = flow.generate(model, ds, keys, steps=20, seed=seed)
        if oracle:                                   # both at lam 1: what GRPO can do on these very conditions
            orc, _ = flow.load_checkpoint(ock.replace(".pt", "_last.pt"))
            for name, m in (("oracle start", base), ("oracle", orc)):
                m.lam.fill_(1.0)
                preds[name] = flow.generate(m, ds, keys, steps=20, seed=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ver = verifiers.Verifier(ds.genes, None)
        per_seed.append(evaluate.summarize(evaluate.evaluate_methods(ds, preds, keys, ver)))
        fits = next(h for h in ck["extra"]["history"] if "trust_fit" in h)["trust_fit"]
        info.append({"kept": rk["step"], "lam": model.lam[1:].tolist(),
                     "evidence": ", ".join(f"{v['keys']}" for v in fits.values()) or "not fitted"})
        print(f"seed {seed}: RL checkpoint from step {rk['step']}, lam {info[-1]['lam']}", flush=True)
    return per_seed, ds, info


def oracle_train(cfg):
    """GRPO whose rollouts and rewards are the test conditions' (their own real cells), at residual trust 1 on them,
    from the same pretrained generator: a diagnostic of whether GRPO can optimise these rewards there at all, never a
    result (its last step, no selection)."""
    real = rl.setup

    def setup(c):
        run = real(c)
        run.keys = run.ds.split["test"]
        run.n_pick = min(c.conds, len(run.keys))
        run.table = {k: v.to(run.device) for k, v in run.ds.key_table(run.keys).items()}
        run.table["evidence"].zero_()                   # as if trained on: lam 1
        run.refs = {k: run.ds.refs[k].to(run.device) for k in run.keys}
        return run
    rl.setup = setup
    try:
        rl.train(cfg)
    finally:
        rl.setup = real


def mean_sd(per_seed, method, col):
    """(mean, sd) over seeds of one method's metric; None where no seed has it."""
    v = [s[method][col] for s in per_seed if col in s.get(method, {})]
    return (float(np.mean(v)), float(np.std(v))) if v else None


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=None, help="h5ad (default: the built-in simulator)")
    p.add_argument("--split", default="auto", help="auto | additive | random | explicit")
    p.add_argument("--test", default=None, help="explicit test conditions A+B,C+D")
    p.add_argument("--split-seed", type=int, default=0, help="the split (fixed across seeds)")
    p.add_argument("--seeds", default="0,1,2", help="weight/sampling seeds")
    p.add_argument("--flow", default="", help="FlowConfig overrides, e.g. steps=1000,source=ctrl")
    p.add_argument("--rl", default="", help="RLConfig overrides, e.g. steps=100,beta=2")
    p.add_argument("--tag", default="", help="name part of runs/seeds/ files")
    p.add_argument("--reuse", action="store_true", help="evaluate the runs/seeds/ checkpoints of an earlier run again")
    a = p.parse_args()
    stem = (Path(a.data).stem if a.data else "simulated") + (f"_{a.tag}" if a.tag else "")
    dopts = dict(data=a.data, split=a.split, test=a.test, split_seed=a.split_seed)
    per_seed, ds, _ = run_seeds(dopts, [int(s) for s in a.seeds.split(",")], stem, parse_kv(a.flow), parse_kv(a.rl),
                                a.reuse)
    methods = list(per_seed[0])
    print(f"\n{len(ds.split['test'])} test conditions of {ds.meta['path']}, split seed {a.split_seed}, seeds "
          f"{a.seeds}: mean ± sd over seeds\n")
    cols = COLS + ["interaction_sd"] if any("interaction_sd" in s.get(m, {}) for s in per_seed for m in methods) else COLS
    print("| method | " + " | ".join(c.replace("reward/", "r:").replace("interaction_sd", "interaction sd over conditions")
                                    for c in cols) + " |")
    print("|" + "---|" * (len(cols) + 1))
    for m in methods:
        cells = [f"{v[0]:.3f} ± {v[1]:.3f}" if (v := mean_sd(per_seed, m, c)) else "n/a" for c in cols]
        print(f"| {m} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    data.cli(main)
