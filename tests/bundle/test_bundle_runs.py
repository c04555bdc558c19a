"""The bundle runs for real through ``python -m monai.bundle`` on the built-in sample data (tiny network)."""

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from helpers import BUNDLE, TINY, bundle, configs, subprocess_env
from mmcs_monai.data import load_datalist
from mmcs_monai.diameters import median_diameter
from mmcs_monai.io import read_labels
from mmcs_monai.networks import load_cellpose_checkpoint
from mmcs_monai.workflows import bundle_command

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-epoch training run with validation each epoch; returns its checkpoint folder."""
    out = tmp_path_factory.mktemp("run")
    bundle(
        "run",
        "training",
        "--config_file",
        configs("train.json"),
        "--meta_file",
        str(BUNDLE / "configs/metadata.json"),
        "--bundle_root",
        str(BUNDLE),
        "--ckpt_dir",
        str(out / "models"),
        "--output_dir",
        str(out / "eval"),
        "--epochs",
        "2",
        "--val_interval",
        "1",
        *TINY,
    )
    return out


def test_training_writes_models_with_training_diameter(trained):
    models = trained / "models"
    assert {"checkpoint.pt", "model.pt", "model_final.pt"} <= {p.name for p in models.iterdir()}
    net = load_cellpose_checkpoint(models / "model_final.pt")
    # Sample nuclei are 10-25 px across: the stored mean must be in that range, not the 30 px default.
    assert 8 < net.diam_labels.item() < 30 and net.diam_mean.item() == 30.0
    # and the per-subset table, measured independently from the training labels
    items = load_datalist(BUNDLE / "sample_data" / "datalist.json", split="train")
    for subset, diameter in net.subset_diameters.items():
        labels = [read_labels(i["label"]) for i in items if i["subset"] == subset]
        assert diameter == pytest.approx(np.mean([median_diameter(lbl) for lbl in labels]), rel=1e-5)
    assert set(net.subset_diameters) == {i["subset"] for i in items}
    state = torch.load(models / "checkpoint.pt", weights_only=False)
    assert state["trainer"]["iteration"] == 2 * state["trainer"]["epoch_length"] and {"network", "optimizer", "lr_scheduler", "rng"} <= set(
        state
    )
    assert any(p.name.startswith("events.out.tfevents") for p in (trained / "eval").iterdir())


def test_evaluate_writes_per_image_f1(trained, tiny_model):
    """evaluate.json's per-image F1 and per-subset means, against the library run here on the same images."""
    import csv

    from mmcs_monai.flows import flows_to_masks
    from mmcs_monai.inference import CellInferer
    from mmcs_monai.metrics import f1_score
    from mmcs_monai.transforms import inference_preprocessing

    out = trained / "eval_f1"
    bundle(
        "run",
        "evaluating",
        "--config_file",
        configs("train.json", "evaluate.json"),
        "--bundle_root",
        str(BUNDLE),
        "--model_path",
        str(tiny_model),
        "--output_dir",
        str(out),
        "--inference_precision",
        "fp32",
        *TINY,
    )
    with open(out / "f1_per_image.csv") as f:
        rows = {r["id"]: r for r in csv.DictReader(f)}
    items = load_datalist(BUNDLE / "sample_data" / "datalist.json", split="val")
    assert sorted(rows) == sorted(i["id"] for i in items)
    net = load_cellpose_checkpoint(tiny_model).eval()
    load = inference_preprocessing(keys=["image", "label"])
    expected = {}
    for item in items:
        data = load(dict(item))
        # evaluate's default diameter is auto: estimated per image, reported in the diameter_px column
        image = torch.as_tensor(np.asarray(data["image"]))[None]
        flows, used = CellInferer(roi_size=224, precision="fp32").predict(image, net, diameter="auto")
        flows = flows[0].numpy()
        score = f1_score(np.asarray(data["label"])[0], flows_to_masks(flows[:2], flows[2]), border=2)
        expected[item["id"]] = score["f1"]
        row = rows[item["id"]]
        assert float(row["f1"]) == pytest.approx(score["f1"], abs=1e-6) and int(row["tp"]) == score["tp"]
        assert float(row["diameter_px"]) == pytest.approx(used[0], abs=0.05)
        assert row["subset"] == item["subset"]
    assert max(expected.values()) > 0  # the model finds cells: the comparison is not 0 == 0
    summary = json.loads((out / "f1_summary.json").read_text())
    assert summary["overall"] == {"f1": pytest.approx(np.mean(list(expected.values()))), "images": len(items)}
    for subset in {i["subset"] for i in items}:
        mine = [expected[i["id"]] for i in items if i["subset"] == subset]
        assert summary[subset] == {"f1": pytest.approx(np.mean(mine)), "images": len(mine)}


def test_resume_continues_to_more_epochs(trained, tmp_path):
    shutil.copytree(trained / "models", tmp_path / "models")  # the other tests keep the 2-epoch run
    log = bundle(
        "run",
        "training",
        "--config_file",
        configs("train.json"),
        "--bundle_root",
        str(BUNDLE),
        "--ckpt_dir",
        str(tmp_path / "models"),
        "--output_dir",
        str(tmp_path / "eval"),
        "--epochs",
        "3",
        "--val_interval",
        "5",
        "--resume",
        "True",
        *TINY,
    )
    assert "Epoch: 3/3" in log and "Epoch: 1/3" not in log
    trainer_state = torch.load(tmp_path / "models" / "checkpoint.pt", weights_only=False)["trainer"]
    assert trainer_state["iteration"] == 3 * trainer_state["epoch_length"]


def test_inference_writes_masks_and_overlays_then_skips_done(trained, tmp_path):
    images = BUNDLE / "sample_data" / "images"
    args = [
        "run",
        "inference",
        "--config_file",
        configs("inference.json"),
        "--bundle_root",
        str(BUNDLE),
        "--model_path",
        str(trained / "models" / "model.pt"),
        "--input_dir",
        str(images),
        "--output_dir",
        str(tmp_path),
        "--cellprob_threshold",
        "-10",
        # the stored diameter: a 2-epoch model finds no cell size to measure (``auto`` is tested on the
        # small trained model elsewhere), and segmenting at one size keeps this run short
        "--diameter",
        "stored",
    ]
    bundle(*args)
    stored = torch.load(trained / "models" / "model.pt", weights_only=False)["diam_labels"]
    names = {p.name for p in tmp_path.iterdir()}
    stems = [p.stem for p in images.iterdir()]
    assert names == {f"{s}_masks.tif" for s in stems} | {f"{s}_overlay.png" for s in stems} | {"segmentation_summary.csv"}
    first = tmp_path / f"{stems[0]}_masks.tif"
    masks = tifffile.imread(first)
    assert masks.dtype == np.uint16 and masks.shape == tifffile.imread(images / f"{stems[0]}.tif").shape[:2]
    # one summary row per image: its cells and the diameter it was segmented at (the model's stored one)
    with open(tmp_path / "segmentation_summary.csv") as f:
        summary = {r["id"]: r for r in csv.DictReader(f)}
    assert sorted(summary) == sorted(stems)
    for stem, row in summary.items():
        assert int(row["cells"]) == tifffile.imread(tmp_path / f"{stem}_masks.tif").max()
        assert float(row["diameter_px"]) == pytest.approx(float(stored), abs=0.05)
    before = first.stat().st_mtime_ns
    assert "nothing to segment" in bundle(*args)
    assert first.stat().st_mtime_ns == before


def test_metadata_and_network_shape_verify_offline():
    cfg = str(BUNDLE / "configs")
    bundle("verify_metadata", "--meta_file", f"{cfg}/metadata.json", "--filepath", f"{cfg}/metadata_schema.json")
    bundle(
        "verify_net_in_out",
        "network_def",
        "--meta_file",
        f"{cfg}/metadata.json",
        "--config_file",
        f"{cfg}/train.json",
        "--bundle_root",
        str(BUNDLE),
        "--n",
        "4",
        "--nbase",
        "[2,8,16,32]",
    )


def test_two_phase_semi_supervised_run(trained, tmp_path):
    """Phase 2 starts from phase 1's model, trains on labelled + unlabelled sample images, labels first: epoch 1 on the
    labels alone (``semi_start_epoch`` 1, ``w`` 0), then pseudo labels from the student after it and refreshes."""
    out = tmp_path / "semi"
    bundle(
        "run",
        "training",
        "--config_file",
        configs("train.json", "semi.json"),
        "--bundle_root",
        str(BUNDLE),
        "--pretrained",
        str(trained / "models" / "model_final.pt"),
        "--ckpt_dir",
        str(out / "models"),
        "--output_dir",
        str(out / "eval"),
        "--epochs",
        "3",
        "--semi_start_epoch",
        "1",
        "--val_interval",
        "1",
        "--pseudo_interval",
        "1",
        "--unlabelled_batch_size",
        "2",
        "--w_unlabelled",
        "0.4",
        *TINY,
    )
    state = torch.load(out / "models" / "checkpoint.pt", weights_only=False)
    images = sorted(p.stem for p in (BUNDLE / "sample_data" / "images").iterdir())
    store = state["pseudo_labels"]["entries"]
    assert sorted(store) == images
    # from the student after epoch 1, then refreshes after epochs 2 and 3
    assert {e["count"] for e in store.values()} == {3}
    assert set(state["teacher"]) == set(state["network"])

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "eval"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss_labelled", "loss_unlabelled", "w_unlabelled", "lr", "val_f1", "val_f1_teacher"} <= tags
    assert "unlabelled/pseudo_masks" in events.Tags()["images"]
    assert [e.value for e in events.Scalars("w_unlabelled")] == pytest.approx([0.0, 0.4, 0.4])
    per_epoch = len(events.Scalars("loss_labelled")) // 3
    assert min(e.step for e in events.Scalars("loss_unlabelled")) == per_epoch + 1  # no unlabelled batch in epoch 1


def test_bad_files_are_skipped_and_reported_in_training_and_inference(tmp_path):
    """A data list with a broken image and a mismatched label trains; a folder with junk segments the rest."""
    sample = json.loads((BUNDLE / "sample_data" / "datalist.json").read_text())
    root = BUNDLE / "sample_data"
    (tmp_path / "broken.tif").write_bytes(b"II*\x00 this is not really a tiff")
    tifffile.imwrite(tmp_path / "wrong_size.tif", np.zeros((10, 10), np.uint16))
    training = [dict(i, image=str(root / i["image"]), label=str(root / i["label"])) for i in sample["training"]]
    training += [
        {"image": str(tmp_path / "broken.tif"), "label": training[0]["label"], "id": "broken"},
        {"image": training[0]["image"], "label": str(tmp_path / "wrong_size.tif"), "id": "wrong_size"},
    ]
    validation = [dict(i, image=str(root / i["image"]), label=str(root / i["label"])) for i in sample["validation"]]
    (tmp_path / "datalist.json").write_text(json.dumps({"training": training, "validation": validation}))
    log = bundle(
        "run",
        "training",
        "--config_file",
        configs("train.json"),
        "--bundle_root",
        str(BUNDLE),
        "--data_source",
        str(tmp_path / "datalist.json"),
        "--ckpt_dir",
        str(tmp_path / "models"),
        "--output_dir",
        str(tmp_path / "eval"),
        "--epochs",
        "1",
        "--val_interval",
        "1",
        "--max_bad_fraction",
        "0.2",
        *TINY,
    )
    assert "2 bad sample(s) skipped" in log
    report = (tmp_path / "eval" / "bad_samples.csv").read_text()
    assert "broken.tif" in report and "(10, 10)" in report and report.count("\n") == 3
    assert (tmp_path / "models" / "model_final.pt").is_file()

    images = tmp_path / "images"
    images.mkdir()
    for i in sample["validation"]:
        (images / Path(i["image"]).name).write_bytes((root / i["image"]).read_bytes())
    (images / "junk.png").write_bytes(b"\x89PNG not an image")
    bundle(
        "run",
        "inference",
        "--config_file",
        configs("inference.json"),
        "--bundle_root",
        str(BUNDLE),
        "--model_path",
        str(tmp_path / "models" / "model_final.pt"),
        "--input_dir",
        str(images),
        "--output_dir",
        str(tmp_path / "out"),
    )
    written = {p.name for p in (tmp_path / "out").iterdir()}
    assert {f"{Path(i['image']).stem}_masks.tif" for i in sample["validation"]} <= written
    assert "junk.png" in (tmp_path / "out" / "bad_samples.csv").read_text()


def test_too_many_bad_files_stop_training_with_a_clear_message(tmp_path):
    (tmp_path / "empty.tif").write_bytes(b"")
    sample = json.loads((BUNDLE / "sample_data" / "datalist.json").read_text())
    root = BUNDLE / "sample_data"
    training = [dict(i, image=str(root / i["image"]), label=str(root / i["label"])) for i in sample["training"][:3]]
    training += [{"image": str(tmp_path / "empty.tif"), "label": training[0]["label"], "id": "e"}]
    (tmp_path / "datalist.json").write_text(json.dumps({"training": training, "validation": []}))
    overrides = {"data_source": tmp_path / "datalist.json", "ckpt_dir": tmp_path / "models", "output_dir": tmp_path / "eval", "epochs": 1}
    cmd = [sys.executable, "-m", *bundle_command("training", bundle_root=BUNDLE, overrides=overrides), *TINY]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=subprocess_env())
    assert result.returncode != 0
    assert "1 of 4 samples in the data list are unusable (25% > max_bad_fraction 10%)" in result.stderr
    assert "empty.tif: file is empty" in result.stderr
