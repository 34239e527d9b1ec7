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
            pd.DataFrame({"annot_id": ids, "label": label, "prob": prob}).to_csv(d / f"predictions_{m}.csv",
                                                                                 index=False)
            truth[(m, k)] = (label, prob)
        stack = pd.DataFrame({"annot_id": np.repeat(ids, 2), "stack": np.tile([0, 1], 12),
                              "label": np.repeat(label, 2), "prob": rng.random(24).round(4)})
        stack.to_csv(d / "stack_predictions_vit.csv", index=False)
        truth[("stack", k)] = stack
    return truth


def test_report_equals_sklearn_mean_std_over_folds(tmp_path):
    truth = hand_made(tmp_path / "runs", np.random.default_rng(0))
    table = report(tmp_path / "runs", tmp_path / "out", n_boot=50, show=False)
    csv = pd.read_csv(tmp_path / "out" / "results.csv").set_index("method")
    assert list(table["method"]) == ["tirads", "stact"]  # paper row order
    for m in ("stact", "tirads"):
        for name, fn in (("acc", accuracy_score), ("precision", precision_score), ("recall", recall_score),
                         ("f1", f1_score), ("auroc", roc_auc_score)):
            per_fold = []
            for k in range(3):
                y, p = truth[(m, k)]
                per_fold.append(fn(y, p) if name == "auroc" else fn(y, (p >= 0.5).astype(int)))
            assert csv.loc[m, f"{name}_mean"] == pytest.approx(np.mean(per_fold), abs=1e-5)
            assert csv.loc[m, f"{name}_std"] == pytest.approx(np.std(per_fold, ddof=1), abs=1e-5)
        y = np.concatenate([truth[(m, k)][0] for k in range(3)])
        p = np.concatenate([truth[(m, k)][1] for k in range(3)])
        assert csv.loc[m, "auroc_pooled"] == pytest.approx(roc_auc_score(y, p), abs=1e-5)
        assert csv.loc[m, "auroc_ci_low"] <= csv.loc[m, "auroc_pooled"] <= csv.loc[m, "auroc_ci_high"]
    # Table 3: stack and nodule (mean of stacks) level for the backbone.
    stack = pd.read_csv(tmp_path / "out" / "results_stack.csv").set_index("backbone")
    accs = [accuracy_score(s["label"], s["prob"] >= 0.5) for s in (truth[("stack", k)] for k in range(3))]
    assert stack.loc["vit", "stack_acc_mean"] == pytest.approx(np.mean(accs), abs=1e-5)
    nod = [truth[("stack", k)].groupby("annot_id").agg(label=("label", "first"), prob=("prob", "mean"))
           for k in range(3)]
    assert stack.loc["vit", "nodule_auroc_mean"] == pytest.approx(
        np.mean([roc_auc_score(n["label"], n["prob"]) for n in nod]), abs=1e-5)
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
            runs / f"fold{k}" / "predictions_x.csv", index=False)
    table = report(runs, tmp_path / "out", n_boot=10, show=False).set_index("method")
    assert table.loc["x", "auroc_folds"] == 1 and table.loc["x", "auroc_mean"] == 1.0
    assert table.loc["x", "acc_folds"] == 2
    with pytest.raises(DataError, match="no fold"):
        report(tmp_path / "out", tmp_path / "out2", show=False)


def test_cli_prints_table(tmp_path, capsys):
    hand_made(tmp_path / "runs", np.random.default_rng(1))
    parser = argparse.ArgumentParser()
    report_stage.add_parser(parser.add_subparsers())
    args = parser.parse_args(["report", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "rep"),
                              "--n-boot", "20"])
    args.func(args)
    out = capsys.readouterr().out
    assert "STACT-Time" in out and "Nodule AUROC" in out
