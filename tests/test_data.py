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
