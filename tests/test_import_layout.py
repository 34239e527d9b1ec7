"""``usnodule import LAYOUT``: the AsyCMST authors' layout and the still-image layouts under one verb."""

from __future__ import annotations

import csv

import pytest

from datamodules.paired import load_case, read_manifest
from stages.cli import main
from tests.commands import argv
from tests.test_paired import make_asycmst_root
from tests.test_stills import fails, make_busi


def test_import_asycmst_writes_a_manifest_split_reads(tmp_path, capsys):
    root = make_asycmst_root(tmp_path / "XJTU-MMUS")
    out = tmp_path / "data" / "manifest.csv"
    main(argv("import", "asycmst", root, out=out))
    said = capsys.readouterr().out
    assert f"wrote {out}: 4 BUS/CEUS pairs (2 malignant)" in said and "RESULT cases=4 malignant=2" in said
    with open(out) as fh:
        rows = list(csv.DictReader(fh))
    assert [r["case_id"] for r in rows] == ["TT_1", "TT_2", "TT_3", "TT_4"]
    assert [r["label"] for r in rows] == ["0", "1", "0", "1"]
    assert rows[1]["bus"] == "../XJTU-MMUS/videos/1.mal/bus/TT_2_CEUS_busvid.mp4"
    assert rows[0]["source_splits"] == "test_1 train_1"
    bus, ceus, mask, _ = load_case(read_manifest(out)[3])
    assert bus.shape == ceus.shape == (4, 16, 16) and mask is None


def test_import_asycmst_options_and_errors(tmp_path, capsys):
    root = make_asycmst_root(tmp_path / "r")
    out = tmp_path / "m.csv"
    main(argv("import", "asycmst", root, "--splits", "test_1.csv", out=out, source="images"))
    cases = read_manifest(out)
    assert [c.case_id for c in cases] == ["TT_1", "TT_4"]
    assert cases[0].bus.is_dir() and cases[0].bus.parts[-4:] == ("images", "0.ben", "bus", "TT_1_CEUS_busvid")
    (root / "videos/1.mal/ceus/TT_2_CEUS_ceusvid.mp4").unlink()
    capsys.readouterr()
    line = fails(argv("import", "asycmst", root, out=tmp_path / "bad.csv"), capsys, "TT_2_CEUS_ceusvid.mp4")
    assert "split train_1.csv, row 3" in line
    assert not (tmp_path / "bad.csv").exists()
    with pytest.raises(SystemExit) as e:  # --out is required
        main(["import", "asycmst", str(root)])
    assert e.value.code == 2


def test_still_layouts_under_the_same_verb_and_the_alias(tmp_path, capsys):
    src = make_busi(tmp_path / "busi")
    main(argv("import", "busi", src, out=tmp_path / "a", normal="keep"))
    main(argv("import-stills", src, layout="busi", out=tmp_path / "b", normal="keep"))
    a = (tmp_path / "a" / "manifest.csv").read_text()
    assert a == (tmp_path / "b" / "manifest.csv").read_text()  # one importer behind both spellings
    # each layout's subcommand offers only its own options
    with pytest.raises(SystemExit) as e:
        main(argv("import", "tn3k", src, out=tmp_path / "c", normal="keep"))
    assert e.value.code == 2
    assert "unrecognized arguments: --normal" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(argv("import", "ddti", src, out=tmp_path / "d"))
    assert "--tirads-malignant" in capsys.readouterr().err


@pytest.mark.parametrize("layout", ["asycmst", "busi", "tn3k", "ddti", "tn5000", "stanford"])
def test_every_layout_has_help(layout, capsys):
    with pytest.raises(SystemExit) as e:
        main(["import", layout, "--help"])
    assert e.value.code == 0
    assert f"usage: usnodule import {layout}" in capsys.readouterr().out
