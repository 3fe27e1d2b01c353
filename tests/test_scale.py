"""Issue 11, scale-out: data parallelism under torchrun (gloo, 2 processes on CPU), device placement (the meta
device), the CUDA pipeline (skipped without a GPU), and data that does not fit dense (CSR, --lazy).

The two-process runs that are compared with one process are started by torchrun itself (its agent, rendezvous and
environment); the others start the stage scripts the way torchrun does (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR =
127.0.0.1, a free port), which lets a test stop one rank or read each rank's output. They take 5-20 s each and all run
by default: they are the only check of the multi-process code."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import data
import evaluate
import flow
import rl
import verifiers
from data import UserError

ROOT = Path(__file__).resolve().parents[1]
FLOW = ["--n-genes", "0", "--width", "32", "--depth", "1", "--no-progress"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank, world, port):
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world), "RANK": str(rank),
            "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world), "GLOO_SOCKET_IFNAME": "lo"}


def start(script, args, world, logs=None):
    """`world` processes of `python script args` (script: a name in the repository or a path): with `logs`, started by
    `torchrun --nproc_per_node world` with each rank's stdout and stderr in files under `logs` (rank_output), [Popen]
    of torchrun; else with torchrun's environment set here, [Popen] by rank."""
    port, env = free_port(), {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(ROOT / script), *map(str, args)]
    if logs is not None and world > 1:
        return [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
                                  "--master_addr", "127.0.0.1", "--master_port", str(port), "--log-dir", str(logs),
                                  "--redirects", "3", *cmd], text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 env={**env, "GLOO_SOCKET_IFNAME": "lo"})]
    return [subprocess.Popen([sys.executable, *cmd], text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env={**env, **(rank_env(r, world, port) if world > 1 else {})}) for r in range(world)]


def rank_output(logs, rank) -> tuple:
    """(stdout, stderr) of one rank of a torchrun job started with `logs`."""
    out, = Path(logs).glob(f"*/attempt_0/{rank}")
    return (out / "stdout.log").read_text(), (out / "stderr.log").read_text()


def finish(procs, timeout=120):
    """[(returncode, stdout, stderr)] by rank; a process still running after `timeout` s fails the test (a hang)."""
    out = []
    try:
        for p in procs:
            o, e = p.communicate(timeout=timeout)
            out.append((p.returncode, o, e))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"still running after {timeout} s: {procs[0].args}")
    return out


def run(*jobs):
    """Run jobs (script, args, world[, logs]) at the same time (start); require exit 0 of every process; [(code, out,
    err)] per job."""
    procs = [start(*job) for job in jobs]
    res = [finish(p) for p in procs]
    for job, r in zip(jobs, res):
        for rank, (code, _, err) in enumerate(r):
            assert code == 0, f"rank {rank} of {job[0]} exited {code}:\n{err[-3000:]}"
    return res


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_state(a, b, tol):
    """Two checkpoints hold the same weights, EMA and optimiser moments (to `tol`) and identical random states."""
    for part in ("model", "ema"):
        for k in a[part]:
            torch.testing.assert_close(a[part][k], b[part][k], atol=tol, rtol=tol, msg=f"{part}.{k}")
    for i, s in a["opt"]["state"].items():
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(s[k], b["opt"]["state"][i][k], atol=tol, rtol=1e-4, msg=f"opt {i} {k}")
    assert a["step"] == b["step"] and a["rng"]["numpy"] == b["rng"]["numpy"]
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])


def moved(a, b):
    """Largest weight change between two checkpoints (the comparison above means something only if it is large)."""
    return max(float((a["model"][k].float() - b["model"][k].float()).abs().max()) for k in a["model"])


def rl_state(path):
    """An RL state with its policy as the 'ema' entry (RL checkpoints keep one set of weights)."""
    ck = load(path)
    return {**ck, "ema": ck["model"]}


# ----------------------------------------------------------------------------- data parallelism (gloo, CPU)
FLOW_STEP = [*FLOW, "--steps", 3, "--warmup", 1]


@pytest.fixture(scope="module")
def flow_runs(tiny_screen, tmp_path_factory):
    """One step with 1 process x batch 32 and, under torchrun, 2 processes x batch 16 (the same global batch)."""
    tmp = tmp_path_factory.mktemp("flow_runs")
    common = ["--data", tiny_screen["path"], *FLOW_STEP, "--stop-at", 1]
    one, two = tmp / "one.pt", tmp / "two.pt"
    run(("flow.py", [*common, "--batch-size", 32, "--out", one], 1),
        ("flow.py", [*common, "--batch-size", 16, "--out", two], 2, tmp / "logs"))
    return one, two


def test_flow_two_processes_equal_one(flow_runs):
    """The weights, EMA, optimiser moments and random states after one step with 2 processes x batch 16 (torchrun)
    equal one process x batch 32 (DDP's gradient average of the two halves); the checkpoint loads for evaluation."""
    one, two = flow_runs
    a, b = load(one), load(two)
    assert a["step"] == b["step"] == 1 and a["config"]["batch_size"] == 2 * b["config"]["batch_size"]
    assert moved(a, {"model": load(one)["ema"]}) > 1e-4                # the EMA lags the step: a real update
    assert_same_state(a, b, 1e-6)
    model, ck = flow.load_checkpoint(two)
    ds = evaluate.dataset_for(ck)
    assert model.hparams["width"] == 32 and ds.genes == ck["genes"]


def test_flow_resume_with_another_process_count(flow_runs, tiny_screen, tmp_path):
    """Each one-step run resumed for a second step with the other process count: the same second step."""
    one, two = (Path(shutil.copy(p, tmp_path)) for p in flow_runs)
    first = load(one)
    common = ["--data", tiny_screen["path"], *FLOW_STEP, "--stop-at", 2, "--resume"]
    run(("flow.py", [*common, "--batch-size", 16, "--out", one], 2),
        ("flow.py", [*common, "--batch-size", 32, "--out", two], 1))
    a, b = load(one), load(two)
    assert a["step"] == b["step"] == 2 and moved(a, first) > 1e-3        # a real step, far above the tolerance
    assert_same_state(a, b, 1e-6)


RL_STEP = ["--conds", 3, "--group", 4, "--T", 4, "--eval-cells", 16, "--no-progress"]
PROBE = """import os, runpy, sys
sys.path.insert(0, os.path.dirname(sys.argv[2]))
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
grads = []  # per optimiser step, the gradient it applies to every parameter (after DDP's average and the clip)
register_optimizer_step_pre_hook(lambda opt, args, kw: grads.append(
    [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for g in opt.param_groups for p in g["params"]]))
out, sys.argv = sys.argv[1], sys.argv[2:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    torch.save(grads, f"{out}.rank{os.environ.get('RANK', '0')}")
"""


def probed(tmp, name, args):
    """(script, args) running rl.py with `args` under a probe that saves every optimiser step's gradients to
    tmp/<name>.grads.rank<R> (probe_grads)."""
    probe = tmp / "probe.py"
    probe.write_text(PROBE)
    return probe, [tmp / f"{name}.grads", ROOT / "rl.py", *args]


def probe_grads(tmp, name, world=1):
    """The gradients a probed run applied, per optimiser step; under DDP every rank applies the same ones."""
    g = [load(tmp / f"{name}.grads.rank{r}") for r in range(world)]
    for other in g[1:]:
        for x, y in zip(g[0], other):
            assert all(torch.equal(p, q) for p, q in zip(x, y))
    return g[0]


@pytest.fixture(scope="module")
def rl_runs(tiny_screen, tmp_path_factory):
    """One GRPO step with --conds 3 on 1 process and, under torchrun, on 2 (2 groups on rank 0, 1 on rank 1), both
    probed (their gradients saved)."""
    tmp = tmp_path_factory.mktemp("rl_runs")
    common = ["--ckpt", tiny_screen["ckpt"], *RL_STEP, "--steps", 1]
    [(_, out, _)], _ = run((*probed(tmp, "one", [*common, "--out", tmp / "one.pt"]), 1),
                           (*probed(tmp, "two", [*common, "--out", tmp / "two.pt"]), 2, tmp / "logs"))
    out1, err1 = rank_output(tmp / "logs", 1)
    assert "step    1" in out and "held-out test conditions" in out                 # rank 0 logs and reports
    assert "step    1" in rank_output(tmp / "logs", 0)[0]
    assert out1 == "" and "error" not in err1                                       # rank 1 is silent
    return tmp


def assert_same_rl_state(a, b, grads_a, grads_b):
    """Two GRPO states that should be one: every optimiser step applied the same gradients (to 3e-4 of each tensor's
    largest: the KL sums the paths and their twins, in another order on 2 processes) and Adam's moments agree likewise; the weights agree to 1e-5 plus what Adam's normalisation makes of the
    gradients' float-order differences dg: its update lr g / (|g| + eps) moves by lr eps |dg| / (|g| + eps)^2, which is
    large where g is about 0 (up to 2 lr when its sign flips: 1e-9 gradients differed so). Allowed: 10 times that, at
    most 2 lr per step; only a few elements get more than 2e-5."""
    assert len(grads_a) == len(grads_b) > 0
    for ga, gb in zip(grads_a, grads_b):
        for x, y in zip(ga, gb):
            torch.testing.assert_close(y, x, atol=3e-4 * float(x.abs().max()) + 1e-12, rtol=0)
    for i, s in a["opt"]["state"].items():
        for k in ("exp_avg", "exp_avg_sq"):
            x, y = s[k], b["opt"]["state"][i][k]
            torch.testing.assert_close(y, x, atol=3e-4 * float(x.abs().max()) + 1e-20, rtol=0, msg=f"opt {i} {k}")
    names = [n for n, _ in flow.build_model(a["config"]["model"]).named_parameters()]
    lr, eps = a["opt"]["param_groups"][0]["lr"], a["opt"]["param_groups"][0]["eps"]
    loose = total = 0
    for j, n in enumerate(names):
        allowed = 1e-5 + sum((10 * lr * eps * (x[j] - y[j]).abs() / (torch.minimum(x[j].abs(), y[j].abs()) + eps) ** 2)
                             .clamp(max=2 * lr) for x, y in zip(grads_a, grads_b))
        diff = (a["model"][n] - b["model"][n]).abs()
        assert (diff <= allowed).all(), (n, float((diff - allowed).max()))
        loose, total = loose + int((allowed > 2e-5).sum()), total + diff.numel()
    assert loose < 0.05 * total, (loose, total)                        # nearly every weight is compared to 2e-5
    for n in set(a["model"]) - set(names):                             # buffers: scaler, trust, gene features
        assert torch.equal(a["model"][n], b["model"][n]), n
    assert a["step"] == b["step"] and a["rng"]["numpy"] == b["rng"]["numpy"]
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])


def test_rl_two_processes_equal_one(rl_runs, tiny_screen):
    """The gradients, policy, optimiser moments, random states and checkpoint decision after one step on 2 processes
    (torchrun) equal 1 process: the uneven split (2 + 1 groups) needs each process's loss weighted by its share of the
    groups."""
    tmp = rl_runs
    a, b = rl_state(tmp / "one_last.pt"), rl_state(tmp / "two_last.pt")
    assert moved(a, {"model": load(tiny_screen["ckpt"])["ema"]}) > 1e-4
    assert_same_rl_state(a, b, probe_grads(tmp, "one"), probe_grads(tmp, "two", 2))
    assert a["extra"]["best"]["step"] == b["extra"]["best"]["step"]
    assert a["extra"]["best"]["gain"] == pytest.approx(b["extra"]["best"]["gain"], abs=1e-5)
    assert [h["step"] for h in a["extra"]["history"]] == [h["step"] for h in b["extra"]["history"]]
    assert flow.load_checkpoint(tmp / "two.pt")[1]["extra"]["base"] == str(tiny_screen["ckpt"])


def test_rl_resume_with_another_process_count(rl_runs, tiny_screen, tmp_path):
    """Each one-step run resumed for a second step with the other process count: the same second step."""
    for name in ("one", "two"):
        for f in (f"{name}.pt", f"{name}_last.pt"):
            shutil.copy(rl_runs / f, tmp_path / f)
    common = ["--ckpt", tiny_screen["ckpt"], *RL_STEP, "--steps", 2, "--resume"]
    run((*probed(tmp_path, "one", [*common, "--out", tmp_path / "one.pt"]), 2),
        (*probed(tmp_path, "two", [*common, "--out", tmp_path / "two.pt"]), 1))
    a, b = rl_state(tmp_path / "one_last.pt"), rl_state(tmp_path / "two_last.pt")
    assert a["step"] == b["step"] == 2
    assert_same_rl_state(a, b, probe_grads(rl_runs, "one") + probe_grads(tmp_path, "one", 2),
                         probe_grads(rl_runs, "two", 2) + probe_grads(tmp_path, "two"))


# ----------------------------------------------------------------------------- bad input, dead peers
def test_more_processes_than_conditions_is_one_line_on_rank_0(tiny_screen, tmp_path):
    res = finish(start("rl.py", ["--ckpt", tiny_screen["ckpt"], "--conds", 1, "--out", tmp_path / "r.pt"], world=2))
    assert [code for code, _, _ in res] == [2, 2]
    err0 = res[0][2].strip().splitlines()
    assert len(err0) == 1 and err0[0].startswith("error: 2 processes but a GRPO step rolls out 1 conditions")
    assert "--nproc_per_node" in err0[0] and res[1][2].strip() == ""               # rank 1 says nothing
    assert not (tmp_path / "r.pt").exists()


def test_cuda_without_gpu_and_missing_nccl(monkeypatch):
    """--device cuda without a GPU and, under torchrun, without NCCL: one UserError each (the CLIs print it on rank 0
    and exit 2), before any process group is started."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="--device cuda: no CUDA device visible"):
        data.distributed("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: False)
    with pytest.raises(UserError, match="needs NCCL, which this torch build lacks; .*--device cpu"):
        data.distributed("cuda")
    assert not torch.distributed.is_initialized()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CLI on a machine without a GPU")
def test_cuda_without_gpu_cli_under_two_processes(tmp_path):
    res = finish(start("flow.py", ["--device", "cuda", "--out", tmp_path / "f.pt"], world=2))
    assert [code for code, _, _ in res] == [2, 2]
    assert res[0][2].strip() == "error: --device cuda: no CUDA device visible to torch; use --device cpu or auto"
    assert res[1][2].strip() == ""


def test_a_stuck_process_fails_the_others_after_the_timeout(tiny_screen, tmp_path):
    """Rank 1 stopped (SIGSTOP) mid-training: rank 0's next collective gives up after --timeout seconds and the
    process exits with an error instead of waiting forever."""
    procs = start("flow.py", ["--data", tiny_screen["path"], *FLOW, "--steps", 100000, "--batch-size", 8,
                              "--timeout", 5, "--save-every", 1, "--out", tmp_path / "f.pt"], world=2)
    try:
        deadline = time.time() + 60
        while not (tmp_path / "f.pt").exists() and time.time() < deadline:   # training: rank 0 saved step 0..
            if procs[0].poll() is not None:
                break
            time.sleep(0.5)
        time.sleep(2)                                                       # well into the loop
        os.kill(procs[1].pid, signal.SIGSTOP)
        t0 = time.time()
        code = procs[0].wait(timeout=60)
        assert code != 0 and time.time() - t0 < 30
        assert "Timed out" in procs[0].stderr.read()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()


# ----------------------------------------------------------------------------- devices
def meta_device(monkeypatch):
    """Run the training loops with the model and every device tensor on the meta device (shapes only, no data):
    an op mixing a meta and a CPU tensor raises, exactly where CUDA would fail on a tensor left on the host. The
    few reads of a value (.item(), bool(), float()) return dummies; checkpoints and validation are skipped;
    generators, which cannot live on meta, draw on the CPU."""
    for name, dummy in [("item", 0.0), ("__float__", 0.0), ("__bool__", True)]:
        orig = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, _o=orig, _d=dummy: _d if self.is_meta else _o(self))
    real = torch.Generator
    monkeypatch.setattr(torch, "Generator", lambda device="cpu": real(
        device="cpu" if torch.device(device).type == "meta" else device))
    for name in ("save_checkpoint", "write_checkpoint", "make_checkpoint"):
        monkeypatch.setattr(data, name, lambda *a, **k: {})
    monkeypatch.setattr(rl, "val_metrics", lambda *a, **k: {"score": 0.0, "pearson_delta": 0.0, "energy": 0.0,
                                                         "effect_ratio": 1.0, "spread_ratio": 1.0,
                                                         **{f"reward/{n}": 0.0 for n in verifiers.REWARDS}})


def test_training_loops_keep_every_tensor_on_the_device(tiny_screen, tmp_path, monkeypatch):
    """flow.train and rl.train (rollouts, rewards on sparse references moved once, the update) on the meta device,
    and a broken device move (the control cells left on the CPU) caught by the same check."""
    meta_device(monkeypatch)
    fcfg = flow.FlowConfig(data=str(tiny_screen["path"]), n_genes=0, steps=3, stop_at=2, batch_size=8, width=32,
                           depth=1, device="meta", progress=False, out=str(tmp_path / "f.pt"))
    flow.train(fcfg)
    rl.train(rl.RLConfig(ckpt=str(tiny_screen["ckpt"]), out=str(tmp_path / "r.pt"), steps=2, conds=2, group=4, T=3,
                         device="meta", progress=False))
    make_cond = flow.make_cond
    monkeypatch.setattr(flow, "make_cond", lambda *a: {**(c := make_cond(*a)), "ctrl": torch.zeros(c["ctrl"].shape)})
    with pytest.raises(RuntimeError, match="device"):
        flow.train(fcfg)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_whole_pipeline_on_cuda(tiny_screen, tmp_path):
    """flow.py, rl.py and evaluate.py with --device cuda (bf16 autocast, device generators, sparse references on
    the GPU); with 2 or more GPUs also torchrun with NCCL."""
    fl, r = tmp_path / "flow.pt", tmp_path / "rl.pt"
    run(("flow.py", ["--data", tiny_screen["path"], *FLOW, "--steps", 20, "--device", "cuda", "--out", fl], 1))
    run(("rl.py", ["--ckpt", fl, "--steps", 2, "--conds", 2, "--group", 4, "--T", 3, "--device", "cuda",
                   "--no-progress", "--out", r], 1))
    run(("evaluate.py", ["--ckpt", fl, r, "--device", "cuda"], 1))
    assert torch.isfinite(load(r)["ema"]["out.weight"]).all()
    if torch.cuda.device_count() >= 2:
        run(("flow.py", ["--data", tiny_screen["path"], *FLOW, "--steps", 4, "--device", "cuda",
                         "--out", tmp_path / "f2.pt"], 2))
        run(("rl.py", ["--ckpt", fl, "--steps", 1, "--conds", 2, "--group", 4, "--T", 3, "--device", "cuda",
                       "--no-progress", "--out", tmp_path / "r2.pt"], 2))


# ----------------------------------------------------------------------------- sparse and lazy data
def test_dataset_is_sparse_and_references_are_views(tiny_screen):
    """Memory grows with the non-zeros: X is CSR, no n_cells x G dense array is held anywhere, each Reference's
    cells are a view of X (moved to another device as a sparse tensor) and densify to X's rows."""
    ds = tiny_screen["ds"]
    n, G = ds.X.shape
    assert sp.isspmatrix_csr(ds.X.csr) and ds.X.csr.dtype == np.float32
    big = [k for k, v in vars(ds).items() if isinstance(v, np.ndarray) and v.size >= n * G]
    assert not big
    for k in ds.keys:
        r = ds.refs[k]
        assert r.X.layout == torch.sparse_csr and np.shares_memory(r.X.values().numpy(), ds.X.csr.data)
        np.testing.assert_array_equal(r.dense_cells().numpy(), ds.X[ds.cell_idx[k]])
        m = r.to("meta")
        assert m.X.layout == torch.sparse_csr and m.dense_cells().shape == (len(ds.cell_idx[k]), G)
    rows = np.array([5, 0, 5, n - 1])
    np.testing.assert_array_equal(ds.X[rows], ds.X.csr.toarray()[rows])
    np.testing.assert_array_equal(ds.X[3], ds.X.csr.toarray()[3])


@pytest.mark.parametrize("kind", ["csr", "dense", "log"])
def test_lazy_load_equals_in_memory(tmp_path, monkeypatch, kind):
    """--lazy (X read from disk in blocks of 7 cells, twice) gives the in-memory load's genes, matrix, split and
    reference statistics; raw counts (CSR or dense) and log-normalised data."""
    h = data.simulate(n_cells=400, n_genes=120, n_singles=6, n_combos=4, seed=3)
    X = h.X.toarray()
    h.X = {"csr": h.X, "dense": X, "log": np.log1p(X / X.sum(1, keepdims=True) * 1e4).astype(np.float32)}[kind]
    path = tmp_path / "s.h5ad"
    data.write_h5ad(path, h)
    monkeypatch.setattr(data, "BLOCK", 7)
    a = data.load_dataset(data.DataConfig(data=str(path), n_genes=50))
    b = data.load_dataset(data.DataConfig(data=str(path), n_genes=50, lazy=True))
    assert a.genes == b.genes and a.split == b.split and a.meta["counts"] == b.meta["counts"] == (kind != "log")
    assert (a.X.csr != b.X.csr).nnz == 0
    for k in a.keys:
        for f in ("ctrl_mean", "ctrl_std", "mean", "t"):
            torch.testing.assert_close(getattr(a.refs[k], f), getattr(b.refs[k], f), atol=1e-5, rtol=1e-5)
        assert torch.equal(a.refs[k].de_idx, b.refs[k].de_idx)


def test_lazy_bad_values_and_csc(tmp_path, monkeypatch):
    """A bad value in a later block is reported at its cell of the file; CSC cannot be read by cells."""
    h = data.simulate(n_cells=300, n_genes=80, n_singles=4, n_combos=2, seed=4)
    h.X = h.X.tolil()
    h.X[250, 3] = -1.0
    h.X = h.X.tocsr()
    data.write_h5ad(tmp_path / "bad.h5ad", h)
    monkeypatch.setattr(data, "BLOCK", 16)
    with pytest.raises(UserError, match="1 negative value.*first at cell 250, gene 3"):
        data.load_dataset(data.DataConfig(data=str(tmp_path / "bad.h5ad"), lazy=True))
    h.X = sp.csc_matrix(h.X.maximum(0))
    data.write_h5ad(tmp_path / "csc.h5ad", h)
    with pytest.raises(UserError, match="--lazy reads X by cells.*csc_matrix: drop --lazy or rewrite it as CSR"):
        data.load_dataset(data.DataConfig(data=str(tmp_path / "csc.h5ad"), lazy=True))


def test_ref_cells_caps_the_real_cells_not_the_statistics(tiny_screen):
    """--ref-cells 20: conditions with more cells keep a seeded sample of 20 of their own cells for rewards and
    metrics; means, Welch t and DE genes are still computed on every cell; the same sample at every load."""
    cfg = dict(data=str(tiny_screen["path"]), n_genes=0)
    full = tiny_screen["ds"]
    capped, again = (data.load_dataset(data.DataConfig(**cfg, ref_cells=20)) for _ in range(2))
    for k in full.keys:
        a, b = full.refs[k], capped.refs[k]
        for f in ("ctrl_mean", "ctrl_std", "mean", "delta", "t", "de_idx"):
            assert torch.equal(getattr(a, f), getattr(b, f))
        n = len(full.cell_idx[k])
        assert n > 20 and b.dense_cells().shape[0] == 20 and torch.equal(b.dense_cells(), again.refs[k].dense_cells())
        real = {tuple(r) for r in a.dense_cells().numpy().round(5)}
        assert all(tuple(r) in real for r in b.dense_cells().numpy().round(5))     # its own cells
