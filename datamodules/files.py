"""File identity shared by every artefact check (a content digest, whether two paths name one file), and a fold
folder's checkpoints (STACT-Time's four; any system's by name: :func:`resolve_fold_files`)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from datamodules.errors import DataError

FOLD_CHECKPOINTS = {"seg": "seg.ckpt", "vit": "vit.ckpt", "maskcnn": "maskcnn.ckpt"}  # names in a fold folder


def file_digest(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file's bytes (hex), read in chunks (checkpoints and data files can be gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether ``a`` and ``b`` are one file (links and relative paths included); when one is gone, whether
    they resolve to the same name."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


def resolve_checkpoints(
    *,
    fold_dir: str | os.PathLike | None,
    seg=None,
    vit=None,
    maskcnn=None,
    head=None,
    head_variant: str = "stact",
) -> dict[str, Path]:
    """Explicit paths win; the rest come from ``fold_dir`` (seg.ckpt, vit.ckpt, maskcnn.ckpt,
    head_<variant>.ckpt). Every file must exist (DataError naming the first missing one)."""
    given = {"seg": seg, "vit": vit, "maskcnn": maskcnn, "head": head}
    names = {**FOLD_CHECKPOINTS, "head": f"head_{head_variant}.ckpt"}
    return resolve_fold_files(fold_dir, given, names)


def resolve_fold_files(
    fold_dir: str | os.PathLike | None, given: dict[str, str | os.PathLike | None], names: dict[str, str]
) -> dict[str, Path]:
    """The checkpoints of one system: ``given[key]`` (the ``--<key>`` option) when set, else
    ``fold_dir / names[key]``.  Every file must exist (DataError naming the first missing one)."""
    paths: dict[str, Path] = {}
    for key, value in given.items():
        if value is None:
            if fold_dir is None:
                raise DataError(None, f"--{key} is required (or give --fold-dir runs/<exp>/fold<k>)")
            value = Path(fold_dir) / names[key]
        paths[key] = Path(value)
        if not paths[key].is_file():
            raise DataError(paths[key], f"checkpoint not found (the {key} stage)")
    return paths
