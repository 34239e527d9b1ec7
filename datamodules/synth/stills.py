"""The still-image set with carcinoma subtypes (CSASN): ``<out>/stills`` with PNG images and masks,
``manifest.csv`` in the still-image format (:mod:`datamodules.stills`, with a ``subtype`` column) and the
generator's ``truth.csv`` (``subtypes.py``: the exact subtype posterior and the malignancy log-odds), written
atomically with the :data:`MARKER`, like the other layouts.

Each still is one frame through the centre of its nodule (the largest cross-section), rendered directly by
the cine renderer (``bmode.render_still``: same scene, speckle and nodule fields, a stationary probe).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from pathlib import Path

from datamodules.atomic import atomic_path
from datamodules.synth.bmode import render_still
from datamodules.synth.ownership import _write_marker, check_target
from datamodules.synth.subtypes import (
    DEFAULT_MALIGNANT,
    RARE_SHARE,
    STILL_TRUTH_COLUMNS,
    plan_stills,
    still_truth_rows,
)

STILL_MANIFEST_COLUMNS = ("case_id", "image", "mask", "label", "patient_id", "subtype")


def _write_csv(path: Path, columns: tuple[str, ...], rows: list[dict[str, str]]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)


def synthesize_stills(
    out_dir: str | os.PathLike,
    *,
    n_stills: int = 600,
    size: int = 128,
    malignant: float = DEFAULT_MALIGNANT,
    rare: float = RARE_SHARE,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``out_dir`` (returned): ``images/<case_id>.png`` (gray uint8), ``masks/<case_id>.png`` ({0, 255}),
    ``manifest.csv`` (``case_id,image,mask,label,patient_id,subtype``; ``datamodules.stills.read_manifest``
    reads it), ``truth.csv`` (:data:`STILL_TRUTH_COLUMNS`; no reader opens it, only ``usnodule report
    --truth``) and the marker.  ``malignant`` is the malignant share (PTC + FTC + MTC), FTC and MTC ``rare``
    each.  Same seed, same bytes.  Refuses a non-empty ``out_dir`` synth did not write unless ``overwrite``."""
    from PIL import Image

    check_target(out_dir, "stills", overwrite)
    plan = plan_stills(n_stills, malignant, seed, rare)
    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp:
        for sub in ("images", "masks"):
            (tmp / sub).mkdir(parents=True)
        rows = []
        for j, (spec, subtype, _) in enumerate(plan):
            img, mask = render_still(spec, size)
            name = f"{spec.annot_id}.png"
            Image.fromarray(img).save(tmp / "images" / name)
            Image.fromarray(mask).save(tmp / "masks" / name)
            rows.append({"case_id": spec.annot_id, "image": f"images/{name}", "mask": f"masks/{name}",
                         "label": str(spec.label), "patient_id": spec.patient_id, "subtype": subtype})  # fmt: skip
            if progress is not None:
                progress(j + 1, len(plan))
        _write_csv(tmp / "manifest.csv", STILL_MANIFEST_COLUMNS, rows)
        _write_csv(tmp / "truth.csv", STILL_TRUTH_COLUMNS, still_truth_rows(plan, malignant, rare))
        _write_marker(tmp, "stills", n_stills=n_stills, size=size, malignant=malignant, rare=rare, seed=seed)
    return out_dir
