"""Start the MONAI Label app for real (``monailabel start_server`` on 127.0.0.1) and speak to it over HTTP.

The server runs in the label environment (``bash scripts/setup_env.sh label`` into ``~/.venvs/mmcs-label``,
or ``MMCS_LABEL_PYTHON``); the tests run in the main one. Shared by the label test modules; each module
starts its own server on its own studies folder.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

from helpers import environment_python, subprocess_env

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, url: str, studies: Path, app: Path, process: subprocess.Popen, log: Path):
        self.url, self.studies, self.app, self.process, self.log = url, studies, app, process, log
        self.port = int(url.rsplit(":", 1)[1])

    def get(self, path, **kwargs):
        return requests.get(self.url + path, timeout=120, **kwargs)

    def post(self, path, **kwargs):
        return requests.post(self.url + path, timeout=300, **kwargs)

    def put(self, path, **kwargs):
        return requests.put(self.url + path, timeout=120, **kwargs)

    def wait_done(self, task: str, limit: float = 600.0) -> dict:
        """Poll GET /<task>/ until the last task is no longer running; returns it."""
        deadline = time.time() + limit
        while time.time() < deadline:
            status = self.get(f"/{task}/").json()
            if status["status"] not in ("SUBMITTED", "RUNNING"):
                return status
            time.sleep(1)
        raise AssertionError(f"{task} still running after {limit} s")

    def infos(self) -> dict:
        objects = self.get("/datastore/", params={"output": "all"}).json()["objects"]
        return {k: v["image"]["info"] for k, v in objects.items()}

    def served_model(self) -> Path:
        return self.app / "model" / "mmcs.pt"


@contextmanager
def label_server(root: Path, images: Sequence[Path], model: Path, conf: dict[str, str] | None = None) -> Iterator[Server]:
    """A server on a studies folder holding copies of ``images``, serving ``model``; stopped (with any training
    or scoring process it started) on exit."""
    python = environment_python("label")
    app, studies = root / "app", root / "studies"
    app.mkdir(parents=True)
    shutil.copy(REPO / "apps" / "mmcs" / "main.py", app / "main.py")
    studies.mkdir()
    for image in images:
        shutil.copy(image, studies)
    port = free_port()
    log = root / "server.log"
    settings = {"models": "mmcs", "model": str(model), "precision": "fp32", "device": "cpu", **(conf or {})}
    command = [str(python.parent / "monailabel"), "start_server", "--app", str(app), "--studies", str(studies)]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    for key, value in settings.items():
        command += ["--conf", key, str(value)]
    env = subprocess_env(PATH=f"{python.parent}{os.pathsep}{os.environ['PATH']}")
    env.pop("PYTHONPATH", None)
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        try:
            if requests.get(url + "/info/", timeout=5).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        if process.poll() is not None or time.time() > deadline:
            process.kill()
            pytest.fail(f"label server did not start:\n{log.read_text()[-4000:]}")
        time.sleep(1)
    try:
        yield Server(url, studies, app, process, log)
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # the server and any training/scoring process it started
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        assert process.poll() is not None
