"""Hostile and malformed inputs (issue 26), one test per class, each file built here with h5py: the reader checks a
file's structure before using it (sparse pointers and indices, declared sizes, dtypes, obs/var lengths, categorical
codes, links and virtual datasets), says what it guessed (control spellings, dropped labels and cell lines, missing
gene symbols), refuses data that cannot train; checkpoints record their data file and say what they are; counts
beyond memory are refused at parse time. Never a traceback, a crash, a hang or a silent misread."""
import os
import shlex
import warnings
import signal
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.sparse as sp
import torch

torch.set_num_threads(1)
import data  # noqa: E402
import evaluate  # noqa: E402
import flow  # noqa: E402
import rl  # noqa: E402
import verifiers  # noqa: E402


# ----------------------------------------------------------------------------- helpers
def h5ad(tmp_path, labels=None, X=None, name="d.h5ad", genes=8, var=None, var_names=None, **obs):
    """60 cells (30 ctrl, 15 A, 15 B) x 8 genes of Poisson counts, CSR, written by data.write_h5ad; obs columns as
    given. Tests then break it with h5py."""
    labels = ["ctrl"] * 30 + ["A"] * 15 + ["B"] * 15 if labels is None else labels
    X = sp.csr_matrix(np.random.default_rng(0).poisson(2.0, (len(labels), genes)).astype(np.float32)) if X is None else X
    path = tmp_path / name
    data.write_h5ad(path, data.H5AD(
        X=X, obs={"condition": np.array(labels, dtype=object), **{k: np.array(v, dtype=object) for k, v in obs.items()}},
        var=var or {}, obs_names=np.array([f"c{i}" for i in range(len(labels))], dtype=object),
        var_names=np.array(var_names or [f"G{i}" for i in range(X.shape[1])], dtype=object)))
    return str(path)


def replace(path, key, **kw):
    """Rewrite dataset `key` of the file (create_dataset keywords: data=, shape=, dtype=, ...)."""
    with h5py.File(path, "r+") as f:
        del f[key]
        f.create_dataset(key, **kw)


def one_error_line(capsys, run):
    """run through data.cli: exit code 2, one `error:` line (the last on stderr), no traceback; returns it."""
    with pytest.raises(SystemExit) as e:
        data.cli(run)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].startswith("error: ") and sum(l.startswith("error") for l in err) == 1 \
        and not any("Traceback" in l for l in err), (e.value.code, err)
    return err[-1]


def summary(capsys, *argv):
    """data.py --data ... through data.cli: (stdout lines, warning lines)."""
    with warnings.catch_warnings(record=True) as rec:                   # pytest records warnings: they reach us here
        data.cli(lambda: data.main(["--min-cells", "5", *argv]))
    cap = capsys.readouterr()
    return cap.out.splitlines(), [l for l in cap.err.splitlines() if l.startswith("warning: ")] + [
        f"warning: {w.message}" for w in rec if issubclass(w.category, UserWarning)]


def isolated(tmp_path, argv, timeout=60):
    """data.py's main through data.cli in a forked child, so that a segmentation fault or a hang (the code before
    issue 26) fails this test instead of killing or stalling pytest: (exit code, or 'hung'; stderr lines)."""
    err = tmp_path / "stderr.txt"
    pid = os.fork()
    if pid == 0:                                                         # the child: never returns
        code = 1
        try:
            sys.stdout, sys.stderr = open(os.devnull, "w"), open(err, "w")
            data.cli(lambda: data.main(["--min-cells", "5", *argv]))
            code = 0
        except SystemExit as e:
            code = e.code
        finally:
            sys.stderr.flush()
            os._exit(code)
    end = time.time() + timeout
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.time() > end:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "hung", []
        time.sleep(0.01)
    return os.waitstatus_to_exitcode(done[1]), err.read_text().strip().splitlines() if err.exists() else []


def boom(*a, **kw):
    raise AssertionError("work started before the problem was caught")


# ----------------------------------------------------------------------------- sparse structure (memory safety)
@pytest.mark.parametrize("bad", [2 ** 31 - 2, -1, 8])
@pytest.mark.parametrize("fmt, lazy", [("csr", False), ("csr", True), ("csc", False)])
def test_sparse_indices_out_of_range_are_one_line(tmp_path, bad, fmt, lazy):
    """A column index of 2^31-2 was a segmentation fault (exit 139), --lazy too; one just past the last gene or a
    negative one was accepted or not from run to run (memory the process does not own)."""
    X = np.random.default_rng(0).poisson(2.0, (60, 8)).astype(np.float32)
    p = h5ad(tmp_path, X=sp.csr_matrix(X) if fmt == "csr" else sp.csc_matrix(X))
    n = 8 if fmt == "csr" else 60                                        # the other axis
    bad = n if bad == 8 else bad
    with h5py.File(p, "r+") as f:
        f["X/indices"][3] = bad
    code, err = isolated(tmp_path, ["--data", p] + ["--lazy"] * lazy)
    assert code == 2 and len(err) == 1 and f"/X/indices holds {min(bad, 0)} to {max(bad, n - 1)}, not indices within " \
        f"[0, {n - 1}]" in err[0], (code, err)


@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize("kind, want", [
    ("falls", "/X/indptr holds 0 to 415 or falls, not pointers rising within [0, 415]"),
    ("too short", "/X is a csr_matrix with 56 pointers for 60 rows (CSC: columns), from [0] to [381]"),
    ("past the data", "from [0] to [425], and 415 indices for 415 values; it has one pointer more"),
    ("not from 0", "from [5] to [415]")])
def test_sparse_pointers_that_fall_are_short_or_past_the_data_are_one_line(tmp_path, capsys, lazy, kind, want):
    p = h5ad(tmp_path)
    with h5py.File(p, "r+") as f:
        ptr = f["X/indptr"][...]
    if kind == "falls":
        ptr[5] = ptr[7] + 3
    elif kind == "past the data":
        ptr[-1] += 10
    elif kind == "not from 0":
        ptr[0] = 5
    replace(p, "X/indptr", data=ptr[:-5] if kind == "too short" else ptr)
    err = one_error_line(capsys, lambda: data.main(["--data", p, "--min-cells", "5"] + ["--lazy"] * lazy))
    assert want in err, err


@pytest.mark.parametrize("where", ["X dense", "X sparse shape", "obs column", "X dense lazy"])
def test_terabyte_shapes_and_gzip_bombs_are_refused_before_reading(tmp_path, capsys, where):
    """Declared shapes of terabytes, compressed to a few kB, were read (MemoryError) before any size check."""
    p = h5ad(tmp_path, cell_type=["l1"] * 60)
    huge = dict(dtype=np.float32, compression="gzip", chunks=True)
    if where.startswith("X dense"):
        replace(p, "X", shape=(60, 10 ** 10), **huge)
    elif where == "X sparse shape":
        with h5py.File(p, "r+") as f:
            f["X"].attrs["shape"] = np.array([60, 10 ** 12])
    else:
        replace(p, "obs/cell_type", shape=(10 ** 11,), **huge)
    assert os.path.getsize(p) < 10 ** 6
    err = one_error_line(capsys, lambda: data.main(["--data", p] + ["--lazy"] * where.endswith("lazy")))
    if where == "X sparse shape":
        assert "/X has shape (60, 1000000000000), which does not match 60 obs x 8 var" in err, err
    else:
        assert "more than this machine's" in err and "however small the file" in err, err
        assert ("use --lazy or subset" in err) == (where == "X dense"), err


@pytest.mark.parametrize("what", ["dense strings", "sparse strings", "float indices"])
def test_x_that_is_not_numbers_is_one_line(tmp_path, capsys, what):
    p = h5ad(tmp_path)
    if what == "dense strings":
        replace(p, "X", data=np.full((60, 8), "a", dtype=object), dtype=h5py.string_dtype())
    elif what == "sparse strings":
        with h5py.File(p, "r+") as f:
            n = len(f["X/data"])
        replace(p, "X/data", data=np.full(n, "1", dtype=object), dtype=h5py.string_dtype())
    else:
        with h5py.File(p, "r+") as f:
            idx = f["X/indices"][...]
        replace(p, "X/indices", data=idx.astype(np.float64))
    err = one_error_line(capsys, lambda: data.main(["--data", p]))
    assert "X holds numbers (sparse: 1-D data, integer indices and pointers); try --layer" in err, err


# ----------------------------------------------------------------------------- obs and var
@pytest.mark.parametrize("code", [-2, 3, 100])
def test_categorical_codes_out_of_range_are_one_line(tmp_path, capsys, code):
    """Code -2 silently became the last category; a code past the categories was an IndexError."""
    p = h5ad(tmp_path)
    with h5py.File(p, "r+") as f:
        f["obs/condition/codes"][0] = code
    err = one_error_line(capsys, lambda: data.main(["--data", p]))
    assert f"/obs/condition: categorical code {code} is outside [-1, 3)" in err, err


@pytest.mark.parametrize("kind", ["categorical without categories", "obs a plain array"])
def test_a_categorical_without_categories_or_obs_as_a_plain_array_is_one_line(tmp_path, capsys, kind):
    """A categorical group without its categories was a KeyError; obs stored as a plain dataset a TypeError."""
    p = h5ad(tmp_path)
    with h5py.File(p, "r+") as f:
        if kind == "obs a plain array":
            del f["obs"]
            f["obs"] = np.arange(60)
        else:
            del f["obs/condition/categories"]
    err = one_error_line(capsys, lambda: data.main(["--data", p]))
    assert ("/obs/condition is a categorical without categories; rewrite it with anndata" if kind.startswith("cat")
            else "/obs is a int64 array of shape (60,), not a dataframe (a group of columns, or an old anndata's "
            "compound table)") in err, err


def test_a_category_listed_twice_is_refused_not_merged(tmp_path, capsys):
    """Two categories with the same text made two perturbations one, without a word."""
    p = h5ad(tmp_path)
    with h5py.File(p, "r+") as f:
        cats = f["obs/condition/categories"].asstr()[...]
    assert list(cats) == ["A", "B", "ctrl"]
    replace(p, "obs/condition/categories", data=np.array(["B", "B", "ctrl"], dtype=object), dtype=h5py.string_dtype())
    err = one_error_line(capsys, lambda: data.main(["--data", p]))
    assert "/obs/condition: category 'B' is listed more than once, merging labels" in err, err


@pytest.mark.parametrize("bad", [0.5, float("nan")])
def test_non_integer_categorical_codes_are_refused_not_truncated(tmp_path, capsys, bad):
    """Float codes were cast to integers: a control cell of code 0.5 became category 0 ('A')."""
    p = h5ad(tmp_path)
    with h5py.File(p, "r+") as f:
        codes = f["obs/condition/codes"][...].astype(np.float32)
    codes[3] = bad
    replace(p, "obs/condition/codes", data=codes)
    err = one_error_line(capsys, lambda: data.main(["--data", p]))
    assert f"/obs/condition: categorical code {bad} is float32, not an integer; rewrite it" in err, err
    codes[3] = 2.0                                                       # whole numbers read as they are
    replace(p, "obs/condition/codes", data=codes)
    out, _ = summary(capsys, "--data", p)
    assert "covariates  all (30 controls)" in out, out


def test_an_obs_column_of_another_length_or_one_that_is_not_there_is_one_line(tmp_path, capsys):
    """A column shorter than X shifted every label; a column-order naming a column that does not exist was a
    KeyError."""
    p = h5ad(tmp_path, cell_type=["l1"] * 60)
    replace(p, "obs/cell_type", data=np.array(["l1"] * 50, dtype=object), dtype=h5py.string_dtype())
    err = one_error_line(capsys, lambda: data.main(["--data", p]))
    assert "/obs column 'cell_type' has shape (50,), not one value a row (60)" in err, err
    with h5py.File(p, "r+") as f:
        del f["obs/cell_type"]
    err = one_error_line(capsys, lambda: data.main(["--data", p]))
    assert "/obs: its column-order names ['cell_type'], which it does not hold" in err, err


@pytest.mark.parametrize("kind", ["external X", "soft obs column", "virtual X, source gone", "external var"])
def test_links_and_virtual_datasets_are_refused_naming_what_they_point_to(tmp_path, capsys, kind):
    """X as an external link to another file was read without a word; a virtual dataset whose source is gone read
    as zeros and trained."""
    other, p = h5ad(tmp_path, name="other.h5ad"), h5ad(tmp_path)
    with h5py.File(p, "r+") as f:
        if kind == "external X":
            del f["X"]
            f["X"] = h5py.ExternalLink(other, "/X")
        elif kind == "external var":
            del f["var"]
            f["var"] = h5py.ExternalLink(other, "/var")
        elif kind == "soft obs column":
            f["obs/cond2"] = h5py.SoftLink("/obs/condition")
        else:
            with h5py.File(tmp_path / "src.h5", "w") as s:
                s["x"] = np.ones((60, 8), np.float32)
            layout = h5py.VirtualLayout(shape=(60, 8), dtype=np.float32)
            layout[:] = h5py.VirtualSource(str(tmp_path / "src.h5"), "x", shape=(60, 8))
            del f["X"]
            f.create_virtual_dataset("X", layout, fillvalue=0)
    if kind.startswith("virtual"):
        os.remove(tmp_path / "src.h5")
    err = one_error_line(capsys, lambda: data.main(["--data", p]))
    want = {"external X": f"X is a link reading {other}:/X", "external var": f"var is a link reading {other}:/var",
            "soft obs column": "obs/cond2 is a link reading /obs/condition;",
            "virtual X, source gone": f"X is a virtual dataset reading {tmp_path / 'src.h5'}:x"}[kind]
    assert want in err and "neither is followed" in err, err


def test_a_link_to_a_named_pipe_is_refused_without_opening_it(tmp_path):
    """It hung forever."""
    p = h5ad(tmp_path)
    os.mkfifo(tmp_path / "pipe")
    with h5py.File(p, "r+") as f:                                        # what the reader reads
        del f["obs/condition/categories"]
        f["obs/condition/categories"] = h5py.ExternalLink(str(tmp_path / "pipe"), "/x")
    code, err = isolated(tmp_path, ["--data", p], timeout=30)
    assert code == 2 and len(err) == 1 and f"is a link reading {tmp_path / 'pipe'}:/x" in err[0], (code, err)


# ----------------------------------------------------------------------------- what the reader guessed, it says
def test_empty_whitespace_and_missing_labels_are_dropped_never_control(tmp_path, capsys):
    """Empty or whitespace labels became control cells (40 perturbed cells joined the controls)."""
    labels = ["ctrl"] * 30 + ["A"] * 15 + ["B"] * 15 + [""] * 6 + ["  "] * 5 + [None] * 4 + ["nan"] * 3
    p = h5ad(tmp_path, labels=labels)
    out, warn = summary(capsys, "--data", p)
    assert "covariates  all (30 controls)" in out and "conditions  2 (condition, covariate) pairs" in "\n".join(out)
    assert warn == ["warning: dropping 18 cells with no value (missing, NaN, empty) in 'condition'"], warn


@pytest.mark.parametrize("given", [None, "ctrl"])
def test_two_control_spellings_are_both_control_and_the_log_says_so(tmp_path, capsys, given):
    """A second control name the tool itself lists ('non-targeting', another case of 'ctrl') was trained as a
    perturbation, halving the controls. --control names one label: the others stay perturbations, said too."""
    labels = ["ctrl"] * 20 + ["non-targeting"] * 15 + ["Ctrl"] * 5 + ["A"] * 20 + ["B"] * 20
    p = h5ad(tmp_path, labels=labels, cell_type=["l1"] * 20 + ["l2"] * 20 + (["l1"] * 10 + ["l2"] * 10) * 2)
    out, warn = summary(capsys, "--data", p, *(["--control", given] if given else []))
    if given is None:
        assert "covariates  l1 (20 controls), l2 (20 controls)" in out, out
        assert warn == ["warning: 3 control labels in 'condition', all read as control: l1: 'ctrl' 20; l2: 'Ctrl' 5, "
                        "'non-targeting' 15"], warn
    else:
        assert "covariates  l1 (20 controls), l2 (5 controls)" in out, out       # 'Ctrl' is 'ctrl' in any case
        assert warn[0] == "warning: --control 'ctrl' names one label; ['non-targeting'], spelled like " \
                          "controls, stay perturbations", warn


def test_control_naming_one_spelling_leaves_control_and_ctrl_as_conditions(tmp_path, capsys):
    """--control DMSO merged the file's 'control' and 'ctrl' cells into the controls without a word. README: every
    control spelling is control unless --control names one; then the others are conditions, and one warning says so."""
    labels = ["DMSO"] * 30 + ["control"] * 10 + ["ctrl"] * 10 + ["A"] * 15 + ["B"] * 15
    p = h5ad(tmp_path, labels=labels)
    out, warn = summary(capsys, "--data", p, "--control", "DMSO", "--split", "random")
    assert "covariates  all (30 controls)" in out and "conditions  4 (condition, covariate) pairs" in "\n".join(out)
    assert warn == ["warning: --control 'DMSO' names one label; ['control', 'ctrl'], spelled like controls, stay "
                    "perturbations"], warn
    with pytest.warns(UserWarning, match="stay perturbations"):
        ds = data.load_dataset(data.DataConfig(data=p, control="DMSO", n_genes=0, min_cells=5, split="random",
                                               test="ctrl"))
    assert [k[0] for k in ds.keys] == ["A", "B", "control", "ctrl"] and ds.split["test"] == [("ctrl", "all")]
    assert len(ds.ctrl_idx["all"]) == 30
    out, warn = summary(capsys, "--data", p)                            # not named: every spelling is control
    assert "covariates  all (50 controls)" in out and len(warn) == 1 and "3 control labels" in warn[0], (out, warn)


def test_a_missing_cell_line_is_dropped_not_a_cell_line_named_none(tmp_path, capsys):
    p = h5ad(tmp_path, cell_type=["l1"] * 25 + [None] * 5 + ["l1"] * 12 + [np.nan] * 3 + ["l1"] * 15)
    out, warn = summary(capsys, "--data", p)
    assert "covariates  l1 (25 controls)" in out and warn == [
        "warning: dropping 8 cells with no value (missing, NaN, empty) in 'cell_type'"], (out, warn)
    p = h5ad(tmp_path, cell_type=[None] * 60, name="none.h5ad")
    err = one_error_line(capsys, lambda: data.main(["--data", p]))
    assert "covariate column 'cell_type' has no value in any cell" in err, err


def test_empty_gene_symbols_fall_back_to_ids_and_empty_names_are_refused(tmp_path, capsys):
    """Empty symbols became genes named '', '-1', '-2', ..."""
    ids = [f"ENSG{i:011d}" for i in range(8)]
    sym = np.array(["A", "", " ", None, "E", "F", "G", "H"], dtype=object)
    p = h5ad(tmp_path, var={"gene_name": sym}, var_names=ids)
    with pytest.warns(UserWarning, match=r"3 gene\(s\) have no symbol in 'gene_name'; using their var names"):
        ds = data.load_dataset(data.DataConfig(data=p, n_genes=0, min_cells=5, split="random"))
    assert ds.genes == ["A", ids[1], ids[2], ids[3], "E", "F", "G", "H"]
    p = h5ad(tmp_path, var_names=["G0", "", "G2", " ", "G4", "G5", "G6", "G7"], name="e.h5ad")
    err = one_error_line(capsys, lambda: data.main(["--data", p]))
    assert "2 gene(s) have no name (e.g. var row 1)" in err, err


def test_gene_names_that_collide_with_a_suffix_are_made_unique_with_a_warning(tmp_path):
    """var names ID1-1, ID1, ID1 became ID1-1, ID1, ID1-1: two genes of one name, silently."""
    p = h5ad(tmp_path, var_names=["G0", "ID1-1", "ID1", "ID1", "G4", "G4", "G6", "G7"])
    with pytest.warns(UserWarning, match=r"^2 duplicate gene name\(s\) renamed to be unique, e\.g\. ID1 \(var row "
                                         r"3\) -> ID1-2$"):
        ds = data.load_dataset(data.DataConfig(data=p, n_genes=0, min_cells=5, split="random"))
    assert ds.genes == ["G0", "ID1-1", "ID1", "ID1-2", "G4", "G4-1", "G6", "G7"]


@pytest.mark.parametrize("label", ["A@x", "A@", "A\x1fB", "A\tB"])
def test_labels_with_at_text_or_a_control_character_are_one_line(tmp_path, capsys, label):
    p = h5ad(tmp_path, labels=["ctrl"] * 30 + [label] * 15 + ["B"] * 15)
    err = one_error_line(capsys, lambda: data.main(["--data", p]))
    assert ("hold '@', which marks doses ('D@0.1')" if "@" in label else "hold a control character") in err, err
    p = h5ad(tmp_path, cell_type=["l\x1f1"] * 60, name="c.h5ad")
    assert "'cell_type': 1 label(s) hold a control character" in one_error_line(capsys, lambda: data.main(["--data", p]))


# ----------------------------------------------------------------------------- data that cannot train
def test_all_zero_expression_or_all_zero_controls_are_refused(tmp_path, capsys):
    p = h5ad(tmp_path, X=sp.csr_matrix((60, 8), dtype=np.float32))
    err = one_error_line(capsys, lambda: data.main(["--data", p]))
    assert "X is all zeros over the 8 genes kept" in err, err
    X = np.random.default_rng(0).poisson(2.0, (60, 8)).astype(np.float32)
    X[:15] = 0                                                           # the controls of l2
    p = h5ad(tmp_path, X=sp.csr_matrix(X), cell_type=["l2"] * 15 + ["l1"] * 45, name="z.h5ad")
    err = one_error_line(capsys, lambda: data.main(["--data", p]))
    assert "the control cells of 'l2' are all zero over the 8 genes kept" in err, err


def test_n_genes_below_the_targets_keeps_every_target(tmp_path):
    """--n-genes 2 kept 2 of 5 targets (README: targets are always kept)."""
    labels = ["ctrl"] * 30 + [f"G{i}" for i in range(5) for _ in range(10)]
    p = h5ad(tmp_path, labels=labels, genes=12)
    with pytest.warns(UserWarning, match="--n-genes 2 is below the 5 perturbation targets: keeping all 5"):
        ds = data.load_dataset(data.DataConfig(data=p, n_genes=2, min_cells=5, split="random"))
    assert ds.genes == [f"G{i}" for i in range(5)]


def test_a_dose_that_overflows_in_um_is_refused_not_dose_less(tmp_path, capsys):
    labels = ["Vehicle"] * 30 + ["D"] * 30
    p = h5ad(tmp_path, labels=labels, **{"Dose (mM)": [0.0] * 30 + [1.0] * 15 + [1e306] * 15})
    replace(p, "obs/Dose (mM)", data=np.array([0.0] * 30 + [1.0] * 15 + [1e306] * 15))   # a numeric dose column
    err = one_error_line(capsys, lambda: data.main(["--data", p]))
    assert "the dose 1e+306 mM of 'D' is inf or 0 in uM: --dose-unit?" in err, err


@pytest.mark.parametrize("weight", ["nan", "inf"])
def test_a_nan_gene_set_weight_is_refused_at_load_with_the_row(tiny_screen, tmp_path, capsys, weight):
    """It gave NaN rewards that the error then blamed on 'constant genes'."""
    gs = tmp_path / "sets.csv"
    gs.write_text(f"gene,pathway,weight\nMYC,P,1\nFOS,P,{weight}\n")
    err = one_error_line(capsys, lambda: evaluate.main(["--ckpt", tiny_screen["ckpt"], "--gene-sets", str(gs)]))
    assert f"{gs} line 3: expected gene,pathway,weight with a finite numeric weight" in err, err
    with pytest.raises(data.UserError, match="line 3"):
        verifiers.load_gene_sets(gs)


# ----------------------------------------------------------------------------- checkpoints and paths
def edited(tiny_screen, tmp_path, edit, name="e.pt"):
    ck = torch.load(tiny_screen["ckpt"], weights_only=True)
    edit(ck)
    torch.save(ck, tmp_path / name)
    return str(tmp_path / name)


def small_flow(data_path, out, **kw):
    return flow.FlowConfig(**{**dict(data=data_path, n_genes=0, width=16, depth=1, steps=4, batch_size=16, warmup=1,
                                     eval_every=1000, save_every=2, out=str(out), progress=False, gene_feat_dim=0,
                                     eval_cells=8), **kw})


def test_data_paths_are_stored_absolute_and_other_data_is_said(tiny_screen, tmp_path, monkeypatch, capsys):
    """A relative --data was stored as written, so evaluate.py run from another folder scored another file and
    printed the relative name. Now the checkpoint stores the absolute path and the file's identity; a later stage
    given another file warns."""
    (tmp_path / "a").mkdir()
    d = tmp_path / "a" / "d.h5ad"
    d.write_bytes(Path(tiny_screen["path"]).read_bytes())
    monkeypatch.chdir(tmp_path / "a")
    flow.train(small_flow("d.h5ad", "f.pt"))
    ck = torch.load(tmp_path / "a" / "f.pt", weights_only=True)
    assert ck["config"]["data"] == str(d) and ck["data_id"] == data.file_identity(d)
    monkeypatch.chdir(tmp_path)                                          # another folder
    monkeypatch.setattr(flow, "generate", boom)
    with pytest.raises(AssertionError, match="work started"):
        evaluate.main(["--ckpt", "a/f.pt", "--sde-noise", "0"])
    assert capsys.readouterr().out.startswith(f"data {d}: ")
    os.utime(d, ns=(1, 1))                                               # the same path, another file
    with pytest.raises(AssertionError, match="work started"), pytest.warns(
            UserWarning, match=f"{d} is not the data file the checkpoint was trained on"):
        evaluate.main(["--ckpt", "a/f.pt", "--sde-noise", "0"])


def test_flow_resume_refuses_another_data_file(tiny_screen, tmp_path, capsys):
    """It continued on another data file (README says resume refuses it)."""
    d = tmp_path / "d.h5ad"
    d.write_bytes(Path(tiny_screen["path"]).read_bytes())
    flow.train(small_flow(str(d), tmp_path / "f.pt", stop_at=2))
    data.write_h5ad(d, data.read_h5ad(d))                                 # rewritten in place
    err = one_error_line(capsys, lambda: flow.main(["--data", str(d), "--n-genes", "0", "--width", "16", "--depth",
                                                    "1", "--steps", "4", "--out", str(tmp_path / "f.pt"), "--resume",
                                                    "--gene-feat-dim", "0", "--no-progress"]))
    assert f"--resume: {d} is not the data file the checkpoint was trained on (a run keeps its data)" in err, err
    assert torch.load(tmp_path / "f.pt", weights_only=True)["step"] == 2


def test_rl_resume_refuses_a_base_retrained_in_place(tiny_screen, tmp_path, capsys, monkeypatch):
    """It continued after its base checkpoint was retrained in place (a new KL anchor)."""
    base = tmp_path / "base.pt"
    base.write_bytes(Path(tiny_screen["ckpt"]).read_bytes())
    rl.train(rl.RLConfig(ckpt=str(base), out=str(tmp_path / "r.pt"), steps=1, conds=2, group=4, T=2, eval_every=1000,
                         eval_cells=4, eval_steps=2, progress=False))
    torch.save(torch.load(base, weights_only=True), base)                 # written again
    os.utime(base, ns=(1, 1))
    monkeypatch.setattr(rl, "grpo_step", boom)
    err = one_error_line(capsys, lambda: rl.main(["--out", str(tmp_path / "r.pt"), "--resume", "--steps", "2"]))
    assert f"--resume: {base}, the pretrained generator this run post-trains (its KL anchor), was rewritten" in err


@pytest.mark.parametrize("stage", ["rl", "evaluate"])
def test_an_unfinished_pretraining_is_refused_unless_allowed(tiny_screen, tmp_path, capsys, monkeypatch, stage):
    """A pretraining stopped before its --steps (never calibrated) was post-trained and evaluated without a word."""
    ck = edited(tiny_screen, tmp_path, lambda c: c.update(step=30))
    run = {"rl": lambda *a: rl.main(["--ckpt", ck, "--out", str(tmp_path / "r.pt"), "--no-progress", *a]),
           "evaluate": lambda *a: evaluate.main(["--ckpt", ck, *a])}[stage]
    err = one_error_line(capsys, run)
    cmd = f"python flow.py --data {tiny_screen['path']} --steps 60 --n-genes 0 --width 64 --depth 1 --no-fit-trust " \
          f"--batch-size 64 --eval-every 1000 --save-every 1000 --out {ck} --resume"
    assert err == f"error: {ck} is an unfinished pretraining (step 30 of 60, never calibrated): finish it with " \
                  f"`{cmd}`, or --allow-unfinished", err
    if stage == "evaluate":          # the advice, run as given, finishes the run (it said `--out X --resume`: that
        argv = shlex.split(err.split("`")[1])               # refused its data file, then trained to 1000 steps)
        assert argv[:2] == ["python", "flow.py"]
        flow.main(argv[2:] + ["--no-progress"])
        assert torch.load(ck, weights_only=True)["step"] == 60
        evaluate.check_checkpoint(ck, torch.load(ck, weights_only=True))          # finished: no longer refused
    monkeypatch.setattr(evaluate, "dataset_for", boom)                   # allowed: past the check
    with pytest.raises(AssertionError, match="work started"):
        run("--allow-unfinished")


def test_flow_resume_without_steps_keeps_the_runs_steps(tiny_screen, tmp_path):
    """`flow.py --resume` without --steps trained on to the default 1000 steps, not the run's own."""
    flow.train(small_flow(str(tiny_screen["path"]), tmp_path / "f.pt", steps=6, stop_at=2))
    flow.main(["--data", str(tiny_screen["path"]), "--out", str(tmp_path / "f.pt"), "--resume", "--no-progress"])
    ck = torch.load(tmp_path / "f.pt", weights_only=True)
    assert ck["step"] == 6 and ck["config"]["steps"] == 6, (ck["step"], ck["config"]["steps"])


def test_flow_resume_of_a_checkpoint_with_nan_weights_says_so(tiny_screen, tmp_path, capsys):
    """It said 'training diverged ... lower --lr ...; the last good checkpoint ... is kept': the damaged one."""
    out = tmp_path / "f.pt"
    flow.train(small_flow(str(tiny_screen["path"]), out, stop_at=2))
    ck = torch.load(out, weights_only=True)
    ck["model"]["out.weight"][0, 0] = float("nan")                      # the training weights; the EMA is fine
    torch.save(ck, out)
    err = one_error_line(capsys, lambda: flow.main(["--data", str(tiny_screen["path"]), "--n-genes", "0", "--out",
                                                    str(out), "--resume", "--steps", "4", "--no-progress"]))
    assert err == f"error: {out} has NaN/Inf weights (model.out.weight): damaged, or saved after training diverged; " \
                  "retrain it, or use an earlier copy", err
    assert torch.load(out, weights_only=True)["step"] == 2


def test_a_checkpoint_whose_genes_are_permuted_against_the_data_is_refused(tiny_screen, tmp_path, capsys):
    ck = edited(tiny_screen, tmp_path, lambda c: c.update(genes=c["genes"][1::-1] + c["genes"][2:]))
    err = one_error_line(capsys, lambda: evaluate.main(["--ckpt", ck]))
    genes = torch.load(tiny_screen["ckpt"], weights_only=True)["genes"]
    assert f"the data has the checkpoint's genes in another order ({genes[0]!r} first)" in err, err


@pytest.mark.parametrize("edit, want", [
    (lambda c: c.update(format="2"), "has the format entry '2', not a version number"),
    (lambda c: c["ema"]["out.weight"].fill_(float("nan")), "has NaN/Inf weights (ema.out.weight)"),
    (lambda c: c.update(dose_range=[0.0, 0.0]), "has the dose range [0.0, 0.0], not two doses 0 < lo <= hi")])
def test_checkpoints_with_a_string_format_nan_weights_or_a_zero_dose_range_are_one_line(tiny_screen, tmp_path,
                                                                                       capsys, edit, want):
    ck = edited(tiny_screen, tmp_path, edit)
    for run in (lambda: evaluate.main(["--ckpt", ck]),
                lambda: rl.main(["--ckpt", ck, "--out", str(tmp_path / "r.pt"), "--no-progress"])):
        assert f"error: {ck} {want}" in one_error_line(capsys, run)


# ----------------------------------------------------------------------------- options bounded by memory
@pytest.mark.parametrize("stage, args, want", [
    ("flow", ["--batch-size", "100000000"], "--batch-size 100000000: must be an integer in [1, 2^24]"),
    ("evaluate", ["--n-cells", "100000000"], "--n-cells 100000000: must be an integer in [1, 2^24]"),
    ("rl", ["--eval-cells", "100000000"], "--eval-cells 100000000: must be an integer in [1, 2^24]"),
    ("rl", ["--conds", "65536", "--group", "65536"], "--conds 65536 x --group 65536: more than 2^24 rollouts"),
    ("data", ["--simulate", "s.h5ad", "--sim-cells", "10000000", "--sim-genes", "1000"], "over 2^28 values"),
    ("rl", ["--T", "100000000"], "(--T 100000000 + 1) rollout states: 160,000,001,600 values at once need"),
    ("data", ["--simulate", "s.h5ad", "--sim-cells", "100000000"], "--sim-cells 100000000: must be an integer in"),
    ("verifiers", ["--check-cells", "100000000"], "--check-cells 100000000: must be an integer in [1, 2^24]")])
def test_counts_beyond_memory_are_one_line_before_any_work(tiny_screen, tmp_path, monkeypatch, capsys, stage, args,
                                                           want):
    monkeypatch.chdir(tmp_path)
    for owner, name in [(data, "training_rows"), (flow, "generate"), (rl, "grpo_step"), (data, "simulate"),
                        (verifiers, "Verifier")]:
        monkeypatch.setattr(owner, name, boom)
    monkeypatch.setattr(os, "sysconf", lambda name: {"SC_PHYS_PAGES": 2 ** 20, "SC_PAGE_SIZE": 4096}[name])  # 4 GiB
    ck, d = tiny_screen["ckpt"], str(tiny_screen["path"])
    run = {"flow": lambda: flow.main(["--data", d, "--out", "f.pt", "--no-progress", *args]),
           "evaluate": lambda: evaluate.main(["--ckpt", ck, *args]),
           "rl": lambda: rl.main(["--ckpt", ck, "--out", "r.pt", "--no-progress", "--conds", "2", "--group", "4",
                                  *args]),
           "data": lambda: data.main(args),
           "verifiers": lambda: verifiers.main(["--data", d, *args])}[stage]
    err = one_error_line(capsys, run)
    assert want in err, err
    assert not [f for f in os.listdir(tmp_path) if f != "stderr.txt"]


@pytest.mark.parametrize("flag", ["--batch-size", "--eval-cells"])
def test_flow_batch_and_eval_cells_beyond_memory_are_one_line_before_any_work(tiny_screen, tmp_path, monkeypatch,
                                                                                 capsys, flag):
    """flow.py checked neither against memory: --batch-size 16000000 (within [1, 2^24]) was OOM-killed, --eval-cells
    16000000 ran for minutes. Now one line, as evaluate.py and rl.py (data.check_memory), before any work."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data, "training_rows", boom)
    monkeypatch.setattr(data, "memory", lambda: 2.0 ** 30)                       # a 1 GiB machine
    err = one_error_line(capsys, lambda: flow.main(["--data", str(tiny_screen["path"]), "--out", "f.pt",
                                                    "--no-progress", flag, "16000000"]))
    n = 16 * 16_000_000 * 200 if flag == "--batch-size" else 16_000_000 * (2 * 200 + 2 * 200 + 1200)  # 200 genes
    assert err == f"error: {flag} 16000000: {n:,} values at once need {n * 4 / 2 ** 30:,.1f} GiB, more than half of " \
                  "this machine's 1.0 GiB; lower it", err
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("problem", ["runs is a file", "read-only folder"])
def test_an_unwritable_pretraining_cache_is_one_line(tiny_screen, tmp_path, monkeypatch, capsys, problem):
    """rl.py without --ckpt caches its generator in runs/: a file named runs, or a read-only working folder, was a
    traceback."""
    if problem == "read-only folder" and os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    monkeypatch.chdir(tmp_path)
    d = str(tiny_screen["path"])
    if problem == "runs is a file":
        (tmp_path / "runs").write_text("not a folder")
    else:
        (tmp_path / "out").mkdir()
        tmp_path.chmod(0o555)
    monkeypatch.setattr(flow, "train", boom)
    try:
        err = one_error_line(capsys, lambda: rl.main(["--data", d, "--out", str(tmp_path / "out" / "r.pt"),
                                                      "--pretrain-steps", "2", "--no-progress"]))
    finally:
        tmp_path.chmod(0o755)
    assert "the pretraining cache (rl.py without --ckpt; or give --ckpt)" in err and "cannot write into" in err, err
    assert problem != "runs is a file" or "a file is in the way" in err, err
