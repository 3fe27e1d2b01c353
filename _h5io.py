"""h5ad (AnnData's HDF5 file) reading and writing with h5py only.

Layout facts from the anndata on-disk format specification
(https://anndata.readthedocs.io/en/latest/fileformat-prose.html): every element carries the
attributes `encoding-type` / `encoding-version`; sparse matrices are groups `data`, `indices`,
`indptr` with a `shape` attribute; dataframes are groups whose `_index` attribute names the index
dataset and whose `column-order` attribute lists the columns; categoricals are groups `codes` +
`categories` (code -1 = missing). Older files: anndata 0.7 stored categorical codes as a dataset
whose `categories` attribute is an object reference to `__categories/<col>`; before that, sparse X
was marked `h5sparse_format` / `h5sparse_shape` and obs/var were one compound dataset.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import h5py
import numpy as np
import scipy.sparse as sp

from data import DataError


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
        return x[...]
    enc = _attr(x, "encoding-type") or _attr(x, "h5sparse_format", "")
    fmt = {"csr_matrix": sp.csr_matrix, "csr": sp.csr_matrix,
           "csc_matrix": sp.csc_matrix, "csc": sp.csc_matrix}.get(enc)
    if fmt is None:
        raise DataError(f"{x.name}: unsupported matrix encoding-type {enc!r}; this reader takes dense "
                        "arrays and csr_matrix/csc_matrix: convert it in anndata and write again")
    shape = tuple(int(n) for n in x.attrs.get("shape", x.attrs.get("h5sparse_shape")))
    return fmt((x["data"][...], x["indices"][...], x["indptr"][...]), shape=shape)


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


def read_h5ad(path, layer=None) -> H5AD:
    """Read an .h5ad file written by any anndata version; `layer` reads layers/<layer> as X."""
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
            X = _read_X(f["layers"][layer] if layer is not None else f["X"])
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
