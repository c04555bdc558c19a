"""MONAI Deploy application: segment every microscopy image in a folder with an exported mmcs model.

    python mmcs_monai/deploy/app.py -i IMAGES -o OUTPUT -m model.ts      # or: python -m mmcs_monai.deploy ...

``-i``: an image file or a folder of images (TIFF, PNG, JPEG; grey, RGB or multi-channel); ``-m``: the
TorchScript model from ``mmcs export`` / ``ckpt_export`` (or a folder holding it). Writes, per image,
``<name>_masks.tif`` (instance labels, ids 1..N) and ``<name>_cells.csv`` (id, centroid, area, bbox), and
``bad_samples.csv`` when some files could not be read or segmented. The SDK's ``HOLOSCAN_INPUT_PATH``,
``HOLOSCAN_OUTPUT_PATH`` and ``HOLOSCAN_MODEL_PATH`` replace missing ``-i/-o/-m`` (as in a MAP container).

Settings (environment variables, as a packaged app takes them):

=========================  ==================================================================  ==============================
variable                   meaning                                                             default
=========================  ==================================================================  ==============================
MMCS_DIAMETER              pixels, a stored subset name, ``stored`` (the mean) or ``auto``      ``auto`` (estimated per image)
MMCS_PRECISION             ``auto``, ``fp32``, ``bf16``, ``fp16`` (GPU)                         ``auto`` (as ``mmcs infer``)
MMCS_NUCLEUS_CHANNEL       channel index of the nucleus stain in multi-channel images          none
MMCS_CYTO_CHANNEL          channel index of the cytoplasm stain                                mean
MMCS_FLOW_THRESHOLD        mask post-processing, as in Cellpose                                0.4
MMCS_CELLPROB_THRESHOLD    cell-probability logit threshold                                    0.0
MMCS_MIN_SIZE              smallest mask kept (pixels)                                         15
MMCS_ROI_SIZE              tile size at network scale                                          224
MMCS_OVERLAY               ``1`` also writes ``<name>_overlay.png``                            0
MMCS_DEVICE                torch device                                                        GPU if any
=========================  ==================================================================  ==============================

``auto`` is the default, as for every other entry point: bf16 where the device computes it natively,
else fp32. ``MMCS_PRECISION=fp32`` gives exactly ``mmcs infer --precision fp32``'s masks; in bf16 the
masks may differ from ``mmcs infer``'s in a few pixels, since TorchScript applies bf16 autocast to a
different set of ops than eager PyTorch does.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from monai.deploy.conditions import CountCondition
from monai.deploy.core import Application

from mmcs_monai.cells import SEGMENTATION_SUMMARY, write_segmentation_summary
from mmcs_monai.data import BadSampleLog, load_datalist, readable_images
from mmcs_monai.deploy.operators import CellOutputWriterOperator, CellSegmentationOperator, MicroscopyLoaderOperator
from mmcs_monai.io import InputError, is_image_file
from mmcs_monai.options import parse_bool

logger = logging.getLogger("mmcs_monai.deploy")


def _setting(name: str, default=None, kind=str):
    value = os.environ.get(f"MMCS_{name}", "").strip()
    if not value or value.lower() in ("none", "null"):
        return default
    try:
        return kind(value)
    except ValueError:
        raise SystemExit(f"MMCS_{name}={value!r}: expected {kind.__name__}") from None


def _diameter(value: str | None):
    if value is None:
        return "auto"
    try:
        return float(value)
    except ValueError:
        return value  # a stored subset name or "auto"; the model checks it


def _image_list(input_path: Path) -> list[dict]:
    """The images to segment: the one file given, or a folder's images (as ``mmcs infer`` lists them)."""
    if input_path.is_file() and is_image_file(input_path):
        return [{"image": str(input_path.resolve()), "id": input_path.name.split(".")[0]}]
    return load_datalist(input_path)


class CellSegmentationApp(Application):
    """Images -> instance masks and cell tables, with a TorchScript mmcs model (CPU or GPU)."""

    name = "mmcs_cell_segmentation"
    description = "Cell instance segmentation of microscopy images (mmcs-monai, Cellpose 3 CPnet)."
    version = "0.1.0"

    def __init__(self, *args, **kwargs):
        self.bad_samples = BadSampleLog(max_bad_fraction=1.0)
        self.output_path: Path | None = None
        self.writer: CellOutputWriterOperator | None = None
        super().__init__(*args, **kwargs)

    def compose(self):
        context = Application.init_app_context(self.argv)
        input_path, self.output_path = Path(context.input_path), Path(context.output_path)
        self.output_path.mkdir(parents=True, exist_ok=True)
        items = readable_images(_image_list(input_path), self.bad_samples)
        logger.info("%d image(s) to segment in %s, %d unreadable", len(items), input_path, len(self.bad_samples.entries))
        segmenter = CellSegmentationOperator(
            self,
            model_path=context.model_path,
            device=_setting("DEVICE"),
            diameter=_diameter(_setting("DIAMETER")),
            precision=_setting("PRECISION", "auto"),
            roi_size=_setting("ROI_SIZE", None, int),
            flow_threshold=_setting("FLOW_THRESHOLD", None, float),
            cellprob_threshold=_setting("CELLPROB_THRESHOLD", None, float),
            min_size=_setting("MIN_SIZE", None, int),
            name="segmenter",
        )
        if not items:
            return  # nothing to run; the model was still checked above
        loader = MicroscopyLoaderOperator(
            self,
            CountCondition(self, len(items)),
            items=items,
            cyto_channel=_setting("CYTO_CHANNEL", None, int),
            nucleus_channel=_setting("NUCLEUS_CHANNEL", None, int),
            name="loader",
        )
        self.writer = CellOutputWriterOperator(
            self, output_path=self.output_path, bad_samples=self.bad_samples, overlay=_setting("OVERLAY", False, parse_bool), name="writer"
        )
        self.add_flow(loader, segmenter, {("sample", "sample")})
        self.add_flow(segmenter, self.writer, {("segmented", "segmented")})

    def report(self) -> int:
        """Log what was written and the bad samples (also as ``bad_samples.csv``); returns the exit status."""
        written = len(self.writer.written) if self.writer else 0
        logger.info("wrote masks and cell tables for %d image(s) to %s", written, self.output_path)
        if written:
            write_segmentation_summary(self.output_path / SEGMENTATION_SUMMARY, self.writer.summary)
        if self.bad_samples.entries:
            logger.warning(self.bad_samples.summary())
            self.bad_samples.write_csv(self.output_path / "bad_samples.csv")
        return 0 if written or not self.bad_samples.entries else 1


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    app = CellSegmentationApp(argv=argv)
    try:
        app.run()
    except (InputError, ValueError) as err:  # a bad model file or setting: say which, no traceback
        logger.error("%s", err)
        print(f"error: {err}", file=sys.stderr)
        return 2
    return app.report()


if __name__ == "__main__":
    sys.exit(main())
