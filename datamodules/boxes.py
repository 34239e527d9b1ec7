"""Per-frame ROI boxes of a mask dataset, computed once per process and shared by every 3-stack (issue 14,
item 2).

The image stacks' crop box is the union of their three masks' boxes (``stacks`` module docstring).  Computing
it per item read three full masks (three 802 x 1054 frames per stack at the real size) every epoch, for a
crop of a few hundred pixels.  Instead each frame's tight box is computed once, in one pass over the masks of
the requested nodules, and a stack's box is the union of its frames' boxes: the union of the masks' non-zero
pixels has exactly the union of their tight boxes as its tight box, so the crops are the same
(``tests/test_boxes.py`` checks it against the per-item path).  A nodule's fallback box (all its frames) is
the union over its rows.

**Where the boxes live: in process, keyed by file identity.**  A module-level table per mask source, keyed by
``(resolved path, device, inode, size, mtime_ns, dataset)`` of the HDF5 file, so a file rewritten in place
(new mtime or size) gets new boxes, and every dataset of the process built on the same file (train, val,
test, predict) shares one pass.  :class:`~datamodules.stacks.StackDataset` fills it eagerly at construction,
in the main process, so DataLoader workers inherit it (fork) or receive it pickled with the dataset (spawn:
4 int32 per frame, 280 KB for the real 17,412 frames).  Not chosen: a sidecar file beside the data (data
directories are often read-only, and a stale sidecar is only safely detected by a digest of the data, which
for a 36 GB file costs a full read per process, the very pass it would save).  The price of the choice: each
process reads its nodules' masks once (what one epoch of the old path read), then never again.

Mask values are validated during the pass as :meth:`StanfordCine.masks` validates them (annotated masks:
values other than 0, 1, 255 raise the same one-line :class:`DataError`, naming the nodule).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import h5py
import numpy as np

from datamodules.errors import DataError
from datamodules.lazy_h5 import Box, InMemoryH5, read_rows

BLOCK = 4  # masks per read in the pass: small temporaries (32 per read ran ~1.3x slower at 802 x 1054)


def tight_boxes(masks: np.ndarray) -> np.ndarray:
    """``(k, 4)`` int32 tight boxes ``(y0, x0, y1, x1)`` (end-exclusive) of ``(k, H, W)`` masks; ``-1`` rows
    for empty masks (what :func:`~datamodules.stanford.bbox_from_mask` returns per frame, vectorised)."""
    rows, cols = masks.any(axis=2), masks.any(axis=1)
    out = np.full((len(masks), 4), -1, dtype=np.int32)
    hit = rows.any(axis=1)
    if hit.any():
        r, c = rows[hit], cols[hit]
        h, w = r.shape[1], c.shape[1]
        out[hit, 0] = r.argmax(axis=1)
        out[hit, 1] = c.argmax(axis=1)
        out[hit, 2] = h - r[:, ::-1].argmax(axis=1)
        out[hit, 3] = w - c[:, ::-1].argmax(axis=1)
    return out


def union(boxes: np.ndarray) -> Box | None:
    """Union of ``(k, 4)`` boxes with ``-1`` rows for empty frames; None when all are empty."""
    boxes = boxes[boxes[:, 0] >= 0]
    if not len(boxes):
        return None
    return (
        int(boxes[:, 0].min()),
        int(boxes[:, 1].min()),
        int(boxes[:, 2].max()),
        int(boxes[:, 3].max()),
    )


class FrameBoxes:
    """Tight mask box of every row of one ``(N, H, W)`` mask dataset, filled nodule by nodule on demand."""

    def __init__(self, n_rows: int):
        self.boxes = np.full((n_rows, 4), -1, dtype=np.int32)
        self.done = np.zeros(n_rows, dtype=bool)

    def fill(self, ds, rows: np.ndarray, *, check: str | os.PathLike | None = None, name: str = "") -> None:
        """Compute the boxes of ``rows`` not done yet, reading ``ds`` (h5py dataset or array) in row blocks.

        ``check``: the file to name when a mask value lies outside {0, 1, 255} (annotated masks are checked,
        predicted ones are not, as in the per-item readers); ``name``: the nodule the rows belong to.
        """
        todo = np.unique(np.asarray(rows, dtype=np.int64))
        todo = todo[~self.done[todo]]
        for start in range(0, todo.size, BLOCK):
            block = todo[start : start + BLOCK]
            m = read_rows(ds, block)
            if check is not None and ((m != 0) & (m != 255) & (m != 1)).any():
                raise DataError(check, f"mask values of nodule {name!r} lie outside {{0, 1}} / {{0, 255}}")
            self.boxes[block] = tight_boxes(m)
            self.done[block] = True

    def union(self, rows: np.ndarray) -> Box | None:
        if len(rows) > 8:
            return union(self.boxes[np.asarray(rows, dtype=np.int64)])
        # a stack's few rows: plain Python beats numpy's per-call overhead (this runs once per item)
        got = [b for b in self.boxes[rows].tolist() if b[0] >= 0]
        if not got:
            return None
        y0, x0, y1, x1 = zip(*got, strict=True)
        return min(y0), min(x0), max(y1), max(x1)


_TABLES: dict[tuple, FrameBoxes] = {}


def _key(path: Path, dataset: str) -> tuple:
    st = os.stat(path)
    return (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, dataset)


def boxes_for(source, nodule_ids: Iterable[str]) -> FrameBoxes:
    """The :class:`FrameBoxes` of ``source``'s masks (a :class:`~datamodules.stanford.StanfordCine`: its
    annotated masks, or a :class:`~datamodules.stacks.PredictedMasks`), with every row of ``nodule_ids``
    computed.  File-backed sources share one table per process (module docstring); in-memory ones
    (``from_arrays``) get a table of their own."""
    cine = getattr(source, "cine", source)  # PredictedMasks carries its cine file; a StanfordCine is its own
    annotated = source is cine
    if annotated and not cine.has_mask:
        raise DataError(cine.h5_path, "no 'mask' dataset in this file")
    store = source._h5
    n_rows = sum(nod.n_frames for nod in cine.nodules)
    if isinstance(store, InMemoryH5):
        table = source.__dict__.setdefault("_frame_boxes", FrameBoxes(n_rows))
    else:
        table = _TABLES.setdefault(_key(store.path, "mask"), FrameBoxes(n_rows))
    check = cine.h5_path if annotated else None
    if isinstance(store, InMemoryH5):
        for nid in nodule_ids:
            table.fill(store.file["mask"], cine.by_id[nid].rows, check=check, name=nid)
        return table
    with h5py.File(store.path, "r") as f:  # a handle of its own, closed after the pass
        for nid in nodule_ids:
            table.fill(f["mask"], cine.by_id[nid].rows, check=check, name=nid)
    return table


def clear() -> None:
    """Forget every file's boxes (tests; a long-lived process that rewrote files in the same nanosecond)."""
    _TABLES.clear()
