"""Distributed training and inference: real 2-process ``torchrun`` runs (gloo on CPU) through the bundle and the CLI."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from helpers import subprocess_env
from mmcs_monai import distributed
from mmcs_monai.engines import checkpointing
from mmcs_monai.io import read_image, read_labels
from mmcs_monai.networks import CPnet
from mmcs_monai.workflows import bundle_command

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
SAMPLE_IMAGES = BUNDLE / "sample_data" / "images"
TINY = ["--nbase", "[2,8,16,32]", "--patch_size", "64", "--batch_size", "4", "--num_workers", "0"]
TINY_PRETRAINED = ["--nbase", "[2,16,32,64]", *TINY[2:]]  # the architecture of tests/data/tiny_cpnet.pt


def torchrun(*args, nproc=2):
    """Run ``python -m <args>`` under ``torchrun --standalone`` (a free rendezvous port) with ``nproc`` ranks."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", *map(str, args)]
    env = subprocess_env(OMP_NUM_THREADS="1")
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result.stdout + result.stderr


# ---------------------------------------------------------------------- single-process behaviour


@pytest.mark.parametrize("n, world", [(10, 2), (7, 3), (2, 4), (0, 2)])
def test_shards_are_disjoint_cover_the_list_and_keep_order(n, world):
    items = list(range(n))
    shards = [distributed.shard(items, rank, world) for rank in range(world)]
    assert sorted(sum(shards, [])) == items
    assert all(s == sorted(s) for s in shards)
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_single_process_helpers_are_no_ops():
    assert not distributed.init_process_group()  # no WORLD_SIZE: stays single
    assert (distributed.get_rank(), distributed.get_world_size(), distributed.is_main_process()) == (0, 1, True)
    assert distributed.all_gather_objects({"a": 1}) == [{"a": 1}]
    assert distributed.broadcast_object(5) == 5
    assert distributed.distributed_sampler([1, 2, 3]) is None
    net = torch.nn.Linear(2, 2)
    assert distributed.wrap_ddp(net) is net
    distributed.NullSummaryWriter().add_scalar("x", 1.0, 1)  # accepts any call


def test_only_rank_zero_writes_checkpoints_and_best_models(tmp_path, monkeypatch):
    from ignite.engine import Engine

    net = CPnet(nbase=[2, 8, 16])
    checkpoint = checkpointing.CheckpointHandler(str(tmp_path), {"network": net})
    best = checkpointing.BestModelSaver(net, str(tmp_path / "model.pt"))
    engine = Engine(lambda e, b: None)
    engine.state.metrics = {"val_f1": 0.5}
    monkeypatch.setattr(checkpointing, "is_main_process", lambda: False)
    checkpoint.save_dict.setdefault("trainer", engine)
    checkpoint.save(engine)
    checkpoint.save_final(engine)
    best(engine)
    assert list(tmp_path.iterdir()) == [] and best.best == 0.5  # tracked on every rank, written by none here
    monkeypatch.setattr(checkpointing, "is_main_process", lambda: True)
    checkpoint.save_final(engine)
    assert {p.name for p in tmp_path.iterdir()} == {"checkpoint.pt", "model_final.pt", "model.pt"}


# ---------------------------------------------------------------------- torchrun


def _rank_dump_config(tmp_path, with_store=False):
    """Extra config: at the end each rank saves its weights (and pseudo-label store) as rank<r>.pt."""
    save = {"network": "$mmcs_monai.engines.utils.unwrap(@network).state_dict()"}
    if with_store:
        save["store"] = "$@pseudo_store.state_dict()"
        save["teacher"] = "$@teacher.state_dict()"
        save["predicted"] = "$[h for h in @train#handlers if isinstance(h, mmcs_monai.engines.PseudoLabelRefresher)][0].predicted_ids"
    expression = (
        "$torch.save({" + ", ".join(f"'{k}': {v[1:]}" for k, v in save.items()) + "}, "
        f"'{tmp_path}/rank' + str(mmcs_monai.distributed.get_rank()) + '.pt')"
    )
    path = tmp_path / "dump_ranks.json"
    path.write_text(json.dumps({"finalize": [expression, "$@summary_writer.close()", "$mmcs_monai.distributed.destroy_process_group()"]}))
    return path


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if torch.is_tensor(a[key]):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def single_process_f1(models, tmp_path, *extra) -> float:
    """Mean validation F1 of ``models/model.pt`` on the sample val split, scored by one process (evaluate.json)."""
    out = tmp_path / "single_eval"
    # inference_diameter stored: as the training run's validation segments
    overrides = {"model_path": models / "model.pt", "inference_diameter": "stored", "output_dir": out}
    command = [sys.executable, "-m", *bundle_command("evaluating", bundle_root=BUNDLE, overrides=overrides), *map(str, extra), *TINY]
    env = subprocess_env(OMP_NUM_THREADS="1")
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "f1_summary.json").read_text())["overall"]["f1"]


@pytest.mark.slow
def test_torchrun_training_through_the_bundle(tmp_path, tiny_model):
    out = tmp_path / "run"
    # from the small trained model at a small learning rate: validation finds cells, so per-image F1s differ
    # and a wrong reduction (one rank's mean, a sum) cannot give the single-process mean by chance
    overrides = {"ckpt_dir": out / "models", "output_dir": out / "eval", "epochs": 2, "val_interval": 1, "inference_precision": "fp32"}
    overrides.update(pretrained=tiny_model, learning_rate=0.001)
    files = ["train.json", "multi_gpu_train.json", _rank_dump_config(tmp_path)]
    log = torchrun(*bundle_command("training", files, BUNDLE, overrides), *TINY_PRETRAINED)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False)["network"] for r in (0, 1)]
    _assert_same_state(ranks[0], ranks[1])  # DDP kept the ranks identical
    _assert_same_state(torch.load(out / "models" / "model_final.pt", weights_only=False), ranks[0])
    state = torch.load(out / "models" / "checkpoint.pt", weights_only=False)
    # 9 training images, batch 4: one process would take 3 steps per epoch, each of 2 ranks takes 2
    assert state["trainer"]["epoch_length"] == 2 and state["trainer"]["iteration"] == 4
    assert len(list((out / "eval").glob("events.out.tfevents*"))) == 1  # TensorBoard from rank 0 only
    assert {p.name for p in (out / "models").iterdir()} == {"checkpoint.pt", "model.pt", "model_final.pt"}
    # 3 validation images over 2 ranks (2 + 1): the all-reduced F1 of the best epoch is one process's F1
    best = state["best_model"]["best"]
    assert best > 0.2
    assert best == pytest.approx(single_process_f1(out / "models", tmp_path, "--inference_precision", "fp32"), abs=1e-4)
    assert f"val_f1: {best:.4f}" in log


@pytest.mark.slow
def test_torchrun_semi_supervised_ranks_share_teacher_and_pseudo_labels(tmp_path):
    out = tmp_path / "run"
    files = ["train.json", "semi.json", "multi_gpu_train.json", _rank_dump_config(tmp_path, with_store=True)]
    overrides = {"ckpt_dir": out / "models", "output_dir": out / "eval", "epochs": 2, "val_interval": 2, "pseudo_interval": 1}
    torchrun(*bundle_command("training", files, BUNDLE, {**overrides, "unlabelled_batch_size": 4}), *TINY)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    _assert_same_state(ranks[0]["network"], ranks[1]["network"])
    stores = [r["store"]["entries"] for r in ranks]
    assert len(stores[0]) == 12  # every unlabelled sample image, though each rank predicted half
    images = sorted(p.stem for p in SAMPLE_IMAGES.glob("*.tif"))
    predicted = [r["predicted"] for r in ranks]
    assert sorted(predicted[0] + predicted[1]) == images and len(predicted[0]) == len(predicted[1]) == 6
    assert stores[0].keys() == stores[1].keys()
    for key in stores[0]:
        assert stores[0][key]["count"] == 3  # the pretrained start + a refresh after each of 2 epochs
        _assert_same_state(stores[0][key], stores[1][key])
    _assert_same_state(ranks[0]["teacher"], ranks[1]["teacher"])  # every rank's EMA saw the same student
    teacher, student = ranks[0]["teacher"], ranks[0]["network"]
    assert not all(torch.equal(teacher[k], student[k]) for k in teacher if torch.is_tensor(teacher[k]) and teacher[k].is_floating_point())
    _assert_same_state(torch.load(out / "models" / "checkpoint.pt", weights_only=False)["teacher"], teacher)


@pytest.mark.slow
def test_torchrun_folder_inference_equals_single_process(tiny_model, tmp_path):
    from mmcs_monai import cli

    # at the stored diameter: how ranks share the images does not depend on it, and it keeps the two runs short
    cli.infer(str(SAMPLE_IMAGES), str(tmp_path / "one"), model=str(tiny_model), precision="fp32", overlay=False, diameter="stored")
    options = ["--model", tiny_model, "--precision", "fp32", "--overlay", "False", "--diameter", "stored"]
    torchrun("mmcs_monai.cli", "infer", SAMPLE_IMAGES, tmp_path / "two", *options)
    one = sorted((tmp_path / "one").glob("*_masks.tif"))
    assert len(one) == len(list(SAMPLE_IMAGES.glob("*.tif")))
    # each image once, and one summary with every image's row (rank 0 writes the rows of both ranks)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [p.name for p in one] + ["segmentation_summary.csv"]
    one_summary = (tmp_path / "one" / "segmentation_summary.csv").read_text()
    assert (tmp_path / "two" / "segmentation_summary.csv").read_text() == one_summary and one_summary.count("\n") == len(one) + 1
    cells = 0
    for path in one:
        expected = read_labels(path)
        assert np.array_equal(read_labels(tmp_path / "two" / path.name), expected), path.name
        cells += int(expected.max())
    assert cells > 100


@pytest.mark.slow
def test_torchrun_folder_inference_gives_every_rank_every_other_image(tiny_model, tmp_path):
    """The work split: under 2 ranks, rank r segments images r, r + 2, ... of the sorted folder, and no other."""
    dump = tmp_path / "dump.json"
    expression = (
        "$torch.save([@datalist[i]['image'] for i in @dataloader#sampler], "
        f"'{tmp_path}/rank' + str(mmcs_monai.distributed.get_rank()) + '.pt')"
    )
    dump.write_text(json.dumps({"finalize": [expression, "$mmcs_monai.distributed.destroy_process_group()"]}))
    overrides = {"model_path": tiny_model, "input_dir": SAMPLE_IMAGES, "output_dir": tmp_path / "out"}
    torchrun(*bundle_command("inference", ["inference.json", "multi_gpu_inference.json", dump], BUNDLE, overrides))
    images = sorted(str(p) for p in SAMPLE_IMAGES.glob("*.tif"))
    shares = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [sorted(s) for s in shares] == [images[0::2], images[1::2]]
    assert len(list((tmp_path / "out").glob("*_masks.tif"))) == len(images)


@pytest.mark.slow
def test_torchrun_slide_inference_equals_single_process(tiny_model, tmp_path):
    from mmcs_monai import cli

    tiles = [read_image(p)[0][:256, :256] for p in sorted(SAMPLE_IMAGES.glob("*.tif"))[:6]]
    slide = np.concatenate([np.concatenate(tiles[:3], 1), np.concatenate(tiles[3:], 1)], 0).astype(np.float32)
    tifffile.imwrite(tmp_path / "slide.tif", slide, tile=(128, 128))
    options = ["--model", tiny_model, "--precision", "fp32", "--block_size", "256"]
    cli.infer_slide(str(tmp_path / "slide.tif"), str(tmp_path / "one"), model=str(tiny_model), precision="fp32", block_size=256)
    log = torchrun("mmcs_monai.cli", "infer-slide", tmp_path / "slide.tif", tmp_path / "two", *options)
    assert "rank 1: block" in log  # the second rank segmented blocks
    expected = read_labels(tmp_path / "one" / "slide_masks.tif")
    assert expected.max() > 10
    assert np.array_equal(read_labels(tmp_path / "two" / "slide_masks.tif"), expected)
    assert (tmp_path / "two" / "slide_cells.csv").read_text() == (tmp_path / "one" / "slide_cells.csv").read_text()
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["slide_cells.csv", "slide_masks.tif"]  # scratch removed


@pytest.mark.slow
def test_validation_with_fewer_images_than_ranks(tmp_path, tiny_model):
    """One validation image, two ranks: both score it; the all-reduced F1 is that image's F1."""
    out = tmp_path / "run"
    overrides = {"ckpt_dir": out / "models", "output_dir": out / "eval", "epochs": 1, "val_interval": 1, "val_limit": 1}
    # from the small trained model at a small learning rate: validation finds cells
    overrides.update(inference_precision="fp32", pretrained=tiny_model, learning_rate=0.001)
    log = torchrun(*bundle_command("training", ["train.json", "multi_gpu_train.json"], BUNDLE, overrides), *TINY_PRETRAINED)
    best = torch.load(out / "models" / "checkpoint.pt", weights_only=False)["best_model"]["best"]
    one = single_process_f1(out / "models", tmp_path, "--val_limit", "1", "--inference_precision", "fp32")
    assert best > 0.2 and best == pytest.approx(one, abs=1e-4) and f"val_f1: {best:.4f}" in log
