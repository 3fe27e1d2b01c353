"""Data stage: h5ad in and out, preprocessing, perturbation parsing, splits, reference statistics,
and a Perturb-seq simulator with known ground truth.

    python data.py --data X.h5ad            # summary: keys, labels, conditions, split sizes
    python data.py --simulate sim.h5ad      # write the built-in synthetic benchmark

Everything downstream consumes a `Dataset` (log1p expression of the selected genes, one row per
cell, rows grouped by (condition, covariate)) and its per-condition `Reference` statistics.
The h5ad format is read and written with h5py alone (no anndata at run time).

Memory grows with the non-zeros, not cells x genes: the selected genes' expression is held as CSR
(`Dataset.X[rows]` densifies only those rows), reference statistics are sparse sums over blocks of
cells, and a `Reference`'s cells are a view of `Dataset.X` densified on access. `--lazy` also leaves the
full matrix on disk: it is read in blocks of cells, twice (gene statistics, then the selected columns).

Left out: obsm/varm/obsp (never read), reading cells from disk per batch, MuData, zarr, multi-modal data,
gene-name harmonisation across species, dose-response curves (a dose is a scalar per component).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: spinning threads stall a shared CPU

import h5py
import numpy as np
import scipy.sparse as sp
import torch

ROOT = Path(__file__).resolve().parent
CONTROL_LABELS = ["ctrl", "control", "non-targeting", "non_targeting", "nontargeting", "dmso",
                  "vehicle", "nt", "negative_control", "safe-targeting", "untreated"]
PERT_KEYS = ["condition", "perturbation", "target_gene", "gene", "perturbation_name",
             "product_name", "treatment", "guide_identity", "target"]
COV_KEYS = ["cell_type", "cell_line", "celltype", "cell_line_name", "cell_type_name"]
DOSE_KEYS = ["dose", "dose_value", "dose_val"]
SYMBOL_KEYS = ["gene_name", "gene_symbols", "feature_name", "gene_symbol", "gene_names", "symbol"]


class DataError(ValueError):
    """An expected problem with user input; CLIs print the message and exit 2, no traceback."""


# ----------------------------------------------------------------------------- h5ad I/O
# h5ad (AnnData's HDF5 file) reading and writing with h5py only.
#
# Layout facts from the anndata on-disk format spec (anndata.readthedocs.io, "On-disk format"):
# elements carry `encoding-type`/`encoding-version` attributes; sparse = group data/indices/indptr +
# `shape`; dataframe = group whose `_index` attribute names the index dataset, `column-order` lists
# columns; categorical = codes + categories (code -1 = missing). Older files: anndata 0.7 categorical
# = codes dataset whose `categories` attribute references `__categories/<col>`; before 0.7, sparse X
# had `h5sparse_format`/`h5sparse_shape` and obs/var were compound datasets.

@dataclass
class H5AD:
    """What read_h5ad returns and write_h5ad takes."""
    X: np.ndarray | sp.csr_matrix | sp.csc_matrix  # (n_obs, n_vars)
    obs: dict            # column -> (n_obs,) array; strings/categoricals: object array of str, missing None
    var: dict            # column -> (n_vars,) array, same kinds as obs
    obs_names: np.ndarray  # (n_obs,) object array of str
    var_names: np.ndarray  # (n_vars,) object array of str
    uns: dict = field(default_factory=dict)  # nested dict of arrays / str / numbers


def _attr(obj, key, default=None):
    """An HDF5 attribute, bytes decoded to str."""
    v = obj.attrs.get(key, default)
    return v.decode() if isinstance(v, bytes) else v


def _strings(a):
    """Any array -> object array of python str; bytes are decoded as UTF-8 without a Python loop."""
    a = np.asarray(a)
    if a.dtype.kind == "O" and a.size and isinstance(a.flat[0], bytes):
        a = a.astype("S")
    if a.dtype.kind == "S":
        try:
            return a.astype("U").astype(object)  # ASCII fast path (C cast)
        except UnicodeDecodeError:
            return np.char.decode(a, "utf-8").astype(object)
    return a.astype(str).astype(object)


def _categorical(codes, categories):
    """codes (n,) int + categories (k,) -> (n,) object array of str; code -1 -> None."""
    lut = np.append(_strings(categories), None)  # (k + 1,) last entry serves code -1
    return lut[np.asarray(codes, dtype=np.int64)]


def _read_array(obj):
    """One obs/var column or uns leaf.

    numeric/bool -> its numpy dtype; strings and categoricals -> object array of str (missing None);
    nullable-integer -> float64 with NaN where masked (its int dtype when nothing is masked);
    nullable-boolean / nullable-string-array -> object array with None where masked (the plain
    values when nothing is masked); 0-d datasets -> python str / number.
    """
    enc = _attr(obj, "encoding-type", "")
    if isinstance(obj, h5py.Dataset):
        if obj.shape == ():
            v = obj[()]
            return v.decode() if isinstance(v, bytes) else (v.item() if isinstance(v, np.generic) else v)
        if obj.dtype.kind == "S" or h5py.check_string_dtype(obj.dtype) is not None:
            return _strings(obj[...])
        ref = obj.attrs.get("categories")  # anndata 0.7: reference to __categories/<col>
        if isinstance(ref, h5py.Reference):
            return _categorical(obj[...], obj.file[ref][...])
        return obj[...]
    if enc == "categorical":
        return _categorical(obj["codes"][...], obj["categories"][...])
    if enc in ("nullable-integer", "nullable-boolean", "nullable-string-array"):
        v, mask = _read_array(obj["values"]), obj["mask"][...].astype(bool)
        if not mask.any():
            return v
        v = v.astype(np.float64 if enc == "nullable-integer" else object)
        v[mask] = np.nan if enc == "nullable-integer" else None
        return v
    raise DataError(f"{obj.name}: unsupported encoding-type {enc!r}; store it as a plain, categorical "
                    "or nullable column")


def _read_X(x):
    """Dense dataset -> ndarray; csr/csc group (current or legacy h5sparse) -> scipy sparse, never dense."""
    if isinstance(x, h5py.Dataset):
        return _f32(x[...])
    enc = _attr(x, "encoding-type") or _attr(x, "h5sparse_format", "")
    fmt = {"csr_matrix": sp.csr_matrix, "csr": sp.csr_matrix,
           "csc_matrix": sp.csc_matrix, "csc": sp.csc_matrix}.get(enc)
    if fmt is None:
        raise DataError(f"{x.name}: unsupported matrix encoding-type {enc!r}; this reader takes dense "
                        "arrays and csr_matrix/csc_matrix: convert it in anndata and write again")
    shape = tuple(int(n) for n in x.attrs.get("shape", x.attrs.get("h5sparse_shape")))
    return fmt((_f32(x["data"][...]), x["indices"][...], x["indptr"][...]), shape=shape)


def _f32(a):
    """float16 values -> float32 (scipy's sparse products and gene statistics do not take float16)."""
    return a.astype(np.float32) if a.dtype == np.float16 else a


class DiskX:
    """X (or a layer) left on disk (--lazy). X[a:b] reads those cells (a CSR block for a CSR X, dense rows for a
    dense one), checks them (check_values) and log-normalises raw counts, which are detected once on a strided
    sample of the stored values. gene_stats and load_dataset's column selection read it block by block, so the
    whole matrix is never in memory. CSC cannot be read by cells: convert it, or drop --lazy."""

    def __init__(self, path, layer=None):
        self.path, self.key = path, f"layers/{layer}" if layer is not None else "X"
        with h5py.File(path, "r") as f:
            x = f[self.key]
            enc = _attr(x, "encoding-type") or _attr(x, "h5sparse_format", "")
            if isinstance(x, h5py.Group) and "csr" not in enc:
                raise DataError(f"--lazy reads X by cells, which needs a dense or CSR matrix; {x.name} is {enc}: "
                                "drop --lazy or rewrite it as CSR")
            self.sparse = isinstance(x, h5py.Group)
            self.shape = tuple(int(n) for n in x.attrs.get("shape", x.attrs.get("h5sparse_shape"))) if self.sparse \
                else x.shape
            v, per = (x["data"], 1) if self.sparse else (x, self.shape[1])
            sample = v[:: max(1, len(v) * per // 200_000)]                  # a strided read of <= ~200k values
        self.counts = is_counts(sample)
        self.dtype = np.dtype(np.float32)

    def __getitem__(self, rows: slice):
        a, b = rows.start or 0, min(rows.stop, self.shape[0])
        with h5py.File(self.path, "r") as f:
            x = f[self.key]
            if self.sparse:
                p = x["indptr"][a:b + 1]
                B = sp.csr_matrix((_f32(x["data"][p[0]:p[-1]]), x["indices"][p[0]:p[-1]], p - p[0]),
                                  shape=(b - a, self.shape[1]))
            else:
                B = _f32(x[a:b])
        check_values(B, a)
        return log_normalise(B) if self.counts else B


def _read_frame(g, uns=None):
    """obs/var -> (names (n,) object array of str, {column: (n,) array})."""
    if isinstance(g, h5py.Dataset):  # anndata < 0.7: compound dataset, categories in uns/<col>_categories
        rec = g[...]
        idx = "index" if "index" in rec.dtype.names else rec.dtype.names[0]
        cols = {}
        for c in rec.dtype.names:
            cat = f"{c}_categories"
            if c != idx:
                a = np.ascontiguousarray(rec[c])
                cols[c] = (_categorical(a, uns[cat][...]) if uns is not None and cat in uns
                           else _strings(a) if a.dtype.kind == "S" else a)
        return _strings(rec[idx]), cols
    idx = _attr(g, "_index", "_index")
    order = g.attrs.get("column-order")
    if order is None:
        keys = [k for k in g if k not in (idx, "__categories")]
    else:
        keys = [k.decode() if isinstance(k, bytes) else str(k) for k in np.atleast_1d(order)]
    return _strings(g[idx][...]), {k: _read_array(g[k]) for k in keys}


def _read_dict(g):
    """uns group -> nested dict; elements this reader does not understand are left out."""
    out = {}
    for k, obj in g.items():
        enc = _attr(obj, "encoding-type", "")
        try:
            if isinstance(obj, h5py.Group) and enc in ("", "dict"):
                out[k] = _read_dict(obj)
            elif enc == "dataframe":
                out[k] = _read_frame(obj)[1]
            elif enc in ("csr_matrix", "csc_matrix"):
                out[k] = _read_X(obj)
            else:
                out[k] = _read_array(obj)
        except Exception:  # e.g. awkward arrays, broken references: uns is optional metadata
            continue
    return out


def read_h5ad(path, layer=None, lazy=False) -> H5AD:
    """Read an .h5ad file written by any anndata version; `layer` reads layers/<layer> as X; lazy: X stays on
    disk (a DiskX read in blocks of cells)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found; check the path to the .h5ad file")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise DataError(f"{path}: not an HDF5 file ({e}); pass an .h5ad file written by anndata") from None
    try:
        with f:
            if "obs" not in f or "var" not in f:
                raise DataError(f"HDF5 but not an h5ad (no obs/var; top-level keys {sorted(f)}); "
                                "write it with anndata's write_h5ad")
            layers = sorted(f["layers"]) if isinstance(f.get("layers"), h5py.Group) else []
            if layer is not None and layer not in layers:
                raise DataError(f"no layer {layer!r}; available layers: {layers or 'none'}")
            if layer is None and "X" not in f:
                raise DataError(f"no X matrix; pass a layer instead (available layers: {layers or 'none'})")
            X = DiskX(path, layer) if lazy else _read_X(f["layers"][layer] if layer is not None else f["X"])
            uns_g = f["uns"] if isinstance(f.get("uns"), h5py.Group) else None
            obs_names, obs = _read_frame(f["obs"], uns_g)
            var_names, var = _read_frame(f["var"], uns_g)
            uns = _read_dict(uns_g) if uns_g is not None else {}
    except DataError as e:
        raise DataError(f"{path}: {e}") from None
    if X.shape != (len(obs_names), len(var_names)):
        raise DataError(f"{path}: matrix shape {X.shape} does not match {len(obs_names)} obs x "
                        f"{len(var_names)} var; the file is inconsistent, rewrite it with anndata")
    return H5AD(X, obs, var, obs_names, var_names, uns)


def _enc(obj, kind, version):
    """Set the anndata encoding attributes; returns obj."""
    obj.attrs["encoding-type"], obj.attrs["encoding-version"] = kind, version
    return obj


def _write_array(g, key, a, compression):
    """ndarray -> dataset: 'array' (numeric/bool) or 'string-array' (vlen UTF-8)."""
    a = np.asarray(a)
    comp = compression if a.size else None  # HDF5 cannot chunk empty datasets
    if a.dtype.kind in "OUS":
        return _enc(g.create_dataset(key, data=_strings(a), dtype=h5py.string_dtype(), compression=comp),
                    "string-array", "0.2.0")
    return _enc(g.create_dataset(key, data=a, compression=comp), "array", "0.2.0")


def _write_sparse(g, key, X, compression):
    """scipy sparse -> csr_matrix / csc_matrix group (other formats go through CSR)."""
    X = X if X.format in ("csr", "csc") else X.tocsr()
    s = _enc(g.create_group(key), f"{X.format}_matrix", "0.1.0")
    s.attrs["shape"] = np.asarray(X.shape, dtype=np.int64)
    for k in ("data", "indices", "indptr"):
        s.create_dataset(k, data=getattr(X, k), compression=compression if getattr(X, k).size else None)


def _write_column(g, key, c, compression):
    """numeric/bool -> array; str/object -> categorical (None/NaN -> code -1); object holding only
    bools (+ None) -> nullable-boolean; object holding only numbers (+ None) -> float64 with NaN."""
    if c.dtype.kind not in "OUS":
        return _write_array(g, key, c, compression)
    miss = (np.equal(c, None) | (c != c)).astype(bool) if c.dtype.kind == "O" else np.zeros(len(c), bool)
    vals = np.array(c[~miss].tolist())  # typed array when the present values share a kind
    if c.dtype.kind == "O" and vals.size and vals.dtype.kind in "biuf":
        if vals.dtype.kind != "b":
            return _write_array(g, key, np.where(miss, np.nan, c).astype(np.float64), compression)
        h = _enc(g.create_group(key), "nullable-boolean", "0.1.0")
        _write_array(h, "values", np.where(miss, False, c).astype(bool), compression)
        return _write_array(h, "mask", miss, compression)
    cats, inv = np.unique(_strings(vals).astype(str), return_inverse=True)
    codes = np.full(len(c), -1, dtype=np.min_scalar_type(-max(len(cats), 1)))
    codes[~miss] = inv.ravel()
    h = _enc(g.create_group(key), "categorical", "0.2.0")
    h.attrs["ordered"] = False
    _write_array(h, "codes", codes, compression)
    _write_array(h, "categories", cats, compression)


def _write_frame(g, names, cols, n, compression):
    _enc(g, "dataframe", "0.2.0")
    g.attrs["_index"] = "_index"
    g.attrs["column-order"] = (np.array(list(cols), dtype=h5py.string_dtype()) if cols
                               else np.zeros(0))
    _write_array(g, "_index", _strings(names), compression)
    for k, c in cols.items():
        c = np.asarray(c)
        if k == "_index" or "/" in k or c.shape != (n,):
            raise DataError(f"{g.name} column {k!r} (shape {c.shape}) is not a 1-D column of {n} values "
                            "with a name free of '/' and '_index'; fix that column")
        _write_column(g, k, c, compression)


def _write_dict(g, d, compression):
    """uns dict -> dict groups; str -> 'string', number -> 'numeric-scalar', array/list -> array."""
    _enc(g, "dict", "0.1.0")
    for k, v in d.items():
        k = str(k)
        if isinstance(v, dict):
            _write_dict(g.create_group(k), v, compression)
        elif isinstance(v, str):
            _enc(g.create_dataset(k, data=v, dtype=h5py.string_dtype()), "string", "0.2.0")
        elif isinstance(v, (bool, int, float, complex, np.number, np.bool_)):
            _enc(g.create_dataset(k, data=v), "numeric-scalar", "0.2.0")
        elif sp.issparse(v):
            _write_sparse(g, k, v, compression)
        elif isinstance(v, (np.ndarray, list, tuple)):
            _write_array(g, k, v, compression)
        else:
            raise DataError(f"uns entry {g.name}/{k} has type {type(v).__name__}, which h5ad cannot "
                            "store; convert it to a str, number, array or dict")


def write_h5ad(path, h: H5AD, compression=None) -> None:
    """Write `h` in the current anndata layout, atomically (path + '.tmp', then os.replace).

    compression: None or "gzip" (applied to every non-empty array)."""
    path = os.fspath(path)
    n_obs, n_vars = h.X.shape
    if (len(h.obs_names), len(h.var_names)) != (n_obs, n_vars):
        raise DataError(f"X is {n_obs} x {n_vars} but there are {len(h.obs_names)} obs_names and "
                        f"{len(h.var_names)} var_names; give one name per row and per column")
    tmp = path + ".tmp"
    try:
        with h5py.File(tmp, "w") as f:
            _enc(f, "anndata", "0.1.0")
            if sp.issparse(h.X):
                _write_sparse(f, "X", h.X, compression)
            else:
                _write_array(f, "X", h.X, compression)
            _write_frame(f.create_group("obs"), h.obs_names, h.obs, n_obs, compression)
            _write_frame(f.create_group("var"), h.var_names, h.var, n_vars, compression)
            for k in ("layers", "obsm", "obsp", "varm", "varp"):
                _enc(f.create_group(k), "dict", "0.1.0")
            _write_dict(f.create_group("uns"), h.uns or {}, compression)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ----------------------------------------------------------------------------- preprocessing
BLOCK = 4096  # cells per block wherever a matrix is processed in blocks (statistics, --lazy reads)


def check_values(X, offset=0) -> None:
    """Fail on negative, NaN or Inf entries, saying how many and where the first one is (X's rows start at cell
    `offset` of the file)."""
    data, c = (X.data if sp.issparse(X) else X).reshape(-1), 1 << 24
    for what, test in (("NaN", np.isnan), ("Inf", np.isinf), ("negative", lambda a: a < 0)):
        n = sum(int(test(data[i:i + c]).sum()) for i in range(0, data.size, c))   # masks of 16M values, not nnz
        if n:
            flat = int(np.flatnonzero(test(data))[0])
            if sp.issparse(X):                                         # flat indexes X.data
                major, minor = int(np.searchsorted(X.indptr, flat, side="right") - 1), int(X.indices[flat])
                row, col = (minor, major) if sp.isspmatrix_csc(X) else (major, minor)
            else:
                row, col = divmod(flat, X.shape[1])
            raise DataError(f"X has {n} {what} value(s), first at cell {row + offset}, gene {col}; expression "
                            f"must be raw counts or log1p-normalised (>= 0, finite); pick another layer "
                            f"with --layer or clean the file")


def is_counts(X, n_max=200_000) -> bool:
    """Raw counts: every stored value (a sample of up to n_max) is a non-negative integer, and some exceed 1
    would fail for log1p data (values like 0.69, 1.1)."""
    data = X.data if sp.issparse(X) else np.asarray(X).ravel()
    if data.size == 0:
        return False
    sample = data[:: max(1, data.size // n_max)]
    return bool(np.all(sample == np.round(sample)) and sample.max() > 1)


def log_normalise(X, target=1e4):
    """x <- log1p(target * counts / total counts of the cell), in place on the stored values."""
    X = X.astype(np.float32, copy=False)
    total = np.asarray(X.sum(axis=1)).ravel()                          # (n_cells,)
    scale = (target / np.maximum(total, 1)).astype(np.float32)
    if sp.isspmatrix_csr(X):
        for s in range(0, X.shape[0], BLOCK):                          # blocks of rows: no (nnz,) temporary
            a, b = X.indptr[s], X.indptr[min(s + BLOCK, X.shape[0])]
            X.data[a:b] *= np.repeat(scale[s:s + BLOCK], np.diff(X.indptr[s:s + BLOCK + 1]))
    elif sp.isspmatrix_csc(X):
        X.data *= scale[X.indices]
    else:
        X *= scale[:, None]
    data = X.data if sp.issparse(X) else X
    np.log1p(data, out=data)
    return X


def gene_stats(X, rows: np.ndarray, chunk=None):
    """Mean and (population) variance per gene over the given rows. Blocks of rows (chunk, default BLOCK) keep the
    float64 temporaries small: a sparse X is never densified or copied whole (a Norman-sized X is ~1.7 GB); X may
    be a DiskX."""
    chunk, (n, G) = chunk or BLOCK, X.shape
    w = np.zeros(n, np.float64)
    w[rows] = 1.0 / max(len(rows), 1)
    mean, ex2 = np.zeros(G), np.zeros(G)
    for s in range(0, n, chunk):                                       # blocks of cells, not a cell loop
        wb = w[s:s + chunk]                                            # (b,)
        if not wb.any():
            continue
        if sp.isspmatrix_csr(X):                                       # the block's stored values, no copy of it
            a, b = X.indptr[s], X.indptr[min(s + chunk, n)]
            v, wv = X.data[a:b].astype(np.float64), np.repeat(wb, np.diff(X.indptr[s:s + chunk + 1]))  # (nnz_b,)
            mean += np.bincount(X.indices[a:b], v * wv, G)
            ex2 += np.bincount(X.indices[a:b], v * v * wv, G)
        else:
            B = X[s:s + chunk].astype(np.float64)                      # (b, G)
            mean += np.asarray(B.T @ wb).ravel()
            ex2 += np.asarray((B.multiply(B) if sp.issparse(B) else B * B).T @ wb).ravel()
    return mean, np.maximum(ex2 - mean ** 2, 0.0)


def select_genes(X, rows, n_genes, keep=()) -> np.ndarray:
    """Highly variable genes on the training rows: dispersion var/mean, z-scored within 20 bins of mean
    expression (Seurat's 'normalised dispersion'); genes in `keep` (perturbation targets) always kept.
    Returns sorted column indices."""
    G = X.shape[1]
    if n_genes <= 0 or n_genes >= G:
        return np.arange(G)
    mean, var = gene_stats(X, rows)
    disp = np.log(var / np.maximum(mean, 1e-12) + 1e-12)
    disp[mean == 0] = -np.inf
    edges = np.quantile(mean, np.linspace(0, 1, 21)[1:-1])
    bins = np.searchsorted(edges, mean)
    score = np.full(G, -np.inf)
    for b in np.unique(bins):                                          # 20 bins, not a loop over genes
        m = (bins == b) & np.isfinite(disp)
        if m.sum() > 1:
            score[m] = (disp[m] - disp[m].mean()) / (disp[m].std() + 1e-12)
        elif m.any():
            score[m] = 0.0
    keep = np.asarray(sorted(set(keep)), dtype=int)
    score[keep] = np.inf
    return np.sort(np.argsort(-score, kind="stable")[:n_genes])


def gene_symbols(h: H5AD, column=None) -> np.ndarray:
    """The var index, or a symbol column when the index holds Ensembl IDs (or --gene-symbols is given).
    Duplicated symbols get suffixes -1, -2 (as anndata's var_names_make_unique)."""
    names = h.var_names
    if column is None and np.mean([bool(re.match(r"ENS[A-Z]*G\d{6,}", str(n))) for n in names[:200]]) > 0.5:
        column = next((c for c in SYMBOL_KEYS if c in h.var), None)
        if column is None:
            raise DataError(f"var names look like Ensembl IDs ({names[0]}) and no symbol column was found "
                            f"among {list(h.var)}; name one with --gene-symbols")
    if column is not None:
        if column not in h.var:
            raise DataError(f"gene-symbol column {column!r} not in var; var columns: {list(h.var)}")
        names = np.where(h.var[column] == None, names, h.var[column])  # noqa: E711  (missing -> ID)
    names = np.array([str(n) for n in names], dtype=object)
    seen: dict[str, int] = {}
    for i, n in enumerate(names):                                      # runs once per gene at load
        if n in seen:
            seen[n] += 1
            names[i] = f"{n}-{seen[n]}"
        else:
            seen[n] = 0
    return names


# ----------------------------------------------------------------------------- perturbations
def find_key(columns, wanted, given, what, flag):
    if given is not None:
        if given not in columns:
            raise DataError(f"{what} column {given!r} not in obs; obs columns: {list(columns)}")
        return given
    for k in wanted:
        for c in columns:
            if c.lower() == k:
                return c
    return None


def find_control(labels: np.ndarray, given=None) -> str:
    uniq, counts = np.unique(labels.astype(str), return_counts=True)
    if given is not None:
        if given not in uniq:
            top = [str(u) for u in uniq[np.argsort(-counts, kind="stable")[:8]]]
            raise DataError(f"control label {given!r} not found; most frequent labels: {list(top)}")
        return str(given)
    lower = {u.lower(): u for u in uniq}
    for c in CONTROL_LABELS:
        if c in lower:
            return str(lower[c])
    top = [str(u) for u in uniq[np.argsort(-counts, kind="stable")[:8]]]
    raise DataError(f"no control label found (tried {CONTROL_LABELS}); most frequent labels: "
                    f"{list(top)}; name it with --control")


def parse_condition(label: str, control: str, sep: str = "+", dose=None, rename=None) -> tuple[str, ...]:
    """'A+B' == 'B+A' -> ('A', 'B'); GEARS 'A+ctrl' / 'ctrl+B' -> ('A',) / ('B',); the control -> ().
    A dose (scalar) is attached to every component as 'A@10'. rename: {component: name} (see match_case)."""
    ctrl = {control.lower(), "ctrl", "control"}
    if str(label).strip().lower() in ctrl:                             # 'non_targeting' with sep '_'
        return ()
    parts = [p.strip() for p in str(label).split(sep)]
    comps = sorted((rename or {}).get(p, p) for p in parts if p and p.lower() not in ctrl)
    if dose is not None and np.isfinite(dose) and comps:
        comps = sorted(f"{p}@{dose:g}" for p in comps)
    return tuple(comps)


def detect_sep(labels, control, genes=()) -> str:
    """'+' when any label has it; else '|', ';' or '_' when every part of every label holding it is itself a
    label or a gene name, in any case (so 'A_B' is a combination of A and B, not a gene called A_B); else '+'."""
    labels = set(map(str, labels))
    if any("+" in l for l in labels):
        return "+"
    known = {x.upper() for x in (*labels, *map(str, genes), control, "ctrl", "control")}
    for sep in ("|", ";", "_"):
        combos = [l for l in labels if sep in l and l != control]
        if combos and all(all(p.strip().upper() in known for p in l.split(sep)) for l in combos):
            return sep
    return "+"


def match_case(components, genes) -> dict:
    """{component: gene} for perturbation components that name a gene only in another case ('tmsb4x' ->
    'TMSB4X'), with a warning: the target is then kept in gene selection and gets its gene's prior features."""
    exact, upper = set(genes), {}
    for g in genes:
        upper.setdefault(g.upper(), g)
    fix = {c: upper[c.upper()] for c in sorted(components) if c not in exact and c.upper() in upper}
    if fix:
        warnings.warn(f"{len(fix)} perturbation label(s) name a gene in another case; using the gene names: "
                      + ", ".join(f"{a} -> {b}" for a, b in list(fix.items())[:10]))
    return fix


def components_of(label: str):
    """Canonical label 'A@10+B@10' -> [('A', 10.0), ('B', 10.0)]; no dose -> None."""
    out = []
    for p in label.split("+"):
        name, _, dose = p.partition("@")
        out.append((name, float(dose) if dose else None))
    return out


# ----------------------------------------------------------------------------- splits
PRIOR_MIN_CORR = 0.2   # the prior is trusted only when it correlates at least this well with training deltas


def prior_kind(key, train) -> str:
    """What the additive prior of `key` is made of, given the training keys: 'additive' when every component
    has a training single in the key's covariate, 'transfer' when every component has one in some covariate,
    else 'none'. The key itself never counts (a training single is not its own prior)."""
    train = set(map(tuple, train)) - {tuple(key)}
    comps = key[0].split("+")
    if all((c, key[1]) in train for c in comps):
        return "additive"
    seen = {l for l, _ in train}
    return "transfer" if all(c in seen for c in comps) else "none"


def make_split(keys, mode="auto", test=None, test_frac=0.25, val_frac=0.15, seed=0):
    """Split (condition, covariate) keys by condition. additive: every single in training; combinations
    whose components are all seen as singles (in that covariate) are test candidates. random: a fraction
    of conditions per covariate. explicit: `test` lists conditions ('A+B' or 'A+B:COV')."""
    keys = sorted(keys)
    rng = np.random.default_rng(seed)
    singles = {(l, c) for l, c in keys if "+" not in l}
    if test:                                         # an explicit list wins over any mode
        mode = "explicit"
    additive_cand = [(l, c) for l, c in keys if "+" in l and all((p, c) in singles for p in l.split("+"))]
    if mode == "auto":
        mode = "additive" if additive_cand else "random"
        if not additive_cand and any("+" in l for l, _ in keys):
            warnings.warn("split auto: no combination has all its singles in the data, so no additive split; "
                          "using a random split")

    def take(pool, frac, least=3):
        """A random fraction of pool (at least one when pool has >= least entries)."""
        pool = [pool[i] for i in rng.permutation(len(pool))]
        n = int(round(frac * len(pool)))
        n = max(n, 1) if len(pool) >= least and frac > 0 else n
        return pool[:n], pool[n:]

    if mode == "additive":
        if not additive_cand:
            raise DataError("split 'additive' needs combinations (A+B) whose singles are in the data; "
                            "this data has none: use --split random or --test")
        test_keys, rest = take(additive_cand, test_frac, least=1)
        val_keys, _ = take(rest, val_frac / max(1 - test_frac, 1e-9))   # combinations like the test's
        if not val_keys:
            warnings.warn("split additive: no combination left for validation; there is no validation set "
                          "(the last checkpoint is the result): lower --test-frac or add combinations")
    elif mode == "random":
        test_keys, val_keys, used = [], [], set()
        for cov in sorted({c for _, c in keys}):     # a condition is held out in one covariate at most
            mine = [k for k in keys if k[1] == cov]
            fresh = [k for k in mine if k[0] not in used]
            t, _ = take(fresh if len(fresh) >= 3 else mine, test_frac)
            rest = [k for k in mine if k not in t]
            fresh = [k for k in rest if k[0] not in used | {x[0] for x in t}]
            v, _ = take(fresh if len(fresh) >= 3 else rest, val_frac)
            test_keys += t
            val_keys += v
            used |= {k[0] for k in t + v}
    elif mode == "explicit":
        if not test:
            raise DataError("split 'explicit' needs --test A+B,C+D (conditions to hold out)")
        wanted = [w.strip() for w in (test.split(",") if isinstance(test, str) else test) if w.strip()]
        test_keys = []
        for w in wanted:
            lab, _, cov = w.partition(":")
            lab = "+".join(sorted(lab.split("+")))
            hit = [k for k in keys if k[0] == lab and (not cov or k[1] == cov)]
            if not hit:
                raise DataError(f"--test condition {w!r} not found; examples: {[k[0] for k in keys[:8]]}")
            test_keys += hit
        # validation like the test: keys whose prior is of the same kind once the test keys are out
        rest = [k for k in keys if k not in test_keys]
        kinds = {prior_kind(k, rest) for k in test_keys}
        n_comp = {len(k[0].split("+")) for k in test_keys}
        pool = [k for k in rest if len(k[0].split("+")) in n_comp and prior_kind(k, rest) in kinds]
        if not pool:
            pool = [k for k in rest if len(k[0].split("+")) in n_comp]
            warnings.warn(f"no validation condition has a prior like the test's ({sorted(kinds)}); validating "
                          f"on {len(pool)} other conditions with as many components instead")
        val_keys, _ = take(pool, val_frac)
    else:
        raise DataError(f"unknown split {mode!r}; use additive, random or explicit (--test A+B,C+D)")
    held = set(test_keys) | set(val_keys)
    return {"train": [k for k in keys if k not in held], "val": sorted(val_keys), "test": sorted(test_keys)}


# ----------------------------------------------------------------------------- dataset
@dataclass
class DataConfig:
    data: str | None = None         # h5ad path; None -> the built-in simulator (cached)
    layer: str | None = None        # read this layer instead of X
    pert_key: str | None = None     # perturbation column (auto-detected)
    control: str | None = None      # control label (auto-detected)
    covariate_key: str | None = None  # covariate column, e.g. cell line (auto; 'none' disables)
    dose_key: str | None = None     # dose column (auto; used when numeric and not constant)
    gene_symbols: str | None = None  # var column with gene symbols (auto when var names are Ensembl)
    n_genes: int = 2000             # highly variable genes to keep (0 = all)
    min_cells: int = 10             # conditions with fewer cells are dropped (with a warning)
    split: str = "auto"             # auto | additive | random | explicit
    test: str | None = None         # explicit test conditions 'A+B,C+D' (or 'A+B:COV')
    test_frac: float = 0.25         # fraction of candidate conditions held out for test
    val_frac: float = 0.15          # fraction held out for validation
    seed: int = 0                   # seed of weights and sampling (the split has its own)
    split_seed: int = 0             # seed of the split: which conditions are held out
    n_de: int = 50                  # top DE genes per condition (by |Welch t|)
    std_floor: float = 0.1          # floor on control std (z-scores, Welch t)
    lazy: bool = False              # leave X on disk: read it in blocks of cells (twice), never the whole matrix
    ref_cells: int = 0              # real cells per condition kept for rewards and metrics (a seeded sample; 0 = all)


@dataclass
class Reference:
    """Real statistics of one (condition, covariate), in log1p expression space."""
    ctrl_mean: torch.Tensor  # (G,) mean of the covariate's control cells
    ctrl_std: torch.Tensor   # (G,) their std, floored
    mean: torch.Tensor       # (G,) mean of the real perturbed cells
    delta: torch.Tensor      # (G,) mean - ctrl_mean
    t: torch.Tensor          # (G,) Welch t statistic, perturbed vs control
    de_idx: torch.Tensor     # (n_de,) long, top genes by |t|, descending
    X: torch.Tensor          # (N, G) the real perturbed cells: dense, or sparse CSR (load_dataset: a view of ds.X)

    @property
    def cells(self) -> torch.Tensor:
        """(N, G) the real cells, dense, on X's device; a sparse X is densified at every access (see dense)."""
        return self.X.to_dense() if self.X.layout == torch.sparse_csr else self.X

    def dense(self) -> "Reference":
        """This reference with its cells densified once (for code that reads them several times)."""
        return replace(self, X=self.cells)

    def to(self, device) -> "Reference":
        """On `device`; sparse cells stay sparse (moved once, densified there on access)."""
        return Reference(*(getattr(self, f.name).to(device) for f in fields(self)))


class SparseRows:
    """The expression matrix of the selected genes, (n_cells, G) float32 log1p, stored as CSR: memory grows with the
    non-zeros, not cells x genes. Indexing densifies only what it selects: X[rows] -> (len(rows), G) ndarray (a
    training batch, a reference's cells, the control cells of a prediction). `csr` is the matrix itself;
    np.asarray(X) densifies all of it (small data, tests)."""

    def __init__(self, csr: sp.csr_matrix):
        self.csr, self.shape, self.dtype = csr, csr.shape, csr.dtype

    def __getitem__(self, idx) -> np.ndarray:
        out = self.csr[idx].toarray()
        return out[0] if isinstance(idx, (int, np.integer)) else out

    def __array__(self, dtype=None, copy=None):
        return self.csr.toarray() if dtype is None else self.csr.toarray().astype(dtype)


@dataclass
class Dataset:
    X: SparseRows                     # (n_cells, G) float32 log1p expression, CSR (X[rows] dense), rows grouped by key
    genes: list                       # (G,) gene symbols
    cond: np.ndarray                  # (n_cells,) canonical label: 'ctrl', 'A', 'A+B' (sorted), 'D@10'
    cov: np.ndarray                   # (n_cells,) covariate label; 'all' without one
    is_ctrl: np.ndarray               # (n_cells,) bool
    keys: list                        # non-control (condition, covariate) pairs
    split: dict                       # 'train' / 'val' / 'test' -> keys
    components: list                  # perturbation vocabulary (names without dose)
    covariates: list
    refs: dict                        # key -> Reference
    ctrl_idx: dict                    # covariate -> row indices of its control cells
    cell_idx: dict                    # key -> row indices of its cells
    meta: dict = field(default_factory=dict)  # keys and labels found, for writing predictions

    def component_deltas(self, key) -> list:
        """Per component of `key`, its training single-perturbation mean delta (G,): from the same covariate,
        else the mean over the other covariates, else None. A key is never its own prior: a training single
        gets its delta from the other covariates (or none), exactly what a held-out single would get, so
        training conditions look like test conditions."""
        train = set(self.split["train"]) - {tuple(key)}
        out = []
        for comp in key[0].split("+"):
            other = [self.refs[(comp, c)].delta.numpy() for c in self.covariates if (comp, c) in train]
            out.append(self.refs[(comp, key[1])].delta.numpy() if (comp, key[1]) in train else
                       np.mean(other, axis=0) if other else None)
        return out

    def additive_delta(self, key) -> np.ndarray:
        """The additive prior of `key`: the sum of its component_deltas (a missing one counts zero)."""
        return sum((d for d in self.component_deltas(key) if d is not None),
                   np.zeros(len(self.genes), np.float32)).astype(np.float32)

    def prior_kind(self, key) -> str:
        return prior_kind(key, self.split["train"])

    def mean_delta(self, key) -> np.ndarray:
        """The mean delta of the training perturbations of key's covariate, key itself left out (the
        training-mean baseline, the best simple predictor on mcfaline23's cell-line transfer)."""
        ds = [self.refs[k].delta.numpy() for k in self.split["train"] if k[1] == key[1] and k != tuple(key)]
        return np.mean(ds, axis=0).astype(np.float32) if ds else np.zeros(len(self.genes), np.float32)

    def prior_trust(self, min_corr: float = PRIOR_MIN_CORR) -> dict:
        """{kind: c}: how far each kind of prior is trusted: the additive prior of an 'additive' or 'transfer'
        key (prior_kind), and the training-mean delta ('mean', mean_delta). Fitted on the training keys, whose
        priors never contain themselves, pooled over keys and genes: the direction must carry information,
        rho = sum <d, p> / sqrt(sum |d|^2 sum |p|^2) >= min_corr, and then c = min(1, sqrt(sum |d|^2 / sum |p|^2))
        matches the prior to the size of the real deltas d (else c = 0). Measured: the simulator's combinations
        rho 0.50, c 0.84 (the plain sum exaggerates: effect ratio 1.37); mcfaline23's other-cell-line prior
        rho 0.03, so c = 0. The least-squares slope rho * sqrt(...) (0.42 on the simulator) shrinks the shift so
        far that sampling noise swamps it (Pearson of deltas 0.35 against 0.40); the plain sum (c = 1) keeps the
        exaggeration (README)."""
        sums = {kind: np.zeros(3) for kind in ("additive", "transfer", "mean")}   # <d, p>, |d|^2, |p|^2
        for k in self.split["train"]:
            d, kind = self.refs[k].delta.numpy().astype(np.float64), self.prior_kind(k)
            for kd, p in [(kind, self.additive_delta(k)), ("mean", self.mean_delta(k))]:
                if kd != "none":
                    p = p.astype(np.float64)
                    sums[kd] += [p @ d, d @ d, p @ p]
        out = {"none": 0.0}
        for kind, (pd, dd, pp) in sums.items():
            ok = pp > 0 and dd > 0 and pd / np.sqrt(dd * pp) >= min_corr
            out[kind] = float(min(1.0, np.sqrt(dd / pp))) if ok else 0.0
        return out

    def shift(self, key, trust=None) -> np.ndarray:
        """Where the generator starts for `key` (a delta): c * its additive prior when that kind is trusted,
        else c_mean * the training-mean delta when that is trusted, else zero."""
        trust = trust or self.prior_trust()
        c = trust[self.prior_kind(key)]
        return c * self.additive_delta(key) if c > 0 else trust["mean"] * self.mean_delta(key)

    def key_table(self, keys) -> dict:
        """Padded tensors describing each key: comps (K, C) 1 + index into components (0 = padding),
        dose (K, C) log1p(dose)/log1p(max dose) (1 without dose), cov (K,), prior (K, G) expression space, and
        shift (K, G), where the generator starts (Dataset.shift)."""
        parsed = [components_of(k[0]) for k in keys]
        C = max(len(p) for p in parsed)
        index = {c: i + 1 for i, c in enumerate(self.components)}
        dmax = np.log1p(self.meta.get("max_dose", 1.0) or 1.0)
        comps = torch.zeros(len(keys), C, dtype=torch.long)
        dose = torch.zeros(len(keys), C)
        for i, p in enumerate(parsed):
            for j, (name, d) in enumerate(p):
                comps[i, j] = index.get(name, 0)
                dose[i, j] = 1.0 if d is None else float(np.log1p(d) / dmax)
        cov = torch.tensor([self.covariates.index(k[1]) for k in keys])
        prior = torch.from_numpy(np.stack([self.additive_delta(k) for k in keys]))   # (K, G)
        trust = self.prior_trust()
        shift = torch.from_numpy(np.stack([self.shift(k, trust) for k in keys]))     # (K, G)
        return {"comps": comps, "dose": dose, "cov": cov, "prior": prior, "shift": shift}


def sample_stats(X):
    """Mean and sample variance (ddof 1; 0 for one row) per gene of the rows of X: an ndarray, a scipy CSR matrix or a
    torch sparse CSR tensor, sums of x and x^2 accumulated in float64 over blocks of rows; sparse X is never
    densified (per block, bincount of the stored values by gene)."""
    n, G = X.shape
    if isinstance(X, torch.Tensor):
        X = (X.values().numpy(), X.col_indices().numpy(), X.crow_indices().numpy())
    elif sp.issparse(X):
        X = X.tocsr()
        X = (X.data, X.indices, X.indptr)
    s1, s2 = np.zeros(G), np.zeros(G)
    for s in range(0, n, BLOCK):                                       # blocks of cells, not a cell loop
        if isinstance(X, tuple):
            data, idx, ptr = X
            a, b = ptr[s], ptr[min(s + BLOCK, n)]
            v = data[a:b].astype(np.float64)
            s1, s2 = s1 + np.bincount(idx[a:b], v, G), s2 + np.bincount(idx[a:b], v * v, G)
        else:
            B = X[s:s + BLOCK].astype(np.float64)
            s1, s2 = s1 + B.sum(0), s2 + (B * B).sum(0)
    mean = s1 / n
    return mean, np.maximum(s2 - n * mean ** 2, 0) / (n - 1) if n > 1 else np.zeros(G)


def reference(cells, ctrl, ctrl_mean, ctrl_std, n_de, std_floor, keep=None) -> Reference:
    """Welch t = (mean_p - mean_c) / sqrt(var_p/n_p + s_c^2/n_c) with the control std s_c floored (the same
    floored std the verifiers and metrics use, so a gene constant in controls cannot dominate); top n_de by |t|.
    cells: (N, G) ndarray, or a sparse CSR tensor (csr_rows), kept as it is in the Reference; keep: the rows kept
    instead (a sample, --ref-cells: rewards and metrics cost O(N^2) in real cells); the statistics use all N."""
    n = cells.shape[0]
    mean, var = sample_stats(cells)
    ctrl_std = np.maximum(ctrl_std, std_floor)
    t = (mean - ctrl_mean) / np.sqrt(var / n + ctrl_std ** 2 / len(ctrl) + 1e-8)
    de = np.argsort(-np.abs(t), kind="stable")[: min(n_de, len(t))]
    f = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    if isinstance(cells, np.ndarray):
        cells = torch.from_numpy(cells if keep is None else cells[keep])
    elif keep is not None:                                             # a copy of the kept rows
        cells = csr_rows(sp.csr_matrix((cells.values().numpy(), cells.col_indices().numpy(),
                                        cells.crow_indices().numpy()), shape=tuple(cells.shape))[keep], 0, len(keep))
    return Reference(f(ctrl_mean), f(ctrl_std), f(mean), f(mean - ctrl_mean), f(t),
                     torch.from_numpy(de.astype(np.int64)), cells)


def csr_rows(X: sp.csr_matrix, a: int, b: int) -> torch.Tensor:
    """Rows a..b of a CSR matrix as a torch sparse CSR tensor sharing its values and column indices (scipy's X[a:b]
    copies them, and so does a scipy matrix built on a slice of them)."""
    p0, p1 = X.indptr[a], X.indptr[b]
    with warnings.catch_warnings():                                    # "sparse CSR support is in beta"
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(torch.from_numpy((X.indptr[a:b + 1] - p0).astype(X.indices.dtype)),
                                       torch.from_numpy(X.indices[p0:p1]), torch.from_numpy(X.data[p0:p1]),
                                       (b - a, X.shape[1]), check_invariants=False)


def cache_dir() -> Path:
    return Path(os.environ.get("PERTURBCELLRL_CACHE", Path.home() / ".cache" / "perturbcellrl"))


def builtin_path() -> str:
    """The built-in synthetic benchmark, simulated once and cached."""
    path = cache_dir() / "simulated_v1_seed0.h5ad"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_h5ad(path, simulate(seed=0))
    return str(path)


def load_dataset(cfg: DataConfig, genes=None, split=None) -> Dataset:
    """Read, check, normalise, parse, split, select genes and compute references. `genes` and `split`
    (from a checkpoint) override the selection and the split, so every stage sees the same ones."""
    h = read_h5ad(cfg.data or builtin_path(), layer=cfg.layer, lazy=cfg.lazy)
    pert_key = find_key(h.obs, PERT_KEYS, cfg.pert_key, "perturbation", "--pert-key")
    if pert_key is None:
        raise DataError(f"no perturbation column found (tried {PERT_KEYS}); obs columns: {list(h.obs)}; "
                        f"name it with --pert-key")
    labels = np.array([str(v) for v in h.obs[pert_key]], dtype=object)
    missing = np.array([v is None for v in h.obs[pert_key]])
    if missing.any():
        warnings.warn(f"dropping {int(missing.sum())} cells with no value in {pert_key!r}")
    control = find_control(labels, cfg.control)
    cov_key = None if cfg.covariate_key == "none" else find_key(h.obs, COV_KEYS, cfg.covariate_key,
                                                                "covariate", "--covariate-key")
    covs = np.array([str(v) for v in h.obs[cov_key]], dtype=object) if cov_key else \
        np.full(len(labels), "all", dtype=object)
    dose_key = find_key(h.obs, DOSE_KEYS, cfg.dose_key, "dose", "--dose-key")
    doses = None
    if dose_key is not None:
        try:
            doses = np.array([np.nan if v is None else float(v) for v in h.obs[dose_key]])
        except (TypeError, ValueError):
            doses = None
        if doses is None or len(np.unique(doses[np.isfinite(doses)])) < 2:
            if cfg.dose_key:
                raise DataError(f"dose column {dose_key!r} is not numeric with at least two values")
            dose_key, doses = None, None
    # canonical labels, parsed once per distinct (label, dose)
    symbols = gene_symbols(h, cfg.gene_symbols)
    distinct = np.unique(labels)
    sep = detect_sep(distinct, control, symbols)
    case = match_case({p for lab in distinct for p in parse_condition(lab, control, sep)}, symbols)
    dstr = (np.char.mod("%g", doses) if doses is not None else np.full(len(labels), "nan")).astype(object)
    uniq, inv = np.unique((labels + "\x1f" + dstr).astype(str), return_inverse=True)
    canon = []
    for u in uniq:                                                     # once per distinct label
        lab, d = u.split("\x1f")
        c = parse_condition(lab, control, sep, None if d == "nan" else float(d), case)
        canon.append("+".join(c) if c else "ctrl")
    original = dict(zip(canon, (u.split("\x1f")[0] for u in uniq)))   # canonical -> a label as in the file
    cond = np.array(canon, dtype=object)[inv.ravel()]
    cond[missing] = "<missing>"                      # dropped below, never a key
    is_ctrl = cond == "ctrl"
    for cv in np.unique(covs):
        if not is_ctrl[covs == cv].any():
            raise DataError(f"covariate {cov_key}={cv!r} has no control cells ({control!r}); drop those "
                            f"cells or choose another --covariate-key (or 'none')")
    # keys with enough cells
    uniq, inv, counts = np.unique((cond + "\x1f" + covs).astype(str), return_inverse=True, return_counts=True)
    uniq = [tuple(u.split("\x1f")) for u in uniq]
    small = [f"{l}|{c} ({n})" for (l, c), n in zip(uniq, counts) if n < cfg.min_cells and l not in ("ctrl", "<missing>")]
    if small:
        warnings.warn(f"dropping {len(small)} condition(s) with < {cfg.min_cells} cells: {small[:20]}")
    keep = ((counts[inv.ravel()] >= cfg.min_cells) | is_ctrl) & ~missing
    keys = sorted((l, c) for (l, c), n in zip(uniq, counts) if n >= cfg.min_cells and l not in ("ctrl", "<missing>"))
    if not keys:
        n = [c for (l, _), c in zip(uniq, counts) if l not in ("ctrl", "<missing>")]
        raise DataError(f"no perturbed condition has >= {cfg.min_cells} cells (the largest has {max(n)}); lower "
                        "--min-cells" if n else f"there are no perturbed cells: every cell's {pert_key!r} is the "
                        f"control {control!r} or missing; check --pert-key and --control")
    if split is not None:
        split = {k: [tuple(x) for x in v] for k, v in split.items()}
        unknown = [k for v in split.values() for k in v if k not in set(keys)]
        if unknown:
            raise DataError(f"{len(unknown)} conditions of the checkpoint's split are not in this data (e.g. "
                            f"{unknown[:3]}); use the data (and --min-cells) the checkpoint was trained with")
    else:
        test = cfg.test
        if test:   # canonical spelling of user labels: 'B+A', 'A+ctrl', 'A_B' -> 'A+B' / 'A'
            test = ",".join("+".join(parse_condition(lab, control, sep, rename=case)) + (":" + cv if cv else "")
                            for lab, _, cv in (w.strip().partition(":") for w in test.split(",") if w.strip()))
        split = make_split(keys, cfg.split, test, cfg.test_frac, cfg.val_frac, cfg.split_seed)
    # expression: check, normalise (a DiskX does both per block as it is read), select genes, keep them as CSR
    X = h.X
    if cfg.lazy:
        counts_in = X.counts
    else:
        check_values(X)
        counts_in = is_counts(X)
        if counts_in:
            X = log_normalise(X)
    if genes is not None:
        pos = {g: i for i, g in enumerate(symbols)}
        missing = [g for g in genes if g not in pos]
        if missing:
            raise DataError(f"{len(missing)} of the checkpoint's {len(genes)} genes are not in the data "
                            f"(e.g. {missing[:5]}); use the data the checkpoint was trained on")
        cols = np.array([pos[g] for g in genes])
    else:
        train_set = set(split["train"])
        in_train = np.array([u in train_set for u in uniq])[inv.ravel()]     # per distinct key, then cells
        train_rows = np.flatnonzero(keep & (is_ctrl | in_train))
        targets = {n for l, _ in keys for n, _ in components_of(l)}
        cols = select_genes(X, train_rows, cfg.n_genes, [i for i, g in enumerate(symbols) if g in targets])
    # the selected columns as CSR (from disk block by block with --lazy), rows grouped by key so each key's cells
    # are one contiguous block (References are views of it)
    order = np.lexsort((cond, covs, ~is_ctrl))[keep[np.lexsort((cond, covs, ~is_ctrl))]]
    if cfg.lazy:
        Xs = sp.vstack([sp.csr_matrix(X[s:s + BLOCK][:, cols]) for s in range(0, X.shape[0], BLOCK)], format="csr")
    else:
        Xs = sp.csr_matrix(X[:, cols])                                 # columns first: the smaller copy
    h.X = X = None                                                     # free the full matrix
    X = Xs[order].astype(np.float32, copy=False)
    del Xs
    cond, covs, is_ctrl = cond[order], covs[order], is_ctrl[order]
    covariates = sorted(np.unique(covs).tolist())
    ctrl_idx = {c: np.flatnonzero(is_ctrl & (covs == c)) for c in covariates}
    bounds = np.flatnonzero(np.r_[True, (cond[1:] != cond[:-1]) | (covs[1:] != covs[:-1]), True])
    cell_idx = {(cond[a], covs[a]): np.arange(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if not is_ctrl[a]}
    ctrl_stats = {c: (*sample_stats(csr_rows(X, i[0], i[-1] + 1)), i) for c, i in ctrl_idx.items()}  # contiguous
    refs, rng = {}, np.random.default_rng(cfg.seed)                    # rng: the cells a capped Reference keeps
    for k in keys:                                                     # one pass per condition
        m, v, ci = ctrl_stats[k[1]]
        n = len(cell_idx[k])
        keep = np.sort(rng.choice(n, cfg.ref_cells, replace=False)) if 0 < cfg.ref_cells < n else None
        refs[k] = reference(csr_rows(X, cell_idx[k][0], cell_idx[k][-1] + 1), ci, m, np.sqrt(v), cfg.n_de,
                            cfg.std_floor, keep)
    components = sorted({n for l, _ in keys for n, _ in components_of(l)})
    finite = doses[np.isfinite(doses)] if doses is not None else np.array([1.0])
    meta = dict(pert_key=pert_key, control=control, cov_key=cov_key, dose_key=dose_key, counts=counts_in,
                sep=sep, max_dose=float(finite.max()) if finite.size else 1.0, n_cells_in=len(labels),
                n_genes_in=len(symbols), path=cfg.data or "built-in simulator", labels=original)
    return Dataset(SparseRows(X), [str(g) for g in symbols[cols]], cond, covs, is_ctrl, keys, split, components,
                   covariates, refs, ctrl_idx, cell_idx, meta)


# ----------------------------------------------------------------------------- simulator
def simulate(n_cells=6000, n_genes=1000, n_singles=40, n_combos=30, n_covariates=1, seed=0,
             mode="a", ctrl_frac=0.15, responder_frac=0.8, interaction_frac=0.5, chunk=5000) -> H5AD:
    """A Perturb-seq-like screen with known ground truth (raw counts, GEARS-style labels).

    Genes: real PROGENy footprint genes (about 60%) plus background genes. A cell's log-rate is
        log lam_cg = mu_g(line) + u_c . L_g + r_c * e_g(condition),
    with latent programs u_c (a cell-cycle-like program on 50 genes and a diffuse one), r_c = 1 for
    responders (a fraction `responder_frac`) and 0 otherwise; counts ~ NB(lib_c * lam_cg / sum lam, theta_g).
    A single perturbation of gene A (of pathway P): its own gene moves +2 (CRISPRa, mode 'a') or -2
    (CRISPRi, 'i'), the footprint of P moves by strength * sign * PROGENy weight / max|weight|, and about
    15 random genes move a little. A combination A+B = e_A + e_B + an interaction for a fraction of pairs:
    synergy (+50% of the sum), buffering (-50%), epistasis (B's footprint masked) or neomorphic (new genes).
    Cell lines shift baselines and scale effects. Same seed, same data. Truth is in uns['truth']."""
    rng = np.random.default_rng(seed)
    table = np.genfromtxt(ROOT / "pathways" / "progeny_human_top100.csv", delimiter=",", names=True,
                          dtype=None, encoding="utf-8")
    paths = sorted(set(table["pathway"]))
    n_fp = int(0.6 * n_genes)
    per = max(1, n_fp // len(paths))
    fp_genes, fp_path = [], {}
    for p in paths:                                                    # 14 pathways
        rows = table[table["pathway"] == p]
        rows = rows[np.argsort(-np.abs(rows["weight"]))]
        for g in rows["gene"][:per]:
            if g not in fp_path:
                fp_path[g] = p
                fp_genes.append(g)
    genes = np.array(fp_genes[:n_genes] + [f"SIM{i:05d}" for i in range(max(0, n_genes - len(fp_genes)))],
                     dtype=object)
    G = len(genes)
    gidx = {g: i for i, g in enumerate(genes)}
    W = np.zeros((len(paths), G))                                      # (P, G) signed footprints
    for g, p, w in zip(table["gene"], table["pathway"], table["weight"]):
        if g in gidx:
            W[paths.index(p), gidx[g]] = w
    W /= np.abs(W).max(1, keepdims=True) + 1e-12
    # singles: targets spread over pathways
    pool = [g for g in fp_genes if g in gidx]
    targets = list(rng.choice(pool, size=min(n_singles, len(pool)), replace=False))
    effects, names, kinds, tpath = [], [], [], []
    own = 2.0 if mode == "a" else -2.0
    single = {}
    for a in targets:
        e = np.zeros(G)
        p = paths.index(fp_path[a])
        e += rng.uniform(0.5, 1.0) * rng.choice([-1, 1]) * W[p]
        e[rng.choice(G, 15, replace=False)] += rng.normal(0, 0.4, 15)
        e[gidx[a]] = own
        single[a] = e
        names.append(f"{a}+ctrl"), effects.append(e), kinds.append("single"), tpath.append(fp_path[a])
    # combinations with interactions
    pairs = set()
    while len(pairs) < min(n_combos, len(targets) * (len(targets) - 1) // 2):
        a, b = sorted(rng.choice(targets, 2, replace=False))
        pairs.add((a, b))
    for a, b in sorted(pairs):
        e = single[a] + single[b]
        kind = rng.choice(["synergy", "buffering", "epistasis", "neomorphic"]) \
            if rng.random() < interaction_frac else "none"
        if kind == "synergy":
            e = e + 0.5 * (single[a] + single[b])
        elif kind == "buffering":
            e = e - 0.5 * (single[a] + single[b])
        elif kind == "epistasis":
            e = e - single[b]
            e[gidx[b]] += own
        elif kind == "neomorphic":
            e[rng.choice(G, 20, replace=False)] += rng.normal(0, 0.6, 20)
        names.append(f"{a}+{b}"), effects.append(e), kinds.append(kind), tpath.append("")
    E = np.stack(effects)                                              # (K, G)
    # baseline, programs, cell lines
    mu = rng.normal(0.0, 1.0, G)
    L = np.zeros((2, G))
    L[0, rng.choice(G, 50, replace=False)] = rng.uniform(0.5, 1.0, 50)  # cell-cycle-like program
    L[1] = rng.normal(0, 0.15, G)                                      # diffuse program
    theta = np.exp(rng.normal(np.log(5.0), 0.5, G))
    lines = [f"line{i}" for i in range(n_covariates)]
    mu_line = mu + rng.normal(0, 0.3, (n_covariates, G)) * (n_covariates > 1)
    scale_line = rng.uniform(0.7, 1.3, n_covariates) if n_covariates > 1 else np.ones(1)
    # cell assignment: controls, then an even share per condition and line
    n_ctrl = int(ctrl_frac * n_cells)
    k_of = np.r_[np.full(n_ctrl, -1), rng.permutation(np.arange(n_cells - n_ctrl) % len(names))]
    line_of = rng.integers(0, n_covariates, n_cells)
    blocks = []
    for s in range(0, n_cells, chunk):                                 # chunks bound memory, not a cell loop
        k, ln = k_of[s:s + chunk], line_of[s:s + chunk]
        n = len(k)
        u = rng.normal(0, 1, (n, 2))
        resp = (rng.random(n) < responder_frac) & (k >= 0)
        eff = np.where(resp[:, None], E[np.maximum(k, 0)] * scale_line[ln][:, None], 0.0)
        logit = mu_line[ln] + u @ L + eff                              # (n, G)
        lam = np.exp(logit - logit.max(1, keepdims=True))
        lam /= lam.sum(1, keepdims=True)
        lib = np.exp(rng.normal(np.log(4000), 0.35, n))[:, None]
        rate = rng.gamma(theta, lib * lam / theta)                     # NB as a gamma-Poisson mixture
        blocks.append(sp.csr_matrix(rng.poisson(rate).astype(np.float32)))
    X = sp.vstack(blocks, format="csr")
    cond = np.array(["ctrl" if k < 0 else names[k] for k in k_of], dtype=object)
    obs = {"condition": cond}
    if n_covariates > 1:
        obs["cell_type"] = np.array([lines[i] for i in line_of], dtype=object)
    truth = {"conditions": np.array(names, dtype=object), "effects": E.astype(np.float32),
             "interaction": np.array(kinds, dtype=object), "pathway": np.array(tpath, dtype=object),
             "pathways": np.array(paths, dtype=object), "footprints": W.astype(np.float32),
             "line_scale": scale_line.astype(np.float32), "responder_frac": float(responder_frac)}
    return H5AD(X=X, obs=obs, var={}, obs_names=np.array([f"cell{i}" for i in range(n_cells)], dtype=object),
                var_names=genes, uns={"truth": truth})


# ----------------------------------------------------------------------------- CLI
def add_args(p: argparse.ArgumentParser, cls=DataConfig) -> None:
    """One flag per dataclass field (--n-genes ...); other stages call this with their config."""
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        typ = {"int": int, "float": float, "bool": None}.get(str(f.type).split(" ")[0], str)
        if f.type in ("bool",) or isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            p.add_argument(flag, type=typ, default=f.default)


# parse-time limits of every stage's numeric options, by name: name -> (test, what it must be); see check_args
LIMITS = {name: (test, what) for names, test, what in [
    ("steps batch_size save_every eval_every eval_cells eval_steps log_every conds T epochs topk width depth d_pert "
     "n_de pretrain_steps n_cells cells genes covariates timeout", lambda v: v >= 1, "an integer >= 1"),
    ("n_genes min_cells prior_dim warmup stop_at ref_cells", lambda v: v >= 0, "an integer >= 0"),
    ("lr noise clip adv_clip grad_clip std_floor sigma", lambda v: v > 0, "a finite number > 0"),
    ("beta weight_decay sde_noise", lambda v: v >= 0, "a finite number >= 0"),
    ("test_frac val_frac prior_dropout ctrl_frac min_lr_frac ema_decay", lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    ("t_frac", lambda v: 0 < v <= 1, "a number in (0, 1]"),
    ("group", lambda v: v >= 2, "an integer >= 2 (GRPO compares the cells of a group)")] for name in names.split()}


def check_args(args) -> None:
    """Every numeric option of a config or argparse namespace within its LIMITS and finite, else one line."""
    for name, v in vars(args).items():
        rule = LIMITS.get(name)
        if rule and isinstance(v, (int, float)) and not (np.isfinite(v) and rule[0](v)):
            raise DataError(f"--{name.replace('_', '-')} {v}: must be {rule[1]}")


def _same_file(a, b) -> bool:
    """a and b name one file: equal once links are resolved, or the same inode (hard links)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_outputs(outputs: dict, inputs: dict) -> None:
    """Before any work: refuse an output that is the same file as an input or another output, create its
    folder, and fail now if that folder cannot be written. {what: path, list of paths or None} each."""
    ins = [(k, os.fspath(p)) for k, v in inputs.items() for p in (v if isinstance(v, (list, tuple)) else [v]) if p]
    for what, path in outputs.items():
        if not path:
            continue
        path = os.fspath(path)
        clash = next((f"{k} {p}" for k, p in ins if _same_file(path, p)), None)
        if clash:
            raise DataError(f"{what} {path} is the same file as {clash}; writing it would destroy that file: "
                            "choose another output path")
        if os.path.isdir(path):
            raise DataError(f"{what} {path} is a folder; give a file path")
        folder = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(folder, exist_ok=True)
            tempfile.TemporaryFile(dir=folder).close()                # a read-only folder fails here, not at the end
        except OSError as e:
            raise DataError(f"{what} {path}: cannot write into {folder} ({e.strerror or e}); choose a writable "
                            "location") from None
        ins.append((what, path))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_args(p)
    p.add_argument("--simulate", metavar="OUT", help="write the synthetic benchmark to OUT and exit")
    p.add_argument("--cells", type=int, default=6000, help="with --simulate: number of cells")
    p.add_argument("--genes", type=int, default=1000, help="with --simulate: number of genes")
    p.add_argument("--covariates", type=int, default=1, help="with --simulate: number of cell lines")
    args = p.parse_args(argv)
    check_args(args)
    check_outputs({"--simulate": args.simulate}, {"--data": args.data})
    if args.simulate:
        write_h5ad(args.simulate, simulate(n_cells=args.cells, n_genes=args.genes, seed=args.seed,
                                           n_covariates=args.covariates))
        print(f"wrote {args.simulate}")
        return
    cfg = DataConfig(**{f.name: getattr(args, f.name) for f in fields(DataConfig)})
    ds = load_dataset(cfg)
    m = ds.meta
    n_single = sum("+" not in l for l, _ in ds.keys)
    sizes = np.array([len(ds.cell_idx[k]) for k in ds.keys])
    print(f"file        {m['path']}: {m['n_cells_in']} cells x {m['n_genes_in']} genes "
          f"({'raw counts -> log1p(CP10k)' if m['counts'] else 'log-normalised, used as is'})")
    print(f"kept        {ds.X.shape[0]} cells x {len(ds.genes)} genes")
    print(f"keys        perturbation={m['pert_key']!r} control={m['control']!r} covariate={m['cov_key']!r} "
          f"dose={m['dose_key']!r} separator={m['sep']!r}")
    print(f"conditions  {len(ds.keys)} (condition, covariate) pairs: {n_single} singles, "
          f"{len(ds.keys) - n_single} combinations; {len(ds.components)} components")
    print(f"covariates  " + ", ".join(f"{c} ({len(ds.ctrl_idx[c])} controls)" for c in ds.covariates))
    print(f"cells/cond  min {sizes.min()}  median {int(np.median(sizes))}  max {sizes.max()}")
    print(f"split       " + "  ".join(f"{s}={len(v)}" for s, v in ds.split.items()) +
          f"   test e.g. {[k[0] for k in ds.split['test'][:5]]}")


def cli(main) -> None:
    """Run a stage's main(): an expected problem with the input ends with one line on stderr, exit code 2;
    Ctrl-C with the stage's resume hint (the KeyboardInterrupt's message), exit code 130. Under torchrun only
    rank 0 prints them, and the process group is closed on the way out."""
    rank0 = int(os.environ.get("RANK", 0)) == 0
    try:
        main()
    except DataError as e:
        if rank0:
            print(f"error: {e}", file=sys.stderr)
        else:
            time.sleep(2)  # torchrun stops every process when one exits: let rank 0 print first
        sys.exit(2)
    except KeyboardInterrupt as e:
        if rank0:
            print(f"\n{str(e) or 'interrupted'}", file=sys.stderr)
        sys.exit(130)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    cli(main)
