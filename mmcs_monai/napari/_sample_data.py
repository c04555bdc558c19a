"""The bundle's sample images as napari sample data (File > Open Sample > MMCS segmentation).

One entry per image of ``bundle/sample_data/images`` (12 CC0 images of the 2018 Data Science Bowl: grey fluorescent
nuclei and RGB purple-stained brightfield, ``bundle/sample_data/SOURCE.md``); each opens the image as the file holds
it ([H, W] uint8 grey or [H, W, 3] uint8 RGB), named by its id. The manifest (``napari.yaml``) names one function per
image: ``dsb_<hash>()``, each returning ``[(data, {"name": id}, "image")]``.
"""

from __future__ import annotations

from pathlib import Path

from mmcs_monai.workflows import default_bundle_root


def sample_images() -> dict[str, Path]:
    """The bundle's sample images: id -> file."""
    folder = default_bundle_root() / "sample_data" / "images"
    return {path.stem: path for path in sorted(folder.glob("*.tif"))}


def open_sample(sample_id: str) -> list[tuple]:
    """napari layer data for one sample image: ``[(array, {"name": sample_id, "rgb": ...}, "image")]``."""
    import tifffile

    data = tifffile.imread(sample_images()[sample_id])
    return [(data, {"name": sample_id, "rgb": data.ndim == 3 and data.shape[-1] in (3, 4)}, "image")]


def _opener(sample_id: str):
    def opener() -> list[tuple]:
        return open_sample(sample_id)

    opener.__name__ = opener.__qualname__ = sample_id
    opener.__doc__ = f"The sample image {sample_id}."
    return opener


# the bundle's sample images (a test checks this list against bundle/sample_data/images and napari.yaml)
SAMPLE_IDS = (
    "dsb_0c6507d493bf79b2",
    "dsb_54fe2d3416951cbc",
    "dsb_5908488d940e846c",
    "dsb_610f32e2d9d270d7",
    "dsb_7aae06bc45588294",
    "dsb_930f246a8e4ff273",
    "dsb_9586e48a9a4353f1",
    "dsb_98c5ead89cd06663",
    "dsb_9ebcfaf2322932d4",
    "dsb_af6b6173c59450bc",
    "dsb_b0e35e06b85da49b",
    "dsb_e414b54f2036bcab",
)
for _id in SAMPLE_IDS:
    globals()[_id] = _opener(_id)
