"""``usnodule report`` (stages/report.py): numbers equal scikit-learn on hand-made predictions."""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score

from datamodules.errors import DataError
from stages import report as report_stage
from stages.report import at_sensitivity, bootstrap_auroc, rank_auroc, report


def hand_made(root, rng):
    """3 folds x 2 methods of predictions (+ stack predictions of one backbone)."""
    truth = {}
    for k in range(3):
        d = root / f"fold{k}"
        d.mkdir(parents=True)
        ids = [f"{k}_{i}" for i in range(12)]
        label = np.array([0, 1] * 6)
        for m, noise in (("stact", 0.3), ("tirads", 0.6)):
            prob = np.clip(label * 0.5 + 0.25 + rng.normal(0, noise, 12), 0, 1).round(4)
            pd.DataFrame({"annot_id": ids, "label": label, "prob": prob}).to_csv(
                d / f"predictions_{m}.csv", index=False
            )
            truth[(m, k)] = (label, prob)
        stack = pd.DataFrame(
            {
                "annot_id": np.repeat(ids, 2),
                "stack": np.tile([0, 1], 12),
                "label": np.repeat(label, 2),
                "prob": rng.random(24).round(4),
            }
        )
        stack.to_csv(d / "stack_predictions_vit.csv", index=False)
        truth[("stack", k)] = stack
    return truth


def test_report_equals_sklearn_mean_std_over_folds(tmp_path):
    truth = hand_made(tmp_path / "runs", np.random.default_rng(0))
    table = report(tmp_path / "runs", tmp_path / "out", n_boot=50, show=False)
    csv = pd.read_csv(tmp_path / "out" / "results.csv").set_index("method")
    assert list(table["method"]) == ["tirads", "stact"]  # paper row order
    for m in ("stact", "tirads"):
        for name, fn in (
            ("acc", accuracy_score),
            ("precision", precision_score),
            ("recall", recall_score),
            ("f1", f1_score),
            ("auroc", roc_auc_score),
        ):
            per_fold = []
            for k in range(3):
                y, p = truth[(m, k)]
                per_fold.append(fn(y, p) if name == "auroc" else fn(y, (p >= 0.5).astype(int)))
            assert csv.loc[m, f"{name}_mean"] == pytest.approx(np.mean(per_fold), abs=1e-5)
            assert csv.loc[m, f"{name}_std"] == pytest.approx(np.std(per_fold, ddof=1), abs=1e-5)
        for name, fn in (("precision_w", precision_score), ("recall_w", recall_score), ("f1_w", f1_score)):
            per_fold = [
                fn(y, (p >= 0.5).astype(int), average="weighted")
                for y, p in (truth[(m, k)] for k in range(3))
            ]
            assert csv.loc[m, f"{name}_mean"] == pytest.approx(np.mean(per_fold), abs=1e-5)
        assert csv.loc[m, "recall_w_mean"] == pytest.approx(
            csv.loc[m, "acc_mean"], abs=1e-9
        )  # always, by definition
        y = np.concatenate([truth[(m, k)][0] for k in range(3)])
        p = np.concatenate([truth[(m, k)][1] for k in range(3)])
        assert csv.loc[m, "auroc_pooled"] == pytest.approx(roc_auc_score(y, p), abs=1e-5)
        assert csv.loc[m, "auroc_ci_low"] <= csv.loc[m, "auroc_pooled"] <= csv.loc[m, "auroc_ci_high"]
    md = (tmp_path / "out" / "results.md").read_text()
    assert "Nodule Recall (w)" in md and "the malignant class's" in md
    # Table 3: stack and nodule (mean of stacks) level for the backbone.
    stack = pd.read_csv(tmp_path / "out" / "results_stack.csv").set_index("backbone")
    accs = [accuracy_score(s["label"], s["prob"] >= 0.5) for s in (truth[("stack", k)] for k in range(3))]
    assert stack.loc["vit", "stack_acc_mean"] == pytest.approx(np.mean(accs), abs=1e-5)
    nod = [
        truth[("stack", k)].groupby("annot_id").agg(label=("label", "first"), prob=("prob", "mean"))
        for k in range(3)
    ]
    assert stack.loc["vit", "nodule_auroc_mean"] == pytest.approx(
        np.mean([roc_auc_score(n["label"], n["prob"]) for n in nod]), abs=1e-5
    )
    md = (tmp_path / "out" / "results.md").read_text()
    assert "STACT-Time" in md and "TI-RADS" in md and "ViT Backbone" in md and " ± " in md
    assert (tmp_path / "out" / "roc.png").stat().st_size > 1000
    assert len(pd.read_csv(tmp_path / "out" / "predictions.csv")) == 2 * 3 * 12


def test_operating_point_at_95_sensitivity_and_seeded_bootstrap():
    label = np.array([0, 0, 0, 0, 1, 1, 1, 1, 0, 1] * 2)
    prob = np.array([0.1, 0.2, 0.3, 0.6, 0.5, 0.7, 0.8, 0.9, 0.05, 0.4] * 2)
    op = at_sensitivity(label, prob, 0.95)
    # All malignant need prob >= 0.4 to reach 100% (>= 95%) sensitivity; benign below 0.4: 0.1, 0.2, 0.3, 0.05.
    assert op["threshold"] == pytest.approx(0.4) and op["sensitivity"] == 1.0
    assert op["benign_spared"] == 8 and op["n_benign"] == 10 and op["specificity"] == pytest.approx(0.8)
    a, b = bootstrap_auroc(label, prob, 200, seed=3), bootstrap_auroc(label, prob, 200, seed=3)
    assert a == b and a[0] <= roc_auc_score(label, prob) <= a[1]
    # The vectorised rank AUROC used by the bootstrap equals scikit-learn's, ties included.
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 2, (5, 30)), rng.integers(0, 6, (5, 30)) / 5
    np.testing.assert_allclose(rank_auroc(y, p), [roc_auc_score(a, b) for a, b in zip(y, p, strict=True)])


def test_one_class_fold_auroc_left_out_and_no_predictions_is_an_error(tmp_path):
    runs = tmp_path / "runs"
    for k, label in enumerate(([0, 1, 0, 1], [0, 0, 0, 0])):
        (runs / f"fold{k}").mkdir(parents=True)
        pd.DataFrame({"annot_id": list("abcd"), "label": label, "prob": [0.2, 0.8, 0.6, 0.9]}).to_csv(
            runs / f"fold{k}" / "predictions_x.csv", index=False
        )
    table = report(runs, tmp_path / "out", n_boot=10, show=False).set_index("method")
    assert table.loc["x", "auroc_folds"] == 1 and table.loc["x", "auroc_mean"] == 1.0
    assert table.loc["x", "acc_folds"] == 2
    with pytest.raises(DataError, match="no fold"):
        report(tmp_path / "out", tmp_path / "out2", show=False)


def test_cli_prints_table(tmp_path, capsys):
    hand_made(tmp_path / "runs", np.random.default_rng(1))
    parser = argparse.ArgumentParser()
    report_stage.add_parser(parser.add_subparsers())
    args = parser.parse_args(
        ["report", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "rep"), "--n-boot", "20"]
    )
    args.func(args)
    out = capsys.readouterr().out
    assert "STACT-Time" in out and "Nodule AUROC" in out


def truth_beside(root, rng, n_extra=5):
    """Predictions of 2 methods on 3 folds (method 'tirads' misses one nodule of fold 1) and a truth.csv holding
    every test nodule plus ``n_extra`` nodules no fold tests; returns (truth path, truth frame)."""
    rows = []
    for k in range(3):
        d = root / "runs" / f"fold{k}"
        d.mkdir(parents=True)
        ids = [f"{10 * k + i}_" for i in range(10)]
        label = np.array([0, 1] * 5)
        risk = label * 1.5 + rng.normal(0, 1, 10)
        rows += [
            {
                "annot_id": a,
                "risk": r,
                "tirads_risk": 0.5 * r + rng.normal(0, 1),
                "hidden_risk": 0.0,
                "label": y,
            }
            for a, r, y in zip(ids, risk, label, strict=True)
        ]
        for m in ("stact", "tirads"):
            keep = slice(None) if (m, k) != ("tirads", 1) else slice(0, 9)
            prob = np.clip(label * 0.4 + 0.3 + rng.normal(0, 0.3, 10), 0, 1).round(4)
            pd.DataFrame({"annot_id": ids, "label": label, "prob": prob}).iloc[keep].to_csv(
                d / f"predictions_{m}.csv", index=False
            )
    rows += [
        {
            "annot_id": f"{900 + i}_",
            "risk": 9.0 * (i % 2),
            "tirads_risk": 0.0,
            "hidden_risk": 0.0,
            "label": 1 - i % 2,
        }
        for i in range(n_extra)
    ]  # would spoil the AUROC if they were counted
    truth = pd.DataFrame(rows)
    truth["hidden_risk"] = truth["risk"] - truth["tirads_risk"]
    path = root / "truth.csv"
    truth.to_csv(path, index=False)
    return path, truth


def test_truth_adds_reference_rows_on_the_same_nodules(tmp_path):
    path, truth = truth_beside(tmp_path, np.random.default_rng(0))
    table = report(tmp_path / "runs", tmp_path / "out", n_boot=50, show=False, truth=path, title="STACT-Time")
    csv = pd.read_csv(tmp_path / "out" / "results.csv").set_index("method")
    assert list(table["method"]) == ["tirads", "stact", "bayes_ceiling", "tirads_oracle"]
    assert csv["reference"].tolist() == [False, False, True, True]
    t = truth.set_index("annot_id")
    for m, col in (("bayes_ceiling", "risk"), ("tirads_oracle", "tirads_risk")):
        per_fold, pooled = [], []
        for k in range(3):  # the union of the methods' fold-k test nodules: all 10 (stact has them all)
            ids = [f"{10 * k + i}_" for i in range(10)]
            per_fold.append(roc_auc_score(t.loc[ids, "label"], t.loc[ids, col]))
            pooled += ids
        assert csv.loc[m, "auroc_mean"] == pytest.approx(np.mean(per_fold), abs=1e-5)
        assert csv.loc[m, "auroc_std"] == pytest.approx(np.std(per_fold, ddof=1), abs=1e-5)
        assert csv.loc[m, "auroc_pooled"] == pytest.approx(
            roc_auc_score(t.loc[pooled, "label"], t.loc[pooled, col]), abs=1e-5
        )
        assert csv.loc[m, "n_nodules"] == 30 and csv.loc[m, "n_folds"] == 3
        assert csv.loc[m, "auroc_ci_low"] <= csv.loc[m, "auroc_pooled"] <= csv.loc[m, "auroc_ci_high"]
        for k in ("acc", "precision", "recall", "f1", "specificity"):  # need a probability: not defined
            assert np.isnan(csv.loc[m, f"{k}_mean"])
        assert np.isnan(csv.loc[m, "sens95_threshold"]) and csv.loc[m, "sens95_specificity"] >= 0
    assert (
        csv.loc["bayes_ceiling", "name"] == "Bayes ceiling"
        and csv.loc["tirads_oracle", "name"] == "TI-RADS oracle"
    )
    md = (tmp_path / "out" / "results.md").read_text()
    assert md.startswith("# STACT-Time")
    methods, refs = md.split("## Reference (generator truth)")
    assert "Bayes ceiling" not in methods and "*Bayes ceiling*" in refs and "*TI-RADS oracle*" in refs
    assert len(pd.read_csv(tmp_path / "out" / "predictions.csv")) == 30 + 29  # the methods' rows only


def test_truth_missing_an_id_is_a_data_error_naming_the_file(tmp_path):
    path, truth = truth_beside(tmp_path, np.random.default_rng(1))
    truth[truth["annot_id"] != "13_"].to_csv(path, index=False)
    with pytest.raises(DataError, match="1 test nodule id") as e:
        report(tmp_path / "runs", tmp_path / "out", n_boot=10, show=False, truth=path)
    assert e.value.path == str(path) and "13_" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()  # checked before anything is written
    truth.assign(label=1 - truth["label"]).to_csv(path, index=False)
    with pytest.raises(DataError, match="label differs"):
        report(tmp_path / "runs", tmp_path / "out", n_boot=10, show=False, truth=path)
    truth.drop(columns="tirads_risk").to_csv(path, index=False)
    with pytest.raises(DataError, match="missing column.*tirads_risk"):
        report(tmp_path / "runs", tmp_path / "out", n_boot=10, show=False, truth=path)


def test_cli_truth_and_title_print_reference_rows_below_methods(tmp_path, capsys):
    path, _ = truth_beside(tmp_path, np.random.default_rng(2))
    for k in range(3):  # AsyCMST prediction files carry case ids in annot_id; its names are known
        p = tmp_path / "runs" / f"fold{k}"
        (p / "predictions_stact.csv").rename(p / "predictions_asycmst.csv")
        (p / "predictions_tirads.csv").rename(p / "predictions_asycmst_none.csv")
    parser = argparse.ArgumentParser()
    report_stage.add_parser(parser.add_subparsers())
    args = parser.parse_args(
        [
            "report",
            "--runs",
            str(tmp_path / "runs"),
            "--out",
            str(tmp_path / "rep"),
            "--n-boot",
            "20",
            "--truth",
            str(path),
            "--title",
            "AsyCMST",
        ]
    )
    args.func(args)
    out = capsys.readouterr().out
    assert "AsyCMST: nodule-level results" in out and "AsyCMST (no cross-attention)" in out
    assert (
        out.index("AsyCMST (no cross-attention)")
        < out.index("Bayes ceiling (reference)")
        < out.index("TI-RADS oracle (reference)")
    )
    assert len(out.splitlines()) < 20  # the table and one line naming the files


def test_operating_point_threshold_comes_from_validation_never_from_test(tmp_path):
    from datamodules.atomic import write_predictions

    runs = tmp_path / "runs"
    parts = {  # fold -> (val labels, val probs, test labels, test probs)
        0: ([1, 1, 0, 0], [0.9, 0.6, 0.5, 0.1], [1, 1, 0, 0, 0], [0.7, 0.55, 0.65, 0.3, 0.58]),
        1: ([1, 0], [0.3, 0.2], [1, 0, 1], [0.35, 0.31, 0.2]),
    }
    for k, (vy, vp, ty, tp) in parts.items():
        d = runs / f"fold{k}"
        d.mkdir(parents=True)
        for m in ("stact", "tirads"):
            write_predictions(d / f"predictions_{m}.csv", [f"t{k}_{i}" for i in range(len(ty))], ty, tp)
        write_predictions(d / "val_predictions_stact.csv", [f"v{k}_{i}" for i in range(len(vy))], vy, vp)
    report(runs, tmp_path / "out", n_boot=200, show=False)
    csv = pd.read_csv(tmp_path / "out" / "results.csv").set_index("method")
    r = csv.loc["stact"]
    # Validation thresholds 0.6 (fold 0) and 0.3 (fold 1); on test that calls 2 of 4 malignant and spares 2 of
    # 4 benign.  Thresholds chosen on the test predictions would reach 100% sensitivity and spare 1.
    assert (r["valop_threshold_min"], r["valop_threshold_max"]) == (0.3, 0.6)
    assert r["valop_sensitivity"] == 0.5 and r["valop_specificity"] == 0.5 and r["valop_benign_spared"] == 2
    assert r["valop_sensitivity_low"] <= 0.5 <= r["valop_sensitivity_high"]
    assert np.isnan(csv.loc["tirads", "valop_sensitivity"])  # no validation predictions: no deployable point
    md = (tmp_path / "out" / "results.md").read_text()
    assert "*optimistic*" in md and "| TI-RADS | no validation predictions |" in md
    assert "| STACT-Time | 0.300-0.600 | 0.500 [" in md


def test_report_states_which_masks_the_roi_crops_came_from(tmp_path):
    import h5py

    from datamodules.atomic import write_predictions

    runs = tmp_path / "runs"
    for k, boxes in enumerate(("predicted masks", "predicted masks")):
        (runs / f"fold{k}").mkdir(parents=True)
        write_predictions(runs / f"fold{k}" / "predictions_stact.csv", ["a", "b"], [0, 1], [0.2, 0.7])
        with h5py.File(runs / f"fold{k}" / "embeddings.h5", "w") as f:
            f.attrs["boxes"] = boxes
    report(runs, tmp_path / "out", n_boot=10, show=False)
    assert (
        "Protocol: ROI crops around the fold's *predicted* masks"
        in (tmp_path / "out" / "results.md").read_text()
    )
    with h5py.File(runs / "fold1" / "embeddings.h5", "w") as f:
        f.attrs["boxes"] = "annotated masks"
    report(runs, tmp_path / "out", n_boot=10, show=False)
    assert "different masks in different folds" in (tmp_path / "out" / "results.md").read_text()


def test_delong_matches_roc_auc_and_a_paired_bootstrap():
    from scipy.stats import norm

    from stages.report import delong_test, rank_auroc

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    a = y + rng.normal(0, 0.8, 300)  # the better scorer
    b = y + rng.normal(0, 1.6, 300)
    auc_a, auc_b, p = delong_test(y, a, b)
    assert (auc_a, auc_b) == (pytest.approx(roc_auc_score(y, a)), pytest.approx(roc_auc_score(y, b)))
    # The standard error DeLong implies equals a paired bootstrap's within 15%.
    se_delong = (auc_a - auc_b) / norm.isf(p / 2)
    idx = rng.integers(0, 300, (2000, 300))
    diffs = rank_auroc(y[idx], a[idx]) - rank_auroc(y[idx], b[idx])  # = roc_auc_score, row by row
    assert se_delong == pytest.approx(np.std(diffs), rel=0.15)
    assert delong_test(y, a, a)[2] == 1.0  # the same scores: no difference
    assert delong_test(y, a, 2 * a + 1)[2] == 1.0  # a monotone transform ranks the cases the same
    assert delong_test(y, a, rng.random(300))[2] < 1e-6  # against chance


def test_calibration_columns_and_reliability_diagram(tmp_path):
    from datamodules.atomic import write_predictions

    runs = tmp_path / "runs"
    (runs / "fold0").mkdir(parents=True)
    y, p = [0, 1, 1, 1, 0, 0], [0.1, 0.1, 0.9, 0.9, 0.1, 0.1]
    write_predictions(runs / "fold0" / "predictions_stact.csv", list("abcdef"), y, p)
    write_predictions(
        runs / "fold0" / "predictions_tirads.csv", list("abcdef"), y, [0.5, 0.2, 0.3, 0.8, 0.4, 0.1]
    )
    report(runs, tmp_path / "out", n_boot=10, show=False)
    csv = pd.read_csv(tmp_path / "out" / "results.csv").set_index("method")
    assert csv.loc["stact", "brier"] == pytest.approx(np.mean((np.array(p) - np.array(y)) ** 2), abs=1e-5)
    # ECE, 10 equal-width bins: |0.1 - 1/4| over 4 of 6 cases in the first bin, |0.9 - 1| over 2 in the last.
    assert csv.loc["stact", "ece"] == pytest.approx(4 / 6 * 0.15 + 2 / 6 * 0.1, abs=1e-5)  # CSV: 6 digits
    assert np.isnan(csv.loc["stact", "delong_p"]) and 0 <= csv.loc["tirads", "delong_p"] <= 1
    assert (tmp_path / "out" / "calibration.png").stat().st_size > 0
    assert "DeLong p vs STACT-Time" in (tmp_path / "out" / "results.md").read_text()


# ------------------------------------------------------------------ prediction files validated on read
def _sound_predictions(runs):
    """2 folds of method x (4 nodules each), all sound; returns fold 1's file (the one the tests spoil)."""
    for k in range(2):
        (runs / f"fold{k}").mkdir(parents=True)
        pd.DataFrame(
            {"annot_id": [f"{k}_{i}" for i in range(4)], "label": [0, 1, 0, 1], "prob": [0.1, 0.9, 0.4, 0.7]}
        ).to_csv(runs / f"fold{k}" / "predictions_x.csv", index=False)
    return runs / "fold1" / "predictions_x.csv"


BAD_PREDICTIONS = {
    "duplicate_row": (
        "annot_id,label,prob\n1_0,0,0.1\n1_1,1,0.9\n1_1,1,0.8\n",
        "1 nodule(s) with more than one row (e.g. 1_1)",
    ),
    "logits": (
        "annot_id,label,prob\n1_0,0,-2.3\n1_1,1,1.7\n",
        "prob must be a probability in [0, 1]: 2 row(s) outside it",
    ),
    "prob_above_one": (
        "annot_id,label,prob\n1_0,0,0.2\n1_1,1,1.0001\n",
        "prob must be a probability in [0, 1]",
    ),
    "prob_nan": ("annot_id,label,prob\n1_0,0,nan\n1_1,1,0.9\n", "prob must be a number: 1 row(s)"),
    "prob_empty": ("annot_id,label,prob\n1_0,0,\n1_1,1,0.9\n", "prob must be a number: 1 row(s)"),
    "prob_text": (
        "annot_id,label,prob\n1_0,0,high\n1_1,1,0.9\n",
        "prob must be a number: 1 row(s) are empty, NaN or not numeric (e.g. high)",
    ),
    "prob_inf": ("annot_id,label,prob\n1_0,0,inf\n1_1,1,0.9\n", "prob must be a number"),
    "label_two": (
        "annot_id,label,prob\n1_0,2,0.1\n1_1,1,0.9\n",
        "labels must be 0 or 1: 1 row(s) are not (e.g. 2)",
    ),
    "label_empty": ("annot_id,label,prob\n1_0,,0.1\n1_1,1,0.9\n", "labels must be 0 or 1: 1 row(s)"),
    "label_text": (
        "annot_id,label,prob\n1_0,benign,0.1\n1_1,1,0.9\n",
        "labels must be 0 or 1: 1 row(s) are not (e.g. benign)",
    ),
    "missing_prob": ("annot_id,label\n1_0,0\n1_1,1\n", "missing column(s) prob"),
    "missing_label_and_id": ("id,prob\n1_0,0.1\n", "missing column(s) annot_id, label"),
    "empty_id": ("annot_id,label,prob\n,0,0.1\n1_1,1,0.9\n", "1 row(s) with an empty annot_id"),
    "empty_file": ("", "not a readable CSV"),
}


@pytest.mark.parametrize("case", sorted(BAD_PREDICTIONS))
def test_bad_prediction_file_is_one_line_data_error_before_any_output(tmp_path, case):
    runs = tmp_path / "runs"
    bad = _sound_predictions(runs)
    report(runs, tmp_path / "ok", n_boot=5, show=False)  # the sound files pass
    text, problem = BAD_PREDICTIONS[case]
    bad.write_text(text)
    with pytest.raises(DataError) as e:
        report(runs, tmp_path / "out", n_boot=5, show=False)
    assert e.value.path == str(bad) and "\n" not in str(e.value)
    assert problem in e.value.problem
    assert not (tmp_path / "out").exists()


def test_bad_validation_and_stack_predictions_are_refused_too(tmp_path):
    runs = tmp_path / "runs"
    _sound_predictions(runs)
    val = runs / "fold0" / "val_predictions_x.csv"
    val.write_text("annot_id,label,prob\n9_0,0,0.3\n9_0,0,0.3\n")
    with pytest.raises(DataError, match="val_predictions_x.csv: 1 nodule\\(s\\) with more than one row"):
        report(runs, tmp_path / "out", n_boot=5, show=False)
    val.unlink()
    stack = runs / "fold0" / "stack_predictions_vit.csv"
    stack.write_text(
        "annot_id,stack,label,prob\n0_0,0,0,0.2\n0_0,1,0,0.3\n"
    )  # two stacks of one nodule: fine
    report(runs, tmp_path / "ok", n_boot=5, show=False)
    stack.write_text("annot_id,stack,label,prob\n0_0,0,0,0.2\n0_0,0,0,0.3\n")
    with pytest.raises(DataError, match="more than one row for the same stack"):
        report(runs, tmp_path / "out", n_boot=5, show=False)
    stack.write_text("annot_id,label,prob\n0_0,0,0.2\n")
    with pytest.raises(DataError, match="stack_predictions_vit.csv: missing column\\(s\\) stack"):
        report(runs, tmp_path / "out", n_boot=5, show=False)
    stack.write_text("annot_id,stack,label,prob\n0_0,0,0,3.2\n")
    with pytest.raises(DataError, match="prob must be a probability in \\[0, 1\\]"):
        report(runs, tmp_path / "out", n_boot=5, show=False)


def test_same_fold_twice_is_refused(tmp_path):
    runs = tmp_path / "runs"
    _sound_predictions(runs)
    (runs / "fold01").mkdir()
    (runs / "fold1" / "predictions_x.csv").rename(runs / "fold01" / "predictions_x.csv")
    (runs / "fold1" / "predictions_x.csv").write_text("annot_id,label,prob\n1_0,0,0.1\n1_1,1,0.9\n")
    with pytest.raises(DataError, match="a second file of x fold 1"):
        report(runs, tmp_path / "out", n_boot=5, show=False)


def test_cli_logits_are_one_line_exit_2_naming_the_file(tmp_path, capsys):
    from stages.cli import main

    runs = tmp_path / "runs"
    bad = _sound_predictions(runs)
    bad.write_text("annot_id,label,prob\n1_0,0,-2.3\n1_1,1,1.7\n")
    with pytest.raises(SystemExit) as e:
        main(["report", "--runs", str(runs), "--out", str(tmp_path / "rep"), "--n-boot", "5"])
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith(
        f"error: {bad}: prob must be a probability"
    )
    assert "Traceback" not in captured.err and not (tmp_path / "rep").exists()
