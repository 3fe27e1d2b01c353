"""Tests for rl.py: group advantages and the clipped surrogate by hand, ratio = 1 and KL = 0 at the first
update, a toy generator that GRPO moves towards a rewarded target, the training loop end to end (checkpoint
loadable by flow.py and evaluate.py, namespaced history, exact resume) and the bad-input messages."""
import copy
import math
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
import data  # noqa: E402
import evaluate  # noqa: E402
import flow  # noqa: E402
import rl  # noqa: E402
import verifiers  # noqa: E402
from data import UserError  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def sim(tiny_screen):
    """A small simulated screen (15 train, 1 val, 2 test keys; 225 controls) and a tiny pretrained generator."""
    return dict(tiny_screen)


def tiny(sim, out, **kw):
    """A tiny RLConfig: 2 conditions x 4 rollouts x 3 SDE steps per GRPO step, cheap validation."""
    base = dict(ckpt=sim["ckpt"], out=str(out), steps=3, conds=2, group=4, T=3, eval_every=2, eval_cells=8,
                eval_steps=4, progress=False, seed=0)
    base.update(kw)
    names = {f.name for f in fields(rl.RLConfig)}
    assert set(base) <= names, set(base) - names
    return rl.RLConfig(**base)


# ----------------------------------------------------------------------------- group advantages
def test_group_advantages_hand_computed():
    """a (weight 1): group 0 = 1,2,3,4 (mean 2.5, population std sqrt(1.25)), group 1 constant -> 0.
    b (weight 0.5): group 0 = 0,0,1,1 (mean .5, std .5) -> -1,-1,1,1; group 1 = 2,4,6,8 (mean 5, std sqrt 5)."""
    a = torch.tensor([[1.0, 2, 3, 4], [5, 5, 5, 5]])
    b = torch.tensor([[0.0, 0, 1, 1], [2, 4, 6, 8]])
    A = rl.group_advantages({"a": a, "b": b}, {"a": 1.0, "b": 0.5})
    s = math.sqrt(1.25)
    want = torch.tensor([[-1.5 / s - 0.5, -0.5 / s - 0.5, 0.5 / s + 0.5, 1.5 / s + 0.5],
                         [0.5 * -3 / math.sqrt(5), 0.5 * -1 / math.sqrt(5), 0.5 * 1 / math.sqrt(5),
                          0.5 * 3 / math.sqrt(5)]])
    torch.testing.assert_close(A, want, atol=1e-5, rtol=0)
    # a group with no spread in any component gets exactly zero advantage
    z = rl.group_advantages({"a": torch.full((3, 4), 7.0), "b": torch.zeros(3, 4)}, {"a": 1.0, "b": 2.0})
    assert torch.equal(z, torch.zeros(3, 4))
    # components not in weights are ignored; a weight scales linearly
    A2 = rl.group_advantages({"a": a, "b": b, "c": torch.randn(2, 4)}, {"a": 2.0})
    torch.testing.assert_close(A2[0], 2 * torch.tensor([-1.5, -0.5, 0.5, 1.5]) / s, atol=1e-5, rtol=0)


@pytest.mark.parametrize("contexts", [1, 2, 4])
def test_group_advantages_centre_per_context_and_pool_the_spread(contexts):
    """Against the loop written out in numpy (numpy_advantages): a reward that only differs between contexts (the
    control cell, not the noise) gets advantage 0 with contexts > 1."""
    rng = np.random.default_rng(contexts)
    scores = {"a": rng.normal(size=(3, 8)), "b": rng.exponential(size=(3, 8))}
    weights = {"a": 1.0, "b": 2.0}
    got = rl.group_advantages({k: torch.from_numpy(v) for k, v in scores.items()}, weights, adv_clip=5.0, contexts=contexts)
    np.testing.assert_allclose(got.numpy(), numpy_advantages(scores, weights, 5.0, contexts), rtol=1e-9, atol=1e-9)
    between = {"a": np.repeat(rng.normal(size=(3, contexts)), 8 // contexts, axis=1)}        # constant per context
    A = rl.group_advantages({"a": torch.from_numpy(between["a"])}, {"a": 1.0}, contexts=contexts)
    assert A.abs().max() < 1e-9                                    # (centred on the group, it would not be)


def test_group_advantages_clipping():
    """One outlier among 16: z = (15/16) / (sqrt(15)/16) = sqrt(15) = 3.873, the others -1/sqrt(15)."""
    r = torch.zeros(1, 16)
    r[0, 3] = 1.0
    A = rl.group_advantages({"r": r}, {"r": 2.0})                      # 2 sqrt(15) = 7.75 -> clipped to 5
    assert float(A[0, 3]) == pytest.approx(5.0)
    assert float(A[0, 0]) == pytest.approx(-2 / math.sqrt(15), rel=1e-5)
    A = rl.group_advantages({"r": r}, {"r": 1.0}, adv_clip=3.0)
    assert float(A[0, 3]) == pytest.approx(3.0)
    A = rl.group_advantages({"r": -r}, {"r": 2.0}, adv_clip=4.0)
    assert float(A[0, 3]) == pytest.approx(-4.0)
    assert float(rl.group_advantages({"r": r}, {"r": 1.0}, adv_clip=10.0)[0, 3]) == pytest.approx(math.sqrt(15), rel=1e-5)


# ----------------------------------------------------------------------------- the clipped surrogate
def test_judge_is_a_paired_t_test_of_the_weighted_reward_change_with_guards():
    """judge's gain is the mean per-draw weighted reward change in noise units and t its one-sample t statistic
    (scipy); a step is kept only beyond t_min and with no guard worse on the mean than its noise."""
    from scipy import stats
    rng = np.random.default_rng(0)
    names = ["reward/a", "reward/b", "pearson_delta", "energy", "log_effect"]
    draws0 = [{k: float(rng.normal()) for k in names} for _ in range(5)]
    noise = {k: float(rng.uniform(0.5, 2)) for k in names}
    weights = {"a": 1.0, "b": 3.0}
    up = [{**d, "reward/a": d["reward/a"] + 0.4 + 0.1 * rng.normal(), "reward/b": d["reward/b"] + 0.1 * rng.normal()}
          for d in draws0]
    gain, t, kept = rl.judge(up, draws0, noise, weights)
    s = np.array([(1 * (u["reward/a"] - d["reward/a"]) / noise["reward/a"] + 3 * (u["reward/b"] - d["reward/b"]) /
                   noise["reward/b"]) / 4 for u, d in zip(up, draws0)])
    assert gain == pytest.approx(s.mean()) and t == pytest.approx(stats.ttest_1samp(s, 0).statistic, rel=1e-9)
    assert t > 2 and kept
    worse = [{**u, "energy": u["energy"] + 1.5 * noise["energy"]} for u in up]           # a guard beyond its noise
    assert rl.judge(worse, draws0, noise, weights) == (gain, t, False)
    within = [{**u, "energy": u["energy"] + 0.5 * noise["energy"]} for u in up]          # within it: allowed
    assert rl.judge(within, draws0, noise, weights)[2]
    assert not rl.judge(draws0, draws0, noise, weights)[2]                               # no change: not kept
    down = [{**d, "reward/a": d["reward/a"] - 0.4 + 0.1 * rng.normal()} for d in draws0]
    assert rl.judge(down, draws0, noise, weights)[1] < -2


def test_grpo_loss_and_gradient_by_hand():
    """ratio r = exp(logp - logp_old); per sample the loss is -min(r A, clip(r) A) / B, whose derivative in logp
    is -r A / B where the unclipped term is the minimum and 0 where clipping binds (r > 1 + eps with A > 0,
    r < 1 - eps with A < 0). KL = ||mean - mean_ref||^2 / (2 std^2), d/dmean = (mean - mean_ref) / std^2."""
    r = torch.tensor([1.0, 1.5, 0.5, 1.1, 1.5, 0.5], dtype=torch.float64)
    A = torch.tensor([1.0, 1.0, -1.0, -1.0, -1.0, 1.0], dtype=torch.float64)
    B, clip, beta = 6, 0.2, 0.3
    logp = torch.log(r).requires_grad_(True)
    logp_old = torch.zeros(B, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    mean_ref = torch.randn(B, 3, generator=g, dtype=torch.float64)
    mean = (mean_ref + torch.randn(B, 3, generator=g, dtype=torch.float64)).requires_grad_(True)
    std = torch.tensor([0.5, 1.0, 2.0, 0.5, 1.0, 2.0], dtype=torch.float64).reshape(B, 1)
    loss, stats = rl.grpo_loss(logp, logp_old, A, mean, mean_ref, std, clip, beta)
    # by hand: min(rA, clip(r)A) = 1, 1.2 (clipped), -0.8 (clipped), -1.1, -1.5, 0.5
    surrogate = -(1 + 1.2 - 0.8 - 1.1 - 1.5 + 0.5) / B
    kl = ((mean - mean_ref) ** 2).sum(-1).detach() / (2 * std.reshape(-1) ** 2)
    assert loss.item() == pytest.approx(surrogate + beta * float(kl.mean()), rel=1e-12)
    assert stats["kl"] == pytest.approx(float(kl.mean()))
    assert stats["clipfrac"] == pytest.approx(4 / 6)
    loss.backward()
    want = torch.tensor([-1.0, 0.0, 0.0, 1.1, 1.5, -0.5], dtype=torch.float64) / B
    torch.testing.assert_close(logp.grad, want, atol=1e-12, rtol=0)
    torch.testing.assert_close(mean.grad, beta * (mean - mean_ref).detach() / std ** 2 / B, atol=1e-12, rtol=0)


def test_kl_is_the_closed_form_of_two_gaussians_with_one_std():
    g = torch.Generator().manual_seed(1)
    mean, mean_ref = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    std = torch.rand(5, 1, generator=g) + 0.2
    _, stats = rl.grpo_loss(torch.zeros(5), torch.zeros(5), torch.zeros(5), mean, mean_ref, std, 0.2, 1.0)
    p = torch.distributions.Normal(mean, std.expand(5, 7))
    q = torch.distributions.Normal(mean_ref, std.expand(5, 7))
    want = torch.distributions.kl_divergence(p, q).sum(-1).mean()
    assert stats["kl"] == pytest.approx(float(want), rel=1e-5)


def test_first_update_ratio_is_one_and_kl_zero(sim):
    """Policy = a copy of the reference; recompute the recorded rollout's log-probabilities: identical to the
    rollout's (ratio 1), the reference mean equals the policy mean (KL 0), and the surrogate's gradient in
    logp is -A / B."""
    ds, ref = sim["ds"], sim["model"]
    policy = copy.deepcopy(ref).train().requires_grad_(True)
    keys = ds.split["train"][:2]
    table = ds.key_table(keys)
    kid = torch.arange(2).repeat_interleave(4)                                          # (8,)
    rows = np.concatenate([ds.ctrl_idx[k[1]][:4] for k in keys])
    cond = flow.make_cond(policy, table, kid, ds.X[rows])
    T, a = 4, 0.7
    draw = data.noise_source(torch.Generator().manual_seed(0), "cpu")
    cells, xs, logp_old = rl.rollout(policy, cond, T, a, draw, draw((8, len(ds.genes))))
    assert xs.shape == (T + 1, 16, len(ds.genes)) and logp_old.shape == (T, 8) and cells.shape == (8, len(ds.genes))
    assert torch.isfinite(logp_old).all()
    adv = torch.tensor([1.0, -1, 0.5, -0.5, 2, -2, 0, 0])
    both = flow.with_twins(cond)                                                            # the rows, then their twins
    for i in range(T):
        logp, mean, std = flow.sde_log_prob(policy, xs[i], i / T, 1 / T, both, a, xs[i + 1])
        logp = logp[:8]
        torch.testing.assert_close(logp.detach(), logp_old[i], atol=1e-3, rtol=1e-6)
        with torch.no_grad():
            mean_ref, _ = flow.sde_mean_std(ref, xs[i], i / T, 1 / T, both, a)
        logp_leaf = logp.detach().requires_grad_(True)
        loss, stats = rl.grpo_loss(logp_leaf, logp_old[i], adv, mean, mean_ref, std, 0.2, 0.5)
        assert stats["ratio_dev"] < 1e-3 and stats["kl"] == 0.0 and stats["clipfrac"] == 0.0
        assert loss.item() == pytest.approx(-float(adv.mean()), abs=1e-3)
        loss.backward()
        torch.testing.assert_close(logp_leaf.grad, -adv / 8, atol=1e-3, rtol=0)


def test_rollout_cells_are_their_control_cells_plus_the_change(sim):
    """A rollout's cells are generated paired: with a zero output layer the control twin stays at its source draw, so
    each cell is its own control cell plus its own key's start plus exactly what the SDE adds to the condition's path
    (an unpaired SDE from the same draws); the states and log-probabilities are the condition path's. Rows that share
    a context (control cell, source draw) differ only by that noise: the same noise gives the same cell."""
    ds = sim["ds"]
    model = copy.deepcopy(sim["model"])
    torch.nn.init.zeros_(model.out.weight)
    torch.nn.init.zeros_(model.out.bias)
    keys = ds.split["test"] + ds.split["val"]
    kid = torch.arange(len(keys)).repeat_interleave(4)                                 # (12,)
    rows = np.random.default_rng(0).choice(ds.ctrl_idx["all"], len(kid) // 2).repeat(2)  # contexts of 2 rows
    cond = flow.make_cond(model, ds.key_table(keys), kid, ds.X[rows])
    T, G = 3, len(ds.genes)
    draw = lambda: data.noise_source(torch.Generator().manual_seed(0), "cpu")  # noqa: E731
    eps = draw()((len(kid) // 2, G)).repeat_interleave(2, 0)                    # a source draw per context
    cells, xs, logp = rl.rollout(model, cond, T, 0.7, draw(), eps)
    x1 = flow.sample(model, cond, T, "sde", draw(), eps=eps, noise_level=0.7)   # unpaired, the same draws
    start = torch.from_numpy(np.stack([ds.start(keys[i]) for i in kid.tolist()]))
    want = model.decode(cond["ctrl"] + start / model.std + x1 - (cond["mu0"] + eps))
    torch.testing.assert_close(cells, want, atol=1e-4, rtol=0)
    torch.testing.assert_close(xs[-1, :len(kid)], x1, atol=1e-5, rtol=0)
    torch.testing.assert_close(xs[:, len(kid):], (cond["mu0"] - cond["start"] + eps).expand(T + 1, -1, -1))  # twins
    assert xs.shape == (T + 1, 2 * len(kid), G) and logp.shape == (T, len(kid)) and torch.isfinite(logp).all()
    assert float((cells[0::2] - cells[1::2]).abs().mean()) > 0.05                # a context's rows: their noise
    same, _, _ = rl.rollout(model, cond, T, 0.7, draw(), eps)
    assert torch.equal(same, cells)


# ----------------------------------------------------------------------------- learning on a toy
class Toy(torch.nn.Module):
    """v(x, t) = c + W [x, t] in D dims (the VelocityField call signature; cond is ignored); decode = identity."""

    def __init__(self, D=2):
        super().__init__()
        self.c = torch.nn.Parameter(torch.zeros(D))
        self.lin = torch.nn.Linear(D + 1, D)
        torch.nn.init.zeros_(self.lin.weight)
        torch.nn.init.zeros_(self.lin.bias)

    def forward(self, xt, t, cond):
        t = torch.as_tensor(t, dtype=xt.dtype).expand(xt.shape[0]).reshape(-1, 1)   # (B, 1)
        return self.c + self.lin(torch.cat([xt, t], -1))

    def decode(self, z):
        return z


def test_grpo_moves_a_toy_generator_towards_the_rewarded_target():
    """Reward -(x - 2)^2 summed over D = 2 dims; v = 0 at the start, so samples are ~N(0, 1). GRPO with the
    library's rollout / group_advantages / sde_log_prob / grpo_loss pulls the mean towards 2."""
    torch.manual_seed(0)
    D, n_groups, G, T, a = 2, 4, 16, 5, 0.7
    policy = Toy(D)
    ref = copy.deepcopy(policy).requires_grad_(False)
    opt = torch.optim.Adam(policy.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(0)
    cond = {"ctrl": torch.zeros(n_groups * G, D)}
    reward = lambda x: -((x - 2.0) ** 2).sum(-1)  # noqa: E731

    def rollout(cond, gen):  # rl.rollout without pairing: the toy has no control condition
        return flow.sample(policy, cond, T, "sde", data.noise_source(gen, "cpu"), noise_level=a, record=True)[1:]

    def sample_mean(n=2000):
        xs, _ = rollout({"ctrl": torch.zeros(n, D)}, torch.Generator().manual_seed(123))
        return xs[-1].mean(0)

    m0 = sample_mean()
    assert float(m0.abs().max()) < 0.15
    kls = []
    for step in range(40):
        xs, logp_old = rollout(cond, gen)                                               # (T+1, B, D), (T, B)
        r = reward(policy.decode(xs[-1])).reshape(n_groups, G)
        adv = rl.group_advantages({"r": r}, {"r": 1.0}).reshape(-1)
        opt.zero_grad()
        for i in range(T):
            logp, mean, std = flow.sde_log_prob(policy, xs[i], i / T, 1 / T, cond, a, xs[i + 1])
            with torch.no_grad():
                mean_ref, _ = flow.sde_mean_std(ref, xs[i], i / T, 1 / T, cond, a)
            loss, stats = rl.grpo_loss(logp, logp_old[i], adv, mean, mean_ref, std, 0.2, 0.01)
            (loss / T).backward()
            kls.append(stats["kl"])
        opt.step()
    m1 = sample_mean()
    assert float((m1 - 2).abs().max()) < 0.5, m1            # from ~0 to near 2 (2.00, 2.06 with these seeds)
    assert all(math.isfinite(k) for k in kls) and max(kls) < 1e3


# ----------------------------------------------------------------------------- the loop judged by what it does
def numpy_advantages(scores: dict, weights: dict, clip: float, contexts: int = 1) -> np.ndarray:
    """GRPO's advantages written out again, a loop over groups and contexts: each reward centred on its context's mean
    (a group's n cells are `contexts` runs of consecutive cells), divided by the group's pooled within-context std
    (population) + 1e-6, weighted and summed, clipped to +/- clip. scores {name: (n_groups, n)}."""
    A = np.zeros_like(next(iter(scores.values())))
    for n, w in weights.items():
        for g, r in enumerate(scores[n]):
            parts = np.split(r, contexts)
            dev = np.concatenate([p - p.mean() for p in parts])
            A[g] += w * dev / (np.sqrt(np.mean(dev ** 2)) + 1e-6)
    return np.clip(A, -clip, clip)


def record_the_loop(monkeypatch):
    """Spies on the module-level pieces rl.train calls: every rollout's cells, every reward call (the Verifier's
    cells and components), every grpo_loss call (its arguments and KL) with the number of optimiser steps taken
    before it (a global optimiser hook). Returns (events, close)."""
    events, opt_steps = [], [0]
    real_rollout, real_loss, real_call = rl.rollout, rl.grpo_loss, verifiers.Verifier.__call__

    def rollout(*a, **kw):
        out = real_rollout(*a, **kw)
        events.append(("rollout", out[0].detach().clone()))
        return out

    def call(self, x, ref):
        total, scores = real_call(self, x, ref)
        events.append(("reward", self, x.detach().clone(), {n: r.detach().clone() for n, r in scores.items()}))
        return total, scores

    def loss(logp, logp_old, adv, mean, mean_ref, std, *a, **kw):
        out = real_loss(logp, logp_old, adv, mean, mean_ref, std, *a, **kw)
        events.append(("loss", opt_steps[0], dict(logp=logp.detach().clone(), logp_old=logp_old.detach().clone(),
                                                   adv=adv.detach().clone(), mean=mean.detach().clone(),
                                                   mean_ref=mean_ref.detach().clone(), kl=float(out[1]["kl"]))))
        return out

    monkeypatch.setattr(rl, "rollout", rollout)
    monkeypatch.setattr(rl, "grpo_loss", loss)
    monkeypatch.setattr(verifiers.Verifier, "__call__", call)
    hook = register_optimizer_step_post_hook(
        lambda *a: opt_steps.__setitem__(0, opt_steps[0] + 1))
    return events, hook.remove


def steps_of(events):
    """The recorded events cut into GRPO steps: [(cells, [(verifier, x, scores)], [(opt_steps, loss args)])], the
    reward calls being those between a rollout and its first loss (validation calls come elsewhere)."""
    out = []
    for e in events:
        if e[0] == "rollout":
            out.append((e[1], [], []))
        elif out and e[0] == "reward" and not out[-1][2]:
            out[-1][1].append(e[1:])
        elif out and e[0] == "loss":
            out[-1][2].append(e[1:])
    return [st for st in out if st[2]]                                     # the learning curve's rollouts: no update


def test_the_loss_gets_the_advantages_of_those_very_cells_and_the_kl_to_the_frozen_model(sim, tmp_path, monkeypatch):
    """Real rl.train, spied on: in every step the rewards are computed on exactly the rolled-out cells, one group per
    call; every grpo_loss call gets the advantages of those rewards (written out again in numpy: weights, group
    mean and std, clip); before the first optimiser step the reference mean equals the policy's (KL 0), after it
    they differ (KL > 0); and the update climbs the surrogate of the true advantages: on the second pass over the
    same transitions mean(ratio A) > 0 (it is 0 at ratio 1). Advantages with the wrong sign, or a KL taken against
    the policy itself, fail here."""
    events, close = record_the_loop(monkeypatch)
    try:
        cfg = tiny(sim, tmp_path / "rl.pt", steps=2, conds=3, group=4, T=3, t_frac=1.0, epochs=2, eval_every=10)
        rl.train(cfg)
    finally:
        close()
    weights = verifiers.parse_weights(cfg.rewards)
    assert len(weights) == 5 and len(set(weights.values())) == 2           # several rewards, unequal weights
    steps = steps_of(events)
    assert len(steps) == 2
    climbed = []
    for cells, rewards, losses in steps:
        assert len(rewards) == cfg.conds and all(set(c) == set(weights) for _, _, c in rewards)
        assert torch.equal(torch.cat([x for _, x, _ in rewards]), cells)     # the rollout's cells, group by group
        assert all(len(x) == cfg.group for _, x, _ in rewards)
        scores = {n: np.stack([c[n].double().numpy() for _, _, c in rewards]) for n in weights}   # (groups, n)
        want = torch.from_numpy(numpy_advantages(scores, weights, cfg.adv_clip, cfg.contexts).reshape(-1)).float()
        assert float(want.abs().max()) > 0.5                                  # rewards that differ within groups
        assert len(losses) == cfg.epochs * cfg.T
        for _, a in losses:
            torch.testing.assert_close(a["adv"], want, atol=1e-4, rtol=1e-4)
        first = [a for n, a in losses if n == losses[0][0]]                   # the pass before this step's update
        later = [a for n, a in losses if n > losses[0][0]]
        assert len(first) == len(later) == cfg.T
        for a in first if losses[0][0] == 0 else []:                          # policy == reference before any update
            assert torch.equal(a["mean"], a["mean_ref"]) and a["kl"] == 0.0
        for a in later:
            assert float((a["mean"] - a["mean_ref"]).abs().max()) > 0 and a["kl"] > 0
        ratio_gain = sum(float(((a["logp"] - a["logp_old"]).exp() * want).mean()) for a in later)
        climbed.append(ratio_gain)
    assert all(c > 0 for c in climbed), climbed
    hist = torch.load(tmp_path / "rl_last.pt", weights_only=True)["extra"]["history"]
    kls = [h["train/kl"] for h in hist if "train/kl" in h]
    assert len(kls) == 2 and all(k > 0 for k in kls)


def test_grpo_climbs_a_reward_with_a_known_optimum(sim, tmp_path, monkeypatch):
    """rl.train as shipped (paired rollouts, groups that share their contexts) with one reward, -|mean of 20 genes -
    target| (optimum: the genes' mean at the target, 2 above the control cells' level), for 8 steps: the fixed
    training groups of its learning curve (the same conditions, contexts and noise before and after) get nearer the
    target, and with the advantages' sign flipped farther. (Paired, only a change specific to the perturbed conditions
    moves a cell: the twins' KL holds the control condition, so this tiny generator climbs slower than unpaired.)"""
    ds = sim["ds"]
    ctrl = ds.X[ds.ctrl_idx["all"]]
    genes = torch.from_numpy(np.argsort(-ctrl.mean(0))[:20].copy())            # expressed: no clamping at 0
    target = float(ctrl[:, genes].mean()) + 2.0
    monkeypatch.setitem(verifiers.REWARDS, "target", lambda x, ref, v: -(x[:, genes].mean(1) - target).abs())
    curve = {}
    for sign in (1, -1):
        real = rl.group_advantages
        monkeypatch.setattr(rl, "group_advantages", lambda *a, **kw: sign * real(*a, **kw))
        rl.train(tiny(sim, tmp_path / f"rl{sign}.pt", rewards="target=1", steps=8, conds=4, group=8, contexts=2, T=4,
                      sde_noise=0.3, lr=1e-2, beta=0.1, eval_every=8))
        monkeypatch.setattr(rl, "group_advantages", real)
        hist = torch.load(tmp_path / f"rl{sign}_last.pt", weights_only=True)["extra"]["history"]
        curve[sign] = [h["fixed/target"] for h in hist if "fixed/target" in h]
        assert len(curve[sign]) == 2 and all(math.isfinite(h["reward/target/mean"]) for h in hist
                                              if "reward/target/mean" in h)
    (before, up), (_, down) = curve[1], curve[-1]                          # +0.006 to +0.029, -0.012 to -0.052 (seeds 0-3)
    assert up > before + 0.005 and down < before - 0.005 and up - down > 0.02, curve


# ----------------------------------------------------------------------------- the loop end to end
def test_train_end_to_end_checkpoint_history_and_evaluate(sim, tmp_path, capsys):
    out = rl.train(tiny(sim, tmp_path / "rl.pt"))
    assert out == str(tmp_path / "rl.pt") and os.path.isfile(out)
    assert os.path.isfile(tmp_path / "rl_last.pt")
    model, ck = flow.load_checkpoint(out)
    assert ck["genes"] == sim["ds"].genes
    assert ck["extra"]["base"] == sim["ckpt"] and ck["extra"]["rl_config"]["steps"] == 3
    # the saved policy moved away from the pretrained weights
    base = dict(sim["model"].named_parameters())
    last, _ = flow.load_checkpoint(str(tmp_path / "rl_last.pt"))
    assert any(not torch.equal(p, base[n]) for n, p in last.named_parameters())
    # the full history is in the last state: validations at 0, 2 and 3, training steps 1..3
    full = torch.load(tmp_path / "rl_last.pt", weights_only=True)["extra"]["history"]
    assert [h["step"] for h in full if "val/gain" in h] == [0, 2, 3]
    assert [h["step"] for h in full if "reward/total" in h] == [1, 2, 3]
    # the result is the kept state (step 0 unless a step beat it by more than the noise; its history ends there)
    assert ck["step"] == ck["extra"]["best"]["step"] and ck["extra"]["history"][-1]["step"] == ck["step"]
    assert ck["extra"]["history"] == [h for h in full if h["step"] <= ck["step"]]
    rec = next(h for h in full if "reward/total" in h)
    val_recs = [h for h in full if "val/gain" in h]
    for n in verifiers.parse_weights(verifiers.DEFAULT_REWARDS):
        assert f"reward/{n}/mean" in rec and math.isfinite(rec[f"reward/{n}/mean"])
    for k in ("train/kl", "train/clipfrac", "train/loss", "train/grad_norm", "train/zero_spread", "time/rollout",
              "time/reward", "time/update"):
        assert k in rec and math.isfinite(rec[k]), k
    assert val_recs[0]["step"] == 0
    for k in ("val/pearson_delta", "val/energy", "val/effect_ratio", "val/spread_ratio", "val/gain",
              "val/reward/pearson", "fixed/pearson", "lam"):
        assert k in val_recs[0], k
    # evaluate.py loads and evaluates it
    capsys.readouterr()
    evaluate.main(["--ckpt", out, "--ode-steps", "4", "--sde-noise", "0", "--out", str(tmp_path / "r.json")])
    text = capsys.readouterr().out
    assert f"| {out} |" in text and "| control |" in text
    # the before/after table of `python rl.py`
    table = rl.before_after(tiny(sim, out), out)
    names = [ln.split("|")[1].strip() for ln in table.splitlines() if ln.startswith("|")][2:]
    assert names == ["control", "train_mean", "additive", "start", "pretrained", "rl"]


def test_resume_gives_the_same_parameters_as_an_uninterrupted_run(sim, tmp_path):
    rl.train(tiny(sim, tmp_path / "a.pt", steps=2))
    rl.train(tiny(sim, tmp_path / "a.pt", steps=4, resume=True))
    rl.train(tiny(sim, tmp_path / "b.pt", steps=4))
    a = torch.load(tmp_path / "a_last.pt", weights_only=True)
    b = torch.load(tmp_path / "b_last.pt", weights_only=True)
    assert a["step"] == b["step"] == 4
    assert a["model"].keys() == b["model"].keys()
    for n in a["model"]:
        assert torch.equal(a["model"][n], b["model"][n]), n
    steps = lambda h: [r["step"] for r in h if "reward/total" in r]  # noqa: E731
    assert steps(a["extra"]["history"]) == steps(b["extra"]["history"]) == [1, 2, 3, 4]
    ra = [r["reward/total"] for r in a["extra"]["history"] if "reward/total" in r]
    rb = [r["reward/total"] for r in b["extra"]["history"] if "reward/total" in r]
    assert ra == rb


def interrupt_rollout_at(monkeypatch, call):
    """Make the `call`-th rl.rollout raise KeyboardInterrupt (Ctrl-C during step `call`)."""
    real, n = rl.rollout, [0]

    def rollout(*a, **kw):
        n[0] += 1
        if n[0] == call:
            raise KeyboardInterrupt
        return real(*a, **kw)
    monkeypatch.setattr(rl, "rollout", rollout)


def test_ctrl_c_saves_a_resumable_checkpoint(sim, tmp_path, monkeypatch):
    interrupt_rollout_at(monkeypatch, 3)                                 # 1: the learning curve at step 0
    with pytest.raises(KeyboardInterrupt, match="resume"):
        rl.train(tiny(sim, tmp_path / "c.pt", steps=4, eval_every=10))
    monkeypatch.undo()
    state = torch.load(tmp_path / "c_last.pt", weights_only=True)
    assert state["step"] == 1 and [h["step"] for h in state["extra"]["history"] if "reward/total" in h] == [1]
    rl.train(tiny(sim, tmp_path / "c.pt", steps=4, eval_every=10, resume=True))
    assert torch.load(tmp_path / "c_last.pt", weights_only=True)["step"] == 4


def test_resume_after_ctrl_c_is_exact(sim, tmp_path, monkeypatch):
    interrupt_rollout_at(monkeypatch, 5)                  # after two steps and a validation (2 rollouts), in the third
    with pytest.raises(KeyboardInterrupt):
        rl.train(tiny(sim, tmp_path / "c.pt", steps=4))
    monkeypatch.undo()
    rl.train(tiny(sim, tmp_path / "c.pt", steps=4, resume=True))
    rl.train(tiny(sim, tmp_path / "b.pt", steps=4))
    c = torch.load(tmp_path / "c_last.pt", weights_only=True)
    b = torch.load(tmp_path / "b_last.pt", weights_only=True)
    assert c["step"] == b["step"] == 4
    for n in b["model"]:
        assert torch.equal(c["model"][n], b["model"][n]), n


# ----------------------------------------------------------------------------- bad input
def test_missing_checkpoint(tmp_path):
    with pytest.raises(UserError, match="nope.pt"):
        rl.main(["--ckpt", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "rl.pt")])


@pytest.fixture(scope="module")
def missing_ckpt_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    return subprocess.run([sys.executable, "rl.py", "--ckpt", str(tmp / "nope.pt"), "--out", str(tmp / "rl.pt")],
                          cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=300)


def test_cli_missing_checkpoint_prints_one_error_line(missing_ckpt_run):
    res = missing_ckpt_run
    assert res.returncode != 0 and "Traceback" not in res.stderr
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "nope.pt" in err[0], res.stderr


def test_cli_missing_checkpoint_exit_code_2(missing_ckpt_run):
    assert missing_ckpt_run.returncode == 2


def test_checkpoint_genes_not_in_the_data(sim, tmp_path):
    h = data.read_h5ad(sim["path"])
    h.var_names = np.array([f"X{g}" for g in h.var_names], dtype=object)
    other = tmp_path / "other.h5ad"
    data.write_h5ad(other, h)
    with pytest.raises(UserError, match="genes"):
        rl.train(tiny(sim, tmp_path / "rl.pt", data=str(other)))
    assert not os.path.exists(tmp_path / "rl.pt")


def test_unknown_reward_name(sim, tmp_path):
    with pytest.raises(UserError, match="bogus"):
        rl.main(["--ckpt", sim["ckpt"], "--out", str(tmp_path / "rl.pt"), "--rewards", "pearson=1,bogus=1",
                 "--no-progress"])
    assert not os.path.exists(tmp_path / "rl.pt")


def test_reward_returning_nan_names_the_verifier_and_condition(sim, tmp_path, monkeypatch):
    monkeypatch.setitem(verifiers.REWARDS, "rmse", lambda x, ref, v: torch.full((x.shape[0],), float("nan")))
    with pytest.raises(UserError) as e:
        rl.train(tiny(sim, tmp_path / "rl.pt", rewards="pearson=1,rmse=1", steps=1))
    msg = str(e.value)
    assert "'rmse'" in msg and "'pearson'" not in msg
    assert any(repr(k) in msg or k[0] in msg for k in sim["ds"].split["train"]), msg


def test_group_larger_than_the_control_cells(sim, tmp_path):
    n = len(sim["ds"].ctrl_idx["all"])
    with pytest.raises(UserError, match=str(n)):
        rl.train(tiny(sim, tmp_path / "rl.pt", group=n + 1))


def test_a_zero_reward_weight_is_left_out(sim, tmp_path):
    """--rewards pearson=1,rmse=0 crashed (torch.stack of an empty list): rmse is neither computed nor logged."""
    rl.train(tiny(sim, tmp_path / "rl.pt", rewards="pearson=1,rmse=0", steps=1))
    hist = torch.load(tmp_path / "rl_last.pt", weights_only=True)["extra"]["history"]
    rec = next(h for h in hist if "reward/total" in h)
    assert "reward/pearson/mean" in rec and "reward/rmse/mean" not in rec
    assert rec["reward/total"] == pytest.approx(rec["reward/pearson/mean"])


def test_pretrained_generator_is_reused_only_with_the_same_options(sim, tmp_path, monkeypatch):
    """No --ckpt: runs/flow_<stem>_<hash>.pt is reused when the data options, seeds and steps match, and a new
    one is pretrained when --test, --split-seed or --seed differ."""
    monkeypatch.chdir(tmp_path)
    made = []
    monkeypatch.setattr(flow, "train", lambda fcfg: (made.append(fcfg), Path(fcfg.out).touch(), fcfg.out)[2])
    monkeypatch.setattr(data, "read_checkpoint", lambda path: {"step": 5})   # a finished 5-step pretraining
    cfg = lambda **kw: rl.RLConfig(data=str(sim["path"]), pretrain_steps=5, progress=False, **kw)  # noqa: E731
    a = rl.pretrained(cfg())
    assert len(made) == 1 and made[0].steps == 5 and made[0].data == str(sim["path"])
    assert rl.pretrained(cfg()) == a and len(made) == 1                     # same options: reused
    others = {rl.pretrained(cfg(test="X+Y")), rl.pretrained(cfg(split_seed=1)), rl.pretrained(cfg(seed=1))}
    assert len(made) == 4 and a not in others and len(others) == 3
    assert rl.pretrained(cfg(ckpt="given.pt")) == "given.pt"


def test_an_interrupted_cached_pretraining_is_resumed_not_reused(sim, tmp_path, monkeypatch):
    """A cached generator that stopped at step 3 of 6 (Ctrl-C during pretraining) is finished with --resume."""
    monkeypatch.chdir(tmp_path)
    cfg = rl.RLConfig(data=str(sim["path"]), pretrain_steps=6, progress=False, n_genes=0)
    real_train, calls = flow.train, []
    monkeypatch.setattr(flow, "train", lambda c: (calls.append(c), c.out)[1])
    path = rl.pretrained(cfg)                                            # learn the cache name
    real_train(flow.FlowConfig(data=str(sim["path"]), n_genes=0, steps=6, stop_at=3, width=16, depth=1,
                               batch_size=16, eval_every=100, save_every=100, progress=False, out=path))
    assert torch.load(path, weights_only=True)["step"] == 3
    assert rl.pretrained(cfg) == path and len(calls) == 2 and calls[-1].resume and calls[-1].steps == 6


def test_data_options_fixed_by_the_checkpoint_are_refused(sim, tmp_path):
    """With --ckpt the checkpoint's data options (split, genes, ...) hold: a different one is refused, one line."""
    with pytest.raises(UserError, match=r"--n-genes 7: the checkpoint .* fixes the data options.*n_genes = 0"):
        rl.train(tiny(sim, tmp_path / "rl.pt", n_genes=7))
    with pytest.raises(UserError, match="--split-seed 3"):
        rl.train(tiny(sim, tmp_path / "rl.pt", split_seed=3))
    assert not os.path.exists(tmp_path / "rl.pt")
    rl.train(tiny(sim, tmp_path / "rl.pt", steps=1, n_genes=0, seed=4))     # the stored value and --seed are fine


def test_every_option_of_every_stage_has_a_help_line():
    import re
    for stage in ("data", "flow", "verifiers", "rl", "evaluate"):
        out = subprocess.run([sys.executable, str(ROOT / f"{stage}.py"), "--help"], capture_output=True, text=True,
                             env=ENV, cwd=ROOT).stdout
        lines = out.splitlines()
        bare = [l.split()[0] for i, l in enumerate(lines) if re.match(r"^  --", l)   # an option line: its help
                and not re.search(r"\S\s{2,}\S", l[2:])                                   # follows on it
                and not (i + 1 < len(lines) and re.match(r"^\s{6,}[^\s-]", lines[i + 1]))]  # or on the next line
        assert not bare, (stage, bare)
        if stage in ("flow", "rl"):                                      # grouped, defaults shown
            assert "(default: " in out and "\ndata:" in out and "\nhardware:" in out and "\noptimisation:" in out
