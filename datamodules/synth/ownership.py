"""Which folders synth may replace: the marker it writes into its output, and :func:`check_target`."""

from __future__ import annotations

import json
import os
from pathlib import Path

from datamodules.errors import DataError
from datamodules.synth.labels import PAIRED_TRUTH_COLUMNS, TRUTH_COLUMNS

# Written into every folder synth generates.  Its presence is how a rerun knows the folder is its own earlier
# output and may be replaced; any other non-empty folder is the user's and is refused (DataError) unless the
# caller says ``overwrite``.  JSON with the layout, version and generator arguments, so a person who finds it
# knows what made the folder.
MARKER = ".usnodule-synth"
# What synth wrote before it wrote the marker, with a truth.csv header only the generator writes: recognised
# as its own too, so `make data` still regenerates a data/synth made by an older version.  The paired header of
# those versions had no focus / defect / concordance columns; today's is accepted too.
_PAIRED_COLUMNS_BEFORE_CONCORDANCE = ("case_id", "risk", "tirads_risk", "hidden_risk", "heterogeneity",
                                      "shape_change", "pattern", "ttp", "washout", "label")  # fmt: skip
_LEGACY = {
    "stanford": ({"dataset.hdf5", "metadata.csv", "truth.csv"}, (TRUTH_COLUMNS,)),
    "paired": ({"manifest.csv", "truth.csv", "bus", "ceus", "bus_mask"},
               (PAIRED_TRUTH_COLUMNS, _PAIRED_COLUMNS_BEFORE_CONCORDANCE)),
}  # fmt: skip


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("usnodule")
    except PackageNotFoundError:
        return "unknown"


def _write_marker(folder: Path, layout: str, **params) -> None:
    doc = {"written_by": "usnodule synth", "version": _version(), "layout": layout, "params": params}
    (folder / MARKER).write_text(json.dumps(doc, indent=1, default=str) + "\n")


def _synth_wrote(folder: Path, layout: str) -> bool:
    """Whether ``folder`` is synth's own output: it has the marker, or it is exactly an older synth output
    (the same names and the generator's truth.csv header)."""
    if (folder / MARKER).is_file():
        return True
    if layout not in _LEGACY:  # layouts newer than the marker (stills) always had one
        return False
    names, headers = _LEGACY[layout]
    try:
        with open(folder / "truth.csv", newline="") as fh:
            header = fh.readline().strip()
    except OSError:
        return False
    return {p.name for p in folder.iterdir()} == names and header in {",".join(c) for c in headers}


def check_target(out_dir: str | os.PathLike, layout: str, overwrite: bool = False) -> None:
    """Raise :class:`DataError` unless synth may write the ``layout`` folder ``out_dir``: it is missing, empty,
    synth's own earlier output (:func:`_synth_wrote`), or ``overwrite`` is set.

    Writing replaces the whole folder, so without this check ``usnodule synth --out DIR`` deleted whatever a
    user kept in ``DIR/stanford`` or ``DIR/paired``.  Refusing is the default because the loss cannot be
    undone and the fix (another ``--out``, or ``--overwrite``) is one flag away.  A path that is a file or a
    symlink is refused even with ``overwrite``: a folder cannot be renamed onto it, and following the link
    would replace a folder somewhere else.
    """
    out_dir = Path(out_dir)
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise DataError(
            out_dir, "exists and is not a folder; synth writes a folder there, pick another --out"
        )
    if overwrite or not out_dir.exists() or not any(out_dir.iterdir()) or _synth_wrote(out_dir, layout):
        return
    raise DataError(
        out_dir,
        f"not empty and not written by `usnodule synth` (no {MARKER}); refusing to replace it: "
        "move your files away, pick another --out, or pass --overwrite",
    )
