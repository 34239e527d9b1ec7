"""A second "scanner" for the cross-dataset transfer study (AsyCMST paper Sec. 4.3, Table 3, Fig. 7): paired
BUS/CEUS clips as another machine or protocol would have recorded them.

The paper trains on one hospital's set (thyroid or breast) and tests on the other's.  The synthetic stand-in is a
second paired set of *other nodules* (the generator's settings of the first set, another seed: :func:`draw_like`)
seen through :class:`Shift`, a change of acquisition applied to every frame of both modalities:

- ``gain``: overall receive gain, gray levels multiplied (then clipped at 255);
- ``gamma``: another display map (dynamic range / log compression), ``255 (x / 255) ** gamma``;
- ``psf``: a wider point-spread function (a lower-frequency probe): Gaussian blur of ``psf`` pixels (sigma), so
  speckle grains grow and edges soften;
- ``frame_step``: a lower frame rate, every ``frame_step``-th frame kept (BUS, CEUS and mask alike), so a clip of
  the same bolus has fewer frames.

Applied in that order (blur, display map, gain) to the stored uint8 frames; masks only lose frames.  Depth (field
of view) is not offered: the renderer's scene ends at the frame's edge, so zooming out would need tissue that was
never drawn.  The generator's ``truth.csv`` (a nodule's clean risk) is copied unchanged: a scanner does not change
the nodule.  Written atomically as a folder: ``manifest.csv``, ``bus/``, ``ceus/`` (.npy), ``bus_mask/`` (.npz with
the per-frame ``annotated`` flags, so frames without a drawn mask stay so), ``truth.csv`` when the source has one,
and ``shift.json`` (the shift and the source), whose presence marks the folder as this module's to replace.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from datamodules.atomic import atomic_path
from datamodules.clips import read_clip, read_mask_clip
from datamodules.errors import DataError
from datamodules.paired import PairedCase, read_manifest, write_manifest
from datamodules.synth import MARKER, synthesize_paired

SHIFT_FILE = "shift.json"


@dataclass(frozen=True)
class Shift:
    """Acquisition change (module docstring); the defaults change nothing."""

    gain: float = 1.0
    gamma: float = 1.0
    psf: float = 0.0
    frame_step: int = 1

    def __post_init__(self) -> None:
        if self.gain <= 0 or self.gamma <= 0 or self.psf < 0 or self.frame_step < 1:
            raise ValueError(f"impossible shift {self}: gain, gamma > 0, psf >= 0, frame_step >= 1")

    def frames(self, clip: np.ndarray) -> np.ndarray:
        """``(T, H, W)`` uint8 -> the same clip as the other scanner records it."""
        kept = clip[:: self.frame_step]
        x = kept.astype(np.float32)
        if self.psf > 0:
            x = np.stack([cv2.GaussianBlur(f, (0, 0), self.psf) for f in x])
        if self.gamma != 1.0:
            x = 255.0 * (x / 255.0) ** self.gamma
        return np.clip(np.round(x * self.gain), 0, 255).astype(np.uint8)


def check_out(out_dir: Path, overwrite: bool) -> None:
    """Refuse a non-empty ``out_dir`` this module did not write (no :data:`SHIFT_FILE`) unless ``overwrite``."""
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise DataError(out_dir, "exists and is not a folder; pick another --out")
    if overwrite or not out_dir.exists() or not any(out_dir.iterdir()) or (out_dir / SHIFT_FILE).is_file():
        return
    raise DataError(
        out_dir, f"not empty and not written by `usnodule shift-paired` (no {SHIFT_FILE}); pass --overwrite"
    )


def write_shifted(
    cases: list[PairedCase],
    out_dir: str | os.PathLike,
    shift: Shift,
    *,
    source: dict,
    truth: Path | None = None,
) -> Path:
    """Write every case of ``cases`` through ``shift`` into ``out_dir`` (module docstring); returns the manifest."""
    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp:
        for sub in ("bus", "ceus", "bus_mask"):
            (tmp / sub).mkdir(parents=True)
        shifted = []
        for case in cases:
            bus, ceus = read_clip(case.bus), read_clip(case.ceus)
            if ceus.shape != bus.shape:
                raise DataError(
                    case.ceus, f"CEUS shape {ceus.shape} differs from BUS {bus.shape} (case {case.case_id})"
                )
            paths = {"bus": tmp / "bus" / f"{case.case_id}.npy", "ceus": tmp / "ceus" / f"{case.case_id}.npy"}
            np.save(paths["bus"], shift.frames(bus))
            np.save(paths["ceus"], shift.frames(ceus))
            mask_path = None
            if case.bus_mask is not None:
                mask, annotated = read_mask_clip(case.bus_mask)
                mask_path = tmp / "bus_mask" / f"{case.case_id}.npz"
                step = shift.frame_step
                np.savez(mask_path, mask=mask[::step], annotated=annotated[::step])
            shifted.append(
                dataclasses.replace(case, bus=paths["bus"], ceus=paths["ceus"], bus_mask=mask_path)
            )
        manifest = write_manifest(shifted, tmp / "manifest.csv")
        if truth is not None and truth.is_file():
            shutil.copyfile(truth, tmp / "truth.csv")
        doc = {"written_by": "usnodule shift-paired", "shift": dataclasses.asdict(shift), "source": source}
        (tmp / SHIFT_FILE).write_text(json.dumps(doc, indent=1, default=str) + "\n")
    return out_dir / manifest.name


def shift_manifest(
    manifest: str | os.PathLike, out_dir: str | os.PathLike, shift: Shift, *, overwrite: bool = False
) -> Path:
    """The cases of an existing paired manifest (real or synthetic), shifted; ``truth.csv`` beside it is kept."""
    manifest, out_dir = Path(manifest), Path(out_dir)
    check_out(out_dir, overwrite)
    cases = read_manifest(manifest)
    return write_shifted(
        cases,
        out_dir,
        shift,
        source={"manifest": str(manifest.resolve())},
        truth=manifest.parent / "truth.csv",
    )


def synth_params(folder: str | os.PathLike) -> dict:
    """The generator settings a synthetic paired folder was drawn with (its ``.usnodule-synth`` marker)."""
    marker = Path(folder) / MARKER
    try:
        doc = json.loads(marker.read_text())
    except FileNotFoundError:
        raise DataError(
            folder, f"no {MARKER}: not a synthetic paired set (shift an existing set with --manifest instead)"
        ) from None
    except (OSError, ValueError) as e:
        raise DataError(marker, f"not readable ({e})") from None
    if doc.get("layout") != "paired" or not isinstance(doc.get("params"), dict):
        raise DataError(marker, f"not a paired set's marker (layout {doc.get('layout')!r})")
    return doc["params"]


def draw_like(
    folder: str | os.PathLike,
    out_dir: str | os.PathLike,
    shift: Shift,
    *,
    seed: int | None = None,
    n_cases: int | None = None,
    overwrite: bool = False,
) -> Path:
    """A fresh synthetic paired set drawn with ``folder``'s generator settings and another seed (default: its
    seed + 1, so other nodules and patients), shifted; ``n_cases`` overrides the number of cases."""
    out_dir = Path(out_dir)
    check_out(out_dir, overwrite)
    params = synth_params(folder)
    allowed = {"n_cases", "frames", "size", "prevalence", "label_noise"}
    kwargs = {k: v for k, v in params.items() if k in allowed}
    kwargs["seed"] = int(params.get("seed", 0)) + 1 if seed is None else int(seed)
    if n_cases is not None:
        kwargs["n_cases"] = int(n_cases)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.draw-", dir=out_dir.parent) as scratch:
        drawn = synthesize_paired(Path(scratch) / "paired", **kwargs)
        cases = read_manifest(drawn / "manifest.csv")
        source = {"drawn_like": str(Path(folder).resolve()), "generator": kwargs}
        return write_shifted(cases, out_dir, shift, source=source, truth=drawn / "truth.csv")
