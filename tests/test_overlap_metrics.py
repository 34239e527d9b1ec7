"""Issue 10 item 7: the project's own Dice / IoU and AUROC bootstrap equal the library functions they stand for.

``PixelOverlap`` (MSU-Net and TransUNet stages) is kept by hand for exactness under DDP padding; here it must
give torchmetrics' and scikit-learn's numbers on random masks, empty masks and an all-empty epoch included.
``bootstrap_auroc`` is kept by hand for speed and one-class resamples; with the same random generator it must
give ``scipy.stats.bootstrap``'s percentile interval.  (The focal loss against ``torchvision.ops.
sigmoid_focal_loss``: tests/test_losses.py.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import bootstrap
from sklearn.metrics import f1_score, jaccard_score, roc_auc_score
from torchmetrics.classification import BinaryF1Score, BinaryJaccardIndex
from torchmetrics.segmentation import DiceScore

from lightning_modules.seg_stage import PixelOverlap
from stages.report import bootstrap_auroc


def _masks(seed: int, n: int = 6, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 1, s, s) probabilities and {0, 1} targets; frame 0 empty in both, frame 1 target empty only, frame 2
    prediction empty only (what frames without a nodule look like)."""
    g = torch.Generator().manual_seed(seed)
    prob = torch.rand(n, 1, size, size, generator=g)
    target = (torch.rand(n, 1, size, size, generator=g) > 0.7).float()
    prob[0], target[0] = 0.1, 0.0
    target[1] = 0.0
    prob[2] = 0.2
    return prob, target


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pixel_overlap_equals_torchmetrics_and_sklearn(seed):
    prob, target = _masks(seed)
    ours = PixelOverlap()
    f1, jac = BinaryF1Score(), BinaryJaccardIndex()
    dice = DiceScore(
        num_classes=2, include_background=False, input_format="index", aggregation_level="global"
    )
    for sl in (slice(0, 2), slice(2, 6)):  # two batches: counts pooled over the epoch
        ours.update(prob[sl], target[sl])
        f1.update(prob[sl].flatten(), target[sl].flatten().long())
        jac.update(prob[sl].flatten(), target[sl].flatten().long())
        dice.update((prob[sl, 0] > 0.5).long(), target[sl, 0].long())
    got = ours.compute()
    pred, true = (prob.flatten() > 0.5).numpy().astype(int), target.flatten().numpy().astype(int)
    assert got["dice"].item() == pytest.approx(f1.compute().item(), abs=1e-6)
    assert got["dice"].item() == pytest.approx(dice.compute().item(), abs=1e-6)
    assert got["dice"].item() == pytest.approx(f1_score(true, pred), abs=1e-6)
    assert got["iou"].item() == pytest.approx(jac.compute().item(), abs=1e-6)
    assert got["iou"].item() == pytest.approx(jaccard_score(true, pred), abs=1e-6)


def test_pixel_overlap_all_empty_epoch_is_zero_as_torchmetrics():
    prob, target = torch.full((3, 1, 8, 8), 0.1), torch.zeros(3, 1, 8, 8)
    ours = PixelOverlap()
    ours.update(prob, target)
    got = ours.compute()
    f1 = BinaryF1Score()(prob.flatten(), target.flatten().long())
    jac = BinaryJaccardIndex()(prob.flatten(), target.flatten().long())
    assert got["dice"].item() == f1.item() == 0.0
    assert got["iou"].item() == jac.item() == 0.0
    assert (
        f1_score([0] * 4, [0] * 4, zero_division=0) == 0.0
    )  # scikit-learn's convention with zero_division=0


def test_pixel_overlap_counts_a_padding_repeat_once_where_torchmetrics_counts_it_twice():
    """Why it is kept: a frame repeated (same nodule, frame) by DistributedSampler padding counts once."""
    prob, target = _masks(5, n=4)
    keyed = PixelOverlap()
    nodule, frame = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1])
    keyed.update(prob, target, nodule, frame)
    keyed.update(prob[3:], target[3:], nodule[3:], frame[3:])  # the padding repeat
    once = PixelOverlap()
    once.update(prob, target)
    f1 = BinaryF1Score()
    f1.update(prob.flatten(), target.flatten().long())
    f1.update(prob[3:].flatten(), target[3:].flatten().long())
    assert keyed.compute()["dice"].item() == pytest.approx(once.compute()["dice"].item(), abs=1e-7)
    assert f1.compute().item() != pytest.approx(once.compute()["dice"].item(), abs=1e-7)


@pytest.mark.parametrize("seed", [0, 3])
def test_bootstrap_auroc_equals_scipy_percentile_bootstrap(seed):
    rng = np.random.default_rng(seed)
    label = np.r_[np.ones(40, int), np.zeros(60, int)]
    prob = np.clip(0.3 * label + rng.normal(0.4, 0.2, 100), 0, 1)
    ours = bootstrap_auroc(label, prob, n_boot=500, seed=seed)
    ref = bootstrap(
        (label, prob),
        lambda y, p: roc_auc_score(y, p),
        paired=True,
        vectorized=False,
        n_resamples=500,
        method="percentile",
        random_state=np.random.default_rng(seed),
    ).confidence_interval
    assert ours == pytest.approx((ref.low, ref.high), abs=1e-12)
