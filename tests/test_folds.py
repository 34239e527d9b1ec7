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


# ------------------------------------------------------------------ splits.json validated whole on load
def _small_splits():
    """A sound 3-fold document over 9 ids (validation = next fold's test part), with a groups map."""
    tests = [["a", "b", "c"], ["d", "e", "f"], ["g", "h", "i"]]
    folds = []
    for k in range(3):
        val = tests[(k + 1) % 3]
        train = [i for t in tests for i in t if i not in tests[k] and i not in val]
        folds.append({"fold": k, "train": train, "val": list(val), "test": list(tests[k])})
    return {"k": 3, "seed": 0, "n": 9, "folds": folds, "groups": {i: f"p_{i}" for t in tests for i in t}}


def _break_missing_k(doc):
    del doc["k"]


def _break_missing_val(doc):
    del doc["folds"][1]["val"]


def _break_fewer_folds(doc):
    doc["folds"].pop()


def _break_no_folds(doc):
    doc["folds"] = []


def _break_train_test_overlap(doc):
    doc["folds"][0]["train"].append("a")  # a is fold 0's test case


def _break_val_test_overlap(doc):
    doc["folds"][2]["val"].append("g")


def _break_tested_twice(doc):
    doc["folds"][1]["test"].append("a")
    doc["folds"][1]["train"].remove("a")


def _break_never_tested(doc):
    doc["folds"][0]["test"].remove("c")  # c is still in fold 1's training part


def _break_part_not_strings(doc):
    doc["folds"][0]["train"] = [7, 8]


def _break_part_not_a_list(doc):
    doc["folds"][0]["test"] = "a,b,c"


def _break_fold_number(doc):
    doc["folds"][0]["fold"], doc["folds"][1]["fold"] = 1, 0


def _break_k_not_int(doc):
    doc["k"] = "3"


def _break_patient_leak(doc):
    doc["groups"]["g"] = doc["groups"]["a"]  # a (tested in fold 0) and g (training in fold 0): one patient


BAD_SPLITS = [
    (_break_missing_k, "missing key(s) k"),
    (_break_missing_val, "fold 1 has no val list"),
    (_break_fewer_folds, "k is 3 but the file has 2 fold(s)"),
    (_break_no_folds, "k is 3 but the file has 0 fold(s)"),
    (_break_train_test_overlap, "fold 0: id(s) 'a' in both train and test (leakage)"),
    (_break_val_test_overlap, "fold 2: id(s) 'g' in both val and test (leakage)"),
    (_break_tested_twice, "tested in more than one fold (e.g. 'a' in folds 0, 1)"),
    (_break_never_tested, "1 id(s) in no fold's test part ('c')"),
    (_break_part_not_strings, "fold 0 train must be a list of non-empty string ids"),
    (_break_part_not_a_list, "fold 0 test must be a list of non-empty string ids"),
    (_break_fold_number, "fold at position 0 says it is fold 1"),
    (_break_k_not_int, "k must be a positive integer, got '3'"),
    (_break_patient_leak, "fold 0: patient(s) 'p_a' in both train and test (patient-level leakage)"),
]


@pytest.mark.parametrize(("breaks", "problem"), BAD_SPLITS, ids=[b.__name__[7:] for b, _ in BAD_SPLITS])
def test_bad_splits_file_is_one_line_data_error_naming_the_file(tmp_path, breaks, problem):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(_small_splits()))
    assert load_fold(good, 0)["test"] == ["a", "b", "c"]  # the helper's document itself is sound
    doc = _small_splits()
    breaks(doc)
    path = tmp_path / "splits.json"
    path.write_text(json.dumps(doc))
    for fold in (0, None):
        with pytest.raises(DataError) as e:
            load_fold(path, fold)
        assert str(e.value) == f"{path}: {e.value.problem}" and "\n" not in str(e.value)
        assert problem in e.value.problem


def test_splits_file_not_an_object_or_not_json_is_one_line(tmp_path):
    path = tmp_path / "splits.json"
    path.write_text("[1, 2]")
    with pytest.raises(DataError, match=r"splits.json: not a splits.json document \(a JSON list"):
        load_fold(path, 0)
    path.write_text('{"k": 3,\n "folds": [')
    with pytest.raises(DataError, match="splits.json: not a splits.json document") as e:
        load_fold(path, 0)
    assert "\n" not in str(e.value)


def test_fold_index_out_of_range_or_not_an_integer(tmp_path):
    path = tmp_path / "splits.json"
    path.write_text(json.dumps(_small_splits()))
    for fold in (3, -1, 10**6):
        with pytest.raises(
            DataError, match=f"splits.json: fold {fold} out of range: the file has folds 0..2"
        ):
            load_fold(path, fold)
    for fold in ("1", 1.0, True):
        with pytest.raises(DataError, match="fold must be an integer"):
            load_fold(path, fold)
    assert load_fold(path, np.int64(2))["test"] == ["g", "h", "i"]


def test_cli_leaking_splits_file_is_one_line_exit_2(tmp_path, capsys):
    doc = _small_splits()
    _break_train_test_overlap(doc)
    path = tmp_path / "splits.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(SystemExit) as e:
        main(["baselines", "--splits", str(path), "--runs", str(tmp_path / "runs"), "--methods", "tirads"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {path}: fold 0:") and "Traceback" not in err
    assert "in both train and test (leakage)" in err


def test_split_output_passes_its_own_validation(tmp_path):
    ids, labels, groups = _cohort(n_patients=60)
    for k, seed in ((3, 0), (5, 1), (10, 2)):
        path = write_splits(make_folds(ids, labels, groups, k=k, seed=seed), tmp_path / f"s{k}.json")
        assert sorted(i for f in range(k) for i in load_fold(path, f)["test"]) == sorted(ids)


def test_without_groups_an_untested_id_is_allowed_but_no_leak_or_double_test(tmp_path):
    """A hand-written file without ``groups`` need not test every id it names (training-only nodules)."""
    doc = _small_splits()
    del doc["groups"]
    _break_never_tested(doc)
    path = tmp_path / "splits.json"
    path.write_text(json.dumps(doc))
    assert "c" in load_fold(path, 1)["train"] and "c" not in load_fold(path, None)["train"]
    for breaks, problem in (
        (_break_tested_twice, "tested in more than one fold"),
        (_break_val_test_overlap, "leakage"),
    ):
        doc = _small_splits()
        del doc["groups"]
        breaks(doc)
        path.write_text(json.dumps(doc))
        with pytest.raises(DataError, match=problem):
            load_fold(path, 0)


def test_groups_must_name_a_patient_for_every_id(tmp_path):
    doc = _small_splits()
    del doc["groups"]["e"]
    path = tmp_path / "splits.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"splits.json: groups has no patient for id\(s\) 'e'"):
        load_fold(path, 0)
