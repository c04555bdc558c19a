"""Take the README's napari screenshot: a viewer with the MMCS segmentation widget and a segmented sample image.

    python scripts/napari_screenshot.py [docs/images/napari.png]

Runs on a virtual display when there is no ``DISPLAY`` (starts ``Xvfb``; Debian: ``apt-get install xvfb
libxcb-icccm4 libxcb-keysyms1``). Opens the sample image ``dsb_9586e48a9a4353f1`` (fluorescent nuclei) through the
plugin's sample data, docks the widget through npe2, segments with the shipped model at ``auto`` and saves the whole
window (PNG, palette-quantised to stay small).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = "dsb_9586e48a9a4353f1"


def main(output: str = str(REPO / "docs" / "images" / "napari.png")) -> None:
    xvfb = None
    if not os.environ.get("DISPLAY"):
        xvfb = subprocess.Popen([shutil.which("Xvfb") or "Xvfb", ":97", "-screen", "0", "1600x1000x24", "-nolisten", "tcp"])
        time.sleep(2)
        os.environ["DISPLAY"] = ":97"
    os.environ["QT_QPA_PLATFORM"] = "xcb"
    try:
        import napari
        from PIL import Image
        from qtpy.QtWidgets import QApplication

        viewer = napari.Viewer(show=True)
        viewer.window._qt_window.resize(1500, 950)
        _, widget = viewer.window.add_plugin_dock_widget("mmcs-monai", "MMCS segmentation")
        viewer.open_sample("mmcs-monai", SAMPLE)
        widget.set_image(SAMPLE)
        widget.segment()
        deadline = time.time() + 300
        while widget.worker is not None and time.time() < deadline:
            QApplication.processEvents()
            time.sleep(0.05)
        viewer.layers[f"{SAMPLE} masks"].contour = 1
        viewer.reset_view()
        for _ in range(20):
            QApplication.processEvents()
            time.sleep(0.05)
        picture = viewer.screenshot(canvas_only=False, flash=False)
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(picture[..., :3]).quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(output, optimize=True)
        print(f"{output}: {Path(output).stat().st_size // 1024} KB; {widget.status.text()}")
        viewer.close()
    finally:
        if xvfb is not None:
            xvfb.terminate()


if __name__ == "__main__":
    main(*sys.argv[1:])
