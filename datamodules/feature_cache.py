"""Pooled features of a frozen encoder, computed once per fold and data part and kept in an HDF5 file beside the
run (issue 14, item 1).

When an encoder is frozen and its inputs never change (no augmentation), every epoch recomputes the same
features: at paper size the ViT stage runs ViT-B/16 500 times (100 epochs x 5 folds) on the same crops to
train two linear layers.  This module keeps those features instead.  It knows nothing of networks (datamodules
import none): the encoder comes in as a callable, and the caller
(:class:`lightning_modules.feature_cache.FrozenFeatureCache`) decides when the cache applies.

**The key.**  A cache file is used only when its stored key equals the key of the run that wants it, field by
field; any difference recomputes it, never a silent reuse:

- ``encoder``: a digest of the encoder (architecture name, constructor settings, every weight and buffer), so a
  changed backbone or checkpoint file recomputes;
- ``settings``: what turns a raw stack into the encoder's input (size, ROI buffer, normalisation, boxes), the
  precision and device type the features are computed under, and the torch / timm versions (a new resize or
  kernel may change the numbers);
- ``items``: which stacks, in which order (``<annot_id>:<stack>`` per row);
- ``data``: SHA-256 over the raw uint8 stacks the encoder sees (each item's shape and bytes, before resizing).
  Not a digest of the HDF5 file: that would read the whole 36 GB file at every start, where the crops are what
  the features depend on.  The price: a run that finds a cache reads the crops once more (a data pass without
  the encoder) before trusting it.

**The file.**  ``features`` (N, D) float32 in item order and the key as JSON in the ``key`` attribute.  Written
streaming, batch by batch, under :func:`~datamodules.atomic.atomic_path`: a build that fails or is killed
leaves at most a hidden ``.<name>.partial-<pid>.h5`` that no reader opens and the next build clears, never a
file under the final name.  Features are read back whole (a fold's train part at paper size, ~3,500 stacks x
768 floats, is ~11 MB).

Equality with the uncached path: the features are the encoder's own output for the same input tensors; what can
differ is float rounding of a batch of another composition (the training batches are shuffled), so trained
weights agree within float tolerance (``tests/test_feature_cache.py``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from datamodules.atomic import atomic_path, clean_stale

FORMAT = 1  # bump when the file layout or what a key field means changes


def item_digest(x: np.ndarray) -> bytes:
    """SHA-256 of one raw item: its shape, dtype and bytes."""
    h = hashlib.sha256(f"{x.shape}{x.dtype}".encode())
    h.update(np.ascontiguousarray(x))
    return h.digest()


def names_digest(names: list[str]) -> str:
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


class _Probe(Dataset):
    """Items of ``base`` (a dataset with ``read(i)`` -> raw array and ``item(i, raw)`` -> dict) with the digest
    of their raw input; ``images=False``: the digest alone (the check pass: no resizing)."""

    def __init__(self, base: Dataset, images: bool) -> None:
        self.base, self.images = base, images

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        x = self.base.read(i)
        out = {"digest": torch.frombuffer(bytearray(item_digest(x)), dtype=torch.uint8)}
        if self.images:
            out["image"] = self.base.item(i, x)["image"]
        return out


def _loader(base: Dataset, images: bool, batch_size: int, num_workers: int) -> DataLoader:
    return DataLoader(_Probe(base, images), batch_size=batch_size, shuffle=False, num_workers=num_workers)


def read_key(path: str | os.PathLike) -> dict | None:
    """The key stored in a cache file; None when there is no readable, finished file."""
    try:
        with h5py.File(path, "r") as f:
            if "features" not in f:
                return None
            return json.loads(f.attrs["key"])
    except (OSError, KeyError, ValueError):
        return None


def load(path: str | os.PathLike) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f["features"][()]


def changed(stored: dict | None, key: dict) -> str | None:
    """Why ``stored`` does not serve ``key`` (the first differing field), None when it does."""
    if stored is None:
        return "no cache yet"
    for field in ("format", "encoder", "settings", "items", "data"):
        if stored.get(field) != key.get(field):
            return f"{field} changed"
    return None


def data_digest(base: Dataset, *, batch_size: int, num_workers: int) -> str:
    """The ``data`` field of the key: SHA-256 over every item's raw digest, in order (one pass, no encoder)."""
    h = hashlib.sha256()
    for batch in _loader(base, False, batch_size, num_workers):
        h.update(batch["digest"].numpy().tobytes())
    return h.hexdigest()


def build(
    path: str | os.PathLike,
    base: Dataset,
    key: dict,
    encode: Callable[[Tensor], Tensor],
    *,
    batch_size: int,
    num_workers: int,
) -> dict:
    """Run ``encode`` on every item of ``base`` in order and stream the features to ``path`` (atomically);
    ``key`` (without ``data``, computed in the same pass) is stored with them.  Returns the full key."""
    n, h, done = len(base), hashlib.sha256(), 0
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        ds = None
        for batch in _loader(base, True, batch_size, num_workers):
            feats = encode(batch["image"]).detach().float().cpu().numpy()
            if ds is None:
                chunk = (min(n, max(1, 2**20 // (4 * feats.shape[1]))), feats.shape[1])  # ~1 MiB chunks
                ds = f.create_dataset("features", shape=(n, feats.shape[1]), dtype=np.float32, chunks=chunk)
            ds[done : done + len(feats)] = feats
            done += len(feats)
            h.update(batch["digest"].numpy().tobytes())
        if ds is None:  # an empty part: a file that says so
            f.create_dataset("features", shape=(0, 0), dtype=np.float32)
        full = {**key, "data": h.hexdigest()}
        f.attrs["key"] = json.dumps(full, sort_keys=True)
    return full


def cached_features(
    path: str | os.PathLike,
    base: Dataset,
    key: dict,
    encode: Callable[[Tensor], Tensor],
    *,
    batch_size: int,
    num_workers: int = 0,
) -> tuple[np.ndarray, dict, str]:
    """``(features, full key, what happened)`` for every item of ``base``: the file at ``path`` when its key
    matches (the crops are read once to check the ``data`` field), else built anew.  ``what happened`` is
    ``"reused"`` or ``"built (<reason>)"``."""
    path = Path(path)
    key = {"format": FORMAT, **key}
    clean_stale(path)  # partial files of killed builds: never read, removed
    stored = read_key(path)
    reason = changed(stored, {**key, "data": stored.get("data") if stored else None})
    if reason is None:  # all but the data match: check the data, without the encoder
        digest = data_digest(base, batch_size=batch_size, num_workers=num_workers)
        reason = changed(stored, {**key, "data": digest})
        if reason is None:
            return load(path), stored, "reused"
    full = build(path, base, key, encode, batch_size=batch_size, num_workers=num_workers)
    return load(path), full, f"built ({reason})"


class FeatureDataset(Dataset):
    """``base``'s items with the cached encoder features in place of the image: ``{"features": (D,) float32,
    + base.keys(i)}`` (label, nodule, stack), reading no pixels."""

    def __init__(self, base: Dataset, features: np.ndarray) -> None:
        if len(features) != len(base):
            raise ValueError(f"{len(features)} feature rows for {len(base)} items")
        self.base = base
        self.features = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))

    def __len__(self) -> int:
        return len(self.base)

    def __getattr__(self, name: str):  # nodule_ids, labels, n_stacks ... of the base dataset
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"features": self.features[i], **self.base.keys(i)}
