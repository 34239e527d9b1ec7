"""Per-nodule embedding sequences from ``embeddings.h5`` (DESIGN.md format 4) for the attention head.

Layout (written by ``usnodule embeddings``): one group per nodule (group name = annot_id, with ``/`` escaped as
``%2F``), datasets ``image`` and ``seg`` (S x 256 float32, stack order) and optionally ``image_prob`` /
``seg_prob`` (S,) stage-1/3 stack probabilities; group attrs ``annot_id``, ``label``, ``fold``, ``part``,
``source``; file attrs name the checkpoints that produced it and the fold and splits file they were fitted
for, which :class:`EmbeddingDataModule` checks against its own (:mod:`datamodules.provenance`): a head of fold 2
is never fitted on fold 0's embeddings.

**Views** (cross-fitted files, ``usnodule embeddings --crossfit``): a nodule may carry the embeddings of more than
one encoder pair.  Its ``encoders`` attribute lists them (``"B"``: a training nodule of half A, embedded by half
B's encoders only; ``"A,B"``: a validation or test nodule, embedded by both); view 0 is stored under the plain
names, view j > 0 under ``<name>_<j>`` (:func:`view_key`).  Readers average over views: the head scores each
view and a nodule's probability is the mean over its views (:class:`EmbeddingDataset` yields one item per
view, all with the nodule's index, which the case metrics and ``usnodule baselines`` average); stack
probabilities are averaged per stack.  Embeddings of two encoders are never averaged with each other: they live
in different spaces.  A file without ``encoders`` has one view per nodule (in-sample stacking).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules.errors import DataError
from datamodules.folds import load_fold
from datamodules.lazy_h5 import LazyH5, open_checked
from datamodules.parts import BaseDataModule
from datamodules.provenance import check_file


def group_name(annot_id: str) -> str:
    return annot_id.replace("%", "%25").replace("/", "%2F")


def view_key(key: str, view: int) -> str:
    """Dataset name of ``key`` (``image``, ``seg``, ``image_prob``, ``seg_prob``) for a nodule's view ``view``."""
    return key if view == 0 else f"{key}_{view}"


def encoders_of(group: h5py.Group) -> list[str]:
    """The encoder (half) name of each view of a nodule group; ``[""]`` for a file of one encoder pair."""
    text = str(group.attrs.get("encoders", ""))
    return text.split(",") if text else [""]


def refuse_crossfitted_head(head: str | os.PathLike, head_data: dict) -> None:
    """One-line :class:`DataError` when the head checkpoint ``head`` (``head_data``: its data settings) was
    trained on cross-fitted embeddings: it learned the two half-fold encoder pairs' embeddings, not those of
    the fold's ``vit.ckpt`` / ``maskcnn.ckpt``, which ``usnodule predict`` and ``export`` run it on."""
    path = head_data.get("path")
    if not path or not Path(path).is_file():
        return
    with h5py.File(path, "r") as f:
        stacking = str(f.attrs.get("stacking", "in-sample"))
    if stacking == "cross-fitted":
        raise DataError(
            head,
            f"was trained on cross-fitted embeddings ({path}: two half-fold encoder pairs), not on the "
            "fold's vit.ckpt / maskcnn.ckpt; predict and export run one encoder pair: use a fold trained "
            "without CROSSFIT",
        )


def read_index(path: str | os.PathLike) -> dict[str, dict]:
    """``{annot_id: {"group", "label", "S", "D", "views"}}`` of an embeddings file, validated (one line on any
    problem)."""
    path = Path(path)
    index = {}
    with open_checked(path, missing="embeddings file does not exist (run `usnodule embeddings` first)") as f:
        for name, g in f.items():
            if not isinstance(g, h5py.Group) or "image" not in g or "seg" not in g:
                raise DataError(path, f"'{name}' is not a nodule group with 'image' and 'seg' datasets")
            si, ss = g["image"].shape, g["seg"].shape
            if len(si) != 2 or si != ss:
                raise DataError(path, f"nodule '{name}': 'image' {si} and 'seg' {ss} must both be (S, D)")
            if si[0] < 1:
                raise DataError(path, f"nodule '{name}' has no stacks")
            if "label" not in g.attrs:
                raise DataError(path, f"nodule '{name}' has no 'label' attribute")
            views = len(encoders_of(g))
            for j in range(1, views):
                shapes = [g[view_key(k, j)].shape if view_key(k, j) in g else None for k in ("image", "seg")]
                if shapes != [si, si]:
                    raise DataError(path, f"nodule '{name}': view {j} has 'image'/'seg' {shapes}, not {si}")
            aid = str(g.attrs.get("annot_id", name))
            index[aid] = {
                "group": name,
                "label": int(g.attrs["label"]),
                "S": si[0],
                "D": si[1],
                "views": views,
            }
    if not index:
        raise DataError(path, "holds no nodule groups")
    return index


class EmbeddingDataset(Dataset):
    """Embedding sequences of the given nodules (sorted ids), one item per view (module docstring). Item:
    ``{"image_emb": (S,D), "seg_emb": (S,D), "label": long, "nodule": long, "view": long}``; ``nodule`` indexes
    :attr:`nodule_ids` (and :attr:`labels`), so items of one nodule share it.

    Items are kept once read: a nodule's embeddings are a few kB (12 MB for all of Stanford's 192 sweeps), and
    two HDF5 reads per item per epoch were 28% of a demo head fit (BENCHMARKS.md "Warm start").  Readers get
    the same tensors every epoch; ``pad_collate`` copies them, nothing writes to them.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        nodule_ids: Sequence[str] | None = None,
        index: dict[str, dict] | None = None,
    ) -> None:
        self.path = Path(path)
        self.info = index if index is not None else read_index(self.path)
        ids = sorted(self.info) if nodule_ids is None else sorted(str(i) for i in nodule_ids)
        missing = [i for i in ids if i not in self.info]
        if missing:
            raise DataError(
                self.path, f"{len(missing)} nodule(s) of the split have no embeddings, e.g. {missing[:3]}"
            )
        self.nodule_ids = ids
        self.labels = [self.info[i]["label"] for i in ids]
        # (nodule index, view) of each item: one item per view of every nodule
        self.rows = [(i, j) for i, nid in enumerate(ids) for j in range(self.info[nid].get("views", 1))]
        self._h5 = LazyH5(self.path)
        self._items: dict[int, dict[str, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def read(self, i: int, key: str, view: int = 0) -> np.ndarray:
        return self._h5.file[self.info[self.nodule_ids[i]]["group"]][view_key(key, view)][()]

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        if k not in self._items:
            i, j = self.rows[k]
            self._items[k] = {
                "image_emb": torch.from_numpy(self.read(i, "image", j)).float(),
                "seg_emb": torch.from_numpy(self.read(i, "seg", j)).float(),
                "label": torch.tensor(self.labels[i], dtype=torch.long),
                "nodule": torch.tensor(i, dtype=torch.long),
                "view": torch.tensor(j, dtype=torch.long),
            }
        return self._items[k]


def pad_collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Pad variable-length sequences to the batch's longest S with zeros; ``valid`` is True on real stacks."""
    lengths = [len(it["image_emb"]) for it in items]
    s_max, d = max(lengths), items[0]["image_emb"].shape[1]
    out = {k: torch.zeros(len(items), s_max, d) for k in ("image_emb", "seg_emb")}
    valid = torch.zeros(len(items), s_max, dtype=torch.bool)
    for b, (it, s) in enumerate(zip(items, lengths, strict=True)):
        out["image_emb"][b, :s] = it["image_emb"]
        out["seg_emb"][b, :s] = it["seg_emb"]
        valid[b, :s] = True
    out["valid"] = valid
    for k in ("label", "nodule", "view"):
        if k in items[0]:
            out[k] = torch.stack([it[k] for it in items])
    return out


class EmbeddingDataModule(BaseDataModule):
    """Head-stage batches (contract "Head") of one fold; predict = every nodule of the file (or a part)."""

    collate_fn = staticmethod(pad_collate)

    def __init__(
        self,
        path: str,
        splits: str,
        fold: int | None = 0,
        batch_size: int = 16,
        num_workers: int = 0,
        predict_ids: str | list[str] = "all",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.check_options()
        self.datasets: dict[str, EmbeddingDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        hp = self.hparams
        index = read_index(hp.path)
        check_file(
            "embeddings", hp.path, fold=hp.fold, splits=hp.splits, asked="data.init_args.fold asks for {fold}"
        )
        split = load_fold(hp.splits, hp.fold)
        for part in ("train", "val", "test"):
            self.datasets[part] = EmbeddingDataset(hp.path, split[part], index=index)
        if isinstance(hp.predict_ids, str):
            ids = None if hp.predict_ids == "all" else split[hp.predict_ids]
        else:
            ids = hp.predict_ids
        self.datasets["predict"] = EmbeddingDataset(hp.path, ids, index=index)
