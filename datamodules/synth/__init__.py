"""Synthetic thyroid ultrasound: the embedded default data set (Stanford cine-clip layout + paired BUS/CEUS, and
on request still images with carcinoma subtypes).

Nothing here is from a paper; it is a simulator written by hand because no library makes B-mode cine sweeps
with TI-RADS ground truth.  Nodules have descriptors that map onto ACR TI-RADS points, labels come from a risk
model of those plus signals metadata.csv does not carry (texture heterogeneity and a shape change along the
sweep; for paired cases also the CEUS pattern and timing, and whether the CEUS perfusion defect lies under the
B-mode hypoechoic focus), and each layout folder gets the generator's ``truth.csv``, which only ``usnodule
report --truth`` reads.  Same seed, same bytes.

One file per concern, each importing only files above it in this list:

* ``tirads.py``: ACR TI-RADS points and level.
* ``labels.py``: the label model: risk weights, :class:`NoduleSpec` / :class:`CaseSpec`, the draws of
  :func:`plan_stanford` / :func:`plan_paired`, the ``truth.csv`` rows (its docstring says what truth.csv holds).
* ``subtypes.py``: the still-image label model: subtype first (benign, PTC, FTC, MTC), then descriptors from
  subtype-conditional tables, the exact subtype posterior for ``truth.csv`` (:func:`plan_stills`).
* ``fields.py``: smooth random fields and the per-process log-speckle pool.
* ``scene.py``: the tissue of a transverse thyroid view, depth gain, probe sweep and breathing.
* ``nodule.py``: the nodule's fields (descriptors and hidden signals in gray levels) and its cross-section.
* ``bmode.py``: frame composition: :func:`render_cine`, :func:`render_still`, :func:`sweep_positions`.
* ``ceus.py``: contrast time-intensity curves and :func:`render_paired`.
* ``ownership.py``: the ``.usnodule-synth`` marker and :func:`check_target` (never replace a user's folder).
* ``stills.py``: :func:`synthesize_stills` (PNG images + masks, still-image manifest, truth.csv).
* ``writers.py``: :func:`synthesize_stanford` (HDF5 + CSV, optionally in worker processes),
  :func:`synthesize_paired` (.npy + CSV), :func:`synthesize` (both, and the stills when asked).
* ``contact_sheet.py``: :func:`preview`, a contact sheet of what was written (not ``preview.py``: that module
  name would be shadowed here by the function).

Every public name is re-exported here.  A file reads its constants from its own globals, so to change one at
run time (a test planting a louder signal) patch it in the file that defines it (``synth.labels.HIDDEN_WEIGHT``,
``synth.nodule.HETEROGENEITY_GRAY``, ``synth.writers.render_cine``), not on this package.
"""

from datamodules.synth.bmode import render_cine, render_still, sweep_positions
from datamodules.synth.ceus import gamma_variate, render_paired
from datamodules.synth.contact_sheet import preview
from datamodules.synth.fields import SPECKLE_POOL
from datamodules.synth.labels import (
    AGE_CENTER,
    AGE_WEIGHT,
    CEUS_PATTERN_WEIGHT,
    CEUS_PATTERNS,
    CONCORDANCE_WEIGHT,
    HIDDEN_WEIGHT,
    LOCATIONS,
    PAIRED_HIDDEN_WEIGHT,
    PAIRED_TIRADS_SCALE,
    PAIRED_TRUTH_COLUMNS,
    POINT_WEIGHTS,
    TRUTH_COLUMNS,
    TTP_CENTER,
    TTP_WEIGHT,
    WASHOUT_CENTER,
    WASHOUT_WEIGHT,
    CaseSpec,
    NoduleSpec,
    plan_paired,
    plan_stanford,
    truth_rows,
)
from datamodules.synth.nodule import (
    DEFECT_DEPTH,
    FOCUS_GRAY,
    FOCUS_OFFSET,
    FOCUS_RADIUS,
    HETEROGENEITY_GRAY,
    SHAPE_ASPECT,
    SHAPE_LOBES,
)
from datamodules.synth.ownership import MARKER, check_target
from datamodules.synth.stills import STILL_MANIFEST_COLUMNS, synthesize_stills
from datamodules.synth.subtypes import (
    DEFAULT_MALIGNANT,
    RARE_SHARE,
    STILL_TRUTH_COLUMNS,
    SUBTYPES,
    plan_stills,
    posterior,
    subtype_shares,
)
from datamodules.synth.tirads import (
    COMPOSITION,
    ECHOGENICITY,
    FOCI,
    MARGIN,
    SHAPE_TALLER,
    acr_level,
    tirads_points,
)
from datamodules.synth.writers import (
    BLANKABLE,
    MANIFEST_COLUMNS,
    METADATA_COLUMNS,
    synthesize,
    synthesize_paired,
    synthesize_stanford,
)

__all__ = [
    "CaseSpec", "MARKER", "NoduleSpec", "PAIRED_TRUTH_COLUMNS", "TRUTH_COLUMNS", "acr_level", "check_target", "gamma_variate",
    "plan_paired", "plan_stanford", "preview", "render_cine", "render_paired", "sweep_positions", "synthesize",
    "synthesize_paired", "synthesize_stanford", "tirads_points", "truth_rows",
    "plan_stills", "posterior", "render_still", "subtype_shares", "synthesize_stills",
    # constants other code reads (metadata/manifest/truth formats, TI-RADS tables, risk weights, visibility)
    "AGE_CENTER", "AGE_WEIGHT", "BLANKABLE", "CEUS_PATTERNS", "CEUS_PATTERN_WEIGHT", "COMPOSITION", "ECHOGENICITY",
    "FOCI", "HETEROGENEITY_GRAY", "HIDDEN_WEIGHT", "LOCATIONS", "MANIFEST_COLUMNS", "MARGIN", "METADATA_COLUMNS",
    "CONCORDANCE_WEIGHT", "DEFECT_DEPTH", "FOCUS_GRAY", "FOCUS_OFFSET", "FOCUS_RADIUS", "PAIRED_HIDDEN_WEIGHT",
    "PAIRED_TIRADS_SCALE",
    "POINT_WEIGHTS", "SHAPE_ASPECT", "SHAPE_LOBES", "SHAPE_TALLER", "SPECKLE_POOL", "TTP_CENTER", "TTP_WEIGHT",
    "WASHOUT_CENTER", "WASHOUT_WEIGHT",
    "DEFAULT_MALIGNANT", "RARE_SHARE", "STILL_MANIFEST_COLUMNS", "STILL_TRUTH_COLUMNS", "SUBTYPES",
]  # fmt: skip
