"""Option values as commands, configs, requests and environment variables spell them (mmcs_monai/options.py)."""

import pytest

from mmcs_monai.options import parse_bool


def test_parse_bool_reads_every_spelling_and_refuses_the_rest():
    assert [parse_bool(v) for v in (True, "true", "1", "YES", " on ", 1)] == [True] * 6
    assert [parse_bool(v) for v in (False, "false", "0", "No", "off", 0)] == [False] * 6
    for value in ("", None, "maybe", "2", 2):
        with pytest.raises(ValueError, match=f"semi {value!r}: expected true or false"):
            parse_bool(value, "semi")


def test_formats_micrometres_pixel_sizes_and_channels_parse_as_commands_spell_them():
    from mmcs_monai.options import parse_channels, parse_formats, parse_micrometres, parse_pixel_size

    assert parse_formats(None) == ("tif",) and parse_formats("GeoJSON, tif,zarr,tif") == ("tif", "geojson", "zarr")
    assert parse_formats(("roi", "ngff")) == ("roi", "zarr")
    with pytest.raises(ValueError, match="'shp': unknown output format; use one or more of tif, geojson, roi, zarr"):
        parse_formats("tif,shp")
    spelled = ("12um", "12 µm", "7.5micron", "1e1 um", "12", 12, "auto", "12px")
    assert [parse_micrometres(v) for v in spelled] == [12, 12, 7.5, 10] + [None] * 4
    assert parse_pixel_size("0.325") == 0.325 and parse_pixel_size("0.5um") == 0.5 and parse_pixel_size(None) is None
    with pytest.raises(ValueError, match="positive"):
        parse_pixel_size(0)
    assert parse_channels("DAPI") == ("DAPI",) and parse_channels("cyto, DAPI") == ("cyto", "DAPI")
    assert parse_channels((0, 2)) == (0, 2) and parse_channels("0,2") == (0, 2) and parse_channels(1) == (1,)
    with pytest.raises(ValueError, match="one channel"):
        parse_channels("a,b,c")
