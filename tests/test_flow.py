"""Tests for flow.py: closed forms (path, loss, ODE orders, the SDE conversion) and properties
(order invariance, zero init, checkpoint round trip, exact resume, divergence handling)."""
import math
import os
import sys
import warnings

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: spinning OpenMP threads on a shared CPU
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import flow  # noqa: E402


class GaussianPathField(torch.nn.Module):
    """Exact marginal velocity for x0 ~ N(0, 1), x1 ~ N(mu, sigma^2), independent coupling:
    x_t ~ N(t mu, V_t), V_t = (1 - t)^2 + t^2 sigma^2, v(x, t) = mu + V_t' / (2 V_t) (x - t mu),
    V_t' = -2 (1 - t) + 2 t sigma^2. Its ODE flow map is x_t = t mu + sqrt(V_t) x_0."""

    def __init__(self, mu, sigma):
        super().__init__()
        self.mu, self.s2 = mu, sigma ** 2

    def forward(self, x, t, cond):
        t = t.reshape(-1, 1).to(x.dtype)  # (B, 1)
        V = (1 - t) ** 2 + t ** 2 * self.s2
        dV = -2 * (1 - t) + 2 * t * self.s2
        return self.mu + dV / (2 * V) * (x - t * self.mu)


class ConditionalField(torch.nn.Module):
    """Knows x1 (through cond): u_t(x | x1) = (x1 - x) / (1 - t), the exact conditional velocity."""

    def forward(self, x, t, cond):
        return (cond["x1"] - x) / (1 - t.reshape(-1, 1).to(x.dtype))


def small_model(G=6, n_comp=4, n_cov=2, randomise=True, seed=0):
    torch.manual_seed(seed)
    m = flow.VelocityField(flow.ModelConfig(G=G, n_comp=n_comp, n_cov=n_cov, width=16, depth=2, d_pert=8, gene_feat_dim=3), torch.randn(n_comp, 3))
    if randomise:  # move every weight off its (partly zero) initialisation so properties are not trivial
        for p in m.parameters():
            torch.nn.init.normal_(p, std=0.3)
    return m


def rand_cond(B, G, comps, dose, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"ctrl": torch.randn(B, G, generator=g), "comps": torch.tensor(comps), "dose": torch.tensor(dose),
            "cov": torch.zeros(B, dtype=torch.long), "prior": torch.randn(B, G, generator=g)}


# ----------------------------------------------------------------------------- path and loss
def test_path_matches_formula():
    x0, x1, t = torch.randn(5, 3), torch.randn(5, 3), torch.rand(5)
    xt, ut = flow.interpolant(x0, x1, t)
    for i in range(5):
        assert torch.allclose(xt[i], (1 - t[i]) * x0[i] + t[i] * x1[i])
        assert torch.allclose(ut[i], x1[i] - x0[i])
    assert torch.equal(flow.interpolant(x0, x1, torch.zeros(5))[0], x0)
    assert torch.equal(flow.interpolant(x0, x1, torch.ones(5))[0], x1)


def test_loss_zero_for_exact_conditional_velocity():
    # a wrong path (e.g. t and 1 - t swapped) or a wrong target (x0 - x1) gives a loss of order 1 here
    x1 = torch.randn(64, 10, dtype=torch.float64)
    loss = flow.cfm_loss(ConditionalField(), x1, {"x1": x1}, data.noise_source(torch.Generator().manual_seed(0), "cpu"))
    assert loss.item() < 1e-12


def test_loss_is_mean_over_cells_and_genes():
    # v = 0 and x1 = 0: loss = mean(x0^2) = 1 (sum over genes would give G)
    zero = lambda x, t, cond: torch.zeros_like(x)  # noqa: E731
    zero.training = False
    loss = flow.cfm_loss(zero, torch.zeros(400, 250), {}, data.noise_source(torch.Generator().manual_seed(0), "cpu"))
    assert abs(loss.item() - 1.0) < 0.02


def test_logit_normal_time():
    seen = []

    def rec(x, t, cond):
        seen.append(t)
        return torch.zeros_like(x)
    rec.training = False
    flow.cfm_loss(rec, torch.zeros(20000, 1), {}, data.noise_source(torch.Generator().manual_seed(0), "cpu"), t_dist="logit_normal")
    z = torch.logit(seen[0].double())
    assert abs(z.mean().item()) < 0.05 and abs(z.std().item() - 1) < 0.05


# ----------------------------------------------------------------------------- ODE samplers
class LinearField(torch.nn.Module):
    """v(x, t) = a x (1 + t): x(1) = x0 exp(1.5 a)."""

    def __init__(self, a):
        super().__init__()
        self.a = a

    def forward(self, x, t, cond):
        return self.a * x * (1 + t.reshape(-1, 1).to(x.dtype))


@pytest.mark.parametrize("method,order", [("euler", 1), ("midpoint", 2)])
def test_ode_convergence_order(method, order):
    x0 = torch.linspace(-2, 2, 9, dtype=torch.float64)[:, None]  # (9, 1)
    exact = x0 * math.exp(1.5 * -0.8)
    err = [(flow.sample(LinearField(-0.8), {}, n, method, eps=x0) - exact).abs().max().item()
           for n in (16, 32, 64)]
    ratios = [err[0] / err[1], err[1] / err[2]]  # error ~ C h^order: halving h divides it by 2^order
    assert all(abs(r - 2 ** order) < 0.15 * 2 ** order for r in ratios), (err, ratios)


def test_ode_gaussian_path_endpoint():
    # the ODE flow map of the Gaussian path sends x0 to mu + sigma x0 exactly
    x0 = torch.linspace(-2, 2, 9, dtype=torch.float64)[:, None]
    x1 = flow.sample(GaussianPathField(1.5, 0.5), {}, 32, "midpoint", eps=x0)
    assert torch.allclose(x1, 1.5 + 0.5 * x0, atol=1e-4)


# ----------------------------------------------------------------------------- SDE step
def test_sde_noise_zero_is_euler_step():
    m, G = small_model(), 6
    cond = rand_cond(3, G, [[1, 2]] * 3, [[1.0, 1.0]] * 3)
    x, t, h = torch.randn(3, G), torch.tensor([0.0, 0.3, 0.95]), 0.05
    with torch.no_grad():
        mean, std = flow.sde_mean_std(m, x, t, h, cond, 0.0)
        assert torch.allclose(mean, x + h * m(x, t, cond), atol=1e-6)
    assert torch.equal(std, torch.zeros(3, 1))


def test_sde_log_prob_matches_torch_normal():
    m, G, a, h = small_model(), 6, 0.7, 0.05
    cond = rand_cond(4, G, [[1, 2]] * 4, [[1.0, 1.0]] * 4)
    x, t = torch.randn(4, G), torch.tensor([0.0, 0.2, 0.5, 0.9])
    mean, std = flow.sde_mean_std(m, x, t, h, cond, a)
    x_next = mean + std * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    lp = flow.gauss_log_prob(x_next, mean, std)
    t_eff = t.clamp(min=h)[:, None]
    assert torch.allclose(std, a * torch.sqrt((1 - t[:, None]) / t_eff) * math.sqrt(h))  # (B, 1)
    ref = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(x_next).sum(-1)
    assert torch.allclose(lp, ref, rtol=1e-5, atol=1e-4)
    lp2, mean2, std2 = flow.sde_log_prob(m, x, t, h, cond, a, x_next.detach())  # a recorded transition
    assert torch.allclose(lp2, lp, atol=1e-5) and lp2.requires_grad
    lp2.sum().backward()  # the GRPO ratio needs gradients through the mean
    assert m.out.weight.grad is not None and m.out.weight.grad.abs().sum() > 0


def sde_sample(field, n, steps, a, mean_std=flow.sde_mean_std, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, h = torch.randn(n, 1, generator=g, dtype=torch.float64), 1.0 / steps
    for i in range(steps):
        mean, std = mean_std(field, x, i * h, h, {}, a)
        x = mean + std * torch.randn(x.shape, generator=g, dtype=torch.float64)
    return x


def wrong_sign_mean_std(model, x, t, h, cond, a):
    """Deliberately broken: the score correction with a + sign."""
    t = torch.full((x.shape[0], 1), float(t), dtype=x.dtype)
    v = model(x, t, cond)
    t_eff = t.clamp(min=h)
    return x + v * h + a ** 2 / (2 * t_eff) * (x - t * v) * h, a * torch.sqrt((1 - t) / t_eff) * math.sqrt(h)


def test_sde_and_ode_preserve_the_marginal():
    """x1 ~ N(mu, sigma^2). n = 20000: the standard errors are sigma/sqrt(n) = 0.0035 for the mean and
    sigma^2 sqrt(2/n) = 0.0035 for the variance; allow 4 SE plus 0.01 for the discretisation (the t_eff
    substitution at the noise end decays like h^(a^2))."""
    mu, sigma, n = 1.5, 0.5, 20000
    field = GaussianPathField(mu, sigma)
    tol_m, tol_v = 4 * sigma / math.sqrt(n) + 0.01, 4 * sigma ** 2 * math.sqrt(2 / n) + 0.01
    x0 = torch.randn(n, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ode = flow.sample(field, {}, 400, "euler", eps=x0)
    sde = sde_sample(field, n, 400, 0.7)
    for x in (ode, sde):
        assert abs(x.mean().item() - mu) < tol_m and abs(x.var().item() - sigma ** 2) < tol_v, (x.mean(), x.var())
    bad = sde_sample(field, n, 400, 0.7, mean_std=wrong_sign_mean_std)  # the same check catches a sign error
    assert abs(bad.var().item() - sigma ** 2) > 10 * tol_v


class GaussianSourceField(torch.nn.Module):
    """Exact marginal velocity from the source x0 ~ N(m0, s0^2) to x1 ~ N(mu, sigma^2), independent coupling:
    x_t ~ N(m_t, V_t), m_t = (1 - t) m0 + t mu, V_t = (1 - t)^2 s0^2 + t^2 sigma^2,
    v(x, t) = mu - m0 + V_t' / (2 V_t) (x - m_t), V_t' = -2 (1 - t) s0^2 + 2 t sigma^2."""

    def __init__(self, m0, s0, mu, sigma):
        super().__init__()
        self.m0, self.s0, self.mu, self.sigma = m0, s0, mu, sigma

    def forward(self, x, t, cond):
        t = t.reshape(-1, 1).to(x.dtype)  # (B, 1)
        V = (1 - t) ** 2 * self.s0 ** 2 + t ** 2 * self.sigma ** 2
        dV = -2 * (1 - t) * self.s0 ** 2 + 2 * t * self.sigma ** 2
        return self.mu - self.m0 + dV / (2 * V) * (x - (1 - t) * self.m0 - t * self.mu)


def test_sde_with_a_shifted_narrow_source_preserves_the_marginal():
    """Source N(m0, s0^2) = N(-1, 0.3^2) (a control cell + shift, sigma 0.3), data N(1.5, 0.5^2): with the source
    in cond, the SDE's eps_hat = (x - mu0 - t v) / sigma and score -eps_hat / ((1 - t) sigma) keep the marginal;
    the same field with the N(0, 1) formulas (the source left out of cond) does not."""
    m0, s0, mu, sigma, n, a = -1.0, 0.3, 1.5, 0.5, 20000, 0.7
    field = GaussianSourceField(m0, s0, mu, sigma)
    cond = {"mu0": m0, "sigma": s0}
    tol_m, tol_v = 4 * sigma / math.sqrt(n) + 0.01, 4 * sigma ** 2 * math.sqrt(2 / n) + 0.01

    def run(cond, seed=0):
        g = torch.Generator().manual_seed(seed)
        x, h = m0 + s0 * torch.randn(n, 1, generator=g, dtype=torch.float64), 1.0 / 400
        for i in range(400):
            mean, std = flow.sde_mean_std(field, x, i * h, h, cond, a)
            x = mean + std * torch.randn(x.shape, generator=g, dtype=x.dtype)
        return x

    x = run(cond)
    assert abs(x.mean().item() - mu) < tol_m and abs(x.var().item() - sigma ** 2) < tol_v, (x.mean(), x.var())
    ode = flow.sample(field, cond, 200, "midpoint", eps=torch.randn(n, 1, dtype=torch.float64))
    assert abs(ode.mean().item() - mu) < tol_m and abs(ode.var().item() - sigma ** 2) < tol_v
    bad = run({})
    assert abs(bad.mean().item() - mu) > 10 * tol_m or abs(bad.var().item() - sigma ** 2) > 10 * tol_v
    # the noise scales with the source: std = a sigma sqrt((1 - t) / t_eff) sqrt(h)
    _, std = flow.sde_mean_std(field, torch.zeros(2, 1, dtype=torch.float64), 0.5, 0.05, cond, a)
    assert torch.allclose(std, torch.full((2, 1), a * s0 * math.sqrt(0.05), dtype=torch.float64))


# ----------------------------------------------------------------------------- model properties
def test_fresh_model_outputs_zero():
    m = small_model(randomise=False)
    out = m(torch.randn(3, 6), torch.rand(3), rand_cond(3, 6, [[1, 2]] * 3, [[1.0, 0.5]] * 3))
    assert torch.equal(out, torch.zeros(3, 6))


def test_a_zero_network_generates_the_start_predictor_exactly():
    """Paired generation: with the output layer at zero, every cell the ODE generates is its control cell plus the
    start (the start predictor, Dataset.start), whatever the source, sigma or sampler, so training can only add to
    it; unpaired, the noise source gives start + eps, not a cell. Start off: the control cell itself. The RL SDE moves
    only the condition's path: its cell is control cell + start + exactly the noise an unpaired SDE adds to eps."""
    torch.manual_seed(0)
    G = 6
    table = {"comps": torch.tensor([[1, 2]]), "dose": torch.ones(1, 2), "cov": torch.zeros(1, dtype=torch.long),
             "prior": torch.randn(1, G), "evidence": torch.tensor([0])}
    table["start"] = 0.6 * table["prior"]                                  # c = 0.6
    ctrl_x = torch.rand(4, G) * 3 + 1                                       # expression space, all > 0
    for source, sigma, shift, method in [("noise", 1.0, True, "midpoint"), ("ctrl", 0.5, True, "euler"),
                                         ("noise", 1.0, True, "sde"), ("ctrl", 0.2, False, "sde")]:
        m = flow.VelocityField(flow.ModelConfig(G=G, n_comp=4, n_cov=1, width=16, depth=1, d_pert=8, source=source, sigma=sigma, use_start=shift))
        m.mean, m.std = torch.rand(G), torch.rand(G) + 0.5
        cond = flow.make_cond(m, table, torch.zeros(4, dtype=torch.long), ctrl_x)
        draw = lambda: data.noise_source(torch.Generator().manual_seed(1), "cpu")  # noqa: E731
        z = flow.sample(m, cond, 5, method, draw(), noise_level=0.7, paired=True)
        start = table["start"] / m.std if shift else 0
        if method == "sde":                                                # the same draws, unpaired: x1 - x0
            eps = draw()((4, G))
            x1 = flow.sample(m, cond, 5, "sde", draw(), noise_level=0.7)
            z_noise = x1 - (cond["mu0"] + cond["sigma"] * eps)
            assert z_noise.abs().max() > 0.1                                  # the SDE does move the condition's path
            torch.testing.assert_close(z, start + z_noise, atol=1e-5, rtol=0)
        else:
            want = (ctrl_x + (table["start"] if shift else 0)).clamp(min=0)
            torch.testing.assert_close(m.decode(cond["ctrl"] + z), want, atol=1e-4, rtol=0)
    eps = torch.randn(4, G)
    raw = flow.sample(m, cond, 5, "midpoint", eps=eps)                      # unpaired: the source draw itself
    torch.testing.assert_close(raw, m.encode(ctrl_x) + 0.2 * eps, atol=1e-5, rtol=0)


def test_paired_generation_cancels_the_generators_own_control_error():
    """A field that adds a constant b to every condition, the empty one (control) included, is a generator with a
    control bias b; paired generation removes it exactly: the change is the key's shift, not shift + b."""
    G, B = 5, 3
    b = torch.linspace(-1, 1, G)
    field = lambda x, t, cond: b.expand_as(x)  # noqa: E731  biased: also moves control cells
    cond = {"ctrl": torch.randn(B, G), "comps": torch.ones(B, 1, dtype=torch.long), "dose": torch.ones(B, 1),
            "prior": torch.randn(B, G), "start": torch.randn(B, G), "cov": torch.zeros(B, dtype=torch.long)}
    cond.update(mu0=cond["start"], sigma=1.0)
    for method in ("euler", "midpoint"):                             # the ODE (the SDE: the test above)
        g = data.noise_source(torch.Generator().manual_seed(0), "cpu")
        z = flow.sample(field, cond, 4, method, g, noise_level=0.5, paired=True)
        torch.testing.assert_close(z, cond["start"], atol=1e-5, rtol=0)
        raw = flow.sample(field, cond, 4, method, data.noise_source(torch.Generator().manual_seed(0), "cpu"), noise_level=0.5)
        assert (raw - cond["start"]).mean(0).sub(b).abs().max() < 1.5      # unpaired: the bias b is in it


def test_perturbation_embedding_is_order_invariant():
    m, x, t = small_model(), torch.randn(1, 6), torch.tensor([0.4])
    out = lambda comps, dose: m(x, t, rand_cond(1, 6, comps, dose))  # noqa: E731
    assert torch.allclose(out([[1, 2]], [[1.0, 0.5]]), out([[2, 1]], [[0.5, 1.0]]), atol=1e-6)
    assert torch.allclose(out([[3, 0]], [[1.0, 0.0]]), out([[3]], [[1.0]]), atol=1e-6)  # padding adds nothing
    assert not torch.allclose(out([[1, 2]], [[1.0, 0.5]]), out([[1, 3]], [[1.0, 0.5]]), atol=1e-3)


def test_unseen_component_embedding_stays_zero():
    m = small_model(randomise=False)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
    cond = rand_cond(8, 6, [[1, 2]] * 8, [[1.0, 1.0]] * 8)
    for _ in range(5):
        opt.zero_grad()
        flow.cfm_loss(m, torch.randn(8, 6), cond, data.noise_source(None, "cpu")).backward()
        opt.step()
    assert m.comp_emb.weight[1:3].abs().sum() > 0 and torch.equal(m.comp_emb.weight[3:], torch.zeros(2, 8))


def test_encode_decode_and_make_cond():
    m = small_model(randomise=False)
    m.mean, m.std = torch.rand(6), torch.rand(6) + 0.5
    x = torch.rand(4, 6) * 3
    assert torch.allclose(m.decode(m.encode(x)), x, atol=1e-6)
    assert torch.equal(m.decode(torch.full((1, 6), -100.0)), torch.zeros(1, 6))
    z = m.encode(torch.tensor([[-0.3, 0.0, 0.1, 0.41, 1.0, 2.0]]))   # max(x, 0): only negatives become 0
    assert torch.allclose(m.decode(z), torch.tensor([[0.0, 0.0, 0.1, 0.41, 1.0, 2.0]]), atol=1e-5)
    table = {"comps": torch.tensor([[1, 2], [3, 0]]), "dose": torch.tensor([[1.0, 1.0], [1.0, 0.0]]),
             "cov": torch.tensor([0, 1]), "prior": torch.randn(2, 6), "start": torch.randn(2, 6),
             "evidence": torch.tensor([0, 2])}
    cond = flow.make_cond(m, table, torch.tensor([1, 0, 1, 1]), x)
    assert torch.equal(cond["comps"][0], table["comps"][1]) and torch.equal(cond["cov"], torch.tensor([1, 0, 1, 1]))
    assert torch.allclose(cond["prior"][1], table["prior"][0] / m.std)  # a delta: no mean shift
    assert torch.allclose(cond["ctrl"], (x - m.mean) / m.std)


# ----------------------------------------------------------------------------- training and checkpoints
@pytest.fixture(scope="module")
def sim_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sim") / "sim.h5ad")
    data.write_h5ad(path, data.simulate(n_cells=1500, n_genes=200, n_singles=12, n_combos=10, seed=0))
    return path


def tiny_cfg(sim_path, out, **kw):
    base = dict(data=sim_path, n_genes=200, width=64, depth=2, steps=40, batch_size=64, warmup=5, eval_every=20,
                eval_cells=16, save_every=20, out=str(out), progress=False, gene_feat_dim=8)
    return flow.FlowConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def trained(sim_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "flow.pt"
    flow.train(tiny_cfg(sim_path, out, steps=600, batch_size=128, lr=3e-3, eval_every=100, save_every=600))
    return str(out)


def test_training_lowers_loss_and_learns_mean_deltas(trained, sim_path):
    """What training learns, on the training keys, with the trained weights (the saved sampling weights are also
    scaled by the residual trust fitted on validation keys: test_residual_trust_is_the_least_squares_slope)."""
    model, ckpt = flow.load_checkpoint(trained)
    model.load_state_dict(ckpt["model"])
    hist = [h for h in ckpt["extra"]["history"] if "train_loss" in h]
    # the fresh model outputs 0, so its loss is E|x1|^2 + E|x0|^2 = 2 per gene on z-scored cells; the logged
    # loss is smoothed over ~50 steps (its noise is < 0.01 here)
    assert ckpt["step"] == 600 and hist[-1]["train_loss"] < min(1.9, hist[0]["train_loss"] - 0.05), hist
    ds = data.load_dataset(data.DataConfig(data=sim_path, n_genes=200), genes=ckpt["genes"], split=ckpt["split"])
    keys = ds.split["train"]
    r = flow.val_check(model, ds, keys, n_cells=64, seed=3)["pearson_delta"]
    # baseline: every condition predicted by the mean training cell (what a model that ignores the condition
    # learns) scores 0.45 here; 64 resampled real cells (the noise ceiling of a 64-cell mean) score 0.93. A
    # training single is never its own prior, so the singles are learned from their embeddings alone: the
    # untrained model (the shift alone) scores 0.44, this 600-step run 0.55 (0.80 when a single's own delta was
    # its prior)
    rows = np.concatenate([ds.cell_idx[k] for k in keys])
    base = data.pearson_rows(torch.from_numpy(ds.X[rows].mean(0))[None] - torch.stack([ds.refs[k].ctrl_mean for k in keys]),
                        torch.stack([ds.refs[k].delta for k in keys])).mean().item()
    assert r > base + 0.08, (r, base)


def test_checkpoint_round_trip(tmp_path):
    m = small_model()
    m.mean, m.std = torch.rand(6), torch.rand(6) + 0.5
    meta = {"genes": [f"g{i}" for i in range(6)], "components": ["A", "B", "C", "D"], "covariates": ["x", "y"],
            "split": {"train": [["A", "x"]], "val": [], "test": []}}
    path = str(tmp_path / "m.pt")
    data.save_checkpoint(path, m, m, None, 7, {"lr": 1.0}, meta)
    m2, ckpt = flow.load_checkpoint(path, genes=meta["genes"])
    cond, x, t = rand_cond(2, 6, [[1, 2]] * 2, [[1.0, 1.0]] * 2), torch.randn(2, 6), torch.rand(2)
    assert torch.equal(m.eval()(x, t, cond), m2(x, t, cond)) and ckpt["step"] == 7 and ckpt["config"]["lr"] == 1.0
    assert torch.equal(ckpt["ema"]["std"], m.std) and os.listdir(os.path.dirname(path)) == ["m.pt"]
    assert "scaler" not in ckpt                      # the scaler lives in the state dicts; an old copy still loads:
    data.write_checkpoint(path, {**ckpt, "scaler": {"mean": m.mean, "std": m.std}})
    assert torch.equal(m.eval()(x, t, cond), flow.load_checkpoint(path, genes=meta["genes"])[0](x, t, cond))
    with pytest.raises(data.UserError, match="2 positions differ"):
        flow.load_checkpoint(path, genes=["g1", "g0"] + meta["genes"][2:])
    with pytest.raises(data.UserError, match="checkpoint not found"):
        flow.load_checkpoint(str(tmp_path / "nope.pt"))
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(data.UserError, match="not a PerturbCellRL checkpoint"):
        flow.load_checkpoint(str(tmp_path / "junk.pt"))


def test_resume_is_exact(sim_path, tmp_path):
    flow.train(tiny_cfg(sim_path, tmp_path / "a.pt"))
    flow.train(tiny_cfg(sim_path, tmp_path / "b.pt", stop_at=20))
    assert torch.load(tmp_path / "b.pt", weights_only=True)["step"] == 20
    flow.train(tiny_cfg(sim_path, tmp_path / "b.pt", resume=True))
    a, b = (torch.load(tmp_path / f, weights_only=True) for f in ("a.pt", "b.pt"))
    assert b["step"] == 40
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    sa, sb = a["opt"]["state"], b["opt"]["state"]
    assert all(torch.equal(sa[k]["exp_avg_sq"], sb[k]["exp_avg_sq"]) for k in sa)
    strip = lambda c: [{k: v for k, v in h.items() if k != "time"} for h in c["extra"]["history"]]  # noqa: E731
    assert strip(a) == strip(b) and len(strip(a)) == 3                   # 2 validations + the residual trust


def test_nan_loss_stops_and_keeps_last_good_checkpoint(sim_path, tmp_path, monkeypatch):
    out = tmp_path / "n.pt"
    real, calls = flow.cfm_loss, []

    def flaky(*args, **kw):
        calls.append(1)
        return real(*args, **kw) * (float("nan") if len(calls) == 28 else 1.0)
    monkeypatch.setattr(flow, "cfm_loss", flaky)
    with pytest.raises(data.UserError, match=r"loss is nan at step 27.*last good checkpoint .*step 20"):
        flow.train(tiny_cfg(sim_path, out, eval_every=1000))
    model, ckpt = flow.load_checkpoint(str(out))
    assert ckpt["step"] == 20 and all(torch.isfinite(p).all() for p in model.parameters())
    monkeypatch.setattr(flow, "cfm_loss", real)
    with pytest.raises(data.UserError, match="training diverged"):  # a huge learning rate ends the same way
        flow.train(tiny_cfg(sim_path, tmp_path / "lr.pt", lr=1e30, save_every=1, eval_every=1000))
    if os.path.exists(tmp_path / "lr.pt"):
        m, _ = flow.load_checkpoint(str(tmp_path / "lr.pt"))
        assert all(torch.isfinite(p).all() for p in m.parameters())


def test_cli_reports_data_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        data.cli(lambda: flow.main(["--data", str(tmp_path / "missing.h5ad"), "--out", str(tmp_path / "x.pt")]))
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: ")


def test_fit_scaler_against_numpy():
    """mean and std (floored at 1e-2) of the given rows, in chunks."""
    rng = np.random.default_rng(3)
    X = (rng.random((40, 5)) < 0.6) * rng.uniform(0.7, 3.0, (40, 5))
    X[:, 4] = 0.0                                                     # never detected: std floored
    X = X.astype(np.float32)
    rows = rng.choice(40, 25, replace=False)
    mean, std = data.fit_scaler(X, rows, chunk=7)
    Xr = X[rows].astype(np.float64)
    np.testing.assert_allclose(mean.numpy(), Xr.mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(std.numpy(), np.maximum(Xr.std(0), 1e-2), rtol=1e-5)


def test_residual_trust_is_the_least_squares_slope(trained, sim_path, monkeypatch):
    """A network that adds alpha times what each validation key needs beyond its start gets the slope 1 / alpha (twice
    too much -> 0.5, half -> 2, the opposite direction -> -1); lam is the slope's lower confidence bound over resampled
    keys and cells, clipped to [0, k / (k + 1)]: below the slope by no more than the resampling spread, never negative."""
    model, ckpt = flow.load_checkpoint(trained)
    ds = data.load_dataset(data.DataConfig(data=sim_path, n_genes=200), genes=ckpt["genes"], split=ckpt["split"])
    keys = ds.split["train"][:5]
    start = ds.key_table(keys)["start"]
    for alpha in (2.0, 0.5, -1.0, 1.25):
        mean = {k: ds.refs[k].ctrl_mean + start[i] + alpha * (ds.refs[k].delta - start[i]) for i, k in enumerate(keys)}
        monkeypatch.setattr(flow, "generate", lambda *a, **kw: {k: m.expand(3, -1) for k, m in mean.items()})
        f = flow.fit_residual_trust(model, ds, keys)
        assert f["slope"] == pytest.approx(1 / alpha, rel=1e-5) and f["keys"] == 5 and f["lo"] <= f["hi"]
        top = min(max(1 / alpha, 0.0), 5 / 6)
        assert top - 0.15 <= f["lam"] <= top + 1e-9, (alpha, f)
    # the same network's cells with sampling noise (10 cells, sd 1 per gene): |r|^2 carries tr(S)/n = G/10 more than
    # alpha^2 |e|^2; without taking it out the slope would shrink to about a third of 1/alpha, with it it stays
    g = torch.Generator().manual_seed(0)
    noisy = {k: m + torch.randn(10, len(m), generator=g) for k, m in mean.items()}  # mean: alpha = 1.25 from the loop
    monkeypatch.setattr(flow, "generate", lambda *a, **kw: noisy)
    plain = sum(float((noisy[k].mean(0) - ds.refs[k].ctrl_mean - start[i]).pow(2).sum()) for i, k in enumerate(keys))
    assert plain > 2 * sum(float((mean[k] - ds.refs[k].ctrl_mean - start[i]).pow(2).sum()) for i, k in enumerate(keys))
    assert flow.fit_residual_trust(model, ds, keys)["slope"] == pytest.approx(1 / 1.25, rel=0.15)


def test_one_validation_key_never_gives_full_trust(trained, sim_path, monkeypatch):
    """One validation key whose real residual is pure noise (its cells are control cells moved by exactly the start:
    what is left of its mean is sampling noise). A network whose residual is exactly that noise has the least-squares
    slope 1, full trust under the old rule: one key gives at most 1/2. One whose residual is noise of its own (what a
    network that never saw these cells adds) gets about none; so do 50 cells scattered around the start with no change
    (their mean's residual is their own sampling noise), with a finite interval (it was +-1e11: |r|^2 less its noise
    at 0 in a resample divided the slope by 1e-12)."""
    model, ckpt = flow.load_checkpoint(trained)
    ds = data.load_dataset(data.DataConfig(data=sim_path, n_genes=200), genes=ckpt["genes"], split=ckpt["split"])
    key = ds.split["train"][0]
    start = torch.from_numpy(ds.key_table([key])["start"][0].numpy())
    ctrl = ds.X[ds.ctrl_idx[key[1]]]
    cells = np.maximum(ctrl[np.random.default_rng(0).choice(len(ctrl), 60)] + start.numpy(), 0).astype(np.float32)
    ds.refs[key] = data.reference(cells, ds.ctrl_idx[key[1]], ctrl.mean(0), ctrl.std(0, ddof=1), 50, 0.1)
    noise = ds.refs[key].delta - start                                  # the sample's residual: pure noise
    other = noise[torch.randperm(len(noise), generator=torch.Generator().manual_seed(0))]  # noise of the same size
    mean0 = ds.refs[key].ctrl_mean + start
    jitter = 0.1 * torch.randn(50, len(noise), generator=torch.Generator().manual_seed(1))  # cells, no change at all
    for x, most in [((mean0 + noise).expand(3, -1), 0.5), ((mean0 + other).expand(3, -1), 0.15), (mean0 + jitter, 0.15)]:
        monkeypatch.setattr(flow, "generate", lambda *a, x=x, **kw: {key: x})
        f = flow.fit_residual_trust(model, ds, [key])
        assert f["keys"] == 1 and f["lam"] <= most and -50 < f["lo"] <= f["hi"] < 50, f  # not +-1e11
    assert flow.fit_residual_trust(model, ds, [])["lam"] == 0.0            # no validation key: no trust


def test_control_check_measures_the_generators_control_bias(sim_path):
    """A generator that returns its input control cells (source ctrl, sigma tiny, zero network) has no bias and an
    energy distance to the held-out control cells near 0 (inputs drawn with replacement: a little above); one that adds b = 0.5 to every
    gene of every cell has bias |b| sqrt(G) (debiased for sampling noise), whatever the inputs."""
    ds = data.load_dataset(data.DataConfig(data=sim_path, n_genes=200))
    G = len(ds.genes)
    m = flow.VelocityField(flow.ModelConfig(G=G, n_comp=len(ds.components), n_cov=len(ds.covariates), width=16, depth=1, source="ctrl", sigma=1e-4))
    m.mean, m.std = data.fit_scaler(ds.X, np.arange(ds.X.shape[0]))
    ok = flow.control_check(m, ds, n_cells=400, steps=2)
    effect = np.mean([float(ds.refs[k].delta.norm()) for k in ds.keys])
    assert ok["bias"] < 0.15 * 0.5 * G ** 0.5 and ok["energy"] < 0.2 and ok["bias_ratio"] == pytest.approx(
        ok["bias"] / effect, rel=1e-6)
    with torch.no_grad():
        m.out.bias.copy_(0.5 / m.std)                                 # v = b / std in model space: x1 = x0 + b
    bad = flow.control_check(m, ds, n_cells=400, steps=2)
    assert bad["bias"] == pytest.approx(0.5 * G ** 0.5, rel=0.1) and bad["energy"] > 10 * max(ok["energy"], 0.05)


def test_a_training_single_is_trained_with_the_prior_of_the_other_half_of_its_cells(sim_path, tmp_path, monkeypatch):
    """Every combination held out (the additive prior kind then has no training key): pretraining teaches it on the
    training singles with their cross-fitted own prior. Spying on the loss's batches: each single's cell that comes
    with a prior gets the mean delta of the OTHER half of its key's cells (the halves of Dataset.fold_deltas),
    computed here from ds.X, never the half that holds the cell itself."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                                  # no validation key like the test's
        ds = data.load_dataset(data.DataConfig(data=sim_path, n_genes=0))
        test = ",".join(k[0] for k in ds.keys if "+" in k[0])
        ds = data.load_dataset(data.DataConfig(data=sim_path, n_genes=0, test=test))
    assert ds.untrained_kinds() == {"additive"}
    seen, real = [], flow.cfm_loss

    def cfm_loss(model, x1, cond, *a, **kw):
        seen.append((model.decode(x1).detach(), (cond["prior"] * model.std).detach(), cond["comps"].detach()))
        return real(model, x1, cond, *a, **kw)
    monkeypatch.setattr(flow, "cfm_loss", cfm_loss)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flow.train(flow.FlowConfig(data=sim_path, n_genes=0, test=test, steps=3, batch_size=128, width=16, depth=1,
                                   gene_feat_dim=4, self_prior=1.0, fit_trust=False, eval_every=1000, save_every=1000,
                                   progress=False, out=str(tmp_path / "f.pt")))
    X, ctrl = np.asarray(ds.X), ds.ctrl_idx["all"]
    checked = 0
    for cells, prior, comps in seen:
        for x, p, c in zip(cells.numpy(), prior.numpy(), comps.numpy()):
            if (c > 0).sum() != 1 or not np.abs(p).max() > 0:             # a single trained with a prior
                continue
            key = (ds.components[c[c > 0][0] - 1], "all")
            rows = ds.cell_idx[key]
            i = np.abs(X[rows] - x).max(1).argmin()                        # the target cell among the key's cells
            assert np.abs(X[rows[i]] - x).max() < 1e-4
            fold = ds.fold_deltas(key, 0)[0]
            other = rows[fold != fold[i]]
            np.testing.assert_allclose(p, X[other].mean(0) - X[ctrl].mean(0), atol=1e-4, err_msg=str(key))
            checked += 1
    assert checked >= 100
