"""Synthetic data: layouts exactly as the readers expect, determinism, labels, and that the hidden signals are
really in the pixels (heterogeneity, shape change along the sweep, CEUS wash-in / wash-out)."""

import csv
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest

from datamodules import synth
from datamodules.paired import load_case, read_manifest
from datamodules.stanford import StanfordCine
from stages.cli import main

SMALL = dict(n_nodules=10, frames=12, size=64, n_cases=4, paired_frames=16, paired_size=48, prevalence=0.3)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return synth.synthesize(tmp_path_factory.mktemp("synth") / "out", seed=3, workers=0, **SMALL)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _read_all(root: Path) -> dict[str, np.ndarray]:
    out = {}
    with h5py.File(root / "stanford" / "dataset.hdf5") as f:
        for k in f:
            out[k] = f[k][()]
    for r in _rows(root / "paired" / "manifest.csv"):
        for col in ("bus", "ceus", "bus_mask"):
            out[r[col]] = np.load(root / "paired" / r[col])
    return out


def test_stanford_layout_keys_dtypes_and_chunks(small):
    with h5py.File(small / "stanford" / "dataset.hdf5") as f:
        assert set(f) == {"annot_id", "frame_num", "image", "mask"}
        n = f["image"].shape[0]
        assert f["annot_id"].shape == f["frame_num"].shape == (n,)
        assert f["annot_id"].dtype.kind == "S" and f["frame_num"].dtype.kind == "S"
        assert f["annot_id"][0].endswith(b"_") and f["frame_num"][0].isdigit()
        for key in ("image", "mask"):
            d = f[key]
            assert d.dtype == np.uint8 and d.shape == (n, 64, 64)
            assert d.chunks == (1, 64, 64) and d.compression == "gzip"
        assert set(np.unique(f["mask"][()])) == {0, 255}
    rows = _rows(small / "stanford" / "metadata.csv")
    assert tuple(rows[0]) == synth.METADATA_COLUMNS
    assert len(rows) == 10 and len({r["annot_id"] for r in rows}) == 10


def test_rows_interleaved_unsorted_with_frame_gaps(small):
    with h5py.File(small / "stanford" / "dataset.hdf5") as f:
        ids = [v.decode() for v in f["annot_id"][()]]
        fns = np.array([int(v) for v in f["frame_num"][()]])
    runs = [ids[0]] + [b for a, b in zip(ids, ids[1:], strict=False) if a != b]  # ids of contiguous row runs
    assert len(runs) > len(set(runs)), "some nodule's rows must be split around another nodule"
    firsts = list(dict.fromkeys(ids))
    assert firsts != sorted(firsts) and firsts != sorted(firsts, key=lambda a: int(a[:-1]))
    starts, gaps = [], False
    for a in set(ids):
        f = np.sort(fns[[i for i, b in enumerate(ids) if b == a]])
        starts.append(f[0])
        gaps |= bool((np.diff(f) > 1).any())
    assert gaps and max(starts) > 1


def test_metadata_blanks_patients_and_acr_levels(small):
    rows = _rows(small / "stanford" / "metadata.csv")
    blanks = [(r["annot_id"], k) for r in rows for k, v in r.items() if v == ""]
    assert blanks and all(k in synth.BLANKABLE for _, k in blanks)
    pids = [r["patient_id"] for r in rows]
    assert all(pids) and len(set(pids)) < len(pids)  # some patients have two nodules
    feats = [c for c in synth.METADATA_COLUMNS if c.startswith("ti-rads_") and c != "ti-rads_level"]
    checked = 0
    for r in rows:
        assert r["histopath_diagnosis"] in ("0", "1")
        if r["ti-rads_level"] and all(r[c] for c in feats):
            assert r["ti-rads_level"] == f"TR{synth.acr_level(sum(int(r[c]) for c in feats))}"
            checked += 1
    assert checked >= 5


def test_acr_rule_and_foci_sums():
    assert [synth.acr_level(p) for p in (0, 1, 2, 3, 4, 5, 6, 7, 13)] == [1, 1, 2, 3, 4, 4, 4, 5, 5]
    specs = synth.plan_stanford(400, 10, 0.09, seed=1)
    assert all(s.level == synth.acr_level(sum(s.points.values())) for s in specs)
    foci = {s.points["echogenicfoci"] for s in specs}
    assert foci - {0, 1, 2, 3}, "several kinds of foci add up (e.g. macro + punctate = 4)"
    assert {s.level for s in specs} == {1, 2, 3, 4, 5}
    assert all((s.points["shape"] == 3) == (s.size_cm[1] > s.size_cm[0]) for s in specs)


def test_prevalence_is_honoured_and_follows_risk():
    for q, n in ((0.09, 400), (0.5, 100), (0.3, 7)):
        y = np.array([s.label for s in synth.plan_stanford(n, 10, q, seed=2)])
        assert y.sum() == round(q * n)
    specs = synth.plan_stanford(400, 10, 0.09, seed=2)
    noisy = np.array([s.noisy_risk for s in specs])
    y = np.array([s.label for s in specs])
    assert noisy[y == 1].min() >= noisy[y == 0].max()  # labels are the top of risk + noise
    risk = np.array([s.risk for s in specs])  # the clean risk is not: noise moves nodules across the cut
    assert risk[y == 1].min() < risk[y == 0].max() and not np.allclose(risk, noisy)
    cases = synth.plan_paired(200, 8, seed=2)
    assert sum(c.label for c in cases) == 90  # 0.45 like the AsyCMST thyroid set
    assert sum(c.label for c in synth.plan_paired(10, 8, 0.5, seed=2)) == 5


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    kw = dict(n_nodules=4, frames=6, size=40, n_cases=2, paired_frames=8, paired_size=32)
    a = _read_all(synth.synthesize(tmp_path / "a", seed=7, workers=0, **kw))
    b = _read_all(synth.synthesize(tmp_path / "b", seed=7, workers=2, **kw))  # processes: same bytes
    c = _read_all(synth.synthesize(tmp_path / "c", seed=8, workers=0, **kw))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
    assert (tmp_path / "a/stanford/metadata.csv").read_bytes() == (
        tmp_path / "b/stanford/metadata.csv"
    ).read_bytes()
    assert not np.array_equal(a["image"][:10], c["image"][:10])


def test_out_of_view_frames_have_empty_masks():
    specs = synth.plan_stanford(12, 20, 0.5, seed=4)
    outside = inside = 0
    for s in specs:
        _, mask = synth.render_cine(s, 64)
        z = synth.sweep_positions(s, 64)
        area = (mask > 0).sum((1, 2))
        assert (area[np.abs(z) >= 1] == 0).all()
        assert (area[np.abs(z) < 0.8] > 0).all()
        outside += int((np.abs(z) >= 1).sum())
        inside += int((area > 0).sum())
    assert outside > 0 and inside > 0


def test_cross_section_grows_then_shrinks():
    s = next(s for s in synth.plan_stanford(30, 40, 0.5, seed=5, vary_frames=False) if s.shape_change < 0.3)
    _, mask = synth.render_cine(s, 64)
    area = (mask > 0).sum((1, 2)).astype(float)
    k = int(area.argmax())
    assert 0 < k < len(area) - 1 and area[0] < area[k] * 0.9 and area[-1] < area[k] * 0.9


def _heterogeneity(img: np.ndarray, mask: np.ndarray, b: int = 4) -> float:
    """Std of 4x4 block means well inside the mask: blotchy texture, not speckle."""
    vals = []
    for im, mk in zip(img, mask > 0, strict=True):
        inner = mk.copy()
        inner[2:-2, 2:-2] &= mk[:-4, 2:-2] & mk[4:, 2:-2] & mk[2:-2, :-4] & mk[2:-2, 4:]
        inner[:2] = inner[-2:] = inner[:, :2] = inner[:, -2:] = False
        h, w = (im.shape[0] // b) * b, (im.shape[1] // b) * b
        blocks = im[:h, :w].reshape(h // b, b, w // b, b).mean((1, 3))
        full = inner[:h, :w].reshape(h // b, b, w // b, b).all((1, 3))
        if full.sum() >= 4:
            vals.append(blocks[full].std())
    return float(np.mean(vals)) if vals else float("nan")


def _shape_change(mask: np.ndarray) -> float:
    """Std over frames of log bbox aspect ratio (frames with a real cross-section)."""
    asp = []
    for mk in mask > 0:
        if mk.sum() >= 30:
            ys, xs = np.nonzero(mk)
            asp.append((np.ptp(ys) + 1) / (np.ptp(xs) + 1))
    return float(np.std(np.log(asp))) if len(asp) > 2 else float("nan")


def test_hidden_image_signals_differ_between_labels():
    specs = synth.plan_stanford(48, 10, 0.5, seed=6, vary_frames=False)
    het, shp, y = [], [], []
    for s in specs:
        img, mask = synth.render_cine(s, 128)
        het.append(_heterogeneity(img, mask) if s.composition == "solid" else np.nan)
        shp.append(_shape_change(mask))
        y.append(s.label)
    het, shp, y = np.array(het), np.array(shp), np.array(y)
    assert np.nanmean(het[y == 1]) > np.nanmean(het[y == 0]) + 1.0
    assert np.nanmean(shp[y == 1]) > np.nanmean(shp[y == 0]) + 0.02
    # Same nodule with the hidden signal off / on: the pixels carry it.
    s = next(s for s in specs if s.composition == "solid")
    assert (
        _heterogeneity(*synth.render_cine(replace(s, heterogeneity=1.0), 128))
        > _heterogeneity(*synth.render_cine(replace(s, heterogeneity=0.0), 128)) + 5
    )
    s = replace(s, frame_nums=np.arange(24))
    flat = _shape_change(synth.render_cine(replace(s, shape_change=0.0), 128)[1])
    assert _shape_change(synth.render_cine(replace(s, shape_change=1.0), 128)[1]) > flat + 0.05


def test_ceus_wash_in_then_out_malignant_earlier():
    cases = synth.plan_paired(16, 24, 0.5, seed=7)
    peak, ratio, y = [], [], []
    for c in cases:
        bus, ceus, mask = synth.render_paired(c, 64)
        assert bus.shape == ceus.shape == mask.shape == (24, 64, 64)
        assert bus.dtype == ceus.dtype == mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
        assert mask.reshape(24, -1).any(1).all()  # stationary probe: the nodule is in every frame
        inner = mask.astype(bool) & (ceus > 0)
        curve = np.array([ceus[t][mask[t] > 0].mean() for t in range(24)])
        k = int(curve.argmax())
        assert inner.any() and 0 < k < 23 and curve[k] > curve[-1] + 5, c.case_id
        if c.nodule.composition == "cystic":  # fluid does not enhance
            continue
        assert curve[k] > curve[0] + 40 and curve[k] > curve[-1] + 15, c.case_id
        peak.append(k)
        ratio.append(curve[-1] / curve[k])
        y.append(c.label)
    peak, ratio, y = np.array(peak), np.array(ratio), np.array(y)
    assert peak[y == 1].mean() < peak[y == 0].mean()
    assert ratio[y == 1].mean() < ratio[y == 0].mean()


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = synth.render_cine

    def flaky(spec, size=256):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("killed")
        return real(spec, size)

    monkeypatch.setattr(synth.writers, "render_cine", flaky)  # where synthesize_stanford looks it up
    with pytest.raises(RuntimeError, match="killed"):
        synth.synthesize_stanford(tmp_path / "stanford", n_nodules=5, frames=4, size=32, workers=0)
    monkeypatch.setattr(
        synth.writers, "render_paired", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("killed"))
    )
    with pytest.raises(RuntimeError, match="killed"):
        synth.synthesize_paired(tmp_path / "paired", n_cases=3, frames=4, size=32)
    assert list(tmp_path.iterdir()) == []


def test_cli_writes_both_layouts_and_preview(tmp_path, capsys):
    out = tmp_path / "synth"
    main(["synth", "--out", str(out), "--nodules", "4", "--frames", "6", "--size", "48", "--cases", "3",
          "--balanced", "--seed", "1", "--preview"])  # fmt: skip
    assert (out / "stanford" / "dataset.hdf5").is_file() and (out / "stanford" / "metadata.csv").is_file()
    assert (out / "paired" / "manifest.csv").is_file()
    assert (out / "stanford" / "truth.csv").is_file() and (out / "paired" / "truth.csv").is_file()
    assert (out / "preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    labels = [r["histopath_diagnosis"] for r in _rows(out / "stanford" / "metadata.csv")]
    assert labels.count("1") == 2
    assert "wrote" in capsys.readouterr().out


def _files(root: Path) -> dict[str, bytes]:
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}


def test_only_writes_one_set_with_the_bytes_of_a_full_run(tmp_path):
    args = ["--nodules", "4", "--frames", "5", "--size", "40", "--cases", "3", "--stills", "6", "--seed", "2"]
    main(["synth", "--out", str(tmp_path / "full"), *args])
    parts = tmp_path / "parts"
    main(["synth", "--out", str(parts), *args, "--only", "paired"])
    assert sorted(p.name for p in parts.iterdir()) == ["paired"]  # the Makefile's steps write one set each
    main(["synth", "--out", str(parts), *args, "--only", "stills,stanford"])
    full, split = _files(tmp_path / "full"), _files(parts)
    assert full.keys() == split.keys() and any(k.startswith("stills/") for k in full)
    for name in full:
        if not name.endswith(".hdf5"):  # the HDF5 file is compared by its arrays below
            assert full[name] == split[name], name
    a, b = _read_all(tmp_path / "full"), _read_all(parts)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    main(["synth", "--out", str(parts), "--only", "preview"])
    assert (parts / "preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_only_stills_without_a_count_is_one_line_and_writes_nothing(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["synth", "--out", str(tmp_path / "s"), "--only", "stills"])
    assert e.value.code == 2 and "--only: stills needs --stills N" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_readers_accept_synthetic_output(small):
    ds = StanfordCine(small / "stanford" / "dataset.hdf5")
    meta = {r["annot_id"]: r for r in _rows(small / "stanford" / "metadata.csv")}
    assert sorted(meta) == [n.annot_id for n in ds.nodules] and ds.image_shape == (64, 64)
    pairs = 0
    for n in ds.nodules:
        assert n.label == int(meta[n.annot_id]["histopath_diagnosis"])
        assert n.patient_id == meta[n.annot_id]["patient_id"]
        assert (np.diff(n.frame_nums) > 0).all()
        frames, masks = ds.frames(n.annot_id, range(n.n_frames)), ds.masks(n.annot_id, range(n.n_frames))
        assert frames.shape == masks.shape == (n.n_frames, 64, 64) and set(np.unique(masks)) <= {0, 1}
        assert any(ds.bbox(n.annot_id, i) is not None for i in range(n.n_frames))
        pairs += sum(m.patient_id == n.patient_id for m in ds.nodules) - 1
    assert pairs > 0
    ds.close()
    cases = read_manifest(small / "paired" / "manifest.csv")
    assert len(cases) == 4 and {c.label for c in cases} <= {0, 1}
    bus, ceus, mask, annotated = load_case(cases[0])
    assert bus.shape == ceus.shape == mask.shape == (16, 48, 48) and annotated.all()


def test_truth_csv_beside_each_layout(small):
    truth = _rows(small / "stanford" / "truth.csv")
    assert tuple(truth[0]) == synth.TRUTH_COLUMNS == (
        "annot_id", "risk", "tirads_risk", "hidden_risk", "heterogeneity", "shape_change", "label",
    )  # fmt: skip
    meta = {r["annot_id"]: r for r in _rows(small / "stanford" / "metadata.csv")}
    assert sorted(r["annot_id"] for r in truth) == sorted(meta)
    for r in truth:
        assert r["label"] == meta[r["annot_id"]]["histopath_diagnosis"]
        assert float(r["risk"]) == pytest.approx(float(r["tirads_risk"]) + float(r["hidden_risk"]), abs=2e-6)
        het, shp = float(r["heterogeneity"]), float(r["shape_change"])
        assert 0 <= het <= 1 and 0 <= shp <= 1
        assert float(r["hidden_risk"]) == pytest.approx(synth.HIDDEN_WEIGHT * (het + shp), abs=2e-5)
    paired = _rows(small / "paired" / "truth.csv")
    assert tuple(paired[0]) == synth.PAIRED_TRUTH_COLUMNS == (
        "case_id", "risk", "tirads_risk", "hidden_risk", "heterogeneity", "shape_change", "pattern", "ttp",
        "washout", "focus_angle", "defect_angle", "concordance", "label",
    )  # fmt: skip
    manifest = {r["case_id"]: r for r in _rows(small / "paired" / "manifest.csv")}
    assert sorted(r["case_id"] for r in paired) == sorted(manifest)
    for r in paired:
        assert r["label"] == manifest[r["case_id"]]["label"] and r["pattern"] in synth.CEUS_PATTERNS
        assert float(r["risk"]) == pytest.approx(float(r["tirads_risk"]) + float(r["hidden_risk"]), abs=2e-6)
        assert float(r["shape_change"]) == 0.0  # paired clips are drawn without shape change
        conc = float(r["concordance"])
        assert conc == pytest.approx(
            (1 + np.cos(float(r["defect_angle"]) - float(r["focus_angle"]))) / 2, abs=2e-6
        )
        # the hidden part: heterogeneity at the paired weight, the CEUS terms, the concordance term
        ceus = (
            {"homogeneous": 0.0, "ring": -1.5, "heterogeneous": 1.5, "hypo": 1.5}[r["pattern"]]
            - 14.0 * (float(r["ttp"]) - 0.32)
            + 1.4 * (float(r["washout"]) - 2.2)
        )
        assert float(r["hidden_risk"]) == pytest.approx(
            synth.PAIRED_HIDDEN_WEIGHT * float(r["heterogeneity"]) + ceus + synth.CONCORDANCE_WEIGHT * conc,
            abs=2e-5,
        )


def test_paired_risk_is_the_sum_of_its_terms_and_the_label_follows_the_concordance_term():
    """The paired clean risk is exactly TI-RADS (paired scale) + heterogeneity + CEUS + concordance, and the
    label is drawn from all of it: without noise the risk ranks the labels perfectly, the risk less the
    concordance term does not."""
    from sklearn.metrics import roc_auc_score

    cases = synth.plan_paired(400, 4, 0.45, seed=5, label_noise=0.0)
    w = synth.POINT_WEIGHTS
    for c in cases:
        n, p = c.nodule, c.nodule.points
        tirads = sum(w[k] * p[k] for k in p) - 0.03 * (n.age - 56)
        assert c.tirads_risk == pytest.approx(synth.PAIRED_TIRADS_SCALE * tirads, abs=1e-9)
        assert c.concordance == pytest.approx((1 + np.cos(c.defect_angle - c.focus_angle)) / 2, abs=1e-12)
        assert n.risk == pytest.approx(c.tirads_risk + c.hidden_risk, abs=1e-9)
    y = [c.label for c in cases]
    risk = np.array([c.nodule.risk for c in cases])
    conc = np.array([c.concordance for c in cases])
    assert roc_auc_score(y, risk) == 1.0
    assert roc_auc_score(y, risk - synth.CONCORDANCE_WEIGHT * conc) < 0.99
    # about half the defects lie under the focus, the rest on the far side; either angle alone is uniform
    assert 0.4 < (conc > 0.5).mean() < 0.6 and ((conc > 0.8) | (conc < 0.2)).mean() > 0.8
    focus = np.array([c.focus_angle for c in cases])
    assert np.histogram(focus, bins=4, range=(0, 2 * np.pi))[0].min() > 70


def _half_means(img: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """Mean gray level of the mask's left and right halves (split at the mask's centre column)."""
    ys, xs = np.nonzero(mask)
    cx = xs.mean()
    return float(img[ys[xs < cx], xs[xs < cx]].mean()), float(img[ys[xs > cx], xs[xs > cx]].mean())


def test_focus_and_defect_are_in_the_pixels_at_their_angles():
    """A paired case with the B-mode focus on the right (angle 0) and the CEUS defect on the left (angle pi):
    the BUS clip is darker on the nodule's right half, the CEUS clip (around its peak) on the left; swapped
    angles swap the sides."""
    case = next(c for c in synth.plan_paired(40, 12, 0.5, seed=4) if c.nodule.composition == "solid")
    case = replace(case, pattern="homogeneous", nodule=replace(case.nodule, heterogeneity=0.0))
    sides = {}
    for name, (f, d) in {"focus right": (0.0, np.pi), "focus left": (np.pi, 0.0)}.items():
        bus, ceus, mask = synth.render_paired(replace(case, focus_angle=f, defect_angle=d), 64)
        peak = int(np.argmax([ceus[t][mask[t] > 0].mean() for t in range(len(ceus))]))
        sides[name] = (_half_means(bus.mean(0), mask[0]), _half_means(ceus[peak].astype(float), mask[peak]))
    (b_left, b_right), (c_left, c_right) = sides["focus right"]
    assert b_right < b_left - 20 and c_left < c_right - 30, sides
    (b_left, b_right), (c_left, c_right) = sides["focus left"]
    assert b_left < b_right - 20 and c_right < c_left - 30, sides


def test_stanford_set_does_not_depend_on_the_paired_constants(monkeypatch):
    """The paired set's weights and its focus / defect geometry never reach a Stanford nodule: same plan, same
    pixels with any values (the Stanford bytes did not change when they were added)."""
    specs = synth.plan_stanford(30, 4, 0.3, seed=8)
    clips = [synth.render_cine(s, 48) for s in specs[:3]]
    for name, value in (("PAIRED_TIRADS_SCALE", 3.0), ("PAIRED_HIDDEN_WEIGHT", 1.0), ("CONCORDANCE_WEIGHT", 9.0),
                        ("CEUS_PATTERN_WEIGHT", dict.fromkeys(synth.CEUS_PATTERNS, 5.0))):  # fmt: skip
        monkeypatch.setattr(synth.labels, name, value)
    for name in ("FOCUS_GRAY", "FOCUS_RADIUS", "FOCUS_OFFSET", "DEFECT_DEPTH"):
        monkeypatch.setattr(synth.nodule, name, 0.9)
    again = synth.plan_stanford(30, 4, 0.3, seed=8)
    assert [(s.risk, s.label) for s in again] == [(s.risk, s.label) for s in specs]
    for s, (img, mask) in zip(specs[:3], clips, strict=False):
        img2, mask2 = synth.render_cine(s, 48)
        assert np.array_equal(img, img2) and np.array_equal(mask, mask2)


def test_truth_risk_parts_match_the_plan_and_clean_risk_ranks_labels(tmp_path):
    from sklearn.metrics import roc_auc_score

    out = synth.synthesize_stanford(
        tmp_path / "stanford", n_nodules=80, frames=3, size=32, prevalence=0.3, seed=1
    )
    truth = _rows(out / "truth.csv")
    specs = {s.annot_id: s for s in synth.plan_stanford(80, 3, 0.3, seed=1)}
    for r in truth:
        s = specs[r["annot_id"]]
        assert float(r["risk"]) == pytest.approx(s.risk, abs=1e-6) and int(r["label"]) == s.label
        # The metadata part is the weighted TI-RADS points + the age term (age is a metadata.csv column).
        p = s.points
        tirads = sum(synth.POINT_WEIGHTS[k] * p[k] for k in p) - 0.03 * (s.age - 56)
        assert float(r["tirads_risk"]) == pytest.approx(tirads, abs=1e-5)
    y = np.array([int(r["label"]) for r in truth])
    auc = {k: roc_auc_score(y, [float(r[k]) for r in truth]) for k in ("risk", "tirads_risk", "hidden_risk")}
    assert auc["risk"] > 0.8  # 0.93 for this seed
    assert auc["risk"] > max(auc["tirads_risk"], auc["hidden_risk"])  # 0.76 and 0.90: both parts matter
    cases = synth.plan_paired(80, 3, 0.45, seed=1)
    rows = synth.truth_rows(cases)
    assert [r["case_id"] for r in rows] == [c.case_id for c in cases]
    assert roc_auc_score([c.label for c in cases], [float(r["risk"]) for r in rows]) > 0.8  # 0.92


def test_label_noise_scales_the_logistic_noise_only():
    """label_noise 0: labels are exactly the top-q of the clean risk; the descriptors are the same draws."""
    from sklearn.metrics import roc_auc_score

    from datamodules.synth import plan_stanford

    base = plan_stanford(60, 6, 0.3, seed=5)
    exact = plan_stanford(60, 6, 0.3, seed=5, label_noise=0.0)
    assert [s.risk for s in exact] == [s.risk for s in base]
    assert [s.heterogeneity for s in exact] == [s.heterogeneity for s in base]
    labels = [s.label for s in exact]
    assert roc_auc_score(labels, [s.risk for s in exact]) == 1.0
    assert roc_auc_score([s.label for s in base], [s.risk for s in base]) < 1.0
