"""Evaluation stage: generate cells for held-out conditions and score them beside simple baselines.

    python evaluate.py --data X.h5ad --ckpt flow.pt rl.pt [--split test|val] [--sampler midpoint --ode-steps 20]
                       [--n-cells N] [--best-of 1,4,16] [--out results.json] [--write-pred pred.h5ad]

For every held-out (condition, covariate) it generates as many cells as the real condition has, each from
a control cell of the same covariate, and prints one markdown table (methods x metrics, averaged over
conditions); the JSON keeps per-condition rows. Three kinds of metric:
  reward-aligned  the verifiers of verifiers.py, averaged over generated cells
  held-out        never a reward: discrimination score, DE direction agreement, DE overlap
  population      Pearson of mean deltas (all genes, top-20 DE), MSE/MAE/R^2 of means, energy, MMD
plus two diagnostics of reward hacking: effect-size ratio and spread ratio (1 is perfect).
Baselines in the same table: control, training mean, additive (sum of the seen singles' deltas).
Checkpoints are sampled with the ODE and, since RL trains the SDE, also with the SDE (`--sde-noise`);
`--best-of N` adds rows `<ckpt> best-of-N`: N ODE candidates per cell, the one the verifiers score highest
against a pseudo-reference built from training data only (best_of_n, pseudo_reference).

Left out: DE tests other than Welch t (cell-eval's Wilcoxon-based DE metrics), per-cell-type breakdowns,
confidence intervals over conditions.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import warnings
from dataclasses import dataclass, field, fields

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: spinning threads stall a shared CPU

import numpy as np
import torch
from einops import rearrange

import data
import flow
import verifiers
from data import UserError

POPULATION = ["pearson_delta", "pearson_delta_de20", "interaction", "mse", "mae", "r2", "energy", "mmd"]
HELD_OUT = ["discrimination", "de_direction", "de_overlap"]
DIAGNOSTIC = ["effect_ratio", "spread_ratio"]


# ----------------------------------------------------------------------------- generation
def dataset_for(ckpt: dict, data_path=None) -> data.Dataset:
    """The dataset a checkpoint was trained on: its data options, genes and split (a warning when the data file is not
    the one it recorded)."""
    cfg = data.DataConfig(**{f.name: ckpt["config"][f.name] for f in fields(data.DataConfig) if f.name in ckpt["config"]})
    if data_path is not None:
        cfg.data = data_path
    path = os.path.abspath(cfg.data) if cfg.data else data.builtin_path(cfg.kind)
    if ckpt.get("data_id") not in (None, now := data.file_identity(path)):     # size, time, first MiB
        warnings.warn(f"{path} is not the data file the checkpoint was trained on (size:time:SHA-1 {ckpt['data_id']}, "
                      f"now {now}); using its genes and split on it")
    ds = data.load_dataset(cfg, genes=ckpt["genes"], split=ckpt["split"])
    if ckpt.get("dose_range"):                      # the log-dose scale the generator was trained with
        ds.meta["dose_range"] = tuple(ckpt["dose_range"])
    return ds


def pseudo_reference(ds, key, trust=None, n_de=50, std_floor=0.1, max_cells=1000):
    """A stand-in for the real cells of a held-out (condition, covariate), from training data only: the control
    cells of its covariate shifted by Dataset.start(key), i.e. by the part of the additive prior the training
    data trust (prior_trust). For a combination that is the sum of its singles' deltas; for an unseen dose of a
    seen drug, the log-dose interpolation between that drug's neighbouring seen doses; for a key whose prior is
    not trusted, the trusted training-mean delta (mcfaline23's cell-line transfer). Its DE genes (top |Welch t|
    of the shifted cells against the controls) are then the singles' or neighbouring doses' DE genes, and its
    pathway activities the controls' moved by theirs. Why the trusted shift and not the plain sum: it is what
    the training data say predicts held-out deltas best (the sum exaggerates on the simulator, c = 0.84), and
    the generator starts from it anyway. None when the shift is zero (an unseen single with nothing trusted to
    build on): no pseudo-reference, so no selection. Reads control cells and training references only: never
    ds.refs[key] or the key's cells."""
    shift = ds.start(key, trust)                 # the trusted prior, else the trusted training-mean delta
    if not np.any(shift):
        return None
    rows = ds.ctrl_idx[key[1]]
    ctrl = ds.X[rows]
    std = ctrl.std(0, ddof=1) if len(ctrl) > 1 else np.zeros(ctrl.shape[1], np.float32)
    cells = np.maximum(ctrl[:max_cells] + shift, 0).astype(np.float32)          # (n, G) shifted control cells
    return data.reference(cells, rows, ctrl.mean(0), std, n_de, std_floor)


@torch.no_grad()
def best_of_n(model, ds, keys, N, verifier, n_cells=None, steps=20, method="midpoint", seed=0, n_de=50,
              std_floor=0.1) -> dict:
    """Best-of-N at test time: for each cell to predict, N candidates, each from its own control cell of the
    covariate and noise (the ODE sampler of flow.generate: a control cell plus the generator's change); keep the one
    that scores highest under `verifier` against pseudo_reference(key), never against the key's real cells.
    Score: sum_r w_r (s_r - mean s_r) / (std s_r + 1e-8), each reward's scores s_r standardised over all n N
    candidates of the condition (unbiased std; the raw rewards differ ~10x in scale), weighted by verifier.weights.
    N = 1 is flow.generate; no pseudo-reference: the first candidate.
    Selection pulls cells towards the pseudo-reference, so it can shrink their spread: read spread_ratio.
    n_cells: as in flow.generate (None reads only how many real cells each key has). Returns {key: (n, G)}."""
    cand = flow.generate(model, ds, keys, n_cells, steps, method, 0.0, seed, repeat=N)
    trust = ds.prior_trust() if N > 1 else None
    out = {}
    for k in keys:
        x = rearrange(cand[k], "(n N) g -> n N g", N=N)                          # (n, N, G)
        ref = pseudo_reference(ds, k, trust, n_de, std_floor) if N > 1 else None
        if ref is None:
            out[k] = x[:, 0]
            continue
        _, scores = verifier(cand[k], ref)
        score = sum(w * (scores[r] - scores[r].mean()) / (scores[r].std() + 1e-8) for r, w in verifier.weights.items())
        out[k] = x[torch.arange(len(x)), score.reshape(-1, N).argmax(1)]                       # (n * N,) -> (n, N)
    return out


def baselines(ds, keys, n_cells=None, seed=0) -> dict:
    """{name: {key: cells or None}}: control cells of the covariate; control + the mean delta of the covariate's
    training perturbations (Dataset.mean_delta); control + additive prior (None where a component has no training
    single); control + the start predictor (Dataset.start: where the generator starts, what it is with no trust)."""
    g = torch.Generator().manual_seed(seed)
    n = [n_cells or len(ds.cell_idx[k]) for k in keys]
    ctrl = [torch.from_numpy(ds.X[r]) for r in data.control_rows(ds, keys, n, g)]  # as flow.generate's, same seed
    out = {"control": {}, "train_mean": {}, "additive": {}, "start": {}}
    for k, x in zip(keys, ctrl):
        out["control"][k] = x
        out["start"][k] = (x + torch.from_numpy(ds.start(k))).clamp(min=0)              # the generator with lam 0
        out["train_mean"][k] = (x + torch.from_numpy(ds.mean_delta(k))).clamp(min=0)   # the key itself left out
        ok = all(d is not None for d in ds.component_deltas(k))   # every drug has a training single (any dose)
        out["additive"][k] = (x + torch.from_numpy(ds.additive_delta(k))).clamp(min=0) if ok else None
    return out


# ----------------------------------------------------------------------------- metrics
def mmd_rbf(x, y, scales=(0.5, 1.0, 2.0)):
    """Unbiased MMD^2 (Gretton et al. 2012) with k(a, b) = sum_s exp(-||a - b||^2 / (2 (s m)^2)), where m is
    the median pairwise distance between the real cells and s in `scales` (bandwidths m/2, m, 2m)."""
    dyy = data.cdist(y, y)
    m = dyy[~torch.eye(len(y), dtype=torch.bool)].median().clamp(min=1e-6) if len(y) > 1 else torch.tensor(1.0)
    k = lambda d: sum(torch.exp(-d ** 2 / (2 * (s * m) ** 2)) for s in scales)  # noqa: E731
    kxx, kyy, kxy = k(data.cdist(x, x)), k(dyy), k(data.cdist(x, y))
    n, p = len(x), len(y)
    off = lambda a, q: (a.sum() - a.diagonal().sum()) / max(q * (q - 1), 1)  # noqa: E731
    return float(off(kxx, n) + off(kyy, p) - 2 * kxy.mean())


def metrics(x, ref: data.Reference, n_ctrl: int, verifier=None) -> dict:
    """Per-condition metrics of generated cells x (n, G) against the real condition (Reference).
    pearson_delta: Pearson over genes of (mean x - control mean) vs (real mean - control mean), both against
      the REAL control mean of the covariate (cell-eval's pearson_delta); _de20 on the 20 top real DE genes.
    mse, mae: of the pseudobulk means over all genes (cell-eval's mse/mae); r2: 1 - SS_res / SS_tot of the
      mean deltas (on raw means the control cells alone score about 0.96).
    de_direction: fraction of the real top DE genes whose predicted change has the real sign.
    de_overlap: |top-N predicted DE ∩ top-N real DE| / N, N = n_de, both ranked by |Welch t| vs control.
    effect_ratio: ||mean x - control mean|| / ||real delta||; spread_ratio: mean per-gene std of x over the
      real cells' (caricatures push the first above 1, collapse pushes the second below 1)."""
    x = x.float()
    ref = ref.dense()                                         # sparse reference cells densified once
    y = ref.X
    pm, pd = x.mean(0), x.mean(0) - ref.ctrl_mean
    de, de20 = ref.de_idx, ref.de_idx[:20]
    pv = x.var(0) if len(x) > 1 else torch.zeros_like(pm)
    t_pred = data.welch_t(pd, pv, len(x), ref.ctrl_std, n_ctrl)
    top_pred = torch.topk(t_pred.abs(), len(de)).indices
    m = {
        "pearson_delta": float(data.pearson_rows(pd, ref.delta)),
        "pearson_delta_de20": float(data.pearson_rows(pd[de20], ref.delta[de20])),
        "mse": float((pm - ref.mean).pow(2).mean()),
        "mae": float((pm - ref.mean).abs().mean()),
        "r2": float(1 - (pd - ref.delta).pow(2).sum() / (ref.delta - ref.delta.mean()).pow(2).sum().clamp(min=1e-12)),
        "energy": data.energy_distance(x, y),
        "mmd": mmd_rbf(x, y),
        "de_direction": float((torch.sign(pd[de]) == torch.sign(ref.delta[de])).float().mean()),
        "de_overlap": len(set(top_pred.tolist()) & set(de.tolist())) / len(de),
        "effect_ratio": float(pd.norm() / ref.delta.norm().clamp(min=1e-12)),
        "spread_ratio": float(x.std(0).mean() / y.std(0).mean().clamp(min=1e-12)) if len(x) > 1 else float("nan"),
    }
    if verifier is not None:
        _, scores = verifier(x, ref)
        m.update({f"reward/{name}": float(r.mean()) for name, r in scores.items()})
    return m


def interaction(pred_delta, real_delta, singles) -> float:
    """Interaction score of a combination: regress each mean delta of A+B on the training deltas of its
    singles over genes, d = c_A d_A + c_B d_B + e (Norman et al. 2019's genetic-interaction model, no
    intercept, least squares), and correlate the residuals e of the prediction and of the real cells.
    Any scaled or shrunk additive prediction has e = 0 and scores 0; only predicted gene-specific
    interactions score above 0. singles (m, G)."""
    D = singles.double().T                                                      # (G, m)
    e = lambda d: d.double() - D @ torch.linalg.lstsq(D, d.double()[:, None]).solution[:, 0]  # noqa: E731
    e_pred = e(pred_delta)
    if e_pred.norm() <= 1e-9 * pred_delta.double().norm():                     # additive up to rounding
        return 0.0
    return float(data.pearson_rows(e_pred, e(real_delta)))


def discrimination(pred_delta, real_delta, exclude) -> torch.Tensor:
    """For each predicted condition i: rank_i = #{j : d(P_i, R_j) < d(P_i, R_i)}, d = L1 distance between
    pseudobulk deltas over all genes except condition i's own perturbed genes (`exclude[i]`, a list of gene
    indices: their change is trivially predictable); score_i = 1 - rank_i / K (1 = its own condition is nearest).
    pred_delta, real_delta (K, G)."""
    K = len(pred_delta)
    mask = torch.ones(K, pred_delta.shape[1])                                  # (K, G) genes kept for row i
    for i, ex in enumerate(exclude):
        mask[i, ex] = 0
    d = ((pred_delta[:, None, :] - real_delta[None, :, :]).abs() * mask[:, None, :]).sum(-1)  # (K, K)
    rank = (d < d.diagonal()[:, None]).sum(1)
    return 1 - rank.float() / K


def evaluate_methods(ds, preds: dict, keys, verifier=None) -> list:
    """Rows {method, condition, covariate, metric: value} for every method in preds {method: {key: cells}}."""
    gene_pos = {g: i for i, g in enumerate(ds.genes)}
    exclude = [[gene_pos[n] for n, _ in data.components_of(k[0]) if n in gene_pos] for k in keys]
    real_delta = torch.stack([ds.refs[k].delta for k in keys])
    rows = []
    for method, cells in preds.items():
        ok = [k for k in keys if cells.get(k) is not None]
        if not ok:
            continue
        ms = {k: metrics(cells[k], ds.refs[k], len(ds.ctrl_idx[k[1]]), verifier) for k in ok}
        for k in ok:                                          # combinations whose singles were all trained on
            singles = ds.component_deltas(k)
            if len(singles) > 1 and all(d is not None for d in singles):
                ms[k]["interaction"] = interaction(cells[k].float().mean(0) - ds.refs[k].ctrl_mean, ds.refs[k].delta,
                                                   torch.from_numpy(np.stack(singles)))
        if len(ok) == len(keys):
            pred_delta = torch.stack([cells[k].float().mean(0) - ds.refs[k].ctrl_mean for k in keys])
            for k, s in zip(keys, discrimination(pred_delta, real_delta, exclude)):
                ms[k]["discrimination"] = float(s)
        rows += [{"method": method, "condition": k[0], "covariate": k[1], **ms[k]} for k in ok]
    return rows


def summarize(rows) -> dict:
    """{method: {metric: mean over conditions}} (a metric missing for some conditions: mean over the rest)."""
    out = {}
    for r in rows:
        out.setdefault(r["method"], {}).setdefault("n", 0)
        out[r["method"]]["n"] += 1
        for k, v in r.items():
            if isinstance(v, float):
                out[r["method"]].setdefault(k, []).append(v)
    summ = {m: {k: (float(np.mean(v)) if isinstance(v, list) else v) for k, v in d.items()} for m, d in out.items()}
    for m, d in out.items():                                   # the interaction score varies a lot: its spread too
        if "interaction" in d:
            summ[m]["interaction_sd"] = float(np.std(d["interaction"]))
    return summ


def report(summary: dict, columns=None) -> str:
    """A markdown table: methods as rows, metrics as columns; n/a where a method has no value."""
    first = next(iter(summary.values()))
    columns = columns or [c for c in first if c.startswith("reward/")] + HELD_OUT + POPULATION + DIAGNOSTIC
    head = "| method | n | " + " | ".join(c.replace("reward/", "r:") for c in columns) + " |"
    lines = [head, "|" + "---|" * (len(columns) + 2)]
    for m, d in summary.items():
        cells = [f"{d[c]:.3f}" + (f" ± {d[c + '_sd']:.2f}" if c + "_sd" in d else "") if c in d else "n/a" for c in columns]
        lines.append(f"| {m} | {d['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_pred(path, ds, cells: dict) -> None:
    """An h5ad that standard evaluators read as predictions: the data's control cells plus `cells`
    {key: (n, G)}, the data's perturbation column name and control label, the same gene order, log1p values."""
    keys = list(cells)
    ctrl = np.concatenate([ds.ctrl_idx[c] for c in ds.covariates])
    X = np.concatenate([ds.X[ctrl]] + [np.asarray(cells[k], np.float32) for k in keys])
    labels = ds.meta.get("labels", {})
    dosed = bool(ds.meta.get("dose_key"))    # drugs: names 'A+B' and doses 'dA+dB' in the data's unit, controls 0
    label = {k: data.names_of(k[0]) if dosed else labels.get(k[0], k[0]) for k in keys}
    pert = [ds.meta["control"]] * len(ctrl) + [label[k] for k in keys for _ in range(len(cells[k]))]
    obs = {ds.meta["pert_key"]: np.array(pert, dtype=object)}
    if dosed:
        f, key = ds.meta.get("dose_factor", 1.0), ds.meta["dose_key"]
        dose = {k: "+".join(data.fmt_dose(d / f) if d is not None else "nan" for _, d in data.components_of(k[0]))
                for k in keys}
        obs["dose" if "," in key else key] = np.array(["0"] * len(ctrl) + [dose[k] for k in keys
                                                                          for _ in range(len(cells[k]))], dtype=object)
    if ds.meta.get("cov_key"):
        obs[ds.meta["cov_key"]] = np.array(list(ds.cov[ctrl]) + [k[1] for k in keys for _ in range(len(cells[k]))],
                                           dtype=object)
    data.write_h5ad(path, data.H5AD(X=X, obs=obs, var={}, obs_names=np.array([f"c{i}" for i in range(len(X))], dtype=object),
                                    var_names=np.array(ds.genes, dtype=object)))


def strict(x):
    """x with every NaN/Inf float replaced by None (null in JSON), so strict JSON parsers read the file."""
    if isinstance(x, dict):
        return {k: strict(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [strict(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else x


# ----------------------------------------------------------------------------- CLI
def parse_best_of(spec) -> list:
    """--best-of '1,4,16' -> [1, 4, 16]; None -> []; anything but integers >= 1 is one clear line."""
    try:
        ns = [int(v) for v in spec.split(",") if v.strip()] if spec else []
    except ValueError:
        ns = [0]
    if spec and (not ns or min(ns) < 1):
        raise UserError(f"--best-of {spec}: N must be integers >= 1 (1 = the plain sampler), e.g. --best-of 1,4,16")
    return ns


def check_checkpoint(path, ckpt, allow=False) -> None:
    """One line for a checkpoint that cannot be sampled as it is (NaN/Inf weights: data.read_checkpoint): a dose range
    that is not two doses 0 < lo <= hi (key_table's log-dose scale), or a pretraining that stopped before its --steps
    (Ctrl-C, --stop-at: never calibrated, flow.calibrate) unless allowed (--allow-unfinished; RL checkpoints stop at
    their best step): its advice is the flow.py command that finishes it (resume_command)."""
    dr = ckpt.get("dose_range")
    if dr is not None and not (np.shape(dr) == (2,) and 0 < float(dr[0]) <= float(dr[1]) < np.inf):
        raise UserError(f"{path} has the dose range {dr!r}, not two doses 0 < lo <= hi: damaged; retrain it")
    if not allow and "base" not in (ckpt.get("extra") or {}) and ckpt.get("step", 0) < ckpt["config"].get("steps", 0):
        raise UserError(f"{path} is an unfinished pretraining (step {ckpt['step']} of {ckpt['config']['steps']}, never "
                        f"calibrated): finish it with `{resume_command(path, ckpt['config'])}`, or --allow-unfinished")


def resume_command(path, cfg: dict) -> str:
    """The flow.py command that finishes the pretraining `path` as it was configured (its stored config `cfg`): its
    --data, --steps and every other option it was given (not the default), but for --stop-at and the hardware's."""
    skip = {"data", "steps", "out", "resume", "stop_at"} | {n for n, (g, _) in data.field_help(flow.FlowConfig).items()
                                                             if g in ("hardware", "set from the data")}
    args = ["--data", cfg["data"]] * bool(cfg.get("data")) + ["--steps", str(cfg["steps"])]
    for f in (f for f in fields(flow.FlowConfig) if f.name not in skip and cfg.get(f.name, f.default) != f.default):
        flag, v = f.name.replace("_", "-"), cfg[f.name]
        args += [f"--{'no-' * (not v)}{flag}"] if isinstance(f.default, bool) else [f"--{flag}", str(v)]
    return shlex.join(["python", "flow.py", *args, "--out", str(path), "--resume"])


def check_best_of(best_of, n_cells: int, n_genes: int) -> None:
    """best_of_n holds N candidates of every cell to predict at once, n_cells x N x n_genes float32 values: refuse,
    with the numbers, an N whose candidates need more than half of this machine's memory."""
    mem = data.memory()                                               # inf without sysconf (Windows): no bound
    per = n_cells * n_genes * 4                                       # bytes per candidate of every cell
    for N in best_of:
        if N * per > mem / 2:
            raise UserError(f"--best-of {N}: its candidates need {N * per / 2 ** 30:,.1f} GiB ({n_cells} cells x {N} x "
                            f"{n_genes} genes x 4 bytes), more than half of this machine's {mem / 2 ** 30:.1f} GiB; "
                            f"use N <= {int(mem / 2 // per)} here, or fewer cells (--n-cells)")


@dataclass
class EvalConfig(verifiers.RewardConfig):  # + --rewards, --gene-sets, --topk
    # evaluation
    ckpt: list = field(default_factory=list)  # one or more checkpoints (flow.pt, rl.pt); required
    data: str | None = None         # h5ad to evaluate on (None: the data the checkpoint was trained on)
    split: str = "test"             # the conditions evaluated: test | val | train
    sampler: str = "midpoint"       # ODE sampler: midpoint | euler
    ode_steps: int = 20             # ODE steps
    sde_noise: float = 0.7          # also sample checkpoints with the RL SDE at this noise level (0 = off)
    sde_steps: int | None = None    # SDE steps (None: the T of the checkpoint's RL rollouts; 10 for a flow.pt)
    n_cells: int | None = None      # cells per condition (None: as many as the real one)
    best_of: str | None = None      # also report best-of-N selection (best_of_n) for these N, e.g. 1,4,16
    seed: int = 0                   # seed of the control cells drawn and of sampling
    allow_unfinished: bool = False  # evaluate a pretraining that stopped before its --steps (never calibrated)
    out: str | None = None          # write per-condition rows and the summary as JSON
    write_pred: str | None = None   # write the first checkpoint's ODE predictions as h5ad
    # hardware
    device: str = "cpu"             # cpu | cuda | mps | auto


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    data.add_args(p, EvalConfig)
    a = EvalConfig(**vars(p.parse_args(argv)))
    for flag, v, ok in [("--split", a.split, ("test", "val", "train")),
                        ("--sampler", a.sampler, ("midpoint", "euler"))]:
        if v not in ok:
            raise UserError(f"{flag} {v!r}: use {' or '.join(ok)}")
    if not a.ckpt:
        raise UserError("--ckpt is required: the checkpoint(s) to evaluate, e.g. --ckpt flow.pt rl.pt")
    data.check_args(a)
    best_of = parse_best_of(a.best_of)
    gene_sets = verifiers.gene_set_path(a.gene_sets)
    if gene_sets:
        verifiers.load_gene_sets(gene_sets)                           # a file that cannot be read: before any work
    dev = data.pick_device(a.device)
    models = [flow.load_checkpoint(c, dev) for c in a.ckpt]
    for c, (_, ck) in zip(a.ckpt, models):
        check_checkpoint(c, ck, a.allow_unfinished)
    data.check_outputs({"--out": a.out, "--write-pred": a.write_pred},
                       {"--data": a.data, "the checkpoint's data": models[0][1]["config"].get("data"),
                        "--ckpt": a.ckpt, "--gene-sets": gene_sets,
                        "the base of --ckpt": [ck.get("extra", {}).get("base") for _, ck in models]})
    ds = dataset_for(models[0][1], a.data)
    print(f"data {data.describe(ds)}")
    for c, (_, ck) in zip(a.ckpt, models):
        if ck["genes"] != models[0][1]["genes"] or ck["split"] != models[0][1]["split"]:
            raise UserError(f"{c} was trained on other genes or another split than {a.ckpt[0]}; evaluate them separately")
    keys = ds.split[a.split]
    if not keys:
        raise UserError(f"the {a.split} split is empty; choose another --split")
    check_best_of(best_of, sum(a.n_cells or len(ds.cell_idx[k]) for k in keys), len(ds.genes))
    data.check_memory(f"--n-cells {a.n_cells}", len(keys) * (a.n_cells or 0) * len(ds.genes), "lower it")
    ver = verifiers.Verifier(ds.genes, verifiers.parse_weights(a.rewards), gene_sets, a.topk)
    preds = baselines(ds, keys, a.n_cells, a.seed)
    for c, (model, ck) in zip(a.ckpt, models):
        preds[c] = flow.generate(model, ds, keys, a.n_cells, a.ode_steps, a.sampler, 0.0, a.seed)
        if a.sde_noise > 0:
            T = a.sde_steps or ck["extra"].get("rl_config", {}).get("T", 10)
            preds[f"{c} (SDE a={a.sde_noise:g}, T={T})"] = flow.generate(model, ds, keys, a.n_cells, T, a.sampler,
                                                                         a.sde_noise, a.seed)
        for N in best_of:
            preds[f"{c} best-of-{N}"] = best_of_n(model, ds, keys, N, ver, a.n_cells, a.ode_steps, a.sampler, a.seed,
                                                  ck["config"].get("n_de", 50), ck["config"].get("std_floor", 0.1))
    rows = evaluate_methods(ds, preds, keys, ver)
    summary = summarize(rows)
    print(f"{len(keys)} {a.split} conditions of {ds.meta['path']}; ODE {a.sampler} {a.ode_steps} steps\n")
    print(report(summary))
    control = {c: flow.control_check(model, ds, seed=a.seed) for c, (model, _) in zip(a.ckpt, models)}
    print("\ncontrol condition vs held-out control cells (the generator alone; paired generation cancels it): "
          + "; ".join(f"{c}: bias {v['bias']:.2f} ({v['bias_ratio']:.2f} x the mean real effect), energy "
                      f"{v['energy']:.3f}" for c, v in control.items()))
    if a.out:
        with data.atomic_write(a.out) as tmp, open(tmp, "w") as f:
            json.dump(strict({"summary": summary, "rows": rows, "control_check": control, "args": vars(a)}), f,
                      indent=1, allow_nan=False)
    if a.write_pred:
        write_pred(a.write_pred, ds, preds[a.ckpt[0]])
        print(f"wrote predictions to {a.write_pred}")


if __name__ == "__main__":
    data.cli(main)
