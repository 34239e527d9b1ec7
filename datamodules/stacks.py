"""3-stack frame instances and frame/mask pairs of the Stanford cine-clip set (STACT-Time sec. 2.3).

**3-stacks** (ViT and mask CNN stages).  A nodule's frames, ordered by ``frame_num``, are cut into
non-overlapping windows of three adjacent frames; stack ``s`` holds positions ``3s, 3s+1, 3s+2`` in the RGB
channels.  Windows never cross nodules (positions are within one nodule's ordered frames).  A trailing
remainder of 1-2 frames is dropped; a nodule with fewer than 3 frames in all gets one stack with its last frame
repeated, so that every nodule has at least one stack (S >= 1) and is never lost from evaluation.

``stack_frames="spread"`` (a choice of this project; the paper stacks adjacent frames): with ``S = n // 3``
stacks, stack ``s`` holds positions ``s, s+S, s+2S`` instead, three frames a third of the sweep apart.  The same
frames are used and the same number of stacks made, so a spread mask branch pairs with an adjacent image branch
stack for stack in the embedding export (token ``s`` of both is then no longer the same three frames; the
head's attention sees every token of both).  Why: a nodule's shape *change along the sweep* is invisible in
three adjacent frames but spans a spread stack (BENCHMARKS.md, "Demo recipe, round 4": the demo's mask CNN
0.615 -> 0.680 validation AUROC).

**ROI crop** (image stacks).  The box is the union of the three frames' mask boxes (annotated masks by
default; predicted masks from a ``masks.h5`` with ``use_predicted_boxes=True``), grown by ``buffer`` pixels
(paper: 5) on every side and clipped at the image border.  When all three masks are empty (nodule out of view)
the nodule's union box over all its frames is used instead; when every mask of the nodule is empty, the full
frame.  The boxes come from every frame's mask box, computed once per file and process
(``datamodules/boxes.py``; ``box_cache=False`` recomputes them from the masks at each read).  Only the box
is read from the HDF5 (the reader's ``box=``).  The crop is resized to ``img_size``
(bilinear, antialiased when shrinking), scaled to [0, 1] and optionally normalised by ``mean``/``std``.

**Mask stacks** (mask CNN).  Predicted masks from ``masks.h5`` (written by ``usnodule masks``) are stacked the
same way but *not* cropped: the full frame is resized (antialiased, so values lie in [0, 1]).  A binary mask
carries only shape, size and position; cropping to the box and resizing would erase size and position, so the
full frame keeps them (``mask_roi=True`` crops like the images instead).

**Frames** (segmentation stage).  Every frame of the given nodules, including frames whose annotated mask is
empty (the network must learn to predict "no nodule" too), 1 channel, resized to ``size``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from datamodules.boxes import boxes_for
from datamodules.errors import DataError, OptionError
from datamodules.folds import load_fold
from datamodules.lazy_h5 import InMemoryH5, LazyH5, open_checked, read_rows, text
from datamodules.parts import IMAGENET_MEAN, IMAGENET_STD, BaseDataModule
from datamodules.provenance import check_file
from datamodules.stanford import Box, StanfordCine, bbox_from_mask

STACK = 3  # frames per instance (RGB channels)
STACK_FRAMES = ("adjacent", "spread")  # which frames a stack holds (module docstring)


# ---------------------------------------------------------------------------------------------- geometry
def stack_positions(n_frames: int, frames: str = "adjacent") -> list[np.ndarray]:
    """Positions of each stack in a nodule of ``n_frames`` ordered frames: non-overlapping 3-windows
    (``frames="adjacent"``) or, with ``S = n_frames // 3``, positions ``s, s+S, s+2S`` (``"spread"``).

    Both drop the trailing 1-2 frames; a nodule with 1-2 frames gets one stack padded with its last frame.
    """
    if frames not in STACK_FRAMES:
        raise ValueError(f"stack frames must be one of {STACK_FRAMES}, got {frames!r}")
    if n_frames <= 0:
        return []
    if n_frames < STACK:
        return [np.minimum(np.arange(STACK), n_frames - 1)]
    n = n_frames // STACK
    if frames == "spread":
        return [np.arange(STACK) * n + s for s in range(n)]
    return [np.arange(s * STACK, s * STACK + STACK) for s in range(n)]


def union_box(boxes: Sequence[Box | None]) -> Box | None:
    """Smallest box holding all non-None boxes, None if all are None."""
    real = [b for b in boxes if b is not None]
    if not real:
        return None
    return (
        min(b[0] for b in real),
        min(b[1] for b in real),
        max(b[2] for b in real),
        max(b[3] for b in real),
    )


def grow_box(box: Box, buffer: int, shape: tuple[int, int]) -> Box:
    """``box`` grown by ``buffer`` pixels on each side and clipped at the image border (end-exclusive)."""
    h, w = shape
    y0, x0, y1, x1 = box
    return max(0, y0 - buffer), max(0, x0 - buffer), min(h, y1 + buffer), min(w, x1 + buffer)


def centred_box(cy: float, cx: float, height: int, width: int, shape: tuple[int, int]) -> Box:
    """Box ``(y0, x0, y1, x1)`` of ``height`` x ``width`` (each at most the image's side) centred on
    ``(cy, cx)`` and *shifted*, not clipped, to lie inside an image of ``shape``: the square ROI crops keep
    their size and aspect near the border."""
    h, w = shape
    bh, bw = min(height, h), min(width, w)
    y0 = int(np.clip(round(cy - bh / 2), 0, h - bh))
    x0 = int(np.clip(round(cx - bw / 2), 0, w - bw))
    return y0, x0, y0 + bh, x0 + bw


def resize(x: np.ndarray, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """(C, h, w) uint8 array -> (C, *size) float tensor with the same value scale (0..255 stays 0..255).

    Interpolates in uint8 (torch's vectorised uint8 path, ~3x faster than float on CPU, and the input is uint8
    anyway); antialiased when shrinking (real frames are 802 x 1054: without it thin structures alias).
    """
    t = torch.from_numpy(np.ascontiguousarray(x))[None]
    if tuple(t.shape[-2:]) != tuple(size):
        if mode == "nearest":
            t = F.interpolate(t, size=size, mode="nearest-exact")
        else:
            shrink = t.shape[-2] > size[0] or t.shape[-1] > size[1]
            t = F.interpolate(t, size=size, mode="bilinear", antialias=shrink, align_corners=False)
    return t[0].float()


def _size2(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))


# ---------------------------------------------------------------------------------------------- masks.h5
class PredictedMasks:
    """Predicted masks of every frame (``usnodule masks`` output), in the cine file's row order.

    Validated against the cine file at start (shape, dtype, ``annot_id``/``frame_num`` columns row by row);
    read lazily through a handle opened per process, like :class:`StanfordCine`.
    """

    def __init__(self, path: str | os.PathLike, cine: StanfordCine):
        self._setup(path=Path(path), cine=cine, store=LazyH5(path))
        self._validate()

    @classmethod
    def from_arrays(cls, masks: np.ndarray, cine: StanfordCine) -> PredictedMasks:
        """Predicted masks already in memory: (N, H, W) uint8 {0, 1} in ``cine``'s row order, as ``masks.h5``
        holds them (for :meth:`StanfordCine.from_arrays`, the clip's frame order). Not copied."""
        n = sum(nod.n_frames for nod in cine.nodules)
        if masks.shape != (n, *cine.image_shape):
            want = (n, *cine.image_shape)
            raise DataError(cine.h5_path, f"masks shape {masks.shape} does not match the frames {want}")
        obj = cls.__new__(cls)
        obj._setup(path=cine.h5_path, cine=cine, store=InMemoryH5({"mask": masks}, cine.h5_path))
        return obj

    def _setup(self, *, path: Path, cine: StanfordCine, store: LazyH5 | InMemoryH5) -> None:
        # The one place attributes are set, for both constructors (see StanfordCine._setup).
        self.path = path
        self.cine = cine
        self._h5 = store

    def _validate(self) -> None:
        path = self.path
        missing = "masks file does not exist (run `usnodule masks` first)"
        with open_checked(path, ("mask", "annot_id", "frame_num"), missing) as f:
            n = sum(nod.n_frames for nod in self.cine.nodules)
            want = (n, *self.cine.image_shape)
            if f["mask"].shape != want:
                raise DataError(path, f"'mask' shape {f['mask'].shape} does not match the cine file {want}")
            if f["mask"].dtype != np.uint8:
                raise DataError(path, f"'mask' must be uint8, got {f['mask'].dtype}")
            ids = np.array([text(v, path, "annot_id") for v in f["annot_id"][()]], dtype=object)
            try:
                nums = np.array([int(text(v, path, "frame_num")) for v in f["frame_num"][()]], dtype=np.int64)
            except ValueError:
                raise DataError(path, "'frame_num' holds a value that is not an integer") from None
        if ids.shape != (n,) or nums.shape != (n,):
            raise DataError(path, f"'annot_id'/'frame_num' must have {n} rows")
        want_ids, want_nums = row_columns(self.cine)
        bad = np.flatnonzero((ids != want_ids) | (nums != want_nums))
        if bad.size:
            r = int(bad[0])
            raise DataError(
                path,
                f"row {r} is ({ids[r]}, {nums[r]}) but the cine file has "
                f"({want_ids[r]}, {want_nums[r]}); masks were made from another file",
            )

    def masks(self, annot_id: str, idx: Sequence[int] | np.ndarray, box: Box | None = None) -> np.ndarray:
        """(k, H, W) uint8 {0, 1} predicted masks at positions ``idx`` of the nodule's ordered frames."""
        rows = self.cine.by_id[annot_id].rows[np.asarray(idx, dtype=np.int64)]
        return (read_rows(self._h5.file["mask"], rows, box) > 0).view(np.uint8)


def row_columns(cine: StanfordCine) -> tuple[np.ndarray, np.ndarray]:
    """The cine file's ``annot_id`` and ``frame_num`` columns, row by row, rebuilt from its nodule index."""
    n = sum(nod.n_frames for nod in cine.nodules)
    ids = np.empty(n, dtype=object)
    nums = np.empty(n, dtype=np.int64)
    for nod in cine.nodules:
        ids[nod.rows] = nod.annot_id
        nums[nod.rows] = nod.frame_nums
    return ids, nums


# ---------------------------------------------------------------------------------------------- datasets
def _as_cine(
    cine: StanfordCine | str | os.PathLike, metadata: str | os.PathLike | None = None
) -> StanfordCine:
    return cine if isinstance(cine, StanfordCine) else StanfordCine(cine, metadata)


def _check_ids(cine: StanfordCine, ids: Sequence[str]) -> list[str]:
    ids = [str(i) for i in ids]
    missing = [i for i in ids if i not in cine.by_id]
    if missing:
        raise DataError(
            cine.h5_path, f"{len(missing)} id(s) of the split are not in the file, e.g. {missing[:3]}"
        )
    return ids


class StackDataset(Dataset):
    """3-stack instances of the given nodules: the contract's ViT / Mask CNN batch items.

    Item: ``{"image": (3, h, w) float, "label": long, "nodule": long, "stack": long}`` where ``nodule`` indexes
    :attr:`nodule_ids` (sorted, so dataset order = (nodule id, stack), the export's deterministic order) and
    ``stack`` is the stack position in the nodule. ``kind="image"``: ROI crops of the frames (module docstring);
    ``kind="mask"``: predicted masks from ``masks_h5``.
    """

    def __init__(
        self,
        cine: StanfordCine | str | os.PathLike,
        nodule_ids: Sequence[str] | None = None,
        kind: str = "image",
        masks_h5: str | os.PathLike | PredictedMasks | None = None,
        img_size: int | Sequence[int] = 224,
        buffer: int = 5,
        use_predicted_boxes: bool = False,
        *,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        mask_roi: bool = False,
        transform=None,
        cache: bool = False,
        box_cache: bool = True,
        stack_frames: str = "adjacent",
    ) -> None:
        if kind not in ("image", "mask"):
            raise ValueError(f"kind must be 'image' or 'mask', got {kind!r}")
        if stack_frames not in STACK_FRAMES:
            raise ValueError(f"stack_frames must be one of {STACK_FRAMES}, got {stack_frames!r}")
        self.stack_frames = stack_frames
        self.cine = _as_cine(cine)
        ids = [n.annot_id for n in self.cine.nodules] if nodule_ids is None else nodule_ids
        self.nodule_ids = sorted(_check_ids(self.cine, ids))
        self.kind = kind
        self.size = _size2(img_size)
        self.buffer = int(buffer)
        self.use_predicted_boxes = use_predicted_boxes
        self.mask_roi = mask_roi
        self.transform = transform  # albumentations-style callable on an (h, w, 3) array, training only
        if (kind == "mask" or use_predicted_boxes) and masks_h5 is None:
            raise DataError(
                None, f"kind={kind!r} / use_predicted_boxes needs masks_h5 (from `usnodule masks`)"
            )
        if isinstance(masks_h5, PredictedMasks) or masks_h5 is None:
            self.pred = masks_h5
        else:
            self.pred = PredictedMasks(masks_h5, self.cine)
        # Per-frame mask boxes, one pass per file and process (datamodules/boxes.py); False: from the masks at
        # every read (the reference path, tested equal).
        use_boxes = box_cache and (kind == "image" or mask_roi)
        box_src = self.pred if use_predicted_boxes else self.cine
        self._boxes = boxes_for(box_src, self.nodule_ids) if use_boxes else None
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32)[:, None, None]
        # Flat index of (nodule index, stack position, frame positions): small ints only, no pixels.
        self.index: list[tuple[int, int, np.ndarray]] = []
        self.n_stacks: list[int] = []
        for j, nid in enumerate(self.nodule_ids):
            windows = stack_positions(self.cine.by_id[nid].n_frames, stack_frames)
            self.n_stacks.append(len(windows))
            self.index += [(j, s, pos) for s, pos in enumerate(windows)]
        self.labels = [self.cine.by_id[n].label for n in self.nodule_ids]
        self._fallback: dict[str, Box | None] = {}  # per-process cache of nodule union boxes
        # ``cache``: keep each decoded stack (the uint8 crop before augmentation and resizing) after its first
        # read, so epochs after the first cost no HDF5 decompression or box computation; per process (each
        # DataLoader worker fills its own).  For data sets that fit in memory (the demo; ROI crops are small).
        self._cache: dict[int, np.ndarray] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.index)

    # -- boxes -------------------------------------------------------------------------------------------------
    def _box_masks(self, nid: str, pos: np.ndarray) -> np.ndarray:
        return self.pred.masks(nid, pos) if self.use_predicted_boxes else self.cine.masks(nid, pos)

    def nodule_box(self, nid: str) -> Box | None:
        """Union box over all frames of the nodule (fallback for stacks whose masks are empty)."""
        if self._boxes is not None:
            return self._boxes.union(self.cine.by_id[nid].rows)
        if nid not in self._fallback:
            n = self.cine.by_id[nid].n_frames
            boxes = []
            for start in range(0, n, 32):  # blocks of frames: bounded memory for long clips
                m = self._box_masks(nid, np.arange(start, min(n, start + 32)))
                boxes.append(bbox_from_mask(m.max(axis=0)))
            self._fallback[nid] = union_box(boxes)
        return self._fallback[nid]

    def roi(self, nid: str, pos: np.ndarray) -> Box:
        """The crop box of one stack: union of its mask boxes + buffer, clipped; see module docstring."""
        if self._boxes is not None:
            box = self._boxes.union(self.cine.by_id[nid].rows[pos])
        else:
            box = bbox_from_mask(self._box_masks(nid, pos).max(axis=0))
        if box is None:
            box = self.nodule_box(nid)
        h, w = self.cine.image_shape
        if box is None:
            return (0, 0, h, w)
        return grow_box(box, self.buffer, (h, w))

    # -- items -------------------------------------------------------------------------------------------------
    def read(self, i: int) -> np.ndarray:
        """(3, h, w) uint8 stack ``i`` before resizing (the ROI crop or the full mask frames)."""
        j, _, pos = self.index[i]
        nid = self.nodule_ids[j]
        if self.kind == "image":
            return self.cine.frames(nid, pos, box=self.roi(nid, pos))
        box = self.roi(nid, pos) if self.mask_roi else None
        return self.pred.masks(nid, pos, box=box)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if self._cache is None:
            x = self.read(i)
        elif (x := self._cache.get(i)) is None:
            x = self._cache[i] = self.read(i)
        return self.item(i, x)

    def item(self, i: int, x: np.ndarray) -> dict[str, torch.Tensor]:
        """Item ``i`` from its raw stack ``x`` (:meth:`read`): augmentation, resizing, normalisation, keys."""
        if self.kind == "mask":
            x = x * np.uint8(255)  # {0, 255}: resizing in uint8 keeps soft edges at 1/255 steps
        if self.transform is not None:
            x = np.moveaxis(seeded(self.transform)(image=np.moveaxis(x, 0, -1))["image"], -1, 0)
        img = resize(x, self.size) / 255.0
        if self.kind == "image" and self.mean is not None:
            img = (img - self.mean) / self.std
        return {"image": img, **self.keys(i)}

    def keys(self, i: int) -> dict[str, torch.Tensor]:
        """The bookkeeping keys of item ``i`` (label, nodule, stack): no pixels read."""
        j, s, _ = self.index[i]
        return {
            "label": torch.tensor(self.labels[j], dtype=torch.long),
            "nodule": torch.tensor(j, dtype=torch.long),
            "stack": torch.tensor(s, dtype=torch.long),
        }

    def item_names(self) -> list[str]:
        """``<annot_id>:<stack>`` of every item, in dataset order (what a row of a feature cache stands for)."""
        return [f"{self.nodule_ids[j]}:{s}" for j, s, _ in self.index]

    def settings(self) -> dict:
        """What turns a raw stack into the network's input (the feature cache's key, issue 14 item 1)."""
        return {
            "kind": self.kind,
            "size": list(self.size),
            "buffer": self.buffer,
            "use_predicted_boxes": self.use_predicted_boxes,
            "mask_roi": self.mask_roi,
            "mean": None if self.mean is None else self.mean.flatten().tolist(),
            "std": None if self.std is None else self.std.flatten().tolist(),
            "augment": self.transform is not None,
            "stack_frames": self.stack_frames,
        }


class PairedStackDataset(Dataset):
    """Image and mask stacks of the same (nodule, stack) in one item, for the embedding export.

    Item: ``{"image": (3,h,w), "mask": (3,h',w'), "label", "nodule", "stack"}``.
    """

    def __init__(self, image: StackDataset, mask: StackDataset) -> None:
        if image.nodule_ids != mask.nodule_ids or len(image) != len(mask):
            raise ValueError("image and mask stack datasets must cover the same nodules")
        self.image, self.mask = image, mask
        self.nodule_ids = image.nodule_ids
        self.n_stacks = image.n_stacks
        self.labels = image.labels

    def __len__(self) -> int:
        return len(self.image)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = self.image[i]
        item["mask"] = self.mask[i]["image"]
        return item


# ``normalize`` setting of StackDataModule -> (mean, std) of its image stacks.
NORMALIZE = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "half": ((0.5,) * 3, (0.5,) * 3),
    None: (None, None),
    "none": (None, None),
}


def build_dataset(
    cine: StanfordCine,
    masks: PredictedMasks,
    vit_data: dict,
    mask_data: dict,
    img_size: int,
    mask_size: int,
    predicted_boxes: bool | None = None,
    nodule_ids: Sequence[str] | None = None,
) -> PairedStackDataset:
    """Image and mask stacks of every nodule (or of ``nodule_ids``), with the data settings the two stages were
    trained with (``vit_data`` / ``mask_data``: the StackDataModule settings from ``BaseStage.from_checkpoint``).

    ``predicted_boxes``: crop the images around the predicted masks (True), the annotated ones (False) or as
    the ViT stage was trained (None).
    """
    mean, std = NORMALIZE[vit_data.get("normalize", "imagenet")]
    if predicted_boxes is None:
        predicted_boxes = bool(vit_data.get("use_predicted_boxes", False))
    image = StackDataset(
        cine,
        nodule_ids,
        "image",
        masks,
        img_size=img_size,
        buffer=vit_data.get("buffer", 5),
        use_predicted_boxes=predicted_boxes,
        mean=mean,
        std=std,
        stack_frames=vit_data.get("stack_frames", "adjacent"),
    )
    mask = StackDataset(
        cine,
        nodule_ids,
        "mask",
        masks,
        img_size=mask_size,
        buffer=mask_data.get("buffer", 5),
        mask_roi=mask_data.get("mask_roi", False),
        stack_frames=mask_data.get("stack_frames", "adjacent"),
    )
    return PairedStackDataset(image, mask)


class FrameDataset(Dataset):
    """Every frame of the given nodules with its annotated mask, for the segmentation stage.

    All frames are used, including those whose mask is empty (the nodule is out of view); the network must
    predict empty masks there too. Item: ``{"image": (1,H,W) float in [0,1], "mask": (1,H,W) float {0,1}}``
    (plus ``nodule``/``frame`` indices). Frames: bilinear antialiased resize; masks: nearest.
    """

    def __init__(
        self,
        cine: StanfordCine | str | os.PathLike,
        nodule_ids: Sequence[str] | None = None,
        size: int | Sequence[int] = 256,
        transform=None,
        cache: bool = False,
    ) -> None:
        self.cine = _as_cine(cine)
        ids = [n.annot_id for n in self.cine.nodules] if nodule_ids is None else nodule_ids
        self.nodule_ids = sorted(_check_ids(self.cine, ids))
        self.size = _size2(size)
        self.transform = transform  # albumentations-style: same parameters for image and mask
        self.index = [
            (j, p) for j, nid in enumerate(self.nodule_ids) for p in range(self.cine.by_id[nid].n_frames)
        ]
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] | None = (
            {} if cache else None
        )  # as StackDataset's

    def __len__(self) -> int:
        return len(self.index)

    def read(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Frame ``i`` and its mask, (H, W) uint8 each, as stored."""
        j, p = self.index[i]
        nid = self.nodule_ids[j]
        return self.cine.frames(nid, [p])[0], self.cine.masks(nid, [p])[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        j, p = self.index[i]
        if self._cache is None:
            img, mask = self.read(i)
        elif (hit := self._cache.get(i)) is None:
            img, mask = self._cache[i] = self.read(i)
        else:
            img, mask = hit
        if self.transform is not None:
            out = seeded(self.transform)(image=img, mask=mask)
            img, mask = out["image"], out["mask"]
        return {
            "image": resize(img[None], self.size) / 255.0,
            "mask": resize(mask[None], self.size, mode="nearest"),  # stays {0, 1}
            "nodule": torch.tensor(j, dtype=torch.long),
            "frame": torch.tensor(p, dtype=torch.long),
        }


# ---------------------------------------------------------------------------------------------- datamodules
def _predict_ids(
    split: dict[str, list[str]], cine: StanfordCine, predict_ids: str | Sequence[str]
) -> list[str]:
    if isinstance(predict_ids, str):
        if predict_ids == "all":
            return [n.annot_id for n in cine.nodules]
        if predict_ids not in split:
            raise ValueError(
                f"predict_ids must be 'all', 'train', 'val', 'test' or a list of ids, got {predict_ids!r}"
            )
        return split[predict_ids]
    return list(predict_ids)


def seeded(transform):
    """``transform`` (an albumentations ``Compose``) reseeded from torch's RNG for this call.

    Albumentations keeps its own random state, unseeded by default: without this, two fits with the same
    ``seed_everything`` augment differently.  Drawing the seed from torch makes seed_everything and Lightning's
    DataLoader worker seeding govern it: reproducible, and different per worker and per epoch.
    """
    if hasattr(transform, "set_random_seed"):
        transform.set_random_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    return transform


def _augment(kind: str):
    """Light augmentation for training stacks: one set of random parameters for all three frames (channels)."""
    import albumentations as A

    ops = [A.HorizontalFlip(p=0.5)]
    if kind == "image":
        ops.append(A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=0.5))
    return A.Compose(ops)


class StackDataModule(BaseDataModule):
    """Train/val/test 3-stacks of one fold (from ``splits.json``) and a predict set.

    ``fold=None`` trains on every nodule. ``kind="image"`` (ViT stage) or ``"mask"`` (mask CNN stage, needs
    ``masks_h5``). ``predict_ids``: ``"all"`` (default), a part name, or a list of ids. ``normalize``:
    ``"imagenet"`` (timm's default mean/std), ``"half"`` (mean = std = 0.5, e.g. augreg ViTs) or ``None``
    ([0, 1]); image kind only. ``augment``: horizontal flip (+ brightness/contrast for images), train only.
    ``cache``: keep decoded stacks in memory after their first read (data sets that fit in memory).
    ``stack_frames``: ``"adjacent"`` (the paper's) or ``"spread"`` frames per stack (module docstring).
    """

    drop_single_last = True  # CNN encoders with BatchNorm

    def __init__(
        self,
        h5: str,
        splits: str,
        fold: int | None = 0,
        kind: str = "image",
        masks_h5: str | None = None,
        img_size: int = 224,
        batch_size: int = 32,
        num_workers: int = 0,
        buffer: int = 5,
        use_predicted_boxes: bool = False,
        metadata: str | None = None,
        predict_ids: str | list[str] = "all",
        normalize: str | None = "imagenet",
        mask_roi: bool = False,
        augment: bool = False,
        cache: bool = False,
        stack_frames: str = "adjacent",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.check_options()
        if stack_frames not in STACK_FRAMES:
            choices = ", ".join(STACK_FRAMES)
            raise OptionError("stack_frames", f"must be one of {choices}, got {stack_frames!r}")
        if normalize not in NORMALIZE:
            choices = ", ".join(repr(k) for k in NORMALIZE if k is not None)
            raise OptionError("normalize", f"must be one of {choices} or null, got {normalize!r}")
        if kind not in ("image", "mask"):
            raise OptionError("kind", f"must be 'image' or 'mask', got {kind!r}")
        self.cine: StanfordCine | None = None
        self.datasets: dict[str, StackDataset] = {}

    def _dataset(self, ids: Sequence[str], train: bool = False) -> StackDataset:
        hp = self.hparams
        if hp.normalize not in NORMALIZE:
            raise ValueError(f"normalize must be 'imagenet', 'half' or None, got {hp.normalize!r}")
        mean, std = NORMALIZE[hp.normalize if hp.kind == "image" else None]
        if self.pred is None and hp.masks_h5 is not None:
            self.pred = PredictedMasks(hp.masks_h5, self.cine)
        return StackDataset(
            self.cine,
            ids,
            kind=hp.kind,
            masks_h5=self.pred,
            img_size=hp.img_size,
            buffer=hp.buffer,
            use_predicted_boxes=hp.use_predicted_boxes,
            mean=mean,
            std=std,
            mask_roi=hp.mask_roi,
            transform=_augment(hp.kind) if (train and hp.augment) else None,
            cache=hp.cache,
            stack_frames=hp.stack_frames,
        )

    def setup(self, stage: str | None = None) -> None:
        if self.cine is None:
            hp = self.hparams
            self.cine = StanfordCine(hp.h5, hp.metadata)
            self.pred = None
            self.split = load_fold(hp.splits, hp.fold)
            if hp.masks_h5 is not None:  # predicted masks of another fold would be in-sample ones
                check_file(
                    "masks",
                    hp.masks_h5,
                    fold=hp.fold,
                    splits=hp.splits,
                    asked="data.init_args.fold asks for {fold}",
                )
        if stage in ("fit", None) and "train" not in self.datasets:
            self.datasets["train"] = self._dataset(self.split["train"], train=True)
            self.datasets["val"] = self._dataset(self.split["val"])
        if stage in ("validate",) and "val" not in self.datasets:
            self.datasets["val"] = self._dataset(self.split["val"])
        if stage in ("test", None) and "test" not in self.datasets:
            self.datasets["test"] = self._dataset(self.split["test"])
        if stage in ("predict", None) and "predict" not in self.datasets:
            self.datasets["predict"] = self._dataset(
                _predict_ids(self.split, self.cine, self.hparams.predict_ids)
            )


class FrameDataModule(BaseDataModule):
    """Frames + annotated masks of one fold for the segmentation stage (every frame, empty masks included)."""

    drop_single_last = True  # MSU-Net has BatchNorm

    def __init__(
        self,
        h5: str,
        splits: str,
        fold: int | None = 0,
        size: int = 256,
        batch_size: int = 8,
        num_workers: int = 0,
        metadata: str | None = None,
        augment: bool = False,
        cache: bool = False,
        stack_frames: str = "adjacent",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.check_options()
        if stack_frames not in STACK_FRAMES:
            choices = ", ".join(STACK_FRAMES)
            raise OptionError("stack_frames", f"must be one of {choices}, got {stack_frames!r}")
        self.cine: StanfordCine | None = None
        self.datasets: dict[str, FrameDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if self.cine is None:
            self.cine = StanfordCine(hp.h5, hp.metadata)
            self.split = load_fold(hp.splits, hp.fold)
        transform = None
        if hp.augment:
            import albumentations as A

            transform = A.Compose([A.HorizontalFlip(p=0.5)])
        for part in ("train", "val", "test"):
            if part not in self.datasets:
                self.datasets[part] = FrameDataset(
                    self.cine,
                    self.split[part],
                    hp.size,
                    transform=transform if part == "train" else None,
                    cache=hp.cache,
                )
        if "predict" not in self.datasets:
            self.datasets["predict"] = FrameDataset(self.cine, None, hp.size)


class RowBlocks(Dataset):
    """Item i = rows ``[i*block, (i+1)*block)`` of the cine file as ``(first_row, (b,1,s,s) float in [0,1])``.

    ``source``: the cine HDF5 (its ``image`` dataset), or (N, H, W) uint8 frames already in memory (a clip).
    """

    def __init__(
        self, source: str | os.PathLike | np.ndarray, n_rows: int, block: int, size: tuple[int, int]
    ) -> None:
        self.n_rows, self.block, self.size = n_rows, block, size
        self._h5 = InMemoryH5({"image": source}) if isinstance(source, np.ndarray) else LazyH5(source)

    def __len__(self) -> int:
        return (self.n_rows + self.block - 1) // self.block

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        r0 = i * self.block
        frames = read_rows(self._h5.file["image"], np.arange(r0, min(self.n_rows, r0 + self.block)))
        return r0, resize(frames, self.size)[:, None] / 255.0
