"""Platt scaling of the attention heads on validation nodules (lightning_modules/calibration.py)."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader

from lightning_modules.calibration import IDENTITY, apply_platt, fit_platt, logit_margin, prob_to_margin
from lightning_modules.head_stage import HeadStage


def test_fit_platt_is_the_maximum_likelihood_logistic_fit():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(400, generator=g, dtype=torch.double) * 2
    y = (torch.rand(400, generator=g, dtype=torch.double) < torch.sigmoid(0.6 * z - 1.2)).double()
    a, b = fit_platt(z, y)
    ref = LogisticRegression(C=1e12, tol=1e-10, max_iter=10_000).fit(z.numpy()[:, None], y.numpy())
    assert a == pytest.approx(ref.coef_[0, 0], abs=1e-4)
    assert b == pytest.approx(ref.intercept_[0], abs=1e-4)
    assert 0.4 < a < 0.8 and -1.6 < b < -0.8  # near the generating (0.6, -1.2)


def test_fit_platt_keeps_the_ranking_and_degenerate_splits_stay_identity():
    z = torch.linspace(-3, 3, 50)
    anti = (z < 0).double()  # a head that ranks backwards on validation
    a, _ = fit_platt(z, anti)
    assert a >= 1e-2  # the scale stays positive: calibration never reverses a fold's ranking
    assert fit_platt(z, torch.zeros(50)) == IDENTITY
    assert fit_platt(z, torch.tensor([1.0] + [0.0] * 49)) == IDENTITY  # one malignant: nothing to fit


def test_margin_helpers_invert_softmax():
    logits = torch.tensor([[0.3, 1.7], [2.0, -1.0]])
    p = logits.softmax(-1)[:, 1]
    torch.testing.assert_close(torch.sigmoid(logit_margin(logits)), p)
    torch.testing.assert_close(prob_to_margin(p).float(), logit_margin(logits))
    torch.testing.assert_close(apply_platt(logit_margin(logits), torch.tensor(IDENTITY)), p)


def _rows(n=40, s=3, d=16, shift=0.0):
    g = torch.Generator().manual_seed(1)
    rows = []
    for i in range(n):
        label = i % 4 == 0
        emb = torch.randn(s, d, generator=g) + (1.5 if label else 0.0) + shift
        rows.append(
            {
                "image_emb": emb,
                "seg_emb": torch.randn(s, d, generator=g),
                "valid": torch.ones(s, dtype=torch.bool),
                "label": torch.tensor(int(label)),
                "nodule": torch.tensor(i),
            }
        )
    return rows


def _fit(model, rows, epochs=3):
    model.configure_optimizers = lambda: torch.optim.AdamW(model.parameters(), lr=1e-2)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, DataLoader(rows, batch_size=8), DataLoader(rows, batch_size=8))
    return trainer


def _raw(model, rows):
    model.eval()
    with torch.no_grad():
        batch = next(iter(DataLoader(rows, batch_size=len(rows))))
        return batch, logit_margin(model.logits(batch))


def test_head_fits_platt_on_validation_and_predicts_calibrated_probabilities(tmp_path):
    torch.manual_seed(0)
    rows = _rows()
    model = HeadStage(variant="vit_self", dim=16, num_heads=2, focal_alpha=0.9, focal_gamma=2.4)
    trainer = _fit(model, rows)
    batch, z = _raw(model, rows)
    a, b = model.platt.tolist()
    assert (a, b) != IDENTITY
    # the buffer is the maximum-likelihood fit on the last validation epoch's raw nodule scores
    ref = fit_platt(z, batch["label"])
    assert a == pytest.approx(ref[0], rel=1e-3) and b == pytest.approx(ref[1], abs=1e-3)
    with torch.no_grad():
        prob = model.predict_step(batch, 0)["prob"]
    torch.testing.assert_close(prob, torch.sigmoid(a * z + b), atol=1e-5, rtol=1e-5)
    y = batch["label"].numpy()
    assert roc_auc_score(y, prob.numpy()) == pytest.approx(roc_auc_score(y, z.numpy()), abs=1e-9)
    # the weighted focal loss pushes the raw scores up; calibration brings the mean near the base rate (1/4)
    raw_mean = float(torch.sigmoid(z).mean())
    assert abs(float(prob.mean()) - 0.25) < abs(raw_mean - 0.25) + 1e-6
    assert abs(float(prob.mean()) - 0.25) < 0.03
    # test metrics use the calibrated probabilities, validation metrics the raw ones
    test = trainer.test(model, DataLoader(rows, batch_size=8), verbose=False)[0]
    val = trainer.validate(model, DataLoader(rows, batch_size=8), verbose=False)[0]
    cal_acc = float(((prob >= 0.5).long() == batch["label"]).float().mean())
    raw_acc = float(((torch.sigmoid(z) >= 0.5).long() == batch["label"]).float().mean())
    assert test["test/acc"] == pytest.approx(cal_acc) and val["val/acc"] == pytest.approx(raw_acc)
    # the checkpoint carries the scaling; a checkpoint from before calibration loads as the identity
    path = tmp_path / "head.ckpt"
    trainer.save_checkpoint(path)
    loaded, _ = HeadStage.from_checkpoint(path)
    torch.testing.assert_close(loaded.platt, model.platt)
    with torch.no_grad():
        torch.testing.assert_close(loaded.predict_step(batch, 0)["prob"], prob)
    state = {k: v for k, v in model.state_dict().items() if k != "platt"}
    old = HeadStage(variant="vit_self", dim=16, num_heads=2)
    old.load_state_dict(state)
    assert old.platt.tolist() == list(IDENTITY)


def test_calibrate_false_keeps_the_raw_probabilities():
    torch.manual_seed(0)
    rows = _rows()
    model = HeadStage(variant="vit_self", dim=16, num_heads=2, calibrate=False)
    _fit(model, rows, epochs=1)
    batch, z = _raw(model, rows)
    assert model.platt.tolist() == list(IDENTITY)
    with torch.no_grad():
        prob = model.predict_step(batch, 0)["prob"]
    np.testing.assert_allclose(prob.numpy(), torch.sigmoid(z).numpy(), 1e-6)
