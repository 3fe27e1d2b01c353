"""No run loses data or work (issue 13), one test per defect: outputs never overwrite inputs and fail before any
work when they cannot be written; options are checked at parse time; Ctrl-C anywhere in an RL or flow step
resumes bit-exactly; old, foreign, truncated and other-stage checkpoints give one line; RL on an RL checkpoint is
refused; float16 sparse X loads; labels match genes in any case and with | ; _ separators; JSON is strict."""
import hashlib
import json
import os
import subprocess
import sys
import warnings
from dataclasses import fields
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.sparse as sp
import torch

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
import data  # noqa: E402
import evaluate  # noqa: E402
import flow  # noqa: E402
import rl  # noqa: E402
import verifiers  # noqa: E402
from data import UserError  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# ----------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def sim(tiny_screen):
    """The shared tiny screen: sim.h5ad (15 train, 1 val, 2 test keys) and a tiny pretrained flow.pt."""
    return dict(tiny_screen)


def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tiny_rl(sim, out, **kw):
    """2 conditions x 4 rollouts x 3 SDE steps per GRPO step; 4 steps, validation at 0, 2 and 4."""
    base = dict(ckpt=sim["ckpt"], out=str(out), steps=4, conds=2, group=4, T=3, eval_every=2, eval_cells=8,
                eval_steps=4, progress=False, seed=0)
    return rl.RLConfig(**{**base, **kw})


def tiny_flow(path, out, **kw):
    base = dict(data=str(path), n_genes=0, width=32, depth=1, steps=40, batch_size=32, warmup=5, eval_every=1000,
                save_every=20, out=str(out), progress=False, gene_feat_dim=4)
    return flow.FlowConfig(**{**base, **kw})


def boom(*a, **kw):
    raise AssertionError("work started before the outputs were checked")


def write(path, X, labels, genes):
    data.write_h5ad(path, data.H5AD(X=X, obs={"condition": np.array(labels, dtype=object)}, var={},
                                    obs_names=np.array([f"c{i}" for i in range(len(labels))], dtype=object),
                                    var_names=np.array(genes, dtype=object)))
    return str(path)


def same_state(a, b):
    """Two checkpoint dicts hold bit-identical weights, optimiser state, RNG, step, history (times aside), best."""
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    sa, sb = a["opt"]["state"], b["opt"]["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"]) and a["rng"]["numpy"] == b["rng"]["numpy"]
    strip = lambda c: [{k: v for k, v in h.items() if not k.startswith("time")} for h in c["extra"]["history"]]  # noqa
    assert a["step"] == b["step"] and strip(a) == strip(b)
    assert a["extra"].get("best") == b["extra"].get("best")


# ----------------------------------------------------------------------------- outputs never overwrite inputs
def test_evaluate_write_pred_over_its_data_is_refused_and_the_data_kept(sim, tmp_path, monkeypatch):
    d = tmp_path / "d.h5ad"
    d.write_bytes(Path(sim["path"]).read_bytes())
    before = digest(d)
    os.symlink(d, tmp_path / "link.h5ad")
    monkeypatch.setattr(flow, "generate", boom)
    for pred in (str(d), str(tmp_path / "link.h5ad"), str(tmp_path / "sub" / ".." / "d.h5ad")):
        with pytest.raises(UserError, match="same file as --data"):
            evaluate.main(["--data", str(d), "--ckpt", sim["ckpt"], "--write-pred", pred])
    with pytest.raises(UserError, match="same file as the checkpoint's data"):   # the data read without --data
        evaluate.main(["--ckpt", sim["ckpt"], "--write-pred", str(sim["path"])])
    with pytest.raises(UserError, match="same file as --ckpt"):          # and not over a checkpoint
        evaluate.main(["--ckpt", sim["ckpt"], "--out", sim["ckpt"]])
    with pytest.raises(UserError, match="same file as --out"):           # nor two outputs into one file
        evaluate.main(["--ckpt", sim["ckpt"], "--out", str(tmp_path / "x"), "--write-pred", str(tmp_path / "x")])
    assert digest(d) == before and data.read_h5ad(d).X.shape[0] == 1500


def test_flow_out_over_its_data_is_refused(sim, tmp_path, capsys):
    d = tmp_path / "d.h5ad"
    d.write_bytes(Path(sim["path"]).read_bytes())
    before = digest(d)
    with pytest.raises(SystemExit) as e:
        data.cli(lambda: flow.main(["--data", str(d), "--out", str(d), "--no-progress"]))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "same file as --data" in err[0], err
    assert digest(d) == before


def test_rl_out_over_its_base_is_refused(sim, tmp_path, monkeypatch):
    base = tmp_path / "flow.pt"
    base.write_bytes(Path(sim["ckpt"]).read_bytes())
    before = digest(base)
    monkeypatch.setattr(rl, "pretrained", boom)
    with pytest.raises(UserError, match="--out .*flow.pt is the same file as --ckpt"):
        rl.main(["--ckpt", str(base), "--out", str(base), "--no-progress"])
    last = tmp_path / "m_last.pt"                                        # <out>_last.pt is an output too
    last.write_bytes(base.read_bytes())
    with pytest.raises(UserError, match="latest state.*same file as --ckpt"):
        rl.main(["--ckpt", str(last), "--out", str(tmp_path / "m.pt"), "--no-progress"])
    monkeypatch.undo()
    d = tmp_path / "d.h5ad"
    d.write_bytes(Path(sim["path"]).read_bytes())
    ck = edited(sim, tmp_path, "on_d.pt", lambda ck: ck["config"].update(data=str(d)))
    with pytest.raises(UserError, match="same file as the checkpoint's data"):   # the data read without --data
        rl.main(["--ckpt", ck, "--out", str(d), "--no-progress"])
    assert digest(d) == digest(sim["path"])
    assert digest(base) == before


# ----------------------------------------------------------------------------- outputs fail before any work
def test_output_folders_are_created(sim, tmp_path):
    out = tmp_path / "nodir" / "sub" / "f.pt"
    flow.train(tiny_flow(sim["path"], out, steps=2))
    assert flow.load_checkpoint(str(out))[1]["step"] == 2


def test_unwritable_outputs_fail_before_any_work(sim, tmp_path, monkeypatch):
    """A path under a regular file cannot be created, even by root (where chmod does not stop writes)."""
    (tmp_path / "afile").write_text("x")
    bad = str(tmp_path / "afile" / "sub" / "out.pt")
    monkeypatch.setattr(data, "load_dataset", boom)
    monkeypatch.setattr(flow, "generate", boom)
    monkeypatch.setattr(rl, "pretrained", boom)
    with pytest.raises(UserError, match="--out .*cannot write"):
        flow.train(tiny_flow(sim["path"], bad))
    with pytest.raises(UserError, match="--out .*cannot write"):
        evaluate.main(["--ckpt", sim["ckpt"], "--out", bad])
    with pytest.raises(UserError, match="--write-pred .*cannot write"):
        evaluate.main(["--ckpt", sim["ckpt"], "--write-pred", bad])
    with pytest.raises(UserError, match="--out .*cannot write"):
        rl.train(tiny_rl(sim, bad, ckpt=None))
    with pytest.raises(UserError, match="is a folder"):
        flow.train(tiny_flow(sim["path"], tmp_path))


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_fails_before_any_work(sim, tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    monkeypatch.setattr(data, "load_dataset", boom)
    try:
        with pytest.raises(UserError, match="cannot write"):
            flow.train(tiny_flow(sim["path"], ro / "f.pt"))
    finally:
        ro.chmod(0o755)


# ----------------------------------------------------------------------------- options checked at parse time
@pytest.mark.parametrize("flag, value", [("--steps", "0"), ("--steps", "-1"), ("--lr", "nan"), ("--lr", "inf"),
                                         ("--save-every", "0"), ("--eval-every", "0"), ("--batch-size", "0")])
def test_flow_bad_option_one_line_nothing_saved(tmp_path, capsys, flag, value):
    out = tmp_path / "s0.pt"
    with pytest.raises(SystemExit) as e:
        data.cli(lambda: flow.main([flag, value, "--out", str(out), "--no-progress"]))
    cap = capsys.readouterr()
    err = cap.err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith(f"error: {flag} {value}: must be"), err
    assert "saved" not in cap.out and not out.exists()


@pytest.mark.parametrize("flag, value", [("--group", "1"), ("--conds", "0"), ("--lr", "nan"), ("--eval-every", "0"),
                                         ("--T", "0"), ("--steps", "0"), ("--t-frac", "0.0")])
def test_rl_bad_option(sim, tmp_path, monkeypatch, flag, value):
    monkeypatch.setattr(rl, "pretrained", boom)
    with pytest.raises(UserError, match=f"^{flag} {value}: must be"):
        rl.main(["--ckpt", sim["ckpt"], "--out", str(tmp_path / "rl.pt"), flag, value, "--no-progress"])
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("flag, value", [("--ode-steps", "0"), ("--n-cells", "0"), ("--sde-noise", "nan"),
                                         ("--topk", "0")])
def test_evaluate_bad_option(sim, flag, value):
    with pytest.raises(UserError, match=f"^{flag} {value}: must be"):
        evaluate.main(["--ckpt", sim["ckpt"], flag, value])


def test_cli_steps_zero_exit_2_no_saved_line(tmp_path):
    res = subprocess.run([sys.executable, "flow.py", "--steps", "0", "--out", str(tmp_path / "s0.pt")], cwd=ROOT,
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert res.returncode == 2 and "saved" not in res.stdout and not (tmp_path / "s0.pt").exists()
    assert res.stderr.strip().splitlines() == ["error: --steps 0: must be an integer >= 1"]


# ----------------------------------------------------------------------------- exact resume after Ctrl-C
@pytest.fixture(scope="module")
def rl_ref(sim, tmp_path_factory):
    """An uninterrupted 4-step run: its latest state and its best checkpoint."""
    tmp = tmp_path_factory.mktemp("ref")
    rl.train(tiny_rl(sim, tmp / "ref.pt"))
    return {k: torch.load(tmp / f, weights_only=True) for k, f in (("last", "ref_last.pt"), ("best", "ref.pt"))}


def fail_on_call(monkeypatch, owner, name, n, saving=None):
    """Make the n-th call of owner.name raise KeyboardInterrupt. saving: for torch.save, count only the files
    whose name holds it (temporary files: '.<name>.<random>.tmp'), and leave half a file first, as a Ctrl-C inside
    torch.save would."""
    real, calls = getattr(owner, name), [0]

    def f(*a, **kw):
        if saving is None or saving in str(a[1]):
            calls[0] += 1
            if calls[0] == n:
                if saving is not None:
                    Path(a[1]).write_bytes(b"PK\x03\x04 half a checkpoint")
                raise KeyboardInterrupt
        return real(*a, **kw)
    monkeypatch.setattr(owner, name, f)


# phase -> (owner, function, the call that raises, which files count (torch.save), the step whose state is kept).
# Per GRPO step here: 1 rollout, 1 group_advantages, 2 passes x 2 timesteps of sde_log_prob; validation at 0, 2, 4,
# each with 1 rollout (the fixed training groups) and 4 val_metrics (--val-draws)
PHASES = {"rollout": (rl, "rollout", 5, None, 2), "rewards": (rl, "group_advantages", 2, None, 1),
          "first pass": (flow, "sde_log_prob", 6, None, 1), "second pass": (flow, "sde_log_prob", 7, None, 1),
          "validation at step 0": (rl, "val_metrics", 1, None, 0), "validation": (rl, "val_metrics", 6, None, 1),
          "saving the best": (torch, "save", 1, "/.c.pt.", 0),
          "saving the latest": (torch, "save", 1, "/.c_last.pt.", 1)}


@pytest.mark.parametrize("phase", list(PHASES))
def test_rl_ctrl_c_in_any_phase_resumes_exactly(sim, rl_ref, tmp_path, monkeypatch, phase):
    """Ctrl-C drops the step in progress and saves the last completed one; --resume then ends bit-identical to
    the uninterrupted run (weights, Adam state, RNG, history, best checkpoint). The old handler kept a half
    step's update (between the passes, in validation) with the RNG of its start."""
    owner, name, n, saving, kept = PHASES[phase]
    fail_on_call(monkeypatch, owner, name, n, saving)
    with pytest.raises(KeyboardInterrupt, match=f"after step {kept} .*--resume"):
        rl.train(tiny_rl(sim, tmp_path / "c.pt"))
    monkeypatch.undo()
    assert torch.load(tmp_path / "c_last.pt", weights_only=True)["step"] == kept
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]          # no half-written file left
    rl.train(tiny_rl(sim, tmp_path / "c.pt", resume=True))
    same_state(torch.load(tmp_path / "c_last.pt", weights_only=True), rl_ref["last"])
    best = torch.load(tmp_path / "c.pt", weights_only=True)
    assert best["step"] == rl_ref["best"]["step"]
    assert all(torch.equal(best["model"][k], rl_ref["best"]["model"][k]) for k in best["model"])


def test_ctrl_c_exits_130_with_the_resume_hint(capsys):
    def main():
        raise KeyboardInterrupt("interrupted; saved the state after step 3 to x_last.pt; continue with --resume")
    with pytest.raises(SystemExit) as e:
        data.cli(main)
    assert e.value.code == 130 and "continue with --resume" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:                                 # before any state: a bare Ctrl-C
        data.cli(lambda: (_ for _ in ()).throw(KeyboardInterrupt))
    assert e.value.code == 130 and capsys.readouterr().err.strip() == "interrupted"


def test_flow_ctrl_c_keeps_the_last_checkpoint_and_resumes_exactly(sim, tmp_path, monkeypatch):
    flow.train(tiny_flow(sim["path"], tmp_path / "a.pt"))
    fail_on_call(monkeypatch, flow, "cfm_loss", 30)                     # during step 30: step 20 is on disk
    with pytest.raises(KeyboardInterrupt):
        flow.train(tiny_flow(sim["path"], tmp_path / "b.pt"))
    monkeypatch.undo()
    fail_on_call(monkeypatch, torch, "save", 1, ".tmp")               # Ctrl-C while writing the step-40 one
    with pytest.raises(KeyboardInterrupt):
        flow.train(tiny_flow(sim["path"], tmp_path / "b.pt", resume=True))
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["a.pt", "b.pt"]             # no half-written b.pt.tmp
    assert flow.load_checkpoint(str(tmp_path / "b.pt"))[1]["step"] == 20
    flow.train(tiny_flow(sim["path"], tmp_path / "b.pt", resume=True))
    a, b = (torch.load(tmp_path / f, weights_only=True) for f in ("a.pt", "b.pt"))
    same_state(a, b)


def test_flow_main_ctrl_c_exit_130(monkeypatch, capsys):
    monkeypatch.setattr(flow, "train", lambda cfg: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(SystemExit) as e:
        data.cli(lambda: flow.main(["--out", "x.pt"]))
    assert e.value.code == 130 and "--resume" in capsys.readouterr().err


# ----------------------------------------------------------------------------- checkpoints: format, old, foreign
def edited(sim, tmp_path, name, edit):
    ck = torch.load(sim["ckpt"], weights_only=True)
    edit(ck)
    torch.save(ck, tmp_path / name)
    return str(tmp_path / name)


def test_checkpoints_carry_the_format_version(sim):
    assert torch.load(sim["ckpt"], weights_only=True)["format"] == data.FORMAT == 3


@pytest.mark.parametrize("fmt, want", [(2, "an earlier version wrote it .* retrain it"), (1, "an earlier version wrote it .* retrain it"),
                                       (4, "update PerturbCellRL")])
def test_a_checkpoint_of_another_format_is_one_line(sim, tmp_path, fmt, want):
    """Format 2 folded the residual trust into the weights (format 3 holds it in VelocityField.lam): loading one as
    format 3 would use a scaled network at full trust, so it is refused, as a newer one is."""
    path = edited(sim, tmp_path, "old.pt", lambda ck: ck.update(format=fmt) if fmt > 1 else ck.pop("format"))
    with pytest.raises(UserError, match=f"format {fmt}, this code reads 3: {want}"):
        flow.load_checkpoint(path)


@pytest.mark.parametrize("key, use, want", [
    ("split", None, "has no split:"), ("genes", None, "has no genes:"), ("rng", "flow", "has no rng.torch, rng.numpy:"),
    ("opt", "flow", "has no opt:"), ("extra", "flow", "has no extra.history, extra.loss_avg:")])
def test_older_checkpoint_names_what_is_missing(sim, tmp_path, key, use, want):
    path = edited(sim, tmp_path, "old.pt", lambda ck: ck.pop(key))
    with pytest.raises(UserError, match=want) as e:
        flow.load_checkpoint(path, resume=use)
    assert ("without --resume" if use else "retrain") in str(e.value)


def test_rl_checkpoint_given_to_flow_resume(sim, tmp_path):
    path = edited(sim, tmp_path, "rl.pt", lambda ck: ck["extra"].update(base=sim["ckpt"], rl_config={"out": "r.pt"}))
    with pytest.raises(UserError, match=r"RL checkpoint.*rl.py --resume --out r.pt"):
        flow.train(tiny_flow(sim["path"], path, resume=True))


def test_truncated_newer_and_foreign_checkpoints(sim, tmp_path):
    raw = Path(sim["ckpt"]).read_bytes()
    (tmp_path / "cut.pt").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "empty.pt").write_bytes(b"")
    for f in ("cut.pt", "empty.pt"):
        with pytest.raises(UserError, match="truncated or corrupt"):
            flow.load_checkpoint(str(tmp_path / f))
    with pytest.raises(UserError, match="format 4, this code reads 3: .*update PerturbCellRL"):
        flow.load_checkpoint(edited(sim, tmp_path, "new.pt", lambda ck: ck.update(format=4)))
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="not a PerturbCellRL checkpoint"):
        flow.load_checkpoint(str(tmp_path / "other.pt"))
    bad = edited(sim, tmp_path, "bad.pt", lambda ck: ck["ema"].pop("out.weight"))
    with pytest.raises(UserError, match="weights do not fit.*retrain"):
        flow.load_checkpoint(bad)


def test_rl_on_an_rl_checkpoint_is_refused(sim, tmp_path, monkeypatch):
    path = edited(sim, tmp_path, "rl.pt", lambda ck: ck["extra"].update(base=sim["ckpt"], rl_config={"out": "rl.pt"}))
    with pytest.raises(UserError, match=f"RL checkpoint .*do not chain.*--ckpt {sim['ckpt']}"):
        rl.train(tiny_rl(sim, tmp_path / "again.pt", ckpt=path))
    assert not (tmp_path / "again.pt").exists() and not (tmp_path / "again_last.pt").exists()


def test_rl_resume_without_a_state_says_nothing_to_resume(sim, tmp_path):
    with pytest.raises(UserError, match="nothing to resume.*without --resume") as e:
        rl.main(["--ckpt", sim["ckpt"], "--out", str(tmp_path / "rl.pt"), "--resume"])
    assert "flow.py" not in str(e.value)
    torch.save(torch.load(sim["ckpt"], weights_only=True), tmp_path / "rl_last.pt")   # a flow checkpoint there
    with pytest.raises(UserError, match="not an RL run's state"):
        rl.main(["--ckpt", sim["ckpt"], "--out", str(tmp_path / "rl.pt"), "--resume"])


# ----------------------------------------------------------------------------- data
def test_sparse_float16_x_is_read_as_float32(tmp_path):
    rng = np.random.default_rng(0)
    labels = ["ctrl"] * 30 + ["A"] * 15 + ["B"] * 15
    X = sp.csr_matrix(rng.poisson(2.0, (60, 12)).astype(np.float32))
    genes = [f"G{i}" for i in range(12)]
    p16, p32 = write(tmp_path / "h.h5ad", X, labels, genes), write(tmp_path / "f.h5ad", X, labels, genes)
    with h5py.File(p16, "r+") as f:                                     # CSR X/data stored as float16
        d = f["X/data"][...]
        del f["X/data"]
        f["X"].create_dataset("data", data=d.astype(np.float16))
    assert data.read_h5ad(p16).X.dtype == np.float32
    cfg = dict(n_genes=6, split="random", min_cells=5)
    ds16 = data.load_dataset(data.DataConfig(data=p16, **cfg))
    ds32 = data.load_dataset(data.DataConfig(data=p32, **cfg))
    assert ds16.X.dtype == np.float32 and ds16.genes == ds32.genes and np.array_equal(ds16.X, ds32.X)


def test_labels_match_genes_in_any_case(tmp_path):
    """'tmsb4x' names the gene TMSB4X: kept by gene selection (as a target) and given prior features. The gene
    is nearly constant, so without the match it is never a highly variable gene."""
    rng = np.random.default_rng(1)
    genes = [f"G{i}" for i in range(30)] + ["TMSB4X"]
    labels = ["ctrl"] * 60 + ["tmsb4x"] * 15 + ["G1"] * 15 + ["G2"] * 15
    X = rng.negative_binomial(2, 0.4, (len(labels), len(genes))).astype(np.float32)
    X[:, -1] = 200 + np.arange(len(labels)) % 2                         # varies a little: a correlation profile
    p = write(tmp_path / "case.h5ad", X, labels, genes)
    with pytest.warns(UserWarning, match="tmsb4x -> TMSB4X"):
        ds = data.load_dataset(data.DataConfig(data=p, n_genes=3, split="random", min_cells=5))
    assert ds.genes == ["G1", "G2", "TMSB4X"] and ds.components == ["G1", "G2", "TMSB4X"]
    assert ("TMSB4X", "all") in ds.keys and ds.meta["labels"]["TMSB4X"] == "tmsb4x"
    feat = data.gene_features(ds, p=2)
    assert feat[ds.components.index("TMSB4X")].abs().sum() > 0


@pytest.mark.parametrize("sep", ["|", ";", "_"])
def test_other_separators_when_every_part_is_a_label_or_gene(tmp_path, sep):
    rng = np.random.default_rng(2)
    genes = [f"G{i}" for i in range(10)]
    labels = ["ctrl"] * 30 + ["G1"] * 12 + ["G2"] * 12 + [f"G1{sep}G2"] * 12 + [f"G3{sep}G4"] * 12
    p = write(tmp_path / "sep.h5ad", rng.poisson(3.0, (len(labels), 10)).astype(np.float32), labels, genes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = data.load_dataset(data.DataConfig(data=p, n_genes=0, split="random", min_cells=5))
    assert ds.meta["sep"] == sep and sorted(k[0] for k in ds.keys) == ["G1", "G1+G2", "G2", "G3+G4"]
    assert data.detect_sep(["ctrl", "A", f"A{sep}X"], "ctrl") == "+"       # X is neither a label nor a gene


def test_no_perturbed_cells_says_so(tmp_path):
    rng = np.random.default_rng(3)
    X = rng.poisson(3.0, (40, 6)).astype(np.float32)
    p = write(tmp_path / "ctrl.h5ad", X, ["ctrl"] * 40, [f"G{i}" for i in range(6)])
    with pytest.raises(UserError, match="no perturbed cells") as e:
        data.load_dataset(data.DataConfig(data=p, n_genes=0))
    assert "min-cells" not in str(e.value)
    p = write(tmp_path / "few.h5ad", X, ["ctrl"] * 37 + ["A"] * 3, [f"G{i}" for i in range(6)])
    with pytest.warns(UserWarning), pytest.raises(UserError, match="the largest has 3.*lower --min-cells"):
        data.load_dataset(data.DataConfig(data=p, n_genes=0))


def test_pathway_reward_with_few_genes_says_raise_n_genes(sim):
    genes = sim["ds"].genes[:40:8]                                       # symbols, as --n-genes 5 keeps
    with pytest.raises(UserError, match="5 genes .* 5 of them are in any set, too few.*raise --n-genes") as e:
        verifiers.Verifier(genes, {"pathway": 1.0})
    assert "--gene-symbols" not in str(e.value)


# ----------------------------------------------------------------------------- strict JSON
def test_results_json_is_strict(sim, tmp_path):
    """One generated cell per condition: its spread ratio is NaN, written as null (the folder is created)."""
    out = tmp_path / "nodir" / "r.json"
    evaluate.main(["--ckpt", sim["ckpt"], "--ode-steps", "2", "--sde-noise", "0", "--n-cells", "1", "--out", str(out)])
    bad = lambda c: (_ for _ in ()).throw(ValueError(f"non-standard JSON constant {c}"))  # noqa: E731
    res = json.loads(out.read_text(), parse_constant=bad)
    assert all(r["spread_ratio"] is None for r in res["rows"] if r["method"] == sim["ckpt"])
    nan, inf = float("nan"), float("inf")
    assert evaluate.strict({"a": [1.0, inf, {"b": nan}], "c": "x"}) == {"a": [1.0, None, {"b": None}], "c": "x"}


# ============================================================================= issue 18: round 2
def one_error_line(capsys, run, code=2):
    """Run a stage's main through data.cli: exit code 2 and one `error:` line, the last one on stderr (what a stage
    printed before it aside), no traceback. Returns that line."""
    with pytest.raises(SystemExit) as e:
        data.cli(run)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == code and err[-1].startswith("error: ") and sum(l.startswith("error") for l in err) == 1 \
        and not any("Traceback" in l for l in err), (e.value.code, err)
    return err[-1]


# ----------------------------------------------------------------------------- temporary files
def test_an_input_named_like_the_old_temp_file_survives_a_save(sim, tmp_path):
    """Saves wrote <out>.tmp then renamed it: `flow.py --data o/model.pt.tmp --out o/model.pt` destroyed the data,
    and so did `evaluate.py --data p.h5ad.tmp --write-pred p.h5ad` (and --out r.json beside r.json.tmp)."""
    d, before = tmp_path / "model.pt.tmp", digest(sim["path"])
    d.write_bytes(Path(sim["path"]).read_bytes())
    flow.train(tiny_flow(d, tmp_path / "model.pt", steps=2))
    for name in ("p.h5ad.tmp", "r.json.tmp"):
        (tmp_path / name).write_bytes(d.read_bytes())
    evaluate.main(["--ckpt", str(tmp_path / "model.pt"), "--data", str(tmp_path / "p.h5ad.tmp"), "--ode-steps", "2",
                   "--sde-noise", "0", "--write-pred", str(tmp_path / "p.h5ad"), "--out", str(tmp_path / "r.json")])
    assert all(digest(tmp_path / f) == before for f in ("model.pt.tmp", "p.h5ad.tmp", "r.json.tmp"))
    assert sorted(f.name for f in tmp_path.iterdir()) == ["model.pt", "model.pt.tmp", "p.h5ad", "p.h5ad.tmp",
                                                           "r.json", "r.json.tmp"]
    assert data.read_h5ad(tmp_path / "p.h5ad").X.shape[1] == 200 and json.loads((tmp_path / "r.json").read_text())


def test_concurrent_saves_to_one_path_all_succeed(tmp_path):
    """A fixed temporary name made the second of two runs with the same --out fail on the rename."""
    import threading
    ck, errors = {"w": torch.arange(50_000.0)}, []

    def save(i):
        try:
            for _ in range(10):
                data.write_checkpoint(tmp_path / "same.pt", {**ck, "i": i})
                data.write_h5ad(tmp_path / "same.h5ad", data.H5AD(np.full((3, 2), i, np.float32), {}, {},
                                                                  np.array(["a", "b", "c"], dtype=object),
                                                                  np.array(["g", "h"], dtype=object)))
        except Exception as e:                                          # noqa: BLE001
            errors.append(e)
    threads = [threading.Thread(target=save, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors and sorted(os.listdir(tmp_path)) == ["same.h5ad", "same.pt"]
    assert torch.load(tmp_path / "same.pt", weights_only=True)["i"] in range(4)
    assert data.read_h5ad(tmp_path / "same.h5ad").X[0, 0] in range(4)
    assert (os.stat(tmp_path / "same.pt").st_mode & 0o777) == 0o666 & ~data.UMASK   # as open() would create it


def test_a_full_disk_is_one_line_and_the_last_checkpoint_survives(sim, tmp_path, monkeypatch, capsys):
    """torch.save on a full disk raised RuntimeError '[enforce fail at inline_container.cc...] unexpected pos'."""
    flow.train(tiny_flow(sim["path"], tmp_path / "f.pt", steps=20))
    before = digest(tmp_path / "f.pt")

    def full(obj, f, *a, **kw):
        Path(f).write_bytes(b"PK\x03\x04 part of a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 4352 vs 4240")
    monkeypatch.setattr(torch, "save", full)
    err = one_error_line(capsys, lambda: flow.main(["--data", str(sim["path"]), "--n-genes", "0", "--width", "32",
                                                    "--depth", "1", "--gene-feat-dim", "4", "--batch-size", "32",
                                                    "--steps", "40", "--save-every", "20", "--warmup", "5",
                                                    "--eval-every", "1000", "--out", str(tmp_path / "f.pt"),
                                                    "--resume", "--no-progress"]))
    assert "writing" in err and "unexpected pos" in err and "disk is full" in err and "left as it was" in err
    assert digest(tmp_path / "f.pt") == before and os.listdir(tmp_path) == ["f.pt"]
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(UserError, match="No space left on device.*disk is full"):
        data.write_checkpoint(tmp_path / "f.pt", {})
    with pytest.raises(UserError, match="disk is full"):               # JSON and h5ad go through the same writer
        with data.atomic_write(tmp_path / "r.json") as tmp, open(tmp, "w") as f:
            raise OSError(28, "No space left on device")
    assert digest(tmp_path / "f.pt") == before and os.listdir(tmp_path) == ["f.pt"]


# ----------------------------------------------------------------------------- outputs: protected files, folders
def stage_runs(sim):
    """For every stage, a main() that writes its output to the given path (ckpt and data from the shared screen)."""
    ck, d = sim["ckpt"], str(sim["path"])
    return {"flow --out": lambda p: flow.main(["--data", d, "--n-genes", "0", "--steps", "2", "--out", p,
                                                "--no-progress"]),
            "rl --out": lambda p: rl.main(["--ckpt", ck, "--steps", "1", "--out", p, "--no-progress"]),
            "evaluate --out": lambda p: evaluate.main(["--ckpt", ck, "--out", p]),
            "evaluate --write-pred": lambda p: evaluate.main(["--ckpt", ck, "--write-pred", p]),
            "data --simulate": lambda p: data.main(["--simulate", p, "--sim-cells", "200", "--sim-genes", "60"])}


@pytest.mark.parametrize("stage", ["flow --out", "rl --out", "evaluate --out", "evaluate --write-pred",
                                   "data --simulate"])
def test_a_write_protected_output_is_refused_before_any_work_and_kept(sim, tmp_path, monkeypatch, capsys, stage):
    """A 444 file was silently replaced (the rename does not need write permission on the file); evaluate --out
    failed with PermissionError after the whole evaluation."""
    out = tmp_path / "kept.out"
    out.write_bytes(b"the user's file")
    out.chmod(0o444)
    for name in ("load_dataset", "simulate"):
        monkeypatch.setattr(data, name, boom)
    monkeypatch.setattr(rl, "pretrained", boom)
    err = one_error_line(capsys, lambda: stage_runs(sim)[stage](str(out)))
    assert "write-protected (mode 444)" in err and "chmod u+w" in err, err
    assert out.read_bytes() == b"the user's file" and (out.stat().st_mode & 0o777) == 0o444
    if stage == "rl --out":                                              # and its latest state, <out>_last.pt
        (tmp_path / "kept_last.pt").write_bytes(b"x")
        (tmp_path / "kept_last.pt").chmod(0o444)
        out.chmod(0o644)
        err = one_error_line(capsys, lambda: stage_runs(sim)[stage](str(out)))
        assert "--out (latest state)" in err and "write-protected" in err


@pytest.mark.parametrize("stage", ["flow --out", "rl --out", "evaluate --out", "evaluate --write-pred",
                                   "data --simulate"])
@pytest.mark.parametrize("form", ["newdir/", "", "existing dir", "newdir/."])
def test_an_output_naming_a_folder_is_refused_the_same_way_everywhere(sim, tmp_path, monkeypatch, capsys, stage,
                                                                       form):
    """`--out newdir/` and `--out ''` passed the up-front check and failed after the work ('invalid file name:
    .../newdir/.tmp'); rl.py derived <out>_last.pt from '' with a ValueError."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "existing").mkdir()
    path = {"existing dir": str(tmp_path / "existing")}.get(form, form)
    for name in ("load_dataset", "simulate"):
        monkeypatch.setattr(data, name, boom)
    monkeypatch.setattr(rl, "pretrained", boom)
    err = one_error_line(capsys, lambda: stage_runs(sim)[stage](path))
    want = {"": "is empty", "existing dir": "is a folder"}.get(form, "names a folder")
    assert f"{path!r} {want}; an output is a file" in err, err
    assert sorted(os.listdir(tmp_path)) == ["existing"] and not os.listdir(tmp_path / "existing")
    if stage == "rl --out" and form == "existing dir":                  # <out>_last.pt, named after --out
        (tmp_path / "r_last.pt").mkdir()
        err = one_error_line(capsys, lambda: stage_runs(sim)[stage](str(tmp_path / "r.pt")))
        assert f"--out (latest state) {str(tmp_path / 'r_last.pt')!r} is a folder" in err, err


def test_folders_given_as_inputs_are_named_as_folders(sim, tmp_path, capsys):
    """A folder given as --data was 'file not found'; as --ckpt, 'not found, pretrain one'."""
    err = one_error_line(capsys, lambda: flow.main(["--data", str(tmp_path), "--out", str(tmp_path / "f.pt")]))
    assert f"{tmp_path} is a folder; give the .h5ad file in it" in err
    err = one_error_line(capsys, lambda: rl.main(["--ckpt", str(tmp_path), "--out", str(tmp_path / "r.pt")]))
    assert f"--ckpt {tmp_path} is a folder" in err
    err = one_error_line(capsys, lambda: evaluate.main(["--ckpt", str(tmp_path)]))
    assert f"{tmp_path} is a folder; give the checkpoint file in it" in err
    assert os.listdir(tmp_path) == []


def test_resuming_a_run_whose_base_checkpoint_is_gone_says_so(sim, tmp_path, capsys):
    """It said 'checkpoint not found ...; train one with flow.py', which would not resume the run."""
    base = tmp_path / "base.pt"
    base.write_bytes(Path(sim["ckpt"]).read_bytes())
    rl.train(tiny_rl(sim, tmp_path / "r.pt", ckpt=str(base), steps=1))
    base.unlink()
    before = digest(tmp_path / "r_last.pt")
    err = one_error_line(capsys, lambda: rl.main(["--out", str(tmp_path / "r.pt"), "--resume", "--no-progress"]))
    assert f"--resume: {base}, the pretrained generator this run post-trains" in err and "put it back" in err
    assert "flow.py" not in err and digest(tmp_path / "r_last.pt") == before


@pytest.mark.parametrize("ext", [".gmt", ".csv"])
def test_a_gene_set_file_that_is_not_utf8_is_one_line_before_any_work(sim, tmp_path, monkeypatch, capsys, ext):
    gs = tmp_path / f"sets{ext}"
    gs.write_bytes("gene,pathway,weight\nMYC,Zelle,1\n".encode("latin-1").replace(b"Zelle", b"Z\xe9lle"))
    monkeypatch.setattr(rl, "pretrained", boom)
    monkeypatch.setattr(flow, "generate", boom)
    for run in (lambda: rl.main(["--ckpt", sim["ckpt"], "--gene-sets", str(gs), "--out", str(tmp_path / "r.pt")]),
                lambda: evaluate.main(["--ckpt", sim["ckpt"], "--gene-sets", str(gs)])):
        err = one_error_line(capsys, run)
        assert f"gene-set file {gs} is not UTF-8 text (byte" in err and "save it as UTF-8" in err, err
    ok = tmp_path / "bom.csv"                                            # UTF-8 with a byte-order mark is fine
    ok.write_bytes("\ufeffgene,pathway,weight\nMYC,Zelle,1\n".encode("utf-8"))
    assert verifiers.load_progeny(ok) == {"Zelle": {"MYC": 1.0}}


# ----------------------------------------------------------------------------- more options checked at parse time
def stage_mains(sim, tmp_path):
    """Every stage's main with extra arguments appended; nothing may start before the options are checked."""
    ck, d, out = sim["ckpt"], str(sim["path"]), str(tmp_path / "o.pt")
    return {"flow": lambda *a: flow.main(["--data", d, "--out", out, "--no-progress", *a]),
            "rl": lambda *a: rl.main(["--ckpt", ck, "--out", out, "--no-progress", *a]),
            "evaluate": lambda *a: evaluate.main(["--ckpt", ck, *a]),
            "data": lambda *a: data.main(["--data", d, *a]),
            "data --simulate": lambda *a: data.main(["--simulate", str(tmp_path / "s.h5ad"), *a])}


@pytest.mark.parametrize("stage", ["flow", "rl", "evaluate", "data", "data --simulate"])
@pytest.mark.parametrize("flag, value", [("--seed", "-1"), ("--seed", str(2 ** 32)), ("--split-seed", str(2 ** 64))])
def test_seeds_outside_0_to_2_32_are_one_line(sim, tmp_path, monkeypatch, capsys, stage, flag, value):
    if stage == "evaluate" and flag == "--split-seed":                  # the checkpoint holds its split
        pytest.skip("evaluate has no --split-seed")
    for name in ("load_dataset", "simulate", "distributed"):
        monkeypatch.setattr(data, name, boom)
    monkeypatch.setattr(flow, "load_checkpoint", boom) if stage == "flow" else None
    err = one_error_line(capsys, lambda: stage_mains(sim, tmp_path)[stage](flag, value))
    assert err == f"error: {flag} {value}: must be an integer in [0, 2^32 - 1]"
    assert not (tmp_path / "o.pt").exists() and not (tmp_path / "s.h5ad").exists()


@pytest.mark.parametrize("stage, device, cuda, want", [
    ("flow", "gpu", 0, "unknown device; use cpu, cuda, cuda:N, mps or auto"), ("flow", "cuda:0:1", 0, "unknown device"),
    ("flow", "mps", 0, "MPS (Apple GPU) is not available here"),
    ("flow", "cuda:1", 1, "1 GPU(s) visible to torch: cuda:0 to cuda:0"),
    ("flow", "cuda:1", 0, "no CUDA device visible to torch"), ("rl", "gpu", 0, "unknown device"),
    ("rl", "cuda:2", 2, "2 GPU(s) visible to torch: cuda:0 to cuda:1"), ("evaluate", "gpu", 0, "unknown device"),
    ("evaluate", "mps", 0, "MPS (Apple GPU) is not available here")])
def test_devices_that_do_not_exist_here_are_one_line(sim, tmp_path, monkeypatch, capsys, device, cuda, want, stage):
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available() and device == "mps":
        pytest.skip("this machine has MPS")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda)
    monkeypatch.setattr(data, "load_dataset", boom)
    monkeypatch.setattr(rl, "pretrained", boom)
    err = one_error_line(capsys, lambda: stage_mains(sim, tmp_path)[stage]("--device", device))
    assert err == f"error: --device {device}: {want}" or err.startswith(f"error: --device {device}: {want}"), err
    assert data.pick_device("cpu") == torch.device("cpu") and data.pick_device("meta").type == "meta"


def test_best_of_is_bounded_by_the_memory_it_would_need(sim, monkeypatch, capsys):
    """--best-of 100000 tried to allocate ~1 TB; now refused with the numbers before any generation."""
    monkeypatch.setattr(flow, "generate", boom)
    monkeypatch.setattr(os, "sysconf", lambda name: {"SC_PHYS_PAGES": 2 ** 20, "SC_PAGE_SIZE": 4096}[name])  # 4 GiB
    err = one_error_line(capsys, lambda: evaluate.main(["--ckpt", sim["ckpt"], "--best-of", "1,100000",
                                                        "--n-cells", "50"]))
    n = len(sim["ds"].split["test"]) * 50                                # cells to predict
    need = n * 100000 * 200 * 4 / 2 ** 30
    assert err == (f"error: --best-of 100000: its candidates need {need:,.1f} GiB ({n} cells x 100000 x 200 genes x "
                   f"4 bytes), more than half of this machine's 4.0 GiB; use N <= {2 ** 31 // (n * 800)} here, or "
                   "fewer cells (--n-cells)"), err
    evaluate.check_best_of([1, 2 ** 31 // (n * 800)], n, 200)            # the largest N allowed passes


def test_simulating_too_few_genes_is_one_line(tmp_path, capsys):
    err = one_error_line(capsys, lambda: data.main(["--simulate", str(tmp_path / "s.h5ad"), "--sim-genes", "1"]))
    assert err == "error: --sim-genes 1: the simulator needs at least 50 genes (its programs use 50)"
    assert not os.listdir(tmp_path)


# ----------------------------------------------------------------------------- data that cannot be used
@pytest.mark.parametrize("n_cells, n_genes, want", [(60, 0, "X is 60 cells x 0 gene(s): cells are compared over their "
                                                            "genes, which needs at least 2"),
                                                    (60, 1, "X is 60 cells x 1 gene(s): cells are compared"),
                                                    (0, 5, "X is 0 cells x 5 gene(s): the file has no cells")])
@pytest.mark.parametrize("stage", ["data", "flow"])
def test_data_without_cells_or_with_under_two_genes_is_one_line(tmp_path, capsys, n_cells, n_genes, want, stage):
    """Zero genes: data.py exited 0 and flow.py failed in argmax; one gene: 'training diverged ... lower --lr'; no
    cells: 'no control label found'."""
    labels = (["ctrl"] * 30 + ["A"] * 15 + ["B"] * 15)[:n_cells]
    p = write(tmp_path / "d.h5ad", sp.csr_matrix(np.ones((n_cells, n_genes), np.float32)), labels,
              [f"G{i}" for i in range(n_genes)])
    run = {"data": lambda: data.main(["--data", p]),
           "flow": lambda: flow.main(["--data", p, "--out", str(tmp_path / "f.pt"), "--no-progress"])}[stage]
    err = one_error_line(capsys, run)
    assert err.startswith(f"error: {p}: {want}"), err
    assert not (tmp_path / "f.pt").exists()
    rng = np.random.default_rng(0)                                        # --n-genes 1 keeps one gene of many
    p = write(tmp_path / "e.h5ad", rng.poisson(3.0, (60, 8)).astype(np.float32), labels or ["ctrl"] * 30 +
              ["A"] * 15 + ["B"] * 15, [f"G{i}" for i in range(8)])
    with pytest.raises(UserError, match="--n-genes 1 keeps 1 gene; cells are compared over their genes"):
        data.load_dataset(data.DataConfig(data=p, n_genes=1, split="random", min_cells=5))


# ----------------------------------------------------------------------------- doses
def drug_screen(path, dose_col, doses, n=12):
    """Vehicle controls and drugs D, E at three doses each (n cells per condition), doses in `dose_col`."""
    rng = np.random.default_rng(4)
    drugs = ["Vehicle"] * 3 * n + [d for d in ("D", "E") for _ in range(3 * n)]
    dose = [0.0] * 3 * n + [v for _ in ("D", "E") for v in doses for _ in range(n)]
    X = rng.poisson(3.0, (len(drugs), 10)).astype(np.float32)
    data.write_h5ad(path, data.H5AD(X=X, obs={"drug": np.array(drugs, dtype=object), dose_col: np.array(dose)}, var={},
                                    obs_names=np.array([f"cell{i}" for i in range(len(drugs))], dtype=object),
                                    var_names=np.array([f"G{i}" for i in range(10)], dtype=object)))
    return str(path)


@pytest.mark.parametrize("col, doses, unit, labels", [
    ("dose_nM", [10, 100, 1000], "nM", ["0.01", "0.1", "1"]), ("dose_uM", [10, 100, 1000], "uM", ["10", "100", "1000"]),
    ("conc_um", [0.5, 5, 50], "uM", ["0.5", "5", "50"]), ("concentration_nM", [3, 30, 300], "nM", ["0.003", "0.03", "0.3"]),
    ("Dose (mM)", [1, 2, 4], "mM", ["1000", "2000", "4000"]), ("dose_μM", [1, 2, 4], "uM", ["1", "2", "4"])])
def test_dose_columns_with_a_unit_in_their_name_are_found(tmp_path, col, doses, unit, labels):
    """`dose_nM` was not detected: no doses, 80 conditions became 29. The unit comes from the name; labels in uM."""
    p = drug_screen(tmp_path / "d.h5ad", col, doses)
    ds = data.load_dataset(data.DataConfig(data=p, n_genes=0, split="random", min_cells=5))
    assert ds.meta["dose_key"] == col and ds.meta["dose_unit"] == unit
    assert sorted(k[0] for k in ds.keys) == sorted(f"{d}@{v}" for d in "DE" for v in labels)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_nan_or_inf_dose_on_perturbed_cells_is_refused_with_the_rows(tmp_path, capsys, bad):
    """Such cells silently became a dose-less condition 'D'."""
    p = tmp_path / "d.h5ad"
    drug_screen(p, "dose", [0.1, 1, 10])
    with h5py.File(p, "r+") as f:                                        # cells 40 and 41 are D at 0.1
        f["obs/dose"][40:42] = bad
    err = one_error_line(capsys, lambda: data.main(["--data", str(p)]))
    assert ("error: columns 'drug'/'dose': 2 perturbed cell(s) have a NaN, Inf or missing dose, e.g. cell40 (row 40), "
            f"cell41 (row 41): 'D' at '{bad}'; give each a finite dose (0 = vehicle), drop those cells, or "
            "--dose-key none") == err, err
    ds = data.load_dataset(data.DataConfig(data=str(p), dose_key="none", n_genes=0, split="random", min_cells=5))
    assert sorted(k[0] for k in ds.keys) == ["D", "E"]                  # without doses, as asked
    with h5py.File(p, "r+") as f:                                        # a NaN dose on controls is fine
        f["obs/dose"][40:42] = 0.1
        f["obs/dose"][0:3] = np.nan
    assert len(data.load_dataset(data.DataConfig(data=str(p), n_genes=0, split="random", min_cells=5)).keys) == 6


# ----------------------------------------------------------------------------- raw counts or log-normalised
def counts_file(path, odd_frac, scale=1.0, seed=5):
    """Poisson counts (about 60% of entries non-zero), a fraction `odd_frac` of the non-zeros made non-integer
    (+0.5, as pseudo-counts would), times `scale`."""
    rng = np.random.default_rng(seed)
    labels = ["ctrl"] * 40 + ["A"] * 20 + ["B"] * 20
    X = rng.poisson(1.0, (len(labels), 30)).astype(np.float32) * scale
    nz = np.flatnonzero(X)
    X.flat[rng.choice(nz, int(odd_frac * len(nz)), replace=False)] += 0.5
    return write(path, sp.csr_matrix(X), labels, list(data._footprints(200)[0][:30]))   # pathway genes: rewards


@pytest.mark.parametrize("odd, scale, counts, warns", [(0.0, 1, True, False), (0.01, 1, True, True),
                                                        (0.05, 1, True, True), (0.6, 100, True, True),
                                                        (0.6, 1, False, False)])
def test_counts_are_detected_despite_a_few_non_integers(tmp_path, odd, scale, counts, warns):
    """1% non-integer values (pseudo-counts, ambient correction) made raw counts up to 2,616 'log-normalised, used
    as is'. Now: counts when >= 90% are integers or the largest value is beyond any log-normalised one, with a
    warning when the two signals disagree; mostly non-integers below 30 stay log-normalised."""
    p = counts_file(tmp_path / "c.h5ad", odd, scale)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ds = data.load_dataset(data.DataConfig(data=p, n_genes=0, split="random", min_cells=5))
    said = [str(x.message) for x in w if "integers and the largest is" in str(x.message)]
    assert ds.meta["counts"] == counts and bool(said) == warns, said
    if counts:                                                          # normalised: each cell sums to 10,000
        assert np.allclose(np.expm1(np.asarray(ds.X, np.float64)).sum(1), 1e4, rtol=1e-3)
    if warns:
        pct = float(said[0].split("%")[0][3:]) / 100                    # 'X: 99.1% of the values are integers'
        assert abs(pct - (1 - odd)) < 0.01 and "read as raw counts" in said[0] and "not integers" in said[0], said
    lazy = data.load_dataset(data.DataConfig(data=p, n_genes=0, split="random", min_cells=5, lazy=True))
    assert lazy.meta["counts"] == counts and np.array_equal(np.asarray(lazy.X), np.asarray(ds.X))


def test_every_stage_says_what_it_detected_on_its_first_line_about_the_data(sim, tmp_path, capsys):
    p = counts_file(tmp_path / "c.h5ad", 0.01)
    want = f"{p}: 80 cells x 30 genes (raw counts -> log1p(CP10k)); kept"
    with pytest.warns(UserWarning, match="some values are not integers"):
        flow.main(["--data", p, "--n-genes", "0", "--split", "random", "--min-cells", "5", "--steps", "2",
                   "--width", "16", "--depth", "1", "--out", str(tmp_path / "f.pt"), "--no-progress"])
        out = capsys.readouterr().out.splitlines()
        assert out[0].startswith(f"data {want}"), out
        evaluate.main(["--ckpt", str(tmp_path / "f.pt"), "--split", "train", "--ode-steps", "2", "--sde-noise", "0"])
        assert capsys.readouterr().out.splitlines()[0].startswith(f"data {want}")
        rl.main(["--ckpt", str(tmp_path / "f.pt"), "--out", str(tmp_path / "r.pt"), "--steps", "1", "--conds", "1",
                 "--group", "4", "--T", "2", "--eval-cells", "4", "--eval-steps", "2", "--no-progress"])
        assert capsys.readouterr().out.splitlines()[0].startswith(f"data {want}")
        data.main(["--data", p, "--min-cells", "5"])
        assert capsys.readouterr().out.splitlines()[0] == f"file        {want} 80 cells x 30 genes"
    log = tmp_path / "log.h5ad"                                          # and log-normalised data, used as is
    write(log, np.log1p(data.read_h5ad(p).X.toarray()), ["ctrl"] * 40 + ["A"] * 20 + ["B"] * 20,
          list(data.read_h5ad(p).var_names))
    data.main(["--data", str(log), "--min-cells", "5"])
    assert "(log-normalised, used as is)" in capsys.readouterr().out.splitlines()[0]


# ----------------------------------------------------------------------------- --resume keeps its options
@pytest.fixture(scope="module")
def flow2(sim, tmp_path_factory):
    """A 2-step tiny_flow checkpoint (width 32, depth 1, noise source, all genes, seed 0)."""
    out = tmp_path_factory.mktemp("flow2") / "f.pt"
    flow.train(tiny_flow(sim["path"], out, steps=2))
    return out


@pytest.mark.parametrize("flag, value, stored", [("--width", "64", "32"), ("--source", "ctrl", "'noise'"),
                                                 ("--n-genes", "50", "0"), ("--seed", "3", "0")])
def test_resume_with_another_model_or_data_option_is_refused(sim, flow2, tmp_path, capsys, flag, value, stored):
    """--resume with another --width silently kept the checkpoint's width."""
    (tmp_path / "f.pt").write_bytes(flow2.read_bytes())
    args = ["--data", str(sim["path"]), "--out", str(tmp_path / "f.pt"), "--resume", "--steps", "4", "--no-progress"]
    err = one_error_line(capsys, lambda: flow.main([*args, flag, value]))
    name = flag[2:].replace("-", "_")
    assert err == (f"error: {flag} {value if flag != '--source' else repr(value)}: --resume: {tmp_path / 'f.pt'} "
                   f"continues a run with {name} = {stored}; drop the option, or start a new run (another --out)"), err
    assert digest(tmp_path / "f.pt") == digest(flow2)
    if flag == "--width":                                                # the stored value, or a free option: fine
        flow.main([*args, "--width", "32", "--lr", "1e-3"])
        assert torch.load(tmp_path / "f.pt", weights_only=True)["step"] == 4


# ----------------------------------------------------------------------------- the pretraining cache
def test_the_cached_pretrained_generator_is_not_reused_after_the_data_changed(sim, tmp_path, monkeypatch):
    """rl.py without --ckpt reused runs/flow_<name>_<hash>.pt after the data file was rewritten in place (the
    pretrained row's energy went from 0.6 to 4.35): the key now covers the file's size, mtime and first MiB."""
    monkeypatch.chdir(tmp_path)
    made = []
    monkeypatch.setattr(flow, "train", lambda fcfg: (made.append(fcfg.out), Path(fcfg.out).touch(), fcfg.out)[2])
    monkeypatch.setattr(data, "read_checkpoint", lambda path: {"step": 5})   # a finished 5-step pretraining
    d = tmp_path / "d.h5ad"
    d.write_bytes(Path(sim["path"]).read_bytes())
    cfg = rl.RLConfig(data=str(d), pretrain_steps=5, progress=False)
    a = rl.pretrained(cfg)
    assert rl.pretrained(cfg) == a and made == [a]                       # unchanged: reused
    data.write_h5ad(d, data.simulate(n_cells=1500, n_genes=200, n_singles=10, n_combos=8, seed=1))   # in place
    b = rl.pretrained(cfg)
    assert b != a and made == [a, b] and Path(b).name.startswith("flow_d_")
    os.utime(d, ns=(1, 1))                                               # touched only: retrained, to be safe
    assert rl.pretrained(cfg) not in (a, b) and len(made) == 3
    sim_file = tmp_path / "builtin.h5ad"                                 # the built-in simulator's cached file
    sim_file.write_bytes(Path(sim["path"]).read_bytes())
    monkeypatch.setattr(data, "builtin_path", lambda kind="genetic": str(sim_file))
    c = rl.pretrained(rl.RLConfig(pretrain_steps=5, progress=False))
    sim_file.write_bytes(d.read_bytes())
    assert rl.pretrained(rl.RLConfig(pretrain_steps=5, progress=False)) != c and len(made) == 5


# ----------------------------------------------------------------------------- labels
@pytest.mark.parametrize("test", ["ctrl", "CTRL", "ctrl+ctrl", "A,ctrl"])
def test_test_naming_the_control_is_one_line(sim, tmp_path, monkeypatch, capsys, test):
    """--test ctrl was silently ignored and the default split's test conditions were used."""
    monkeypatch.setattr(flow, "VelocityField", boom)
    g = sim["ds"].split["test"][0][0].split("+")[0]
    err = one_error_line(capsys, lambda: flow.main(["--data", str(sim["path"]), "--test", test.replace("A", g),
                                                    "--out", str(tmp_path / "f.pt"), "--no-progress"]))
    assert err == f"error: --test {test.split(',')[-1]!r} is the control ('ctrl'); --test names perturbed conditions " \
                  "to hold out (A, A+B, D@0.1)", err
    p = drug_screen(tmp_path / "d.h5ad", "dose", [0.1, 1, 10])          # a drug screen's control, Vehicle
    with pytest.raises(UserError, match="--test 'Vehicle' is the control \\('Vehicle'\\)"):
        data.load_dataset(data.DataConfig(data=p, test="Vehicle", n_genes=0, min_cells=5))
    assert not (tmp_path / "f.pt").exists()


def test_a_pipe_label_among_plus_labels_is_a_combination_when_its_parts_are_known(tmp_path):
    """'DUSP6|DUSP4' among '+' labels became one new single 'DUSP6|DUSP4' though the README says A|B is parsed.
    Now '|' (or ';') also separates when every part of every label holding it is a label or a gene; a label whose
    parts are not is kept whole, with a warning."""
    rng = np.random.default_rng(6)
    genes = ["DUSP4", "DUSP6", "MYC", "FOS"] + [f"G{i}" for i in range(8)]
    labels = ["ctrl"] * 40 + [l for l in ("DUSP4", "DUSP6", "MYC", "MYC+FOS", "DUSP6|DUSP4") for _ in range(12)]
    p = write(tmp_path / "mix.h5ad", rng.poisson(3.0, (len(labels), 12)).astype(np.float32), labels, genes)
    ds = data.load_dataset(data.DataConfig(data=p, n_genes=0, test="DUSP4+DUSP6", min_cells=5))
    assert ds.meta["sep"] == "+|" and sorted(k[0] for k in ds.keys) == ["DUSP4", "DUSP4+DUSP6", "DUSP6", "FOS+MYC",
                                                                       "MYC"]
    assert ds.split["test"] == [("DUSP4+DUSP6", "all")] and ds.meta["labels"]["DUSP4+DUSP6"] == "DUSP6|DUSP4"
    assert ds.components == ["DUSP4", "DUSP6", "FOS", "MYC"]
    assert data.detect_sep(["ctrl", "A", "B", "A+B", "A;B"], "ctrl") == "+;"
    with pytest.warns(UserWarning, match=r"1 label\(s\) hold '\|' or ';' but not every part is a label or a gene, "
                                         r"so each is read as one perturbation: \['X\|Y'\]"):
        assert data.detect_sep(["ctrl", "A", "A+B", "X|Y"], "ctrl") == "+"
    assert data.parse_condition("DUSP6|DUSP4", "ctrl", "+|") == ("DUSP4", "DUSP6")


# ----------------------------------------------------------------------------- SIGTERM, as batch schedulers send it
def test_sigterm_to_a_running_rl_process_saves_a_resumable_state(sim, tmp_path):
    """SIGTERM (sent by batch schedulers before they kill a job) is handled like Ctrl-C: rl.py writes the state after
    the last completed step to <out>_last.pt and exits 130, no temporary file left; --resume then ends
    bit-identical to an uninterrupted run of the same length."""
    import signal
    out = tmp_path / "s.pt"
    cmd = [sys.executable, "-u", "rl.py", "--ckpt", sim["ckpt"], "--out", str(out), "--steps", "1000", "--conds", "2",
           "--group", "4", "--T", "3", "--eval-every", "1000", "--eval-cells", "8", "--eval-steps", "4", "--log-every",
           "1", "--no-progress"]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        for line in p.stdout:                                            # once the first step is done
            if line.startswith("step    1 "):
                break
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=120)
    finally:
        p.kill() if p.poll() is None else None
    k = torch.load(tmp_path / "s_last.pt", weights_only=True)["step"]
    assert p.returncode == 130 and f"saved the state after step {k} to {tmp_path / 's_last.pt'}" in err, err
    assert k < 1000 and not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    rl.train(tiny_rl(sim, out, steps=k + 2, eval_every=1000, resume=True))
    rl.train(tiny_rl(sim, tmp_path / "ref.pt", steps=k + 2, eval_every=1000))
    same_state(*(torch.load(tmp_path / f, weights_only=True) for f in ("s_last.pt", "ref_last.pt")))


@pytest.mark.parametrize("stage", ["rl", "flow"])
def test_sigterm_during_a_save_leaves_no_temp_file_and_resumes_exactly(sim, rl_ref, tmp_path, monkeypatch, stage):
    """A real SIGTERM to this process in the middle of torch.save (half the file written): the temporary file is
    removed, the previous file kept, and the run resumes exactly."""
    import signal
    real, hits, before = torch.save, [], signal.getsignal(signal.SIGTERM)

    def save(obj, f, *a, **kw):
        if not hits and ("_last.pt." in str(f) if stage == "rl" else str(f).endswith(".tmp") and "b.pt" in str(f)):
            hits.append(f)
            Path(f).write_bytes(b"PK\x03\x04 half a checkpoint")
            os.kill(os.getpid(), signal.SIGTERM)                        # raises KeyboardInterrupt here
        return real(obj, f, *a, **kw)
    if stage == "flow":
        flow.train(tiny_flow(sim["path"], tmp_path / "a.pt"))
    monkeypatch.setattr(torch, "save", save)
    with data.sigterm_as_interrupt(), pytest.raises(KeyboardInterrupt):
        rl.train(tiny_rl(sim, tmp_path / "c.pt")) if stage == "rl" else flow.train(tiny_flow(sim["path"],
                                                                                              tmp_path / "b.pt"))
    monkeypatch.undo()
    assert hits and not os.path.exists(hits[0]) and not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    if stage == "rl":                                                   # the first save of the latest state: step 2
        assert torch.load(tmp_path / "c_last.pt", weights_only=True)["step"] == 1
        rl.train(tiny_rl(sim, tmp_path / "c.pt", resume=True))
        same_state(torch.load(tmp_path / "c_last.pt", weights_only=True), rl_ref["last"])
    else:                                                               # the step-20 save failed: nothing on disk
        assert sorted(os.listdir(tmp_path)) == ["a.pt"]
    assert signal.getsignal(signal.SIGTERM) == before                   # the handler is put back


def test_sigterm_under_the_cli_exits_130_with_the_resume_hint(monkeypatch, capsys):
    import signal
    import time
    monkeypatch.setattr(flow, "train", lambda cfg: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(30)))
    with pytest.raises(SystemExit) as e:
        data.cli(lambda: flow.main(["--out", "x.pt"]))
    assert e.value.code == 130 and "continue from the last checkpoint in x.pt" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:                                 # a stage without its own hint
        data.cli(lambda: os.kill(os.getpid(), signal.SIGTERM) or time.sleep(30))
    assert e.value.code == 130 and capsys.readouterr().err.strip() == "terminated (SIGTERM)"
