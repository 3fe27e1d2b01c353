"""h5ad I/O through h5py: files written by anndata (current and old layouts) and our writer."""
import pathlib
import warnings

import h5py
import numpy as np
import pytest
import scipy.sparse as sp

from data import H5AD, UserError, read_h5ad, write_h5ad

ad = pytest.importorskip("anndata")
pd = pytest.importorskip("pandas")
warnings.filterwarnings("ignore", category=FutureWarning)

REAL = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "mcfaline23_gbm_crispri.h5ad"


def _pandas_col(s):
    """What our reader should return for a pandas column: object/categorical -> object with None."""
    if isinstance(s.dtype, pd.CategoricalDtype) or s.dtype == object:
        return np.array([None if pd.isna(v) else str(v) for v in s], dtype=object)
    return s.to_numpy()


def _assert_frame(cols, df):
    assert list(cols) == list(df.columns)
    for k in df.columns:
        want = _pandas_col(df[k])
        if want.dtype.kind == "f":
            np.testing.assert_array_equal(cols[k], want)  # NaN == NaN here
        else:
            assert cols[k].dtype == want.dtype, k
            assert cols[k].tolist() == want.tolist(), k


def _dense(X):
    return X.toarray() if sp.issparse(X) else np.asarray(X)


def _adata(n=7, m=5, X=None, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.poisson(1.0, (n, m)).astype(np.float32) if X is None else X  # (n, m)
    obs = pd.DataFrame({
        "condition": pd.Categorical(["ctrl", "A+ctrl", None, "A+B", "ctrl", "é+ctrl", "A+B"][:n]),
        "n_counts": rng.random(n),
        "is_ctrl": np.arange(n) % 2 == 0,
        "i64": pd.array([1, None, 3, 4, 5, 6, 7][:n], dtype="Int64"),
        "i64_full": pd.array(np.arange(n), dtype="Int64"),
        "nb": pd.array([True, None, False, True, True, False, None][:n], dtype="boolean"),
        "label": [f"lab{i % 3}" for i in range(n)],
    }, index=pd.Index([f"cell{i}" for i in range(n)], name="cell_id"))
    var = pd.DataFrame({"mean": rng.random(m)}, index=[f"G{j}" for j in range(m)])
    a = ad.AnnData(X=X, obs=obs, var=var)
    a.uns["note"] = "hello"
    a.uns["k"] = 3
    a.uns["params"] = {"lr": 0.5, "genes": np.array(["G0", "G1"]), "arr": np.arange(4)}
    return a


def test_dense_x_and_obs_kinds_written_by_anndata(tmp_path):
    a, p = _adata(), tmp_path / "dense.h5ad"
    a.write_h5ad(p)
    with h5py.File(p) as f:
        assert f["obs"].attrs["_index"] == "cell_id"  # index dataset is not called _index here
    h = read_h5ad(p)
    assert isinstance(h.X, np.ndarray) and h.X.dtype == np.float32
    np.testing.assert_array_equal(h.X, a.X)
    assert h.obs_names.dtype == object and h.obs_names.tolist() == list(a.obs_names)
    assert h.var_names.tolist() == list(a.var_names)
    assert h.obs["condition"].tolist() == ["ctrl", "A+ctrl", None, "A+B", "ctrl", "é+ctrl", "A+B"]
    assert h.obs["is_ctrl"].dtype == bool and h.obs["n_counts"].dtype == np.float64
    i64 = h.obs["i64"]  # nullable int with a missing value -> float64 + NaN
    assert i64.dtype == np.float64 and np.isnan(i64[1]) and i64[[0, 2]].tolist() == [1.0, 3.0]
    assert h.obs["i64_full"].dtype == np.int64 and h.obs["i64_full"].tolist() == list(range(7))
    assert h.obs["nb"].dtype == object and h.obs["nb"].tolist() == [True, None, False, True, True, False, None]
    assert h.obs["label"].tolist() == [f"lab{i % 3}" for i in range(7)]
    assert list(h.obs) == list(a.obs.columns)
    np.testing.assert_array_equal(h.var["mean"], a.var["mean"])
    assert h.uns["note"] == "hello" and h.uns["k"] == 3 and h.uns["params"]["lr"] == 0.5
    assert h.uns["params"]["genes"].tolist() == ["G0", "G1"]
    np.testing.assert_array_equal(h.uns["params"]["arr"], np.arange(4))


@pytest.mark.parametrize("fmt", ["csr", "csc"])
@pytest.mark.parametrize("compression", [None, "gzip"])
def test_sparse_x_stays_sparse(tmp_path, fmt, compression):
    X = sp.random(7, 5, density=0.4, format=fmt, dtype=np.float32, random_state=1)
    a, p = _adata(X=X), tmp_path / "s.h5ad"
    a.write_h5ad(p, compression=compression)
    with h5py.File(p) as f:
        assert f["X"].attrs["encoding-type"] == f"{fmt}_matrix"
        assert f["X/data"].compression == compression
    h = read_h5ad(p)
    assert sp.issparse(h.X) and h.X.format == fmt
    np.testing.assert_array_equal(h.X.toarray(), X.toarray())


def test_int64_indices(tmp_path):
    X = sp.random(7, 5, density=0.5, format="csr", dtype=np.float64, random_state=2)
    X.indices, X.indptr = X.indices.astype(np.int64), X.indptr.astype(np.int64)
    p = tmp_path / "i64.h5ad"
    _adata(X=X).write_h5ad(p)
    with h5py.File(p, "r+") as f:  # anndata may downcast: force int64 on disk
        for k in ("indices", "indptr"):
            v = f["X"][k][...].astype(np.int64)
            del f["X"][k]
            f["X"].create_dataset(k, data=v)
        assert f["X/indices"].dtype == np.int64
    h = read_h5ad(p)
    assert h.X.format == "csr"
    np.testing.assert_array_equal(h.X.toarray(), X.toarray())


def test_layer(tmp_path):
    a, p = _adata(), tmp_path / "layer.h5ad"
    a.layers["counts"] = sp.csr_matrix(np.asarray(a.X) * 10)
    a.write_h5ad(p)
    h = read_h5ad(p, layer="counts")
    assert h.X.format == "csr"
    np.testing.assert_array_equal(h.X.toarray(), np.asarray(a.X) * 10)
    with pytest.raises(UserError, match=r"'raw'.*counts"):
        read_h5ad(p, layer="raw")


def test_bytes_strings(tmp_path):
    """Fixed-width |S datasets (older writers), including non-ASCII UTF-8."""
    p = tmp_path / "bytes.h5ad"
    _adata().write_h5ad(p)
    names = [f"cell{i}" for i in range(6)] + ["célula"]
    with h5py.File(p, "r+") as f:
        del f["obs/cell_id"]
        f["obs"].create_dataset("cell_id", data=np.array([s.encode() for s in names]))  # |S
        del f["obs/condition/categories"]
        f["obs/condition"].create_dataset("categories", data=np.array([b"A+B", b"A+ctrl", b"ctrl", b"x"]))
        assert f["obs/cell_id"].dtype.kind == "S"
    h = read_h5ad(p)
    assert h.obs_names.tolist() == names and all(type(s) is str for s in h.obs_names)
    assert h.obs["condition"].tolist() == ["ctrl", "A+ctrl", None, "A+B", "ctrl", "x", "A+B"]


def _anndata07(p, legacy_sparse=False):
    """anndata 0.7 layout by hand: categorical = codes dataset + `categories` object reference."""
    vlen = h5py.string_dtype()
    with h5py.File(p, "w") as f:
        if legacy_sparse:  # pre-0.7 sparse X: h5sparse attributes, no encoding-type
            X = sp.csr_matrix(np.array([[0, 1, 0, 2], [3, 0, 0, 0], [0, 0, 4, 5]], np.float32))
            g = f.create_group("X")
            g.attrs["h5sparse_format"], g.attrs["h5sparse_shape"] = "csr", (3, 4)
            for k in ("data", "indices", "indptr"):
                g[k] = getattr(X, k)
        else:
            f["X"] = np.arange(12, dtype=np.float32).reshape(3, 4)  # (3, 4)
        obs = f.create_group("obs")
        obs.attrs.update({"encoding-type": "dataframe", "encoding-version": "0.1.0",
                          "_index": "index", "column-order": np.array(["cond", "n"], dtype=vlen)})
        obs.create_dataset("index", data=np.array(["c0", "c1", "c2"], dtype=object), dtype=vlen)
        cats = obs.create_group("__categories")
        cats.create_dataset("cond", data=np.array(["A", "ctrl"], dtype=object), dtype=vlen)
        obs["cond"] = np.array([1, -1, 0], dtype=np.int8)
        obs["cond"].attrs["categories"] = cats["cond"].ref
        obs["n"] = np.array([1.5, 2.5, 3.5])
        var = f.create_group("var")
        var.attrs.update({"encoding-type": "dataframe", "encoding-version": "0.1.0", "_index": "_index",
                          "column-order": np.array(["len", "chrom"], dtype=vlen)})
        var.create_dataset("_index", data=np.array(["g0", "g1", "g2", "g3"], dtype=object), dtype=vlen)
        var["len"] = np.array([10, 20, 30, 40])
        var.create_group("__categories").create_dataset("chrom", data=np.array(["1", "X"], dtype=object),
                                                        dtype=vlen)
        var["chrom"] = np.array([0, 1, 1, 0], dtype=np.int8)
        var["chrom"].attrs["categories"] = var["__categories/chrom"].ref
        f.create_group("uns")


def test_anndata07_layout(tmp_path):
    p = tmp_path / "old.h5ad"
    _anndata07(p)
    h = read_h5ad(p)
    np.testing.assert_array_equal(h.X, np.arange(12, dtype=np.float32).reshape(3, 4))
    assert h.obs_names.tolist() == ["c0", "c1", "c2"]
    assert list(h.obs) == ["cond", "n"] and h.obs["cond"].tolist() == ["ctrl", None, "A"]
    assert list(h.var) == ["len", "chrom"] and h.var["chrom"].tolist() == ["1", "X", "X", "1"]
    a = ad.read_h5ad(p)  # the fixture is a layout anndata itself understands
    _assert_frame(h.obs, a.obs)
    _assert_frame(h.var, a.var)
    with h5py.File(p, "r+") as f:  # no column-order: every dataset but the index and __categories
        del f["var"].attrs["column-order"]
    h = read_h5ad(p)
    assert sorted(h.var) == ["chrom", "len"] and h.var["chrom"].tolist() == ["1", "X", "X", "1"]


def test_legacy_h5sparse_x(tmp_path):
    p = tmp_path / "h5sparse.h5ad"
    _anndata07(p, legacy_sparse=True)
    h = read_h5ad(p)
    assert h.X.format == "csr" and h.X.shape == (3, 4)
    np.testing.assert_array_equal(h.X.toarray(), [[0, 1, 0, 2], [3, 0, 0, 0], [0, 0, 4, 5]])


def test_pre07_compound_obs(tmp_path):
    p = tmp_path / "v06.h5ad"
    rec = np.array([(b"c0", 1, 0.5), (b"c1", 0, 1.5)], dtype=[("index", "S2"), ("cond", "i1"), ("x", "f8")])
    var = np.array([(b"g0",), (b"g1",), (b"g2",)], dtype=[("index", "S2")])
    with h5py.File(p, "w") as f:
        f["X"], f["obs"], f["var"] = np.ones((2, 3), np.float32), rec, var
        f.create_group("uns")["cond_categories"] = np.array([b"A", b"ctrl"])
    h = read_h5ad(p)
    assert h.obs_names.tolist() == ["c0", "c1"] and h.var_names.tolist() == ["g0", "g1", "g2"]
    assert h.obs["cond"].tolist() == ["ctrl", "A"] and h.obs["x"].tolist() == [0.5, 1.5]


def _ours(X):
    n, m = X.shape
    return H5AD(
        X=X,
        obs={"cond": np.array(["ctrl", "A+B", None, "é", "ctrl"], dtype=object)[:n],
             "dose": np.linspace(0, 1, n), "rep": np.arange(n, dtype=np.int32), "flag": np.arange(n) > 1,
             "ob": np.array([True, None, False, True, False], dtype=object)[:n]},  # object: categorical
        var={"symbol": np.array([f"S{j}" for j in range(m)])},
        obs_names=np.array([f"c{i}" for i in range(n)], dtype=object),
        var_names=np.array([f"g{j}" for j in range(m)], dtype=object),
        uns={"s": "hi", "n": 3, "f": 1.5, "arr": np.arange(3), "strs": np.array(["a", "b"], dtype=object),
             "nested": {"eye": np.eye(2), "deep": {"t": "x"}}})


@pytest.mark.parametrize("kind", ["dense", "csr", "csc"])
def test_our_write_read_by_anndata_and_us(tmp_path, kind):
    X = np.arange(20, dtype=np.float32).reshape(5, 4) % 3  # (5, 4)
    X = X if kind == "dense" else sp.csr_matrix(X) if kind == "csr" else sp.csc_matrix(X)
    h, p = _ours(X), tmp_path / "ours.h5ad"
    write_h5ad(p, h, compression="gzip" if kind == "csr" else None)
    assert [f.name for f in tmp_path.iterdir()] == ["ours.h5ad"]     # no temporary file left
    a = ad.read_h5ad(p)
    np.testing.assert_array_equal(_dense(a.X), _dense(X))
    assert sp.issparse(a.X) == (kind != "dense")
    assert list(a.obs_names) == h.obs_names.tolist() and list(a.var_names) == h.var_names.tolist()
    assert isinstance(a.obs["cond"].dtype, pd.CategoricalDtype)
    assert [None if pd.isna(v) else v for v in a.obs["cond"]] == h.obs["cond"].tolist()
    assert [None if pd.isna(v) else v for v in a.obs["ob"]] == ["True", None, "False", "True", "False"]
    for k in ("dose", "rep", "flag"):
        assert a.obs[k].tolist() == h.obs[k].tolist() and a.obs[k].dtype == h.obs[k].dtype
    assert list(a.var["symbol"]) == h.var["symbol"].tolist()
    assert a.uns["s"] == "hi" and a.uns["n"] == 3 and a.uns["f"] == 1.5
    assert list(a.uns["strs"]) == ["a", "b"] and a.uns["nested"]["deep"]["t"] == "x"
    np.testing.assert_array_equal(a.uns["nested"]["eye"], np.eye(2))
    r = read_h5ad(p)  # ours -> ours
    assert type(r.X) is type(h.X)
    np.testing.assert_array_equal(_dense(r.X), _dense(X))
    for k in ("cond", "dose", "rep", "flag"):
        assert r.obs[k].tolist() == h.obs[k].tolist() and r.obs[k].dtype == h.obs[k].dtype
    assert r.obs["ob"].tolist() == ["True", None, "False", "True", "False"]
    assert r.var["symbol"].tolist() == h.var["symbol"].tolist()
    assert r.obs_names.tolist() == h.obs_names.tolist()
    assert r.uns["s"] == "hi" and r.uns["n"] == 3 and r.uns["nested"]["deep"] == {"t": "x"}
    assert r.uns["strs"].tolist() == ["a", "b"]


def test_write_is_atomic_and_validates(tmp_path):
    p = tmp_path / "x.h5ad"
    good = _ours(np.ones((5, 4), np.float32))
    write_h5ad(p, good)
    bad = _ours(np.zeros((5, 4), np.float32))
    bad.uns["obj"] = object()
    with pytest.raises(UserError, match="obj"):
        write_h5ad(p, bad)
    assert [f.name for f in tmp_path.iterdir()] == ["x.h5ad"]
    np.testing.assert_array_equal(read_h5ad(p).X, 1.0)  # old file untouched
    short = _ours(np.ones((5, 4), np.float32))
    short.obs["dose"] = np.zeros(3)
    with pytest.raises(UserError, match="dose"):
        write_h5ad(p, short)
    with pytest.raises(UserError, match="obs_names"):
        write_h5ad(p, _ours(np.ones((5, 4), np.float32)).__class__(
            X=np.ones((4, 4)), obs={}, var={}, obs_names=good.obs_names, var_names=good.var_names))


def test_errors(tmp_path):
    missing = tmp_path / "nope.h5ad"
    with pytest.raises(UserError, match="nope.h5ad.*not found"):
        read_h5ad(missing)
    txt = tmp_path / "t.h5ad"
    txt.write_text("not hdf5")
    with pytest.raises(UserError, match="not an HDF5"):
        read_h5ad(txt)
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["data"] = np.zeros(3)
    with pytest.raises(UserError, match="not an h5ad.*data"):
        read_h5ad(plain)
    p = tmp_path / "nox.h5ad"
    a = _adata()
    a.layers["counts"] = a.X.copy()
    a.write_h5ad(p)
    with h5py.File(p, "r+") as f:
        del f["X"]
    with pytest.raises(UserError, match="no X.*counts"):
        read_h5ad(p)
    assert read_h5ad(p, layer="counts").X.shape == (7, 5)  # the layer still works
    q = tmp_path / "enc.h5ad"
    ad.AnnData(X=sp.csr_matrix(np.eye(3, dtype=np.float32))).write_h5ad(q)
    with h5py.File(q, "r+") as f:
        f["X"].attrs["encoding-type"] = "coo_matrix"
    with pytest.raises(UserError, match="coo_matrix"):
        read_h5ad(q)
    with h5py.File(q, "r+") as f:
        f["X"].attrs["encoding-type"] = "csr_matrix"
        g = f["obs"].create_group("weird")
        g.attrs["encoding-type"] = "awkward-array"
        f["obs"].attrs["column-order"] = np.array(["weird"], dtype=h5py.string_dtype())
        u = f["uns"].create_group("aw")  # unreadable uns entries are skipped, not fatal
        u.attrs["encoding-type"] = "awkward-array"
    with pytest.raises(UserError, match="awkward-array"):
        read_h5ad(q)
    with h5py.File(q, "r+") as f:
        del f["obs/weird"]
        f["obs"].attrs["column-order"] = np.zeros(0)  # anndata's spelling of "no columns"
        f["uns"]["kept"] = 7
    h = read_h5ad(q)
    assert h.obs == {} and "aw" not in h.uns and h.uns["kept"] == 7


@pytest.mark.skipif(not REAL.exists(), reason="../shared data not present")
def test_real_file_matches_anndata():
    h, a = read_h5ad(REAL), ad.read_h5ad(REAL)
    assert sp.issparse(h.X) and h.X.format == "csr" and h.X.shape == (2586, 500)
    assert (h.X != a.X).nnz == 0
    assert h.obs_names.tolist() == list(a.obs_names) and h.var_names.tolist() == list(a.var_names)
    _assert_frame(h.obs, a.obs)
    _assert_frame(h.var, a.var)
    assert "control" in set(h.obs["condition"]) and len(set(h.obs["cell_type"])) == 3
