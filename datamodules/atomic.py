"""Write-to-temporary-then-rename, so a failed or killed step never leaves a half file that looks complete."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; rename it onto ``path`` only if the block succeeds.

    Works for files and directories.  The temporary name keeps the suffix (``x.h5`` -> ``.x.h5.partial-<pid>.h5``)
    so libraries that dispatch on the extension still work.  On any exception, the temporary is removed and
    ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}{path.suffix}")
    _remove(tmp)
    try:
        yield tmp
        if path.is_dir() and tmp.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        p.unlink()


def write_json(doc, path: str | os.PathLike) -> Path:
    """``doc`` as indented JSON at ``path``, atomically (splits.json, benchmark results)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def write_predictions(
    path: str | os.PathLike,
    ids: Sequence[str],
    labels: Sequence[int],
    probs: Sequence[float],
    **extra: Sequence,
) -> Path:
    """``annot_id,label,prob`` CSV (+ extra columns), atomically: the per-fold prediction format every method
    writes (``usnodule baselines``, the AsyCMST test step) and ``usnodule report`` reads."""
    import numpy as np
    import pandas as pd

    df = pd.DataFrame(
        {"annot_id": list(ids), **extra, "label": np.asarray(labels, int), "prob": np.asarray(probs, float)}
    )
    path = Path(path)
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, float_format="%.6g")
    return path
