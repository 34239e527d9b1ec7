"""Which fold and data each artefact of the STACT-Time chain was made for, and the checks its consumers make.

What each artefact records:

- a checkpoint of ``lightning fit``: its data module's init args, which Lightning saves as
  ``datamodule_hyper_parameters`` (``fold``, ``h5``, ``splits``; ``masks_h5`` for the mask CNN; ``path`` =
  the embeddings file for a head);
- ``masks.h5`` (``usnodule masks``): the ``fold`` and ``splits`` (with ``splits_sha256``) of the MSU-Net that
  made it and that checkpoint's ``seg_sha256``; the cine file's ``annot_id`` / ``frame_num`` columns, which
  :class:`~datamodules.stacks.PredictedMasks` checks row by row;
- ``embeddings.h5`` (``usnodule embeddings``): ``fold``, ``splits`` / ``splits_sha256``, the SHA-256 of the ViT
  and mask CNN checkpoints (``vit_sha256``, ``maskcnn_sha256``) and of the MSU-Net behind its masks.

The consumers: ``usnodule embeddings`` (a ViT, a mask CNN and a ``masks.h5`` of one fold and one data set), the
mask CNN's fit (``masks.h5`` of its fold), the head's fit and ``usnodule baselines`` (embeddings of their fold),
``usnodule predict`` / ``export`` (four checkpoints of the fold that ``--fold-dir .../fold<k>`` names, and a head
fitted on embeddings of these very ViT and mask CNN checkpoints).  A mismatch is a one-line
:class:`~datamodules.errors.DataError` naming the file and both values.  Why it matters: fold k's networks were
fitted on fold k's training nodules only; fed anything of another fold, they score nodules they were trained on.

A fold is ``k``, or ``None`` for a fit on every nodule (``fold: null``).  HDF5 attributes write ``-1`` for "no
fold known" (files written before these checks, or without ``--fold``), which is not checked.  Something that
records nothing (a checkpoint saved by hand, a file of an older version) cannot be checked and is accepted; so
is a recorded data file that no longer exists.  Two data files are the same data when they are one file or have
the same SHA-256; a file over :data:`DIGEST_LIMIT` (a real cine HDF5 is 36 GB) is compared by its size only,
since hashing it would cost minutes (for masks the row-by-row check against the cine file covers the rest).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from datamodules.errors import DataError
from datamodules.files import file_digest, same_file

DIGEST_LIMIT = 1 << 30  # bytes: larger data files are compared by size (see the module doc)


class _Unknown:
    """The fold of something that records none."""

    def __repr__(self) -> str:
        return "UNKNOWN"


UNKNOWN = _Unknown()


def fold_of(record: Mapping) -> int | None | _Unknown:
    """The fold a record says it belongs to: ``k``, ``None`` (every nodule) or :data:`UNKNOWN`."""
    if "fold" not in record:
        return UNKNOWN
    value = record["fold"]
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return UNKNOWN


def fold_name(fold: int | None) -> str:
    return "every nodule (fold null)" if fold is None else f"fold {fold}"


def fold_of_dir(fold_dir: str | os.PathLike | None) -> int | _Unknown:
    """``runs/<exp>/fold2`` -> 2: the fold a fold folder is named for (:data:`UNKNOWN` for another name)."""
    if fold_dir is None:
        return UNKNOWN
    m = re.fullmatch(r"fold(\d+)", Path(fold_dir).name or Path(fold_dir).resolve().name)
    return int(m.group(1)) if m else UNKNOWN


def same_data(recorded, given, recorded_sha256: str | None = None) -> bool | None:
    """Whether the file ``given`` holds the data a record names: the file ``recorded`` or, when the record has
    it, the SHA-256 taken when the record was made.  ``None`` when that cannot be known (nothing recorded, a
    file gone, or a file over :data:`DIGEST_LIMIT` whose size matches)."""
    if given is None or not Path(given).is_file():
        return None
    given = Path(given)
    if recorded_sha256:
        if given.stat().st_size > DIGEST_LIMIT:
            return None
        return str(recorded_sha256) == file_digest(given)
    if not recorded:
        return None
    recorded = Path(str(recorded))
    if same_file(recorded, given):
        return True
    if not recorded.is_file():
        return None
    if recorded.stat().st_size != given.stat().st_size:
        return False
    if given.stat().st_size > DIGEST_LIMIT:
        return None
    return file_digest(recorded) == file_digest(given)


def read_attrs(path: str | os.PathLike) -> dict:
    """The file attributes of an HDF5 artefact (``{}`` when it cannot be read: its reader says why later)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return {k: (v.item() if getattr(v, "size", 0) == 1 else v) for k, v in f.attrs.items()}
    except (OSError, ValueError, KeyError):
        return {}


def file_record(path: str | os.PathLike) -> dict:
    """An HDF5 artefact's attributes (``masks.h5``, ``embeddings.h5``) as a record: ``h5`` = the ``cine`` file
    it was made from, and no ``fold`` where it says ``-1`` (not known)."""
    record = read_attrs(path)
    if "cine" in record:
        record["h5"] = record["cine"]
    if fold_of(record) in (-1, UNKNOWN):
        record.pop("fold", None)
    return record


def checkpoint_record(path: str | os.PathLike) -> dict:
    """A checkpoint's data settings (``datamodule_hyper_parameters``), read without loading its weights into
    memory (``mmap``); ``{}`` when it has none or cannot be read (its loader says why later)."""
    import torch

    try:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except RuntimeError:  # an old (non-zip) checkpoint cannot be memory-mapped
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        return dict(ckpt.get("datamodule_hyper_parameters") or {}) if isinstance(ckpt, dict) else {}
    except Exception:  # noqa: BLE001  (torch/pickle raise many types for a bad file; from_checkpoint reports it)
        return {}


LABELS = {
    "seg": "MSU-Net checkpoint",
    "vit": "ViT checkpoint",
    "maskcnn": "mask CNN checkpoint",
    "head": "head checkpoint",
    "masks": "predicted masks",
    "embeddings": "embeddings",
}


# ---------------------------------------------------------------------------------------------- checks
def check_fold_set(
    records: Mapping[str, tuple[Path, Mapping]],
    *,
    fold: int | None | _Unknown = UNKNOWN,
    asked: str = "",
    data: Mapping[str, str | os.PathLike | None] | None = None,
) -> int | None | _Unknown:
    """Artefacts that must belong to one fold and one data set: ``records`` maps a name (:data:`LABELS`) to
    ``(file, record)``, a checkpoint's data settings (:func:`checkpoint_record`) or an HDF5 file's
    (:func:`file_record`).

    Every recorded fold must be ``fold`` (``asked`` says who asked for it, with ``{fold}`` for its name:
    ``"--fold asks for {fold}"``) or, without one, the first recorded fold.  ``data`` maps a record key (``h5``, ``splits``) to the file the consumer uses (or to
    ``None``: the first record's file that exists): every record's file under that key (or its
    ``<key>_sha256``) must hold the same data.  Returns the fold they share (:data:`UNKNOWN` when none records
    one)."""
    want, source = fold, asked.format(fold=fold_name(fold)) if fold is not UNKNOWN else ""
    for name, (path, rec) in records.items():
        got = fold_of(rec)
        if got is UNKNOWN:
            continue
        if want is UNKNOWN:
            want, source = got, f"{LABELS.get(name, name)} {path} is of {fold_name(got)}"
        elif got != want:
            raise DataError(path, f"{LABELS.get(name, name)} of {fold_name(got)}, but {source}")
    for key, given in (data or {}).items():
        ref = Path(given) if given is not None else None
        source = f"the {key} given, {given}"
        for name, (path, rec) in records.items():
            recorded, sha = rec.get(key), rec.get(f"{key}_sha256")
            if not recorded and not sha:
                continue
            if ref is None:  # the first record that names an existing file is the reference
                if recorded and Path(str(recorded)).is_file():
                    ref, source = (
                        Path(str(recorded)),
                        f"{recorded}, which {LABELS.get(name, name)} {path} was made with",
                    )
                continue
            if same_data(recorded, ref, sha) is False and not (key == "splits" and _derived(recorded, ref)):
                what = recorded or f"of SHA-256 {str(sha)[:12]}"
                raise DataError(
                    path, f"{LABELS.get(name, name)} made with {key} {what}, other data than {source}"
                )
    return want


def masks_attrs(seg: str | os.PathLike, seg_data: Mapping) -> dict:
    """What ``masks.h5`` records of the MSU-Net checkpoint that made it (module doc)."""
    attrs = {"seg_sha256": file_digest(seg)}
    fold = fold_of(seg_data)
    if fold is not UNKNOWN:
        attrs["fold"] = -1 if fold is None else int(fold)
    splits = seg_data.get("splits")
    if splits and Path(splits).is_file():
        attrs["splits"] = str(Path(splits).resolve())
        attrs["splits_sha256"] = file_digest(splits)
    return attrs


def check_file(
    name: str, path: str | os.PathLike, *, fold: int | None, splits: str | os.PathLike | None, asked: str
) -> None:
    """A fit (or ``usnodule baselines``) of fold ``fold`` that reads ``masks.h5`` (``name="masks"``) or
    ``embeddings.h5`` (``"embeddings"``): the file must be of that fold and splits."""
    record = file_record(path)
    check_fold_set({name: (Path(path), record)}, fold=fold, asked=asked, data={"splits": splits})


def check_upstream(consumer: Path, fitted_on, key: str, checkpoint: Path, what: str) -> None:
    """``consumer`` was fitted on the file ``fitted_on``, whose attribute ``key`` is the SHA-256 of the
    checkpoint that made it: that must be ``checkpoint``, the one used with ``consumer`` now (nothing to check
    when the file is gone or does not say)."""
    if not fitted_on or not Path(str(fitted_on)).is_file():
        return
    recorded = read_attrs(fitted_on).get(key)
    if not recorded:
        return
    actual = file_digest(checkpoint)
    if recorded != actual:
        raise DataError(
            consumer,
            f"was fitted on {fitted_on}, made by another {what} (SHA-256 {str(recorded)[:12]}) than "
            f"{checkpoint} (SHA-256 {actual[:12]})",
        )


def check_fold_checkpoints(paths: Mapping[str, Path], fold_dir: str | os.PathLike | None) -> None:
    """``usnodule predict`` / ``export``: the STACT-Time checkpoints (``seg``, ``vit``, ``maskcnn``, ``head``)
    must be of one fold -- the one ``--fold-dir .../fold<k>`` is named for, when it is -- and one data set; the
    head must have been fitted on embeddings of these ViT and mask CNN checkpoints, and the mask CNN on masks of
    this MSU-Net, where those files still say so."""
    records = {name: (Path(p), checkpoint_record(p)) for name, p in paths.items()}
    check_fold_set(
        records,
        fold=fold_of_dir(fold_dir),
        asked=f"--fold-dir {fold_dir} is {{fold}}",
        data={"splits": None, "h5": None},
    )
    if "head" in records:
        head_path, head = records["head"]
        for name in ("vit", "maskcnn"):
            if name in paths:
                check_upstream(head_path, head.get("path"), f"{name}_sha256", paths[name], LABELS[name])
    if "maskcnn" in records and "seg" in paths:
        mask_path, mask = records["maskcnn"]
        check_upstream(mask_path, mask.get("masks_h5"), "seg_sha256", paths["seg"], LABELS["seg"])


def _crossfit_origin(path) -> Path | None:
    """The splits file a cross-fit half's splits file was derived from (``usnodule crossfit-halves`` records it
    under ``crossfit.splits``), or None."""
    import json

    try:
        doc = json.loads(Path(str(path)).read_text())
        return Path(doc["crossfit"]["splits"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _derived(recorded, ref: Path) -> bool:
    """A cross-fit half's splits file and the fold's splits it was derived from hold the same data: the half's
    encoders use the fold's MSU-Net masks (issue 10, cross-fitting)."""
    if not recorded:
        return False
    for half, whole in ((ref, recorded), (recorded, ref)):
        origin = _crossfit_origin(half)
        if origin is not None and same_data(str(origin), Path(str(whole)), None) is not False:
            return True
    return False
