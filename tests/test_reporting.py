"""Progress lines and summary parts (mmcs_monai/reporting.py) and the quiet run of the workflows."""

import logging
import warnings

import pytest

from helpers import BUNDLE, REPO
from mmcs_monai.reporting import Progress, diameter_note, format_seconds, timing_note
from mmcs_monai.workflows import check_options, quiet_run


def test_progress_lines_count_rate_and_eta(caplog):
    log = logging.getLogger("test_progress")
    with caplog.at_level(logging.INFO, logger="test_progress"):
        with Progress(4, "segmenting", "image", log, bar=False) as progress:
            for i in range(4):
                progress.start -= 2.0  # each step "takes" two seconds
                progress.step(f"img_{i}: {i} cells")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4
    assert lines[0].startswith("[1/4] img_0: 0 cells, 2.0 s/image, ETA 6 s")
    assert lines[3].startswith("[4/4] img_3: 3 cells, 2.0 s/image, ETA 0 s")


def test_progress_without_a_total_counts_and_disabled_progress_logs_notes_alone(caplog):
    log = logging.getLogger("test_progress")
    with caplog.at_level(logging.INFO, logger="test_progress"):
        Progress(None, "scoring", "block", log, bar=False).step("b")
        Progress(3, "scoring", "image", log, enabled=False).step("plain note")
    assert [r.getMessage().split(",")[0] for r in caplog.records] == ["[1] b", "plain note"]


def test_progress_bar_sends_notes_to_debug(caplog):
    log = logging.getLogger("test_progress")
    with caplog.at_level(logging.INFO, logger="test_progress"):
        with Progress(2, "segmenting", log=log, bar=True) as progress:
            progress.step("hidden behind the bar")
    assert not caplog.records


@pytest.mark.parametrize("seconds, text", [(4.4, "4 s"), (89, "89 s"), (200, "3 min 20 s"), (3900, "1 h 05 min")])
def test_format_seconds(seconds, text):
    assert format_seconds(seconds) == text


def test_summary_parts():
    assert diameter_note([17.44, 17.4, ""]) == "diameter 17.4 px"
    assert diameter_note([8.0, 35.5]) == "diameter 8.0-35.5 px"
    assert diameter_note(["", None]) == ""
    assert timing_note(12.34, 2.0) == "12.3 s, 6.17 s/MPix" and timing_note(3.0) == "3.0 s"


def test_quiet_run_hides_the_trust_warning_for_shipped_configs_only_and_undoes_itself():
    shipped = [str(BUNDLE / "configs" / "inference.json")]
    user = [*shipped, str(REPO / "experiments" / "recipes" / "dev_data.json")]
    for files, hidden in ((shipped, True), (user, False)):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            with quiet_run(files):
                warnings.warn(f"parsing config_file {files}: any `_target_` ...", UserWarning, stacklevel=1)
        assert (not seen) == hidden
    engine_logger = logging.getLogger("ignite.engine.engine.SupervisedTrainer")
    with quiet_run(shipped):
        assert engine_logger.filters and not engine_logger.filter(
            logging.LogRecord(
                engine_logger.name, logging.INFO, "", 0, "Engine run resuming from iteration 0, epoch 0 until 1 epochs", None, None
            )
        )
    assert not engine_logger.filters  # library users' logging is left as it was


def test_check_options_names_the_closest_option():
    files = [str(BUNDLE / "configs" / "inference.json")]
    check_options(files, {"diameter": 20, "mask_settings#min_size": 5, "tracking": "mlflow"})
    with pytest.raises(ValueError, match=r"unknown option --dimeter \(did you mean --diameter\?\)"):
        check_options(files, {"dimeter": 20})


def test_bundle_command_reads_back_as_the_run_it_names(tmp_path):
    """The command line that tests and benchmarks run: config names resolve in the bundle, paths stay, and
    each override reads back (through fire, as ``python -m monai.bundle`` parses it) as the value given."""
    import json

    import fire

    from helpers import BUNDLE
    from mmcs_monai.workflows import bundle_command

    extra = tmp_path / "extra.json"
    overrides = {"epochs": 3, "nbase": [2, 8, 16], "channels_last": True, "learning_rate": 0.001, "ckpt_dir": tmp_path, "train#x": "a b"}
    command = bundle_command("training", ["train.json", extra], BUNDLE, overrides)
    assert command[:3] == ["monai.bundle", "run", "training"]
    seen = fire.Fire(lambda run_id, **kw: kw, command=command[2:])
    assert seen.pop("config_file") == [str(BUNDLE / "configs" / "train.json"), str(extra)]
    assert seen.pop("meta_file") == str(BUNDLE / "configs" / "metadata.json") and seen.pop("bundle_root") == str(BUNDLE)
    assert seen == {
        "epochs": 3,
        "nbase": [2, 8, 16],
        "channels_last": True,
        "learning_rate": 0.001,
        "ckpt_dir": str(tmp_path),
        "train#x": "a b",
    }
    assert bundle_command("evaluating")[4] == json.dumps([str(BUNDLE / "configs" / n) for n in ("train.json", "evaluate.json")])
