"""What the label app changes in MONAI Label's HTTP endpoints: work off the event loop, requests checked first.

MONAI Label 0.8.5 declares its endpoints ``async`` and calls the (blocking) app from them, so one inference
holds the whole server: ``GET /info/`` waited seconds behind it. :func:`install` rewires the routes of the
running FastAPI app, in the server process only:

- **off the event loop**: each endpoint that does work runs in FastAPI's thread pool (its coroutine is run
  to completion there), so the server answers ``/info/`` and task status while it segments;
- **checked before anything runs**: an unknown model, strategy or scoring method (404), ``params`` /
  ``wsi`` form fields that are not a JSON object (400), an ``image`` that is neither a datastore id nor
  accompanied by an upload (404, the same answer whether the name exists on the server or not), an unknown
  session (404), and training parameters the train task refuses (400), each with its reason;
- **errors with a reason**: MONAI Label's own ``MONAILabelException`` becomes a 400 with its message, and
  anything else unexpected a 500 whose detail names the exception (never a bare "Internal Server Error").

An upload is marked for the app with :data:`UPLOADED` (a context variable), so the app can tell a file the
request itself uploaded from a server path someone typed.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import json
import logging
from collections.abc import Callable
from typing import Any

from fastapi import HTTPException
from fastapi.routing import APIRoute, request_response

from mmcs_monai.label.datastore import UploadRejected

logger = logging.getLogger(__name__)

# True while a request that uploaded its own image file is being answered
UPLOADED: contextvars.ContextVar[bool] = contextvars.ContextVar("mmcs_uploaded", default=False)

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


class RequestChecks:
    """The checks run before an endpoint, against the app's tasks and datastore.

    Args:
        app: the :class:`~mmcs_monai.label.app.MMCSLabelApp` (its ``_infers``, ``_strategies``,
            ``_scoring_methods``, ``_trainers``, ``datastore()``, ``sessions()``).
    """

    def __init__(self, app: Any):
        self.app = app

    def known(self, kind: str, name: Any, tasks: dict) -> None:
        if name not in tasks:
            raise UploadRejected(404, f"unknown {kind} {name!r}; this server has: {', '.join(sorted(tasks)) or 'none'}")

    def image(self, values: dict) -> None:
        """``image`` must be a datastore id unless the request uploads a file or names a live session."""
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
        json_object(values.get("params"), "params")
        self.image(values)

    def infer_wsi_v2(self, values: dict) -> None:
        self.known("model", values.get("model"), self.app._infers)
        json_object(values.get("wsi"), "wsi")
        self.image(values)

    def infer_wsi(self, values: dict) -> None:
        self.known("model", values.get("model"), self.app._infers)
        self.image(values)

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


def _endpoint(original: Callable, check: Callable[[dict], None] | None) -> Callable:
    """A plain function FastAPI runs in its thread pool: check, then run ``original`` (async or not)."""

    def endpoint(**values: Any) -> Any:
        if check is not None:
            check(values)
        token = UPLOADED.set(_uploaded(values.get("file")))
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
    logger.exception("request failed")
    return HTTPException(500, f"internal error: {type(error).__name__}: {error}")


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
    }
    changed = 0
    for route in fastapi_app.router.routes:
        if not isinstance(route, APIRoute) or not route.path.startswith(OFFLOADED):
            continue
        check = next((c for (method, path), c in by_route.items() if path == route.path and method in route.methods), None)
        route.dependant = dataclasses.replace(route.dependant, call=_endpoint(route.dependant.call, check))
        route.app = request_response(route.get_route_handler())
        changed += 1
    logger.info("label server: %d endpoints run off the event loop, requests checked first", changed)
    return changed
