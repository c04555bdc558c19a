"""Option values as commands, configs, requests and environment variables spell them (mmcs_monai/options.py)."""

import pytest

from mmcs_monai.options import parse_bool


def test_parse_bool_reads_every_spelling_and_refuses_the_rest():
    assert [parse_bool(v) for v in (True, "true", "1", "YES", " on ", 1)] == [True] * 6
    assert [parse_bool(v) for v in (False, "false", "0", "No", "off", 0)] == [False] * 6
    for value in ("", None, "maybe", "2", 2):
        with pytest.raises(ValueError, match=f"semi {value!r}: expected true or false"):
            parse_bool(value, "semi")
