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
    TrainingDiameterHandler,
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
