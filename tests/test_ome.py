"""OME-TIFF and OME-Zarr input (mmcs_monai/ome.py): pixel size and channel names from the metadata, channels chosen
by name, diameters in micrometres, one-line errors for bad input, and the overlay in the image's own colours."""

import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image

from helpers import SAMPLE_IMAGES, TINY_MODEL, run_mmcs_batch
from mmcs_monai.data import check_image_options, load_datalist
from mmcs_monai.io import InputError
from mmcs_monai.ome import image_info, open_regions, read_image, resolve_channel
from mmcs_monai.transforms import SaveCellOutputsd


def ome_tiff(path, image, names=("bright", "DAPI"), pixel_size=0.5, unit="µm"):
    metadata = {"axes": "CYX", "PhysicalSizeX": pixel_size, "PhysicalSizeY": pixel_size, "Channel": {"Name": list(names)}}
    if unit:  # OME's default unit is µm
        metadata.update(PhysicalSizeXUnit=unit, PhysicalSizeYUnit=unit)
    tifffile.imwrite(path, image, ome=True, metadata=metadata)
    return path


def sample_two_channel():
    grey = tifffile.imread(sorted(SAMPLE_IMAGES.glob("*.tif"))[0])
    return np.stack([np.full(grey.shape, 5, grey.dtype), grey])


def test_ome_tiff_gives_pixel_size_channel_names_and_pixels(tmp_path):
    data = np.arange(2 * 30 * 40, dtype=np.uint16).reshape(2, 30, 40)
    path = ome_tiff(tmp_path / "a.ome.tif", data, pixel_size=325, names=("cyto", "DAPI"))
    tifffile.imwrite(tmp_path / "nm.ome.tif", data, ome=True, metadata={"axes": "CYX", "PhysicalSizeX": 325, "PhysicalSizeXUnit": "nm"})
    info = image_info(path)
    assert info.pixel_size == 325 and info.channel_names == ("cyto", "DAPI") and info.kind == "ome-tiff"
    assert image_info(tmp_path / "nm.ome.tif").pixel_size == pytest.approx(0.325)
    image, same = read_image(path)
    assert same == info and np.array_equal(image, data.astype(np.float32))
    assert resolve_channel(path, "dapi", info, 2) == 1 and resolve_channel(path, 0, info, 2) == 0
    with open_regions(path) as regions:
        assert regions.info == info and np.array_equal(regions.read(5, 9, 10, 20), data[:, 5:9, 10:20])


def test_ome_zarr_is_read_a_window_at_a_time_with_its_metadata(tmp_path):
    from test_exports import ome_zarr_slide

    labels = np.zeros((200, 150), np.int32)
    labels[50:60, 70:90] = 1
    path = ome_zarr_slide(tmp_path / "s.ome.zarr", labels, pixel_size=0.25)
    info = image_info(path)
    assert info.pixel_size == 0.25 and info.channel_names == ("autofluorescence", "DAPI") and info.kind == "ome-zarr"
    with open_regions(path) as regions:
        assert regions.shape == (200, 150) and regions.channels == 2
        window = regions.read(45, 65, 60, 100)
    assert window.shape == (2, 20, 40) and (window[1][5:15, 10:30] == 200).all() and (window[0] == 3).all()
    assert [i["image"] for i in load_datalist(tmp_path)] == [str(path)]  # a folder of OME-Zarrs lists them
    assert load_datalist(path)[0]["id"] == "s"


def test_an_ome_zarr_window_asks_zarr_for_that_window_only(tmp_path):
    """Lazy by block: a window read indexes level 0 with the window's slices (zarr then decodes only those chunks);
    the whole array is never asked for."""
    from test_exports import ome_zarr_slide

    from mmcs_monai.ome import _open_zarr

    labels = np.zeros((300, 260), np.int32)
    labels[100:120, 100:130] = 1
    image = _open_zarr(ome_zarr_slide(tmp_path / "s.ome.zarr", labels))
    asked = []

    class Recording:
        def __init__(self, array):
            self.array, self.shape, self.dtype, self.ndim = array, array.shape, array.dtype, array.ndim

        def __getitem__(self, index):
            asked.append(index)
            return self.array[index]

    from mmcs_monai.ome import ZarrRegions, _ZarrImage

    regions = ZarrRegions(tmp_path / "s.ome.zarr", _ZarrImage(Recording(image.array), image.axes, image.info, image.attrs))
    window = regions.read(90, 130, 95, 140)
    assert asked == [(slice(None), slice(90, 130), slice(95, 140))]
    assert (window[1] == (labels[90:130, 95:140] > 0) * 200).all()


def test_bad_input_is_one_error_naming_the_file(tmp_path):
    path = ome_tiff(tmp_path / "a.ome.tif", np.zeros((2, 30, 40), np.uint8), unit=None)
    assert image_info(path).pixel_size == 0.5
    broken = tmp_path / "broken.ome.tif"
    broken.write_bytes(path.read_bytes())
    tifffile.tiffcomment(broken, tifffile.tiffcomment(path).replace('SizeX="40"', 'SizeX="41"'))
    with pytest.raises(InputError, match=r"broken.ome.tif: OME metadata disagrees with the pixels"):
        image_info(broken)
    plain = tmp_path / "plain.zarr"
    zarr.open_group(str(plain), mode="w").create_array("0", shape=(10, 10), dtype="uint8")
    with pytest.raises(InputError, match=r"plain.zarr: zarr group has no NGFF 'multiscales'"):
        open_regions(plain)
    with pytest.raises(InputError, match=r"a.ome.tif: no channel named 'GFP'; its channels: 'bright', 'DAPI'"):
        check_image_options([{"image": str(path)}], channels="bright,GFP")
    tifffile.imwrite(tmp_path / "bare.tif", np.zeros((30, 40), np.uint8))
    with pytest.raises(InputError, match=r"bare.tif: diameter '12um' is in micrometres but the image has no pixel size"):
        check_image_options([{"image": str(tmp_path / "bare.tif")}], diameter="12um")
    assert check_image_options([{"image": str(tmp_path / "bare.tif")}], diameter="12um", pixel_size=0.5)  # given: fine


def test_overlay_of_an_rgb_image_keeps_its_colours(tmp_path):
    rgb = np.zeros((40, 50, 3), np.uint8)
    rgb[..., 0], rgb[..., 2] = 200, 120  # a pink/purple stain, H&E-like
    rgb[10:20, 10:20] = (90, 30, 140)
    tifffile.imwrite(tmp_path / "he.tif", rgb, photometric="rgb")
    masks = np.zeros((1, 40, 50), np.int32)
    masks[0, 10:20, 10:20] = 1
    network_input = np.stack([rgb.mean(-1), np.zeros((40, 50))]).astype(np.float32) / 255  # what the network saw: grey
    SaveCellOutputsd(output_dir=str(tmp_path / "out"))(
        {"masks": masks, "image": network_input, "image_file": str(tmp_path / "he.tif"), "id": "he"}
    )
    overlay = np.asarray(Image.open(tmp_path / "out" / "he_overlay.png"))
    background, cell = overlay[30, 40].astype(int), overlay[15, 15].astype(int)
    assert background[0] > background[2] > background[1]  # red > blue > green, as in the stain
    assert cell[2] > cell[0] > cell[1]


@pytest.mark.slow
def test_mmcs_infer_on_an_ome_tiff_with_a_micrometre_diameter_and_its_mistakes(tmp_path):
    """``mmcs infer`` on an OME-TIFF: ``--diameter 6um`` at 0.5 µm per pixel segments at 12 px (summary line and CSV
    in px and µm), ``--channels DAPI`` by name, GeoJSON/ROI/NGFF outputs; the four mistakes exit 2 with one line."""
    folder = tmp_path / "in"
    folder.mkdir()
    ome_tiff(folder / "cells.ome.tif", sample_two_channel())
    (tmp_path / "bare").mkdir()
    tifffile.imwrite(tmp_path / "bare" / "b.tif", sample_two_channel()[1])
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w").create_array("0", shape=(10, 10), dtype="uint8")
    model = ["--model", str(TINY_MODEL)]
    ok, unknown, no_size, no_multiscales = run_mmcs_batch(
        [
            ["infer", folder, tmp_path / "out", *model, "--diameter", "6um", "--channels", "DAPI", "--formats", "tif,geojson,roi,zarr"],
            ["infer", folder, tmp_path / "o2", *model, "--channels", "GFP"],
            ["infer", tmp_path / "bare", tmp_path / "o3", *model, "--diameter", "6um"],
            ["infer-slide", tmp_path / "plain.zarr", tmp_path / "o4", *model],
        ]
    )
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "diameter 12.0 px (6.0 µm)" in ok.stdout + ok.stderr
    summary = (tmp_path / "out" / "segmentation_summary.csv").read_text().splitlines()
    assert summary[0] == "id,image,cells,diameter_px,diameter_um,pixel_size_um" and summary[1].endswith(",12.0,6.0,0.5")
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == [
        "cells_cells.geojson",
        "cells_masks.ome.zarr",
        "cells_masks.tif",
        "cells_overlay.png",
        "cells_rois.zip",
        "segmentation_summary.csv",
    ]
    for result, message in (
        (unknown, "cells.ome.tif: no channel named 'GFP'; its channels: 'bright', 'DAPI'"),
        (no_size, "b.tif: diameter '6um' is in micrometres but the image has no pixel size in its metadata; give --pixel_size"),
        (no_multiscales, "plain.zarr: zarr group has no NGFF 'multiscales' metadata"),
    ):
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("mmcs: error: ") and message in lines[0], result.stderr[
            -2000:
        ]
