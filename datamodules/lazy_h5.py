"""An h5py read handle opened on first use in each process, and row reads that h5py is fast at.

h5py handles must not cross ``fork`` into DataLoader workers, and a 36 GB file must not be read whole: datasets
keep a :class:`LazyH5` and call ``.file`` at read time.  Pickling drops the handle, so each worker opens its own.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np

from datamodules.errors import DataError

Box = tuple[int, int, int, int]


class LazyH5:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._handle: h5py.File | None = None
        self._pid: int | None = None
        self._datasets: dict[str, h5py.Dataset] = {}

    @property
    def file(self) -> h5py.File:
        if self._handle is None or self._pid != os.getpid():
            try:
                self._handle = h5py.File(self.path, "r")
            except OSError as e:  # replaced or removed while a run was reading it
                raise DataError(self.path, f"cannot be opened any more ({e})") from None
            self._pid = os.getpid()
            self._datasets = {}
        return self._handle

    def dataset(self, key: str) -> h5py.Dataset:
        """``file[key]``, the Dataset object kept per handle: h5py's name lookup costs as much as reading a
        small crop (issue 14, item 2)."""
        f = self.file
        if (ds := self._datasets.get(key)) is None:
            ds = self._datasets[key] = f[key]
        return ds

    def close(self) -> None:
        if self._handle is not None and self._pid == os.getpid():
            self._handle.close()
        self._handle = None
        self._datasets = {}

    def __getstate__(self) -> dict:
        return {"path": self.path, "_handle": None, "_pid": None, "_datasets": {}}


class InMemoryH5:
    """:class:`LazyH5`'s interface over arrays already in memory (``.file[key]`` is the array), so that a
    reader written for an HDF5 file can serve a clip that never was one (``usnodule predict``);
    :func:`read_rows` indexes a numpy array as it indexes an h5py dataset."""

    def __init__(self, arrays: dict[str, np.ndarray], path: str | os.PathLike | None = None):
        self.path = None if path is None else Path(path)
        self.file = arrays

    def dataset(self, key: str) -> np.ndarray:
        return self.file[key]

    def close(self) -> None:
        pass


def read_rows(ds: h5py.Dataset, rows: np.ndarray, box: Box | None = None) -> np.ndarray:
    """``ds[rows, y0:y1, x0:x1]`` for rows in any order, with repeats.

    h5py fancy indexing needs increasing unique rows, and is much slower than a slice: a contiguous run of rows
    (the usual 3-stack, in any order) is read as one slice.  Row bookkeeping in plain Python: a stack has three
    rows, where numpy's per-call overhead would cost a tenth of reading a crop (issue 14, item 2).  A read that
    fails (a corrupt or truncated chunk behind an intact header) is a one-line :class:`DataError` naming the
    file, the dataset and the rows.
    """
    ys = slice(None) if box is None else slice(box[0], box[2])
    xs = slice(None) if box is None else slice(box[1], box[3])
    listed = rows.tolist() if isinstance(rows, np.ndarray) else [int(r) for r in rows]
    uniq = sorted(set(listed))
    try:
        if uniq and uniq[-1] - uniq[0] + 1 == len(uniq):
            data = ds[uniq[0] : uniq[-1] + 1, ys, xs]
            if (
                listed == uniq
            ):  # increasing run: the slice itself (a copy for in-memory arrays, as h5py returns)
                return data.copy() if isinstance(ds, np.ndarray) else data
            return data[[r - uniq[0] for r in listed]]
        data = ds[uniq, ys, xs]
    except OSError as e:
        raise read_error(ds, uniq, e) from None
    where = {r: i for i, r in enumerate(uniq)}
    return data[[where[r] for r in listed]]


def read_error(ds: h5py.Dataset, rows: Sequence[int], e: OSError) -> DataError:
    """One-line :class:`DataError` for a failed read of ``rows`` of an h5py dataset."""
    where = f"rows {int(rows[0])}-{int(rows[-1])}" if len(rows) else "rows"
    reason = str(e).split(" (", 1)[0] if str(e) else type(e).__name__
    return DataError(
        ds.file.filename, f"cannot read {where} of '{ds.name.lstrip('/')}': {reason} (corrupt file?)"
    )


def text(value, path: str | os.PathLike | None = None, key: str = "") -> str:
    """An HDF5 bytes cell (``b'129_'``) or a str, stripped.  Bytes that are not UTF-8 are a one-line
    :class:`DataError` naming ``path`` and the dataset ``key``."""
    if isinstance(value, bytes | np.bytes_):
        try:
            value = value.decode()
        except UnicodeDecodeError:
            where = f"'{key}' value" if key else "value"
            raise DataError(path, f"{where} {bytes(value)!r} is not UTF-8 text") from None
    return str(value).strip()


def open_checked(path: Path, keys: Sequence[str] = (), missing: str = "file does not exist") -> h5py.File:
    """Open an HDF5 file for reading, or raise one-line :class:`DataError`s: ``missing`` when the file is not
    there, "not a readable HDF5 file", or the first of ``keys`` it lacks (naming the keys it has)."""
    if not path.is_file():
        raise DataError(path, missing)
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise DataError(path, f"not a readable HDF5 file ({e})") from None
    for key in keys:
        if key not in f:
            have = ", ".join(sorted(f.keys()))
            f.close()
            raise DataError(path, f"missing dataset '{key}' (have: {have})")
    return f
