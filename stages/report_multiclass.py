"""``usnodule report-multiclass``: cross-validated multi-class (subtype) results, e.g. CSASN and its ablations.

Reads ``<runs>/fold<k>/predictions_<method>.csv`` files that carry class probabilities (``annot_id, subtype,
pred_subtype, p_<class>..., label, prob``, as the CSASN stage writes them; files without ``p_*`` columns --
binary methods -- are skipped).  The class list is the order of the ``p_<class>`` columns and must be the same
in every file.  Writes to ``--out``:

* ``results_multiclass.md`` / ``.csv`` -- one row per method: per-class recall and precision, macro-F1, balanced
  accuracy (mean recall over the classes present), macro-F1 over the classes that are true or predicted in the
  fold (as the stage's torchmetrics value), one-vs-rest AUROC per class and their macro mean, each as
  mean ± std over folds (sample std, ddof = 1; scikit-learn metrics, predicted class = the argmax of the
  probabilities; precision of a never-predicted class is 0).  A fold whose test part lacks a class has an
  undefined AUROC for it and is left out of that mean (``n_folds_auroc_<class>`` says how many remain);
* ``confusion_<method>.png`` and a table in the markdown -- the confusion matrix pooled over the folds' test
  images (rows = true class, columns = predicted), counts with row-normalised shading;
* with ``--truth FILE`` (a synthetic still set's ``truth.csv``, written by ``usnodule synth --stills N``): the
  reference rows *Bayes ceiling* (the generator's exact class posterior ``p_<class>``, given every descriptor it
  drew) and *TI-RADS oracle* (``tirads_p_<class>``, from the TI-RADS descriptors alone), scored like a method on
  the same test images of each fold, in their own section of the markdown and as rows ``bayes_ceiling`` /
  ``tirads_oracle`` of the CSV;
* with ``--wandb``: one W&B summary run (project ``usnodule``, group = the experiment, job_type
  ``report_multiclass``; offline unless ``WANDB_MODE``/credentials say otherwise) with the table and the
  confusion images.

The binary (malignant vs benign) part of the same files is ``usnodule report``'s: run both on one ``--runs``.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import (
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from datamodules.atomic import atomic_path
from datamodules.errors import DataError

FOLD_DIR = re.compile(r"fold(\d+)$")
PREFIX = "predictions_"
# Reference rows from a synthetic still set's truth.csv (``--truth``): method key -> (display name, column prefix).
REFERENCES = {"bayes_ceiling": ("Bayes ceiling", "p_"), "tirads_oracle": ("TI-RADS oracle", "tirads_p_")}


def read_multiclass(
    runs: str | os.PathLike, methods: list[str] | None = None
) -> tuple[pd.DataFrame, list[str]]:
    """Every multi-class prediction file under ``runs`` as one frame (``method``, ``fold``, ``annot_id``,
    ``subtype``, ``p_<class>``...) and the class list; one :class:`DataError` line for a bad file."""
    runs = Path(runs)
    if not runs.is_dir():
        raise DataError(runs, "runs folder does not exist")
    frames, classes = [], None
    for d in sorted(p for p in runs.iterdir() if p.is_dir() and FOLD_DIR.match(p.name)):
        fold = int(FOLD_DIR.match(d.name).group(1))
        for csv in sorted(d.glob(f"{PREFIX}*.csv")):
            method = csv.stem[len(PREFIX) :]
            if methods is not None and method not in methods:
                continue
            try:
                df = pd.read_csv(csv, dtype={"annot_id": str, "subtype": str})
            except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
                raise DataError(
                    csv, f"not a readable CSV ({str(e).splitlines()[0] if str(e) else e})"
                ) from None
            cols = [c for c in df.columns if c.startswith("p_")]
            if not cols:
                continue  # a binary method's file
            names = [c[2:] for c in cols]
            if classes is None:
                classes = names
            elif names != classes:
                raise DataError(csv, f"classes {names} differ from the other files' {classes}")
            if "subtype" not in df.columns or "annot_id" not in df.columns:
                raise DataError(csv, "missing column(s) annot_id / subtype")
            unknown = sorted(set(df["subtype"]) - set(names))
            if unknown:
                raise DataError(csv, f"subtype(s) {unknown[:3]} not among the classes {names}")
            p = df[cols].to_numpy(float)
            if not np.isfinite(p).all() or (p < 0).any() or (p > 1 + 1e-6).any():
                raise DataError(csv, "class probabilities must be numbers in [0, 1]")
            if df["annot_id"].duplicated().any():
                raise DataError(csv, "an image with more than one row: one prediction per image per fold")
            df.insert(0, "fold", fold)
            df.insert(0, "method", method)
            frames.append(df)
    if not frames:
        raise DataError(runs, "no fold<k>/predictions_<method>.csv with class probabilities (p_* columns)")
    absent = sorted(set(methods or []) - {f["method"].iat[0] for f in frames})
    if absent:
        raise DataError(runs, f"no multi-class predictions of method(s) {', '.join(absent)}")
    return pd.concat(frames, ignore_index=True), list(classes or [])


def reference_predictions(
    preds: pd.DataFrame, classes: list[str], truth_path: str | os.PathLike
) -> pd.DataFrame:
    """The reference rows (:data:`REFERENCES`) on the (fold, image) pairs of the methods' predictions, in the
    shape of ``preds``; one :class:`DataError` line for a truth file of another data set."""
    truth_path = Path(truth_path)
    if not truth_path.is_file():
        raise DataError(
            truth_path, "truth file does not exist (usnodule synth --stills N writes <out>/stills/truth.csv)"
        )
    try:
        truth = pd.read_csv(truth_path, dtype={"annot_id": str, "case_id": str, "subtype": str})
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise DataError(truth_path, f"not a readable CSV ({type(e).__name__})") from None
    key = next((c for c in ("annot_id", "case_id") if c in truth.columns), None)
    need = ["subtype", *(f"{pre}{c}" for _, pre in REFERENCES.values() for c in classes)]
    missing = [c for c in need if c not in truth.columns] + ([] if key else ["annot_id or case_id"])
    if missing:
        raise DataError(truth_path, f"missing column(s) {', '.join(missing[:4])} (a still set's truth.csv?)")
    truth = truth.drop_duplicates(key).set_index(key)
    images = (
        preds[["fold", "annot_id", "subtype"]].drop_duplicates(["fold", "annot_id"]).reset_index(drop=True)
    )
    absent = sorted(set(images["annot_id"]) - set(truth.index))
    if absent:
        raise DataError(
            truth_path,
            f"{len(absent)} test image id(s) not in it (e.g. {', '.join(absent[:3])}): another data set?",
        )
    t = truth.loc[images["annot_id"]]
    differ = images.loc[t["subtype"].to_numpy() != images["subtype"].to_numpy(), "annot_id"]
    if len(differ):
        raise DataError(
            truth_path, f"subtype differs from the predictions' for {differ.nunique()} image(s) (e.g. "
            f"{', '.join(sorted(set(differ))[:3])}): another data set?",
        )  # fmt: skip
    frames = [
        images.assign(method=m, **{f"p_{c}": t[f"{pre}{c}"].to_numpy(float) for c in classes})
        for m, (_, pre) in REFERENCES.items()
    ]
    return pd.concat(frames, ignore_index=True)


def fold_metrics(df: pd.DataFrame, classes: list[str]) -> dict[str, float]:
    """The metrics of one method's one fold (module docstring), scikit-learn."""
    k = len(classes)
    y = df["subtype"].map({c: i for i, c in enumerate(classes)}).to_numpy(int)
    prob = df[[f"p_{c}" for c in classes]].to_numpy(float)
    pred = prob.argmax(axis=1)
    labels = list(range(k))
    out = {
        # over the classes in the targets or the predictions (scikit-learn's and torchmetrics' default)
        "macro_f1": f1_score(y, pred, average="macro", zero_division=0),
        "balanced_acc": balanced_accuracy_score(y, pred),
    }
    rec = recall_score(y, pred, labels=labels, average=None, zero_division=0)
    prec = precision_score(y, pred, labels=labels, average=None, zero_division=0)
    aucs = []
    for i, c in enumerate(classes):
        out[f"recall_{c}"], out[f"precision_{c}"] = float(rec[i]), float(prec[i])
        hit = y == i
        auc = roc_auc_score(hit, prob[:, i]) if 0 < hit.sum() < len(hit) else float("nan")
        out[f"auroc_{c}"] = auc
        aucs.append(auc)
    out["macro_auroc"] = float(np.nanmean(aucs)) if not np.isnan(aucs).all() else float("nan")
    return out


def metric_names(classes: list[str]) -> list[str]:
    per = [f"{m}_{c}" for m in ("recall", "precision", "auroc") for c in classes]
    return ["macro_f1", "balanced_acc", "macro_auroc", *per]


def multiclass_table(preds: pd.DataFrame, classes: list[str]) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """``(table of mean/std per method, pooled confusion matrix per method)``; methods in first-seen order
    with ``csasn`` first."""
    methods = sorted(preds["method"].unique(), key=lambda m: (m != "csasn", m))
    rows, confusions = [], {}
    for m in methods:
        sub = preds[preds["method"] == m]
        per_fold = pd.DataFrame([fold_metrics(g, classes) for _, g in sub.groupby("fold")])
        row: dict = {"method": m, "n_folds": len(per_fold), "n_images": len(sub)}
        for name in metric_names(classes):
            v = per_fold[name].dropna()
            row[f"{name}_mean"] = float(v.mean()) if len(v) else float("nan")
            row[f"{name}_std"] = float(v.std(ddof=1)) if len(v) > 1 else float("nan")
            if name.startswith("auroc_"):
                row[f"n_folds_{name}"] = len(v)
        rows.append(row)
        y = sub["subtype"].map({c: i for i, c in enumerate(classes)}).to_numpy(int)
        pred = sub[[f"p_{c}" for c in classes]].to_numpy(float).argmax(axis=1)
        confusions[m] = confusion_matrix(y, pred, labels=list(range(len(classes))))
    return pd.DataFrame(rows), confusions


def _pm(mean: float, std: float) -> str:
    if np.isnan(mean):
        return "–"
    return f"{mean:.2f}" if np.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def markdown(
    table: pd.DataFrame,
    confusions: dict[str, np.ndarray],
    classes: list[str],
    title: str | None,
    references: pd.DataFrame | None = None,
    truth: str | os.PathLike | None = None,
) -> str:
    head = ["Method", "Macro-F1", "Balanced ACC", "Macro AUROC"]
    head += (
        [f"Recall {c}" for c in classes]
        + [f"Precision {c}" for c in classes]
        + [f"AUROC {c}" for c in classes]
    )
    lines = [f"# {title or 'Multi-class'} results (mean ± std over test folds)", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in table.iterrows():
        cells = [r["method"]] + [_pm(r[f"{n}_mean"], r[f"{n}_std"]) for n in metric_names(classes)]
        lines.append("| " + " | ".join(cells) + " |")
    if references is not None:
        lines += [
            "",
            "## Reference (generator truth)",
            "",
            f"Not methods: the synthetic generator's class posteriors from `{truth}` on the same test images of "
            "each fold, scored as above (predicted class = argmax). *Bayes ceiling* = the posterior given every "
            "descriptor the generator drew (what the data allows); *TI-RADS oracle* = the posterior from the "
            "TI-RADS descriptors alone.",
            "",
            "| " + " | ".join(["Reference", *head[1:]]) + " |",
            "|" + "---|" * len(head),
        ]
        for _, r in references.iterrows():
            name = f"*{REFERENCES[r['method']][0]}*"
            cells = [name] + [_pm(r[f"{n}_mean"], r[f"{n}_std"]) for n in metric_names(classes)]
            lines.append("| " + " | ".join(cells) + " |")
    for m, cm in confusions.items():
        lines += ["", f"## Pooled confusion matrix: {m} (rows = true, columns = predicted)", ""]
        lines += ["| true \\ pred | " + " | ".join(classes) + " |", "|" + "---|" * (len(classes) + 1)]
        lines += [f"| {c} | " + " | ".join(str(int(v)) for v in cm[i]) + " |" for i, c in enumerate(classes)]
    return "\n".join(lines) + "\n"


def plot_confusion(matrix: np.ndarray, classes: list[str], path: str | os.PathLike, title: str) -> Path:
    """Confusion matrix (counts, shaded by row-normalised rate) as a PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(matrix)
    rate = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    k = len(classes)
    fig, ax = plt.subplots(figsize=(1.2 * k + 2, 1.2 * k + 1.5), dpi=100)
    ax.imshow(rate, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(
                j,
                i,
                str(int(matrix[i, j])),
                ha="center",
                va="center",
                color="white" if rate[i, j] > 0.5 else "black",
            )
    ax.set(
        xticks=range(k),
        yticks=range(k),
        xticklabels=classes,
        yticklabels=classes,
        xlabel="predicted",
        ylabel="true",
    )
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def log_wandb(out: Path, exp: str, table: pd.DataFrame, confusions: dict[str, np.ndarray]) -> None:
    import wandb

    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    run = wandb.init(
        project="usnodule",
        group=exp,
        job_type="report_multiclass",
        name=f"report-multiclass-{exp}",
        dir=str(out),
        mode=mode,
        reinit="create_new",
    )
    try:
        media = {"report_multiclass/results": wandb.Table(dataframe=table)}
        for m in confusions:
            media[f"report_multiclass/confusion_{m}"] = wandb.Image(
                str(out / f"confusion_{m}.png"), caption=m
            )
        run.log(media)
    finally:
        run.finish()


def report_multiclass(
    runs: str | os.PathLike,
    out: str | os.PathLike,
    *,
    methods: list[str] | None = None,
    title: str | None = None,
    wandb: bool = False,
    exp: str | None = None,
    show: bool = True,
    truth: str | os.PathLike | None = None,
) -> pd.DataFrame:
    """Write the report files (module docstring); return the table (the methods' rows, then any reference's)."""
    runs, out = Path(runs), Path(out)
    preds, classes = read_multiclass(runs, methods)
    refs = None
    if truth is not None:  # checked before any work
        refs, _ = multiclass_table(reference_predictions(preds, classes, truth), classes)
        refs = refs.set_index("method").loc[list(REFERENCES)].reset_index()
    table, confusions = multiclass_table(preds, classes)
    full = table if refs is None else pd.concat([table, refs], ignore_index=True)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "results_multiclass.csv") as tmp:
        full.to_csv(tmp, index=False, float_format="%.6g")
    text = markdown(table, confusions, classes, title, refs, truth)
    with atomic_path(out / "results_multiclass.md") as tmp:
        tmp.write_text(text)
    for m, cm in confusions.items():
        plot_confusion(cm, classes, out / f"confusion_{m}.png", f"{title or m}: {m} (pooled test folds)")
    if wandb:
        log_wandb(out, exp or runs.resolve().name, table, confusions)
    if show:
        print(text)
    return full


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report-multiclass",
        help="multi-class (subtype) results over folds: per-class recall/precision, macro-F1, confusion matrix",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--runs", type=Path, required=True, help="experiment folder with fold<k>/predictions_*.csv"
    )
    p.add_argument("--out", type=Path, required=True, help="report folder")
    p.add_argument("--methods", default=None, help="comma-separated methods (default: every multi-class one)")
    p.add_argument("--title", default=None, help="report title, e.g. CSASN")
    p.add_argument("--wandb", action="store_true", help="also log a W&B summary run")
    p.add_argument("--exp", default=None, help="W&B group (default: the --runs folder name)")
    p.add_argument(
        "--truth",
        type=Path,
        default=None,
        help="a synthetic still set's truth.csv: add the 'Bayes ceiling' and 'TI-RADS oracle' reference rows",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    methods = [m for m in args.methods.split(",") if m] if args.methods else None
    report_multiclass(
        args.runs,
        args.out,
        methods=methods,
        title=args.title,
        wandb=args.wandb,
        exp=args.exp,
        truth=args.truth,
    )
    print(f"wrote {args.out}/results_multiclass.md, results_multiclass.csv, confusion_<method>.png")
