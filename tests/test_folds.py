import json

import numpy as np
import pytest

from datamodules.errors import DataError
from datamodules.folds import load_fold, make_folds, write_splits
from stages.cli import main
from tests.stanford_files import write_stanford


def _cohort(n_patients=40, seed=0):
    rng = np.random.default_rng(seed)
    ids, labels, groups = [], [], []
    for p in range(n_patients):
        for j in range(rng.integers(1, 4)):  # 1-3 nodules per patient
            ids.append(f"{p}_{j}")
            labels.append(int(p % 4 == 0))  # a patient's nodules share a label: 25% malignant
            groups.append(f"patient{p}")
    return ids, labels, groups


def test_folds_partition_cases_and_never_split_a_patient():
    ids, labels, groups = _cohort()
    doc = make_folds(ids, labels, groups, k=5, seed=3)
    group_of = dict(zip(ids, groups, strict=True))
    tests = [set(f["test"]) for f in doc["folds"]]
    assert set().union(*tests) == set(ids) and sum(map(len, tests)) == len(ids)
    for f in doc["folds"]:
        train, val, test = (set(f[p]) for p in ("train", "val", "test"))
        assert train | val | test == set(ids)
        assert not (train & val or train & test or val & test)
        patients = [{group_of[i] for i in part} for part in (train, val, test)]
        assert not (patients[0] & patients[1] or patients[0] & patients[2] or patients[1] & patients[2])
        k = f["fold"]
        assert f["val"] == doc["folds"][(k + 1) % 5]["test"]  # validation is the next fold's test part
        label_of = dict(zip(ids, labels, strict=True))
        assert any(label_of[i] for i in test)  # stratified: every test fold has a malignant case


def test_folds_are_deterministic_by_seed():
    ids, labels, groups = _cohort()
    assert make_folds(ids, labels, groups, seed=1) == make_folds(ids, labels, groups, seed=1)
    assert (
        make_folds(ids, labels, groups, seed=1)["folds"] != make_folds(ids, labels, groups, seed=2)["folds"]
    )


def test_too_few_positives_says_how_many_folds_fit():
    ids, labels, groups = _cohort(n_patients=12)  # 3 malignant patients
    with pytest.raises(DataError, match="supports at most 3 folds, not 5"):
        make_folds(ids, labels, groups, k=5)


def test_load_fold_roundtrip_and_range(tmp_path):
    ids, labels, groups = _cohort()
    path = write_splits(make_folds(ids, labels, groups, k=4), tmp_path / "splits.json")
    parts = load_fold(path, 2)
    assert set(parts) == {"train", "val", "test"}
    assert sorted(load_fold(path, None)["train"]) == sorted(ids)
    with pytest.raises(DataError, match="fold 4 out of range"):
        load_fold(path, 4)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(DataError, match="bad.json: not a splits.json"):
        load_fold(tmp_path / "bad.json", 0)


def test_split_cli_too_few_malignant_patients_is_one_line_and_writes_nothing(tmp_path, capsys):
    patients = {"12_": "a", "7_": "a", "129_": "b", "3_": "c", "45_": "d"}
    labels = {"12_": 1, "7_": 1, "129_": 1, "3_": 0, "45_": 0}
    h5 = write_stanford(tmp_path, labels=labels, patients=patients)
    with pytest.raises(SystemExit) as e:
        main(["split", str(h5), "-k", "3"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "only 2 malignant patient group(s)" in err  # a and b
    assert "supports at most 2 folds" in err
    assert not (tmp_path / "splits.json").exists()


def test_split_cli_writes_splits_beside_the_data(tmp_path, capsys):
    patients = {"12_": "a", "7_": "a", "1000_": "a"}  # three nodules of one patient stay together
    h5 = write_stanford(tmp_path, extra=8, patients=patients)
    main(["split", str(h5), "-k", "3", "--seed", "1"])
    doc = json.loads((tmp_path / "splits.json").read_text())
    assert doc["k"] == 3 and doc["n"] == 13
    assert "wrote" in capsys.readouterr().out
    for fold in doc["folds"]:
        together = [part for part in ("train", "val", "test") if "12_" in fold[part]]
        assert all("7_" in fold[p] and "1000_" in fold[p] for p in together)


def test_split_groups_file_keeps_a_patients_nodules_together(tmp_path, capsys):
    h5 = write_stanford(tmp_path, extra=8)  # no patient_id column: every nodule its own group
    main(["split", str(h5), "-k", "3", "--out", str(tmp_path / "plain.json")])
    assert "warning: no patient ids" in capsys.readouterr().err
    ids = json.loads((tmp_path / "plain.json").read_text())["groups"]
    groups = tmp_path / "groups.csv"
    together = ["12_", "7_", "129_"]
    groups.write_text(
        "annot_id,patient_id\n" + "".join(f"{i},{'p0' if i in together else 'p_' + i}\n" for i in ids)
    )
    for seed in range(4):
        out = tmp_path / f"s{seed}.json"
        main(["split", str(h5), "-k", "3", "--seed", str(seed), "--groups", str(groups), "--out", str(out)])
        assert "warning" not in capsys.readouterr().err
        doc = json.loads(out.read_text())
        assert doc["groups"]["7_"] == "p0"
        for k in range(3):  # every stage reads its parts through load_fold: one patient, one side
            fold = load_fold(out, k)
            sides = {part for part in ("train", "val", "test") for i in together if i in fold[part]}
            assert len(sides) == 1


def test_split_groups_file_missing_a_case_is_one_line_and_writes_nothing(tmp_path, capsys):
    h5 = write_stanford(tmp_path, extra=8)
    groups = tmp_path / "groups.csv"
    groups.write_text("annot_id,patient_id\n12_,a\n7_,a\n")
    with pytest.raises(SystemExit) as e:
        main(["split", str(h5), "-k", "3", "--groups", str(groups)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "case(s) have no patient in the groups file" in err
    assert not (tmp_path / "splits.json").exists()
