"""RL stage: GRPO post-training of the flow generator, rewarded by the cell-level verifiers.

    python rl.py --data norman.h5ad --ckpt flow.pt --out rl.pt   # post-train a pretrained generator
    python rl.py [--kind chemical]                               # everything on a built-in simulator
    python rl.py --out rl.pt --resume                            # continue an interrupted run

One step (Flow-GRPO, Liu et al. 2025, adapted to cells):
  1. rollout: for a batch of training (condition, covariate) pairs, a group of n cells each (n control
     contexts of that covariate, independent noise), T steps of flow.sde_step, recording states x_t and
     log-probabilities log p_old(x_{t+1} | x_t), no gradients;
  2. reward: score the decoded cells with verifiers.Verifier; each component is normalised within its
     group, A = sum_k w_k (r_k - mean_group r_k) / (std_group r_k + eps), clipped to +/- adv_clip;
  3. update: ratio = p_theta / p_old of each recorded transition (the exact Gaussian density, summed over
     genes), PPO-clipped surrogate  -min(ratio A, clip(ratio, 1 - eps, 1 + eps) A)  plus
     beta * KL(p_theta || p_ref) = beta ||mean_theta - mean_ref||^2 / (2 std^2), the closed form for two
     Gaussians with one std, against the frozen pretrained model; AdamW with gradient clipping.
Every eval_every steps the ODE sampler generates cells for validation conditions (never rolled out); the
checkpoint with the best validation score, which contains a metric that is not a reward, is the result.

Scales: the log-density is summed over G genes, so a small change of the mean moves log-ratios by O(G)
more than a per-gene average would; clip = 0.2 (standard PPO) then binds, and beta multiplies a KL that is
also a sum over genes. Averaging over genes (Flow-GRPO's image convention) makes ratios move ~1e-4: no
clip range binds and the update is plain REINFORCE.

Data-parallel: `torchrun --nproc_per_node N rl.py ...`. --conds is the number of conditions per step over all
processes: every process draws the same step (conditions, control cells, noise) from the shared seeded generators
and rolls out its own groups, conditions rank::N; advantages are normalised within each group, so no reduction is
needed for them; DDP averages the gradients, the loss weighted by each process's share of the groups, so a step
equals one process's step with the same --conds. Rank 0 validates, selects and saves the checkpoint and broadcasts
its decision; --resume works with any N. On CUDA the velocity field runs under bf16 autocast (data.autocast);
log-probabilities, the ratio and the KL are float32.

Left out: classifier-free guidance, reward models learned from data, LoRA.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: spinning threads stall a shared CPU

import numpy as np
import torch
import torch.distributed as dist
from einops import rearrange
from torch.nn.parallel import DistributedDataParallel as DDP
from types import SimpleNamespace

import data
import evaluate
import flow
import verifiers
from data import UserError


@dataclass
class RLConfig(verifiers.RewardConfig, data.DataConfig):
    """rl.py's options: these, the rewards (verifiers.RewardConfig) and the data options, which pass through to
    pretraining (with --ckpt the checkpoint fixes them)."""
    # checkpoints
    ckpt: str | None = None        # pretrained generator (flow.pt); None -> pretrain one (cached in runs/)
    out: str = "rl.pt"             # best checkpoint by validation; the latest state goes to <out>_last.pt
    resume: bool = False           # continue from <out>_last.pt exactly where it stopped
    # RL
    steps: int = 100               # GRPO steps
    conds: int = 8                 # training (condition, covariate) pairs per step
    group: int = 16                # rollouts per condition (the group size n)
    T: int = 10                    # SDE steps per rollout
    sde_noise: float = 0.7         # SDE noise level a (of the rollouts)
    clip: float = 0.2              # PPO clip range on the ratio (exact log-density, summed over genes)
    beta: float = 2.0              # KL weight (KL summed over genes); holds the effect-size ratio near 1
    # optimisation
    lr: float = 6e-4               # AdamW learning rate
    epochs: int = 2                # optimiser passes over each batch of rollouts (ratio = 1 on the first)
    t_frac: float = 0.5            # fraction of the T timesteps trained per pass (random subset)
    adv_clip: float = 5.0          # advantages clipped to +/- this
    grad_clip: float = 1.0         # max global gradient norm
    # evaluation
    log_every: int = 5             # one log line every this many steps
    eval_every: int = 10           # validate every this many steps (and at 0 and the end)
    eval_cells: int = 64           # generated cells per validation condition
    eval_steps: int = 20           # ODE midpoint steps for validation and the final table
    pretrain_steps: int = 1000     # with no --ckpt: steps of the generator pretrained first
    # hardware
    device: str = "cpu"            # cpu | cuda | mps | auto
    progress: bool = True          # tqdm progress bar (on a terminal)
    timeout: int = 1800            # torchrun: seconds a process waits for the others (a dead peer fails the run)


# ----------------------------------------------------------------------------- the pieces
def rollout(model, cond, T, noise_level, draw):
    """T SDE steps (flow.sde_step) from x0 ~ N(mu0, sigma^2 I) (flow.make_cond), no gradients, paired like every
    generated cell (flow.sample): the cells (B, G) (control cell + the change), the states x_t (T+1, B, G) and
    log p(x_{t+1} | x_t) (T, B) of the condition's path. The control path the same draws drive is part of the
    environment: GRPO's ratio and KL are those of the condition's path. draw: flow.noise_source."""
    z, xs, logp = flow.sample(model, cond, T, "sde", draw, noise_level=noise_level, record=True, paired=True)
    return model.decode(cond["ctrl"] + z), xs, logp


def group_advantages(comps: dict, weights: dict, eps=1e-6, clip=5.0):
    """comps {name: (n_groups, n)} -> advantages (n_groups, n): A = sum_k w_k (r_k - mean) / (std + eps),
    mean and (population) std within each group; a group with no spread in r_k gets 0 from it."""
    A = 0
    for name, w in weights.items():
        r = comps[name]
        A = A + w * (r - r.mean(1, keepdim=True)) / (r.std(1, unbiased=False, keepdim=True) + eps)
    return A.clamp(-clip, clip)


def grpo_loss(logp, logp_old, adv, mean, mean_ref, std, clip, beta):
    """PPO-clipped surrogate + beta KL for one timestep. logp, logp_old, adv (B,); mean, mean_ref (B, G);
    std (B, 1). Returns (loss, stats)."""
    ratio = torch.exp(logp - logp_old)
    surrogate = -torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv).mean()
    kl = ((mean - mean_ref) ** 2).sum(-1) / (2 * std.reshape(-1) ** 2)  # (B,)
    loss = surrogate + beta * kl.mean()
    return loss, {"kl": kl.mean().detach(), "clipfrac": ((ratio - 1).abs() > clip).float().mean(),  # 0-d tensors:
                  "ratio_dev": (ratio - 1).abs().mean().detach()}                              # no sync per call


def val_metrics(model, ds, keys, verifier, cfg) -> dict:
    """ODE cells for validation conditions (fixed seed: the same noise and contexts at every call) and their
    metrics averaged over conditions, with the checkpoint score of evaluate.selection_score (not a reward:
    debiased Pearson of mean deltas - |log effect ratio| - relative energy distance)."""
    preds = evaluate.predict(model, ds, keys, cfg.eval_cells, cfg.eval_steps, "midpoint", seed=cfg.seed + 7)
    ms = [{**evaluate.metrics(preds[k], ds.refs[k], len(ds.ctrl_idx[k[1]]), verifier),
           **evaluate.selection_score(preds[k], ds.refs[k])} for k in keys]
    return {k: float(np.mean([x[k] for x in ms])) for k in ms[0]}


# ----------------------------------------------------------------------------- the loop
def pretrained(cfg: RLConfig) -> str:
    """cfg.ckpt, or a generator pretrained on cfg's data, cached in runs/ under a name that hashes every data
    option, both seeds, the step count and the data file's identity (data.file_identity, the built-in simulator's
    cached file too): it is reused only when all of them match, so never after the data changed in place."""
    if cfg.ckpt:
        return cfg.ckpt
    fcfg = flow.FlowConfig(**{f.name: getattr(cfg, f.name) for f in fields(data.DataConfig)},
                           steps=cfg.pretrain_steps, device=cfg.device, progress=cfg.progress, timeout=cfg.timeout)
    opts = {f.name: getattr(fcfg, f.name) for f in fields(data.DataConfig)} | {"steps": fcfg.steps}
    opts["data"] = str(Path(cfg.data).resolve()) if cfg.data else None
    opts["data_id"] = data.file_identity(cfg.data or data.builtin_path(cfg.kind))
    tag = hashlib.sha1(json.dumps(opts, sort_keys=True).encode()).hexdigest()[:8]
    name = Path(cfg.data).stem if cfg.data else {"chemical": "chemical"}.get(cfg.kind, "simulated")
    fcfg.out = str(Path("runs") / f"flow_{name}_{tag}.pt")
    if Path(fcfg.out).exists():
        if data.read_checkpoint(fcfg.out)["step"] >= fcfg.steps:
            print(f"using the pretrained generator {fcfg.out} (same data file, data options, seeds and steps)")
            return fcfg.out
        fcfg.resume = True                                     # an interrupted pretraining: finish it
        print(f"resuming the interrupted pretraining {fcfg.out}")
        return flow.train(fcfg)
    Path(fcfg.out).parent.mkdir(exist_ok=True)
    print(f"no --ckpt and no cached generator with these data options and seeds: pretraining "
          f"{cfg.pretrain_steps} steps -> {fcfg.out}")
    return flow.train(fcfg)


def resume_state(cfg: RLConfig, world: int = 1) -> tuple:
    """Checks before any work (outputs that would overwrite an input or fail late; a gene-set file that cannot be
    read; a run whose base checkpoint is gone), then (the state that --resume continues, or None; <out>_last.pt,
    where the latest state goes)."""
    data.check_output("--out", cfg.out)                              # a file, before <out>_last.pt is named after it
    last = str(Path(cfg.out).with_name(Path(cfg.out).stem + "_last.pt"))
    gene_sets = verifiers.gene_set_path(cfg.gene_sets)
    if gene_sets:
        verifiers.load_gene_sets(gene_sets)                          # not after pretraining
    check_world(cfg.conds, world, f"--conds {cfg.conds}")
    if cfg.resume and not os.path.isfile(last):
        raise UserError(f"--resume: nothing to resume, {last} does not exist; run the same command without --resume")
    state = data.read_checkpoint(last, resume="rl") if cfg.resume else None
    base = state and state["extra"]["base"]
    if base and not os.path.isfile(base):
        raise UserError(f"--resume: {base}, the pretrained generator this run post-trains (its KL anchor and "
                        f"'pretrained' row), is gone; put it back at that path to continue the run, or start a new "
                        f"one without --resume")
    data.check_outputs({"--out": cfg.out, "--out (latest state)": last},
                       {"--data": cfg.data, "--ckpt": cfg.ckpt, "--gene-sets": gene_sets, "the base checkpoint": base})
    return state, last


def check_world(n_conds: int, world: int, why: str) -> None:
    """Every process rolls out at least one condition per step."""
    if world > n_conds:
        raise UserError(f"{world} processes but a GRPO step rolls out {n_conds} conditions ({why}), fewer than one per "
                        f"process: start at most {n_conds} processes (torchrun --nproc_per_node) or raise --conds")


def now(device) -> float:
    """Wall-clock time once the device's queued work is done (CUDA kernels run asynchronously), for phase times."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.time()


def check_base(base: str, ck: dict, outputs: dict) -> None:
    """RL starts from a pretrained generator only (RL runs do not chain), and never writes over it or its data."""
    if "base" in ck.get("extra", {}):
        raise UserError(f"{base} is an RL checkpoint (post-trained from {ck['extra']['base']}); RL runs do not chain: "
                        f"post-train the pretrained generator (--ckpt {ck['extra']['base']}) or continue that run "
                        f"with `python rl.py --resume --out {ck['extra'].get('rl_config', {}).get('out', base)}`")
    data.check_outputs(outputs, {"the base checkpoint": base, "the checkpoint's data": ck["config"].get("data")})


def setup(cfg: RLConfig) -> SimpleNamespace:
    """Everything a run needs before its first step: checks, the frozen reference (the pretrained generator) and the
    policy (a copy), the data, the rewards, the optimiser and the shared random generators, restored by --resume."""
    data.check_args(cfg)
    if cfg.sde_noise <= 0:
        raise UserError(f"--sde-noise {cfg.sde_noise}: GRPO needs a stochastic sampler, a noise level > 0 (0.7)")
    device, rank, world = data.distributed(cfg.device, cfg.timeout)  # torchrun: this process's device; else (dev, 0, 1)
    state, last = resume_state(cfg, world)
    base = state["extra"]["base"] if state else pretrained(cfg)
    ref, ck = flow.load_checkpoint(base, device)
    check_base(base, ck, {"--out": cfg.out, "--out (latest state)": last})
    data.check_fixed(cfg, ck["config"], [f.name for f in fields(data.DataConfig) if f.name not in ("data", "seed")],
                     f"the checkpoint {base} fixes the data options it was trained with:", "drop the option, or "
                     "pretrain again with it")
    ds = evaluate.dataset_for(ck, cfg.data)
    print(f"data {data.describe(ds)}")                              # ranks > 0 print nothing (data.distributed)
    keys = ds.split["train"]
    n_pick = min(cfg.conds, len(keys))                              # conditions per step, over all processes
    check_world(n_pick, world, f"--conds {cfg.conds}, {len(keys)} training conditions")
    for c in sorted({k[1] for k in keys}):
        if len(ds.ctrl_idx[c]) < cfg.group:
            raise UserError(f"covariate {c!r} has {len(ds.ctrl_idx[c])} control cells, fewer than a group of "
                            f"{cfg.group} rollouts needs; lower --group")
    policy = copy.deepcopy(ref).train().requires_grad_(True)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.0)
    run = SimpleNamespace(
        cfg=cfg, device=device, rank=rank, world=world, last=last, base=base, ck=ck, ds=ds, keys=keys, n_pick=n_pick,
        ref=ref.requires_grad_(False), policy=policy, opt=opt,
        ddp=DDP(policy, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else policy,
        verifier=verifiers.Verifier(ds.genes, verifiers.parse_weights(cfg.rewards), cfg.gene_sets, cfg.topk),
        all_rewards=verifiers.Verifier(ds.genes, None, cfg.gene_sets, cfg.topk),  # for reporting
        gen=torch.Generator(device=device).manual_seed(cfg.seed), rng=np.random.default_rng(cfg.seed),  # shared
        table={k: v.to(device) for k, v in ds.key_table(keys).items()},  # on the device once, as the references:
        refs={k: ds.refs[k].to(device) for k in keys},                    # sparse cells, densified there per group
        step=0, history=[], best=None, meta=data.dataset_meta(ds))
    if state:
        policy.load_state_dict(state["model"])
        data.restore_run(state, opt, run.gen, run.rng, cfg.seed)
        run.step, run.history, run.best = state["step"], state["extra"]["history"], state["extra"]["best"]
    return run


def rewards(run, pick, cells) -> dict:
    """{reward: (n_groups, n)} of each group's cells against its condition's reference; one line for NaN/Inf."""
    comps = {n: [] for n in run.verifier.weights}
    for i, x in zip(pick, cells):                                  # a loop over groups, batched cells
        for n, r in run.verifier(x, run.refs[run.keys[i]])[1].items():
            comps[n].append(r)
    comps = {n: torch.stack(v) for n, v in comps.items()}          # (n_groups, n)
    finite = torch.stack([torch.isfinite(v).all(1) for v in comps.values()])  # (n_rewards, n_groups)
    if not finite.all():                                           # one sync per step
        n, g = map(int, torch.nonzero(~finite)[0])
        raise UserError(f"verifier {list(comps)[n]!r} returned NaN/Inf for condition {run.keys[pick[g]]}; check its "
                        "reference cells (constant genes?) or drop it from --rewards")
    return comps


def grpo_step(run) -> dict:
    """One GRPO step: rollout -> rewards -> advantages -> update. Every process draws the whole step (conditions,
    control cells, noise) and handles its groups rank::world; DDP averages the gradients, so each process's loss is
    weighted by its share of the groups. Returns the step's record (rewards, losses, phase times)."""
    cfg, world, t0 = run.cfg, run.world, now(run.device)
    # 1. rollouts: conds x group cells, each group one condition with n control cells of its covariate
    pick = run.rng.choice(len(run.keys), size=run.n_pick, replace=False)
    rows = np.stack([run.rng.choice(run.ds.ctrl_idx[run.keys[i][1]], cfg.group, replace=False) for i in pick])
    mine = np.arange(run.rank, run.n_pick, world)                                  # this process's groups
    kid = torch.from_numpy(np.repeat(pick[mine], cfg.group)).to(run.device)        # (B,)
    cond = flow.make_cond(run.policy, run.table, kid, run.ds.X[rows[mine].ravel()])
    part = (torch.from_numpy(mine[:, None] * cfg.group + np.arange(cfg.group)).reshape(-1).to(run.device),
            run.n_pick * cfg.group) if world > 1 else None                         # its rows of the noise
    cells, xs, logp_old = rollout(run.policy.eval(), cond, cfg.T, cfg.sde_noise,
                                  data.noise_source(run.gen, run.device, part))     # (B, G), (T+1, B, G), (T, B)
    t1 = now(run.device)
    # 2. rewards, normalised per component within each group
    comps = rewards(run, pick[mine], rearrange(cells, "(g n) d -> g n d", n=cfg.group))  # (n_groups, n) each
    adv = rearrange(group_advantages(comps, run.verifier.weights, clip=cfg.adv_clip), "g n -> (g n)")  # (B,)
    t2 = now(run.device)
    # 3. update: ratio of recorded transitions under the current policy, clipped surrogate + KL to the reference
    run.policy.train()
    stats = {"loss": 0.0, "kl": 0.0, "clipfrac": 0.0, "ratio_dev": 0.0}
    n_t, share = max(1, int(round(cfg.t_frac * cfg.T))), len(mine) * world / run.n_pick
    times, h = flow.time_grid(cfg.T)                                               # the rollout's grid
    for _ in range(cfg.epochs):
        run.opt.zero_grad(set_to_none=True)
        for j, i in enumerate(run.rng.permutation(cfg.T)[:n_t]):
            with run.ddp.no_sync() if world > 1 and j < n_t - 1 else nullcontext():  # reduce on the last one
                logp, mean, std = flow.sde_log_prob(run.ddp, xs[i], times[i], h, cond, cfg.sde_noise, xs[i + 1])
                with torch.no_grad():
                    mean_ref, _ = flow.sde_mean_std(run.ref, xs[i], times[i], h, cond, cfg.sde_noise)
                loss, s = grpo_loss(logp, logp_old[i], adv, mean, mean_ref, std, cfg.clip, cfg.beta)
                (loss * share / n_t).backward()
            s["loss"] = loss.detach()
            for k in stats:
                stats[k] += s[k] / (n_t * cfg.epochs)
        gnorm = torch.nn.utils.clip_grad_norm_(run.policy.parameters(), cfg.grad_clip)
        run.opt.step()
    t3 = now(run.device)
    zero = float((torch.stack([v.std(1) for v in comps.values()]).amax(0) < 1e-8).float().mean())  # flat groups
    return {"step": run.step + 1, **{f"reward/{n}/mean": float(v.mean()) for n, v in comps.items()},
            "reward/total": float(sum(run.verifier.weights[n] * v.mean() for n, v in comps.items())),
            **{f"train/{k}": float(v) for k, v in stats.items()}, "train/zero_spread": zero,
            "train/grad_norm": float(gnorm), "time/rollout": t1 - t0, "time/reward": t2 - t1, "time/update": t3 - t2}


def validate(run, step) -> None:
    """Rank 0 scores the validation conditions (val_metrics) and saves the policy to --out when the score is the best
    so far; under torchrun its decision (and the record) is broadcast, so every process holds the same state."""
    if run.rank == 0:
        m = val_metrics(run.policy.eval(), run.ds, run.ds.split["val"], run.all_rewards, run.cfg)
        run.policy.train()
        run.history.append({"step": step, **{f"val/{k}": v for k, v in m.items()}})
        line = (f"val {step:4d} | score {m['score']:.3f} | pearson_delta {m['pearson_delta']:.3f} | energy "
                f"{m['energy']:.3f} | effect {m['effect_ratio']:.2f} | spread {m['spread_ratio']:.2f} | rewards " +
                " ".join(f"{n}={m['reward/' + n]:.3f}" for n in run.verifier.weights))
        if run.best is None or m["score"] > run.best["score"]:
            run.best = {"step": step, "score": m["score"]}
            data.write_checkpoint(run.cfg.out, state_at(run, step))
            line += "  * best, saved"
        data.say(line)
    if run.world > 1:
        sync = [run.history[-1] if run.rank == 0 else None, run.best]
        dist.broadcast_object_list(sync, src=0)
        if run.rank > 0:
            run.history.append(sync[0])
            run.best = sync[1]


def state_at(run, step) -> dict:
    """The checkpoint dict of the run's current state (its tensors are the live ones)."""
    return data.make_checkpoint(run.policy, None, run.opt, step, run.ck["config"], run.meta,
                                {"base": run.base, "rl_config": asdict(run.cfg), "history": run.history,
                                 "best": run.best}, {"torch": run.gen.get_state(), "numpy": run.rng.bit_generator.state})


def train(cfg: RLConfig) -> str:
    """GRPO post-training (grpo_step in a loop, validating every eval_every steps); returns the path of the best
    checkpoint (cfg.out). Ctrl-C or SIGTERM anywhere writes the state after the last completed step to <out>_last.pt:
    --resume then redoes the interrupted step exactly as an uninterrupted run."""
    run = setup(cfg)
    val_keys, rank = run.ds.split["val"], run.rank
    pbar = data.progress(cfg.progress and rank == 0, total=cfg.steps, initial=run.step, desc="grpo")
    done = copy.deepcopy(state_at(run, run.step)) if rank == 0 else None  # a step updates weights in place: a copy
    try:
        if not run.history and val_keys:
            validate(run, 0)
            done = copy.deepcopy(state_at(run, run.step)) if rank == 0 else None
        while run.step < cfg.steps:
            rec = grpo_step(run)
            run.step = step = rec["step"]
            run.history.append(rec)
            pbar.update(1)
            if rank == 0 and (step % cfg.log_every == 0 or step == cfg.steps):
                data.say(f"step {step:4d} | loss {rec['train/loss']:+.4f} | reward {rec['reward/total']:+.3f} | kl "
                         f"{rec['train/kl']:.4f} | clip {rec['train/clipfrac']:.2f} | zero {rec['train/zero_spread']:.2f}"
                         f" | gnorm {rec['train/grad_norm']:.2f} | dt {sum(v for k, v in rec.items() if k[:5] == 'time/'):.2f}"
                         "s | " + " ".join(f"{n} {rec[f'reward/{n}/mean']:+.3f}" for n in run.verifier.weights))
            if val_keys and (step % cfg.eval_every == 0 or step == cfg.steps):
                validate(run, step)
            if rank == 0 and (step % cfg.eval_every == 0 or step == cfg.steps):
                data.write_checkpoint(run.last, state_at(run, step))
            done = copy.deepcopy(state_at(run, step)) if rank == 0 else None
    except KeyboardInterrupt:  # drop the step in progress: --resume redoes it exactly as an uninterrupted run
        pbar.close()
        if rank > 0:
            raise
        data.write_checkpoint(run.last, done)
        raise KeyboardInterrupt(f"interrupted; saved the state after step {done['step']} to {run.last}; continue "
                                "with --resume") from None
    pbar.close()
    if run.best is None and rank == 0:   # no validation conditions: the last state is the result
        data.write_checkpoint(cfg.out, state_at(run, run.step))
    if run.world > 1:
        dist.barrier()                   # no process returns before rank 0 has written its checkpoints
    return cfg.out


def before_after(cfg: RLConfig, out: str) -> str:
    """Markdown table on the held-out test conditions: baselines, the pretrained generator, the RL one (ODE)."""
    model, ck = flow.load_checkpoint(out)
    base, _ = flow.load_checkpoint(ck["extra"]["base"])
    ds = evaluate.dataset_for(ck, cfg.data)
    keys = ds.split["test"]
    if not keys:                                        # e.g. a random split of two conditions
        return "no held-out test conditions in this split: no before/after table"
    preds = evaluate.baselines(ds, keys, seed=cfg.seed)
    preds["pretrained"] = evaluate.predict(base, ds, keys, steps=cfg.eval_steps, seed=cfg.seed)
    preds["rl"] = evaluate.predict(model, ds, keys, steps=cfg.eval_steps, seed=cfg.seed)
    ver = verifiers.Verifier(ds.genes, None, cfg.gene_sets, cfg.topk)
    summary = evaluate.summarize(evaluate.evaluate_methods(ds, preds, keys, ver))
    cols = [f"reward/{n}" for n in verifiers.REWARDS] + evaluate.HELD_OUT + \
        ["pearson_delta", "energy", "effect_ratio", "spread_ratio"]
    return (f"{len(keys)} held-out test conditions; RL checkpoint from step {ck['step']} (best validation score)\n\n"
            + evaluate.report(summary, cols))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    data.add_args(p, RLConfig)
    cfg = RLConfig(**vars(p.parse_args(argv)))
    if cfg.ckpt and not os.path.isfile(cfg.ckpt):
        raise UserError(f"--ckpt {cfg.ckpt} is a folder; give the checkpoint file in it" if os.path.isdir(cfg.ckpt) else
                        f"--ckpt {cfg.ckpt} not found; pretrain one with `python flow.py --out {cfg.ckpt}` or omit "
                        "--ckpt to pretrain automatically")
    t0 = time.time()
    out = train(cfg)
    if int(os.environ.get("RANK", 0)) == 0:  # under torchrun, rank 0 reports
        print(f"\nsaved {out} ({time.time() - t0:.0f} s)\n")
        print(before_after(cfg, out))


if __name__ == "__main__":
    data.cli(main)
