"""Importers: public still-image layouts and the cine data -> a still-image manifest (:mod:`datamodules.stills`).

Each importer writes a folder ``out/`` holding ``manifest.csv`` and whatever it had to make (merged or drawn
masks, exported frames) under ``out/masks/`` / ``out/images/``; source files that can be used as they are
(images, single masks) are referenced by paths relative to ``out/``, not copied.  The folder is built under a
temporary name beside ``out`` and renamed into place only after the new manifest has passed
:func:`~datamodules.stills.read_manifest` (:func:`datamodules.atomic.atomic_path`), so a failing import
leaves no manifest.  A non-empty ``out`` that an import did not write (no ``.usnodule-stills`` marker) is
refused unless ``overwrite``.  Warnings (no patient ids, images skipped) come back in :class:`ImportResult`.

Layouts (as distributed; file names and quirks from the data sets' releases and the loaders that read them):

* **BUSI** (breast, Al-Dhabyani et al. 2020; ``Dataset_BUSI_with_GT``): ``{benign,malignant,normal}/<name>.png``
  with ``<name>_mask.png``; some images have several masks ``<name>_mask_1.png``, ``<name>_mask_2.png``... (one
  per lesion), merged here by union into ``out/masks/``.  Label from the folder (malignant 1, benign 0),
  ``subtype`` = the folder.  ``normal`` images show no lesion (an all-zero mask): skipped by default (a
  malignancy model is meant for lesions), kept as label 0, subtype ``normal`` with ``normal="keep"``.  No
  patient ids: each image is its own group (warned).
* **TN3K** (thyroid, Gong et al., TRFE-Net release, with the TNCD malignancy labels of the ACL release):
  ``trainval-image/NNNN.jpg``, ``trainval-mask/NNNN.jpg``, ``test-image/``, ``test-mask/``,
  ``label4trainval.csv`` / ``label4test.csv`` (lines ``NNNN.jpg,<0|1>``, no header; 0 benign, 1 malignant).
  Both parts are imported (``source_split`` column); the release's ``tn3k-trainval-fold*.json`` (positions in a
  directory listing) are not used: folds come from ``usnodule split``.  Masks are JPEG (thresholded at 128).
  A release without the label CSVs (the segmentation-only one) is refused.  No patient ids (3,493 images of
  2,421 patients): each image is its own group (warned).
* **DDTI** (thyroid, Pedraza et al. 2015, CIM@LAB): flat ``<case>.xml`` + ``<case>_<n>.jpg``; each XML has
  ``<number>``, ``<tirads>`` (2, 3, 4a, 4b, 4c, 5 or blank) and ``<mark>`` elements (``<image>`` = n, ``<svg>`` =
  JSON list of regions with ``points`` [{x, y}]).  Regions are drawn as filled polygons into ``out/masks/``
  (several regions or marks of one image: union).  **DDTI has TI-RADS categories, not pathology**: the import
  refuses to invent labels and needs ``tirads_malignant`` (e.g. ``"4b"``: TI-RADS >= 4b labelled 1), an
  explicit proxy recorded in a ``tirads`` column; cases with a blank TI-RADS are skipped (warned); a mark
  whose ``svg`` is empty or not JSON gives an image without mask (warned).  patient_id = the case number.
* **TN5000** (thyroid, Pascal VOC): ``Annotations/<id>.xml`` (``<object><name>`` 0 benign / 1 malignant,
  ``<bndbox>``), ``JPEGImages/<id>.jpg``, ``ImageSets/Main/{train,val,test}.txt``.  Boxes only: imported
  **without masks** (the box goes to a ``box`` column ``x0 y0 x1 y1``, read by nothing yet; a box is not a
  mask and is not drawn as one); objects of one image with different labels are refused.  No patient ids.
* **Stanford cine** (:class:`~datamodules.stanford.StanfordCine`, the real set or ``usnodule synth``'s):
  ``frames="middle"`` (position (n-1)//2 of the ordered frames), ``"largest"`` (largest mask area, first on
  ties) or ``"all"``, exported as PNG images and 0/255 masks; patient from the metadata (nodule otherwise).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from xml.etree import ElementTree

import numpy as np

from datamodules.atomic import atomic_path
from datamodules.clips import IMAGE_SUFFIXES, image_size
from datamodules.errors import DataError
from datamodules.frames import natural_key
from datamodules.stills import StillCase, read_manifest, read_still_mask, still_size, write_manifest

__all__ = [
    "LAYOUTS",
    "TIRADS_LEVELS",
    "ImportResult",
    "import_busi",
    "import_tn3k",
    "import_ddti",
    "import_tn5000",
    "export_cine_stills",
]

MARKER = ".usnodule-stills"
TIRADS_LEVELS = ("1", "2", "3", "4a", "4b", "4c", "5")  # DDTI's categories, in order of risk
NO_PATIENT = "{layout} has no patient ids: each image is its own group, so two images of one patient can fall in different folds"


@dataclass
class ImportResult:
    manifest: Path
    n: int
    n_malignant: int
    warnings: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- the writer


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(out, "exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).exists() and not overwrite:
        raise DataError(
            out,
            "is not empty and was not written by `usnodule import-stills`: choose another --out or --overwrite",
        )


def _write(
    out: str | os.PathLike, build: Callable[[Path], list[StillCase]], overwrite: bool, warnings: list[str]
) -> ImportResult:
    """Build the set in a temporary sibling of ``out``, validate its manifest, then rename it into place."""
    out = Path(out)
    _check_out(out, overwrite)
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        cases = build(tmp)
        if not cases:
            raise DataError(out, "the import found no images to write")
        # tmp and out are siblings: paths relative to tmp are the same relative to out
        manifest = write_manifest(cases, tmp / "manifest.csv")
        read_manifest(manifest)  # the same checks every reader makes, before the set becomes visible
        (tmp / MARKER).write_text("written by usnodule import-stills\n")
    return ImportResult(out / "manifest.csv", len(cases), sum(c.label for c in cases), warnings)


def _save_mask(mask: np.ndarray, path: Path) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((mask > 0).astype(np.uint8) * 255).save(path)
    return path


def _images(folder: Path) -> list[Path]:
    return sorted(
        (
            p
            for p in folder.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
        ),
        key=lambda p: natural_key(p.name),
    )


def _need_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(path, f"{'does not exist' if not path.exists() else 'is not a folder'} ({what})")
    return path


# -------------------------------------------------------------------------------------------------- BUSI

_BUSI_MASK = re.compile(r"^(?P<stem>.+)_mask(?:_(?P<n>\d+))?$")
_BUSI_CLASSES = {"benign": 0, "malignant": 1, "normal": 0}


def import_busi(
    src: str | os.PathLike, out: str | os.PathLike, *, normal: str = "skip", overwrite: bool = False
) -> ImportResult:
    """BUSI -> manifest (module docstring).  ``src`` holds ``benign/``, ``malignant/`` (and ``normal/``), or is
    the folder above ``Dataset_BUSI_with_GT``.  ``normal``: ``"skip"`` (default) or ``"keep"`` (label 0)."""
    if normal not in ("skip", "keep"):
        raise ValueError(f"normal must be 'skip' or 'keep', got {normal!r}")
    root = Path(src)
    if not (root / "benign").is_dir() and (root / "Dataset_BUSI_with_GT").is_dir():
        root = root / "Dataset_BUSI_with_GT"
    _need_dir(root, "the BUSI folder with benign/, malignant/, normal/")
    classes = ["benign", "malignant"] + (["normal"] if normal == "keep" else [])
    for cls in classes[:2]:
        _need_dir(root / cls, "BUSI class folder")

    def build(tmp: Path) -> list[StillCase]:
        cases = []
        for cls in classes:
            folder = root / cls
            if not folder.is_dir():  # normal/ asked for but absent: nothing to keep
                continue
            images, masks = {}, {}
            for p in _images(folder):
                m = _BUSI_MASK.match(p.stem)
                if m:
                    masks.setdefault(m["stem"], []).append(p)
                else:
                    images[p.stem] = p
            for stem, files in masks.items():
                if stem not in images:
                    raise DataError(files[0], f"mask without its image {stem}.png in {folder}")
            for stem, image in images.items():
                files = masks.get(stem)
                if not files:
                    raise DataError(image, f"no mask {stem}_mask.png beside it (BUSI gives every image one)")
                size = still_size(image)
                for f in files:
                    if still_size(f) != size:
                        h, w = still_size(f)
                        raise DataError(
                            f, f"mask size {w}x{h} differs from image {image.name} {size[1]}x{size[0]}"
                        )
                union = np.zeros(size, np.uint8)
                for f in files:  # read even when single: bad mask values stop the import, not a training run
                    union |= read_still_mask(f)
                # one mask per lesion: the union is the image's mask; a single one is used where it lies
                mask = (
                    files[0]
                    if len(files) == 1
                    else _save_mask(union, tmp / "masks" / cls / f"{stem}_mask.png")
                )
                cases.append(
                    StillCase(f"{cls}/{stem}", image, mask, _BUSI_CLASSES[cls], f"{cls}/{stem}", cls,
                              {"masks_merged": str(len(files))})
                )  # fmt: skip
        return cases

    return _write(out, build, overwrite, [NO_PATIENT.format(layout="BUSI")])


# -------------------------------------------------------------------------------------------------- TN3K


def _tn3k_labels(path: Path) -> dict[str, int]:
    if not path.is_file():
        raise DataError(
            path,
            "does not exist: TN3K's malignancy labels (0 benign, 1 malignant) come as label4trainval.csv / "
            "label4test.csv (TNCD labels, ACL release); the segmentation-only release has none",
        )
    labels: dict[str, int] = {}
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 2:
            raise DataError(path, f"line {n}: expected 'name,label', got {line.strip()!r}")
        name, value = parts
        if n == 1 and value not in ("0", "1") and not value.lstrip("-").replace(".", "").isdigit():
            continue  # a header line (the release has none; tolerated)
        if value not in ("0", "1"):
            raise DataError(path, f"line {n}: label {value!r} for {name!r} is not 0/1")
        if name in labels:
            raise DataError(path, f"line {n}: {name!r} is labelled twice")
        labels[name] = int(value)
    return labels


def import_tn3k(src: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False) -> ImportResult:
    """TN3K (with the TNCD label CSVs) -> manifest (module docstring)."""
    root = _need_dir(
        Path(src), "the TN3K folder with trainval-image/, trainval-mask/, test-image/, test-mask/"
    )
    parts = {}
    for part in ("trainval", "test"):
        images = _need_dir(root / f"{part}-image", "TN3K image folder")
        masks = _need_dir(root / f"{part}-mask", "TN3K mask folder")
        parts[part] = (images, masks, _tn3k_labels(root / f"label4{part}.csv"))

    def build(tmp: Path) -> list[StillCase]:
        cases = []
        for part, (images, masks, labels) in parts.items():
            label_file = root / f"label4{part}.csv"
            by_stem = {Path(k).stem: v for k, v in labels.items()}  # names with or without .jpg
            files = _images(images)
            for image in files:
                mask = masks / image.name
                if not mask.is_file():
                    raise DataError(mask, f"does not exist (the mask of {image})")
                label = labels.get(image.name, by_stem.get(image.stem))
                if label is None:
                    raise DataError(label_file, f"no label for {image.name}")
                case_id = f"{part}/{image.stem}"
                cases.append(StillCase(case_id, image, mask, label, case_id, "", {"source_split": part}))
            named = {p.stem for p in files}
            extra = sorted(k for k in labels if Path(k).stem not in named)
            if extra:
                raise DataError(
                    label_file, f"{len(extra)} label(s) for images not in {images}, e.g. {extra[:3]}"
                )
        return cases

    return _write(out, build, overwrite, [NO_PATIENT.format(layout="TN3K")])


# -------------------------------------------------------------------------------------------------- DDTI


def _tirads_rank(value: str, where: Path) -> int:
    text = value.strip().lower().removeprefix("tr")
    if text not in TIRADS_LEVELS:
        raise DataError(where, f"TI-RADS {value!r} is not one of {', '.join(TIRADS_LEVELS)}")
    return TIRADS_LEVELS.index(text)


def _xml(path: Path) -> ElementTree.Element:
    try:
        return ElementTree.parse(path).getroot()
    except (ElementTree.ParseError, OSError) as e:
        raise DataError(path, f"not readable XML ({e})") from None


def _polygons(svg: str | None) -> list[list[tuple[float, float]]] | None:
    """The regions of a DDTI ``<svg>`` (JSON list of ``{"points": [{"x", "y"}...]}``); None if empty or not JSON."""
    if not svg or not svg.strip():
        return None
    try:
        regions = json.loads(svg)
        polys = [[(float(p["x"]), float(p["y"])) for p in r["points"]] for r in regions]
    except (ValueError, TypeError, KeyError):
        return None
    polys = [p for p in polys if len(p) >= 3]
    return polys or None


def import_ddti(
    src: str | os.PathLike, out: str | os.PathLike, *, tirads_malignant: str | None, overwrite: bool = False
) -> ImportResult:
    """DDTI -> manifest (module docstring).  ``tirads_malignant``: the lowest TI-RADS category labelled 1."""
    from PIL import Image, ImageDraw

    root = _need_dir(Path(src), "the DDTI folder with <case>.xml and <case>_<n>.jpg")
    xmls = sorted(root.glob("*.xml"), key=lambda p: natural_key(p.name))
    if not xmls:
        raise DataError(root, "no <case>.xml files (DDTI layout: <case>.xml + <case>_<n>.jpg)")
    if tirads_malignant is None:
        raise DataError(
            root,
            "DDTI holds TI-RADS categories, not pathology: pass --tirads-malignant LEVEL (e.g. 4b) to label "
            "TI-RADS >= LEVEL as malignant (a proxy label, not histology)",
        )
    threshold = _tirads_rank(tirads_malignant, root)
    warnings: list[str] = []

    def build(tmp: Path) -> list[StillCase]:
        cases, no_tirads, no_svg = [], [], []
        for xml in xmls:
            case = _xml(xml)
            number = (case.findtext("number") or "").strip()
            if not number:
                raise DataError(xml, "no <number> (the case number that names its images)")
            tirads = (case.findtext("tirads") or "").strip()
            if not tirads or tirads.lower() == "none":
                no_tirads.append(number)
                continue
            rank = _tirads_rank(tirads, xml)
            drawn: dict[str, list] = {}
            for mark in case.iter("mark"):
                k = (mark.findtext("image") or "").strip()
                if not k.isdigit():
                    raise DataError(
                        xml, f"<mark> with image {k!r}; expected the image number n of {number}_n.jpg"
                    )
                polys = _polygons(mark.findtext("svg"))
                drawn.setdefault(k, [])
                if polys is not None:
                    drawn[k] += polys
            for k, polys in sorted(drawn.items(), key=lambda kv: int(kv[0])):
                image = root / f"{number}_{k}.jpg"
                if not image.is_file():
                    raise DataError(image, f"does not exist (marked in {xml.name})")
                mask = None
                if polys:
                    h, w = image_size(image)
                    canvas = Image.new("L", (w, h), 0)
                    for poly in polys:  # every region of the image: union
                        ImageDraw.Draw(canvas).polygon(poly, fill=255, outline=255)
                    mask = _save_mask(np.asarray(canvas), tmp / "masks" / f"{number}_{k}.png")
                else:
                    no_svg.append(image.name)
                cases.append(
                    StillCase(f"{number}_{k}", image, mask, int(rank >= threshold), number, "",
                              {"tirads": tirads.lower()})
                )  # fmt: skip
        if no_tirads:
            warnings.append(
                f"{len(no_tirads)} DDTI case(s) without a TI-RADS category skipped (no label to map), "
                f"e.g. {no_tirads[:3]}"
            )
        if no_svg:
            warnings.append(
                f"{len(no_svg)} DDTI image(s) without a drawn region kept without mask, e.g. {no_svg[:3]}"
            )
        warnings.append(
            f"DDTI labels are TI-RADS >= {tirads_malignant} (a proxy chosen by --tirads-malignant), not pathology"
        )
        return cases

    return _write(out, build, overwrite, warnings)


# ------------------------------------------------------------------------------------------------ TN5000


def import_tn5000(src: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False) -> ImportResult:
    """TN5000 (Pascal VOC) -> manifest without masks (module docstring).  ``src`` holds ``Annotations/`` and
    ``JPEGImages/`` (or one folder level above them)."""
    root = Path(src)
    if not (root / "Annotations").is_dir():
        inner = [p for p in root.iterdir() if (p / "Annotations").is_dir()] if root.is_dir() else []
        root = inner[0] if len(inner) == 1 else root
    annotations = _need_dir(root / "Annotations", "TN5000 VOC annotations")
    images = _need_dir(root / "JPEGImages", "TN5000 images")
    split_of: dict[str, str] = {}
    sets = root / "ImageSets" / "Main"
    for part in ("train", "val", "test"):
        f = sets / f"{part}.txt"
        if f.is_file():
            for line in f.read_text().split():
                split_of[line.strip()] = part

    def build(tmp: Path) -> list[StillCase]:
        cases = []
        for xml in sorted(annotations.glob("*.xml"), key=lambda p: natural_key(p.name)):
            ann = _xml(xml)
            names = [(o.findtext("name") or "").strip() for o in ann.iter("object")]
            if not names:
                raise DataError(xml, "no <object>: no label")
            bad = [n for n in names if n not in ("0", "1")]
            if bad:
                raise DataError(xml, f"object name {bad[0]!r} is not 0 (benign) / 1 (malignant)")
            if len(set(names)) > 1:
                raise DataError(xml, "objects with different labels in one image; an image needs one label")
            image = images / ((ann.findtext("filename") or "").strip() or f"{xml.stem}.jpg")
            if not image.is_file():
                raise DataError(image, f"does not exist (annotated in {xml.name})")
            boxes = []
            for o in ann.iter("object"):
                b = o.find("bndbox")
                if b is not None:
                    boxes.append(
                        " ".join((b.findtext(k) or "").strip() for k in ("xmin", "ymin", "xmax", "ymax"))
                    )
            extra = {"box": ";".join(boxes), "source_split": split_of.get(xml.stem, "")}
            cases.append(StillCase(xml.stem, image, None, int(names[0]), xml.stem, "", extra))
        return cases

    return _write(
        out,
        build,
        overwrite,
        [NO_PATIENT.format(layout="TN5000"), "TN5000 has boxes, not masks: imported without masks"],
    )


# ---------------------------------------------------------------------------------------- Stanford cine

FRAME_CHOICES = ("middle", "largest", "all")


def export_cine_stills(
    h5: str | os.PathLike,
    out: str | os.PathLike,
    *,
    frames: str = "middle",
    metadata: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> ImportResult:
    """One (``middle``, ``largest``) or every (``all``) frame of each nodule of a Stanford-layout cine set as
    still PNG images + 0/255 masks + manifest (module docstring).  ``case_id`` = ``<annot_id>-<frame_num>``;
    every frame of a nodule has its patient, so folds keep them together."""
    from PIL import Image

    from datamodules.stanford import StanfordCine

    if frames not in FRAME_CHOICES:
        raise ValueError(f"frames must be one of {FRAME_CHOICES}, got {frames!r}")
    cine = StanfordCine(h5, metadata)
    warnings = []
    if "patient_id" not in cine.metadata.columns:
        warnings.append(
            f"{cine.metadata_path}: no patient_id column, each nodule is its own group (two nodules of one "
            "patient can fall in different folds)"
        )

    def build(tmp: Path) -> list[StillCase]:
        cases = []
        for nod in cine.nodules:
            n = nod.n_frames
            if frames == "middle":
                pos = [(n - 1) // 2]
            elif frames == "largest":
                areas = cine.masks(nod.annot_id, np.arange(n)).sum(axis=(1, 2))
                pos = [int(np.argmax(areas))]  # first of the largest
            else:
                pos = list(range(n))
            images = cine.frames(nod.annot_id, pos)
            masks = cine.masks(nod.annot_id, pos)
            safe = nod.annot_id.replace("/", "_").replace(os.sep, "_")
            for j, p in enumerate(pos):
                num = int(nod.frame_nums[p])
                name = f"{safe}-{num}.png"
                image = tmp / "images" / name
                image.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(images[j]).save(image)
                mask = _save_mask(masks[j], tmp / "masks" / name)
                cases.append(
                    StillCase(f"{nod.annot_id}-{num}", image, mask, nod.label, nod.patient_id, "",
                              {"annot_id": nod.annot_id, "frame_num": str(num)})
                )  # fmt: skip
        cine.close()
        return cases

    return _write(out, build, overwrite, warnings)


LAYOUTS = ("busi", "tn3k", "ddti", "tn5000", "stanford")
