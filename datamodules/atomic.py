"""Write-to-temporary-then-rename, so a failed or killed step never leaves a half file that looks complete.

Temporaries are siblings of the target, hidden and named after it and the writing process:
``.<name>.partial-<pid><suffix>`` (the new output while it is written) and ``.<name>.old-<pid><suffix>`` (the
previous directory, moved aside during the swap).  The PID is kept in the name so that a write can tell its
own temporaries from those of a live concurrent writer; the name pattern is what lets the *next* write find
and clear what a killed run left (:func:`clean_stale`), which a bare PID name never allowed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

from datamodules.errors import is_write_error, write_error


def _temp_name(path: Path, kind: str, pid: int) -> Path:
    return path.with_name(f".{path.name}.{kind}-{pid}{path.suffix}")


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (signal 0 checks without sending anything).  Our own PID counts as dead:
    a temporary with it was left by an earlier process that had the same PID (containers reuse small PIDs),
    since this one is not inside another write to the same target."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists but belongs to someone else, or cannot tell: keep its files
    return True


def clean_stale(path: str | os.PathLike) -> list[Path]:
    """Clear the temporaries that killed writes of ``path`` left next to it; returns what it removed or
    restored.

    A ``.partial-<pid>`` is removed: it may be half written, so it is never trusted.  An ``.old-<pid>`` is the
    complete previous output moved aside by a swap: if ``path`` is missing (killed between the two renames)
    it is renamed back, so the old set is in place again; otherwise it is removed.  Temporaries of a process
    that is still running are left alone, so two writers of the same target do not break each other.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(partial|old)-(\d+){re.escape(path.suffix)}")
    found = []
    for p in path.parent.iterdir():
        m = pattern.fullmatch(p.name)
        if m and not _alive(int(m.group(2))):
            found.append((m.group(1) == "partial", p))
    done = []
    for partial, p in sorted(found):  # the old copies first: one of them may go back into place
        if not partial and not _exists(path):
            os.rename(p, path)
        else:
            _remove(p)
        done.append(p)
    return done


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; move it onto ``path`` only if the block succeeds.

    Works for files and directories.  The temporary name keeps the suffix (``x.h5`` -> ``.x.h5.partial-<pid>.h5``)
    so libraries that dispatch on the extension still work.  Temporaries left by killed earlier writes of
    ``path`` are cleared first (:func:`clean_stale`).  On any exception, the temporary is removed and ``path``
    is left as it was.

    A file is swapped by one ``os.replace`` (atomic).  A directory cannot be replaced in one rename, so the
    swap is: rename the old directory aside (``.<name>.old-<pid>``), rename the new one into place, then delete
    the old.  Deleting first (as this did before) meant a kill mid-delete left a half-deleted old set and the
    new one hidden.  Now a kill at any point leaves a complete set: before the first rename the old one is in
    place; between the renames the old one is complete under its aside name and the next write (or
    :func:`clean_stale`) renames it back; after the second the new one is in place and the aside copy is
    garbage the next write removes.  If the second rename fails with an exception, the old one is put back.

    A write that fails because the disk is full (or the quota, or the filesystem is read-only) comes out as a
    one-line :class:`~datamodules.errors.DataError` naming ``path``, after the temporary is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    tmp = _temp_name(path, "partial", os.getpid())
    old = _temp_name(path, "old", os.getpid())
    _remove(tmp)
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink() and tmp.is_dir():
            os.rename(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                if not _exists(path):
                    os.rename(old, path)
                raise
            _remove(old)
        else:
            os.replace(tmp, path)
    except BaseException as e:
        _remove(tmp)
        if is_write_error(e):
            raise write_error(path, e) from None
        raise


def _exists(p: Path) -> bool:
    return p.exists() or p.is_symlink()


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif _exists(p):
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
