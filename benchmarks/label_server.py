"""Label server under load: infer latency idle, with 4 clients at once, and while the server trains.

Starts the MONAI Label app for real (``monailabel start_server`` from the label environment, on 127.0.0.1)
on the sample images, with their labels in the datastore, and measures over HTTP:

- **idle**: ``POST /infer/mmcs`` one after the other;
- **4 clients**: the same requests from 4 threads at once (the server runs one inference at a time, so
  they queue; the latency includes the wait);
- **training**: one client's infers while a training run (``POST /train/mmcs``) is in progress, in the
  child process the server starts (1 torch thread at nice 10 on 2 cores: ``--conf child_threads``).

In every phase a fifth thread asks ``GET /info/`` every 0.25 s. The table gives median and max seconds,
errors, and the median against idle. Targets: infer median during training at most 2x idle,
``/info/`` under 0.5 s.

    ~/.venvs/mmcs/bin/python -m benchmarks.label_server [--model tests/data/tiny_cpnet.pt] [--requests 20]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

from benchmarks.common import REPO, cpu_description

SAMPLE = REPO / "bundle" / "sample_data"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root: Path, model: Path, python: Path, conf: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """The app on a copy of the sample images, their labels in ``labels/final`` (all but 4 images)."""
    app, studies = root / "app", root / "studies"
    app.mkdir(parents=True)
    shutil.copy(REPO / "apps" / "mmcs" / "main.py", app)
    (studies / "labels" / "final").mkdir(parents=True)
    images = sorted((SAMPLE / "images").glob("*.tif"))
    for n, image in enumerate(images):
        shutil.copy(image, studies)
        if n >= 4:
            shutil.copy(SAMPLE / "labels" / image.name, studies / "labels" / "final" / image.name)
    port = free_port()
    command = [str(python.parent / "monailabel"), "start_server", "--app", str(app), "--studies", str(studies)]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    for key, value in {"models": "mmcs", "model": str(model), "device": "cpu", **conf}.items():
        command += ["--conf", key, value]
    env = {**os.environ, "PATH": f"{python.parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    log = open(root / "server.log", "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if requests.get(url + "/info/", timeout=5).status_code == 200:
                return process, url
        except requests.ConnectionError:
            time.sleep(1)
    os.killpg(process.pid, signal.SIGKILL)
    raise SystemExit(f"server did not start; see {root / 'server.log'}")


class InfoProbe:
    """``GET /info/`` every ``interval`` seconds in a thread; ``times`` holds each answer's latency."""

    def __init__(self, url: str, interval: float = 0.25):
        self.url, self.interval, self.times, self.errors = url, interval, [], 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            start = time.perf_counter()
            try:
                ok = requests.get(self.url + "/info/", timeout=60).status_code == 200
            except requests.RequestException:
                ok = False
            self.times.append(time.perf_counter() - start)
            self.errors += not ok
            self._stop.wait(self.interval)

    def __enter__(self) -> InfoProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def infer_many(url: str, images: list[str], count: int, clients: int, keep_going=None) -> tuple[list[float], int]:
    """``count`` infers (or until ``keep_going()`` is false) spread over ``clients`` threads; (latencies, errors)."""
    latencies, errors, lock = [], [0], threading.Lock()
    issued = [0]

    def client() -> None:
        while True:
            with lock:
                if issued[0] >= count or (keep_going is not None and not keep_going()):
                    return
                n = issued[0]
                issued[0] += 1
            start = time.perf_counter()
            try:
                response = requests.post(f"{url}/infer/mmcs", params={"image": images[n % len(images)], "output": "json"}, timeout=600)
                ok = response.status_code == 200
            except requests.RequestException:
                ok = False
            with lock:
                latencies.append(time.perf_counter() - start)
                errors[0] += not ok

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, errors[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(REPO / "tests" / "data" / "tiny_cpnet.pt"))
    parser.add_argument("--python", default=os.environ.get("MMCS_LABEL_PYTHON", str(Path.home() / ".venvs/mmcs-label/bin/python")))
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--train-epochs", type=int, default=40)
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()
    print(f"CPU: {cpu_description()}", flush=True)

    root = Path(tempfile.mkdtemp(prefix="bench_label_"))
    process, url = start_server(root, Path(args.model), Path(args.python), {"precision": args.precision})
    try:
        images = sorted(p.stem for p in (SAMPLE / "images").glob("*.tif"))
        requests.post(f"{url}/infer/mmcs", params={"image": images[0], "output": "json"}, timeout=600)  # warm-up
        rows = []
        with InfoProbe(url) as probe:
            latencies, errors = infer_many(url, images, args.requests, 1)
        rows.append(("idle, 1 client", latencies, errors, probe))
        with InfoProbe(url) as probe:
            latencies, errors = infer_many(url, images, args.requests, 4)
        rows.append(("4 clients at once", latencies, errors, probe))

        run = {"epochs": args.train_epochs, "batch_size": 4, "patch_size": 128, "publish": "always", "score_after": False}
        assert requests.post(f"{url}/train/mmcs", json=run, timeout=60).status_code == 200
        while requests.get(f"{url}/train/", timeout=60).json()["status"] == "SUBMITTED":
            time.sleep(0.5)
        time.sleep(5)  # past the child's start-up, into its epochs

        def training() -> bool:
            return requests.get(f"{url}/train/", timeout=60).json()["status"] == "RUNNING"

        with InfoProbe(url) as probe:
            latencies, errors = infer_many(url, images, 10 * args.requests, 1, keep_going=training)
        rows.append(("1 client during training", latencies, errors, probe))
        final = requests.get(f"{url}/train/", timeout=60).json()["status"]
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)

    idle = statistics.median(rows[0][1])
    print(
        f"\nlabel server load ({args.model}, {len(images)} sample images of 256 px, precision {args.precision}, {os.cpu_count()} cores)\n"
    )
    print("| phase | infers | infer median s | infer max s | errors | median / idle | /info/ median s | /info/ max s | /info/ errors |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, latencies, errors, probe in rows:
        median = statistics.median(latencies) if latencies else float("nan")
        print(
            f"| {name} | {len(latencies)} | {median:.3f} | {max(latencies, default=float('nan')):.3f} | {errors} | {median / idle:.2f}x "
            f"| {statistics.median(probe.times):.3f} | {max(probe.times):.3f} | {probe.errors} |"
        )
    print(f"\ntraining run ended {final}; server log: {root / 'server.log'}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
