"""A MONAI Label client for the napari widget's server mode, with the standard library only.

It speaks MONAI Label's REST API as its Python client (``monailabel.client.MONAILabelClient``) does, so it works with
this project's label server (``apps/mmcs``, docs/label-server.md) and any MONAI Label server with a 2D model:

- ``GET /info/``: models, trainers, strategies, the last training's summary (``train_stats``);
- ``POST /activelearning/<strategy>`` (JSON ``{"patch_size": [w, h]}``): the next image ``id`` and its ``bbox``
  ``[x, y, w, h]`` (pixels, x right, y down);
- ``GET /datastore/image?image=<id>``: the image file;
- ``POST /infer/<model>?image=<id>&output=image`` (form field ``params``, JSON): the instance label TIFF of the whole
  image; ``POST /infer/wsi/<model>?image=<id>&output=asap`` (JSON ``{level, location, size, min_poly_area, params}``):
  the cells of a box as ASAP polygons along their pixel edges, rasterised back here
  (:func:`~mmcs_monai.label.asap.asap_to_labels`) to the same cells;
- ``PUT /datastore/label?image=<id>&tag=final`` (multipart ``label`` file, ``params``): submit a corrected label;
- ``POST /train/<model>`` (JSON params), ``GET /train/`` (status), ``DELETE /train/`` (stop).

Every failure is a :class:`LabelServerError` with one line to show: the server does not answer (URL and reason), or
its HTTP status and ``detail``.
"""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Any

import numpy as np


class LabelServerError(RuntimeError):
    """A request that failed: the message is one line naming the server or the refusal."""


class LabelClient:
    """Requests to a MONAI Label server at ``url`` (e.g. ``http://127.0.0.1:8000``), each with ``timeout`` seconds."""

    def __init__(self, url: str, timeout: float = 60.0):
        url = url.strip().rstrip("/")
        if not url:
            raise LabelServerError("give the server's URL, e.g. http://127.0.0.1:8000")
        if "://" not in url:
            url = "http://" + url
        scheme = urllib.parse.urlparse(url).scheme
        if scheme not in ("http", "https"):
            raise LabelServerError(f"{url}: not an http(s) URL")
        self.url = url
        self.timeout = timeout

    # -- transport ----------------------------------------------------------------------------------------------
    def request(
        self,
        method: str,
        path: str,
        query: dict[str, Any] | None = None,
        body: bytes | None = None,
        content_type: str | None = None,
        timeout: float | None = None,
    ) -> tuple[bytes, dict[str, str]]:
        """``method`` ``path`` with ``query``; returns the body and the headers (lower-case names).

        Raises:
            LabelServerError: no answer (refused, timed out), or an HTTP status other than 2xx (with its ``detail``).
        """
        url = self.url + path + ("?" + urllib.parse.urlencode(query) if query else "")
        headers = {"Content-Type": content_type} if content_type else {}
        request = urllib.request.Request(url, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.timeout) as response:
                return response.read(), {k.lower(): v for k, v in response.headers.items()}
        except urllib.error.HTTPError as err:
            raise LabelServerError(f"{method} {path}: {err.code} {_detail(err.read())}") from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise LabelServerError(f"{self.url} does not answer ({reason}): is the label server running there?") from None

    def json(self, method: str, path: str, query: dict[str, Any] | None = None, payload: Any = None, **kwargs) -> Any:
        """A request with an optional JSON body whose answer is JSON."""
        body = json.dumps(payload).encode() if payload is not None else None
        content, _ = self.request(method, path, query, body, "application/json" if body is not None else None, **kwargs)
        try:
            return json.loads(content or b"null")
        except json.JSONDecodeError:
            raise LabelServerError(f"{method} {path}: the answer is not JSON ({content[:80]!r})") from None

    def multipart(
        self, method: str, path: str, query: dict[str, Any], fields: dict[str, str], files: dict[str, tuple[str, bytes]]
    ) -> bytes:
        """A ``multipart/form-data`` request (MONAI Label's form ``params`` and file uploads)."""
        boundary = uuid.uuid4().hex
        parts = []
        for name, value in fields.items():
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
        for name, (filename, data) in files.items():
            head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            head += "Content-Type: application/octet-stream\r\n\r\n"
            parts.append(head.encode() + data + b"\r\n")
        parts.append(f"--{boundary}--\r\n".encode())
        content, _ = self.request(method, path, query, b"".join(parts), f"multipart/form-data; boundary={boundary}")
        return content

    # -- the API ------------------------------------------------------------------------------------------------
    def info(self) -> dict:
        """``GET /info/``: the app's models, trainers, strategies and ``train_stats``."""
        return self.json("GET", "/info/", timeout=min(self.timeout, 15.0))

    def next_sample(self, strategy: str, patch_size: tuple[int, int] | None = None, image: str = "") -> dict:
        """``POST /activelearning/<strategy>``: ``{"id", "bbox": [x, y, w, h], ...}`` (``patch_size`` [w, h]; None: the
        whole image; ``image``: a box in this image instead of the next image)."""
        payload: dict[str, Any] = {}
        if patch_size:
            payload["patch_size"] = [int(patch_size[0]), int(patch_size[1])]
        if image:
            payload["image"] = image
        return self.json("POST", f"/activelearning/{_quote(strategy)}", payload=payload)

    def image(self, image_id: str) -> np.ndarray:
        """``GET /datastore/image``: the image's pixels as the file holds them ([H, W] or [H, W, C], its own dtype)."""
        content, _ = self.request("GET", "/datastore/image", {"image": image_id})
        return _decode_image(content, image_id)

    def infer(self, model: str, image_id: str, params: dict | None = None) -> np.ndarray:
        """``POST /infer/<model>?output=image``: instance labels (int32 [H, W], 0 background) of the whole image."""
        content = self.multipart(
            "POST", f"/infer/{_quote(model)}", {"image": image_id, "output": "image"}, {"params": json.dumps(params or {})}, {}
        )
        return _decode_image(content, image_id).astype(np.int32)

    def infer_box(
        self, model: str, image_id: str, box: tuple[int, int, int, int], shape: tuple[int, int], params: dict | None = None
    ) -> np.ndarray:
        """``POST /infer/wsi/<model>?output=asap``: the cells whose centroid lies in ``box`` ``(x, y, w, h)``, segmented
        with the server's margin, as int32 labels [H, W] of the whole image (``shape``), 0 elsewhere."""
        from mmcs_monai.label.asap import asap_to_labels

        x, y, w, h = (int(v) for v in box)
        payload = {"level": 0, "location": [x, y], "size": [w, h], "min_poly_area": 0, "params": params or {}}
        body = json.dumps(payload).encode()
        content, _ = self.request("POST", f"/infer/wsi/{_quote(model)}", {"image": image_id, "output": "asap"}, body, "application/json")
        labels, _ = asap_to_labels(content, tuple(shape))
        return labels.astype(np.int32)

    def save_label(self, image_id: str, labels: np.ndarray, tag: str = "final") -> dict:
        """``PUT /datastore/label?tag=final``: submit ``labels`` (int [H, W] instance ids) for ``image_id`` as a TIFF."""
        import tifffile

        labels = np.asarray(labels)
        dtype = np.uint16 if labels.max(initial=0) <= np.iinfo(np.uint16).max else np.uint32
        buffer = io.BytesIO()
        tifffile.imwrite(buffer, labels.astype(dtype), compression="zlib")
        query = {"image": image_id, "tag": tag}
        content = self.multipart("PUT", "/datastore/label", query, {"params": "{}"}, {"label": (f"{image_id}.tif", buffer.getvalue())})
        return json.loads(content or b"{}")

    def train(self, model: str, params: dict | None = None) -> dict:
        """``POST /train/<model>``: start training on the server (MONAI Label runs it in its own process)."""
        return self.json("POST", f"/train/{_quote(model)}", payload=params or {})

    def train_status(self) -> dict:
        """``GET /train/``: the last training task (``status``: SUBMITTED, RUNNING, DONE, ERROR, ...); ``{}`` before any."""
        try:
            return self.json("GET", "/train/", timeout=min(self.timeout, 15.0)) or {}
        except LabelServerError as err:
            if " 404 " in f" {err} ":
                return {}
            raise

    def stop_training(self) -> dict:
        """``DELETE /train/``: stop the running training task."""
        return self.json("DELETE", "/train/")


def _quote(name: str) -> str:
    return urllib.parse.quote_plus(str(name))


def _detail(content: bytes) -> str:
    """The ``detail`` of an error answer (FastAPI's JSON), else its first 200 characters."""
    try:
        detail = json.loads(content).get("detail")
        if detail:
            return detail if isinstance(detail, str) else json.dumps(detail)
    except (json.JSONDecodeError, AttributeError):
        pass
    return content[:200].decode(errors="replace") or "(no detail)"


def _decode_image(content: bytes, name: str) -> np.ndarray:
    """Decode an image file's bytes (TIFF, PNG, JPEG)."""
    import imageio.v3 as iio
    import tifffile

    if content[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return tifffile.imread(io.BytesIO(content))
    try:
        return np.asarray(iio.imread(content))
    except Exception as err:  # imageio raises many kinds for bytes it cannot decode
        raise LabelServerError(f"{name}: the server's answer is not an image ({type(err).__name__})") from None


__all__ = ["LabelClient", "LabelServerError"]
