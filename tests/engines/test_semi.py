"""Semi-supervised phase: EMA teacher, pseudo-label store, mixed batches, weighted loss."""

import math

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from ignite.handlers import EMAHandler

from helpers import OracleNet, disk_labels
from mmcs_monai.engines import MixedBatchLoader, PrepareFlowBatch, PseudoLabelRefresher, PseudoLabelStore, sigmoid_rampup
from mmcs_monai.engines.semi import prediction_to_pseudo
from mmcs_monai.flows import labels_to_flows
from mmcs_monai.inference import CellInferer
from mmcs_monai.losses import CellposeLoss, SemiSupervisedLoss
from mmcs_monai.networks import CPnet
from mmcs_monai.transforms import AttachPseudoTargetd, RandCellAffined


def test_teacher_is_exponential_moving_average_of_student():
    torch.manual_seed(0)
    student = CPnet(nbase=(2, 4, 8))
    momentum = 0.1
    ema = EMAHandler(student, momentum=momentum)
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    expected = [p.detach().clone() for p in student.parameters()]

    def step(engine, x):
        opt.zero_grad()
        student(x).pow(2).mean().backward()
        opt.step()

    trainer = Engine(step)
    ema.attach(trainer)
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED,
        lambda e: [t.mul_(1 - momentum).add_(p.detach(), alpha=momentum) for t, p in zip(expected, student.parameters())],
    )
    trainer.run([torch.rand(2, 2, 32, 32) for _ in range(4)], max_epochs=1)
    for t, p, _s in zip(expected, ema.ema_model.parameters(), student.parameters()):
        torch.testing.assert_close(p, t)
    moved = [not torch.equal(p, s) for p, s in zip(ema.ema_model.parameters(), student.parameters()) if s.requires_grad]
    assert any(moved)  # the teacher lags the student


def test_store_accumulates_with_bias_correction_and_round_trips():
    store = PseudoLabelStore(alpha=0.6)
    p1, p2 = torch.full((3, 4, 5), 0.5), torch.full((3, 4, 5), 0.25)
    store.update("a", p1, diameter=12.0)
    torch.testing.assert_close(store.target("a"), p1, atol=1e-3, rtol=0)  # 0.4 * p1 / (1 - 0.6)
    store.update("a", p2, diameter=12.0)
    expected = (0.6 * 0.4 * 0.5 + 0.4 * 0.25) / (1 - 0.6**2)
    torch.testing.assert_close(store.target("a"), torch.full((3, 4, 5), expected), atol=1e-3, rtol=0)
    assert store.diameter("a") == 12.0 and store.entries["a"]["count"] == 2
    restored = PseudoLabelStore()
    restored.load_state_dict(store.state_dict())
    torch.testing.assert_close(restored.target("a"), store.target("a"))


def test_refreshed_pseudo_labels_are_targets_at_the_loss_scale():
    """A teacher that predicts a disc image perfectly (5x flows, logits +-10) leaves pseudo targets the loss
    reads like real ones: unit flows equal to ``labels_to_flows`` of the discs and probabilities 0/1, so
    the student's loss against them, for the teacher's own prediction, is that of a perfect prediction."""
    labels = disk_labels()
    image = torch.as_tensor(np.stack([labels > 0, np.zeros_like(labels)]), dtype=torch.float32)
    teacher = OracleNet(diam_mean=30.0, diam_labels=30.0)
    store = PseudoLabelStore(alpha=0.6)
    inferer = CellInferer(precision="fp32", roi_size=128)
    refresher = PseudoLabelRefresher(store, teacher, teacher, [{"id": "u1", "image": image}], inferer)
    refresher.fill_if_empty(Engine(lambda e, b: None))
    target = store.target("u1")
    assert target.shape == (3, *labels.shape) and store.diameter("u1") == pytest.approx(30.0)
    np.testing.assert_allclose(target[:2].numpy(), labels_to_flows(labels), atol=2e-3)
    np.testing.assert_allclose(target[2].numpy(), (labels > 0).astype(np.float32), atol=1e-3)
    prediction = inferer(image[None], teacher)
    perfect = torch.cat([torch.as_tensor(labels_to_flows(labels)), torch.as_tensor(labels > 0, dtype=torch.float32)[None]])[None]
    torch.testing.assert_close(CellposeLoss()(prediction, target[None]), CellposeLoss()(prediction, perfect), atol=1e-4, rtol=1e-3)


def test_pseudo_labels_record_the_diameter_the_teacher_segmented_at():
    """With ``auto`` (the phase-2 default, ``unlabelled_diameter``) each unlabelled image is segmented at its own
    estimate, and that diameter (not the model's stored mean) is what the store keeps for augmenting its targets."""
    labels = disk_labels()
    image = torch.as_tensor(np.stack([labels > 0, np.zeros_like(labels)]), dtype=torch.float32)
    teacher = OracleNet(diam_mean=30.0, diam_labels=90.0)  # a stored mean 3x off the discs
    store = PseudoLabelStore(alpha=0.6)
    inferer = CellInferer(precision="fp32", roi_size=128, diameter="auto")
    PseudoLabelRefresher(store, teacher, teacher, [{"id": "u1", "image": image}], inferer).fill_if_empty(Engine(lambda e, b: None))
    _, used = inferer.predict(image[None], teacher)
    assert store.diameter("u1") == pytest.approx(used[0]) and abs(used[0] - 90.0) > 30.0, used


def test_a_refresh_predicts_each_image_at_the_diameter_it_was_first_predicted_at():
    """``auto`` is searched once per image, when it enters the store; later refreshes predict at that diameter
    (the search is the costly part on a large pool, and the ensemble then averages predictions at one scale).
    ``keep_diameters=False`` searches again."""
    labels = disk_labels()
    image = torch.as_tensor(np.stack([labels > 0, np.zeros_like(labels)]), dtype=torch.float32)
    teacher = OracleNet(diam_mean=30.0, diam_labels=90.0)
    inferer = CellInferer(precision="fp32", roi_size=128, diameter="auto")
    searched = inferer.predict(image[None], teacher)[1][0]
    for keep, expected in ((True, 45.0), (False, searched)):
        store = PseudoLabelStore(alpha=0.0)  # alpha 0: the store holds the last prediction
        refresher = PseudoLabelRefresher(store, teacher, teacher, [{"id": "u1", "image": image}], inferer, keep_diameters=keep)
        refresher.fill_if_empty(Engine(lambda e, b: None))
        assert store.diameter("u1") == pytest.approx(searched)
        store.entries["u1"]["diameter"] = 45.0  # as if it had first been predicted at 45 px
        refresher.refresh()
        assert store.diameter("u1") == pytest.approx(expected)
        flows, _ = inferer.predict(image[None], teacher, diameter=expected)
        torch.testing.assert_close(store.target("u1"), prediction_to_pseudo(flows[0]), atol=2e-3, rtol=0)


def test_pseudo_targets_rotate_with_the_image():
    labels = disk_labels()
    store = PseudoLabelStore(alpha=0.0)
    flows = torch.as_tensor(labels_to_flows(labels))
    store.update("u1", torch.cat([flows, torch.as_tensor(labels > 0, dtype=torch.float32)[None]]), diameter=30.0)
    image = np.stack([labels > 0, np.zeros_like(labels)]).astype(np.float32)
    item = AttachPseudoTargetd(store)({"id": "u1", "image": image})
    warp = RandCellAffined(keys=["image", "flows"], spatial_size=96, scale_range=0.0)
    warp.affine._angle, warp.affine._flip, warp.affine._scale, warp.affine._center_frac = 1.1, True, 1.0, (0.5, 0.5)
    warp.randomize = lambda data=None: None  # keep the chosen draw
    out = warp(item)
    # The warped image is the cell mask: flows recomputed from it must match the warped pseudo flows.
    from skimage.measure import label as connected

    warped_labels = connected(out["image"][0].numpy() > 0.5)
    expected = labels_to_flows(warped_labels)
    inside = (warped_labels > 0) & (out["flows"][2].numpy() > 0.99)
    got = out["flows"][:2].numpy()
    cos = (got * expected).sum(0)[inside] / (np.linalg.norm(got, axis=0)[inside] * np.linalg.norm(expected, axis=0)[inside] + 1e-8)
    assert cos.mean() > 0.95
    assert out["diameter"] == 30.0
    with pytest.raises(KeyError, match="no pseudo label"):
        AttachPseudoTargetd(store)({"id": "missing"})


def test_weighted_loss_equals_the_formula():
    torch.manual_seed(0)
    pred = torch.randn(5, 3, 16, 16)
    target = torch.cat([torch.randn(5, 2, 16, 16), torch.rand(5, 1, 16, 16)], 1)
    flag = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0])
    full_target = torch.cat([target, flag[:, None, None, None].expand(-1, 1, 16, 16)], 1)
    w = 0.3
    loss = SemiSupervisedLoss(w=w)(pred, full_target)
    base = CellposeLoss()
    lab, unlab = flag > 0.5, flag < 0.5
    expected = (1 - w) * base(pred[lab], target[lab]) + w * base(pred[unlab], target[unlab])
    torch.testing.assert_close(loss, expected)
    only_labelled = SemiSupervisedLoss(w=w)(pred[lab], full_target[lab])
    torch.testing.assert_close(only_labelled, (1 - w) * base(pred[lab], target[lab]))


def test_mixed_batches_cycle_unlabelled_and_flag_samples():
    labelled = [{"image": torch.zeros(2, 2, 8, 8), "flows": torch.zeros(2, 3, 8, 8)} for _ in range(3)]
    unlabelled = [{"image": torch.ones(4, 2, 8, 8), "flows": torch.ones(4, 3, 8, 8)} for _ in range(2)]
    batches = list(MixedBatchLoader(labelled, unlabelled))
    assert len(batches) == 3 and all(b["image"].shape[0] == 6 for b in batches)
    torch.testing.assert_close(batches[0]["labelled"], torch.tensor([1.0, 1, 0, 0, 0, 0]))
    image, target = PrepareFlowBatch(flag_key="labelled")(batches[0])
    assert target.shape == (6, 4, 8, 8) and torch.equal(target[:, 3, 0, 0], batches[0]["labelled"])
    assert [b["image"].shape[0] for b in MixedBatchLoader(labelled, [])] == [2, 2, 2]


def test_sigmoid_rampup():
    assert sigmoid_rampup(0, 10) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(10, 10) == 1.0 and sigmoid_rampup(3, 0) == 1.0


def test_labels_first_then_pseudo_labels_from_the_student():
    """``start_epoch`` 2 (``semi_start_epoch``, the ``finetune_semi`` recipe's "labels first"): epochs 1-2 see labelled
    samples alone with ``w`` 0 and no pseudo label is made; after epoch 2 the teacher is a copy of the student as it
    is then (not the moving average of the pretrained weights it had become) and the store holds that student's
    prediction; from epoch 3 the unlabelled samples join at full weight and the teacher refreshes every 2 epochs."""
    from mmcs_monai.engines import UnlabelledWeightHandler

    torch.manual_seed(0)
    student = CPnet(nbase=(2, 4, 8), diam_mean=30.0)
    ema = EMAHandler(student, momentum=0.5)
    teacher = ema.ema_model
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    labelled = [{"image": torch.rand(2, 2, 32, 32), "flows": torch.zeros(2, 3, 32, 32)} for _ in range(2)]
    unlabelled = [{"image": torch.rand(3, 2, 32, 32), "flows": torch.zeros(3, 3, 32, 32)}]
    loss = SemiSupervisedLoss(w=0.4)
    images = [{"id": "u1", "image": torch.rand(2, 40, 40)}]
    store = PseudoLabelStore(alpha=0.6)
    inferer = CellInferer(precision="fp32", roi_size=64)
    seen: list[tuple[int, int, float]] = []  # (epoch, samples in the batch, w)

    def step(engine, batch):
        seen.append((engine.state.epoch, len(batch["image"]), loss.w))
        opt.zero_grad()
        student(batch["image"]).pow(2).mean().backward()
        opt.step()

    trainer = Engine(step)
    ema.attach(trainer)
    UnlabelledWeightHandler(loss, w_max=0.4, rampup_epochs=0, start_epoch=2).attach(trainer)
    refresher = PseudoLabelRefresher(store, teacher, student, images, inferer, interval=2, start_epoch=2)
    refresher.attach(trainer)
    checked: dict[int, object] = {}

    @trainer.on(Events.EPOCH_COMPLETED)
    def check(engine):  # runs after the refresher (attached later)
        epoch = engine.state.epoch
        checked[epoch] = store.entries["u1"]["count"] if "u1" in store else 0
        if epoch == 2:
            for name, value in student.state_dict().items():
                torch.testing.assert_close(teacher.state_dict()[name], value, msg=name)
            student.eval()  # as the refresher predicts (running batch-norm statistics)
            own, _ = inferer.predict(images[0]["image"][None], student)
            student.train()
            torch.testing.assert_close(store.target("u1"), prediction_to_pseudo(own[0]), atol=2e-3, rtol=0)

    trainer.run(MixedBatchLoader(labelled, unlabelled, start_epoch=2), max_epochs=4)
    assert [(e, n, w) for e, n, w in seen] == [(1, 2, 0.0)] * 2 + [(2, 2, 0.0)] * 2 + [(3, 5, 0.4)] * 2 + [(4, 5, 0.4)] * 2
    assert checked == {1: 0, 2: 1, 3: 1, 4: 2}  # epoch 2's entry: the teacher/store check ran
