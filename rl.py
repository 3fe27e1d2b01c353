"""RL stage: GRPO post-training of the flow generator, rewarded by the cell-level verifiers.

    python rl.py --data norman.h5ad --ckpt flow.pt --out rl.pt   # post-train a pretrained generator
    python rl.py [--kind chemical]                               # everything on a built-in simulator
    python rl.py --out rl.pt --resume                            # continue an interrupted run

One step (Flow-GRPO, Liu et al. 2025, adapted to cells):
  1. rollout: --conds training (condition, covariate) pairs, a group of n = --group cells each; a group holds
     --contexts contexts (a control cell and a source draw eps), and a context's rollouts differ only by the SDE
     noise, the randomness whose log-density GRPO uses. T SDE steps (flow.sample, paired: the control twin takes the
     noiseless step), recording states x_t and log p_old(x_{t+1} | x_t), no gradients;
  2. reward: score the decoded cells with verifiers.Verifier; each component is centred on its context's mean and
     scaled by the group's pooled within-context std, A = sum_k w_k (r_k - mean_context r_k) / (std r_k + eps),
     clipped to +/- adv_clip (group_advantages);
  3. update: ratio = p_theta / p_old of each recorded transition (the exact Gaussian density, summed over
     genes), PPO-clipped surrogate  -min(ratio A, clip(ratio, 1 - eps, 1 + eps) A)  plus
     beta * KL(p_theta || p_ref) = beta ||mean_theta - mean_ref||^2 / (2 std^2), the closed form for two
     Gaussians with one std, against the frozen pretrained model, over the paths and their control twins (the twin's
     noiseless step is anchored to the pretrained one); AdamW with gradient clipping.
Every eval_every steps (validate): the residual trust is refitted on the validation keys as pretraining did, the ODE
sampler generates cells for the validation conditions (--val-draws repeat draws), and a step is kept when its reward
gain over step 0 exceeds the draws' noise with no guard (pΔ, energy, effect ratio) worse by more (judge); the fixed
training groups' rewards (learning_curve) show the objective climbing.

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
    out: str = "rl.pt"             # the step validation keeps (judge; 0: pretrained); the latest: <out>_last.pt
    resume: bool = False           # continue from <out>_last.pt exactly where it stopped
    allow_unfinished: bool = False  # post-train a pretraining that stopped before its --steps (never calibrated)
    # RL
    steps: int = 150               # GRPO steps
    conds: int = 8                 # training (condition, covariate) pairs per step
    group: int = 16                # rollouts per condition (the group size n)
    contexts: int = 2              # contexts (control cell + source draw) per group; within one only the SDE noise differs
    T: int = 10                    # SDE steps per rollout
    sde_noise: float = 0.3         # SDE noise level a of the rollouts (KL scales as 1 / a^2)
    clip: float = 0.2              # PPO clip range on the ratio (exact log-density, summed over genes)
    beta: float = 0.5              # KL weight (KL summed over genes, over the paths and their control twins)
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
    val_draws: int = 4             # repeat draws of the validation cells (>= 2): the noise a kept step's gain must beat
    eval_steps: int = 20           # ODE midpoint steps for validation and the final table
    pretrain_steps: int = 1000     # with no --ckpt: steps of the generator pretrained first
    # hardware
    device: str = "cpu"            # cpu | cuda | mps | auto
    progress: bool = True          # tqdm progress bar (on a terminal)
    timeout: int = 1800            # torchrun: seconds a process waits for the others (a dead peer fails the run)


# ----------------------------------------------------------------------------- the pieces
def rollout(model, cond, T, noise_level, draw, eps):
    """T SDE steps (flow.sample) from x0 = mu0 + sigma eps, no gradients, paired like every generated cell: the cells
    (B, G) (control cell + the change), the states x_t (T+1, 2B, G) of the condition's paths, then of their control
    twins (flow.with_twins), and log p(x_{t+1} | x_t) (T, B) of the condition's paths.
    What varies within a group (draw_groups): one condition; --contexts contexts, each one control cell and one eps;
    within a context, only the SDE noise of the condition's path (its twin takes the noiseless step). Why: GRPO's
    advantage must compare cells that differ by the randomness whose log-density it uses. Were the control cell to
    vary too, the rewards would rank control cells, which the policy does not choose, and paired, the noise moves a
    cell too little to be seen beside them (group_advantages centres each context on its own mean)."""
    z, xs, logp = flow.sample(model, cond, T, "sde", draw, eps=eps, noise_level=noise_level, record=True, paired=True)
    return model.decode(cond["ctrl"] + z), xs, logp


def group_advantages(scores: dict, weights: dict, eps=1e-6, adv_clip=5.0, contexts=1):
    """scores {name: (n_groups, n)} -> advantages (n_groups, n). A group's n cells are `contexts` contexts of
    m = n / contexts cells on consecutive columns; each reward is centred on its context's mean and scaled by the
    group's pooled within-context std: A = sum_k w_k (r_k - mean_context) / (std_pooled + eps). contexts = 1 is
    GRPO's normalisation within the group; a reward with no spread gets 0."""
    A = 0
    for name, w in weights.items():
        r = scores[name].reshape(scores[name].shape[0], contexts, -1)  # (g, C, m)
        dev = r - r.mean(-1, keepdim=True)
        A = A + w * dev / (dev.pow(2).mean((1, 2), keepdim=True).sqrt() + eps)
    return A.reshape(A.shape[0], -1).clamp(-adv_clip, adv_clip)


def grpo_loss(logp, logp_old, adv, mean, mean_ref, std, clip, beta):
    """PPO-clipped surrogate + beta KL for one timestep. logp, logp_old, adv (B,); mean, mean_ref (R, G) and std
    (R, 1) of the R = B rows or 2B (the rows and their control twins: each row's KL is its path's plus its twin's).
    Returns (loss, stats)."""
    ratio = torch.exp(logp - logp_old)
    surrogate = -torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv).mean()
    kl = ((mean - mean_ref) ** 2).sum(-1) / (2 * std.reshape(-1) ** 2)  # (R,)
    loss = surrogate + beta * kl.sum() / len(logp)
    return loss, {"kl": kl.sum().detach() / len(logp), "clipfrac": ((ratio - 1).abs() > clip).float().mean(),
                  "ratio_dev": (ratio - 1).abs().mean().detach()}  # 0-d tensors: no sync per call


def val_metrics(model, ds, keys, verifier, cfg, draw=0) -> dict:
    """ODE cells for the validation conditions (repeat draw `draw`: its own seed, the same control cells and noise at
    every call) and their metrics averaged over conditions, with log_effect = mean |log effect ratio|."""
    preds = flow.generate(model, ds, keys, cfg.eval_cells, cfg.eval_steps, seed=cfg.seed + 7 + 1000 * draw)
    ms = [evaluate.metrics(preds[k], ds.refs[k], len(ds.ctrl_idx[k[1]]), verifier) for k in keys]
    return {k: float(np.mean([x[k] for x in ms])) for k in ms[0]} | {
        "log_effect": float(np.mean([abs(np.log(max(x["effect_ratio"], 1e-12))) for x in ms]))}


GUARDS = {"pearson_delta": 1, "energy": -1, "log_effect": -1}  # what RL may not buy rewards with: +1 higher is better


def judge(draws, draws0, noise, weights, t_min=2.0) -> tuple:
    """(gain, t, kept) of a step's validation draws against step 0's (the same D >= 2 draws: paired). Per draw d, the
    reward change in units of each reward's noise_k (the standard error of step 0's mean over the draws), weighted:
        s_d = sum_k w_k (m_kd - m0_kd) / noise_k / sum_k |w_k|,    gain = mean(s),    t = gain / (sd(s) / sqrt(D))
    (a paired t statistic). Kept only when t > t_min and no guard (GUARDS) is worse on the mean by more than its
    noise (a change within the draws' own spread is allowed); validate keeps the kept step with the largest gain."""
    diff = {k: np.array([a[k] - b[k] for a, b in zip(draws, draws0)]) for k in draws[0]}  # (D,) per metric
    s = sum(w * diff[f"reward/{n}"] / max(noise[f"reward/{n}"], 1e-9) for n, w in weights.items()) / sum(
        abs(w) for w in weights.values())                                                  # (D,)
    t = float(s.mean() / max(s.std(ddof=1) / np.sqrt(len(s)), 1e-9))
    return float(s.mean()), t, t > t_min and all(sign * diff[k].mean() >= -noise[k] for k, sign in GUARDS.items())


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
    if Path(fcfg.out).exists() and data.read_checkpoint(fcfg.out)["step"] >= fcfg.steps:
        print(f"using the pretrained generator {fcfg.out} (same data file, data options, seeds and steps)")
        return fcfg.out
    data.check_outputs({"the pretraining cache (rl.py without --ckpt; or give --ckpt)": fcfg.out}, {})  # runs/: a folder
    fcfg.resume = Path(fcfg.out).exists()                      # an interrupted pretraining: finish it
    print(f"resuming the interrupted pretraining {fcfg.out}" if fcfg.resume else f"no --ckpt and no cached generator "
          f"with these data options and seeds: pretraining {cfg.pretrain_steps} steps -> {fcfg.out}")
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
    if base and state["extra"].get("base_id") not in (None, now := data.file_identity(base)):
        raise UserError(f"--resume: {base}, the pretrained generator this run post-trains (its KL anchor), was "
                        f"rewritten since the run began (size:time:SHA-1 {state['extra']['base_id']}, now {now}); the "
                        "run cannot continue on it: put the original back, or start a new run without --resume")
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
    if cfg.val_draws < 2:
        raise UserError(f"--val-draws {cfg.val_draws}: the noise of the validation score needs at least 2 draws")
    device, rank, world = data.distributed(cfg.device, cfg.timeout)  # torchrun: this process's device; else (dev, 0, 1)
    state, last = resume_state(cfg, world)
    base = state["extra"]["base"] if state else pretrained(cfg)
    frozen, ck = flow.load_checkpoint(base, device)
    check_base(base, ck, {"--out": cfg.out, "--out (latest state)": last})
    evaluate.check_checkpoint(base, ck, cfg.allow_unfinished)
    data.check_fixed(cfg, ck["config"], [f.name for f in fields(data.DataConfig) if f.name not in ("data", "seed")],
                     f"the checkpoint {base} fixes the data options it was trained with:", "drop the option, or "
                     "pretrain again with it")
    ds = evaluate.dataset_for(ck, cfg.data)
    print(f"data {data.describe(ds)}")                              # ranks > 0 print nothing (data.distributed)
    keys = ds.split["train"]
    n_pick = min(cfg.conds, len(keys))                              # conditions per step, over all processes
    data.check_memory(f"--conds {n_pick} x --group {cfg.group} x (--T {cfg.T} + 1) rollout states", n_pick *
                      cfg.group * (cfg.T + 1) * len(ds.genes), "lower them")
    data.check_memory(f"--eval-cells {cfg.eval_cells}", cfg.eval_cells * len(ds.split["val"]) * len(ds.genes),
                      "lower it")
    check_world(n_pick, world, f"--conds {cfg.conds}, {len(keys)} training conditions")
    if cfg.group % cfg.contexts:
        raise UserError(f"--group {cfg.group} is not a multiple of --contexts {cfg.contexts}: each context has as many "
                        "rollouts; change one of them")
    for c in sorted({k[1] for k in keys}):
        if len(ds.ctrl_idx[c]) < cfg.group:
            raise UserError(f"covariate {c!r} has {len(ds.ctrl_idx[c])} control cells, fewer than a group of "
                            f"{cfg.group} rollouts needs; lower --group")
    policy = copy.deepcopy(frozen).train().requires_grad_(True)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.0)
    run = SimpleNamespace(
        cfg=cfg, device=device, rank=rank, world=world, last=last, base=base, ck=ck, ds=ds, keys=keys, n_pick=n_pick,
        frozen=frozen.requires_grad_(False), policy=policy, opt=opt,
        field=DDP(policy, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else policy,
        verifier=verifiers.Verifier(ds.genes, verifiers.parse_weights(cfg.rewards), cfg.gene_sets, cfg.topk),
        all_rewards=verifiers.Verifier(ds.genes, None, cfg.gene_sets, cfg.topk),  # for reporting
        gen=torch.Generator(device=device).manual_seed(cfg.seed), rng=np.random.default_rng(cfg.seed),  # shared
        table={k: v.to(device) for k, v in ds.key_table(keys).items()},  # on the device once, as the references:
        refs={k: ds.refs[k].to(device) for k in keys},                    # sparse cells, densified there per group
        step=0, history=[], best=None, meta=data.dataset_meta(ds),
        base_id=state["extra"].get("base_id") if state else data.file_identity(base))  # --resume: the same base
    run.accumulate = lambda last: run.field.no_sync() if world > 1 and not last else nullcontext()  # DDP: reduce once
    if state:
        policy.load_state_dict(state["model"])
        data.restore_run(state, opt, run.gen, run.rng, cfg.seed)
        run.step, run.history, run.best = state["step"], state["extra"]["history"], state["extra"]["best"]
    return run


def draw_groups(run, rng, gen, n_groups, split=True) -> SimpleNamespace:
    """n_groups training conditions, and per group --contexts contexts (a control cell of its covariate and a source
    draw eps), each repeated for its group // contexts rollouts; with the noise source of their SDE steps. Under
    torchrun every process draws them all from the shared generators and keeps its groups rank::N (split), weighted
    by its share of them (1 on one process) so that DDP's mean of the gradients is one process's."""
    cfg, C = run.cfg, run.cfg.contexts
    pick = rng.choice(len(run.keys), size=n_groups, replace=False)
    rows = np.stack([rng.choice(run.ds.ctrl_idx[run.keys[i][1]], C, replace=False) for i in pick])  # (n_groups, C)
    rank, world = (run.rank, run.world) if split else (0, 1)
    mine = np.arange(rank, n_groups, world)                                        # this process's groups
    own = lambda n: (torch.from_numpy(mine[:, None] * n + np.arange(n)).reshape(-1).to(run.device),  # noqa: E731
                     n_groups * n) if world > 1 else None                          # its rows of the step's draws
    kid = torch.from_numpy(np.repeat(pick[mine], cfg.group)).to(run.device)        # (B,)
    cond = flow.make_cond(run.policy, run.table, kid, run.ds.X[np.repeat(rows[mine].ravel(), cfg.group // C)])
    eps = data.noise_source(gen, run.device, own(C))((len(mine) * C, len(run.ds.genes)))  # (groups * C, G)
    return SimpleNamespace(pick=pick[mine], cond=cond, eps=eps.repeat_interleave(cfg.group // C, 0),  # (B, G)
                           draw=data.noise_source(gen, run.device, own(cfg.group)), weight=len(mine) * world / n_groups)


def rewards(run, pick, cells) -> dict:
    """{reward: (n_groups, n)} of each group's cells (n_groups, n, G) against its condition's reference; one line for
    NaN/Inf."""
    scores = {n: [] for n in run.verifier.weights}
    for i, x in zip(pick, cells):                                  # a loop over groups, batched cells
        for n, r in run.verifier(x, run.refs[run.keys[i]])[1].items():
            scores[n].append(r)
    scores = {n: torch.stack(v) for n, v in scores.items()}          # (n_groups, n)
    finite = torch.stack([torch.isfinite(v).all(1) for v in scores.values()])  # (n_rewards, n_groups)
    if not finite.all():                                           # one sync per step
        n, g = map(int, torch.nonzero(~finite)[0])
        raise UserError(f"verifier {list(scores)[n]!r} returned NaN/Inf for condition {run.keys[pick[g]]}; check its "
                        "reference cells (constant genes?) or drop it from --rewards")
    return scores


def grpo_step(run) -> dict:
    """One GRPO step: rollout -> rewards -> advantages -> update. Returns the step's record (rewards, losses, times)."""
    cfg, t0 = run.cfg, now(run.device)
    # 1. rollouts: n_pick groups (--conds, at most the training conditions) of --group cells in --contexts contexts
    g = draw_groups(run, run.rng, run.gen, run.n_pick)
    cells, xs, logp_old = rollout(run.policy.eval(), g.cond, cfg.T, cfg.sde_noise, g.draw, g.eps)  # (B,G) (T+1,2B,G) (T,B)
    t1 = now(run.device)
    # 2. rewards, each normalised within its group (centred per context) and weighted
    scores = rewards(run, g.pick, rearrange(cells, "(g n) d -> g n d", n=cfg.group))  # (n_groups, n) each
    adv = rearrange(group_advantages(scores, run.verifier.weights, adv_clip=cfg.adv_clip, contexts=cfg.contexts),
                    "g n -> (g n)")                                                # (B,)
    t2 = now(run.device)
    # 3. update: ratio of recorded transitions under the current policy, clipped surrogate + KL to the reference
    run.policy.train()
    stats = {"loss": 0.0, "kl": 0.0, "clipfrac": 0.0, "ratio_dev": 0.0}
    n_t = max(1, int(round(cfg.t_frac * cfg.T)))
    times, h = flow.time_grid(cfg.T)                                               # the rollout's grid
    both, B = flow.with_twins(g.cond), len(adv)                                        # the rows, then their twins
    for _ in range(cfg.epochs):
        run.opt.zero_grad(set_to_none=True)
        for j, i in enumerate(run.rng.permutation(cfg.T)[:n_t]):
            with run.accumulate(last=j == n_t - 1):                                # gradients summed over timesteps
                logp, mean, std = flow.sde_log_prob(run.field, xs[i], times[i], h, both, cfg.sde_noise, xs[i + 1])
                with torch.no_grad():
                    mean_ref, _ = flow.sde_mean_std(run.frozen, xs[i], times[i], h, both, cfg.sde_noise)
                # the ratio of the condition's paths; the KL over both: the twin, which every cell's change is measured
                # against, stays the pretrained one's (its step was noiseless: its term penalises the change of its
                # velocity as the KL of a step at the rollout's noise level would, a surrogate)
                loss, s = grpo_loss(logp[:B], logp_old[i], adv, mean, mean_ref, std, cfg.clip, cfg.beta)
                (loss * g.weight / n_t).backward()
            s["loss"] = loss.detach()
            for k in stats:
                stats[k] += s[k] / (n_t * cfg.epochs)
        gnorm = torch.nn.utils.clip_grad_norm_(run.policy.parameters(), cfg.grad_clip)
        run.opt.step()
    t3 = now(run.device)
    zero = float((torch.stack([v.std(1) for v in scores.values()]).amax(0) < 1e-8).float().mean())  # flat groups
    return {"step": run.step + 1, **{f"reward/{n}/mean": float(v.mean()) for n, v in scores.items()},
            "reward/total": float(sum(run.verifier.weights[n] * v.mean() for n, v in scores.items())),
            **{f"train/{k}": float(v) for k, v in stats.items()}, "train/zero_spread": zero,
            "train/grad_norm": float(gnorm), "time/rollout": t1 - t0, "time/reward": t2 - t1, "time/update": t3 - t2}


def learning_curve(run, n_groups=16) -> dict:
    """The mean rewards of a fixed set of training groups (conditions, contexts and SDE noise from their own seed:
    the same at every call), so that the objective GRPO climbs shows, not the rollouts' whose conditions change."""
    seed = run.cfg.seed + 11
    g = draw_groups(run, np.random.default_rng(seed), torch.Generator(run.device).manual_seed(seed),
                    min(n_groups, len(run.keys)), split=False)
    cells, _, _ = rollout(run.policy.eval(), g.cond, run.cfg.T, run.cfg.sde_noise, g.draw, g.eps)
    scores = rewards(run, g.pick, rearrange(cells, "(g n) d -> g n d", n=run.cfg.group))
    return {f"fixed/{n}": float(v.mean()) for n, v in scores.items()}


def validate(run, step) -> None:
    """Rank 0 refits the residual trust on the validation keys (flow.fit_lam, as pretraining did), scores the
    validation conditions (val_metrics, the mean of --val-draws repeat draws; at step 0 their spread is the noise) and
    the fixed training groups (learning_curve), and saves the policy to --out when judge keeps it with the best gain;
    under torchrun the record and the decision are broadcast, so every process holds the same state."""
    if run.rank == 0:
        cfg, model, val = run.cfg, run.policy.eval(), run.ds.split["val"]
        fits = flow.fit_lam(model, run.ds, val, run.ck["config"].get("eval_cells", 256), run.ck["config"]["seed"] + 2
                            ) if run.ck["config"].get("fit_trust", True) else {}
        lam = {name: f["lam"] for name, f in fits.items()}             # validated, unvalidated held-out keys
        draws = [val_metrics(model, run.ds, val, run.all_rewards, cfg, d) for d in range(cfg.val_draws)]
        m = {k: float(np.mean([d[k] for d in draws])) for k in draws[0]}  # the same draws at every step: paired
        if step == 0:                                  # the noise: the standard error of step 0's mean over the draws
            run.best = {"step": 0, "gain": 0.0, "draws0": draws, "noise": {
                k: float(np.std([d[k] for d in draws], ddof=1) / np.sqrt(len(draws))) for k in m}}
        gain, t, kept = judge(draws, run.best["draws0"], run.best["noise"], run.verifier.weights)  # step 0: 0, 0, no
        run.history.append({"step": step, **{f"val/{k}": v for k, v in m.items()}, "val/gain": gain, "val/t": t,
                            **learning_curve(run), "lam": lam})
        run.policy.train()
        line = (f"val {step:4d} | gain {gain:+.2f} se, t {t:+.1f} | pearson_delta {m['pearson_delta']:.3f} | energy "
                f"{m['energy']:.3f} | effect {m['effect_ratio']:.2f} | lam " + " ".join(f"{v:.2f}" for v in lam.values())
                + " | rewards " + " ".join(f"{n}={m['reward/' + n]:.3f}" for n in run.verifier.weights)
                + " | fixed training groups " + " ".join(f"{n}={run.history[-1]['fixed/' + n]:.3f}" for n in run.verifier.weights))
        if step == 0 or kept and gain > run.best["gain"]:
            run.best.update(step=step, gain=gain)
            data.write_checkpoint(cfg.out, state_at(run, step))
            line += "  * kept, saved"
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
                                {"base": run.base, "base_id": run.base_id, "rl_config": asdict(run.cfg),
                                 "history": run.history, "best": run.best}, {"torch": run.gen.get_state(), "numpy": run.rng.bit_generator.state})


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
    preds["pretrained"] = flow.generate(base, ds, keys, steps=cfg.eval_steps, seed=cfg.seed)
    preds["rl"] = flow.generate(model, ds, keys, steps=cfg.eval_steps, seed=cfg.seed)
    ver = verifiers.Verifier(ds.genes, None, cfg.gene_sets, cfg.topk)
    summary = evaluate.summarize(evaluate.evaluate_methods(ds, preds, keys, ver))
    cols = [f"reward/{n}" for n in verifiers.REWARDS] + evaluate.HELD_OUT + \
        ["pearson_delta", "energy", "effect_ratio", "spread_ratio"]
    return (f"{len(keys)} held-out test conditions; RL checkpoint from step {ck['step']} (kept by "
            f"validation, rl.judge; 0: the pretrained weights)\n\n"
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
