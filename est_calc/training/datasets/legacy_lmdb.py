"""Legacy OC20 LMDBs (pickled torch_geometric ``Data``), read without torch_geometric.

A split is one ``data.lmdb`` or a folder of ``data.NNNN.lmdb`` files; keys are ASCII integers
numbered from 0 within each file, files are concatenated in sorted name order. An optional
``b"length"`` key holds the count (such a file has ``entries == length + 1``).

Values are unpickled by :class:`RestrictedUnpickler`, which resolves only an allow-list of globals:
the torch tensor-rebuild functions (the nested storage blobs are loaded with
``torch.load(..., weights_only=True)``), numpy scalar/dtype reconstruction (no object dtypes),
``collections.OrderedDict``, and inert stub classes standing in for the PyG ``Data`` /
``GlobalStorage`` classes. Any other global is refused before anything runs.
"""

from __future__ import annotations

import io
import os
import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ._frame import Frame, FrameDataset

__all__ = ["RestrictedUnpickler", "UnsafePickleError", "safe_loads", "LegacyLMDBDataset",
           "write_legacy_lmdb"]


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle referenced a global outside the allow-list."""


class _PyGStub:
    """Inert stand-in for a torch_geometric class: only records its pickled state."""

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"unexpected state for {type(self).__name__}")
        self.__dict__.update(state)


def _stub(module: str, name: str) -> type:
    return type(name, (_PyGStub,), {"__module__": module, "__qualname__": name})


_PYG_STUBS = {
    (module, name): _stub(module, name)
    for module, name in [("torch_geometric.data.data", "Data"),
                         ("torch_geometric.data.data", "DataEdgeAttr"),
                         ("torch_geometric.data.data", "DataTensorAttr"),
                         ("torch_geometric.data.storage", "GlobalStorage"),
                         ("torch_geometric.data.storage", "BaseStorage")]
}


def _load_storage_from_bytes(blob: bytes):
    """Replacement for ``torch.storage._load_from_bytes`` with weights-only semantics."""
    import torch

    return torch.load(io.BytesIO(blob), weights_only=True)


def _safe_scalar(dtype, payload=None):
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise UnsafePickleError("numpy scalar with an object dtype is not allowed")
    if not isinstance(payload, bytes):
        raise UnsafePickleError("numpy scalar payload must be bytes")
    return np.frombuffer(payload, dtype=dtype, count=1)[0].copy()


def _safe_dtype(*args):
    return np.dtype(*args)


def _safe_reconstructor(cls, base, state):
    """``copyreg._reconstructor`` (protocol 0/1 pickles), for the PyG stubs only."""
    if not (isinstance(cls, type) and issubclass(cls, _PyGStub)) or base is not object:
        raise UnsafePickleError("copyreg._reconstructor is only allowed for PyG data classes")
    return object.__new__(cls)


def _allowed_globals() -> dict:
    import torch._utils

    allowed = dict(_PYG_STUBS)
    allowed.update({
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
        ("torch.storage", "_load_from_bytes"): _load_storage_from_bytes,
        ("collections", "OrderedDict"): OrderedDict,
        ("numpy.core.multiarray", "scalar"): _safe_scalar,
        ("numpy._core.multiarray", "scalar"): _safe_scalar,
        ("numpy", "dtype"): _safe_dtype,
        ("copyreg", "_reconstructor"): _safe_reconstructor,
    })
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allow-listed globals (see the module docstring).

    Raises:
        UnsafePickleError: for any other ``module.name``; nothing of it is imported or run.
    """

    _allowed: dict | None = None

    def find_class(self, module: str, name: str):
        if RestrictedUnpickler._allowed is None:
            RestrictedUnpickler._allowed = _allowed_globals()
        try:
            return RestrictedUnpickler._allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"refusing to load global {module}.{name} from a data "
                                    "file (not in the allow-list)") from None

    def persistent_load(self, pid):
        raise UnsafePickleError("persistent ids are not allowed in data pickles")


def safe_loads(blob: bytes):
    """Unpickle ``blob`` with :class:`RestrictedUnpickler`."""
    return RestrictedUnpickler(io.BytesIO(blob)).load()


def _fields(obj) -> dict:
    """Field dict of a stub PyG Data, 1.x (fields in ``__dict__``) or 2.x (``_store._mapping``)."""
    if isinstance(obj, dict):
        state = obj
    elif isinstance(obj, _PyGStub):
        state = obj.__dict__
        store = state.get("_store")
        if store is not None:
            state = getattr(store, "_mapping", None) or getattr(store, "__dict__", {})
    else:
        raise ValueError(f"expected a torch_geometric Data object, got {type(obj).__name__}")
    return {k: v for k, v in state.items() if v is not None and not k.startswith("_")}


def _np(value) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _scalar(value):
    value = _np(value)
    return value.reshape(-1)[0].item() if value.size else None


def _frame_from_fields(fields: dict, default_pbc) -> Frame:
    pos = _np(fields["pos"]).astype(np.float64)
    numbers = np.rint(_np(fields["atomic_numbers"]).astype(np.float64)).astype(np.int64)
    energy_key = next((k for k in ("energy", "y", "y_init") if k in fields), None)
    forces_key = next((k for k in ("forces", "force") if k in fields), None)
    extra = {}
    for key in ("y_relaxed", "y_init", "pos_relaxed", "free_energy"):
        if key in fields and key != energy_key:
            value = _np(fields[key])
            extra[key] = value.astype(np.float64) if value.ndim else float(value)
    sid = fields.get("sid")
    sid = _scalar(sid) if hasattr(sid, "shape") else sid
    fid = fields.get("fid")
    fid = _scalar(fid) if hasattr(fid, "shape") else fid
    cell = _np(fields["cell"]).reshape(3, 3) if "cell" in fields else np.zeros((3, 3))
    return Frame(positions=pos, numbers=numbers, cell=cell,
                 pbc=fields.get("pbc", default_pbc),
                 energy=None if energy_key is None else _scalar(fields[energy_key]),
                 forces=None if forces_key is None else _np(fields[forces_key]),
                 stress=_np(fields["stress"]) if "stress" in fields else None,
                 tags=_np(fields["tags"]) if "tags" in fields else None,
                 fixed=_np(fields["fixed"]) if "fixed" in fields else None,
                 sid=sid, fid=fid, extra=extra)


# LMDB allows one environment per file and process: readers of the same file share it.
_ENVS: dict[tuple, object] = {}


def _open_env(path: Path):
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_ino, stat.st_mtime_ns, os.getpid())
    if key not in _ENVS:
        import lmdb

        _ENVS[key] = lmdb.open(str(path), subdir=False, readonly=True, lock=False,
                               readahead=False, meminit=False, max_readers=1)
    return _ENVS[key]


class _LmdbFile:
    """One legacy LMDB file, opened lazily (and re-opened in a forked worker)."""

    def __init__(self, path: Path):
        self.path = path
        with self.env.begin() as txn:
            raw = txn.get(b"length")
            if raw is None:
                self.length = self.env.stat()["entries"]
                return
        try:
            length = safe_loads(raw)
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
            raise ValueError(f"{path}: cannot read its length record: {err}") from None
        if isinstance(length, bool) or not isinstance(length, int) or length < 0:
            raise ValueError(f"{path}: its length record holds {length!r}, not a count")
        self.length = length

    @property
    def env(self):
        return _open_env(self.path)

    def get(self, index: int) -> bytes:
        with self.env.begin() as txn:
            blob = txn.get(f"{index}".encode("ascii"))
        if blob is None:
            raise KeyError(f"{self.path}: key {index} missing")
        return blob


class LegacyLMDBDataset(FrameDataset):
    """Frames from a legacy OC20 LMDB file or a folder of ``*.lmdb`` files (sorted, concatenated).

    Energies come from ``energy``, else ``y`` (S2EF), else ``y_init`` (IS2RE initial structure);
    ``y_relaxed`` / ``pos_relaxed`` go to ``Frame.extra``. Forces from ``forces`` or ``force``.
    Legacy files store no pbc: ``default_pbc`` (all periodic, as in OC20) is used.

    Args:
        path: an ``.lmdb`` file or a folder of them.
        default_pbc: pbc used when a record has none.
    """

    def __init__(self, path, *, default_pbc=(True, True, True)):
        path = Path(path)
        if path.is_dir():
            files = sorted(path.glob("*.lmdb"))
            if not files:
                raise ValueError(f"no *.lmdb files in folder {path}")
        elif path.is_file():
            files = [path]
        else:
            raise FileNotFoundError(f"legacy LMDB path not found: {path}")
        self.path = path
        self.default_pbc = default_pbc
        self._files = [_LmdbFile(f) for f in files]
        self._ends = np.cumsum([f.length for f in self._files]).tolist()

    def __len__(self) -> int:
        return self._ends[-1]

    def _part(self, index: int) -> tuple[int, int]:
        import bisect

        part = bisect.bisect_right(self._ends, index)
        return part, index - (self._ends[part - 1] if part else 0)

    def locate(self, index: int) -> tuple[Path, int]:
        """``(lmdb file, key)`` of frame ``index``."""
        part, local = self._part(int(index))
        return self._files[part].path, local

    def raw_fields(self, index: int) -> dict:
        """The unpickled field dict of record ``index`` (tensors left as torch tensors).

        Raises:
            pickle.UnpicklingError: (UnsafePickleError for a refused global) with the file and
                key in the message.
        """
        part, local = self._part(index)
        try:
            return _fields(safe_loads(self._files[part].get(local)))
        except pickle.UnpicklingError as err:
            raise type(err)(f"{self._files[part].path} record {local}: {err}") from None

    def _get(self, index: int) -> Frame:
        return _frame_from_fields(self.raw_fields(index), self.default_pbc)


class _StubPickler(pickle._Pickler):
    """Pure-Python pickler that writes the PyG stubs under their torch_geometric names."""

    def save_global(self, obj, name=None):
        if isinstance(obj, type) and issubclass(obj, _PyGStub):
            self.write(pickle.GLOBAL + f"{obj.__module__}\n{obj.__qualname__}\n".encode())
            self.memoize(obj)
            return
        super().save_global(obj, name)


def _to_tensor(value):
    import torch

    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    return value


def write_legacy_lmdb(records, path, *, layout: str = "pyg2", write_length: bool = True) -> int:
    """Write field dicts as a legacy OC20 LMDB (for tests and fixtures; no torch_geometric needed).

    Args:
        records: iterable of dicts such as ``{"pos": (n,3) float32, "atomic_numbers": ...,
            "cell": (1,3,3), "y": float, "force": (n,3), "tags", "fixed", "sid", "fid"}``;
            numpy arrays are stored as torch tensors.
        path: output ``.lmdb`` file.
        layout: ``"pyg1"`` (fields in ``Data.__dict__``) or ``"pyg2"`` (``_store._mapping``).
        write_length: also write the ``b"length"`` key.

    Returns:
        The number of records written.
    """
    import lmdb

    if layout not in ("pyg1", "pyg2"):
        raise ValueError(f"layout must be 'pyg1' or 'pyg2', got {layout!r}")
    data_cls = _PYG_STUBS[("torch_geometric.data.data", "Data")]
    store_cls = _PYG_STUBS[("torch_geometric.data.storage", "GlobalStorage")]
    env = lmdb.open(str(path), subdir=False, map_size=2**30, meminit=False)
    count = 0
    with env.begin(write=True) as txn:
        for count, record in enumerate(records, 1):
            fields = {k: _to_tensor(v) for k, v in record.items()}
            data = object.__new__(data_cls)
            if layout == "pyg1":
                data.__dict__.update({"x": None, "edge_attr": None, **fields})
            else:
                store = object.__new__(store_cls)
                store.__dict__.update({"_mapping": fields, "_parent": data})
                data.__dict__["_store"] = store
            buffer = io.BytesIO()
            _StubPickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(data)
            txn.put(f"{count - 1}".encode("ascii"), buffer.getvalue())
        if write_length:
            txn.put(b"length", pickle.dumps(count, protocol=pickle.HIGHEST_PROTOCOL))
    env.close()
    return count
