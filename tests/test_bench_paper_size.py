"""benchmarks/bench_paper_size.py (issue 14, item 6) on the CPU at toy size: the JSON it writes holds every
stage in every precision and the attention ratios; the paper-size configs it reads give the paper's sizes."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import bench_paper_size as bench


def test_tiny_run_writes_every_stage_and_precision(tmp_path):
    out = tmp_path / "paper_size.json"
    bench.main(
        ["--tiny", "--device", "cpu", "--steps", "1", "--warmup", "0", "--repeats", "1", "--out", str(out)]
    )
    doc = json.loads(out.read_text())
    assert doc["tiny"] is True and doc["machine"]["device"] == "cpu"
    assert set(doc["stages"]) == set(bench.STAGES)
    for stage, by_precision in doc["stages"].items():
        assert set(by_precision) == set(bench.PRECISIONS), stage
        for precision, r in by_precision.items():
            assert r["status"] == "ok", (stage, precision, r["status"])
            assert r["batch"] == bench.TINY_BATCH and r["unit"] == bench.STAGES[stage][1]
            assert r["samples_per_s"] == pytest.approx(r["batch"] / (r["step_ms"] / 1e3))
            assert r["peak_mib"] is None  # no per-stage memory figure on a CPU
    assert doc["stages"]["vit"]["32-true"]["trainable_params_m"] < 0.1  # frozen backbone: the head only
    att = doc["attention"]
    assert (att["t"], att["n"], att["batch"]) == (
        bench.TINY_ATTN["t"],
        bench.TINY_ATTN["n"],
        bench.TINY_BATCH,
    )
    for precision in bench.PRECISIONS:
        assert set(att["core"][precision]) == {"default", "flash", "math"}  # the CPU's SDPA kernels
        assert att["core"][precision]["default"]["global_over_asymmetric"] > 0
        assert att["block"][precision]["global_over_asymmetric"] > 0


def test_paper_configs_give_the_paper_sizes():
    cfg = {stage: bench.load_config(stage, tiny=False) for stage in bench.STAGES}
    for stage, c in cfg.items():
        _, init = c["model"]
        assert not init.get("pretrained") and init.get("checkpoint_path") is None, stage  # nothing fetched
    assert bench.batch_size(cfg["asycmst"]["data"]) == 32  # the paper's global batch, on one device
    assert (cfg["asycmst"]["data"]["frames"], cfg["asycmst"]["data"]["size"]) == (16, 224)
    assert cfg["asycmst"]["model"][1]["dim"] == 384 and cfg["asycmst"]["config_precision"] == "16-mixed"
    assert (
        cfg["vit"]["model"][1]["backbone"] == "vit_base_patch16_224" and cfg["vit"]["data"]["img_size"] == 224
    )
    assert cfg["transunet"]["model"][1]["backbone"] == "vit_base_r50_s16_224"
    assert cfg["seg"]["data"]["size"] == 256 and cfg["seg"]["optimizer"][0] is torch.optim.Adam


def test_a_failing_stage_is_recorded_and_the_run_goes_on(monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("no such kernel\nsecond line")

    monkeypatch.setattr(bench, "measure_stage", boom)
    r = bench.run_stage("seg", "16-mixed", torch.device("cpu"), bench.parse(["--tiny"]))
    assert r == {"status": "error: RuntimeError: no such kernel"}
