"""The MONAI Label app, served for real: ``monailabel start_server`` on 127.0.0.1, spoken to over HTTP.

The server runs in the label environment (``bash scripts/setup_env.sh label`` into ``~/.venvs/mmcs-label``,
or ``MMCS_LABEL_PYTHON``); the tests run in the main one and compare the server's answers with the library
run here. Without the label environment they are skipped, unless ``MMCS_REQUIRE_LABEL=1`` (set by
``scripts/test.sh``, so CI cannot pass them by skipping).

The tests share one server and run in file order: infer, label uploads, scoring and the next-image
strategy, then training, whose new model must answer the next infer.
"""

import hashlib
import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from label_server import Server, label_server
from mmcs_monai.flows import flows_to_masks
from mmcs_monai.inference import CellInferer
from mmcs_monai.io import read_labels, write_labels
from mmcs_monai.label.uncertainty import image_uncertainty
from mmcs_monai.networks import load_model
from mmcs_monai.transforms import inference_preprocessing

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "bundle" / "sample_data"
IMAGES = sorted((SAMPLE / "images").glob("*.tif"))
LABELLED, SECOND = IMAGES[0].stem, IMAGES[1].stem
MAX_UPLOAD_MB = 1


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model):
    conf = {"max_upload_mb": str(MAX_UPLOAD_MB)}
    with label_server(tmp_path_factory.mktemp("label"), IMAGES, tiny_model, conf) as running:
        yield running


def local_masks(model_path: Path, image_path: Path, diameter: str = "auto", precision: str = "fp32") -> np.ndarray:
    """What the library, run here, makes of an image at ``diameter`` (the server's default, ``auto``): the server must answer the same."""
    network = load_model(model_path)
    image = inference_preprocessing("image")({"image": str(image_path)})["image"]
    flows = CellInferer(precision=precision, diameter=diameter)(torch.as_tensor(image)[None], network)[0].numpy()
    return flows_to_masks(flows[:2], flows[2])


def infer_masks(server: Server, image_id: str) -> np.ndarray:
    response = server.post(f"/infer/{'mmcs'}", params={"image": image_id, "output": "image"})
    assert response.status_code == 200, response.text
    return tifffile.imread(io.BytesIO(response.content))


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_info_lists_model_strategies_and_scoring(server):
    info = server.get("/info/").json()
    assert info["models"]["mmcs"]["type"] == "segmentation" and info["models"]["mmcs"]["dimension"] == 2
    assert set(info["trainers"]) == {"mmcs"}
    assert set(info["strategies"]) == {"mmcs_uncertainty", "random"}
    assert set(info["scoring"]) == {"mmcs_uncertainty"}
    assert info["datastore"]["total"] == len(IMAGES)
    assert info["models"]["mmcs"]["model"]["sha256"] == hashlib.sha256(server.served_model().read_bytes()).hexdigest()


def test_infer_returns_the_library_masks_and_polygons(server, tiny_model):
    masks = infer_masks(server, SECOND)
    expected = local_masks(tiny_model, IMAGES[1])
    assert masks.shape == expected.shape and masks.dtype == np.uint16
    assert np.array_equal(masks, expected) and masks.max() >= 10

    result = server.post("/infer/mmcs", params={"image": SECOND, "output": "json"}).json()
    assert result["cells"] == masks.max() and result["shape"] == list(masks.shape)
    features = result["geojson"]["features"]
    assert [f["properties"]["id"] for f in features] == list(range(1, masks.max() + 1))
    assert [f["properties"]["area"] for f in features] == [int((masks == i).sum()) for i in range(1, masks.max() + 1)]

    # a requested diameter changes the scale the network sees, so the cells found
    small = server.post(
        "/infer/mmcs", params={"image": SECOND, "output": "json"}, data={"params": json.dumps({"diameter": 5, "geojson": False})}
    ).json()
    assert small["diameter"] == 5.0 and "geojson" not in small and small["cells"] != result["cells"]


def test_infer_on_an_uploaded_rgb_png_and_refusals(server, tmp_path):
    from PIL import Image

    grey = tifffile.imread(IMAGES[1])
    grey = grey if grey.ndim == 2 else grey[..., 0]
    rgb = np.stack([grey] * 3, axis=-1).astype(np.uint8)
    png = tmp_path / "upload.png"
    Image.fromarray(rgb).save(png)
    with open(png, "rb") as f:
        response = server.post("/infer/mmcs", params={"output": "json"}, files={"file": ("upload.png", f)})
    assert response.status_code == 200, response.text
    assert response.json()["cells"] >= 10
    for channel, status in [(2, 200), (5, 400)]:  # a nucleus channel is used, and checked
        with open(png, "rb") as f:
            params = {"params": json.dumps({"nucleus_channel": channel})}
            response = server.post("/infer/mmcs", params={"output": "json"}, files={"file": ("upload.png", f)}, data=params)
        assert response.status_code == status, response.text
    assert "nucleus_channel=5 but the image has 3 channel(s)" in response.json()["detail"]

    # a server path is answered exactly as a missing image: nothing tells which files exist there
    (tmp_path / "on_the_server.png").write_bytes(png.read_bytes())
    answers = set()
    for image in ["/etc/passwd", str(tmp_path / "on_the_server.png"), "/no/such/file.png", "no_such_image"]:
        response = server.post("/infer/mmcs", params={"image": image, "output": "json"})
        assert response.status_code == 404, response.text
        answers.add(response.json()["detail"].replace(repr(image), "IMAGE"))
    assert len(answers) == 1, answers
    (tmp_path / "broken.tif").write_bytes(b"not an image")
    with open(tmp_path / "broken.tif", "rb") as f:
        response = server.post("/infer/mmcs", params={"output": "json"}, files={"file": ("broken.tif", f)})
    assert response.status_code == 400 and "cannot be read as a TIFF image" in response.json()["detail"]


def test_save_label(server, tmp_path):
    labels = read_labels(SAMPLE / "labels" / f"{LABELLED}.tif")
    png = tmp_path / "label.png"  # clients upload PNG too; it is stored as TIFF
    from PIL import Image

    Image.fromarray(labels.astype(np.uint16)).save(png)
    with open(png, "rb") as f:
        response = server.put("/datastore/label", params={"image": LABELLED}, files={"label": ("label.png", f)})
    assert response.status_code == 200, response.text
    stored = server.studies / "labels" / "final" / f"{LABELLED}.tif"
    assert np.array_equal(read_labels(stored), labels)
    info = server.get("/datastore/", params={"output": "all"}).json()["objects"][LABELLED]
    assert "final" in info["labels"] and info["labels"]["final"]["info"]["cells"] == len(np.unique(labels)) - 1


def test_bad_uploads_are_refused_and_change_nothing(server, tmp_path):
    good = SAMPLE / "labels" / f"{SECOND}.tif"
    small = tmp_path / "small.tif"
    write_labels(small, np.ones((64, 64), np.int32))
    text = tmp_path / "text.tif"
    text.write_bytes(b"hello, not a TIFF")
    big = tmp_path / "big.tif"
    big.write_bytes(np.random.default_rng(0).bytes(MAX_UPLOAD_MB * 2**20 + 1000))
    fractional = tmp_path / "fractional.tif"
    tifffile.imwrite(fractional, np.full(tifffile.imread(good).shape, 0.5, np.float32))

    before = snapshot(server.studies)
    cases = [
        ({"image": "../escape"}, good, 400, "plain name"),
        ({"image": "/etc/passwd"}, good, 400, "plain name"),
        ({"image": f"..%2F{SECOND}"}, good, 400, "plain name"),
        ({"image": SECOND, "tag": "../../outside"}, good, 400, "plain name"),
        ({"image": SECOND, "tag": "/tmp"}, good, 400, "plain name"),
        ({"image": "not_in_datastore"}, good, 404, "not in the datastore"),
        ({"image": SECOND}, text, 400, "cannot be decoded"),
        ({"image": SECOND}, small, 400, "(64, 64)"),
        ({"image": SECOND}, fractional, 400, "non-integer"),
        ({"image": SECOND}, big, 413, "limit"),
    ]
    for params, path, status, words in cases:
        with open(path, "rb") as f:
            response = server.put("/datastore/label", params=params, files={"label": ("../../label.tif", f)})
        assert response.status_code == status, (params, path.name, response.text)
        assert words in response.json()["detail"], response.text

    for name, content, status in [("../../evil.tif", IMAGES[2].read_bytes(), 400), ("new.tif", b"junk bytes", 400)]:
        response = server.put(
            "/datastore/image", params={"image": Path(name).stem if "/" not in name else name}, files={"file": (name, content)}
        )
        assert response.status_code == status, response.text
    response = server.put("/datastore/image", params={"image": SECOND}, files={"file": ("x.tif", IMAGES[1].read_bytes())})
    assert response.status_code == 200, response.text  # the same bytes again: nothing changes

    assert snapshot(server.studies) == before
    assert not list(server.studies.parent.rglob("outside")) and not list(server.studies.parent.rglob("escape*"))


def decoy_png(tmp_path: Path) -> Path:
    from PIL import Image

    grey = tifffile.imread(IMAGES[2])
    path = tmp_path / "decoy.png"
    Image.fromarray((grey if grey.ndim == 2 else grey[..., 0]).astype(np.uint8)).save(path)
    return path


def test_params_never_name_a_server_file(server, tmp_path):
    """Issue 32.1: with an upload, ``params`` (or ``wsi.params``) naming a server path is refused, the same way
    whether the path exists, is an image, a text file or nothing."""
    decoy = decoy_png(tmp_path)
    secret = tmp_path / "secret.tif"
    secret.write_bytes(IMAGES[1].read_bytes())  # an image under the temp folder, not uploaded
    (tmp_path / "notes.txt").write_text("not an image")
    wsi = {"level": 0, "location": [0, 0], "size": [0, 0], "min_poly_area": 0}
    answers: dict[int, set] = {}
    for target in [str(secret), str(tmp_path / "notes.txt"), str(tmp_path / "missing.png"), "/etc/hostname", SECOND]:
        for kind, (route, field, body) in enumerate(
            [
                ("/infer/mmcs", "params", {"image": target}),
                ("/infer/mmcs", "params", {"session": {"id": "x"}, "image": target}),
                ("/infer/wsi_v2/mmcs", "wsi", {**wsi, "params": {"image": target}}),
            ]
        ):
            with open(decoy, "rb") as f:
                response = server.post(route, params={"output": "json"}, files={"file": ("decoy.png", f)}, data={field: json.dumps(body)})
            assert response.status_code == 400, (route, target, response.text)
            answers.setdefault(kind, set()).add(response.json()["detail"])
    assert all(len(details) == 1 and "may not set 'image'" in next(iter(details)) for details in answers.values()), answers
    with open(decoy, "rb") as f:  # the upload itself is what is segmented
        response = server.post("/infer/mmcs", params={"output": "json"}, files={"file": ("decoy.png", f)})
    expected = server.post("/infer/mmcs", params={"image": IMAGES[2].stem, "output": "json"}).json()["cells"]
    assert response.status_code == 200 and response.json()["cells"] == expected


def test_sessions_hold_one_image_file_and_archives_are_refused(server, tmp_path):
    """Issue 32.2: MONAI Label unpacks a session archive without checking its members; the server refuses archives."""
    import tarfile
    import tempfile
    import uuid

    escape = f"mmcs_escape_{uuid.uuid4().hex}"
    archive = tmp_path / "session.tar"
    with tarfile.open(archive, "w") as tar:
        member = tarfile.TarInfo(f"../{escape}")
        member.size = 5
        tar.addfile(member, io.BytesIO(b"owned"))
        link = tarfile.TarInfo("link")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc"
        tar.addfile(link)
    for uncompress in ("true", "1"):
        response = server.put("/session/", params={"uncompress": uncompress}, files={"files": ("session.tar", archive.read_bytes())})
        assert response.status_code == 400 and "does not unpack archives" in response.json()["detail"], response.text
    assert not list(Path(tempfile.gettempdir()).rglob(escape)) and not list(Path("/").glob(f"*/{escape}"))
    two = [("files", ("a.png", decoy_png(tmp_path).read_bytes())), ("files", ("b.png", decoy_png(tmp_path).read_bytes()))]
    response = server.put("/session/", files=two)
    assert response.status_code == 400 and "one image file, got 2" in response.json()["detail"]
    response = server.put("/session/", files={"files": ("..", decoy_png(tmp_path).read_bytes())})
    assert response.status_code == 400 and "plain name" in response.json()["detail"]
    response = server.put("/session/", files={"files": ("s.png", decoy_png(tmp_path).read_bytes())})
    assert response.status_code == 200, response.text


def test_session_ids_and_model_uploads_are_checked(server, tmp_path):
    """MONAI Label joins a session id to its session folder and reads (and rewrites) what it finds there; and
    ``PUT /model/<name>`` would replace the served model with any upload (a 500 here before: no model path)."""
    decoy = decoy_png(tmp_path)
    for session_id in ["../../x", "..", "a/b"]:
        with open(decoy, "rb") as f:
            response = server.post("/infer/mmcs", params={"session_id": session_id, "output": "json"}, files={"file": ("d.png", f)})
        assert response.status_code == 400 and "session_id" in response.json()["detail"], response.text
    before = server.served_model().read_bytes()
    response = server.put("/model/mmcs", files={"file": ("evil.pt", b"not a model")})
    assert response.status_code == 403 and "training replaces it" in response.json()["detail"], response.text
    assert server.served_model().read_bytes() == before


def test_sizes_are_checked_before_decoding(server, tmp_path):
    """Issue 32.3: a small compressed TIFF declaring 12,000 x 12,000 pixels is refused from its header, on
    every route, before it is decoded; infer and session uploads have the byte limit too."""
    bomb = tmp_path / "bomb.tif"
    tifffile.imwrite(bomb, np.zeros((12000, 12000), np.uint8), compression="zlib")
    assert bomb.stat().st_size < MAX_UPLOAD_MB * 2**20  # under the byte limit: only the pixel budget stops it
    wsi = json.dumps({"level": 0, "location": [0, 0], "size": [256, 256], "min_poly_area": 0})
    start = time.monotonic()
    for route, params, name, data in [
        ("/infer/mmcs", {"output": "json"}, "file", {}),
        ("/infer/wsi_v2/mmcs", {"output": "asap"}, "file", {"wsi": wsi}),
    ]:
        response = server.post(route, params=params, files={name: ("bomb.tif", bomb.read_bytes())}, data=data)
        assert response.status_code == 413 and "12000 x 12000 pixels" in response.json()["detail"], response.text
        assert "max_image_mpix" in response.json()["detail"]
    response = server.put("/datastore/image", params={"image": "bomb"}, files={"file": ("bomb.tif", bomb.read_bytes())})
    assert response.status_code == 413 and "image 'bomb' refused: 12000 x 12000" in response.json()["detail"], response.text
    response = server.put("/datastore/label", params={"image": SECOND}, files={"label": ("bomb.tif", bomb.read_bytes())})
    assert response.status_code == 413 and "label for image" in response.json()["detail"], response.text
    session = server.put("/session/", files={"files": ("bomb.tif", bomb.read_bytes())}).json()["session_id"]
    response = server.post("/infer/mmcs", params={"session_id": session, "output": "json"})
    assert response.status_code == 413 and "session image refused" in response.json()["detail"], response.text
    assert time.monotonic() - start < 10  # nothing decoded: 144 MPix take seconds and gigabytes

    big = np.random.default_rng(1).integers(0, 255, (1100, 1100), dtype=np.uint8)  # 1.2 MB as an uncompressed TIFF
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, big)
    for route, name in [("/infer/mmcs", "file"), ("/infer/wsi_v2/mmcs", "file")]:
        response = server.post(route, params={"output": "json"}, files={name: ("big.tif", buffer.getvalue())})
        assert response.status_code == 413 and "max_upload_mb" in response.json()["detail"], response.text
    response = server.put("/session/", files={"files": ("big.tif", buffer.getvalue())})
    assert response.status_code == 413 and "max_upload_mb" in response.json()["detail"], response.text
    response = server.post(  # a body over the limit is refused before it is read
        "/infer/mmcs", params={"output": "json"}, files={"file": ("big.tif", buffer.getvalue() * 3)}
    )
    assert response.status_code == 413 and "request body of" in response.json()["detail"], response.text
    assert server.get("/info/").status_code == 200


def test_scoring_then_most_uncertain_image(server, tiny_model):
    # nothing scored yet: a random unlabelled image, the reason, and scoring starts by itself
    response = server.post("/activelearning/mmcs_uncertainty", json={"patch_size": [128, 128]})
    assert response.status_code == 200, response.text
    first = response.json()
    assert first["id"] != LABELLED and "scoring started in the background" in first["reason"]
    assert first["bbox"][2:] == [128, 128] and first["unscored"] == len(IMAGES) - 1
    assert server.wait_done("scoring")["status"] == "DONE"
    infos = server.infos()
    unlabelled = [i for i in infos if i != LABELLED]
    scores = {i: infos[i]["mmcs_uncertainty"] for i in unlabelled}
    assert "mmcs_uncertainty" not in infos[LABELLED]
    assert all(0.0 <= s["score"] <= 1.0 for s in scores.values())
    assert len({round(s["score"], 6) for s in scores.values()}) > 1

    chosen = server.post("/activelearning/mmcs_uncertainty").json()
    top = max(scores, key=lambda i: (scores[i]["score"], scores[i]["prob_std"]))
    assert chosen["id"] == top and chosen["score"] == pytest.approx(scores[top]["score"])

    # the stored score is the library's, computed here on the same image with the same model
    image = inference_preprocessing("image")({"image": str(server.studies / f"{top}.tif")})["image"]
    local = image_uncertainty(image, load_model(tiny_model), CellInferer(precision="fp32"))
    assert local["score"] == pytest.approx(scores[top]["score"], abs=1e-6)

    picked = {server.post("/activelearning/random").json()["id"] for _ in range(5)}
    assert picked and picked <= set(unlabelled)


def test_training_publishes_a_model_that_the_next_infer_uses(server):
    before_model = server.served_model().read_bytes()
    before_masks = infer_masks(server, SECOND)
    old_stamp = server.infos()[SECOND]["mmcs_uncertainty"]["model"]
    time.sleep(1.1)  # model stamps have one-second resolution

    run = {"epochs": 2, "batch_size": 2, "unlabelled_batch_size": 4, "patch_size": 64, "pseudo_interval": 2, "publish": "always"}
    response = server.post("/train/mmcs", json=run)
    assert response.status_code == 200, response.text
    answered_while_training = 0
    while answered_while_training < 2 and server.get("/train/").json()["status"] in ("SUBMITTED", "RUNNING"):
        # the server keeps answering while the training process runs (a few requests: each one slows it)
        assert infer_masks(server, SECOND).max() > 0
        answered_while_training += 1
        time.sleep(2)
    status = server.wait_done("train")
    assert status["status"] == "DONE", "\n".join(status.get("details", []))
    assert answered_while_training >= 1

    stats = server.get("/info/").json()["train_stats"]["mmcs"]
    assert stats["published"] is True and stats["labelled"] == 1 and stats["unlabelled"] == len(IMAGES) - 1
    assert stats["unlabelled_from_epoch"] == 2  # labels first: half the epochs (``labels_first`` 0.5)
    assert stats["epochs"] == 2 and stats["validation_is_training_set"] is True
    assert stats["started_from"]["sha256"] == hashlib.sha256(before_model).hexdigest()  # fine-tuned the served model
    new_model = server.served_model().read_bytes()
    assert new_model != before_model
    assert (server.app / "model" / "previous.pt").read_bytes() == before_model

    after = server.post("/infer/mmcs", params={"image": SECOND, "output": "json"}).json()
    assert after["model"]["sha256"] == hashlib.sha256(new_model).hexdigest()
    masks = infer_masks(server, SECOND)
    assert np.array_equal(masks, local_masks(server.served_model(), IMAGES[1]))
    assert not np.array_equal(masks, before_masks)

    # the scores were refreshed with the new model
    infos = server.infos()
    stamps = {infos[i]["mmcs_uncertainty"]["model"] for i in infos if i != LABELLED}
    assert stamps == {after["model"]["modified"]} and old_stamp not in stamps


def test_a_worse_run_is_not_published_by_default(server):
    """``publish: if_better`` (the default): a run that scores below the served model leaves it in place."""
    from mmcs_monai.metrics import f1_score

    before = server.served_model().read_bytes()
    # a learning rate this large wrecks the weights in one epoch; nothing else differs from a normal run
    run = {"epochs": 1, "batch_size": 2, "patch_size": 64, "learning_rate": 1000.0, "warmup_epochs": 0, "semi": False}
    assert server.post("/train/mmcs", json=run).status_code == 200
    status = server.wait_done("train")
    assert status["status"] == "DONE", "\n".join(status.get("details", []))
    stats = server.get("/info/").json()["train_stats"]["mmcs"]
    assert stats["published"] is False and stats["validation_is_training_set"] is True
    # the served model's F1 the run was compared with: the library's, here, on the labelled image, at the
    # stored diameter and the run's precision (training validation segments at the model's own diameter)
    masks = local_masks(server.served_model(), IMAGES[0], diameter="stored", precision="auto")
    served = f1_score(read_labels(SAMPLE / "labels" / f"{LABELLED}.tif"), masks, border=2)["f1"]
    assert stats["served_val_f1_before"] == pytest.approx(served, abs=0.02) and served > 0.3
    assert stats["best_val_f1"] is not None and stats["best_val_f1"] < stats["served_val_f1_before"]
    assert server.served_model().read_bytes() == before  # not replaced
    assert stats["model"]["sha256"] == hashlib.sha256(before).hexdigest()
