"""``usnodule report-sweep``: the AsyCMST paper's studies as tables and plots, from per-fold prediction files.

Every fit writes ``fold<k>/predictions_<method>.csv`` (``annot_id,label,prob``); this command reads them
(:func:`datamodules.predictions.read_predictions`, validated) and writes ``results.md`` (the table),
``results.csv`` (every number) and one plot into ``--out``.  ``--kind``:

* ``fss-ns`` -- Table 4 (Sec. 4.4): one row per ablation found in ``--runs``'s ``fold<k>/`` folders, the ACMST /
  FSS / NS switches as check marks (:data:`VARIANTS`), ACC and AUROC as mean ± std over folds, the pooled AUROC
  with its bootstrap 95% CI, and the paired t-test p-value against the baseline without any module (over folds,
  as the paper's p column; "–" with fewer than two common folds).  Plot: ``ablation.png`` (AUROC per row).
* ``strategies`` -- Table 5 (Sec. 4.6): the same columns for the cross-attention strategies, with the paper's
  interaction count per query set, p-values against ``strategy: none``.  Plot: ``ablation.png``.
* ``sweep`` -- a perturbation sweep (label noise, Sec. 4.7 Fig. 12a-b; contour perturbation, Fig. 12c-d):
  ``--runs`` holds one folder per level, named ``[<series>_]<amount>`` (``0``, ``0.1``; ``dilate_2``, ``erode_4``,
  ``jitter_2``); the level ``0`` (no series) is every series' starting point.  Table: AUROC per method (and
  series) and level, mean ± std over folds with the pooled AUROC; plot ``sweep.png``: AUROC against the amount,
  one line per method and series (error bars: std over folds, when there are two or more).
* ``transfer`` -- Table 3 (Sec. 4.3): ``--runs`` holds ``<train>_to_<test>/fold<k>/`` folders; one row per
  direction (in-domain rows marked): ACC, recall, precision, F1 (the malignant class's) and AUROC as mean ± std
  over folds, pooled AUROC with CI.  Plot ``roc.png``: the pooled ROC curve of each direction (Fig. 7).

``--methods``, ``--folds`` and (sweeps) ``--levels`` keep only those (a runs folder may hold more, e.g. folds of
``make asycmst`` that the study did not fit); one asked for and absent is an error.
AUROC is the headline here (the report tool's); the paper's Tables 3-5 give accuracy, which is in the tables too.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score, roc_curve

from datamodules.atomic import atomic_path
from datamodules.errors import DataError
from datamodules.predictions import FOLD_DIR, binary_metrics, bootstrap_auroc, mean_std, read_predictions
from stages.options import count, positive_int, seed

KINDS = ("fss-ns", "strategies", "sweep", "transfer")
# The fitted variants of AsyCMST and their model switches (``--model.init_args.<key>``); the Makefile's
# ASY_SWITCH_<method> lines set exactly these (tests/test_report_sweep.py checks that they agree).
VARIANTS: dict[str, dict] = {
    "asycmst": {"strategy": "asymmetric", "fss": True, "ns": True},
    "asycmst_base": {"strategy": "none", "fss": False, "ns": False},
    "asycmst_acmst": {"strategy": "asymmetric", "fss": False, "ns": False},
    "asycmst_fss": {"strategy": "none", "fss": True, "ns": False},
    "asycmst_ns": {"strategy": "none", "fss": False, "ns": True},
    "asycmst_none": {"strategy": "none", "fss": True, "ns": True},
    "asycmst_global": {"strategy": "global", "fss": True, "ns": True},
    "asycmst_symmetric": {"strategy": "symmetric", "fss": True, "ns": True},
    "asycmst_spatial": {"strategy": "spatial", "fss": True, "ns": True},
    "asycmst_temporal": {"strategy": "temporal", "fss": True, "ns": True},
}
# Table 4 rows in the paper's order (baseline first: the p-values compare with it).
FSS_NS_ROWS = ("asycmst_base", "asycmst_acmst", "asycmst_fss", "asycmst_ns", "asycmst_none", "asycmst")
# Table 5 rows in the paper's order, with its interaction counts (N tokens per frame, T frames).
STRATEGY_ROWS = {
    "asycmst_none": "–",
    "asycmst_global": "(N×T)(N×T×2)",
    "asycmst_symmetric": "(N×T)(2N+2T−2)",
    "asycmst": "(N×T)(N+T)",
    "asycmst_spatial": "(N×T)×N×2",
    "asycmst_temporal": "(N×T)×T×2",
}
NAMES = {
    "asycmst": "AsyCMST",
    "asycmst_base": "Baseline (no ACMST, FSS, NS)",
    "asycmst_acmst": "ACMST only",
    "asycmst_fss": "FSS only",
    "asycmst_ns": "NS only",
    "asycmst_none": "FSS + NS (no cross-attention)",
    "asycmst_global": "Global",
    "asycmst_symmetric": "Symmetric",
    "asycmst_spatial": "Spatial",
    "asycmst_temporal": "Temporal",
}
LEVEL = re.compile(r"^(?:([A-Za-z]+)_)?(\d+(?:\.\d+)?)$")
DIRECTION = re.compile(r"^(.+)_to_(.+)$")


# ---------------------------------------------------------------------------------------------- reading
def _has_folds(folder: Path) -> bool:
    return folder.is_dir() and any(p.is_dir() and FOLD_DIR.match(p.name) for p in folder.iterdir())


def select(
    preds: pd.DataFrame, where: Path, methods: list[str] | None, folds: list[int] | None
) -> pd.DataFrame:
    """The rows of ``methods`` and ``folds`` (all when ``None``); a fold asked for and absent is a DataError."""
    if methods is not None:
        preds = preds[preds["method"].isin(methods)]
    if folds is not None:
        absent = sorted(set(folds) - set(preds["fold"]))
        if absent and not preds.empty:
            raise DataError(where, f"no predictions of fold(s) {', '.join(map(str, absent))}")
        preds = preds[preds["fold"].isin(folds)]
    return preds


def read_runs(runs: Path, methods: list[str] | None, folds: list[int] | None = None) -> pd.DataFrame:
    """``runs/fold<k>/predictions_*.csv`` of ``methods`` and ``folds`` (all when ``None``); DataError when
    nothing is there."""
    preds = select(read_predictions(runs), runs, methods, folds)
    if preds.empty:
        raise DataError(
            runs,
            "no fold<k>/predictions_<method>.csv files" + (f" of {', '.join(methods)}" if methods else ""),
        )
    absent = sorted(set(methods or []) - set(preds["method"]))
    if absent:
        raise DataError(runs, f"no predictions of method(s) {', '.join(absent)}")
    return preds.reset_index(drop=True)


def read_groups(
    runs: Path,
    pattern: re.Pattern,
    what: str,
    methods: list[str] | None,
    folds: list[int] | None = None,
    groups: list[str] | None = None,
) -> pd.DataFrame:
    """Every sub-folder of ``runs`` that holds ``fold<k>/`` folders (those named in ``groups``, when given),
    read as :func:`read_runs` does and tagged with its name (``group``); a sub-folder whose name does not match
    ``pattern`` is an error, and so is a group asked for and absent."""
    if not runs.is_dir():
        raise DataError(runs, "runs folder does not exist")
    subs = sorted(p for p in runs.iterdir() if _has_folds(p) and (groups is None or p.name in groups))
    absent = sorted(set(groups or []) - {p.name for p in subs})
    if absent:
        raise DataError(runs, f"no {what} folder(s) {', '.join(absent)} with fold<k>/ predictions")
    frames = []
    for sub in subs:
        if not pattern.match(sub.name):
            raise DataError(sub, f"not a {what} folder name")
        frames.append(select(read_predictions(sub), sub, methods, folds).assign(group=sub.name))
    preds = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if preds.empty:
        raise DataError(runs, f"no <{what}>/fold<k>/predictions_<method>.csv files")
    absent = sorted(set(methods or []) - set(preds["method"]))
    if absent:
        raise DataError(runs, f"no predictions of method(s) {', '.join(absent)}")
    return preds


# ---------------------------------------------------------------------------------------------- numbers
def summary(df: pd.DataFrame, n_boot: int, seed: int) -> dict:
    """Per-fold metrics as mean/std (``<metric>_mean``, ``_std``), pooled AUROC with its bootstrap CI, and the
    per-fold values themselves (``folds``: fold -> metrics, for paired tests)."""
    folds = {int(f): binary_metrics(g["label"], g["prob"]) for f, g in df.groupby("fold")}
    row: dict = {"n_folds": len(folds), "n_cases": len(df), "folds": folds}
    for k in ("acc", "precision", "recall", "f1", "auroc"):
        row[f"{k}_mean"], row[f"{k}_std"], _ = mean_std([m[k] for m in folds.values()])
    y, p = df["label"].to_numpy(), df["prob"].to_numpy()
    row["auroc_pooled"] = roc_auc_score(y, p) if len(np.unique(y)) == 2 else float("nan")
    row["auroc_ci_low"], row["auroc_ci_high"] = bootstrap_auroc(y, p, n_boot, seed)
    return row


def paired_p(a: dict, b: dict, metric: str) -> float:
    """Paired t-test p-value of ``metric`` over the folds two summaries share (NaN with fewer than two, or when
    every difference is the same)."""
    from scipy.stats import ttest_rel

    common = sorted(set(a["folds"]) & set(b["folds"]))
    x = np.array([a["folds"][f][metric] for f in common], float)
    y = np.array([b["folds"][f][metric] for f in common], float)
    ok = ~(np.isnan(x) | np.isnan(y))
    if ok.sum() < 2 or np.ptp(x[ok] - y[ok]) == 0:
        return float("nan")
    return float(ttest_rel(x[ok], y[ok]).pvalue)


def pm(mean: float, std: float) -> str:
    return "–" if np.isnan(mean) else f"{mean:.3f} ± {std:.3f}"


def pooled(r: dict) -> str:
    if np.isnan(r["auroc_pooled"]):
        return "–"
    return f"{r['auroc_pooled']:.3f} [{r['auroc_ci_low']:.3f}, {r['auroc_ci_high']:.3f}]"


def p_text(p: float) -> str:
    return "–" if np.isnan(p) else ("< 0.001" if p < 0.001 else f"{p:.3f}")


def _flat(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame([{k: v for k, v in r.items() if k != "folds"} for r in rows])


# ---------------------------------------------------------------------------------------------- tables
def ablation_table(preds: pd.DataFrame, kind: str, n_boot: int, seed: int) -> tuple[pd.DataFrame, list[str]]:
    """Table 4 (``fss-ns``) or Table 5 (``strategies``): rows of the known variants present, in the paper's
    order; returns the numbers and the markdown lines."""
    order = FSS_NS_ROWS if kind == "fss-ns" else tuple(STRATEGY_ROWS)
    baseline = order[0]
    present = [m for m in order if m in set(preds["method"])]
    unknown = sorted(set(preds["method"]) - set(order))
    if not present:
        raise DataError(None, f"none of the {kind} rows ({', '.join(order)}) has predictions")
    rows = []
    for m in present:
        r = summary(preds[preds["method"] == m], n_boot, seed)
        rows.append({"method": m, "name": NAMES[m], **VARIANTS[m], **r})
    base = next((r for r in rows if r["method"] == baseline), None)
    for r in rows:
        for k in ("acc", "auroc"):
            r[f"p_{k}"] = paired_p(r, base, k) if base is not None and r is not base else float("nan")
    against = NAMES[baseline] + ("" if base is not None else " (not run: no p-values)")
    if kind == "fss-ns":
        head = ["ACMST", "FSS", "NS"]

        def cells(r):
            return ["✓" if r["strategy"] != "none" else "", "✓" if r["fss"] else "", "✓" if r["ns"] else ""]
    else:
        head = ["Strategy"]

        def cells(r):
            return [r["strategy"].capitalize()]

    lines = [
        "| "
        + " | ".join(head)
        + " | ACC | AUROC | pooled AUROC [95% CI] | p (ACC) | p (AUROC) |"
        + (" interactions |" if kind == "strategies" else ""),
        "|---" * (len(head) + 5 + (kind == "strategies")) + "|",
    ]
    for r in rows:
        extra = f" {STRATEGY_ROWS[r['method']]} |" if kind == "strategies" else ""
        lines.append(
            "| "
            + " | ".join(cells(r))
            + f" | {pm(r['acc_mean'], r['acc_std'])} | {pm(r['auroc_mean'], r['auroc_std'])}"
            f" | {pooled(r)} | {p_text(r['p_acc'])} | {p_text(r['p_auroc'])} |{extra}"
        )
    folds = sorted({f for r in rows for f in r["folds"]})
    lines += [
        "",
        f"Mean ± std over the test folds ({', '.join(map(str, folds))}; {rows[0]['n_cases']} cases for the first row), "
        f"ACC at threshold 0.5; p: paired t-test over folds against {against}.",
    ]
    if unknown:
        lines.append(f"Not in this table: {', '.join(unknown)}.")
    return _flat(rows), lines


def parse_level(name: str) -> tuple[str, float]:
    """``dilate_2`` -> ``("dilate", 2.0)``, ``0.1`` -> ``("", 0.1)``."""
    m = LEVEL.match(name)
    if m is None:
        raise ValueError(f"not a sweep level: {name!r}")
    return m.group(1) or "", float(m.group(2))


def sweep_table(preds: pd.DataFrame, n_boot: int, seed: int) -> tuple[pd.DataFrame, list[str]]:
    """One row per (method, series, amount); a level without series and amount 0 joins every series."""
    levels = {g: parse_level(g) for g in preds["group"].unique()}
    named = sorted({s for s, _ in levels.values() if s})
    rows = []
    for (m, g), df in preds.groupby(["method", "group"], sort=False):
        series, x = levels[g]
        r = summary(df, n_boot, seed)
        for s in [series] if series or x != 0 or not named else named:
            rows.append({"method": m, "name": NAMES.get(m, m), "series": s, "amount": x, "level": g, **r})
    order = {m: i for i, m in enumerate(VARIANTS)}
    rows.sort(key=lambda r: (order.get(r["method"], len(order)), r["method"], r["series"], r["amount"]))
    xs = sorted({r["amount"] for r in rows})
    lines = [
        "| Method | " + ("perturbation | " if named else "") + " | ".join(f"{x:g}" for x in xs) + " |",
        "|---" * (len(xs) + 1 + bool(named)) + "|",
    ]
    keys = sorted({(r["method"], r["series"]) for r in rows}, key=lambda k: (order.get(k[0], len(order)), k))
    for m, s in keys:
        by_x = {r["amount"]: r for r in rows if r["method"] == m and r["series"] == s}
        cells = [
            f"{pm(by_x[x]['auroc_mean'], by_x[x]['auroc_std'])} ({by_x[x]['auroc_pooled']:.3f})"
            if x in by_x
            else ""
            for x in xs
        ]
        lines.append(f"| {NAMES.get(m, m)} | " + (f"{s} | " if named else "") + " | ".join(cells) + " |")
    folds = sorted({f for r in rows for f in r["folds"]})
    lines += [
        "",
        f"Test AUROC, mean ± std over folds {', '.join(map(str, folds))} (pooled over them in brackets).",
    ]
    return _flat(rows), lines


def transfer_table(preds: pd.DataFrame, n_boot: int, seed: int) -> tuple[pd.DataFrame, list[str]]:
    """One row per method and ``<train>_to_<test>`` direction, in-domain directions marked."""
    rows = []
    for (m, g), df in preds.groupby(["method", "group"]):
        train, test = DIRECTION.match(g).groups()
        r = summary(df, n_boot, seed)
        rows.append({"method": m, "name": NAMES.get(m, m), "train": train, "test": test, "direction": g, **r})
    rows.sort(key=lambda r: (r["method"], r["train"], r["train"] != r["test"], r["test"]))
    lines = [
        "| Method | train → test | ACC | Recall | Precision | F1 | AUROC | pooled AUROC [95% CI] |",
        "|---" * 8 + "|",
    ]
    for r in rows:
        where = f"{r['train']} → {r['test']}" + (" (in-domain)" if r["train"] == r["test"] else "")
        metrics = " | ".join(
            pm(r[f"{k}_mean"], r[f"{k}_std"]) for k in ("acc", "recall", "precision", "f1", "auroc")
        )
        lines.append(f"| {r['name']} | {where} | {metrics} | {pooled(r)} |")
    folds = sorted({f for r in rows for f in r["folds"]})
    lines += [
        "",
        f"Mean ± std over folds {', '.join(map(str, folds))}: each fold trained on its training part of the first "
        "set, tested on its test part of the second (recall, precision and F1 of the malignant class, threshold 0.5).",
    ]
    return _flat(rows), lines


# ---------------------------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    _plt().close(fig)


def plot_sweep(table: pd.DataFrame, path: Path, title: str, xlabel: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=120)
    for (name, series), df in table.groupby(["name", "series"], sort=False):
        df = df.sort_values("amount")
        err = df["auroc_std"] if (df["n_folds"] > 1).any() else None
        label = f"{name}, {series}" if series else name
        ax.errorbar(df["amount"], df["auroc_mean"], yerr=err, marker="o", capsize=3, label=label)
    ax.set(xlabel=xlabel, ylabel="test AUROC (mean over folds)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)


def plot_bars(table: pd.DataFrame, path: Path, title: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    err = table["auroc_std"] if (table["n_folds"] > 1).any() else None
    ax.bar(range(len(table)), table["auroc_mean"], yerr=err, capsize=3, color="tab:blue")
    ax.set_xticks(range(len(table)), table["name"], rotation=25, ha="right", fontsize=7)
    low = float(np.nanmin(table["auroc_mean"] - table["auroc_std"].fillna(0)))
    ax.set(ylabel="test AUROC (mean over folds)", title=title, ylim=(max(0.0, low - 0.05), 1.0))
    _save(fig, path)


def plot_transfer(preds: pd.DataFrame, path: Path, title: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 5), dpi=120)
    for (m, g), df in preds.groupby(["method", "group"]):
        if df["label"].nunique() < 2:
            continue
        fpr, tpr, _ = roc_curve(df["label"], df["prob"])
        train, test = DIRECTION.match(g).groups()
        ls = "-" if train != test else ":"
        auc = roc_auc_score(df["label"], df["prob"])
        ax.plot(fpr, tpr, ls=ls, label=f"{NAMES.get(m, m)}, {train} → {test} (AUROC {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1), title=title)
    ax.legend(loc="lower right", fontsize=7)
    _save(fig, path)


# ---------------------------------------------------------------------------------------------- command
def report_sweep(
    runs: str | Path,
    out: str | Path,
    kind: str,
    *,
    methods: list[str] | None = None,
    folds: list[int] | None = None,
    levels: list[str] | None = None,
    title: str | None = None,
    xlabel: str = "perturbation",
    n_boot: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """Write ``results.md``, ``results.csv`` and the plot of ``kind`` (module docstring); returns the table."""
    runs, out = Path(runs), Path(out)
    if kind in ("fss-ns", "strategies"):
        preds = read_runs(runs, methods, folds)
        table, lines = ablation_table(preds, kind, n_boot, seed)
        heading = title or (
            "Table 4: ACMST, FSS and NS" if kind == "fss-ns" else "Table 5: cross-attention strategies"
        )
        plot, draw = "ablation.png", lambda p: plot_bars(table, p, heading)
    elif kind == "sweep":
        preds = read_groups(runs, LEVEL, "[<series>_]<amount>", methods, folds, levels)
        table, lines = sweep_table(preds, n_boot, seed)
        heading = title or "Perturbation sweep"
        plot, draw = "sweep.png", lambda p: plot_sweep(table, p, heading, xlabel)
    elif kind == "transfer":
        preds = read_groups(runs, DIRECTION, "<train>_to_<test>", methods, folds)
        table, lines = transfer_table(preds, n_boot, seed)
        heading = title or "Cross-data-set transfer"
        plot, draw = "roc.png", lambda p: plot_transfer(preds, p, heading)
    else:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "results.csv") as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    draw(out / plot)
    text = "\n".join([f"# {heading}", "", f"Runs: `{runs}`", "", *lines, "", f"![{heading}]({plot})", ""])
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text(text)
    return table


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report-sweep",
        help="AsyCMST studies as tables + plots: Table 4 (fss-ns), Table 5 (strategies), perturbation sweeps, "
        "cross-data-set transfer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--runs", type=Path, required=True, help="folder of the study's runs (see --kind)")
    p.add_argument(
        "--out", type=Path, required=True, help="report folder (results.md, results.csv, the plot)"
    )
    p.add_argument("--kind", choices=KINDS, required=True, help="which study the runs folder holds")
    p.add_argument("--methods", nargs="+", default=None, help="only these methods (default: all found)")
    p.add_argument(
        "--folds", nargs="+", type=count, default=None, help="only these folds (default: all found)"
    )
    p.add_argument("--levels", nargs="+", default=None, help="sweep: only these level folders (default: all)")
    p.add_argument("--title", default=None, help="heading of results.md and the plot")
    p.add_argument("--xlabel", default="perturbation", help="sweep: the x axis' label")
    p.add_argument("--n-boot", type=positive_int, default=1000, help="bootstrap resamples for the AUROC CI")
    p.add_argument("--seed", type=seed, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    if args.out.exists() and not args.out.is_dir():
        raise DataError(args.out, "exists and is not a folder")
    report_sweep(
        args.runs,
        args.out,
        args.kind,
        methods=args.methods,
        folds=args.folds,
        levels=args.levels,
        title=args.title,
        xlabel=args.xlabel,
        n_boot=args.n_boot,
        seed=args.seed,
    )
    print(f"wrote {args.out}/results.md, results.csv")
    print((args.out / "results.md").read_text().split("\n![")[0])
