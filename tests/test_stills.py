"""Still images: the manifest reader, the importers on files in the exact public layouts (BUSI, TN3K, DDTI,
TN5000) and on the Stanford cine layout, the Dataset / DataModule, one-line errors and atomic output."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.errors import DataError, OptionError
from datamodules.folds import load_fold
from datamodules.stanford import StanfordCine
from datamodules.still_data import PredictedStillMasks, StillDataModule, StillDataset, jitter_box, roi_box
from datamodules.stills import read_manifest, read_still, read_still_mask
from stages.cli import main
from tests.commands import argv
from tests.stanford_files import write_stanford

H, W = 24, 32


# --------------------------------------------------------------------------------------------- file helpers


def texture(seed: int, h: int = H, w: int = W, rgb: bool = False) -> np.ndarray:
    shape = (h, w, 3) if rgb else (h, w)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def box(y0: int, x0: int, y1: int, x1: int, h: int = H, w: int = W) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = 255
    return m


def save(path: Path, arr: np.ndarray, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kw)
    return path


def rows(manifest: Path) -> list[dict[str, str]]:
    with open(manifest, newline="") as f:
        return list(csv.DictReader(f))


def fails(args: list[str], capsys, names: str | Path) -> str:
    """Run the CLI; it must stop with exit status 2 and one stderr line naming ``names``."""
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert str(names) in err[0], err[0]
    return err[0]


def no_output(out: Path) -> None:
    """A failed import leaves neither the folder nor a temporary beside it."""
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


# --------------------------------------------------------------------------------------------- the layouts


def make_busi(root: Path) -> Path:
    """``Dataset_BUSI_with_GT/{benign,malignant,normal}``: RGB PNG images (as BUSI's), gray 0/255 masks;
    ``benign (2)`` has two lesions (``_mask.png`` + ``_mask_1.png``), ``malignant (1)`` three."""
    ds = root / "Dataset_BUSI_with_GT"
    save(ds / "benign" / "benign (1).png", texture(1, rgb=True))
    save(ds / "benign" / "benign (1)_mask.png", box(2, 3, 10, 12))
    save(ds / "benign" / "benign (2).png", texture(2, rgb=True))
    save(ds / "benign" / "benign (2)_mask.png", box(2, 2, 8, 8))
    save(ds / "benign" / "benign (2)_mask_1.png", box(12, 20, 20, 30))
    save(ds / "benign" / "benign (10).png", texture(10, rgb=True))
    save(ds / "benign" / "benign (10)_mask.png", box(5, 5, 15, 15))
    save(ds / "malignant" / "malignant (1).png", texture(3, rgb=True))
    save(ds / "malignant" / "malignant (1)_mask.png", box(0, 0, 4, 4))
    save(ds / "malignant" / "malignant (1)_mask_1.png", box(6, 6, 10, 10))
    save(ds / "malignant" / "malignant (1)_mask_2.png", box(15, 15, 20, 31))
    save(ds / "malignant" / "malignant (2).png", texture(4, rgb=True))
    save(ds / "malignant" / "malignant (2)_mask.png", box(8, 10, 18, 22))
    save(ds / "normal" / "normal (1).png", texture(5, rgb=True))
    save(ds / "normal" / "normal (1)_mask.png", np.zeros((H, W), np.uint8))
    return root


def make_tn3k(root: Path) -> Path:
    """``trainval-image/NNNN.jpg`` + ``trainval-mask/NNNN.jpg`` (JPEG masks), ``test-*``, and the TNCD label
    CSVs ``label4trainval.csv`` / ``label4test.csv`` (``NNNN.jpg,label``, no header)."""
    labels = {"trainval": {"0000": 1, "0001": 0, "0002": 0}, "test": {"0000": 0, "0001": 1}}
    for part, named in labels.items():
        for i, (stem, _) in enumerate(named.items()):
            save(root / f"{part}-image" / f"{stem}.jpg", texture(20 + i, rgb=True), quality=95)
            save(root / f"{part}-mask" / f"{stem}.jpg", box(4 + i, 6, 16 + i, 26), quality=95)
        (root / f"label4{part}.csv").write_text("".join(f"{s}.jpg,{v}\n" for s, v in named.items()))
    return root


def svg(*polygons) -> str:
    return json.dumps(
        [
            {"points": [{"x": x, "y": y} for x, y in poly], "annotation": {}, "regionType": "freehand"}
            for poly in polygons
        ]
    )


def ddti_xml(number: str, tirads: str, marks: list[tuple[int, str]]) -> str:
    body = "".join(f"<mark><image>{k}</image><svg>{s}</svg></mark>" for k, s in marks)
    return (
        f"<?xml version='1.0' encoding='utf-8'?><case><number>{number}</number><age>49</age><sex>F</sex>"
        f"<composition>solid</composition><echogenicity>hypoechogenicity</echogenicity>"
        f"<margins>well defined</margins><calcifications>non</calcifications><tirads>{tirads}</tirads>"
        f"<reportbacaf></reportbacaf><reporteco></reporteco>{body}</case>"
    )


SQUARE_A = [(2, 2), (10, 2), (10, 10), (2, 10)]
SQUARE_B = [(20, 12), (28, 12), (28, 20), (20, 20)]


def make_ddti(root: Path) -> Path:
    """Flat ``<case>.xml`` + ``<case>_<n>.jpg``: case 1 (TI-RADS 4b) has two nodules in image 1 (two regions of
    one svg) and a second image; case 2 (TI-RADS 3) a mark with an empty svg; case 3 a blank TI-RADS."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "1.xml").write_text(ddti_xml("1", "4b", [(1, svg(SQUARE_A, SQUARE_B)), (2, svg(SQUARE_A))]))
    (root / "2.xml").write_text(ddti_xml("2", "3", [(1, "")]))
    (root / "3.xml").write_text(ddti_xml("3", "", [(1, svg(SQUARE_A))]))
    for name in ("1_1", "1_2", "2_1", "3_1"):
        save(root / f"{name}.jpg", texture(hash(name) % 100, rgb=True), quality=95)
    return root


def make_tn5000(root: Path) -> Path:
    data = root / "TN5000"
    for stem, label, split in (("000001", "0", "train"), ("000002", "1", "val"), ("000003", "1", "test")):
        save(data / "JPEGImages" / f"{stem}.jpg", texture(int(stem), rgb=True))
        (data / "Annotations").mkdir(parents=True, exist_ok=True)
        (data / "Annotations" / f"{stem}.xml").write_text(
            f"<annotation><folder>JPEGImages</folder><filename>{stem}.jpg</filename><size><width>{W}</width>"
            f"<height>{H}</height><depth>3</depth></size><object><name>{label}</name><bndbox><xmin>3</xmin>"
            f"<ymin>4</ymin><xmax>20</xmax><ymax>18</ymax></bndbox></object></annotation>"
        )
        sets = data / "ImageSets" / "Main"
        sets.mkdir(parents=True, exist_ok=True)
        with open(sets / f"{split}.txt", "a") as f:
            f.write(f"{stem}\n")
    return root


# ------------------------------------------------------------------------------------------------- BUSI


def test_busi_import_merges_masks_and_skips_normal(tmp_path, capsys):
    src = make_busi(tmp_path / "busi")
    out = tmp_path / "out"
    main(argv("import-stills", src, layout="busi", out=out))
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "warning: BUSI has no patient ids" in captured.err
    manifest = out / "manifest.csv"
    got = {r["case_id"]: r for r in rows(manifest)}
    assert list(rows(manifest)[0])[:6] == ["case_id", "image", "mask", "label", "patient_id", "subtype"]
    # natural order inside a class: (2) before (10); normal skipped by default
    assert list(got) == ["benign/benign (1)", "benign/benign (2)", "benign/benign (10)", "malignant/malignant (1)",
                         "malignant/malignant (2)"]  # fmt: skip
    assert [got[c]["label"] for c in got] == ["0", "0", "0", "1", "1"]
    assert got["malignant/malignant (2)"]["subtype"] == "malignant"
    assert got["benign/benign (1)"]["patient_id"] == "benign/benign (1)"  # no patient ids in BUSI
    # a single mask is referenced where it lies; several are merged into out/masks
    assert got["benign/benign (1)"]["mask"] == "../busi/Dataset_BUSI_with_GT/benign/benign (1)_mask.png"
    assert got["benign/benign (2)"]["mask"] == "masks/benign/benign (2)_mask.png"
    assert got["malignant/malignant (1)"]["masks_merged"] == "3"
    merged = read_still_mask(out / got["malignant/malignant (1)"]["mask"])
    union = (box(0, 0, 4, 4) | box(6, 6, 10, 10) | box(15, 15, 20, 31)) > 0
    np.testing.assert_array_equal(merged, union.astype(np.uint8))
    cases = read_manifest(manifest)
    assert cases[0].image == (src / "Dataset_BUSI_with_GT" / "benign" / "benign (1).png").resolve()


def test_busi_keeps_normal_when_asked(tmp_path, capsys):
    src = make_busi(tmp_path / "busi") / "Dataset_BUSI_with_GT"  # the class folders' parent works too
    out = tmp_path / "out"
    main(argv("import-stills", src, layout="busi", out=out, normal="keep"))
    normal = [c for c in read_manifest(out / "manifest.csv") if c.subtype == "normal"]
    assert len(normal) == 1 and normal[0].label == 0
    assert not read_still_mask(normal[0].mask).any()  # drawn, empty: no lesion


@pytest.mark.parametrize(
    ("breaks", "named"),
    [
        ("no_mask", "benign (1).png"),
        ("orphan_mask", "benign (7)_mask.png"),
        ("mask_size", "malignant (2)_mask.png"),
        ("mask_values", "benign (10)_mask.png"),
        ("no_class", "malignant"),
    ],
)
def test_busi_bad_inputs_one_line_no_output(tmp_path, capsys, breaks, named):
    src = make_busi(tmp_path / "busi")
    ds = src / "Dataset_BUSI_with_GT"
    if breaks == "no_mask":
        (ds / "benign" / "benign (1)_mask.png").unlink()
    elif breaks == "orphan_mask":
        save(ds / "benign" / "benign (7)_mask.png", box(1, 1, 5, 5))
    elif breaks == "mask_size":
        save(ds / "malignant" / "malignant (2)_mask.png", box(1, 1, 5, 5, h=H + 2))
    elif breaks == "mask_values":
        save(ds / "benign" / "benign (10)_mask.png", np.full((H, W), 7, np.uint8))
    else:
        for p in (ds / "malignant").iterdir():
            p.unlink()
        (ds / "malignant").rmdir()
    out = tmp_path / "out"
    fails(argv("import-stills", src, layout="busi", out=out), capsys, named)
    no_output(out)


# ------------------------------------------------------------------------------------------------- TN3K


def test_tn3k_import(tmp_path, capsys):
    src = make_tn3k(tmp_path / "tn3k")
    out = tmp_path / "out"
    main(argv("import-stills", src, layout="tn3k", out=out))
    assert "warning: TN3K has no patient ids" in capsys.readouterr().err
    got = {r["case_id"]: r for r in rows(out / "manifest.csv")}
    assert list(got) == ["trainval/0000", "trainval/0001", "trainval/0002", "test/0000", "test/0001"]
    assert [got[c]["label"] for c in got] == ["1", "0", "0", "0", "1"]
    assert got["test/0001"]["source_split"] == "test"
    assert got["trainval/0001"]["mask"] == "../tn3k/trainval-mask/0001.jpg"
    # JPEG masks are thresholded at 128: the drawn box comes back (up to a few edge pixels)
    mask = read_still_mask(src / "trainval-mask" / "0001.jpg")
    assert set(np.unique(mask)) == {0, 1}
    assert (mask != (box(5, 6, 17, 26) > 0)).mean() < 0.02


@pytest.mark.parametrize(
    ("breaks", "named"),
    [
        ("no_labels", "label4test.csv"),
        ("bad_label", "label4trainval.csv"),
        ("unlabelled", "label4trainval.csv"),
        ("no_mask", "0002.jpg"),
        ("no_folder", "test-mask"),
    ],
)
def test_tn3k_bad_inputs_one_line_no_output(tmp_path, capsys, breaks, named):
    src = make_tn3k(tmp_path / "tn3k")
    if breaks == "no_labels":  # the segmentation-only release: no malignancy labels
        (src / "label4test.csv").unlink()
    elif breaks == "bad_label":
        (src / "label4trainval.csv").write_text("0000.jpg,1\n0001.jpg,2\n0002.jpg,0\n")
    elif breaks == "unlabelled":
        (src / "label4trainval.csv").write_text("0000.jpg,1\n0001.jpg,0\n")
    elif breaks == "no_mask":
        (src / "trainval-mask" / "0002.jpg").unlink()
    else:
        for p in (src / "test-mask").iterdir():
            p.unlink()
        (src / "test-mask").rmdir()
    out = tmp_path / "out"
    line = fails(argv("import-stills", src, layout="tn3k", out=out), capsys, named)
    if breaks == "no_labels":
        assert "malignancy labels" in line
    no_output(out)


# ------------------------------------------------------------------------------------------------- DDTI


def test_ddti_needs_an_explicit_tirads_mapping(tmp_path, capsys):
    src = make_ddti(tmp_path / "ddti")
    out = tmp_path / "out"
    line = fails(argv("import-stills", src, layout="ddti", out=out), capsys, src)
    assert "TI-RADS" in line and "--tirads-malignant" in line and "not pathology" in line
    no_output(out)


def test_ddti_import_draws_polygons_and_maps_tirads(tmp_path, capsys):
    src = make_ddti(tmp_path / "ddti")
    out = tmp_path / "out"
    main(argv("import-stills", src, layout="ddti", out=out, tirads_malignant="4B"))
    err = capsys.readouterr().err
    assert "1 DDTI case(s) without a TI-RADS category skipped" in err  # case 3
    assert "1 DDTI image(s) without a drawn region" in err  # case 2
    assert "not pathology" in err
    got = {r["case_id"]: r for r in rows(out / "manifest.csv")}
    assert list(got) == ["1_1", "1_2", "2_1"]
    assert [got[c]["label"] for c in got] == ["1", "1", "0"]  # 4b >= 4b; 3 < 4b
    assert [got[c]["tirads"] for c in got] == ["4b", "4b", "3"]
    assert [got[c]["patient_id"] for c in got] == ["1", "1", "2"]  # the case number
    assert got["2_1"]["mask"] == ""  # an empty svg: image kept, no mask
    two = read_still_mask(out / got["1_1"]["mask"])  # two nodules in one image: union of the regions
    assert two.shape == (H, W)
    assert two[6, 6] == 1 and two[16, 24] == 1 and two[6, 24] == 0 and two[22, 2] == 0
    assert two.sum() == 2 * 9 * 9  # each 8 x 8 square with its outline: 9 x 9 pixels
    # threshold 3: the TI-RADS 3 image is labelled malignant too
    main(argv("import-stills", src, layout="ddti", out=out, tirads_malignant="3"))
    assert [r["label"] for r in rows(out / "manifest.csv")] == ["1", "1", "1"]


@pytest.mark.parametrize(
    ("breaks", "named"),
    [("bad_xml", "2.xml"), ("bad_tirads", "2.xml"), ("no_image", "1_2.jpg"), ("no_xml", "ddti")],
)
def test_ddti_bad_inputs_one_line_no_output(tmp_path, capsys, breaks, named):
    src = make_ddti(tmp_path / "ddti")
    if breaks == "bad_xml":
        (src / "2.xml").write_text("<case><number>2</number><tirads>3")
    elif breaks == "bad_tirads":
        (src / "2.xml").write_text(ddti_xml("2", "7", [(1, svg(SQUARE_A))]))
    elif breaks == "no_image":
        (src / "1_2.jpg").unlink()
    else:
        for p in src.glob("*.xml"):
            p.unlink()
    out = tmp_path / "out"
    fails(argv("import-stills", src, layout="ddti", out=out, tirads_malignant="4a"), capsys, named)
    no_output(out)


# ----------------------------------------------------------------------------------------------- TN5000


def test_tn5000_import_has_labels_and_boxes_but_no_masks(tmp_path, capsys):
    src = make_tn5000(tmp_path / "tn5000")
    out = tmp_path / "out"
    main(argv("import-stills", src, layout="tn5000", out=out))
    assert "boxes, not masks" in capsys.readouterr().err
    got = rows(out / "manifest.csv")
    assert [r["case_id"] for r in got] == ["000001", "000002", "000003"]
    assert [r["label"] for r in got] == ["0", "1", "1"]
    assert [r["source_split"] for r in got] == ["train", "val", "test"]
    assert all(r["mask"] == "" for r in got) and got[0]["box"] == "3 4 20 18"
    ann = src / "TN5000" / "Annotations" / "000002.xml"
    ann.write_text(ann.read_text().replace("</object>", "</object><object><name>0</name></object>"))
    fails(argv("import-stills", src, layout="tn5000", out=tmp_path / "out2"), capsys, "000002.xml")
    no_output(tmp_path / "out2")


# --------------------------------------------------------------------------------------- cine -> stills


@pytest.mark.parametrize("frames", ["middle", "largest", "all"])
def test_cine_frames_as_stills(tmp_path, capsys, frames):
    h5 = write_stanford(tmp_path / "stanford")
    cine = StanfordCine(h5)
    out = tmp_path / "out"
    main(argv("import-stills", h5.parent, layout="stanford", out=out, frames=frames))
    assert "no patient_id column" in capsys.readouterr().err
    cases = read_manifest(out / "manifest.csv")
    by_nodule = {n.annot_id: n for n in cine.nodules}
    if frames == "all":
        assert len(cases) == sum(n.n_frames for n in cine.nodules)
    else:
        assert len(cases) == len(cine.nodules)
    for c in cases:
        nod = by_nodule[c.extra["annot_id"]]
        pos = int(np.flatnonzero(nod.frame_nums == int(c.extra["frame_num"]))[0])
        assert c.case_id == f"{nod.annot_id}-{c.extra['frame_num']}" and c.label == nod.label
        assert c.patient_id == nod.patient_id
        np.testing.assert_array_equal(read_still(c.image), cine.frames(nod.annot_id, [pos])[0])
        np.testing.assert_array_equal(read_still_mask(c.mask), cine.masks(nod.annot_id, [pos])[0])
        if frames == "middle":
            assert pos == (nod.n_frames - 1) // 2
        if frames == "largest":
            areas = cine.masks(nod.annot_id, np.arange(nod.n_frames)).sum(axis=(1, 2))
            assert areas[pos] == areas.max() and pos == int(np.argmax(areas))


def test_import_refuses_a_folder_it_did_not_write_and_keeps_the_old_set(tmp_path, capsys):
    src = make_tn3k(tmp_path / "tn3k")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    fails(argv("import-stills", src, layout="tn3k", out=out), capsys, out)
    assert (out / "notes.txt").read_text() == "mine"
    main(["import-stills", str(src), "--layout", "tn3k", "--out", str(out), "--overwrite"])
    capsys.readouterr()
    before = (out / "manifest.csv").read_text()
    # a failing re-import over its own output: the old manifest stays, complete; no temporaries are left
    (src / "label4test.csv").unlink()
    fails(argv("import-stills", src, layout="tn3k", out=out), capsys, "label4test.csv")
    assert (out / "manifest.csv").read_text() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    # an option for another layout is refused by the parser
    with pytest.raises(SystemExit) as e:
        main(argv("import-stills", src, layout="tn3k", out=out, frames="all"))
    assert e.value.code == 2


# ---------------------------------------------------------------------------------------------- manifest


def write_manifest_csv(
    path: Path, entries: list[dict], columns=("image", "mask", "label", "patient_id")
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        w.writerows(entries)
    return path


def small_set(root: Path, patients: int = 10, per_patient: int = 3) -> Path:
    """``patients`` x ``per_patient`` PNG images with masks (patient p malignant when p % 3 == 0)."""
    entries = []
    for p in range(patients):
        for j in range(per_patient):
            name = f"p{p}_{j}"
            save(root / "img" / f"{name}.png", texture(100 * p + j))
            save(root / "msk" / f"{name}.png", box(4, 4 + j, 14, 20 + j))
            entries.append({"image": f"img/{name}.png", "mask": f"msk/{name}.png", "label": int(p % 3 == 0),
                            "patient_id": f"P{p}"})  # fmt: skip
    return write_manifest_csv(root / "manifest.csv", entries)


def _dicom(path: Path, arr: np.ndarray) -> Path:
    from tests.test_dicom import new_ds
    from tests.test_dicom import save as save_dcm

    ds = new_ds()
    ds.set_pixel_data(arr, "MONOCHROME2", 8)
    return save_dcm(ds, path)


def test_manifest_minimal_columns_dicom_and_blank_mask(tmp_path):
    save(tmp_path / "a.png", texture(1, rgb=True))
    save(tmp_path / "a_mask.png", box(1, 1, 5, 5))
    _dicom(tmp_path / "b.dcm", texture(2))
    _dicom(tmp_path / "b_mask.dcm", box(3, 3, 9, 9))
    save(tmp_path / "c.jpg", texture(3))
    m = write_manifest_csv(
        tmp_path / "m.csv",
        [
            {"image": "a.png", "mask": "a_mask.png", "label": "1", "subtype": "PTC"},
            {"image": "b.dcm", "mask": "b_mask.dcm", "label": "0.0"},
            {"image": "c.jpg", "mask": "", "label": "0"},
        ],
        columns=("image", "mask", "label", "subtype"),
    )
    a, b, c = read_manifest(m)
    assert (a.case_id, a.patient_id, a.subtype, a.label) == ("a.png", "a.png", "PTC", 1)
    assert b.label == 0 and c.mask is None
    np.testing.assert_array_equal(read_still(b.image), texture(2))
    np.testing.assert_array_equal(read_still_mask(b.mask), box(3, 3, 9, 9) // 255)
    assert read_still(a.image).shape == (H, W)


@pytest.mark.parametrize(
    ("breaks", "named"),
    [
        ("column", "m.csv"),
        ("label", "m.csv"),
        ("image_missing", "gone.png"),
        ("mask_missing", "gone_mask.png"),
        ("mask_size", "p0_1.png"),
        ("duplicate_image", "m.csv"),
        ("duplicate_id", "m.csv"),
        ("format", "p0_0.txt"),
        ("multiframe", "multi.dcm"),
    ],
)
def test_manifest_bad_inputs_one_line(tmp_path, capsys, breaks, named):
    root = tmp_path / "set"
    m = small_set(root, patients=2, per_patient=2)
    entries = rows(m)
    columns = ["image", "mask", "label", "patient_id"]
    if breaks == "column":
        columns = ["image", "label", "patient_id"]
    elif breaks == "label":
        entries[1]["label"] = "2"
    elif breaks == "image_missing":
        entries[1]["image"] = "img/gone.png"
    elif breaks == "mask_missing":
        entries[1]["mask"] = "msk/gone_mask.png"
    elif breaks == "mask_size":
        save(root / "msk" / "p0_1.png", box(1, 1, 5, 5, w=W + 1))
    elif breaks == "duplicate_image":
        entries.append(dict(entries[0]))
    elif breaks == "duplicate_id":
        columns.append("case_id")
        for e in entries:
            e["case_id"] = "x"
    elif breaks == "format":
        (root / "img" / "p0_0.txt").write_text("not an image")
        entries[0]["image"] = "img/p0_0.txt"
    else:
        _dicom(root / "img" / "multi.dcm", np.stack([texture(1), texture(2)]))
        entries[0]["image"] = "img/multi.dcm"
    m = write_manifest_csv(root / "m.csv", entries, columns)
    if breaks != "multiframe":  # validation on load
        with pytest.raises(DataError):
            read_manifest(m)
    line = fails(argv("split", m, folds=3, out=tmp_path / "splits.json") if breaks != "multiframe"
                 else ["split", str(m), "-k", "3"], capsys, named)  # fmt: skip
    assert "\n" not in line
    assert not (tmp_path / "splits.json").exists()


# ------------------------------------------------------------------------------------ dataset and folds


def test_dataset_shapes_ranges_roi_and_augmentation(tmp_path):
    m = small_set(tmp_path / "set", patients=2, per_patient=2)
    cases = read_manifest(m)
    plain = StillDataset(cases, img_size=16, normalize=None)
    item = plain[0]
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert torch.equal(item["image"][0], item["image"][2])  # gray repeated
    assert item["mask"].shape == (1, 16, 16) and set(item["mask"].unique().tolist()) <= {0.0, 1.0}
    assert item["label"].dtype == torch.long and item["has_mask"].item() is True
    assert plain[3]["patient"].item() == 1 and plain[3]["index"].item() == 3
    one = StillDataset(cases, img_size=16, channels=1)[0]["image"]
    assert one.shape == (1, 16, 16)
    normed = StillDataset(cases, img_size=16)[0]["image"]
    assert normed.min() < 0  # ImageNet statistics
    # annotated ROI, no margin: the crop is the mask's box, so the cropped mask is all nodule
    roi = StillDataset(cases, img_size=16, roi="annotated", roi_margin=0.0, normalize=None)[1]
    assert roi["mask"].min() == 1.0
    assert roi_box(box(4, 4, 14, 20) // 255, 0.1) == (2, 2, 16, 22)  # 16 px side: 2 px each way
    assert roi_box(np.zeros((H, W), np.uint8), 0.1) is None
    # predicted ROI from a folder of <case id>.png and from HDF5: a box elsewhere crops elsewhere
    folder = tmp_path / "pred"
    with h5py.File(tmp_path / "pred.h5", "w") as f:
        for c in cases:
            save(folder / f"{c.case_id}.png", box(0, 0, 6, 6))
            f[c.case_id] = box(0, 0, 6, 6)
    for source in (folder, tmp_path / "pred.h5"):
        pred = PredictedStillMasks(source)
        pred.check([c.case_id for c in cases])
        item = StillDataset(cases, img_size=16, roi="predicted", roi_margin=0.0, predicted=pred)[0]
        assert 0.0 < item["mask"].mean() < 1.0  # the drawn mask, cropped at the predicted box
    with pytest.raises(DataError, match="no predicted mask"):
        PredictedStillMasks(folder).check(["nope"])
    # augmentation: the same seed gives the same sample; image and mask flip together
    aug = StillDataset(cases, img_size=16, augment=True, normalize=None)
    torch.manual_seed(3)
    a = aug[0]
    torch.manual_seed(3)
    b = aug[0]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    flips = set()
    for seed in range(8):
        torch.manual_seed(seed)
        flips.add(torch.equal(aug[0]["mask"], plain[0]["mask"]))
    assert flips == {True, False}


def test_square_roi_keeps_the_nodules_aspect_ratio(tmp_path):
    """roi_square: a nodule twice as wide as tall stays so in the 32 x 32 input (the plain box crop stretches it
    towards the square), through the data module; the square is centred on the box and shifted inside the image
    near a border, never larger than the image's shorter side."""
    h, w = 64, 96
    save(tmp_path / "img.png", texture(5, h, w))
    save(tmp_path / "wide.png", box(26, 28, 38, 52, h, w))  # 12 x 24 px
    m = write_manifest_csv(tmp_path / "m.csv", [{"image": "img.png", "mask": "wide.png", "label": 1}],
                           columns=("image", "mask", "label"))  # fmt: skip

    def extent(square: bool) -> tuple[int, int]:
        dm = StillDataModule(manifest=m, splits=None, fold=None, img_size=32, roi="annotated", roi_margin=0.25,
                             roi_square=square, normalize=None)  # fmt: skip
        dm.setup("fit")
        ys, xs = torch.nonzero(dm.datasets["train"][0]["mask"][0], as_tuple=True)
        return int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)

    tall, wide = extent(square=True)  # 36 px square -> 12 * 32 / 36 = 10.7 by 24 * 32 / 36 = 21.3
    assert (tall, wide) in {(10, 21), (11, 21), (11, 22), (10, 22)}
    tall, wide = extent(square=False)  # the 24 x 36 box stretched: 16 by 21.3
    assert wide / tall < 1.4
    # the square: side 24 + 2 * 6 = 36, centred on the box's centre (32, 40)
    assert roi_box(box(26, 28, 38, 52, h, w) // 255, 0.25, square=True) == (14, 22, 50, 58)
    assert roi_box(box(0, 0, 12, 24, h, w) // 255, 0.25, square=True) == (0, 0, 36, 36)  # shifted inside
    assert roi_box(box(0, 60, 40, 96, h, w) // 255, 0.5, square=True) == (0, 32, 64, 96)  # 80 capped at 64
    assert roi_box(np.zeros((h, w), np.uint8), 0.25, square=True) is None


def test_roi_min_side_gives_every_crop_one_scale(tmp_path):
    """roi_min_side: the square is at least that share of the image's shorter side, so a small and a large
    nodule are cropped alike and the small one stays small in the input (without it both fill the crop)."""
    h, w = 64, 96
    small, large = box(28, 40, 36, 52, h, w), box(16, 28, 48, 68, h, w)  # 8 x 12 and 32 x 40 px
    # 0.75 * 64 = 48 px, centred on each box's centre; the large one needs 40 * 1.2 = 48 px too
    assert roi_box(small // 255, 0.1, square=True, min_side=0.75) == (8, 22, 56, 70)
    assert roi_box(large // 255, 0.1, square=True, min_side=0.75) == (8, 24, 56, 72)
    assert roi_box(small // 255, 0.1, square=True) == (25, 39, 39, 53)  # a 14 px square: follows the nodule
    assert roi_box(large // 255, 0.5, square=True, min_side=0.5) == (0, 16, 64, 80)  # 80 > 32: capped at 64
    assert roi_box(small // 255, 0.1, min_side=0.75) == roi_box(small // 255, 0.1)  # the box ignores it
    entries = []
    for name, m in (("small", small), ("large", large)):
        save(tmp_path / f"{name}_img.png", texture(5, h, w))
        save(tmp_path / f"{name}.png", m)
        entries.append({"image": f"{name}_img.png", "mask": f"{name}.png", "label": 1})
    manifest = write_manifest_csv(tmp_path / "m.csv", entries, columns=("image", "mask", "label"))

    def widths(min_side: float) -> list[int]:
        dm = StillDataModule(manifest=manifest, splits=None, fold=None, img_size=32, roi="annotated",
                             roi_margin=0.1, roi_square=True, roi_min_side=min_side, normalize=None)  # fmt: skip
        dm.setup("fit")
        return [int(dm.datasets["train"][i]["mask"][0].amax(dim=0).sum()) for i in range(2)]

    assert widths(0.75) == [8, 27]  # 12 and 40 px of a 48 px crop at 32 px: the ratio of the nodules kept
    assert widths(0.0)[0] >= 26  # the small nodule blown up to the crop
    with pytest.raises(ValueError, match="roi_min_side"):
        StillDataset(read_manifest(manifest), roi_min_side=1.5)
    # the data module refuses at once (a one-line error before any fit), and a setting that would do nothing
    with pytest.raises(OptionError, match=r"roi_min_side: must be in \[0, 1\]"):
        StillDataModule(manifest=manifest, roi="annotated", roi_square=True, roi_min_side=1.5)
    for roi, square in (("annotated", False), (None, True)):
        with pytest.raises(OptionError, match="roi_min_side: .* needs roi_square: true and a roi"):
            StillDataModule(manifest=manifest, roi=roi, roi_square=square, roi_min_side=0.5)


def test_class_sampling_draws_rare_classes_more_often(tmp_path):
    """class_sampling: training draws weighted N_c ** -alpha (the subtype with ``subtypes``, else the label),
    len(train) draws with replacement; 0 keeps the plain shuffle (each image once per epoch)."""
    m = small_set(tmp_path / "set", patients=10, per_patient=2)  # 8 malignant (p % 3 == 0), 12 benign images

    def module(alpha: float) -> StillDataModule:
        dm = StillDataModule(manifest=m, splits=None, fold=None, img_size=16, batch_size=5, normalize=None,
                             class_sampling=alpha)  # fmt: skip
        dm.setup("fit")
        return dm

    labels = torch.tensor([c.label for c in module(0.0).datasets["train"].cases])
    n_mal, n_ben = int(labels.sum()), int((1 - labels).sum())
    assert (n_mal, n_ben) == (8, 12)
    torch.testing.assert_close(module(1.0).sample_weights(), torch.where(labels == 1, 1 / 8, 1 / 12).double())
    root = module(0.5).sample_weights()
    torch.testing.assert_close(root, torch.where(labels == 1, 8**-0.5, 12**-0.5).double())
    plain = module(0.0)
    seen = torch.cat([b["index"] for b in plain.train_dataloader()])
    assert sorted(seen.tolist()) == list(range(20))  # a shuffle: every image once
    balanced = module(1.0)
    torch.manual_seed(0)
    drawn = torch.cat([b["label"] for _ in range(50) for b in balanced.train_dataloader()])
    assert len(drawn) == 50 * 20
    assert 0.45 < float(drawn.float().mean()) < 0.55  # half malignant, against 8 of 20 in the set
    # square-root sampling: a class is drawn in proportion to sqrt(N_c), 8**0.5 / (8**0.5 + 12**0.5) = 0.449
    sampler = module(0.5).train_dataloader().sampler
    torch.manual_seed(0)
    picks = torch.tensor([i for _ in range(400) for i in sampler])
    assert len(picks) == 400 * 20
    share = float(labels[picks].float().mean())
    assert share == pytest.approx(8**0.5 / (8**0.5 + 12**0.5), abs=0.015)  # 8000 draws: sd 0.006
    for bad in (2.0, -0.1):
        with pytest.raises(OptionError, match=r"class_sampling: must be in \[0, 1\]"):
            StillDataModule(manifest=m, class_sampling=bad)


def test_roi_jitter_moves_the_training_crop_only(tmp_path):
    """roi_jitter: the box moves and zooms within the limit, stays inside the image and square; seeded by torch;
    only augmented (training) items are jittered."""
    shape = (64, 96)
    boxes = set()
    for seed in range(40):
        torch.manual_seed(seed)
        b = jitter_box((14, 22, 50, 58), 0.2, shape)  # a 36 px square
        y0, x0, y1, x1 = b
        assert 0 <= y0 < y1 <= 64 and 0 <= x0 < x1 <= 96
        assert y1 - y0 == x1 - x0 and 29 <= y1 - y0 <= 43  # 36 * (1 +- 0.2)
        assert abs((y0 + y1) / 2 - 32) <= 0.2 * 36 + 1 and abs((x0 + x1) / 2 - 40) <= 0.2 * 36 + 1
        boxes.add(b)
    assert len(boxes) > 20
    torch.manual_seed(1)
    a = jitter_box((14, 22, 50, 58), 0.2, shape)
    torch.manual_seed(1)
    assert jitter_box((14, 22, 50, 58), 0.2, shape) == a
    torch.manual_seed(1)
    assert jitter_box((0, 0, 64, 64), 0.2, shape)[2] <= 64  # a square as tall as the image stays inside it
    # through the data set: jittered training crops differ between draws, evaluation crops do not
    m = small_set(tmp_path / "set", patients=1, per_patient=1)
    cases = read_manifest(m)
    kw = dict(img_size=16, roi="annotated", roi_margin=0.25, roi_square=True, roi_jitter=0.2, normalize=None)
    train = StillDataset(cases, augment=True, **kw)
    train.transform = StillDataset(cases, **kw).transform  # no flips: only the jitter can change the crop
    masks = {tuple(train[0]["mask"].flatten().tolist()) for _ in range(6)}
    assert len(masks) > 1
    evaluation = StillDataset(cases, **kw)
    assert torch.equal(evaluation[0]["mask"], evaluation[0]["mask"])
    with pytest.raises(ValueError, match="roi_jitter"):
        StillDataset(cases, roi_jitter=1.0)


def test_split_and_datamodule_keep_patients_together(tmp_path, capsys):
    m = small_set(tmp_path / "set", patients=10, per_patient=3)
    splits = tmp_path / "set" / "splits.json"
    main(argv("split", m, folds=3))
    assert "warning" not in capsys.readouterr().err  # the manifest has patient ids
    cases = {c.case_id: c for c in read_manifest(m)}
    for fold in range(3):
        parts = load_fold(splits, fold)
        patients = {p: {cases[i].patient_id for i in ids} for p, ids in parts.items()}
        assert not (patients["train"] & patients["test"]) and not (patients["val"] & patients["test"])
        assert not (patients["train"] & patients["val"])
        assert sorted(sum(parts.values(), [])) == sorted(cases)
    dm = StillDataModule(manifest=m, splits=splits, fold=0, img_size=16, batch_size=4, roi="annotated")
    dm.setup("fit")
    sizes = [len(dm.datasets[p]) for p in ("train", "val", "test")]
    assert min(sizes) > 0 and sum(sizes) == 30 and len(dm.datasets["predict"]) == 30
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape[1:] == (3, 16, 16) and batch["mask"].shape[1:] == (1, 16, 16)
    test_patients = {dm.datasets["test"].patients[i] for i in
                     (dm.datasets["test"][j]["patient"].item() for j in range(len(dm.datasets["test"])))}  # fmt: skip
    assert test_patients == {cases[i].patient_id for i in load_fold(splits, 0)["test"]}
    # ids of the splits file that the manifest lacks: one line naming the splits file
    small = write_manifest_csv(tmp_path / "set" / "small.csv", rows(m)[:6])
    with pytest.raises(DataError, match="not in manifest"):
        StillDataModule(manifest=small, splits=splits, fold=0).setup("fit")


def test_split_warns_without_patient_ids(tmp_path, capsys):
    src = make_tn3k(tmp_path / "tn3k")
    for part in ("trainval", "test"):  # enough images for 3 folds of each class
        for i in range(3, 6):
            save(src / f"{part}-image" / f"000{i}.jpg", texture(40 + i), quality=95)
            save(src / f"{part}-mask" / f"000{i}.jpg", box(3, 3, 12, 12), quality=95)
        with open(src / f"label4{part}.csv", "a") as f:
            f.write("".join(f"000{i}.jpg,{i % 2}\n" for i in range(3, 6)))
    main(argv("import-stills", src, layout="tn3k", out=tmp_path / "out"))
    capsys.readouterr()
    main(argv("split", tmp_path / "out" / "manifest.csv", folds=3))
    assert "warning: no patient ids" in capsys.readouterr().err
