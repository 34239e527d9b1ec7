"""``usnodule report-sweep`` on invented prediction files (known AUROCs), and the Makefile's study targets."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stages.cli import main
from stages.report_sweep import FSS_NS_ROWS, STRATEGY_ROWS, VARIANTS, parse_level, report_sweep
from tests.commands import argv
from tests.test_errors import _fails

ROOT = Path(__file__).resolve().parents[1]


def write_preds(folder: Path, method: str, fold: int, prob: list[float], label: list[int]) -> None:
    (folder / f"fold{fold}").mkdir(parents=True, exist_ok=True)
    ids = [f"f{fold}c{i}" for i in range(len(prob))]
    pd.DataFrame({"annot_id": ids, "label": label, "prob": prob}).to_csv(
        folder / f"fold{fold}" / f"predictions_{method}.csv", index=False
    )


LABEL = [0, 0, 0, 1, 1, 1]
PERFECT = [0.1, 0.2, 0.3, 0.7, 0.8, 0.9]  # AUROC 1, ACC 1
HALF = [0.1, 0.6, 0.3, 0.4, 0.8, 0.9]  # AUROC 8/9, ACC 4/6
WRONG = [0.9, 0.8, 0.7, 0.3, 0.2, 0.1]  # AUROC 0, ACC 0


def test_fss_ns_table_rows_marks_and_p_values(tmp_path):
    runs = tmp_path / "runs"
    for fold in (0, 1, 2):
        write_preds(runs, "asycmst", fold, PERFECT, LABEL)
        write_preds(runs, "asycmst_base", fold, HALF if fold < 2 else WRONG, LABEL)
        write_preds(runs, "asycmst_ns", fold, HALF, LABEL)
        write_preds(runs, "asycmst_global", fold, PERFECT, LABEL)  # a Table 5 row: not in Table 4
    table = report_sweep(runs, tmp_path / "out", "fss-ns", n_boot=50)
    assert list(table["method"]) == ["asycmst_base", "asycmst_ns", "asycmst"]  # the paper's order
    full = table.set_index("method").loc["asycmst"]
    assert full["auroc_mean"] == 1.0 and full["acc_mean"] == 1.0 and full["n_folds"] == 3
    base = table.set_index("method").loc["asycmst_base"]
    assert base["auroc_mean"] == pytest.approx((8 / 9 + 8 / 9 + 0) / 3)
    from scipy.stats import ttest_rel

    expected = ttest_rel([1.0, 1.0, 1.0], [4 / 6, 4 / 6, 0.0]).pvalue
    assert full["p_acc"] == pytest.approx(expected) and np.isnan(base["p_acc"])
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| ✓ | ✓ | ✓ | 1.000 ± 0.000 | 1.000 ± 0.000 |" in md  # ACMST, FSS, NS all on
    assert "|  |  | ✓ | 0.667 ± 0.000 | 0.889 ± 0.000 |" in md  # NS only
    assert "Not in this table: asycmst_global." in md
    assert (tmp_path / "out" / "ablation.png").stat().st_size > 0
    assert set(pd.read_csv(tmp_path / "out" / "results.csv")["method"]) == set(table["method"])


def test_strategies_table_names_strategies_and_interactions(tmp_path):
    runs = tmp_path / "runs"
    for m in ("asycmst_none", "asycmst", "asycmst_temporal"):
        write_preds(runs, m, 0, PERFECT, LABEL)
    report_sweep(runs, tmp_path / "out", "strategies", n_boot=50)
    md = (tmp_path / "out" / "results.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and "±" in line]
    assert [r.split("|")[1].strip() for r in rows] == ["None", "Asymmetric", "Temporal"]
    assert rows[1].endswith("(N×T)(N+T) |") and "| – | – |" in rows[1]  # one fold: no p-values


def test_sweep_table_and_plot(tmp_path):
    runs = tmp_path / "noise"
    for level, prob in (("0", PERFECT), ("0.2", HALF), ("0.4", WRONG)):
        for fold in (0, 1):
            write_preds(runs / level, "asycmst", fold, prob, LABEL)
            write_preds(runs / level, "asycmst_base", fold, HALF, LABEL)
            write_preds(runs / level, "asycmst_global", fold, HALF, LABEL)  # filtered out below
    table = report_sweep(runs, tmp_path / "out", "sweep", methods=["asycmst", "asycmst_base"], n_boot=50)
    full = table[table["method"] == "asycmst"].sort_values("amount")
    assert list(full["amount"]) == [0.0, 0.2, 0.4]
    assert list(full["auroc_mean"]) == pytest.approx([1.0, 8 / 9, 0.0])
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| Method | 0 | 0.2 | 0.4 |" in md
    assert "| AsyCMST | 1.000 ± 0.000 (1.000) | 0.889 ± 0.000 (0.889) | 0.000 ± 0.000 (0.000) |" in md
    assert "Global" not in md
    assert (tmp_path / "out" / "sweep.png").stat().st_size > 0


def test_contour_sweep_shares_the_clean_level_between_series(tmp_path):
    runs = tmp_path / "contour"
    write_preds(runs / "0", "asycmst", 0, PERFECT, LABEL)
    for level in ("dilate_2", "erode_2", "jitter_4"):
        write_preds(runs / level, "asycmst", 0, HALF, LABEL)
    table = report_sweep(runs, tmp_path / "out", "sweep", n_boot=50)
    assert sorted(zip(table["series"], table["amount"], strict=True)) == [
        ("dilate", 0.0),
        ("dilate", 2.0),
        ("erode", 0.0),
        ("erode", 2.0),
        ("jitter", 0.0),
        ("jitter", 4.0),
    ]
    assert parse_level("erode_2.5") == ("erode", 2.5) and parse_level("0.1") == ("", 0.1)


def test_transfer_table_marks_in_domain_rows(tmp_path):
    runs = tmp_path / "transfer"
    write_preds(runs / "a_to_a", "asycmst", 0, PERFECT, LABEL)
    write_preds(runs / "a_to_b", "asycmst", 0, HALF, LABEL)
    write_preds(runs / "b_to_a", "asycmst", 0, WRONG, LABEL)
    table = report_sweep(runs, tmp_path / "out", "transfer", n_boot=50)
    by = table.set_index("direction")
    assert by.loc["a_to_b", "auroc_mean"] == pytest.approx(8 / 9) and by.loc["b_to_a", "acc_mean"] == 0.0
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| AsyCMST | a → a (in-domain) |" in md and "| AsyCMST | a → b | 0.667 ± 0.000 |" in md
    assert (tmp_path / "out" / "roc.png").stat().st_size > 0


def test_errors_are_one_line(tmp_path, capsys):
    runs = tmp_path / "runs"
    write_preds(runs, "asycmst", 0, PERFECT, LABEL)
    out = tmp_path / "out"
    _fails(
        capsys,
        lambda: main(argv("report-sweep", runs=tmp_path / "nope", out=out, kind="fss-ns")),
        "does not exist",
    )
    _fails(
        capsys,
        lambda: main(argv("report-sweep", runs=runs, out=out, kind="fss-ns", methods="asycmst_ns")),
        "asycmst_ns",
    )
    bad = tmp_path / "sweep" / "noisy"
    write_preds(bad, "asycmst", 0, PERFECT, LABEL)
    _fails(
        capsys, lambda: main(argv("report-sweep", runs=tmp_path / "sweep", out=out, kind="sweep")), "noisy"
    )
    write_preds(runs, "asycmst_base", 0, [1.5] * 6, LABEL)
    _fails(capsys, lambda: main(argv("report-sweep", runs=runs, out=out, kind="fss-ns")), "[0, 1]")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- Makefile
needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")


def _dry(tmp: Path, target: str, **vars) -> str:
    (tmp / "stamp").touch()
    paired = tmp / "paired"
    paired.mkdir(exist_ok=True)
    for name in ("manifest.csv", "splits.json"):
        (paired / name).touch()
    (tmp / "conf.yaml").touch()
    base = {"RUNS": tmp / "runs", "STAMP": tmp / "stamp", "PAIRED": paired, "ASYCMST_CONF": tmp / "conf.yaml"}
    base |= {"REPORT": tmp / "reports", "SYNTH": tmp / "synth", "FOLDS": 5}
    cmd = ["make", "-n", "-C", str(ROOT), target, *(f"{k}={v}" for k, v in (base | vars).items())]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return out.replace("\\\n", " ")  # one line per command: join the recipes' continuation lines


def _switches(command: str) -> dict:
    """The model switches of one `lightning fit` line, as VARIANTS spells them (defaults = the config's)."""
    found = dict(re.findall(r"--model\.init_args\.(strategy|fss|ns)=(\S+)", command))
    return {
        "strategy": found.get("strategy", "asymmetric"),
        "fss": found.get("fss", "true") == "true",
        "ns": found.get("ns", "true") == "true",
    }


def _method(command: str) -> str:
    found = re.search(r"--model\.init_args\.method=(\S+)", command)
    return found.group(1) if found else "asycmst"  # the config's default name


def _fits(out: str, word: str = "fit -c") -> list[str]:
    return [line for line in out.splitlines() if word in line]


@needs_make
def test_make_ablation_targets_fit_each_variant_with_its_switches(tmp_path):
    out = _dry(tmp_path, str(tmp_path / "reports" / "asycmst_fss_ns" / "results.md"), SWEEP_FOLDS="0 1")
    fits = _fits(out)
    assert sorted(_method(f) for f in fits) == sorted(FSS_NS_ROWS * 2)  # every row, folds 0 and 1
    for f in fits:
        assert _switches(f) == VARIANTS[_method(f)], f
        assert re.search(r"fold=[01]\b", f) and "test_after_fit=true" in f
    (report,) = [line for line in out.splitlines() if "report-sweep" in line]
    assert "--kind fss-ns" in report and "--folds 0 1" in report
    out = _dry(tmp_path, str(tmp_path / "reports" / "asycmst_strategies" / "results.md"), SWEEP_FOLDS="2")
    fits = _fits(out)
    assert sorted(_method(f) for f in fits) == sorted(STRATEGY_ROWS)
    assert all(_switches(f) == VARIANTS[_method(f)] and "fold=2" in f for f in fits)


@needs_make
def test_make_noise_sweep_flips_training_labels_per_level(tmp_path):
    report = tmp_path / "reports" / "asycmst_noise" / "results.md"
    out = _dry(
        tmp_path, str(report), SWEEP_FOLDS="0", NOISE_LEVELS="0 0.3", SWEEP_METHODS="asycmst asycmst_base"
    )
    fits = _fits(out)
    assert len(fits) == 4  # level 0 is the clean fits (shared with the tables), copied; 0.3 fits both again
    noisy = [f for f in fits if "label_noise=0.3" in f]
    assert len(noisy) == 2 and all("asycmst_noise/0.3/fold0" in f and "noise_seed=0" in f for f in noisy)
    assert sorted(_method(f) for f in noisy) == ["asycmst", "asycmst_base"]
    assert all(_switches(f) == VARIANTS[_method(f)] for f in fits)
    assert "label_noise" not in " ".join(f for f in fits if f not in noisy)
    assert len([line for line in out.splitlines() if line.startswith("mkdir -p") and "cp " in line]) == 2
    (report,) = [line for line in out.splitlines() if "report-sweep" in line]
    assert "--kind sweep" in report and "--levels 0 0.3" in report


@needs_make
def test_make_contour_sweep_passes_mode_and_pixels(tmp_path):
    report = tmp_path / "reports" / "asycmst_contour" / "results.md"
    out = _dry(tmp_path, str(report), SWEEP_FOLDS="1", CONTOUR_LEVELS="erode_2 jitter_4")
    fits = [f for f in _fits(out) if "mask_noise" in f]
    assert len(fits) == 2
    assert "mask_noise=erode --data.init_args.mask_noise_px=2" in fits[0] + fits[1]
    assert "mask_noise=jitter --data.init_args.mask_noise_px=4" in fits[0] + fits[1]
    assert all(
        re.search(r"--log \S+/logs/asycmst_(erode_2|jitter_4)_fold1\.log --name asycmst_\1 ", f) for f in fits
    )


@needs_make
def test_make_transfer_tests_each_model_on_the_other_set(tmp_path):
    out = _dry(tmp_path, str(tmp_path / "reports" / "asycmst_transfer" / "results.md"), SWEEP_FOLDS="0")
    assert "shift-paired --like " + str(tmp_path / "paired") in out
    shifted = tmp_path / "synth" / "paired_shift"
    tests = _fits(out, "lightning test")
    assert len(tests) == 2 and all("pretrained=false" in t and "fold=0" in t for t in tests)
    (to_b,) = [t for t in tests if f"test_manifest={shifted}/manifest.csv" in t]
    assert f"data.init_args.manifest={tmp_path / 'paired'}/manifest.csv" in to_b
    assert "--ckpt_path=" + str(tmp_path / "runs" / "asycmst" / "fold0" / "asycmst.ckpt") in to_b
    (to_a,) = [t for t in tests if f"test_manifest={tmp_path / 'paired'}/manifest.csv" in t]
    assert f"data.init_args.manifest={shifted}/manifest.csv" in to_a
    assert "shifted_to_shifted/fold0/asycmst.ckpt" in to_a
    fits = _fits(out)
    assert any(f"manifest={shifted}/manifest.csv" in f and "test_after_fit=true" in f for f in fits)
    (report,) = [line for line in out.splitlines() if "report-sweep" in line]
    assert "--kind transfer" in report
