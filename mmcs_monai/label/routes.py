"""What the label app changes in MONAI Label's HTTP endpoints: work off the event loop, requests checked first.

MONAI Label 0.8.5 declares its endpoints ``async`` and calls the (blocking) app from them, so one inference
holds the whole server: ``GET /info/`` waited seconds behind it. :func:`install` rewires the routes of the
running FastAPI app, in the server process only:

- **off the event loop**: each endpoint that does work runs in FastAPI's thread pool (its coroutine is run
  to completion there), so the server answers ``/info/`` and task status while it segments;
- **checked before anything runs**: an unknown model, strategy or scoring method (404), ``params`` /
  ``wsi`` form fields that are not a JSON object (400), ``params`` that try to set the image or session
  (:data:`RESERVED_PARAMS`, 400: only the request's own upload, a datastore id or a live session is read),
  an ``image`` that is neither a datastore id nor accompanied by an upload (404, the same answer whether the
  name exists on the server or not), an unknown session (404), a session from an archive or several files
  (400: MONAI Label would unpack it without checking where its members go), a session id that is not a
  plain name (400), a model file upload (403: training replaces the served model), an uploaded file over
  ``max_upload_mb`` (413), and training parameters the train task refuses (400), each with its reason;
- **bounded bodies**: a request body over ``max_upload_mb`` (plus 1 MiB for the form fields) is refused with
  413 before it is read (:class:`BodyLimit`);
- **errors with a reason**: MONAI Label's own ``MONAILabelException`` becomes a 400 with its message, and
  anything else unexpected a 500 whose detail names the exception (never a bare "Internal Server Error").

The upload of an infer request is described to the app with :data:`UPLOADED` (a context variable: its name's
suffix and its size), so the app reads that exact file (:func:`is_this_upload`) and no other server path.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import json
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from fastapi.routing import APIRoute, request_response

from mmcs_monai.label.datastore import UploadRejected, plain_name

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Upload:
    """The image file a request uploaded, as MONAI Label stores it: ``<tempdir>/tmpXXXXXXXX<suffix>``, ``size`` bytes."""

    suffix: str
    size: int


# the upload of the infer request being answered (None: it uploaded nothing)
UPLOADED: contextvars.ContextVar[Upload | None] = contextvars.ContextVar("mmcs_uploaded", default=None)

# request keys that ``params`` (and ``wsi.params``) may not set: MONAI Label merges params over the request, so
# they would name a server file to read instead of the upload, or pose as a session
RESERVED_PARAMS = ("image", "image_id", "session", "session_id", "label", "file", "model")
# room for the form fields beside the uploaded file, in the body limit
FORM_MARGIN_BYTES = 1 << 20

# routes (prefix, method) whose endpoints run in the thread pool
OFFLOADED = ("/infer", "/activelearning", "/scoring", "/train", "/datastore", "/batch", "/session", "/info", "/model")


def json_object(text: Any, field: str) -> dict:
    """A form field holding a JSON object, parsed; :class:`UploadRejected` 400 otherwise."""
    if text in (None, ""):
        return {}
    if isinstance(text, dict):
        return text
    try:
        value = json.loads(text)
    except (TypeError, ValueError) as err:
        raise UploadRejected(400, f"{field} is not valid JSON ({err}): send a JSON object, e.g. {{}}") from err
    if not isinstance(value, dict):
        raise UploadRejected(400, f"{field} must be a JSON object, got {type(value).__name__}")
    return value


def _uploaded(file: Any) -> bool:
    return file is not None and bool(getattr(file, "filename", None))


def _size(file: Any) -> int:
    """Bytes of an uploaded file (FastAPI's ``UploadFile``), without reading it."""
    handle = file.file
    position = handle.tell()
    handle.seek(0, 2)
    size = handle.tell()
    handle.seek(position)
    return size


def _upload(file: Any) -> Upload | None:
    if not _uploaded(file):
        return None
    return Upload("".join(Path(file.filename).suffixes), _size(file))


def is_this_upload(path: str | Path) -> bool:
    """Whether ``path`` is the file the request being answered uploaded (see :class:`Upload`): in the temp folder
    itself, named as MONAI Label names it, with the upload's suffix and size."""
    upload = UPLOADED.get()
    if upload is None:
        return False
    path = Path(path)
    try:
        return (
            path.parent.resolve() == Path(tempfile.gettempdir()).resolve()
            and path.name.startswith("tmp")
            and path.name.endswith(upload.suffix)
            and not path.is_symlink()
            and path.stat().st_size == upload.size
        )
    except OSError:
        return False


def reserved_params(params: dict, field: str) -> None:
    """:class:`UploadRejected` 400 when ``params`` sets a key of :data:`RESERVED_PARAMS`."""
    keys = sorted(k for k in params if k in RESERVED_PARAMS)
    if keys:
        raise UploadRejected(
            400,
            f"{field} may not set {', '.join(map(repr, keys))}: name a datastore image with ?image=ID, upload the file, "
            "or give ?session_id=",
        )


class RequestChecks:
    """The checks run before an endpoint, against the app's tasks and datastore.

    Args:
        app: the :class:`~mmcs_monai.label.app.MMCSLabelApp` (its ``_infers``, ``_strategies``,
            ``_scoring_methods``, ``_trainers``, ``datastore()``, ``sessions()``).
    """

    def __init__(self, app: Any):
        self.app = app

    def uploads(self, values: dict) -> None:
        """Every uploaded file (``file``, ``label``, ``files``) within ``max_upload_mb``: 413 otherwise."""
        limit = int(getattr(self.app, "max_upload_bytes", 0) or 0)
        if not limit:
            return
        files = [values.get("file"), values.get("label"), *(values.get("files") or [])]
        for file in files:
            if _uploaded(file) and (size := _size(file)) > limit:
                raise UploadRejected(
                    413,
                    f"uploaded file {file.filename!r} refused: {size} bytes, more than this server's limit of {limit} bytes (conf max_upload_mb)",
                )

    def known(self, kind: str, name: Any, tasks: dict) -> None:
        if name not in tasks:
            raise UploadRejected(404, f"unknown {kind} {name!r}; this server has: {', '.join(sorted(tasks)) or 'none'}")

    def session_id(self, values: dict) -> None:
        """A session id is a plain name (MONAI Label joins it to its session folder, reads and rewrites what it finds there)."""
        if values.get("session_id"):
            plain_name(values["session_id"], "session_id")

    def model_upload(self, values: dict) -> None:
        raise UploadRejected(
            403,
            f"model {values.get('model')!r}: uploads are refused; the served model is the one given with --conf model at start, "
            "and training replaces it (POST /train/mmcs)",
        )

    def image(self, values: dict) -> None:
        """``image`` must be a datastore id unless the request uploads a file or names a live session."""
        self.session_id(values)
        if _uploaded(values.get("file")):
            return
        session_id = values.get("session_id")
        if session_id:
            if self.app.sessions().get_session(session_id) is None:
                raise UploadRejected(404, f"session {session_id!r} not found (expired or never created): create it with PUT /session/")
            return
        image = values.get("image")
        if not image:
            raise UploadRejected(400, "give an image: a datastore image id (?image=ID), an uploaded file, or a session_id")
        if image not in self.app.datastore().list_images():
            raise UploadRejected(404, f"image {image!r} is not in the datastore: give a datastore image id or upload the file")

    def infer(self, values: dict) -> None:
        self.known("model", values.get("model"), self.app._infers)
        if getattr(values.get("output"), "value", values.get("output")) == "dicom_seg":
            raise UploadRejected(400, "output dicom_seg: this server's datastore is a folder of 2D images; use image, json or all")
        reserved_params(json_object(values.get("params"), "params"), "params")
        self.image(values)

    def infer_wsi_v2(self, values: dict) -> None:
        self.known("model", values.get("model"), self.app._infers)
        wsi = json_object(values.get("wsi"), "wsi")
        params = wsi.get("params") or {}
        if not isinstance(params, dict):
            raise UploadRejected(400, f"wsi.params must be a JSON object, got {type(params).__name__}")
        reserved_params(params, "wsi.params")
        self.image(values)

    def infer_wsi(self, values: dict) -> None:
        self.known("model", values.get("model"), self.app._infers)
        wsi = values.get("wsi")
        reserved_params(getattr(wsi, "params", None) or {}, "params")
        self.image(values)

    def session(self, values: dict) -> None:
        """A session holds one image file, as uploaded: no archive to unpack, no folder of files."""
        if values.get("uncompress"):
            raise UploadRejected(
                400, "uncompress=true refused: this server does not unpack archives; create the session from one image file"
            )
        files = [f for f in values.get("files") or [] if _uploaded(f)]
        if len(files) != 1:
            raise UploadRejected(400, f"a session holds one image file, got {len(files)}: upload the image to segment")
        plain_name(Path(files[0].filename).name, "session file name")

    def strategy(self, values: dict) -> None:
        self.known("strategy", values.get("strategy"), self.app._strategies)

    def scoring(self, values: dict) -> None:
        self.known("scoring method", values.get("method"), self.app._scoring_methods)

    def train_model(self, values: dict) -> None:
        model = values.get("model")
        self.known("model", model, self.app._trainers)
        self._train_params(model, values.get("params") or {})

    def train_all(self, values: dict) -> None:
        params = values.get("params") or {}
        for model in self.app._trainers:
            self._train_params(model, params.get(model) or {})

    def _train_params(self, model: str, params: dict) -> None:
        try:
            self.app._trainers[model].validate(params)
        except ValueError as err:
            raise UploadRejected(400, f"training {model!r} not started: {err}") from err

    def form_params(self, values: dict) -> None:
        json_object(values.get("params"), "params")


def _endpoint(original: Callable, check: Callable[[dict], None] | None, checks: RequestChecks | None = None) -> Callable:
    """A plain function FastAPI runs in its thread pool: check, then run ``original`` (async or not)."""

    def endpoint(**values: Any) -> Any:
        if checks is not None:
            checks.uploads(values)
        if check is not None:
            check(values)
        token = UPLOADED.set(_upload(values.get("file")))
        try:
            result = original(**values)
            return asyncio.run(result) if asyncio.iscoroutine(result) else result
        except HTTPException:
            raise
        except Exception as err:
            raise as_http_error(err) from err
        finally:
            UPLOADED.reset(token)

    return endpoint


def as_http_error(error: BaseException) -> HTTPException:
    """A 4xx for MONAI Label's input errors, else a 500 that names the exception."""
    from monailabel.interfaces.exception import MONAILabelException

    if isinstance(error, MONAILabelException):
        return HTTPException(400, error.msg)
    try:
        from pydantic import ValidationError
    except ImportError:  # pragma: no cover - FastAPI depends on pydantic
        ValidationError = ()  # noqa: N806
    if isinstance(error, ValidationError):  # MONAI Label parses some fields itself (wsi of /infer/wsi_v2)
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        return HTTPException(400, f"request refused: {problems}")
    logger.exception("request failed")
    return HTTPException(500, f"internal error: {type(error).__name__}: {error}")


class BodyLimit:
    """ASGI wrapper: a request body over ``limit`` bytes gets 413 with a reason, and is not read further.

    A declared ``Content-Length`` over the limit is answered before any byte is read; a chunked body is
    counted as it arrives and cut off at the limit (the endpoint sees the client as gone).
    """

    def __init__(self, app: Callable, limit: int):
        self.app, self.limit = app, int(limit)

    async def _refuse(self, send: Callable, size: str) -> None:
        body = json.dumps(
            {"detail": f"request body of {size} bytes refused: more than this server's limit of {self.limit} bytes (conf max_upload_mb)"}
        ).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope.get("type") != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send, declared.decode())
        state = {"received": 0, "refused": False}

        async def limited_receive() -> dict:
            if state["refused"]:
                return {"type": "http.disconnect"}
            message = await receive()
            if message.get("type") == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.limit:
                    state["refused"] = True
                    await self._refuse(send, f"more than {self.limit}")
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: dict) -> None:
            if not state["refused"]:
                await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not state["refused"]:
                raise


def limit_bodies(fastapi_app: Any, limit: int) -> None:
    """Put :class:`BodyLimit` in front of ``fastapi_app`` (built already when the server calls the app's init)."""
    if fastapi_app.middleware_stack is not None:
        fastapi_app.middleware_stack = BodyLimit(fastapi_app.middleware_stack, limit)
        return
    build = fastapi_app.build_middleware_stack
    fastapi_app.build_middleware_stack = lambda: BodyLimit(build(), limit)


def install(fastapi_app: Any, checks: RequestChecks) -> int:
    """Rewire ``fastapi_app``'s MONAI Label routes (see the module docstring); returns how many were changed."""
    by_route: dict[tuple[str, str], Callable[[dict], None]] = {
        ("POST", "/infer/{model}"): checks.infer,
        ("POST", "/infer/wsi/{model}"): checks.infer_wsi,
        ("POST", "/infer/wsi_v2/{model}"): checks.infer_wsi_v2,
        ("POST", "/activelearning/{strategy}"): checks.strategy,
        ("POST", "/scoring/{method}"): checks.scoring,
        ("POST", "/train/{model}"): checks.train_model,
        ("POST", "/train/"): checks.train_all,
        ("PUT", "/datastore/label"): checks.form_params,
        ("PUT", "/datastore/image"): checks.form_params,
        ("PUT", "/session/"): checks.session,
        ("GET", "/session/{session_id}"): checks.session_id,
        ("DELETE", "/session/{session_id}"): checks.session_id,
        ("PUT", "/model/{model}"): checks.model_upload,
    }
    changed = 0
    for route in fastapi_app.router.routes:
        if not isinstance(route, APIRoute) or not route.path.startswith(OFFLOADED):
            continue
        check = next((c for (method, path), c in by_route.items() if path == route.path and method in route.methods), None)
        route.dependant = dataclasses.replace(route.dependant, call=_endpoint(route.dependant.call, check, checks))
        route.app = request_response(route.get_route_handler())
        changed += 1
    limit = int(getattr(checks.app, "max_upload_bytes", 0) or 0)
    if limit:
        limit_bodies(fastapi_app, limit + FORM_MARGIN_BYTES)
    logger.info("label server: %d endpoints run off the event loop, requests checked first, bodies up to %d bytes", changed, limit)
    return changed
