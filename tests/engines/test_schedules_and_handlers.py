"""LR schedule values, atomic checkpoints with resume, best-model saving, training diameter."""

import numpy as np
import pytest
import tifffile
import torch
from ignite.engine import Engine, Events

from helpers import disk_labels
from mmcs_monai.engines import (
    BestModelSaver,
    CheckpointHandler,
    SegmentationReport,
    TrainingDiameterHandler,
    TransformRandomState,
    WarmupHalvingSchedule,
)
from mmcs_monai.networks import CPnet, load_cellpose_checkpoint


def test_warmup_then_halving_to_floor():
    s = WarmupHalvingSchedule(warmup_epochs=10, halving_start=1500, halving_every=100, min_factor=0.016)
    assert s(0) == pytest.approx(0.1) and s(9) == pytest.approx(1.0) and s(10) == 1.0 and s(1499) == 1.0
    assert s(1500) == 0.5 and s(1599) == 0.5 and s(1600) == 0.25
    assert s(2499) == pytest.approx(0.016)  # 0.5**10 < floor
    lr = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), s)
    assert lr.get_last_lr()[0] == pytest.approx(0.01)


def _tiny_training(tmp_path, max_epochs, resume):
    torch.manual_seed(0)
    net = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    data = [torch.randn(4, 2) for _ in range(3)]

    def step(engine, x):
        opt.zero_grad()
        loss = net(x).pow(2).mean()
        loss.backward()
        opt.step()
        return loss.item()

    trainer = Engine(step)
    CheckpointHandler(str(tmp_path), {"network": net, "optimizer": opt}, save_interval=1, resume=resume).attach(trainer)
    return trainer, net, data


def test_checkpoint_resume_continues_from_last_epoch(tmp_path):
    trainer, net, data = _tiny_training(tmp_path / "a", 4, resume=False)
    trainer.run(data, max_epochs=4)
    full = net.weight.detach().clone()

    # Interrupted run: 2 epochs, then a new process resumes to 4.
    trainer, net, data = _tiny_training(tmp_path / "b", 2, resume=False)
    trainer.run(data, max_epochs=2)
    trainer, net, data = _tiny_training(tmp_path / "b", 4, resume=True)
    epochs = []
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: epochs.append(e.state.epoch))
    trainer.run(data, max_epochs=4)
    assert epochs == [3, 4]
    torch.testing.assert_close(net.weight.detach(), full)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["checkpoint.pt", "model.pt", "model_final.pt"]


def _augmenting_training(folder, seed, resume):
    """A trainer whose step draws one augmentation per iteration from a pipeline seeded with ``seed`` (as a new
    process's data loader seeds it); the pipeline's random states ride in the checkpoint. Returns (trainer, draws)."""
    from monai.transforms import Compose, RandGaussianNoised, RandScaleIntensityd

    from mmcs_monai.transforms import RandCellAffined

    pipeline = Compose(
        [
            RandScaleIntensityd(keys="image", factors=0.5, prob=1.0),  # draws through its array twin
            Compose([RandGaussianNoised(keys="image", prob=1.0, std=0.1), RandCellAffined(keys="image", spatial_size=8)]),
        ]
    ).set_random_state(seed=seed)
    draws = []

    def step(engine, item):
        draws.append(np.asarray(pipeline({"image": np.ones((2, 16, 16), np.float32)})["image"]).copy())

    trainer = Engine(step)
    CheckpointHandler(
        str(folder), {"network": torch.nn.Linear(1, 1), "augmentation_rng": TransformRandomState(pipeline)}, resume=resume
    ).attach(trainer)
    return trainer, draws


def test_resumed_run_draws_the_augmentations_of_the_uninterrupted_run(tmp_path):
    trainer, full = _augmenting_training(tmp_path / "a", seed=0, resume=False)
    trainer.run([0, 1], max_epochs=4)
    trainer, _ = _augmenting_training(tmp_path / "b", seed=0, resume=False)
    trainer.run([0, 1], max_epochs=2)
    trainer, resumed = _augmenting_training(tmp_path / "b", seed=1, resume=True)  # a new process: new seeds
    trainer.run([0, 1], max_epochs=4)
    assert len(resumed) == 4
    for expected, got in zip(full[4:], resumed):
        np.testing.assert_array_equal(got, expected)
    # the same resume without the saved states draws other augmentations
    trainer, unrestored = _augmenting_training(tmp_path / "c", seed=1, resume=False)
    trainer.run([0, 1], max_epochs=1)
    assert not np.array_equal(unrestored[0], full[4])
    with pytest.raises(ValueError, match="transform random states"):
        TransformRandomState([]).load_state_dict({"states": [np.random.RandomState(0).get_state()]})


def test_best_model_saver_keeps_the_weights_of_the_best_epoch(tmp_path):
    net = CPnet(nbase=(2, 8, 16))
    path = tmp_path / "model.pt"
    saver = BestModelSaver(net, str(path), "f1")
    engine = Engine(lambda e, b: None)
    scores = {1: 0.5, 2: 0.4, 3: 0.7, 4: 0.7}

    def epoch_weights(e):  # each epoch the network changes (as training does) and is scored
        with torch.no_grad():
            net.output[2].bias.fill_(float(e.state.epoch))
        e.state.metrics["f1"] = scores[e.state.epoch]

    engine.add_event_handler(Events.EPOCH_COMPLETED, epoch_weights)
    saver.attach(engine)
    held = []  # the epoch whose weights model.pt holds after each epoch
    engine.add_event_handler(
        Events.EPOCH_COMPLETED,
        lambda e: held.append(float(torch.load(path, weights_only=False)["output.2.bias"][0])),
    )
    engine.run([0], max_epochs=4)
    # 0.4 after 0.5 keeps epoch 1; 0.7 saves epoch 3; an equal 0.7 is not an improvement
    assert held == [1.0, 1.0, 3.0, 3.0] and saver.best == 0.7
    loaded = load_cellpose_checkpoint(path)
    assert loaded.state_dict().keys() == net.state_dict().keys()
    assert torch.equal(loaded.output[2].bias, torch.full_like(loaded.output[2].bias, 3.0))
    restored = BestModelSaver(net, str(path), "f1")
    restored.load_state_dict(saver.state_dict())
    assert restored.best == 0.7


def test_training_diameter_handler_stores_mean_and_subset_table(tmp_path):
    small = disk_labels(shape=(64, 64), centers=((20, 20), (45, 45)), radii=(5, 5))
    large = disk_labels(shape=(64, 64), centers=((20, 20), (45, 45)), radii=(10, 10))
    items = []
    for name, lbl in (("s", small), ("l", large)):
        tifffile.imwrite(tmp_path / f"{name}.tif", lbl)
        items.append({"label": str(tmp_path / f"{name}.tif"), "subset": name})
    items.append({"image": "no-label.tif", "subset": "s"})
    d_small, d_large = (2 * np.sqrt((lbl == 1).sum() / np.pi) for lbl in (small, large))
    net = CPnet(nbase=(2, 8, 16))
    engine = Engine(lambda e, b: None)
    TrainingDiameterHandler(net, items).attach(engine)
    engine.run([0], max_epochs=1)
    assert net.diam_labels.item() == pytest.approx((d_small + d_large) / 2, rel=1e-5)
    assert net.subset_diameters == pytest.approx({"s": d_small, "l": d_large})
    torch.save(net.state_dict(), tmp_path / "model.pt")
    assert load_cellpose_checkpoint(tmp_path / "model.pt").diameter_for("l") == pytest.approx(d_large)


def test_run_if_any_runs_only_with_data(capsys):
    from mmcs_monai.engines import run_if_any

    ran = []
    engine = Engine(lambda e, b: ran.append(b))
    engine.run = lambda: ran.append("ran")
    assert run_if_any(engine, [1], "empty") and ran == ["ran"]
    assert not run_if_any(engine, [], "nothing to segment") and ran == ["ran"]
    assert "nothing to segment" in capsys.readouterr().out


def test_segmentation_summary_counts_only_what_this_run_segmented(tmp_path, caplog):
    """Five images: two segmented by an earlier run (their rows in the summary CSV), one bad, two now. The
    summary line says 2 segmented, 2 skipped, 1 bad, and counts the cells of the two new images only
    (3 + 4, not the 50 + 60 of the earlier rows); the CSV keeps all four segmented images."""
    import csv
    import logging

    from mmcs_monai.cells import SEGMENTATION_SUMMARY, write_segmentation_summary
    from mmcs_monai.data import BadSampleLog

    write_segmentation_summary(
        tmp_path / SEGMENTATION_SUMMARY,
        [
            {"id": "old1", "image": "old1.tif", "cells": 50, "diameter_px": 20.0},
            {"id": "old2", "image": "old2.tif", "cells": 60, "diameter_px": 20.0},
        ],
    )
    bad = BadSampleLog(max_bad_fraction=1.0)
    bad.add({"image": "broken.tif"}, "load", ValueError("not an image"))
    new = {
        "new1": disk_labels(centers=((20, 20), (50, 50), (70, 20)), radii=(5, 5, 5)),
        "new2": disk_labels(centers=((20, 20), (50, 50), (70, 20), (20, 70)), radii=(5, 5, 5, 5)),
    }
    engine = Engine(lambda e, batch: [{"masks": torch.as_tensor(new[item["id"]].astype(np.int32))[None]} for item in batch])
    SegmentationReport(str(tmp_path), images_total=5, bad_samples=bad, progress=False).attach(engine)
    with caplog.at_level(logging.INFO, logger="mmcs_monai"):
        engine.run([[{"id": "new1", "image_file": "new1.tif"}], [{"id": "new2", "image_file": "new2.tif"}]], max_epochs=1)
    summary = [r.getMessage() for r in caplog.records if "image(s) segmented" in r.getMessage()]
    assert len(summary) == 1 and summary[0].startswith("2 image(s) segmented, 2 skipped (masks already there), 1 bad"), summary
    assert "; 7 cells;" in summary[0], summary
    with open(tmp_path / SEGMENTATION_SUMMARY, newline="") as f:
        rows = {r["id"]: int(r["cells"]) for r in csv.DictReader(f)}
    assert rows == {"old1": 50, "old2": 60, "new1": 3, "new2": 4}
