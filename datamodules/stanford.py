"""Reader for the Stanford AIMI thyroid cine-clip layout (the data set STACT-Time used).

On disk: ``dataset.hdf5`` with flat datasets ``annot_id`` (N,) bytes (``b'129_'``), ``frame_num`` (N,) bytes
(``b'1'``), ``image`` (N, H, W) uint8 and ``mask`` (N, H, W) uint8 in {0, 255}; and ``metadata.csv`` with one
row per nodule.  The real file is 36 GB (17,412 frames of 802 x 1054), so only the two small id columns are
read at start; frames and masks are read on demand, row by row, through an h5py handle opened lazily in each
process (a handle inherited through ``fork`` is not safe to share between DataLoader workers).

Facts about the real file this reader survives (see DESIGN.md): rows are grouped by nodule but not sorted by
id, one nodule's rows can be split and interleaved with another's, ``frame_num`` has gaps and need not start
at 1, metadata can have blanks, there is no patient id (a ``patient_id`` column is used when present, else
the nodule is its own group).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from datamodules.errors import DataError
from datamodules.lazy_h5 import Box, InMemoryH5, LazyH5, open_checked, read_rows, text

TIRADS_FEATURES = ("composition", "echogenicity", "shape", "margin", "echogenicfoci")
METADATA_COLUMNS = (
    "annot_id", "age", "sex", "location", "size_x", "size_y", "size_z",
    *(f"ti-rads_{f}" for f in TIRADS_FEATURES), "ti-rads_level", "histopath_diagnosis",
)  # fmt: skip
REQUIRED_COLUMNS = ("annot_id", "histopath_diagnosis")


@dataclass(frozen=True)
class Nodule:
    """One nodule: its HDF5 rows in frame order, its label and its TI-RADS descriptors (ACR points)."""

    annot_id: str
    patient_id: str
    label: int
    rows: np.ndarray = field(repr=False)
    frame_nums: np.ndarray = field(repr=False)
    tirads: dict[str, float] = field(default_factory=dict)
    tirads_level: float = float("nan")

    @property
    def n_frames(self) -> int:
        return len(self.rows)


def parse_level(value) -> float:
    """``'TR3'``, ``'tr3'``, ``3`` or ``'3'`` -> 3.0; blank -> nan."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return float("nan")
    text = str(value).strip().upper().removeprefix("TR")
    if not text:
        return float("nan")
    return float(text)


def _numeric_column(meta: pd.DataFrame, col: str, path: Path) -> pd.Series:
    """``meta[col]`` as numbers; a blank cell is missing (NaN), any other non-number a one-line
    :class:`DataError` (it would otherwise be read as missing without a word)."""
    values = pd.to_numeric(meta[col], errors="coerce")
    raw = meta[col].astype(str).str.strip()
    bad = values.isna() & meta[col].notna() & (raw != "")
    if bad.any():
        row = meta.loc[bad].iloc[0]
        raise DataError(
            path,
            f"{col} must be a number (ACR points), got {str(row[col]).strip()!r} for annot_id {row['annot_id']!r}",
        )
    return values


def bbox_from_mask(mask: np.ndarray) -> Box | None:
    """Tight box ``(y0, x0, y1, x1)`` (end-exclusive) around the non-zero pixels of one mask, None if empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


class StanfordCine:
    """Nodules of a Stanford-layout cine-clip set, with cheap access to frames, masks and ROI boxes.

    ``frames``/``masks`` take positions in a nodule's *ordered* frames (0 = lowest ``frame_num``), never raw
    HDF5 rows, so callers cannot mix nodules or depend on the file's row order.
    """

    def __init__(
        self,
        h5_path: str | os.PathLike,
        metadata_csv: str | os.PathLike | None = None,
        *,
        require_mask: bool = True,
    ):
        h5_path = Path(h5_path)
        metadata_path = Path(metadata_csv) if metadata_csv else h5_path.with_name("metadata.csv")
        ids, frame_nums, image_shape, has_mask = self._read_index(h5_path, require_mask)
        metadata = self._read_metadata(metadata_path)
        self._setup(
            h5_path=h5_path,
            metadata_path=metadata_path,
            require_mask=require_mask,
            store=LazyH5(h5_path),
            image_shape=image_shape,
            has_mask=has_mask,
            metadata=metadata,
            nodules=self._group(ids, frame_nums, metadata, h5_path, metadata_path),
        )

    @classmethod
    def from_arrays(
        cls, name: str, frames: np.ndarray, masks: np.ndarray | None = None, *, label: int = -1
    ) -> StanfordCine:
        """One clip held in memory as a one-nodule set (id, patient and path = ``name``), so that code written
        for the Stanford file (:class:`~datamodules.stacks.StackDataset`: stacks, ROI boxes, crops) runs on it
        unchanged.

        ``frames``: (T, H, W) uint8; ``masks``: (T, H, W) uint8 in {0, 1} or {0, 255}, or None (then
        :meth:`masks` raises, as for a file without masks). ``label`` -1 = unknown. The arrays are not copied.
        """
        frames = np.asarray(frames)
        if frames.ndim != 3 or frames.dtype != np.uint8 or len(frames) == 0:
            raise DataError(
                name, f"frames must be non-empty (T, H, W) uint8, got {frames.dtype} {frames.shape}"
            )
        arrays = {"image": frames}
        if masks is not None:
            if masks.shape != frames.shape:
                raise DataError(name, f"masks shape {masks.shape} differs from frames shape {frames.shape}")
            arrays["mask"] = masks
        n = len(frames)
        nodule = Nodule(
            annot_id=name,
            patient_id=name,
            label=label,
            rows=np.arange(n, dtype=np.int64),
            frame_nums=np.arange(n, dtype=np.int64),
        )
        cine = cls.__new__(cls)
        cine._setup(
            h5_path=Path(name),
            metadata_path=None,
            require_mask=False,
            store=InMemoryH5(arrays, name),
            image_shape=(int(frames.shape[1]), int(frames.shape[2])),
            has_mask=masks is not None,
            metadata=pd.DataFrame({"annot_id": [name]}).set_index("annot_id", drop=False),
            nodules=[nodule],
        )
        return cine

    def _setup(
        self,
        *,
        h5_path: Path,
        metadata_path: Path | None,
        require_mask: bool,
        store: LazyH5 | InMemoryH5,
        image_shape: tuple[int, int],
        has_mask: bool,
        metadata: pd.DataFrame,
        nodules: list[Nodule],
    ) -> None:
        # The one place attributes are set, for both constructors: keyword-only without defaults, so an
        # attribute added here fails loudly in from_arrays too instead of being silently missing there.
        self.h5_path = h5_path
        self.metadata_path = metadata_path
        self.require_mask = require_mask
        self._h5 = store
        self.image_shape = image_shape
        self.has_mask = has_mask
        self.metadata = metadata
        self.nodules = nodules
        self.by_id = {n.annot_id: n for n in nodules}

    # ------------------------------------------------------------------ validation at start
    @staticmethod
    def _read_index(path: Path, require_mask: bool) -> tuple[np.ndarray, np.ndarray, tuple[int, int], bool]:
        keys = ("annot_id", "frame_num", "image") + (("mask",) if require_mask else ())
        with open_checked(path, keys) as f:
            image = f["image"]
            if image.ndim != 3:
                raise DataError(path, f"'image' must be (N, H, W), got shape {image.shape}")
            if image.dtype != np.uint8:
                raise DataError(path, f"'image' must be uint8, got {image.dtype}")
            n = image.shape[0]
            if n == 0:
                raise DataError(path, "'image' holds no frames")
            has_mask = "mask" in f
            if has_mask:
                mask = f["mask"]
                if mask.shape != image.shape:
                    raise DataError(
                        path, f"'mask' shape {mask.shape} differs from 'image' shape {image.shape}"
                    )
                if mask.dtype != np.uint8:
                    raise DataError(path, f"'mask' must be uint8, got {mask.dtype}")
            ids = np.asarray(f["annot_id"][()])
            frame_nums = np.asarray(f["frame_num"][()])
            for key, arr in (("annot_id", ids), ("frame_num", frame_nums)):
                if arr.shape != (n,):
                    raise DataError(path, f"'{key}' shape {arr.shape} does not match {n} image rows")
            shape = (int(image.shape[1]), int(image.shape[2]))
        ids = np.array([text(v, path, "annot_id") for v in ids], dtype=object)
        nums_text = [text(v, path, "frame_num") for v in frame_nums]
        try:
            nums = np.array([int(v) for v in nums_text], dtype=np.int64)
        except ValueError:
            bad = next(v for v in nums_text if not v.lstrip("-").isdigit())
            raise DataError(path, f"'frame_num' value {bad!r} is not an integer") from None
        return ids, nums, shape, has_mask

    @staticmethod
    def _read_metadata(path: Path) -> pd.DataFrame:
        if not path.is_file():
            raise DataError(path, "metadata file does not exist")
        try:
            meta = pd.read_csv(path, dtype={"annot_id": str, "patient_id": str}, skipinitialspace=True)
        except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as e:
            raise DataError(path, f"not a readable CSV ({e})") from None
        meta.columns = [c.strip().lower() for c in meta.columns]
        missing = [c for c in REQUIRED_COLUMNS if c not in meta.columns]
        if missing:
            raise DataError(path, f"missing column(s) {', '.join(missing)}")
        meta["annot_id"] = meta["annot_id"].astype(str).str.strip()
        if meta["annot_id"].duplicated().any():
            dup = meta.loc[meta["annot_id"].duplicated(), "annot_id"].iloc[0]
            raise DataError(path, f"annot_id {dup!r} appears in more than one row")
        labels = pd.to_numeric(meta["histopath_diagnosis"], errors="coerce")
        bad = ~labels.isin([0, 1])
        if bad.any():
            row = meta.loc[bad].iloc[0]
            raise DataError(
                path,
                f"histopath_diagnosis must be 0 or 1, got {str(row['histopath_diagnosis'])!r} "
                f"for annot_id {row['annot_id']!r}",
            )
        meta["histopath_diagnosis"] = labels.astype(int)
        for col in (f"ti-rads_{f}" for f in TIRADS_FEATURES):
            if col in meta.columns:
                meta[col] = _numeric_column(meta, col, path)
        if "ti-rads_level" in meta.columns:
            for annot_id, value in zip(meta["annot_id"], meta["ti-rads_level"], strict=True):
                try:
                    level = parse_level(value)
                except ValueError:
                    level = 0.0
                if not (np.isnan(level) or level in (1, 2, 3, 4, 5)):
                    raise DataError(
                        path,
                        f"ti-rads_level must be TR1-TR5 (ACR TI-RADS), got {str(value).strip()!r} "
                        f"for annot_id {annot_id!r}",
                    )
        return meta.set_index("annot_id", drop=False)

    @staticmethod
    def _group(
        ids: np.ndarray, frame_nums: np.ndarray, metadata: pd.DataFrame, h5_path: Path, metadata_path: Path
    ) -> list[Nodule]:
        in_h5 = set(ids.tolist())
        in_meta = set(metadata.index)
        if in_h5 - in_meta:
            some = sorted(in_h5 - in_meta)[:3]
            raise DataError(
                metadata_path,
                f"{len(in_h5 - in_meta)} annot_id(s) of {h5_path.name} have no metadata row, e.g. {some}",
            )
        if in_meta - in_h5:
            some = sorted(in_meta - in_h5)[:3]
            raise DataError(
                h5_path,
                f"{len(in_meta - in_h5)} annot_id(s) of {metadata_path.name} have no frames, e.g. {some}",
            )
        # One stable sort by (nodule, frame_num, row) groups interleaved rows and orders frames.
        uniq, inverse = np.unique(ids.astype(str), return_inverse=True)
        order = np.lexsort((np.arange(len(ids)), frame_nums, inverse))
        bounds = np.searchsorted(inverse[order], np.arange(len(uniq) + 1))
        # A repeated (annot_id, frame_num) would put one frame twice into a stack: refuse it, naming the rows.
        same = (inverse[order][1:] == inverse[order][:-1]) & (frame_nums[order][1:] == frame_nums[order][:-1])
        if same.any():
            k = int(np.argmax(same))
            a, b = int(order[k]), int(order[k + 1])
            raise DataError(
                h5_path,
                f"annot_id '{uniq[inverse[a]]}' frame_num {int(frame_nums[a])} appears twice (rows {a} and {b})",
            )
        has_patient = "patient_id" in metadata.columns
        nodules = []
        for j, annot_id in enumerate(uniq):
            rows = order[bounds[j] : bounds[j + 1]].astype(np.int64)
            meta = metadata.loc[annot_id]
            patient = meta["patient_id"] if has_patient else None
            patient = (
                annot_id if patient is None or pd.isna(patient) or not str(patient).strip() else str(patient)
            )
            tirads = {f: float(meta.get(f"ti-rads_{f}", np.nan)) for f in TIRADS_FEATURES}
            nodules.append(
                Nodule(
                    annot_id=str(annot_id),
                    patient_id=patient,
                    label=int(meta["histopath_diagnosis"]),
                    rows=rows,
                    frame_nums=frame_nums[rows],
                    tirads=tirads,
                    tirads_level=parse_level(meta.get("ti-rads_level")),
                )
            )
        return nodules

    # ------------------------------------------------------------------ lazy access
    def close(self) -> None:
        self._h5.close()

    def __len__(self) -> int:
        return len(self.nodules)

    def _read(self, key: str, annot_id: str, idx: Sequence[int] | np.ndarray, box: Box | None) -> np.ndarray:
        nodule = self.by_id[annot_id]
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < -nodule.n_frames or idx.max() >= nodule.n_frames):
            raise IndexError(
                f"frame index out of range for nodule {annot_id!r} with {nodule.n_frames} frames"
            )
        return read_rows(self._h5.dataset(key), nodule.rows[idx], box)

    def frames(self, annot_id: str, idx: Sequence[int] | np.ndarray, box: Box | None = None) -> np.ndarray:
        """(k, H, W) uint8 frames at positions ``idx`` of the nodule's ordered frames (optionally a box only)."""
        return self._read("image", annot_id, idx, box)

    def masks(self, annot_id: str, idx: Sequence[int] | np.ndarray, box: Box | None = None) -> np.ndarray:
        """(k, H, W) uint8 masks in {0, 1}; values other than 0, 1 and 255 raise :class:`DataError`."""
        if not self.has_mask:
            raise DataError(self.h5_path, "no 'mask' dataset in this file")
        m = self._read("mask", annot_id, idx, box)
        if ((m != 0) & (m != 255) & (m != 1)).any():
            raise DataError(
                self.h5_path, f"mask values of nodule {annot_id!r} lie outside {{0, 1}} / {{0, 255}}"
            )
        return (m > 0).view(np.uint8)

    def bbox(self, annot_id: str, i: int) -> Box | None:
        """ROI box of the annotated mask at position ``i`` (end-exclusive), None when the nodule is out of view."""
        return bbox_from_mask(self.masks(annot_id, [i])[0])

    def labels(self) -> np.ndarray:
        return np.array([n.label for n in self.nodules], dtype=np.int64)

    def groups(self) -> list[str]:
        return [n.patient_id for n in self.nodules]
