"""``usnodule report``: cross-validated results of every method, like STACT-Time Tables 2-4.

Reads ``<runs>/fold<k>/predictions_<method>.csv`` (``annot_id,label,prob``; one row per test nodule of fold k)
and, when present, ``stack_predictions_<backbone>.csv`` (``annot_id,stack,label,prob``). Writes to ``--out``:

* ``results.md`` / ``results.csv`` -- one row per method: nodule ACC, precision, recall, F1, AUROC (and
  specificity) as mean ± std over folds; precision/recall/F1 twice, labelled: the malignant class's, and
  support-weighted over both classes ("(w)", ``*_w`` in the CSV) as the paper's Table 2 appears to be (sample std, ddof = 1; threshold 0.5, scikit-learn metrics), like
  Table 2; pooled AUROC with a bootstrap 95% CI (percentile, ``--n-boot`` resamples of the pooled nodules,
  seeded); the operating point at 95% sensitivity on the pooled predictions: threshold, specificity and the
  number of benign nodules spared a biopsy (benign nodules scored below the threshold);
* ``results_stack.csv`` and a Table-3-style section -- stack ("Frame") and nodule ACC/AUROC per backbone
  (nodule = mean of the stack probabilities);
* the deployable operating point (``valop_*`` in results.csv), for methods that also wrote
  ``fold<k>/val_predictions_<method>.csv`` (``usnodule baselines`` does): per fold the 95%-sensitivity
  threshold of the *validation* predictions, applied to the test nodules; realised test sensitivity and
  specificity pooled with bootstrap CIs, benign nodules spared (:func:`validation_operating_point`); the
  pooled-test operating point above is labelled optimistic (its threshold is chosen on the test predictions);
* calibration (Brier score, ECE over 10 bins, ``calibration.png`` reliability diagram) and a paired DeLong
  test of the paper's method against each other one, on the pooled predictions (:func:`calibration_table`);
* a "Protocol:" line in ``results.md``, read from the folds' ``embeddings.h5``: which masks the test-time ROI
  crops came from (:func:`roi_protocol`) and whether the heads trained on in-sample or cross-fitted
  embeddings (:func:`stacking_protocol`);
* ``roc.png`` -- one ROC curve per method, predictions pooled over folds;
* ``predictions.csv`` -- every per-nodule prediction (method, fold, annot_id, label, prob);
* ``report.html`` -- one self-contained page (images embedded): the tables above, ``roc.png``,
  ``calibration.png`` and a gallery of the paper's method's test nodules sorted by error (ROI crops with the
  predicted and drawn masks when the frames can be found: ``--cine`` or the folds' ``embeddings.h5``, and
  ``fold<k>/masks.h5``; numbers only otherwise), the ``--gallery`` largest errors (:mod:`datamodules.report_html`);
* with ``--wandb``: one W&B summary run (project ``usnodule``, group = the experiment, job_type ``report``;
  offline unless ``WANDB_MODE``/credentials say otherwise, under ``--out``/wandb) holding the Table-2 table, the
  Table-3 table, the per-nodule predictions and the pooled ROC as an image, and each method's numbers in the
  run summary (``<method>/<metric>``).

A fold whose test part holds one class has an undefined AUROC; it is left out of that mean (``n_folds`` says
how many folds each mean used).

``--truth FILE`` (a synthetic set's ``truth.csv``, written by ``usnodule synth`` and read by no other stage)
adds two reference rows, scored on exactly the test nodules of each fold that the methods' prediction files
list (every id must be in FILE, with the same label): **Bayes ceiling** (score = the generator's clean risk,
the log-odds before the label noise) and **TI-RADS oracle** (score = its TI-RADS-and-age part, with the
generator's own weights).  They show what the data allows, next to what each method reached.  Their scores are
log-odds up to an unknown intercept, not probabilities, so the metrics at threshold 0.5 (ACC, precision,
recall, F1, specificity) and the 95%-sensitivity threshold are NaN/"–"; AUROC (mean ± std over folds, pooled
with its bootstrap CI) and the specificity / benign nodules spared at 95% sensitivity, which depend on the
ranking only, are shown.  They sit in their own section of ``results.md`` ("Reference (generator truth)"),
below the methods in the terminal table and in ``roc.png`` (dashed), and have ``reference = True`` in
``results.csv`` (False for methods).  ``--title`` names the report (heading of ``results.md``, the terminal
table and ``roc.png``), e.g. "STACT-Time" or "AsyCMST" when one experiment yields two reports.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score, roc_curve

from datamodules.atomic import atomic_path
from datamodules.errors import DataError
from datamodules.predictions import (  # noqa: F401  (re-exported: the report's metrics live there)
    FOLD_DIR,
    binary_metrics,
    bootstrap_auroc,
    mean_std,
    rank_auroc,
    read_predictions,
)
from stages.options import positive_int, seed

METRICS = ("acc", "precision", "recall", "f1", "auroc", "specificity", "precision_w", "recall_w", "f1_w")
TABLE_METRICS = ("acc", "precision", "recall", "f1", "auroc")
# Support-weighted over both classes, as STACT-Time's Table 2 appears to report them: two of its rows have
# recall exactly equal to ACC (weighted recall always equals accuracy), and a per-fold malignant recall of
# 0.88 ± 0.01 is impossible with 3-4 malignant nodules per test fold.
WEIGHTED_METRICS = ("acc", "precision_w", "recall_w", "f1_w", "auroc")
HEADERS = {
    "acc": "Nodule ACC",
    "precision": "Nodule Precision",
    "recall": "Nodule Recall",
    "f1": "Nodule F1",
    "auroc": "Nodule AUROC",
    "specificity": "Nodule Specificity",
    "precision_w": "Nodule Precision (w)",
    "recall_w": "Nodule Recall (w)",
    "f1_w": "Nodule F1 (w)",
}
# Display names and the paper's row order (Table 2, then Table 4 variants); unknown methods follow by name.
NAMES = {
    "cinecnn_avepool": "CineCNN-AvePool",
    "cinecnn_trans": "CineCNN-Trans",
    "tirads": "TI-RADS",
    "seg_self": "Seg + Self",
    "vit_self": "ViT + Self",
    "joint": "Joint fusion",
    "stact": "STACT-Time",
    "asycmst": "AsyCMST",
    "asycmst_none": "AsyCMST (no cross-attention)",
    "twostage": "Two-stage (TransUNet -> ResNet-18)",
    "twostage_annotated": "Two-stage, annotated ROI",
    "shape_forest": "Shape forest (RF)",
    "csasn": "CSASN",
    "feature_forest": "Feature forest (RF, shape + texture)",
}
# Reference rows from a synthetic set's truth.csv (``--truth``): method key -> (display name, score column).
REFERENCES = {"bayes_ceiling": ("Bayes ceiling", "risk"), "tirads_oracle": ("TI-RADS oracle", "tirads_risk")}
# Metrics that need a probability (threshold 0.5): not defined for the reference rows' log-odds scores.
THRESHOLDED = ("acc", "precision", "recall", "f1", "specificity", "precision_w", "recall_w", "f1_w")
BACKBONES = {"vit": "ViT Backbone", "seg": "Segmentation Backbone", "joint": "Joint Fusion Backbone"}


# ---------------------------------------------------------------------------------------------- metrics
def lead(keys: tuple[str, ...], first: str | None) -> tuple[str, ...]:
    """``keys`` with the one ending in ``first`` moved to the front (``--first f1``: F1 first, as the two-stage
    paper reports; ``f1`` also leads the weighted table with ``f1_w``); unchanged for ``None``."""
    if first is None:
        return keys
    hit = [k for k in keys if k == first or k == f"{first}_w"]
    return (*hit, *[k for k in keys if k not in hit])


def at_sensitivity(label: np.ndarray, prob: np.ndarray, target: float = 0.95) -> dict[str, float]:
    """The highest threshold whose sensitivity is >= target: its specificity and the benign nodules spared."""
    label, prob = np.asarray(label, int), np.asarray(prob, float)
    n_benign = int((label == 0).sum())
    if len(np.unique(label)) < 2:
        return {
            "threshold": float("nan"),
            "sensitivity": float("nan"),
            "specificity": float("nan"),
            "benign_spared": float("nan"),
            "n_benign": n_benign,
        }
    fpr, tpr, thr = roc_curve(label, prob, drop_intermediate=False)
    i = int(np.argmax(tpr >= target - 1e-12))  # tpr rises as the threshold falls: first index reaching target
    t = float(min(thr[i], 1.0)) if np.isfinite(thr[i]) else 1.0
    return {
        "threshold": t,
        "sensitivity": float(tpr[i]),
        "specificity": float(1 - fpr[i]),
        "benign_spared": int(((label == 0) & (prob < thr[i])).sum()),
        "n_benign": n_benign,
    }


def validation_operating_point(
    preds: pd.DataFrame, vals: pd.DataFrame, target: float = 0.95, n_boot: int = 1000, seed: int = 0
) -> pd.DataFrame:
    """The deployable operating point of each method that has validation predictions for all its test folds.

    Per fold k: the threshold is :func:`at_sensitivity`'s on fold k's *validation* predictions (never its test
    ones), applied to fold k's test nodules; the realised test sensitivity and specificity are pooled over
    folds, with percentile bootstrap 95% CIs over the nodules (``scipy.stats.bootstrap``, thresholds held fixed),
    and the benign test nodules scored below their fold's threshold (biopsies spared).
    """
    from scipy.stats import bootstrap

    def ci(x: np.ndarray) -> tuple[float, float]:
        if len(x) < 2 or n_boot <= 0 or x.min() == x.max():  # a constant sample has a point CI
            return (float(x.mean()), float(x.mean())) if len(x) else (float("nan"), float("nan"))
        r = bootstrap((x,), np.mean, n_resamples=n_boot, method="percentile", random_state=seed)
        return float(r.confidence_interval.low), float(r.confidence_interval.high)

    rows = []
    for m in method_order(preds["method"].unique()):
        test, val = preds[preds["method"] == m], vals[vals["method"] == m]
        folds = sorted(test["fold"].unique())
        thresholds, labels, called = [], [], []
        for k in folds:
            v, t = val[val["fold"] == k], test[test["fold"] == k]
            thr = at_sensitivity(v["label"], v["prob"], target)["threshold"] if len(v) else float("nan")
            if np.isnan(thr):  # no validation predictions, or one class in them: no threshold to carry over
                break
            thresholds.append(thr)
            labels.append(t["label"].to_numpy(int))
            called.append(t["prob"].to_numpy(float) >= thr)
        else:
            y, c = np.concatenate(labels), np.concatenate(called)
            hit, spared = c[y == 1].astype(float), (~c[y == 0]).astype(float)
            (s_lo, s_hi), (p_lo, p_hi) = ci(hit), ci(spared)
            rows.append(
                {
                    "method": m,
                    "valop_threshold_min": min(thresholds),
                    "valop_threshold_max": max(thresholds),
                    "valop_sensitivity": hit.mean() if len(hit) else float("nan"),
                    "valop_sensitivity_low": s_lo,
                    "valop_sensitivity_high": s_hi,
                    "valop_specificity": spared.mean() if len(spared) else float("nan"),
                    "valop_specificity_low": p_lo,
                    "valop_specificity_high": p_hi,
                    "valop_benign_spared": int(spared.sum()),
                }
            )
    return pd.DataFrame(rows)


def roi_protocol(runs: Path) -> str | None:
    """Which masks the test-time ROI crops came from, read from every fold's ``embeddings.h5`` (its ``boxes``
    attribute): a line for the report, ``None`` when the runs have no embeddings (AsyCMST)."""
    import h5py

    found = set()
    for path in sorted(runs.glob("fold*/embeddings.h5")):
        with h5py.File(path, "r") as f:
            found.add(str(f.attrs.get("boxes", "unknown")))
    if not found:
        return None
    if found == {"predicted masks"}:
        return "ROI crops around the fold's *predicted* masks (deployable protocol: what `usnodule predict` does)"
    if found == {"annotated masks"}:
        return (
            "ROI crops around the radiologists' *annotated* masks (the paper's protocol; a new clip has no "
            "annotation, so `usnodule predict` cannot do this)"
        )
    return f"ROI crops from different masks in different folds ({', '.join(sorted(found))}): not comparable"


def stacking_protocol(runs: Path) -> str | None:
    """How the heads' training embeddings were made, read from every fold's ``embeddings.h5`` (its ``stacking``
    attribute; files written before it existed are in-sample): a line for the report, ``None`` without
    embeddings (AsyCMST)."""
    import h5py

    found = set()
    for path in sorted(runs.glob("fold*/embeddings.h5")):
        with h5py.File(path, "r") as f:
            found.add(str(f.attrs.get("stacking", "in-sample")))
    if not found:
        return None
    if found == {"in-sample"}:
        return (
            "heads trained on *in-sample* embeddings (their encoders were fitted on the same training nodules; "
            "the default)"
        )
    if found == {"cross-fitted"}:
        return (
            "heads trained on *cross-fitted* embeddings (`CROSSFIT=1`: each training nodule embedded by the "
            "encoders of the other half of its fold's training part; validation and test predictions averaged "
            "over both halves' encoders)"
        )
    return f"heads trained on embeddings made differently in different folds ({', '.join(sorted(found))})"


def delong_test(label: np.ndarray, prob_a: np.ndarray, prob_b: np.ndarray) -> tuple[float, float, float]:
    """Paired DeLong test of two AUROCs on the same cases: ``(auroc_a, auroc_b, two-sided p)``.

    DeLong et al. 1988 with the fast midrank algorithm of Sun & Xu 2014 (IEEE SPL 21:1389): structural components
    from midranks, their covariance over the positives and the negatives, z = difference / its standard error.
    Neither scipy nor scikit-learn has it; p is 1.0 when the two score sets rank the cases identically.
    """
    from scipy.stats import norm, rankdata

    label = np.asarray(label, int)
    pos, neg = label == 1, label == 0
    m, n = int(pos.sum()), int(neg.sum())
    if m < 2 or n < 2:
        return float("nan"), float("nan"), float("nan")
    aucs, v10, v01 = [], [], []
    for prob in (np.asarray(prob_a, float), np.asarray(prob_b, float)):
        x, y = prob[pos], prob[neg]
        tz = rankdata(np.concatenate([x, y]))
        tx, ty = rankdata(x), rankdata(y)
        aucs.append((tz[:m].sum() - m * (m + 1) / 2) / (m * n))
        v10.append((tz[:m] - tx) / n)  # per positive: share of negatives it outranks
        v01.append(1.0 - (tz[m:] - ty) / m)  # per negative: share of positives that outrank it
    s = np.cov(np.vstack(v10)) / m + np.cov(np.vstack(v01)) / n
    var = s[0, 0] + s[1, 1] - 2 * s[0, 1]
    diff = aucs[0] - aucs[1]
    if var <= 1e-15:
        return float(aucs[0]), float(aucs[1]), 1.0 if abs(diff) < 1e-12 else 0.0
    return float(aucs[0]), float(aucs[1]), float(2 * norm.sf(abs(diff) / np.sqrt(var)))


def calibration_table(preds: pd.DataFrame, n_bins: int = 10) -> pd.DataFrame:
    """Per method, on the predictions pooled over folds: Brier score (scikit-learn), expected calibration error
    (torchmetrics' ``binary_calibration_error``, ``n_bins`` equal-width bins, L1), and a paired DeLong test of
    the paper's method (STACT-Time, else AsyCMST, else the first) against each other method on the same nodules.
    """
    import torch
    from sklearn.metrics import brier_score_loss
    from torchmetrics.functional.classification import binary_calibration_error

    methods = method_order(preds["method"].unique())
    ref = next((m for m in ("stact", "asycmst") if m in methods), methods[0])
    wide = preds.pivot_table(index=["fold", "annot_id"], columns="method", values="prob")
    labels = preds.drop_duplicates(["fold", "annot_id"]).set_index(["fold", "annot_id"])["label"]
    rows = []
    for m in methods:
        df = preds[preds["method"] == m]
        y, p = df["label"].to_numpy(int), df["prob"].to_numpy(float)
        ece = binary_calibration_error(torch.tensor(p), torch.tensor(y), n_bins=n_bins, norm="l1")
        row = {"method": m, "brier": brier_score_loss(y, p), "ece": float(ece), "delong_vs": ref}
        row["delong_p"] = float("nan")
        if m != ref:
            both = wide[[ref, m]].dropna()
            y_both = labels.loc[both.index].to_numpy()
            row["delong_p"] = delong_test(y_both, both[ref].to_numpy(), both[m].to_numpy())[2]
        rows.append(row)
    return pd.DataFrame(rows)


def plot_reliability(preds: pd.DataFrame, path: Path, title: str | None = None, n_bins: int = 10) -> None:
    """Reliability diagram: observed malignant fraction against mean predicted probability, per method
    (scikit-learn's ``calibration_curve``, equal-width bins, predictions pooled over folds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.calibration import calibration_curve

    fig, ax = plt.subplots(figsize=(5, 5), dpi=120)
    for m in method_order(preds["method"].unique()):
        df = preds[preds["method"] == m]
        frac, mean = calibration_curve(df["label"], df["prob"], n_bins=n_bins)
        ax.plot(mean, frac, marker="o", ms=3, label=NAMES.get(m, m))
    _save_unit_plot(
        fig,
        ax,
        path,
        "mean predicted probability",
        "observed malignant fraction",
        "calibration",
        title,
        "upper left",
    )


# ---------------------------------------------------------------------------------------------- reading
def read_truth(path: str | os.PathLike) -> pd.DataFrame:
    """A synthetic set's ``truth.csv`` indexed by its id column (``annot_id`` or ``case_id``): risk,
    tirads_risk and label (other columns kept)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            path,
            "truth file does not exist (usnodule synth writes <out>/stanford/truth.csv and "
            "<out>/paired/truth.csv)",
        )
    try:
        df = pd.read_csv(path, dtype={"annot_id": str, "case_id": str})
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise DataError(
            path, f"not a readable CSV ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from e
    key = next((c for c in ("annot_id", "case_id") if c in df.columns), None)
    need = {"risk", "tirads_risk", "label"}
    if key is None or need - set(df.columns):
        missing = sorted(need - set(df.columns)) + ([] if key else ["annot_id or case_id"])
        raise DataError(path, f"missing column(s) {', '.join(missing)}")
    if df[key].isna().any() or df[key].duplicated().any():
        raise DataError(path, f"{key} must be unique and non-empty")
    for c in ("risk", "tirads_risk"):
        if not pd.api.types.is_numeric_dtype(df[c]) or df[c].isna().any():
            raise DataError(path, f"every {c} must be a number")
    if not df["label"].isin([0, 1]).all():
        raise DataError(path, "labels must be 0/1")
    return df.set_index(key)


def reference_predictions(preds: pd.DataFrame, truth_path: str | os.PathLike) -> pd.DataFrame:
    """The reference rows' scores (``REFERENCES``) on the (fold, annot_id) pairs of the methods' predictions, in
    the shape of ``preds`` (``prob`` holds the risk score, not a probability)."""
    truth = read_truth(truth_path)
    nod = preds[["fold", "annot_id", "label"]].drop_duplicates(["fold", "annot_id"]).reset_index(drop=True)
    missing = sorted(set(nod["annot_id"]) - set(truth.index))
    if missing:
        raise DataError(
            truth_path,
            f"{len(missing)} test nodule id(s) of the predictions not in it (e.g. "
            f"{', '.join(missing[:3])}): the truth.csv of another data set?",
        )
    t = truth.loc[nod["annot_id"]]
    differ = nod.loc[t["label"].to_numpy() != nod["label"].to_numpy(), "annot_id"]
    if len(differ):
        raise DataError(
            truth_path,
            f"label differs from the predictions' for {differ.nunique()} nodule(s) (e.g. "
            f"{', '.join(sorted(set(differ))[:3])}): the truth.csv of another data set?",
        )
    frames = [nod.assign(method=m, prob=t[col].to_numpy()) for m, (_, col) in REFERENCES.items()]
    return pd.concat(frames, ignore_index=True)[["method", "fold", "annot_id", "label", "prob"]]


def reference_table(refs: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Rows of the reference scores: AUROC and the 95%-sensitivity point; thresholded metrics NaN."""
    rows = []
    for m, (name, _) in REFERENCES.items():
        row = _method_row(refs, m, n_boot, seed)
        row.update(name=name, reference=True, sens95_threshold=float("nan"))
        for k in THRESHOLDED:
            row[f"{k}_mean"], row[f"{k}_std"], row[f"{k}_folds"] = float("nan"), float("nan"), 0
        rows.append(row)
    return pd.DataFrame(rows)


def method_order(methods) -> list[str]:
    known = [m for m in NAMES if m in set(methods)]
    return known + sorted(set(methods) - set(known))


# ---------------------------------------------------------------------------------------------- tables
def nodule_table(preds: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """One row per method: per-fold metrics as mean/std, pooled AUROC + CI, the 95%-sensitivity point."""
    from rich.progress import Progress

    rows = []
    methods = method_order(preds["method"].unique())
    # A bar on a terminal only (the bootstrap is the slow part); nothing in CI logs / make output.
    with Progress(transient=True, disable=not sys.stdout.isatty()) as bar:
        task = bar.add_task("report", total=len(methods))
        for m in methods:
            rows.append(_method_row(preds, m, n_boot, seed))
            bar.advance(task)
    return pd.DataFrame(rows)


def _method_row(preds: pd.DataFrame, m: str, n_boot: int, seed: int) -> dict:
    """Table-2 row of one method (see :func:`nodule_table`)."""
    df = preds[preds["method"] == m]
    per_fold = [binary_metrics(g["label"], g["prob"]) for _, g in df.groupby("fold")]
    row = {
        "method": m,
        "name": NAMES.get(m, m),
        "reference": False,
        "n_folds": df["fold"].nunique(),
        "n_nodules": len(df),
    }
    for k in METRICS:
        row[f"{k}_mean"], row[f"{k}_std"], row[f"{k}_folds"] = mean_std([f[k] for f in per_fold])
    y, p = df["label"].to_numpy(), df["prob"].to_numpy()
    row["auroc_pooled"] = roc_auc_score(y, p) if len(np.unique(y)) == 2 else float("nan")
    row["auroc_ci_low"], row["auroc_ci_high"] = bootstrap_auroc(y, p, n_boot, seed)
    op = at_sensitivity(y, p, 0.95)
    row.update(
        {
            "sens95_threshold": op["threshold"],
            "sens95_sensitivity": op["sensitivity"],
            "sens95_specificity": op["specificity"],
            "sens95_benign_spared": op["benign_spared"],
            "n_benign": op["n_benign"],
        }
    )
    return row


def stack_table(stacks: pd.DataFrame) -> pd.DataFrame:
    """Table 3: stack ("Frame") and nodule (mean of stacks) ACC / AUROC per backbone, mean/std over folds."""
    rows = []
    present = set(stacks["method"].unique())
    for b in [b for b in BACKBONES if b in present] + sorted(present - set(BACKBONES)):
        df = stacks[stacks["method"] == b]
        per_fold = []
        for _, g in df.groupby("fold"):
            nod = g.groupby("annot_id").agg(label=("label", "first"), prob=("prob", "mean"))
            s, n = binary_metrics(g["label"], g["prob"]), binary_metrics(nod["label"], nod["prob"])
            per_fold.append(
                {
                    "stack_acc": s["acc"],
                    "nodule_acc": n["acc"],
                    "stack_auroc": s["auroc"],
                    "nodule_auroc": n["auroc"],
                }
            )
        row = {"backbone": b, "name": BACKBONES.get(b, b), "n_folds": df["fold"].nunique()}
        for k in ("stack_acc", "nodule_acc", "stack_auroc", "nodule_auroc"):
            row[f"{k}_mean"], row[f"{k}_std"], _ = mean_std([f[k] for f in per_fold])
        rows.append(row)
    return pd.DataFrame(rows)


def pm(mean: float, std: float) -> str:
    return "-" if np.isnan(mean) else f"{mean:.2f} ± {std:.2f}"


def _fold_table(table: pd.DataFrame, keys: tuple[str, ...]) -> list[str]:
    """Markdown rows of ``keys`` as mean ± std over folds, one row per method."""
    lines = [
        "| Method | " + " | ".join(HEADERS[k] for k in keys) + " | folds |",
        "|---" * (len(keys) + 2) + "|",
    ]
    for _, r in table.iterrows():
        cells = [pm(r[f"{k}_mean"], r[f"{k}_std"]) for k in keys]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + f" | {r['n_folds']} |")
    return lines


def markdown(
    table: pd.DataFrame,
    stack: pd.DataFrame,
    runs: Path,
    title: str | None = None,
    truth: Path | None = None,
    protocol: str | None = None,
    first: str | None = None,
) -> str:
    refs, table = table[table["reference"]], table[~table["reference"]]  # every row says (_method_row)
    lines = [
        f"# {title}: results ({runs})" if title else f"# Results: {runs}",
        "",
        "Nodule-level metrics, mean ± std (ddof 1) over cross-validation folds, threshold 0.5 (Table 2).",
        "",
        *([f"Protocol: {protocol}.", ""] if protocol else []),
        *_fold_table(table, lead(TABLE_METRICS, first)),
        "",
        "Precision, recall and F1 above are the malignant class's. Weighted by class support over both "
        "classes, as the paper's Table 2 appears to be (its weighted recall equals ACC): compare these with "
        "the paper.",
        "",
        *_fold_table(table, lead(WEIGHTED_METRICS, first)),
    ]
    lines += [
        "",
        "Pooled over folds: AUROC with bootstrap 95% CI, and the operating point at 95% sensitivity "
        "(benign nodules whose biopsy would be spared) -- *optimistic*: its threshold is chosen on these test "
        "predictions themselves; the deployable one, chosen on validation, follows.",
        "",
        "| Method | Pooled AUROC [95% CI] | Threshold | Sensitivity | Specificity | Benign spared |",
        "|---|---|---|---|---|---|",
    ]
    for _, r in table.iterrows():
        auc = (
            "-"
            if np.isnan(r["auroc_pooled"])
            else (f"{r['auroc_pooled']:.3f} [{r['auroc_ci_low']:.3f}, {r['auroc_ci_high']:.3f}]")
        )
        if np.isnan(r["sens95_specificity"]):
            op = ["-", "-", "-", "-"]
        else:
            op = [
                f"{r['sens95_threshold']:.3f}",
                f"{r['sens95_sensitivity']:.3f}",
                f"{r['sens95_specificity']:.3f}",
                f"{int(r['sens95_benign_spared'])} / {int(r['n_benign'])}",
            ]
        lines.append(f"| {r['name']} | {auc} | " + " | ".join(op) + " |")
    lines += [
        "",
        "Operating point chosen on validation (deployable): per fold, the threshold that reaches 95% "
        "sensitivity on that fold's validation nodules, applied to its test nodules; realised test "
        "sensitivity and specificity pooled over folds, bootstrap 95% CIs.",
        "",
        "| Method | Thresholds (folds) | Test sensitivity [95% CI] | Test specificity [95% CI] | Benign spared |",
        "|---|---|---|---|---|",
    ]
    for _, r in table.iterrows():
        if "valop_sensitivity" not in r or np.isnan(r["valop_sensitivity"]):
            lines.append(f"| {r['name']} | no validation predictions | - | - | - |")
            continue
        lines.append(
            f"| {r['name']} | {r['valop_threshold_min']:.3f}-{r['valop_threshold_max']:.3f} "
            f"| {r['valop_sensitivity']:.3f} [{r['valop_sensitivity_low']:.3f}, {r['valop_sensitivity_high']:.3f}] "
            f"| {r['valop_specificity']:.3f} [{r['valop_specificity_low']:.3f}, {r['valop_specificity_high']:.3f}] "
            f"| {int(r['valop_benign_spared'])} / {int(r['n_benign'])} |"
        )
    ref = table["delong_vs"].iloc[0] if len(table) else None
    lines += [
        "",
        "Calibration (pooled over folds; calibration.png: reliability diagram) and a paired DeLong test of "
        f"{NAMES.get(ref, ref)}'s pooled AUROC against each method on the same nodules.",
        "",
        f"| Method | Brier | ECE (10 bins) | DeLong p vs {NAMES.get(ref, ref)} |",
        "|---|---|---|---|",
    ]
    for _, r in table.iterrows():
        p_value = "-" if np.isnan(r["delong_p"]) else f"{r['delong_p']:.3f}"
        lines.append(f"| {r['name']} | {r['brier']:.3f} | {r['ece']:.3f} | {p_value} |")
    if len(refs):
        lines += [
            "",
            "## Reference (generator truth)",
            "",
            f"Not methods: scores from the synthetic generator's `{truth}` on the same test nodules of each "
            "fold. *Bayes ceiling* = the clean risk (log-odds before the label noise: what the data allows; "
            "a method can beat it only by chance); *TI-RADS oracle* = its TI-RADS-and-age part with the "
            "generator's own weights (what the metadata allows). The scores are not probabilities, so the "
            "metrics at threshold 0.5 are not defined (–).",
            "",
            "| Reference | Nodule AUROC | Pooled AUROC [95% CI] | Specificity @95% sens | Benign spared "
            "| folds | nodules |",
            "|---|---|---|---|---|---|---|",
        ]
        for _, r in refs.iterrows():
            auc = (
                "-"
                if np.isnan(r["auroc_pooled"])
                else (f"{r['auroc_pooled']:.3f} [{r['auroc_ci_low']:.3f}, {r['auroc_ci_high']:.3f}]")
            )
            spec, spared = (
                ("-", "-")
                if np.isnan(r["sens95_specificity"])
                else (
                    f"{r['sens95_specificity']:.3f}",
                    f"{int(r['sens95_benign_spared'])} / {int(r['n_benign'])}",
                )
            )
            lines.append(
                f"| *{r['name']}* | {pm(r['auroc_mean'], r['auroc_std'])} | {auc} | {spec} | {spared} "
                f"| {r['n_folds']} | {r['n_nodules']} |"
            )
    if len(stack):
        lines += [
            "",
            'Backbones, stack ("Frame") and nodule level (nodule = mean of stack probabilities), '
            "mean ± std over folds (Table 3).",
            "",
            "| Backbone | Frame ACC | Nodule ACC | Frame AUROC | Nodule AUROC |",
            "|---|---|---|---|---|",
        ]
        for _, r in stack.iterrows():
            cells = [
                pm(r[f"{k}_mean"], r[f"{k}_std"])
                for k in ("stack_acc", "nodule_acc", "stack_auroc", "nodule_auroc")
            ]
            lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Files: results.csv (all numbers), results_stack.csv, roc.png, calibration.png, predictions.csv.",
        "",
    ]
    return "\n".join(lines)


def plot_roc(
    preds: pd.DataFrame, path: Path, refs: pd.DataFrame | None = None, title: str | None = None
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5), dpi=120)
    for m in method_order(preds["method"].unique()):
        df = preds[preds["method"] == m]
        if df["label"].nunique() < 2:
            continue
        fpr, tpr, _ = roc_curve(df["label"], df["prob"])
        ax.plot(fpr, tpr, label=f"{NAMES.get(m, m)} (AUROC {roc_auc_score(df['label'], df['prob']):.2f})")
    for (m, (name, _)), color in zip(REFERENCES.items(), ("black", "dimgrey"), strict=True):
        df = refs[refs["method"] == m] if refs is not None else None
        if df is None or df["label"].nunique() < 2:
            continue
        fpr, tpr, _ = roc_curve(df["label"], df["prob"])
        ax.plot(
            fpr,
            tpr,
            color=color,
            lw=1.0,
            ls=(0, (4, 2)),
            label=f"{name}, reference (AUROC {roc_auc_score(df['label'], df['prob']):.2f})",
        )
    _save_unit_plot(fig, ax, path, "1 - specificity", "sensitivity", "ROC", title, "lower right")


def _save_unit_plot(fig, ax, path: Path, xlabel: str, ylabel: str, what: str, title: str | None, legend: str):
    """The frame both report plots share: unit square, chance diagonal, labels, legend; saved atomically."""
    import matplotlib.pyplot as plt

    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    heading = f"{what}, pooled over folds"
    ax.set(
        xlabel=xlabel,
        ylabel=ylabel,
        xlim=(0, 1),
        ylim=(0, 1),
        title=f"{title}: {heading}" if title else heading[0].upper() + heading[1:],
    )
    ax.legend(loc=legend, fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)


def print_table(table: pd.DataFrame, title: str, first: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    keys = lead(TABLE_METRICS, first)
    t = Table(title=title)
    t.add_column("Method")
    for k in keys:
        t.add_column(HEADERS[k], justify="right")
    t.add_column("Spec @95% sens", justify="right")
    refs = table["reference"]
    for _, r in table[~refs].iterrows():
        spec = "-" if np.isnan(r["sens95_specificity"]) else f"{r['sens95_specificity']:.2f}"
        t.add_row(r["name"], *[pm(r[f"{k}_mean"], r[f"{k}_std"]) for k in keys], spec)
    if refs.any():
        t.add_section()
        for _, r in table[refs].iterrows():
            spec = "-" if np.isnan(r["sens95_specificity"]) else f"{r['sens95_specificity']:.2f}"
            cells = ["–" if k in THRESHOLDED else pm(r[f"{k}_mean"], r[f"{k}_std"]) for k in keys]
            t.add_row(f"{r['name']} (reference)", *cells, spec, style="italic")
    import sys

    # Not a terminal (CI log, make output): wide enough that method names and "mean ± std" do not wrap.
    Console(width=None if sys.stdout.isatty() else 150).print(t)


def wandb_mode() -> str:
    """The user's ``WANDB_MODE`` if set, else online with credentials, else offline (as the fits log)."""
    return os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")


def log_wandb(
    out: Path, exp: str, table: pd.DataFrame, stack: pd.DataFrame, preds: pd.DataFrame, runs: Path
) -> Path | None:
    """One W&B summary run of the cross-validation (module docstring); returns its local run folder."""
    import wandb

    run = wandb.init(
        project="usnodule",
        group=exp,
        job_type="report",
        name=f"report-{exp}",
        dir=str(out),
        mode=wandb_mode(),
        config={"runs": str(runs), "exp": exp},
        reinit="create_new",
    )
    try:
        media = {
            "report/results": wandb.Table(dataframe=table),
            "report/predictions": wandb.Table(dataframe=preds.sort_values(["method", "fold", "annot_id"])),
            "report/roc": wandb.Image(str(out / "roc.png"), caption="ROC pooled over folds"),
            "report/calibration": wandb.Image(str(out / "calibration.png"), caption="reliability diagram"),
        }
        if len(stack):
            media["report/results_stack"] = wandb.Table(dataframe=stack)
        run.log(media)
        for _, r in table.iterrows():
            for k in (
                *(f"{m}_mean" for m in METRICS),
                *(f"{m}_std" for m in METRICS),
                "auroc_pooled",
                "auroc_ci_low",
                "auroc_ci_high",
                "sens95_specificity",
            ):
                run.summary[f"{r['method']}/{k}"] = float(r[k])
        return Path(run.dir).parent if not run.disabled else None
    finally:
        run.finish()


def report(
    runs: str | os.PathLike,
    out: str | os.PathLike,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    show: bool = True,
    wandb: bool = False,
    exp: str | None = None,
    truth: str | os.PathLike | None = None,
    title: str | None = None,
    cine: str | os.PathLike | None = None,
    gallery: int = 100,
    first: str | None = None,
) -> pd.DataFrame:
    """Write the report files (module docstring) and return the nodule table (methods, then the reference rows
    when ``truth`` names a synthetic set's truth.csv); ``wandb``: also log a summary run (group ``exp``,
    default the runs folder's name); ``title`` heads results.md, the terminal table and roc.png; ``first``
    (e.g. ``f1``) puts that metric's column first in the tables."""
    runs, out = Path(runs), Path(out)
    preds = read_predictions(runs)
    if preds.empty:
        raise DataError(
            runs, "no fold<k>/predictions_<method>.csv files (run the stages and `usnodule baselines`)"
        )
    refs = reference_predictions(preds, truth) if truth is not None else None  # checked before any work
    stacks = read_predictions(runs, "stack_predictions_")
    table = nodule_table(preds, n_boot=n_boot, seed=seed)
    valop = validation_operating_point(
        preds, read_predictions(runs, "val_predictions_"), n_boot=n_boot, seed=seed
    )
    if len(valop):
        table = table.merge(valop, on="method", how="left")
    table = table.merge(calibration_table(preds), on="method", how="left")
    if refs is not None:
        table = pd.concat([table, reference_table(refs, n_boot=n_boot, seed=seed)], ignore_index=True)
    stack = stack_table(stacks) if len(stacks) else pd.DataFrame()
    out.mkdir(parents=True, exist_ok=True)
    for name, frame in (
        ("results.csv", table),
        ("results_stack.csv", stack),
        ("predictions.csv", preds.sort_values(["method", "fold", "annot_id"])),
    ):
        if name == "results_stack.csv" and frame.empty:
            continue
        with atomic_path(out / name) as tmp:
            frame.to_csv(tmp, index=False, float_format="%.6g")
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text(
            markdown(
                table,
                stack,
                runs,
                title,
                Path(truth) if truth is not None else None,
                "; ".join(p for p in (roi_protocol(runs), stacking_protocol(runs)) if p) or None,
                first=first,
            )
        )
    plot_roc(preds, out / "roc.png", refs, title)
    plot_reliability(preds, out / "calibration.png", title)
    write_report_html(out, runs, preds, title, cine, gallery)
    if wandb:
        log_wandb(out, exp or runs.resolve().name, table, stack, preds, runs)
    if show:
        head = f"{title}: nodule-level results" if title else "Nodule-level results"
        print_table(table, f"{head} ({runs}), mean ± std over folds", first)
    return table


def write_report_html(
    out: Path, runs: Path, preds: pd.DataFrame, title: str | None, cine, gallery: int
) -> Path:
    """``report.html`` from the files just written (:mod:`datamodules.report_html`); the gallery shows the paper's
    method (STACT-Time, else AsyCMST, else the first), as the DeLong test compares against."""
    from datamodules import report_html

    methods = method_order(preds["method"].unique())
    main = next((m for m in ("stact", "asycmst") if m in methods), methods[0])
    return report_html.write_html(
        out,
        title=f"{title}: report" if title else "Report",
        results_md=(out / "results.md").read_text(),
        images={"ROC curves": out / "roc.png", "Reliability diagram": out / "calibration.png"},
        preds=preds,
        method=main,
        method_name=NAMES.get(main, main),
        sources=report_html.crop_sources(runs, cine),
        gallery_size=gallery,
    )


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="Table-2-style results of every method: results.md/.csv, roc.png",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--runs", type=Path, required=True, help="experiment folder with fold<k>/predictions_*.csv"
    )
    p.add_argument("--out", type=Path, required=True, help="report folder (e.g. reports/demo)")
    p.add_argument("--n-boot", type=positive_int, default=1000, help="bootstrap resamples for the AUROC CI")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument(
        "--wandb",
        action="store_true",
        help="also log a W&B summary run (job_type report; offline unless WANDB_MODE/credentials)",
    )
    p.add_argument(
        "--exp", default=None, help="W&B group = experiment name (default: the --runs folder name)"
    )
    p.add_argument(
        "--truth",
        type=Path,
        default=None,
        help="a synthetic set's truth.csv (e.g. data/synth/stanford/truth.csv): add the reference rows "
        "'Bayes ceiling' and 'TI-RADS oracle' on the same test nodules",
    )
    p.add_argument(
        "--title", default=None, help="report title, e.g. STACT-Time or AsyCMST (results.md heading)"
    )
    p.add_argument(
        "--cine",
        type=Path,
        default=None,
        help="dataset.hdf5 for the report.html gallery's crops (default: the path in each fold's embeddings.h5)",
    )
    p.add_argument(
        "--gallery",
        type=int,
        default=100,
        help="report.html: nodules in the gallery, largest errors first (default 100; -1 all)",
    )
    p.add_argument(
        "--first",
        choices=[k for k in TABLE_METRICS],
        default=None,
        help="metric column to show first (the two-stage report: f1, as its paper)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    report(
        args.runs,
        args.out,
        n_boot=args.n_boot,
        seed=args.seed,
        wandb=args.wandb,
        exp=args.exp,
        truth=args.truth,
        title=args.title,
        cine=args.cine,
        gallery=args.gallery,
        first=args.first,
    )
    print(f"wrote {args.out}/results.md, results.csv, roc.png, calibration.png, predictions.csv, report.html")
