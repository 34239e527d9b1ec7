"""Frozen backbone, computed once (issue 14, item 1): datamodules/feature_cache.py and
lightning_modules/feature_cache.py through the ViT stage.

A fit with the cache trains the same weights as one without (same seed, float tolerance) while running the
backbone only in the one build pass; a second fit reuses the file; a changed backbone, data or setting
rebuilds it; a killed build leaves nothing that looks finished.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil

import h5py
import lightning.pytorch as L
import numpy as np
import pytest
import torch

from datamodules import feature_cache as fc
from datamodules.stacks import StackDataModule
from lightning_modules.feature_cache import FrozenFeatureCache, module_digest
from lightning_modules.vit_stage import ViTStage
from tests.stanford_files import write_stanford

FRAMES = {
    f"{n}_": list(range(1, 10)) for n in (12, 7, 3, 45, 50, 60, 70, 129)
}  # 3 stacks each; 12_, 7_ first (write_stanford)
LABELS = {nid: i % 2 for i, nid in enumerate(FRAMES)}
SPLIT = {"train": ["3_", "7_", "12_", "45_", "50_"], "val": ["60_", "70_"], "test": ["129_"]}
N_TRAIN, N_VAL, BATCH = 15, 6, 4


def speckle(h5, seed):
    """Random pixels in place of write_stanford's flat frames (the crops then differ item by item), written to
    a copy that replaces the file (earlier fits of this process may still hold it open)."""
    tmp = h5.with_name("new.hdf5")
    shutil.copyfile(h5, tmp)
    with h5py.File(tmp, "r+") as f:
        f["image"][...] = np.random.default_rng(seed).integers(0, 256, f["image"].shape, dtype=np.uint8)
    os.replace(tmp, h5)


@pytest.fixture()
def files(tmp_path):
    h5 = write_stanford(tmp_path / "stanford", shape=(40, 48), frames=FRAMES, labels=LABELS)
    speckle(h5, 0)
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"k": 1, "seed": 0, "folds": [{"fold": 0, **SPLIT}]}))
    return h5, splits


def fit(files, root, *, cache=True, epochs=2, seed=0, augment=False, img_size=32, dropout=0.1):
    """One seeded fit of a frozen ``test_vit`` ViT stage; returns (model, cache callback or None, backbone calls)."""
    h5, splits = files
    L.seed_everything(seed)
    model = ViTStage(
        backbone="test_vit", img_size=img_size, dropout=dropout, focal_alpha=None, feature_cache=cache
    )
    model.configure_optimizers = lambda: torch.optim.SGD(model.net.parameters(), lr=0.5, momentum=0.9)
    calls = []
    backbone = model.net.backbone
    run = backbone.forward_features  # what forward_backbone calls (no forward hook fires on it)
    backbone.forward_features = lambda x: (calls.append(1), run(x))[1]
    dm = StackDataModule(
        str(h5), str(splits), img_size=img_size, batch_size=BATCH, normalize="half", augment=augment
    )
    L.seed_everything(seed)
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=1,
        default_root_dir=root,
    )
    trainer.fit(model, datamodule=dm)
    found = [cb for cb in trainer.callbacks if isinstance(cb, FrozenFeatureCache)]
    assert type(dm.datasets["train"]).__name__ == "StackDataset"  # the image datasets are back after the fit
    return model, (found[0] if found else None), len(calls)


def batches(n):
    return -(-n // BATCH)


def test_cached_fit_trains_the_uncached_weights_and_runs_the_backbone_once(files, tmp_path):
    plain, none, plain_calls = fit(files, tmp_path / "plain", cache=False)
    assert none is None and not (tmp_path / "plain" / "feature_cache").exists()
    cached, cb, cached_calls = fit(files, tmp_path / "cached")
    assert cb.report["train"]["what"] == cb.report["val"]["what"] == "built (no cache yet)"
    assert (cb.report["train"]["rows"], cb.report["val"]["rows"]) == (N_TRAIN, N_VAL)
    # The backbone ran in the one build pass per part, never in the epochs; without the cache, every step.
    assert cached_calls == batches(N_TRAIN) + batches(N_VAL)
    assert plain_calls == 1 + 2 * (batches(N_TRAIN) + batches(N_VAL))  # 1 sanity batch, 2 epochs
    a, b = plain.state_dict(), cached.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    L.seed_everything(0)  # the same seed-0 init: the head did move, the backbone did not
    start = ViTStage(backbone="test_vit", img_size=32, dropout=0.1, focal_alpha=None)
    assert not torch.allclose(start.net.fc1.weight, a["net.fc1.weight"])
    torch.testing.assert_close(start.net.backbone.state_dict(), plain.net.backbone.state_dict())

    # The file holds the backbone's own pooled features of the train items, in order.
    dm = StackDataModule(str(files[0]), str(files[1]), img_size=32, batch_size=BATCH, normalize="half")
    dm.setup("fit")
    images = torch.stack([dm.datasets["train"][i]["image"] for i in range(N_TRAIN)])
    with torch.no_grad():
        want = cached.net.eval().forward_backbone(images)
    got = fc.load(tmp_path / "cached" / "feature_cache" / "train.h5")
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-6)

    _, again, again_calls = fit(files, tmp_path / "cached", epochs=1)
    assert again.report["train"]["what"] == again.report["val"]["what"] == "reused"
    assert again_calls == 0


def test_cache_is_rebuilt_when_the_backbone_data_or_settings_change(files, tmp_path):
    root = tmp_path / "run"
    _, cb, _ = fit(files, root, epochs=1)
    assert cb.report["train"]["what"] == "built (no cache yet)"
    _, cb, _ = fit(files, root, epochs=1, seed=1)  # another random init = another backbone
    assert cb.report["train"]["what"] == cb.report["val"]["what"] == "built (encoder changed)"
    speckle(files[0], 1)  # same file, same shapes, other pixels
    _, cb, _ = fit(files, root, epochs=1, seed=1)
    assert cb.report["train"]["what"] == "built (data changed)"
    _, cb, calls = fit(files, root, epochs=1, seed=1)
    assert cb.report["train"]["what"] == "reused" and calls == 0
    _, cb, _ = fit(files, root, epochs=1, seed=1, img_size=48)  # a new input size (and position table)
    assert cb.report["train"]["what"].startswith("built (")
    # Augmented crops change every epoch: the training part is not cached, validation still is.
    _, cb, calls = fit(files, tmp_path / "aug", epochs=1, augment=True)
    assert "train" not in cb.report and cb.report["val"]["what"] == "built (no cache yet)"
    assert not (tmp_path / "aug" / "feature_cache" / "train.h5").exists()
    assert calls == batches(N_VAL) + batches(N_TRAIN)  # the val build, then one epoch of train images


class _Items(torch.utils.data.Dataset):
    """The dataset interface the cache reads: ``read`` (raw) and ``item`` (network input)."""

    def __init__(self, n=10, seed=0):
        self.x = np.random.default_rng(seed).integers(0, 256, (n, 3, 4, 4), dtype=np.uint8)

    def __len__(self):
        return len(self.x)

    def read(self, i):
        return self.x[i]

    def item(self, i, x):
        return {"image": torch.from_numpy(x).float()}


def _dies_on_batch(stop):
    seen = []

    def encode(images):
        seen.append(1)
        if len(seen) == stop:
            os._exit(9)  # a kill: no exception handler, no cleanup runs
        return images.flatten(1)[:, :5]

    return encode


def _build_then_die(path):
    fc.build(path, _Items(), {"format": fc.FORMAT}, _dies_on_batch(3), batch_size=2, num_workers=0)


def test_a_killed_or_failed_build_leaves_no_finished_looking_cache(tmp_path):
    path = tmp_path / "feature_cache" / "train.h5"
    child = multiprocessing.get_context("fork").Process(target=_build_then_die, args=(path,))
    child.start()
    child.join(60)
    assert child.exitcode == 9
    assert not path.exists() and fc.read_key(path) is None
    left = list(path.parent.iterdir())
    assert [p.name for p in left] == [f".train.h5.partial-{child.pid}.h5"]  # half written, hidden, never read

    def boom(images):
        raise RuntimeError("encoder failed")

    with pytest.raises(RuntimeError, match="encoder failed"):
        fc.cached_features(path, _Items(), {}, boom, batch_size=2)
    assert (
        list(path.parent.iterdir()) == []
    )  # the killed build's partial file was cleared, the failed one too

    feats, key, what = fc.cached_features(path, _Items(), {}, lambda x: x.flatten(1)[:, :5], batch_size=3)
    assert what == "built (no cache yet)" and feats.shape == (10, 5) and fc.read_key(path) == key
    np.testing.assert_array_equal(feats, _Items().x.reshape(10, -1)[:, :5])
    assert fc.cached_features(path, _Items(), {}, boom, batch_size=3)[2] == "reused"
    assert fc.cached_features(path, _Items(seed=1), {}, lambda x: x[:, :5, 0, 0], batch_size=3)[2] == (
        "built (data changed)"
    )


def test_module_digest_follows_weights_and_settings():
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    d = module_digest(net, img_size=32)
    assert module_digest(net, img_size=32) == d
    assert module_digest(net, img_size=48) != d
    with torch.no_grad():
        net.weight[0, 0] += 1e-6
    assert module_digest(net, img_size=32) != d
