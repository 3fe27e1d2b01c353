"""Benchmarks for flow.py (CPU).

    python bench/bench_flow.py [--repeats 30] [--genes 2000] [--cells 10000] [--width 128]

(1) One training step (forward + backward + AdamW step, batch 256, G genes, the default width/depth) with
    our cfm_loss vs the same VelocityField trained through torchcfm's ConditionalFlowMatcher(sigma=0),
    interleaved, medians over --repeats. torchcfm is installed with `pip install --no-deps torchcfm`; its
    package __init__ imports the optional `ot` (POT) for OT couplings the plain matcher never uses, so a
    stub module stands in for `ot` when POT is missing.
(2) Sampling throughput: --cells cells x G genes, 20 midpoint steps, in chunks of --chunk cells.
"""
import argparse
import os
import statistics
import sys
import time
import types

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

import flow  # noqa: E402


def import_torchcfm():
    try:
        import ot  # noqa: F401
        stub = ""
    except ImportError:
        sys.modules["ot"] = types.ModuleType("ot")  # never called by ConditionalFlowMatcher
        stub = " (stub `ot` module)"
    from torchcfm.conditional_flow_matching import ConditionalFlowMatcher
    import torchcfm
    return ConditionalFlowMatcher, f"torchcfm {torchcfm.__version__}{stub}"


def make_batch(B, G, n_comp, g):
    return {"ctrl": torch.randn(B, G, generator=g), "comps": torch.randint(0, n_comp + 1, (B, 2), generator=g),
            "dose": torch.ones(B, 2), "cov": torch.zeros(B, dtype=torch.long), "prior": torch.randn(B, G, generator=g)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--cells", type=int, default=10000)
    p.add_argument("--chunk", type=int, default=5000)
    p.add_argument("--width", type=int, default=flow.FlowConfig.width, help="default: FlowConfig's")
    args = p.parse_args()
    cfg, G, B, n_comp = flow.FlowConfig(width=args.width), args.genes, args.batch, 100
    CFM, version = import_torchcfm()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {version}; G={G}, batch {B}, "
          f"width {cfg.width}, depth {cfg.depth}")

    def build(seed):
        torch.manual_seed(seed)
        m = flow.VelocityField(flow.ModelConfig(cfg.width, cfg.depth, cfg.d_pert, cfg.gene_feat_dim, G=G, n_comp=n_comp),
                               torch.randn(n_comp, cfg.gene_feat_dim))
        return m, torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True)

    ours, theirs = build(0), build(0)
    matcher = CFM(sigma=0.0)
    g = torch.Generator().manual_seed(0)
    cond, x1 = make_batch(B, G, n_comp, g), torch.randn(B, G, generator=g)

    def step_ours():
        m, opt = ours
        loss = flow.cfm_loss(m, x1, cond, generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def step_torchcfm():
        m, opt = theirs
        x0 = torch.randn_like(x1)
        t, xt, ut = matcher.sample_location_and_conditional_flow(x0, x1)
        loss = (m(xt, t, cond) - ut).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    times = {"ours": [], "torchcfm": []}
    for fn in (step_ours, step_torchcfm):  # warm-up
        fn()
    for _ in range(args.repeats):  # interleaved so load changes on a shared machine hit both alike
        for name, fn in (("ours", step_ours), ("torchcfm", step_torchcfm)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"(1) train step, median of {args.repeats}: ours {1e3 * med['ours']:.1f} ms, torchcfm "
          f"{1e3 * med['torchcfm']:.1f} ms, ratio ours/torchcfm {med['ours'] / med['torchcfm']:.3f}")

    # (2) sampling throughput (weights randomised: a fresh model outputs zeros, the cost is the same)
    m = ours[0].eval()
    n, chunk = args.cells, args.chunk
    big = make_batch(n, G, n_comp, g)
    t0 = time.perf_counter()
    for i in range(0, n, chunk):
        part = {k: v[i:i + chunk] for k, v in big.items()}
        flow.sample(m, part, steps=20, method="midpoint", generator=g)
    dt = time.perf_counter() - t0
    print(f"(2) sampling {n} cells x {G} genes, 20 midpoint steps (40 evaluations), chunks of {chunk}: "
          f"{dt:.2f} s, {n / dt:.0f} cells/s")


if __name__ == "__main__":
    main()
