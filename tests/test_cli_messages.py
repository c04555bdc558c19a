"""What a user sees from ``mmcs`` (issue 20), run as a subprocess with stdout and stderr piped.

Each mistake exits with status 2 and one ``mmcs: error:`` line; long commands print counted progress lines
(stdout is not a terminal here) and end with a summary line whose numbers are checked against the files the
command wrote; MONAI's trust warning and ignite's fresh-start lines are hidden for the shipped configs and
come back with ``--verbose``.
"""

import csv
import hashlib
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from helpers import BUNDLE, SAMPLE_IMAGES, run_mmcs_batch, subprocess_env
from mmcs_monai.io import read_labels

TRUST_WARNING = 'any `"_target_"` value in it is resolved to an importable callable'
FRESH_START = "Engine run resuming from iteration 0"
NUMBER = r"(\d+(?:\.\d+)?)"


def mmcs(*args, **env) -> subprocess.CompletedProcess:
    """``python -m mmcs_monai.cli ARGS`` with Python's warnings left on (the trust warning is a warning)."""
    environment = subprocess_env(**env)
    environment.pop("PYTHONWARNINGS", None)
    command = [sys.executable, "-m", "mmcs_monai.cli", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment)


def succeeded(result: subprocess.CompletedProcess) -> str:
    """stdout + stderr of a run that must have exited 0."""
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("mmcs: error:")]


def sha_prefix(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def copy_sample_images(folder, count: int):
    folder.mkdir(parents=True, exist_ok=True)
    for path in sorted(SAMPLE_IMAGES.glob("*.tif"))[:count]:
        (folder / path.name).write_bytes(path.read_bytes())
    return folder


# ---------------------------------------------------------------------------------------------- mistakes
@pytest.fixture
def mistakes(tmp_path, tiny_model):
    """Names the mistake cases use: an image folder, one image, an empty output folder, corrupt, empty and
    missing model files, the tiny model."""
    images = copy_sample_images(tmp_path / "images", 1)
    (tmp_path / "corrupt.pt").write_bytes(b"these bytes are no model\n" * 10)
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "out").mkdir()
    return {
        "IMAGES": str(images),
        "IMAGE": str(next(images.iterdir())),
        "OUT": str(tmp_path / "out"),
        "CORRUPT": str(tmp_path / "corrupt.pt"),
        "EMPTY.pt": str(tmp_path / "empty.pt"),
        "MISSING.pt": str(tmp_path / "missing.pt"),
        "TINY": str(tiny_model),
    }


MISTAKES = [
    (["infer", "/nonexistent", "OUT"], "/nonexistent: data list not found"),
    (["infer", "IMAGES", "OUT", "--model", "MISSING.pt"], "MISSING.pt: model file not found"),
    (["infer", "IMAGES", "OUT", "--model", "EMPTY.pt"], "EMPTY.pt: model file is empty"),
    (["infer", "IMAGES", "OUT", "--model", "CORRUPT"], "CORRUPT: not a readable torch checkpoint ("),
    (["infer", "IMAGES", "OUT", "--model", "TINY", "--dimeter", "20"], "unknown option --dimeter (did you mean --diameter?)"),
    (["infer", "IMAGES", "OUT", "--model", "TINY", "--diameter", "abc"], "diameter 'abc': not a number"),
    (["infer", "IMAGES", "OUT", "--model", "TINY", "--precision", "fp64"], "precision must be one of"),
    (["train", "--bundle_root", "OUT"], "OUT: not a bundle folder"),
    (["evaluate", "--data_source", "/nonexistent/manifest.csv"], "/nonexistent/manifest.csv: data list not found"),
    (["evaluate", "--model", "CORRUPT"], "CORRUPT: not a readable torch checkpoint"),
    (["infer-slide", "IMAGE", "OUT", "--model", "TINY", "--precision", "xyz"], "precision must be one of"),
    (
        ["infer-slide", "IMAGE", "OUT", "--model", "TINY", "--diameter", "no_such_subset"],
        "diameter 'no_such_subset': not a number, and no stored",
    ),
    (["diameter-sweep", "/nonexistent"], "/nonexistent: data list not found"),
    (["diameter-sweep", "IMAGES", "--model", "TINY"], "IMAGES: no labelled images in split 'val'"),
    (["export", "--model", "CORRUPT", "--output", "OUT/model.ts"], "CORRUPT: not a readable torch checkpoint"),
]


def test_each_mistake_exits_2_with_one_line_naming_it(mistakes):
    """A wrong path, an unreadable model, a bad option value or an unknown subset: status 2, one
    ``mmcs: error:`` line naming the thing and the problem, no traceback; with ``--verbose`` the traceback.
    The commands run in one child process (:func:`run_mmcs_batch`); the two tests below run real ``mmcs``
    processes."""
    names = re.compile("|".join(map(re.escape, sorted(mistakes, key=len, reverse=True))))

    def named(text: str) -> str:
        return names.sub(lambda m: mistakes[m.group(0)], text)

    commands = [[named(a) for a in args] for args, _ in MISTAKES]
    results = run_mmcs_batch(commands + [[*c, "--verbose"] for c in commands])
    wrong = []
    for (args, line), result, verbose in zip(MISTAKES, results, results[len(commands) :]):
        expected = "mmcs: error: " + named(line)
        noise = "Traceback" in result.stderr or "input summary" in result.stderr  # MONAI's block: --verbose only
        if result.returncode != 2 or [e[: len(expected)] for e in error_lines(result)] != [expected] or noise:
            wrong.append(f"{' '.join(args)}: exit {result.returncode}, expected {expected!r}:\n{result.stderr[-1500:]}")
        if verbose.returncode == 0 or "Traceback" not in verbose.stderr:
            wrong.append(f"{' '.join(args)} --verbose: exit {verbose.returncode}, no traceback:\n{verbose.stderr[-1500:]}")
    assert not wrong, "\n".join(wrong)


def test_a_mistake_in_a_real_process_exits_2_with_one_line(mistakes):
    """A real ``mmcs`` process prints the error line and nothing else (MONAI's input summary: ``--verbose`` only)."""
    nothing = mmcs("infer", "/nonexistent", mistakes["OUT"])
    assert nothing.returncode == 2 and [ln for ln in nothing.stderr.splitlines() if ln.strip()] == [
        "mmcs: error: /nonexistent: data list not found"
    ]
    assert not nothing.stdout.strip(), nothing.stdout
    result = mmcs("infer", mistakes["IMAGES"], mistakes["OUT"], "--model", mistakes["CORRUPT"])
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert [e.split(" (")[0] for e in error_lines(result)] == [f"mmcs: error: {mistakes['CORRUPT']}: not a readable torch checkpoint"]


def test_debug_in_a_real_process_shows_the_traceback(mistakes):
    """``MMCS_DEBUG=1`` (as ``--verbose``, checked in the batch above): the traceback instead of the one line."""
    result = mmcs("infer", "/nonexistent", mistakes["OUT"], MMCS_DEBUG="1")
    assert result.returncode != 0 and "Traceback" in result.stderr
    assert "InputError: /nonexistent: data list not found" in result.stderr
    assert not error_lines(result)


# ---------------------------------------------------------------------------------------- folder inference
SEGMENTED = re.compile(
    rf"(\d+) image\(s\) segmented, (\d+) skipped \(masks already there\), (\d+) bad[^;]*; (\d+) cells; "
    rf"diameter {NUMBER}(?:-{NUMBER})? px; {NUMBER} s, {NUMBER} s/MPix; outputs in (\S+); model (\S+) \(sha256 ([0-9a-f]+)\)"
)


def segmentation_summary(text: str) -> re.Match:
    found = list(SEGMENTED.finditer(text))
    assert len(found) == 1, text[-3000:]
    return found[0]


@pytest.mark.slow
def test_infer_summary_matches_the_written_outputs(tmp_path, tiny_model):
    """Counted progress lines on a pipe; the summary's images, bad file, cells, diameters, rate, folder and
    model hash against what was written; a second run counts the skipped images; no trust warning, no
    ignite fresh-start line."""
    images = copy_sample_images(tmp_path / "images", 3)
    (images / "junk.tif").write_bytes(b"not an image at all")
    out = tmp_path / "out"
    result = mmcs("infer", images, out, "--model", tiny_model)
    text = succeeded(result)
    progress = re.findall(r"\[(\d)/3\] \S+: \d+ cells at diameter [\d.]+ px, [\d.]+ s/image, ETA \d+ s", result.stdout)
    assert progress == ["1", "2", "3"]
    assert TRUST_WARNING not in text and FRESH_START not in text and "Epoch[1] Complete" not in text

    summary = segmentation_summary(result.stdout)
    done, skipped, bad, cells = map(int, summary.group(1, 2, 3, 4))
    masks = sorted(out.glob("*_masks.tif"))
    labels = [read_labels(m) for m in masks]
    assert (done, skipped, bad) == (len(masks), 0, 1) == (3, 0, 1)
    assert "junk.tif" in (out / "bad_samples.csv").read_text()
    assert cells == sum(int(lbl.max()) for lbl in labels) > 0
    with open(out / "segmentation_summary.csv") as f:
        diameters = [float(row["diameter_px"]) for row in csv.DictReader(f)]
    low, high = float(summary.group(5)), float(summary.group(6) or summary.group(5))
    assert (low, high) == pytest.approx((min(diameters), max(diameters)), abs=0.051)
    seconds, rate = float(summary.group(7)), float(summary.group(8))
    megapixels = sum(lbl.size for lbl in labels) / 1e6
    assert rate == pytest.approx(seconds / megapixels, rel=0.05, abs=0.02)
    assert summary.group(9) == str(out) and summary.group(10) == str(tiny_model)
    assert summary.group(11) == sha_prefix(tiny_model)

    extra = sorted(SAMPLE_IMAGES.glob("*.tif"))[3]
    (images / extra.name).write_bytes(extra.read_bytes())
    again = segmentation_summary(succeeded(mmcs("infer", images, out, "--model", tiny_model)))
    assert tuple(map(int, again.group(1, 2, 3))) == (1, 3, 1)
    assert int(again.group(4)) == int(read_labels(out / f"{extra.stem}_masks.tif").max())


@pytest.mark.slow
def test_verbose_brings_back_monai_and_ignite(tmp_path, tiny_model):
    images = copy_sample_images(tmp_path / "images", 1)
    text = succeeded(mmcs("infer", images, tmp_path / "out", "--model", tiny_model, "--verbose"))
    assert TRUST_WARNING in text and FRESH_START in text
    segmentation_summary(text)


# --------------------------------------------------------------------------------------------- evaluation
@pytest.mark.slow
def test_evaluate_summary_matches_its_files_and_a_user_recipe_keeps_the_warning(tmp_path, tiny_model):
    """Progress per image, then images / F1 / cells / outputs / model as in f1_per_image.csv and f1_summary.json;
    a recipe of the user's own is warned about (only the shipped configs are trusted silently)."""
    recipe = tmp_path / "my_recipe.json"
    recipe.write_text(json.dumps({"inference_precision": "fp32"}))
    out = tmp_path / "eval"
    result = mmcs("evaluate", "--model", tiny_model, "--output_dir", out, "--val_limit", 2, "--recipe", recipe)
    text = succeeded(result)
    assert TRUST_WARNING in result.stderr and str(recipe) in result.stderr
    assert re.findall(r"\[(\d)/2\] \S+: F1 [\d.]+, \d+ cells at diameter [\d.]+ px, [\d.]+ s/image, ETA", text) == ["1", "2"]
    pattern = rf"(\d+) image\(s\) scored, (\d+) bad; F1@0.5 {NUMBER}; (\d+) cells; diameter [^;]+; [\d.]+ s, [\d.]+ s/MPix; "
    pattern += r"outputs (\S+), (\S+); model (\S+) \(sha256 ([0-9a-f]+)\)"
    summary = re.search(pattern, text)
    assert summary, text[-3000:]
    with open(out / "f1_per_image.csv") as f:
        rows = list(csv.DictReader(f))
    overall = json.loads((out / "f1_summary.json").read_text())["overall"]
    assert int(summary.group(1)) == len(rows) == overall["images"] == 2 and summary.group(2) == "0"
    assert float(summary.group(3)) == pytest.approx(overall["f1"], abs=5e-4)
    assert int(summary.group(4)) == sum(int(r["cells"]) for r in rows) > 0
    assert (summary.group(5), summary.group(6)) == (str(out / "f1_per_image.csv"), str(out / "f1_summary.json"))
    assert summary.group(7) == str(tiny_model) and summary.group(8) == sha_prefix(tiny_model)


# ------------------------------------------------------------------------------------ slides, sweep, export
@pytest.mark.slow
def test_infer_slide_progress_per_block_and_summary(tmp_path, tiny_model):
    image = sorted(SAMPLE_IMAGES.glob("*.tif"))[0]
    result = mmcs("infer-slide", image, tmp_path / "out", "--model", tiny_model, "--block_size", 128, "--halo", 16)
    succeeded(result)
    summary = re.search(
        rf"(\d+) cells in (\d+) blocks; diameter {NUMBER} px; [\d.]+ s, [\d.]+ s/MPix; outputs (\S+), (\S+); model \S+ \(sha256 (\w+)\)",
        result.stdout,
    )
    assert summary, result.stdout
    cells, blocks = int(summary.group(1)), int(summary.group(2))
    steps = re.findall(rf"\[(\d+)/{blocks}\] block \d+: (\d+) cells so far, [\d.]+ s/block, ETA \d+ s", result.stderr)
    assert [int(i) for i, _ in steps] == list(range(1, blocks + 1)) and blocks > 1
    labels = tifffile.imread(summary.group(4))
    table = summary.group(5)
    assert cells == int(labels.max()) == len(open(table).read().splitlines()) - 1 == int(steps[-1][1]) > 0
    assert summary.group(6) == sha_prefix(tiny_model)


@pytest.mark.slow
def test_diameter_sweep_progress_and_summary_against_its_csv(tmp_path, tiny_model):
    output = tmp_path / "sweep.csv"
    args = ["diameter-sweep", BUNDLE / "sample_data" / "datalist.json", "--model", tiny_model, "--split", "validation"]
    result = mmcs(*args, "--diameters", "15,auto", "--limit", 2, "--output", output)
    succeeded(result)
    assert len(re.findall(r"\[\d/2\] \S+: F1 15 [\d.]+, auto [\d.]+, [\d.]+ s/image, ETA", result.stderr)) == 2
    summary = re.search(rf"(\d+) image\(s\) x (\d+) diameter\(s\) scored; best overall F1 {NUMBER} at diameter (\w+);", result.stderr)
    assert summary, result.stderr[-3000:]
    with open(output) as f:
        rows = list(csv.DictReader(f))
    means = {d: np.mean([float(r["f1"]) for r in rows if r["diameter"] == d]) for d in ("15.0", "auto")}
    best = max(means, key=means.get)
    assert (int(summary.group(1)), int(summary.group(2))) == (2, 2)
    assert float(summary.group(3)) == pytest.approx(means[best], abs=5e-4) and summary.group(4) == best.removesuffix(".0")
    assert f"outputs {output}" in result.stderr and f"(sha256 {sha_prefix(tiny_model)})" in result.stderr
    assert result.stdout.splitlines()[0].startswith("| diameter | overall |")  # the table alone on stdout


@pytest.mark.slow
def test_export_checks_show_progress_and_the_summary_names_the_model(tmp_path, tiny_model):
    result = mmcs("export", "--model", tiny_model, "--output", tmp_path / "model.ts")
    succeeded(result)
    assert len(re.findall(r"\[\d/3\] \S+: max \|eager - TorchScript\| \S+, [\d.]+ s/image", result.stderr)) == 3
    assert (tmp_path / "model.ts").is_file() and f"{tmp_path / 'model.ts'}: diam_mean" in result.stdout
    assert f"from model {tiny_model} (sha256 {sha_prefix(tiny_model)})" in result.stdout


# ---------------------------------------------------------------------------------------------- training
@pytest.mark.slow
def test_training_progress_lines_and_summary(tmp_path):
    ckpt = tmp_path / "trained"
    tiny = ["--nbase", "[2,8,16,32]", "--patch_size", 64, "--batch_size", 4, "--num_workers", 0]
    result = mmcs("train", *tiny, "--epochs", 1, "--val_interval", 1, "--ckpt_dir", ckpt, "--output_dir", tmp_path / "eval")
    text = succeeded(result)
    assert re.search(r"Epoch: 1/1, Iter: 1/\d+ -- train_loss", result.stdout)  # StatsHandler's lines on a pipe
    assert "Loading dataset" not in result.stderr and "Epoch [1/1]" not in result.stderr  # no bars drawn into a pipe
    assert TRUST_WARNING not in text and FRESH_START not in text
    summary = re.search(
        r"training: 1 epoch\(s\), (\d+) iterations, [\d.]+ s \([\d.]+ s/epoch\); best validation F1 [\d.]+; models in (\S+) \(([^)]*)\)",
        text,
    )
    assert summary, text[-3000:]
    assert summary.group(2) == str(ckpt) and summary.group(3).split(", ") == ["model.pt", "model_final.pt", "checkpoint.pt"]
    assert all((ckpt / name).is_file() for name in summary.group(3).split(", "))
    assert "started from scratch" in text
