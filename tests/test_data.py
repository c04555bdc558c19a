"""Data lists from manifests, Decathlon JSON, JSON lists and folders."""

import json

import numpy as np
import pytest
import tifffile

from mmcs_monai.data import load_datalist, pending_outputs
from mmcs_monai.io import InputError


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for name in ("a", "b"):
        tifffile.imwrite(tmp_path / "images" / f"{name}.tif", np.zeros((8, 8), np.uint8))
    tifffile.imwrite(tmp_path / "labels" / "a.tif", np.zeros((8, 8), np.uint16))
    return tmp_path


def test_folder_with_images_and_labels(folder):
    items = load_datalist(folder)
    assert [i["id"] for i in items] == ["a", "b"]
    assert items[0]["label"].endswith("labels/a.tif") and "label" not in items[1]
    assert items[0]["subset"] == "default" and items[0]["nucleus_channel"] is None


def test_relative_folder_path(folder, monkeypatch):
    monkeypatch.chdir(folder.parent)
    items = load_datalist(folder.name)
    assert items[0]["image"] == str(folder / "images" / "a.tif")


def test_manifest_csv_split_modality_and_partial(tmp_path):
    (tmp_path / "m.csv").write_text(
        "split,id,image,label,nucleus_channel,modality,gt_complete\n"
        "train,x,img/x.tif,lbl/x.tif,,fluo,yes\n"
        "val,y,img/y.tif,lbl/y.tif,1,he,partial (misses cells)\n"
        "val,z,img/z.tif,lbl/z.tif,,fluo,mostly\n"
    )
    train = load_datalist(tmp_path / "m.csv", split="train")
    assert len(train) == 1 and train[0]["image"] == str(tmp_path / "img" / "x.tif") and train[0]["subset"] == "fluo"
    val = load_datalist(tmp_path / "m.csv", split="val")
    assert [v["id"] for v in val] == ["y", "z"] and val[0]["nucleus_channel"] == 1
    assert [v["id"] for v in load_datalist(tmp_path / "m.csv", split="val", exclude_partial=True)] == ["z"]


def test_decathlon_json_and_list(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps({"training": [{"image": "i.tif", "label": "l.tif"}], "validation": []}))
    items = load_datalist(tmp_path / "d.json", split="train")
    assert items[0]["image"] == str(tmp_path / "i.tif") and items[0]["id"] == "i"
    assert load_datalist(tmp_path / "d.json", split="val") == []
    with pytest.raises(InputError, match="no section 'test'"):
        load_datalist(tmp_path / "d.json", split="test")
    (tmp_path / "l.json").write_text(json.dumps([{"image": "/abs/q.png", "split": "train"}]))
    assert load_datalist(tmp_path / "l.json")[0]["image"] == "/abs/q.png"


def test_dev_manifest_is_usable_directly(dev_data):
    train = load_datalist(dev_data / "manifest.csv", split="train")
    val = load_datalist(dev_data / "manifest.csv", split="val", exclude_partial=True)
    assert len(train) == 378 and len(val) == 56
    assert all(i["label"] and i["subset"] for i in train)


def test_pending_outputs_skips_done(tmp_path, folder):
    items = load_datalist(folder)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a_masks.tif").write_bytes(b"x")
    assert [i["id"] for i in pending_outputs(items, tmp_path / "out")] == ["b"]


def test_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_datalist(tmp_path / "missing.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images"):
        load_datalist(tmp_path / "empty")


# ------------------------------------------------------------------ skipping bad samples
def _mixed_items(tmp_path, n_good=8):
    """Good image/label pairs plus one of each common kind of broken sample."""
    from helpers import disk_labels

    items = []
    for k in range(n_good):
        labels = disk_labels(shape=(48, 48), centers=((15, 15), (32, 30)), radii=(6, 7))
        tifffile.imwrite(tmp_path / f"img{k}.tif", (labels > 0).astype(np.uint8) * (100 + k))
        tifffile.imwrite(tmp_path / f"lbl{k}.tif", labels)
        items.append({"image": str(tmp_path / f"img{k}.tif"), "label": str(tmp_path / f"lbl{k}.tif")})
    (tmp_path / "empty.tif").write_bytes(b"")
    tifffile.imwrite(tmp_path / "small_label.tif", np.zeros((20, 20), np.uint16))
    bad = [
        {"image": str(tmp_path / "empty.tif"), "label": str(tmp_path / "lbl0.tif")},
        {"image": str(tmp_path / "img0.tif"), "label": str(tmp_path / "small_label.tif")},
    ]
    return items, bad


def _pipeline():
    from monai.transforms import Compose

    from mmcs_monai.transforms import LabelsToFlowsd, LoadMicroscopyd, StackNucleusChanneld

    return Compose([LoadMicroscopyd(), StackNucleusChanneld(), LabelsToFlowsd(keys="label", output_key="flows")])


def test_skipping_dataset_drops_bad_samples_and_names_them(tmp_path):
    from mmcs_monai.data import BadSampleLog, SkippingCacheDataset

    good, bad = _mixed_items(tmp_path)
    log = BadSampleLog(max_bad_fraction=0.25)
    data = SkippingCacheDataset(good[:4] + bad + good[4:], _pipeline(), bad_samples=log, cache_rate=1.0, num_workers=1)
    assert len(data) == 8 and all(d["flows"].shape == (3, 48, 48) for d in data)
    assert [e["file"] for e in log.entries] == [bad[0]["image"], bad[1]["image"]]
    assert "empty" in log.entries[0]["problem"] and "(20, 20)" in log.entries[1]["problem"]
    log.write_csv(tmp_path / "bad.csv")
    assert (tmp_path / "bad.csv").read_text().count("\n") == 3


def test_too_many_bad_samples_stop_with_a_clear_message(tmp_path):
    from mmcs_monai.data import BadSampleLog, SkippingCacheDataset

    good, bad = _mixed_items(tmp_path, n_good=3)
    with pytest.raises(RuntimeError, match=r"2 of 5 samples .* are unusable \(40% > max_bad_fraction 10%\).*empty"):
        SkippingCacheDataset(good + bad, _pipeline(), bad_samples=BadSampleLog(0.1), cache_rate=1.0, num_workers=1)


def test_a_sample_failing_in_random_transforms_is_replaced(tmp_path):
    from monai.transforms import Compose, RandLambdad

    from mmcs_monai.data import BadSampleLog, SkippingCacheDataset

    good, _ = _mixed_items(tmp_path, n_good=4)

    def explode_on_second(d):
        if d["image_file"].endswith("img1.tif"):
            raise ValueError("augmentation blew up")
        return d

    transform = Compose([*_pipeline().transforms, RandLambdad(keys="image", func=lambda x: x, prob=1.0), explode_on_second])
    log = BadSampleLog(max_bad_fraction=0.5)
    data = SkippingCacheDataset(good, transform, bad_samples=log, cache_rate=1.0, num_workers=1)
    assert data[1]["image_file"].endswith("img2.tif")  # the next good sample stands in
    assert log.entries[0]["stage"] == "augmentation" and "blew up" in log.entries[0]["problem"]


def test_several_sources_are_joined_in_order_and_ids_stay_unique(tmp_path):
    for name, ids in (("a", ["x", "y"]), ("b", ["z"])):
        (tmp_path / name).mkdir()
        rows = [{"image": f"{i}.tif", "id": i, "modality": name, "split": "train"} for i in ids]
        rows.append({"image": "v.tif", "id": f"val_{name}", "split": "val"})
        (tmp_path / name / "list.json").write_text(json.dumps(rows))
    sources = [str(tmp_path / "a" / "list.json"), str(tmp_path / "b" / "list.json")]
    items = load_datalist(sources, split="train")
    assert [i["id"] for i in items] == ["x", "y", "z"] and [i["subset"] for i in items] == ["a", "a", "b"]
    assert items[2]["image"] == str((tmp_path / "b" / "z.tif").resolve())  # relative to its own list
    assert [i["id"] for i in load_datalist(sources, split="train", limit=2)] == ["x", "y"]
    with pytest.raises(InputError, match="'x' is also in"):
        load_datalist([sources[0], sources[0]], split="train")
    with pytest.raises(InputError, match="empty list"):
        load_datalist([])


def test_subset_weights_give_each_subset_a_share_by_the_power_of_its_size():
    from mmcs_monai.data import subset_weights

    items = [{"subset": "big"}] * 100 + [{"subset": "small"}] * 4 + [{}] * 1
    for power, shares in ((0.0, (100, 4, 1)), (1.0, (1, 1, 1)), (0.5, (10, 2, 1))):
        weights = subset_weights(items, power)
        assert sum(weights) == pytest.approx(len(items)) and min(weights) > 0
        got = (sum(weights[:100]), sum(weights[100:104]), weights[104])
        total = sum(shares)
        assert [g / len(items) for g in got] == pytest.approx([s / total for s in shares])
    with pytest.raises(ValueError, match="power"):
        subset_weights(items, 1.5)


def test_pool_rows_keep_their_source_and_balance_by_source(tmp_path):
    """The unlabelled pool's manifest (no split, no label; ``source_repo``): rows keep where they come from, a per-source cap spreads over each source's rows, and the weights balance sources, not modalities."""
    from mmcs_monai.data import spread_per_group, subset_weights, unlabelled

    rows = ["id,image,source_repo,commit,original_path,modality,licence,notes"]
    rows += [f"a{i},a{i}.tif,lab/a,c,p,he_tissue_rgb,MIT,frame {i}" for i in range(10)]
    rows += [f"b{i},b{i}.tif,lab/b,c,p,he_tissue_rgb,CC0,''" for i in range(2)]
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    items = unlabelled(load_datalist(tmp_path / "manifest.csv", split="unlabelled"))
    assert len(items) == 12 and "label" not in items[0]
    assert (items[0]["source"], items[0]["subset"]) == ("lab/a", "he_tissue_rgb")
    kept = spread_per_group(items, 4, key="source")
    assert [i["id"] for i in kept] == ["a0", "a2", "a5", "a7", "b0", "b1"]  # spread over a's 10 frames; b whole
    assert spread_per_group(items, None) == items
    by_subset = subset_weights(kept, 1.0)  # one modality: every row the same weight
    by_source = subset_weights(kept, 1.0, key="source")  # two sources, the same share each
    assert by_subset == pytest.approx([1.0] * 6)
    assert sum(by_source[:4]) == pytest.approx(sum(by_source[4:])) == pytest.approx(3.0)


def test_weighted_sampler_draws_in_proportion():
    import torch

    from mmcs_monai.distributed import weighted_sampler

    torch.manual_seed(0)
    sampler = weighted_sampler([1.0, 3.0], num_samples=4000)
    draws = list(sampler)
    assert len(draws) == 4000 and sum(d == 1 for d in draws) / 4000 == pytest.approx(0.75, abs=0.03)
    assert len(list(weighted_sampler([1.0] * 7))) == 7


def test_select_rows_keeps_named_sources_and_refuses_names_that_match_nothing():
    from mmcs_monai.data import select_rows

    rows = [{"id": "a", "source": "dsb"}, {"id": "b", "source": "dsb"}, {"id": "c", "source": "monuseg"}, {"id": "d"}]
    assert [r["id"] for r in select_rows(rows, ["dsb"])] == ["a", "b"]
    assert [r["id"] for r in select_rows(rows, ["dsb", "monuseg"], drop_ids=["b"])] == ["a", "c"]
    with pytest.raises(ValueError, match="DSB"):
        select_rows(rows, ["DSB"])  # a renamed or misspelt source must not select nothing silently
    with pytest.raises(ValueError, match="'z'"):
        select_rows(rows, ["dsb"], drop_ids=["z"])
