"""A real napari viewer for the plugin's tests, on a virtual display.

napari draws its canvas with OpenGL, which Qt's ``offscreen`` platform does not offer with Qt 6, so the tests run Qt's
``xcb`` platform on an X server: the one in ``DISPLAY`` if set, else an ``Xvfb`` started here for the session (Debian:
``apt-get install xvfb libxcb-icccm4 libxcb-keysyms1``; ``scripts/test.sh`` installs them where it may). Without napari
or a display the tests skip, and fail under ``MMCS_REQUIRE_NAPARI=1`` (CI).
"""

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from helpers import require_module


def _start_xvfb():
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        return None
    for number in range(90, 140):
        if Path(f"/tmp/.X11-unix/X{number}").exists() or Path(f"/tmp/.X{number}-lock").exists():
            continue
        process = subprocess.Popen(
            [xvfb, f":{number}", "-screen", "0", "1600x1100x24", "-nolisten", "tcp"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.time() + 10
        while time.time() < deadline and process.poll() is None:
            if Path(f"/tmp/.X11-unix/X{number}").exists():
                return process, f":{number}"
            time.sleep(0.05)
        process.kill()
    return None


@pytest.fixture(scope="session")
def display():
    """An X display for Qt (``DISPLAY``, else a session Xvfb); skip, or fail under MMCS_REQUIRE_NAPARI=1, without one."""
    require_module("napari", "NAPARI")
    require_module("pytestqt", "NAPARI")
    started = None
    if not os.environ.get("DISPLAY"):
        started = _start_xvfb()
        if started is None:
            from helpers import _missing

            _missing("NAPARI", "no X display and no Xvfb: apt-get install xvfb libxcb-icccm4 libxcb-keysyms1")
        os.environ["DISPLAY"] = started[1]
    os.environ["QT_QPA_PLATFORM"] = "xcb"
    yield os.environ["DISPLAY"]
    if started is not None:
        started[0].terminate()
        started[0].wait(timeout=10)


@pytest.fixture
def viewer(display, qtbot):
    """A napari viewer (not shown), closed after the test."""
    import napari

    viewer = napari.Viewer(show=False)
    yield viewer
    viewer.close()


@pytest.fixture
def widget(viewer):
    """The plugin's dock widget, found through npe2 (the ``napari.manifest`` entry point) as napari's menu finds it."""
    _, widget = viewer.window.add_plugin_dock_widget("mmcs-monai", "MMCS segmentation")
    return widget


@pytest.fixture
def notifications(display):
    """The napari notifications (errors, warnings, infos) sent during the test, as (severity, message)."""
    from napari.utils.notifications import notification_manager

    seen = []

    def record(notification):
        seen.append((str(notification.severity), notification.message))

    notification_manager.notification_ready.connect(record)
    yield seen
    notification_manager.notification_ready.disconnect(record)
