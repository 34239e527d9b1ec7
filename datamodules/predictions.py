"""Per-fold prediction files and the scalar metrics every report computes from them.

``<runs>/fold<k>/predictions_<method>.csv`` (``annot_id,label,prob``; one row per test case of fold k) is the one
format every trainable stage and baseline writes (:func:`datamodules.atomic.write_predictions`) and every report
reads: ``usnodule report`` (Table-2 style), ``usnodule report-sweep`` (the AsyCMST studies).  Here: the validated
reader (:func:`read_predictions`), the thresholded metrics and AUROC of one fold (:func:`binary_metrics`), mean
and std over folds (:func:`mean_std`) and the bootstrap CI of a pooled AUROC (:func:`bootstrap_auroc`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score

from datamodules.errors import DataError

FOLD_DIR = re.compile(r"^fold(\d+)$")


def binary_metrics(label: np.ndarray, prob: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Nodule metrics at ``threshold`` (positive = prob >= threshold); AUROC NaN with one class.

    ``precision``/``recall``/``f1`` are the malignant class's (what a clinician asks); ``*_w`` the support-
    weighted average over both classes (``average="weighted"``, the paper's Table 2, see WEIGHTED_METRICS).
    """
    label = np.asarray(label, int)
    pred = (np.asarray(prob, float) >= threshold).astype(int)
    two = len(np.unique(label)) == 2
    weighted = {"average": "weighted", "labels": [0, 1], "zero_division": 0}
    return {
        "acc": accuracy_score(label, pred),
        "precision": precision_score(label, pred, zero_division=0),
        "recall": recall_score(label, pred, zero_division=0),
        "f1": f1_score(label, pred, zero_division=0),
        "auroc": roc_auc_score(label, prob) if two else float("nan"),
        "specificity": recall_score(1 - label, 1 - pred, zero_division=0),
        "precision_w": precision_score(label, pred, **weighted),
        "recall_w": recall_score(label, pred, **weighted),
        "f1_w": f1_score(label, pred, **weighted),
    }


def mean_std(values) -> tuple[float, float, int]:
    """Mean and sample std (ddof 1) over the non-NaN values, and how many there were."""
    v = np.asarray(values, float)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size)


def rank_auroc(label: np.ndarray, prob: np.ndarray) -> np.ndarray:
    """AUROC of each row of (B, n) arrays by the Mann-Whitney rank formula (ties averaged; = roc_auc_score).

    Vectorised over rows so that 1000 bootstrap resamples cost one call (scikit-learn has no batched AUROC).
    NaN for rows holding one class.
    """
    from scipy.stats import rankdata

    label = np.atleast_2d(label).astype(bool)
    ranks = rankdata(np.atleast_2d(prob), axis=1)
    n1 = label.sum(1)
    n0 = label.shape[1] - n1
    with np.errstate(invalid="ignore", divide="ignore"):
        return ((ranks * label).sum(1) - n1 * (n1 + 1) / 2) / (n1 * n0)


def bootstrap_auroc(
    label: np.ndarray, prob: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap CI of the AUROC (resampling nodules with replacement; one-class draws skipped).

    Kept by hand rather than ``scipy.stats.bootstrap`` (used for the operating point's CIs): all resamples are
    scored at once by the vectorised rank formula (:func:`rank_auroc`, 1,000 resamples in milliseconds), and a
    resample holding one class has no AUROC -- scipy would turn the whole interval into NaN, here it is skipped.
    """
    label, prob = np.asarray(label, int), np.asarray(prob, float)
    if len(np.unique(label)) < 2 or n_boot <= 0:
        return float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, len(label), (n_boot, len(label)))
    aucs = rank_auroc(label[idx], prob[idx])
    aucs = aucs[~np.isnan(aucs)]
    lo, hi = np.percentile(aucs, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)


def read_predictions(runs: str | os.PathLike, prefix: str = "predictions_") -> pd.DataFrame:
    """All ``fold<k>/<prefix><method>.csv`` files as one frame with ``method`` and ``fold`` columns.

    Each file is validated whole as it is read, so a bad one is a one-line :class:`DataError` naming it
    before any metric is computed or any output written (:func:`report` reads the test predictions first):

    * a readable CSV with the columns ``annot_id``, ``label``, ``prob`` (and ``stack`` for stack files);
    * one file per method and fold (``fold1/`` and ``fold01/`` are the same fold);
    * ``annot_id`` non-empty; one row per nodule -- per (annot_id, stack) for stack files -- since a file
      holds one method's predictions of one fold, a repeated row would be counted twice in every metric;
    * ``label`` exactly 0 or 1 (no NaN, no 2, no "malignant");
    * ``prob`` a number in [0, 1] on every row: an empty or non-numeric cell, NaN or inf is refused, and so is
      a value outside [0, 1], most likely a logit -- thresholding it at 0.5 and the calibration metrics would
      be silently wrong, while the AUROC would look fine.
    """
    runs = Path(runs)
    if not runs.is_dir():
        raise DataError(runs, "runs folder does not exist")
    stacks = prefix.startswith("stack")
    need = ["annot_id", "label", "prob"] + (["stack"] if stacks else [])
    frames, seen = [], {}
    for d in sorted(p for p in runs.iterdir() if p.is_dir() and FOLD_DIR.match(p.name)):
        fold = int(FOLD_DIR.match(d.name).group(1))
        for csv in sorted(d.glob(f"{prefix}*.csv")):
            method = csv.stem[len(prefix) :]
            if (method, fold) in seen:  # fold1/ and fold01/: the same fold's predictions twice
                raise DataError(
                    csv, f"a second file of {method} fold {fold} (the first: {seen[method, fold]})"
                )
            seen[method, fold] = csv
            try:
                df = pd.read_csv(csv, dtype={"annot_id": str})
            except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
                first = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise DataError(csv, f"not a readable CSV ({first})") from None
            missing = [c for c in need if c not in df.columns]
            if missing:
                raise DataError(csv, f"missing column(s) {', '.join(missing)}")
            if df["annot_id"].isna().any():
                raise DataError(csv, f"{int(df['annot_id'].isna().sum())} row(s) with an empty annot_id")
            key = ["annot_id", "stack"] if stacks else ["annot_id"]
            dup = sorted(set(df.loc[df.duplicated(key, keep=False), "annot_id"]))
            if dup:
                raise DataError(
                    csv,
                    f"{len(dup)} nodule(s) with more than one row{' for the same stack' if stacks else ''} "
                    f"(e.g. {', '.join(dup[:3])}): one prediction per nodule per fold",
                )
            label = pd.to_numeric(df["label"], errors="coerce")
            bad = ~label.isin([0, 1])
            if bad.any():
                example = df["label"][bad].iloc[0]
                raise DataError(
                    csv, f"labels must be 0 or 1: {int(bad.sum())} row(s) are not (e.g. {example})"
                )
            prob = pd.to_numeric(df["prob"], errors="coerce")
            bad = ~np.isfinite(prob.to_numpy(float))
            if bad.any():
                raise DataError(
                    csv,
                    f"prob must be a number: {int(bad.sum())} row(s) are empty, NaN or not numeric "
                    f"(e.g. {df['prob'][bad].iloc[0]})",
                )
            out = (prob < 0) | (prob > 1)
            if out.any():
                raise DataError(
                    csv,
                    f"prob must be a probability in [0, 1]: {int(out.sum())} row(s) outside it (range "
                    f"{prob.min():.4g} to {prob.max():.4g}; logits? apply a sigmoid first)",
                )
            df["label"], df["prob"] = label.astype(int), prob.astype(float)
            df.insert(0, "fold", fold)
            df.insert(0, "method", method)
            frames.append(df)
    if not frames:
        return pd.DataFrame(columns=["method", "fold", "annot_id", "label", "prob"])
    return pd.concat(frames, ignore_index=True)
