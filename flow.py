"""Generator stage: a conditional flow-matching model of how a perturbation changes a control cell.

    python flow.py --data X.h5ad --out flow.pt [--test A+B,C+D]   # train on your data
    python flow.py --out flow.pt                                  # built-in synthetic benchmark
    python flow.py --out flow.pt --resume                         # continue an interrupted run

A velocity field v(xt, t, cond) is learned in per-gene standardised expression ("model space") along the straight
path from x0 ~ N(mu0, sigma^2 I) (t = 0; mu0 holds the start predictor, make_cond) to a real perturbed cell x1 (t = 1):
conditional flow matching (Lipman et al. 2023), rectified flow (Liu et al. 2023). Cells are generated paired
(`sample`): a real control cell plus the difference between the condition's and the control condition's samples
from the same draws, so a zero network reproduces the start predictor exactly. `sample` integrates the ODE or, for
GRPO (rl.py), an SDE with the same marginals (Flow-GRPO, Liu et al. 2025). ~1 minute on 2 CPU cores on the
simulator; `torchrun --nproc_per_node N flow.py ...` trains data-parallel; CUDA runs the field under bf16 autocast.

Left out: OT couplings (torchcfm has them), classifier-free guidance, attention over genes, adaptive ODE solvers.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import time
from dataclasses import asdict, dataclass, fields

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: spinning threads made steps 15x slower

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import data
from data import UserError


# ----------------------------------------------------------------------------- config
@dataclass
class ModelConfig:
    """The velocity field's options (flow.py's --width ...) and its sizes; stored in every checkpoint (build_model)."""
    # model
    width: int = 128                # hidden width of the trunk and the condition embedding
    depth: int = 3                  # residual blocks
    d_pert: int = 64                # per-component perturbation embedding size
    gene_feat_dim: int = 32         # PCA dims of a gene's control-cell correlation profile (0 = off)
    use_prior: bool = True          # use the prior (False = ablation: no prior input and no start, control cell)
    use_ctrl: bool = True           # feed the control cell (False = ablation, zeros)
    source: str = "noise"           # x0 ~ N(mu0, sigma^2): noise = start + N(0, 1); ctrl = control cell + start
    sigma: float = 0.5              # source std sigma with --source ctrl (model space); noise uses 1
    use_start: bool = True          # start from the best trusted simple predictor, Dataset.start (False: control cell)
    # set from the data
    G: int = 0                      # genes
    n_comp: int = 0                 # perturbation vocabulary size
    n_cov: int = 1                  # covariates (cell lines)
    doses: bool = False             # the data have doses: a learned dose-response per component


@dataclass
class FlowConfig(ModelConfig, data.DataConfig):  # every data.py option (--data, --test, --n-genes ...) passes through
    # what training simulates of the held-out situation
    prior_dropout: float = 0.0      # per-sample probability of dropping the prior (input and start) in training
    unseen_dropout: float = 0.5     # when held-out keys have components no training key has: probability of hiding a sample's learned component embeddings
    self_prior: float = 0.5         # when held-out keys have a prior kind no training key has: probability a training single uses its cross-fitted own prior
    fit_trust: bool = True          # fit how far the network's change beyond the start is used, on validation keys (trust_residual; False: 1)
    # optimisation
    steps: int = 1000               # optimiser steps
    batch_size: int = 256           # cells per step
    lr: float = 3e-3                # peak AdamW learning rate
    min_lr_frac: float = 0.05       # cosine decays to lr * min_lr_frac
    warmup: int = 50                # linear warm-up steps
    weight_decay: float = 1e-4      # AdamW weight decay (matrices only)
    grad_clip: float = 1.0          # max global gradient norm
    ema_decay: float = 0.999        # EMA of the weights (used for sampling and saved)
    t_dist: str = "uniform"         # training time distribution: uniform | logit_normal
    ctrl_frac: float = 0.1          # fraction of each batch that is control cells with an empty perturbation
    # evaluation and checkpoints
    eval_every: int = 500           # validation loss + Pearson of mean deltas every this many steps
    eval_cells: int = 256           # generated cells per validation condition
    save_every: int = 500           # checkpoint every this many steps (and at the end)
    out: str = "flow.pt"            # checkpoint path
    resume: bool = False            # continue from --out exactly where it stopped
    stop_at: int = 0                # end this invocation at this step (checkpointed); 0 = run to --steps
    # hardware
    device: str = "cpu"             # cpu | cuda | mps | auto
    compile: bool = False           # torch.compile the model for training
    progress: bool = True           # tqdm progress bar (on a terminal)
    timeout: int = 1800             # torchrun: seconds a process waits for the others (a dead peer fails the run)


# ----------------------------------------------------------------------------- model
def timestep_features(t: torch.Tensor, dim: int = 64) -> torch.Tensor:
    """Sinusoidal features of t in [0, 1] (Vaswani et al. 2017), t scaled by 1000 as in DDPM."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)  # (half,)
    args = 1000.0 * t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([args.sin(), args.cos()], dim=-1)  # (B, dim)


class Block(nn.Module):
    """Residual MLP block with adaLN (DiT, Peebles & Xie 2023): h + g * MLP(LN(h) * (1 + a) + b),
    where (a, b, g) = Linear(SiLU(c)) are zero-initialised, so every block starts as the identity."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.mod = nn.Linear(width, 3 * width)
        nn.init.zeros_(self.mod.weight)
        nn.init.zeros_(self.mod.bias)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.SiLU(), nn.Linear(2 * width, width))

    def forward(self, h, c):
        a, b, g = self.mod(F.silu(c)).chunk(3, dim=-1)  # 3 x (B, W)
        return h + g * self.mlp(self.norm(h) * (1 + a) + b)


class VelocityField(nn.Module):
    """vt = v(xt, t, cond) in model space; cond (make_cond): ctrl (B, G), comps (B, C), dose (B, C), cov (B,),
    prior (B, G), mu0 (B, G) the source mean, evidence (B,). c (B, W) sums the time, perturbation, covariate,
    control-cell and prior embeddings; the trunk sees in_proj(xt - mu0) + prior_in(prior). The output, times lam of
    the key's evidence class (the residual trust), starts at zero: paired generation then gives the start predictor."""

    def __init__(self, cfg: ModelConfig, gene_feat=None):
        super().__init__()
        if cfg.source not in ("noise", "ctrl"):
            raise UserError(f"source {cfg.source!r}: use noise or ctrl")
        self.cfg, self.hparams = cfg, asdict(cfg)  # hparams: what checkpoints store (build_model)
        self.sigma, self.use_start = (cfg.sigma if cfg.source == "ctrl" else 1.0), cfg.use_start and cfg.use_prior
        G, W, D = cfg.G, cfg.width, cfg.d_pert
        self.time_mlp = nn.Sequential(nn.Linear(64, W), nn.SiLU(), nn.Linear(W, W))
        # perturbation: a learned embedding per component, zero-initialised (index 0 = padding) so a component
        # never seen in training contributes nothing learned, plus a projection of its gene features
        self.comp_emb = nn.Embedding(cfg.n_comp + 1, D, padding_idx=0)
        nn.init.zeros_(self.comp_emb.weight)
        gf = None if gene_feat is None else F.pad(gene_feat.float(), (0, 0, 1, 0))  # (n_components + 1, p), row 0 pad
        self.register_buffer("gene_feat", gf)
        self.feat_proj = None if gf is None else nn.Linear(gf.shape[1], D, bias=False)
        # doses: the per-component response is a learned function of the component and its log-dose
        self.dose_mlp = nn.Sequential(nn.Linear(D + 1, W), nn.SiLU(), nn.Linear(W, D)) if cfg.doses else None
        self.pert_mlp = nn.Sequential(nn.Linear(D, W), nn.SiLU(), nn.Linear(W, W))
        self.cov_emb = nn.Embedding(max(cfg.n_cov, 1), W)
        self.ctrl_enc = nn.Sequential(nn.Linear(G, W), nn.SiLU(), nn.Linear(W, W))
        self.prior_cond = nn.Linear(G, W)
        # trunk
        self.in_proj = nn.Linear(G, W)
        self.prior_in = nn.Linear(G, W, bias=False)
        self.blocks = nn.ModuleList(Block(W) for _ in range(cfg.depth))
        self.norm_out = nn.LayerNorm(W, elementwise_affine=False)
        self.out = nn.Linear(W, G)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        # scaler: z = (x - mean) / std, fitted on training cells by train(); lam: the residual trust, how far the
        # output is used for a key of each evidence class (Dataset.key_table: trained, validated, unvalidated; calibrate)
        self.register_buffer("mean", torch.zeros(G))
        self.register_buffer("std", torch.ones(G))
        self.register_buffer("lam", torch.ones(3))

    def encode(self, x):
        return (x - self.mean) / self.std

    def decode(self, z):
        """x = max(z std + mean, 0); paired generation: z = encode(control cell) + change."""
        return (z * self.std + self.mean).clamp(min=0)

    def embed_perturbation(self, comps, dose, unseen=None):
        """Deep-sets pooling over the components j of a condition, with e_j = E[c_j] + P f[c_j] and u_j the
        log-dose feature of data.Dataset.key_table (1 without a dose):
            data with doses:  MLP(sum_j m_j phi([e_j, u_j])),  m_j = 1 for a component, 0 for padding
            without:          MLP(sum_j u_j e_j)              (u_j = 1; genetic screens)
        phi is an MLP: a smooth response in log-dose per drug. A sum is order-invariant (A+B == B+A) and padding adds
        nothing. unseen (B,) bool: hide the learned embeddings of those rows (cfm_loss)."""
        e = self.comp_emb(comps) if unseen is None else self.comp_emb(comps) * ~unseen[:, None, None]  # (B, C, D)
        if self.gene_feat is not None:
            e = e + self.feat_proj(self.gene_feat[comps])  # (B, C, p) -> (B, C, D)
        if self.dose_mlp is None:
            return self.pert_mlp((e * dose.unsqueeze(-1)).sum(1))  # (B, D) -> (B, W)
        h = self.dose_mlp(torch.cat([e, dose.unsqueeze(-1)], -1)) * (comps > 0).unsqueeze(-1)  # (B, C, D)
        return self.pert_mlp(h.sum(1))  # (B, D) -> (B, W)

    def condition(self, cond):
        """The time-independent part, once per sample() call: (c0, p0), both (B, W)."""
        prior = cond["prior"] if self.cfg.use_prior else torch.zeros_like(cond["ctrl"])
        ctrl = cond["ctrl"] if self.cfg.use_ctrl else torch.zeros_like(cond["ctrl"])
        c0 = (self.embed_perturbation(cond["comps"], cond["dose"], cond.get("unseen")) + self.cov_emb(cond["cov"])
              + self.ctrl_enc(ctrl) + self.prior_cond(prior))  # (B, W)
        return c0, self.prior_in(prior)

    def forward(self, xt, t, cond):
        c0, p0 = cond["emb"] if "emb" in cond else self.condition(cond)
        t = torch.as_tensor(t, dtype=xt.dtype, device=xt.device).reshape(-1).expand(xt.shape[0])  # (B,)
        c = c0 + self.time_mlp(timestep_features(t))  # (B, W)
        h = self.in_proj(xt - cond.get("mu0", 0.0)) + p0  # (B, W)
        for block in self.blocks:
            h = block(h, c)
        v = self.out(self.norm_out(h))  # (B, G)
        return v * self.lam[cond["evidence"]][:, None] if "evidence" in cond else v


def make_cond(model, table, key_ids, ctrl_x):
    """Conditioning for a batch, in model space: table = ds.key_table(keys), key_ids (B,) into it, ctrl_x (B, G) control
    cells of the same covariate in EXPRESSION space. It owns the source x0 ~ N(mu0, sigma^2 I) of the loss and every
    sampler; start = data.Dataset.start (the start predictor, a delta: divided by std) or 0 (--no-use-start, --no-use-prior):
      source 'noise': mu0 = start, sigma = 1 (the network sees xt - mu0, so it generates x1 - start from N(0, I));
      source 'ctrl':  mu0 = ctrl + start, sigma = model.sigma."""
    dev, key_ids = model.mean.device, torch.as_tensor(key_ids, dtype=torch.long)
    ctrl = model.encode(torch.as_tensor(ctrl_x, dtype=torch.float32).to(dev))  # (B, G)
    start = table["start"][key_ids].to(dev) / model.std if model.use_start else torch.zeros_like(ctrl)  # (B, G)
    mu0 = ctrl + start if model.cfg.source == "ctrl" else start  # (B, G)
    return {"ctrl": ctrl, "comps": table["comps"][key_ids].to(dev), "dose": table["dose"][key_ids].to(dev),
            "cov": table["cov"][key_ids].to(dev), "prior": table["prior"][key_ids].to(dev) / model.std,
            "start": start, "mu0": mu0, "sigma": model.sigma, "evidence": table["evidence"][key_ids].to(dev)}


def with_twins(cond):
    """cond's rows followed by their control twins (2B rows), what paired generation integrates in one batch: the same
    rows and control cells with the empty perturbation (comps, dose, prior, start zero), the control condition."""
    twin = {**cond, **{k: torch.zeros_like(cond[k]) for k in ("comps", "dose", "prior", "start")},
            "mu0": cond["mu0"] - cond["start"]}
    return {k: torch.cat([v, twin[k]]) if torch.is_tensor(v) and v.dim() > 0 else v for k, v in cond.items()}


# ----------------------------------------------------------------------------- loss and samplers
def interpolant(x0, x1, t):
    """Straight path (Liu et al. 2023, eq. 1; Lipman et al. 2023 with sigma_min = 0):
    xt = (1 - t) x0 + t x1, and its conditional velocity ut = d xt / dt = x1 - x0."""
    t = t.reshape(-1, *([1] * (x1.dim() - 1)))  # (B,) -> (B, 1)
    return (1 - t) * x0 + t * x1, x1 - x0


def cfm_loss(model, x1, cond, draw, t_dist="uniform", p_drop=0.0, p_unseen=0.0):
    """L = E_{t, x0, x1} || v(xt, t, cond) - ut ||^2, mean over genes and cells (Lipman et al. 2023, eq. 9).
    x0 ~ N(mu0, sigma^2 I) (make_cond; N(0, I) without mu0), t ~ U(0, 1) or logit-normal (sigmoid of N(0, 1),
    Esser et al. 2024); draw: data.noise_source. In train mode the prior (input and start) is dropped per sample with
    probability p_drop, the learned component embeddings hidden with probability p_unseen (as an untrained component);
    here, not in forward, so rl.py's log-probabilities never see random inputs."""
    B = x1.shape[0]
    t = torch.sigmoid(draw((B,))) if t_dist == "logit_normal" else draw((B,), uniform=True)
    keep = draw((B, 1), uniform=True) >= p_drop  # (B, 1)
    if model.training and p_unseen > 0:
        cond = {**cond, "unseen": draw((B,), uniform=True) < p_unseen}  # (B,)
    if model.training and "prior" in cond:
        cond = {**cond, "prior": cond["prior"] * keep}
        if "start" in cond:
            drop = cond["start"] * ~keep  # (B, G) the start taken out of the source mean
            cond.update(start=cond["start"] - drop, mu0=cond["mu0"] - drop)
    x0 = (cond.get("mu0", 0.0) + cond.get("sigma", 1.0) * draw(x1.shape)).to(x1.dtype)  # (B, G)
    xt, ut = interpolant(x0, x1, t)
    vt = model(xt, t, cond)
    return (vt.to(ut.dtype) - ut).pow(2).mean()


def time_grid(steps: int):
    """The fixed grid of every sampler and of the GRPO update: t_i = i / steps (i = 0 .. steps - 1), h = 1 / steps."""
    return [i / steps for i in range(steps)], 1.0 / steps


@torch.no_grad()
def sample(model, cond, steps=20, method="midpoint", draw=None, eps=None, noise_level=0.0, record=False,
           paired=False):
    """Integrate from t = 0, x0 = mu0 + sigma eps (the source of make_cond; eps ~ N(0, I) from draw = data.noise_source,
    or the given `eps`), to t = 1 over time_grid(steps), in model space:
        euler:    x <- x + h v(x, t)                                  (global error O(h))
        midpoint: x <- x + h v(x + h/2 v(x, t), t + h/2)              (global error O(h^2))
        sde:      x <- mean + std N(0, I) (sde_mean_std), noise level a = noise_level (Flow-GRPO; a = 0: euler)
    paired=True (how cells are generated): the same draws also drive the rows' control twins (with_twins) in one batch,
    and the result is the CHANGE z = z_key - z_control (the generator's error on control cells cancels; a zero network
    gives the start predictor); decode(cond["ctrl"] + z) is the cell. Returns z (B, G); record=True (sde): also the
    states (steps + 1, B or 2B, G) and the rows' log p(x_{i+1} | x_i) (steps, B)."""
    if method not in ("euler", "midpoint", "sde") or record and method != "sde":
        raise UserError(f"sampler {method!r}{' with record' * record}: use euler, midpoint or sde (record: sde)")
    e = draw(cond["ctrl"].shape) if eps is None else eps.to(cond["ctrl"].device if "ctrl" in cond else eps.device)
    B = e.shape[0]
    cond = with_twins(cond) if paired else cond  # rows 0..B-1 the keys, B..2B-1 their twins; one draw serves both
    both = (lambda n: torch.cat([n, n])) if paired else (lambda n: n)  # noqa: E731
    x = cond.get("mu0", 0.0) + cond.get("sigma", 1.0) * both(e)  # (B or 2B, G)
    amp = data.autocast(x.device)
    if hasattr(model, "condition"):  # the control cell's and the prior's (B, G) x (G, W) products: once, not per step
        with amp:
            cond = {**cond, "emb": model.condition(cond)}
    (ts, h), xs, log_probs = time_grid(steps), [x], []
    level = torch.cat([torch.full((B, 1), float(noise_level)), torch.zeros(B, 1)]).to(x.device) if paired \
        else noise_level  # paired SDE: only the condition's path is noisy; its control twin takes the noiseless step
    for ti in ts:
        if method == "sde":
            mean, std = sde_mean_std(model, x, ti, h, cond, level)
            x = mean + std * both(draw(e.shape))  # (B, G) noise for the condition's rows; a twin's std is 0
            if record:
                log_probs.append(gauss_log_prob(x[:B], mean[:B], std[:B]))
        else:
            t = torch.full((x.shape[0],), ti, device=x.device, dtype=x.dtype)  # (B or 2B,)
            with amp:
                vt = model(x, t, cond).to(x.dtype)
                if method == "midpoint":
                    vt = model(x + 0.5 * h * vt, t + 0.5 * h, cond).to(x.dtype)
            x = x + h * vt
        if record:
            xs.append(x)
    z = x[:B] - x[B:] if paired else x
    return (z, torch.stack(xs), torch.stack(log_probs)) if record else z


def sde_mean_std(model, x, t, h, cond, noise_level):
    """Mean and std of one Euler-Maruyama step of the SDE with the ODE's marginals (Flow-GRPO, Liu et al. 2025, eq. 8,
    for t = 0 source, t = 1 data) and the source x0 ~ N(mu0, sigma^2 I): on the path, x - mu0 - t v = sigma eps, so
    eps_hat = (x - mu0 - t v) / sigma and the score is -eps_hat / ((1 - t) sigma). With s = a sigma sqrt((1 - t) / t),
        dx = [v + s^2 / 2 score] dt + s dW = [v - a^2 sigma / (2 t) eps_hat] dt + s dW.
    t_eff = max(t, h) at the source end t = 0, where 1 / t diverges (Flow-GRPO's noise end): the drift coefficient
    a^2 h / (2 t_eff) <= a^2 / 2 < 1 (a < sqrt 2) never overshoots; the grid stops at t = 1 - h.
        mean = x + v h - a^2 sigma / (2 t_eff) * eps_hat * h,   std = s sqrt(h)   (B, 1)"""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0])  # (B,)
    with data.autocast(x.device):
        vt = model(x, t, cond).to(x.dtype)  # (B, G) float32: the mean, std and log-density below are float32
    tt, sigma = t[:, None], cond.get("sigma", 1.0)  # (B, 1)
    sigma_eps = x - cond.get("mu0", 0.0) - tt * vt  # sigma * eps_hat
    t_eff = tt.clamp(min=h)
    mean = x + vt * h - (noise_level ** 2 / (2 * t_eff)) * sigma_eps * h
    std = noise_level * sigma * torch.sqrt((1 - tt).clamp(min=0) / t_eff) * math.sqrt(h)  # (B, 1)
    return mean, std


def gauss_log_prob(x_next, mean, std):
    """log N(x_next; mean, std^2 I) (B,), summed over genes (rl.py's docstring: why not averaged); std (B, 1) > 0."""
    s = std.reshape(-1)  # (B, 1) -> (B,)
    return -(x_next - mean).pow(2).sum(-1) / (2 * s ** 2) - x_next.shape[-1] * (torch.log(s) + 0.5 * math.log(2 * math.pi))


def sde_log_prob(model, x, t, h, cond, noise_level, x_next):
    """(log p(x_next | x) (B,), mean, std) of a recorded SDE transition, with gradients: GRPO's ratio (rl.py)."""
    mean, std = sde_mean_std(model, x, t, h, cond, noise_level)
    return gauss_log_prob(x_next, mean, std), mean, std


# ----------------------------------------------------------------------------- generation and checkpoints
@torch.no_grad()
def generate(model, ds, keys, n_cells=None, steps=20, method="midpoint", noise_level=0.0, seed=0, chunk=4096,
             repeat=1) -> dict:
    """{key: (n * repeat, G) generated cells in expression space}: each a control cell of the key's covariate plus
    the generator's change (sample, paired). n_cells: an int, a list (per key), or None (as many as the real condition has);
    repeat: candidates per cell on consecutive rows, each from its own control cell (evaluate.best_of_n); noise_level
    > 0: the RL SDE instead of the ODE `method`. All keys together, in chunks of cells."""
    g, g_dev = torch.Generator().manual_seed(seed), torch.Generator(device=model.mean.device).manual_seed(seed)
    n = list(n_cells) if isinstance(n_cells, (list, tuple)) else [n_cells or len(ds.cell_idx[k]) for k in keys]
    table, draw = ds.key_table(keys), data.noise_source(g_dev, model.mean.device)
    key_ids = torch.repeat_interleave(torch.arange(len(keys)), torch.tensor(n) * repeat)  # (sum n * repeat,)
    rows = np.concatenate(data.control_rows(ds, keys, [m * repeat for m in n], g))  # (sum n * repeat,)
    out = []
    for s in range(0, len(rows), chunk):
        cond = make_cond(model, table, key_ids[s:s + chunk], ds.X[rows[s:s + chunk]])
        z = sample(model, cond, steps, "sde" if noise_level > 0 else method, draw, noise_level=noise_level,
                   paired=True)
        out.append(model.decode(cond["ctrl"] + z).cpu())
    return dict(zip(keys, torch.cat(out).split([m * repeat for m in n])))


def build_model(hp: dict) -> VelocityField:
    """A VelocityField from its stored hyper-parameters (gene features: in the state dict)."""
    cfg = ModelConfig(**{f.name: hp[f.name] for f in fields(ModelConfig) if f.name in hp})
    p = cfg.gene_feat_dim
    return VelocityField(cfg, gene_feat=torch.zeros(cfg.n_comp, p) if p else None)


def load_checkpoint(path, device="cpu", genes=None, resume=None):
    """(model with the EMA weights in eval mode, checkpoint dict); genes, resume: see data.read_checkpoint."""
    ckpt = data.read_checkpoint(path, resume, genes)
    try:
        model = build_model(ckpt["config"]["model"])
        model.load_state_dict(ckpt["ema"])
    except (TypeError, KeyError, RuntimeError) as e:
        raise UserError(f"{path}: its weights do not fit the model it describes ({str(e).splitlines()[0][:120]}); "
                        "another version wrote it: retrain it") from None
    return model.to(device).eval(), ckpt


# ----------------------------------------------------------------------------- validation
@torch.no_grad()
def val_check(model, ds, keys, n_cells=64, seed=0, steps=10):
    """Validation loss (CFM, <= n_cells real cells per key) and Pearson of generated vs real mean deltas (ODE)."""
    rng = np.random.default_rng(seed)
    real = [rng.choice(ds.cell_idx[k], min(n_cells, len(ds.cell_idx[k])), replace=False) for k in keys]
    ctrl = np.concatenate([rng.choice(ds.ctrl_idx[k[1]], len(r)) for k, r in zip(keys, real)])  # (sum n,)
    key_ids = torch.repeat_interleave(torch.arange(len(keys)), torch.tensor([len(r) for r in real]))  # (sum n,)
    x1 = model.encode(torch.from_numpy(ds.X[np.concatenate(real)]).to(model.mean.device))  # (sum n, G)
    cond = make_cond(model, ds.key_table(keys), key_ids, ds.X[ctrl])
    loss = cfm_loss(model, x1, cond, data.noise_source(torch.Generator().manual_seed(seed), x1.device))
    cells = generate(model, ds, keys, n_cells, steps, seed=seed)
    delta = torch.stack([cells[k].mean(0) - ds.refs[k].ctrl_mean for k in keys])  # (K, G)
    r = data.pearson_rows(delta, torch.stack([ds.refs[k].delta for k in keys]))  # (K,)
    return {"val_loss": loss.item(), "pearson_delta": r.mean().item()}


@torch.no_grad()
def fit_residual_trust(model, ds, keys, n_cells=256, seed=0, n_boot=200, q=0.2) -> dict:
    """How far the network's change beyond the start predictor carries to held-out keys like `keys` (validation keys),
    lam in [0, 1], with the evidence behind it. Per key, r_k = generated mean delta - start_k (what the network adds,
    at lam = 1) and e_k = real mean delta - start_k (what it should add); the least-squares slope, pooled over keys
    and genes, with |r_k|^2 less its sampling noise tr(S_k) / n (else noise in r_k shrinks it):
        slope = sum_k <r_k, e_k> / sum_k |r_k|^2
    lam = its q-quantile (a lower bound) over n_boot resamples of the keys and of each key's generated and real cells
    (a residual that is noise gets ~0), at most k / (k + 1) for k keys (one key never gives full trust), in [0, 1]. The
    slope takes the change as linear in lam (which scales the velocity: close, not exact). Returns {lam, slope (the
    point estimate), lo, hi (its 80% interval), keys}."""
    if not keys:
        return {"lam": 0.0, "slope": None, "lo": None, "hi": None, "keys": 0}
    lam0, rng, K = model.lam.clone(), np.random.default_rng(seed), len(keys)
    model.lam.fill_(1.0)                                        # the network's own change
    cells = generate(model, ds, keys, n_cells, seed=seed)
    model.lam.copy_(lam0)
    start = ds.key_table(keys)["start"].double()                # (K, G)
    P, Q = np.zeros((K, n_boot + 1)), np.zeros((K, n_boot + 1))  # <r, e> and |r|^2 per key; column 0: the sample
    for j, k in enumerate(keys):                                 # a loop over keys; cells resampled in one product
        x, y = cells[k].double(), ds.refs[k].dense_cells().double()    # (n, G), (N, G)
        wx, wy = (torch.from_numpy(rng.multinomial(len(a), np.full(len(a), 1 / len(a)), n_boot) / len(a))
                  for a in (x, y))                               # (n_boot, n), (n_boot, N) resampling weights
        base = ds.refs[k].ctrl_mean.double() + start[j]
        r, e = torch.cat([x.mean(0, keepdim=True), wx @ x]) - base, torch.cat([y.mean(0, keepdim=True), wy @ y]) - base
        noise = x.var(0).sum() / len(x) * torch.tensor([1.0] + [2.0] * n_boot)  # a resampled mean: twice the noise
        P[j], Q[j] = (r * e).sum(1).numpy(), (r.pow(2).sum(1) - noise).clamp_min(0).numpy()
    pick = np.concatenate([np.arange(K)[None], rng.integers(K, size=(n_boot, K))])  # (1 + n_boot, K) keys per draw
    Ps, Qs = (A.T[np.arange(n_boot + 1)[:, None], pick].sum(1) for A in (P, Q))  # (1 + n_boot,) each
    slope = np.where(Qs > 0, Ps / np.maximum(Qs, 1e-300), 0.0)  # a change that is all noise (Qs = 0): slope 0
    lo, lam, hi = np.quantile(slope[1:], [0.1, q, 0.9])
    return {"lam": float(np.clip(min(lam, K / (K + 1)), 0, 1)), "slope": float(slope[0]), "lo": float(lo),
            "hi": float(hi), "keys": K}


@torch.no_grad()
def control_check(model, ds, n_cells=256, steps=20, seed=0) -> dict:
    """How well the generator alone (unpaired) reproduces each covariate's control cells that pretraining left out
    (Dataset.held_out_controls), averaged over covariates: bias = |mean generated - mean real| (less the sampling noise
    tr(S_x)/n + tr(S_y)/m under the root), bias_ratio = bias / the mean |delta| of its keys, energy distance."""
    g, out = torch.Generator().manual_seed(seed), []
    for ci, c in enumerate(ds.covariates):
        held = ds.held_out_controls(c)
        inputs = np.setdiff1d(ds.ctrl_idx[c], held)
        src = inputs[torch.randint(len(inputs), (n_cells,), generator=g).numpy()]
        empty = {k: v[:1] * 0 for k, v in ds.key_table(ds.keys[:1]).items()}
        cond = make_cond(model, {**empty, "cov": torch.tensor([ci])}, torch.zeros(n_cells, dtype=torch.long), ds.X[src])
        x = model.decode(sample(model, cond, steps, draw=data.noise_source(g, model.mean.device))).cpu()
        y = torch.from_numpy(ds.X[held])
        noise = x.var(0).sum() / len(x) + (y.var(0).sum() / len(y) if len(y) > 1 else 0)
        bias = float(((x.mean(0) - y.mean(0)).pow(2).sum() - noise).clamp_min(0).sqrt())
        effect = np.mean([float(ds.refs[k].delta.norm()) for k in ds.keys if k[1] == c] or [np.nan])
        out.append((bias, bias / effect, data.energy_distance(x, y)))
    return dict(zip(("bias", "bias_ratio", "energy"), np.mean(out, axis=0).tolist()))


def fit_lam(model, ds, val_keys, n_cells=256, seed=0, log=None) -> dict:
    """VelocityField.lam per evidence class of held-out key (Dataset.key_table), fitted (fit_residual_trust) on the
    validation keys of the class: validated from those with a trained component, unvalidated from the novel ones; a
    class with no validation key gets 0, the start predictor. Training keys keep 1. Returns the fits; log: prints."""
    fits = {}
    for cls, name in ((1, "validated"), (2, "unvalidated")):
        f = fits[name] = fit_residual_trust(model, ds, [k for k in val_keys if ds.novel(k) == (cls == 2)], n_cells, seed)
        model.lam[cls] = f["lam"]
        if log:
            log(f"residual trust lam of {name} held-out keys (how far the network's change is used): {f['lam']:.2f}" + (
                f" from {f['keys']} validation keys (slope {f['slope']:.2f}, 80% interval {f['lo']:.2f}-{f['hi']:.2f}; "
                f"its 20% quantile, at most {f['keys']}/{f['keys'] + 1})" if f["keys"] else ": no validation key"))
    return fits


def calibrate(model, ds, val_keys, cfg, log) -> dict:
    """The end of pretraining: control_check, then the residual trust (fit_lam; --no-fit-trust: 1)."""
    ctl = control_check(model, ds, seed=cfg.seed + 3)
    log(f"control condition vs held-out control cells (the generator alone; paired generation cancels it): bias "
        f"{ctl['bias']:.2f} ({ctl['bias_ratio']:.2f} x the mean real effect), energy {ctl['energy']:.3f}")
    fits = fit_lam(model, ds, val_keys, cfg.eval_cells, cfg.seed + 2, log) if cfg.fit_trust else {}
    return {"residual_trust": model.lam.tolist(), "trust_fit": fits, **{f"control/{k}": v for k, v in ctl.items()}}


# ----------------------------------------------------------------------------- training
def lr_at(cfg, step: int) -> float:
    """Linear warm-up to cfg.lr over cfg.warmup steps, then cosine decay to cfg.lr * cfg.min_lr_frac."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))


def prepare(cfg: FlowConfig, device, rank):
    """Before the first step: the data, the rows to draw, the model (fresh or --resume's), its EMA, optimiser, state."""
    ema, old = load_checkpoint(cfg.out, resume="flow") if cfg.resume and os.path.exists(cfg.out) else (None, None)
    cfg.steps = cfg.steps or (old["config"].get("steps", FlowConfig.steps) if old else FlowConfig.steps)  # see main
    if cfg.resume and old is None and rank == 0:
        data.say(f"--resume: no checkpoint at {cfg.out} yet, starting from step 0")
    data.check_fixed(cfg, old["config"] if old else {}, [n for n, (g, _) in data.field_help(FlowConfig).items() if g in
                     ("data", "model") and n not in ("data", "lazy")], f"--resume: {cfg.out} continues a run with",
                     "drop the option, or start a new run (another --out)")
    ds = data.load_dataset(cfg, genes=old and old["genes"], split=old and old["split"], resume=old)  # its data file
    print(f"data {data.describe(ds)}")  # ranks > 0 print nothing (data.distributed)
    G, K, B, n = len(ds.genes), len(ds.split["val"]), cfg.batch_size, cfg.eval_cells  # peak values, measured: a step
    data.check_memory(f"--batch-size {B}", 16 * B * G, "lower it")  # ~14 (B, G); val_check, fit_lam: the cells twice,
    data.check_memory(f"--eval-cells {n}", n * (2 * K * G + 2 * G + 1200) if K else 0, "lower it")  # float64, weights
    if not ds.split["train"]:
        raise UserError("the split left no training conditions; use --split random or fewer --test conditions")
    table, cells = data.training_rows(ds, ds.split["train"], cfg.self_prior, cfg.split_seed)
    if old:  # load_checkpoint gave the EMA
        model = copy.deepcopy(ema)
        model.load_state_dict(old["model"])
    else:
        mc = ModelConfig(**{f.name: getattr(cfg, f.name) for f in fields(ModelConfig)})
        mc.G, mc.n_comp, mc.n_cov = len(ds.genes), len(ds.components), len(ds.covariates)
        feat = data.gene_features(ds, cfg.gene_feat_dim) if cfg.gene_feat_dim > 0 else None  # <= G columns
        mc.doses, mc.gene_feat_dim = ds.meta.get("dose_range") is not None, 0 if feat is None else feat.shape[1]
        model = VelocityField(mc, feat)
        model.mean, model.std = data.fit_scaler(ds.X, cells["row"])
        ema = copy.deepcopy(model)
    model, ema = model.to(device).train(), ema.to(device).eval().requires_grad_(False)
    mats, rest = ([p for p in model.parameters() if (p.dim() >= 2) == m] for m in (True, False))  # decay: matrices
    opt = torch.optim.AdamW([{"params": mats, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=cfg.lr, fused=device.type in ("cpu", "cuda"))
    # the same generators on every process (the global batch); on the device, so noise is drawn where it is used
    gen, rng = torch.Generator(device=device).manual_seed(cfg.seed), np.random.default_rng(cfg.seed)
    state = {"step": 0, "history": [], "saved": None, "loss_avg": None} if not old else {
        "step": old["step"], "saved": old["step"], **{k: old["extra"][k] for k in ("history", "loss_avg")}}
    if old:
        data.restore_run(old, opt, gen, rng, cfg.seed)
    elif rank == 0:
        data.say(data.describe_start(ds, cells))
    return ds, table, cells, model, ema, opt, gen, rng, state


def train(cfg: FlowConfig) -> str:
    """Pretrain with cfm_loss on data.draw_batch's cells; returns cfg.out. torchrun: every process draws the same global
    batch (N x --batch-size), keeps its rows rank::N, DDP averages the gradients; rank 0 validates and saves."""
    data.check_args(cfg)  # and the choices of --t-dist, --source (data.CHOICES)
    data.check_outputs({"--out": cfg.out}, {"--data": cfg.data})
    torch.manual_seed(cfg.seed)  # weight init only; every other draw uses `gen` / `rng` (saved for resume)
    device, rank, world = data.distributed(cfg.device, cfg.timeout)  # torchrun: this process's device, else (dev, 0, 1)
    ds, table, cells, model, ema, opt, gen, rng, st = prepare(cfg, device, rank)
    dev_table, val_keys = {k: v.to(device) for k, v in table.items()}, ds.split["val"]
    p_unseen = cfg.unseen_dropout if ds.unseen_components() else 0.0
    fwd = torch.compile(model) if cfg.compile else model
    if world > 1:  # the loss and backward go through DDP, which averages the gradients over the processes
        fwd = DDP(fwd, device_ids=[device.index] if device.type == "cuda" else None)
    meta, B = data.dataset_meta(ds), cfg.batch_size
    part = (torch.arange(rank, B * world, world, device=device), B * world) if world > 1 else None  # this rank's rows
    draw = data.noise_source(gen, device, part)
    diverged = lambda what: UserError(f"{what}: training diverged (lr={cfg.lr}); lower --lr or raise --warmup; " + (
        f"the last good checkpoint {cfg.out} (step {st['saved']}) is kept" if st["saved"] is not None  # noqa: E731
        else "no checkpoint was written"))  # checkpoints are written whole: the last one is good
    end, t0 = (min(cfg.steps, cfg.stop_at) if cfg.stop_at > 0 else cfg.steps), time.time()
    pbar = data.progress(cfg.progress and rank == 0, total=end, initial=st["step"], desc="flow")
    while st["step"] < end:
        rows, kid, src = (a[rank::world] for a in data.draw_batch(cells, rng, B * world, cfg.ctrl_frac,
                                                              cfg.self_prior))  # (B,) each: this rank's rows
        x1 = model.encode(torch.from_numpy(ds.X[rows]).to(device))  # (B, G) densified from the sparse X
        cond = make_cond(model, dev_table, torch.from_numpy(kid).to(device), ds.X[src])
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, st["step"])
        with data.autocast(device):
            loss = cfm_loss(fwd, x1, cond, draw, cfg.t_dist, cfg.prior_dropout, p_unseen)
        if not torch.isfinite(loss):
            raise diverged(f"loss is {loss.item()} at step {st['step']}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        with torch.no_grad():  # EMA: theta_ema <- d theta_ema + (1 - d) theta, d warmed up for short runs
            d = min(cfg.ema_decay, (1 + st["step"]) / (10 + st["step"]))
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - d)
        st["step"] = step = st["step"] + 1
        st["loss_avg"] = loss.item() if st["loss_avg"] is None else 0.98 * st["loss_avg"] + 0.02 * loss.item()
        pbar.update(1)
        pbar.set_postfix(loss=f"{st['loss_avg']:.4f}")
        if rank > 0:  # rank 0 calibrates, validates and saves; the others go on to the next step
            continue
        if step == cfg.steps:  # before the last validation, so the logged metrics are the saved model's
            st["history"].append({"step": step, **calibrate(ema, ds, val_keys, cfg, data.say)})
        if val_keys and (step % cfg.eval_every == 0 or step == cfg.steps):
            ev = val_check(ema, ds, val_keys, cfg.eval_cells, seed=cfg.seed + 1)
            st["history"].append({"step": step, "train_loss": st["loss_avg"], "time": time.time() - t0, **ev})
            data.say(f"step {step} ({time.time() - t0:.0f} s): train loss {st['loss_avg']:.4f}  val loss "
                     f"{ev['val_loss']:.4f}  val Pearson(mean deltas) {ev['pearson_delta']:.3f}")
        if step % cfg.save_every == 0 or step == end:
            if not all(torch.isfinite(p).all() for p in model.parameters()):
                raise diverged(f"weights became NaN/Inf by step {step}")
            data.save_checkpoint(cfg.out, model, ema, opt, step, asdict(cfg), meta,
                                 {"history": st["history"], "loss_avg": st["loss_avg"]},
                                 {"torch": gen.get_state(), "numpy": rng.bit_generator.state})
            st["saved"] = step
    pbar.close()
    dist.barrier() if world > 1 else None  # no process returns before rank 0 has written the last checkpoint
    return cfg.out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    data.add_args(p, FlowConfig)
    cfg = FlowConfig(**vars(p.parse_args(argv, argparse.Namespace(steps=None))))  # not given: --resume keeps its own
    try:
        print(f"saved {train(cfg)}")
    except KeyboardInterrupt:  # checkpoints are written whole, at step boundaries: the last one resumes exactly
        raise KeyboardInterrupt(f"interrupted; continue from the last checkpoint in {cfg.out} (saved every "
                                f"{cfg.save_every} steps) with --resume") from None


if __name__ == "__main__":
    data.cli(main)
