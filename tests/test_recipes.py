"""User recipes ship in the bundle (``configs/recipes/``) and are chosen by name: ``mmcs train --recipe finetune``."""

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import BUNDLE, REPO, subprocess_env
from mmcs_monai.io import InputError
from mmcs_monai.workflows import RECIPE_BASE, bundle_recipes, recipe_files, resolve_recipe, shipped_configs, workflow_config_files

RECIPES = BUNDLE / "configs" / "recipes"


def test_a_recipe_name_resolves_to_the_bundle_file_and_a_path_still_works(tmp_path, monkeypatch):
    assert set(bundle_recipes(BUNDLE)) >= {"cpu", "finetune", "paper_pretrain", "paper_semi"}
    assert resolve_recipe("finetune") == resolve_recipe("finetune.json") == RECIPES / "finetune.json"
    mine = tmp_path / "mine.json"
    mine.write_text("{}")
    assert resolve_recipe(mine) == mine.resolve()
    monkeypatch.chdir(tmp_path)  # a file of the checkout, named from another folder
    assert resolve_recipe("experiments/recipes/dev_data.json") == REPO / "experiments" / "recipes" / "dev_data.json"
    files = workflow_config_files("training", BUNDLE, ["cpu", str(mine)], distributed=False)
    assert files == [str(BUNDLE / "configs" / "train.json"), str(RECIPES / "cpu.json"), str(mine.resolve())]
    assert shipped_configs(files[:2]) and not shipped_configs(files)  # the bundle's recipes are trusted like its configs


def test_an_unknown_recipe_is_an_error_that_lists_the_known_names():
    with pytest.raises(InputError, match=r"nosuch: no such recipe file or recipe name \(the bundle's recipes: cpu, finetune, "):
        resolve_recipe("nosuch")
    result = subprocess.run(
        [sys.executable, "-m", "mmcs_monai.cli", "train", "--recipe", "configs/finetune.json"],
        capture_output=True, text=True, timeout=120, env=subprocess_env(), cwd=BUNDLE,
    )  # fmt: skip
    assert result.returncode == 2 and "finetune" in result.stderr.strip().splitlines()[-1], result.stderr[-2000:]


@pytest.mark.parametrize("name", sorted(p.stem for p in RECIPES.glob("*.json")))
def test_every_recipe_sets_only_options_of_the_training_configs(name):
    """A misspelt key in a recipe would be ignored silently: each names an option of train.json (+ semi.json)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / f) for f in ("train.json", "semi.json")])
    keys = json.loads((RECIPES / f"{name}.json").read_text())
    assert [key for key in keys if key not in parser and key != RECIPE_BASE] == []


def test_a_recipe_is_merged_over_the_recipes_it_names_as_its_base(tmp_path):
    """``finetune_semi`` builds on ``semi`` (phase 2) and ``finetune``: the files come in that order, each once."""
    configs = BUNDLE / "configs"
    assert recipe_files("finetune_semi", BUNDLE) == [configs / "semi.json", RECIPES / "finetune.json", RECIPES / "finetune_semi.json"]
    files = workflow_config_files("training", BUNDLE, ["finetune", "finetune_semi"], distributed=False)
    assert files == [str(configs / f) for f in ("train.json", "recipes/finetune.json", "semi.json", "recipes/finetune_semi.json")]
    loop = tmp_path / "loop.json"
    loop.write_text(json.dumps({RECIPE_BASE: [str(loop)]}))
    with pytest.raises(InputError, match="builds on itself"):
        recipe_files(loop)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({RECIPE_BASE: "semi"}))
    with pytest.raises(InputError, match="must be a list"):
        recipe_files(bad)


def test_a_none_override_sets_the_option_to_none(tmp_path):
    """``monai.bundle.run`` drops None keyword values; ``pretrained=None`` (train from scratch) used to leave the
    ``finetune`` recipe's shipped model in place. Both routes (in process and the command line) now set None."""
    from mmcs_monai.workflows import bundle_command, run_workflow

    config = tmp_path / "probe.json"
    out = tmp_path / "seen.txt"
    config.write_text(json.dumps({"pretrained": "shipped", "out": str(out), "probe": ["$open(@out, 'w').write(repr(@pretrained))"]}))
    run_workflow("probe", BUNDLE, overrides={"pretrained": None}, config_files=[str(config)], quiet=False)
    assert out.read_text() == "None"
    out.unlink()
    command = [sys.executable, "-m", *bundle_command("probe", [str(config)], BUNDLE, {"pretrained": None})]
    subprocess.run(command, check=True, capture_output=True, env=subprocess_env(), timeout=120)
    assert out.read_text() == "None"


def test_the_pool_recipe_balances_sources_crops_and_reads_the_nucleus_channel(dev_data):
    """``experiments/recipes/pool_semi.json`` over phase 2 (the semi-supervised phase on the unlabelled pool): at most
    8 images per source, sources drawn alike (sqrt balance of equal counts), the 2-channel rows with their nucleus
    stain as channel 1, images cropped to 512 px at most."""
    import collections

    import numpy as np
    import tifffile
    from monai.bundle import ConfigParser

    pool = dev_data.parent / "unlabelled" / "manifest.csv"
    if not pool.is_file():
        pytest.skip(f"unlabelled pool not found at {pool}")
    parser = ConfigParser()
    parser.read_config(
        [str(BUNDLE / "configs" / n) for n in ("train.json", "semi.json")]
        + [str(REPO / "experiments" / "recipes" / n) for n in ("generalist_data.json", "pool_semi.json")]
    )
    parser["bundle_root"] = str(BUNDLE)
    items = parser.get_parsed_content("unlabelled#datalist")
    per_source = collections.Counter(i["source"] for i in items)
    assert max(per_source.values()) == 8 and "CellProfiler/examples" in per_source and "usiigaci_example" in per_source
    assert len({i["id"] for i in items}) == len(items) and not any("label" in i for i in items)
    two_channel = [i for i in items if i["subset"] == "fluo_cyto+nucleus_2ch"]
    assert two_channel and all(i["nucleus_channel"] == 1 for i in two_channel)
    assert all(i["nucleus_channel"] is None for i in items if i["subset"] == "he_tissue_rgb")
    weights = list(parser.get_parsed_content("unlabelled#dataloader#sampler").weights)
    share = collections.defaultdict(float)
    for item, weight in zip(items, weights):
        share[item["source"]] += float(weight)
    eight = {s: share[s] for s, n in per_source.items() if n == 8}
    assert max(eight.values()) == pytest.approx(min(eight.values()))  # equal counts, equal shares
    assert share["instanseg/instanseg"] == pytest.approx(eight["CellProfiler/examples"] * (2 / 8) ** 0.5)
    transform = parser.get_parsed_content("unlabelled#images#transform")
    big = next(i for i in items if max(tifffile.TiffFile(i["image"]).pages[0].shape[:2]) > 512)
    image = np.asarray(transform(dict(big))["image"])
    assert image.shape[0] == 2 and max(image.shape[1:]) == 512
    first_two_channel = np.asarray(transform(dict(two_channel[0]))["image"])
    assert first_two_channel[1].std() > 0  # the nucleus stain, not zeros


# Licence words that bar a row from the permissive model: non-commercial, copyleft, no-selling, or terms not known.
_NOT_PERMISSIVE = re.compile(r"\bNC\b|non-?commercial|GPL|Commons Clause|not stated|not verified|provenance", re.IGNORECASE)


def test_the_permissive_recipes_train_only_on_rows_whose_licence_allows_commercial_use(dev_data):
    """``permissive_data.json`` and ``permissive_pool.json`` (the permissive model's labelled and unlabelled rows):
    every row they select has a manifest licence of CC0, MIT, BSD or CC BY with nothing that bars commercial use or
    leaves the terms unknown (read from the manifests here, not through the library), and the ones that do are
    left out: MoNuSeg (CC BY-NC-SA), DeepCell (no licence), DeepLIIF (Commons Clause), SuperSegger (GPL), BCCD,
    the BBBC007 crops and the Yeast Image Toolkit frame."""
    import csv

    from monai.bundle import ConfigParser

    pool = dev_data.parent / "unlabelled" / "manifest.csv"
    extra = dev_data.parent / "extra" / "manifest.csv"
    if not (pool.is_file() and extra.is_file()):
        pytest.skip(f"extra data or unlabelled pool not found next to {dev_data}")
    licences = {}
    for manifest in (dev_data / "manifest.csv", extra, pool):
        with open(manifest, newline="") as f:
            licences.update({row["id"]: row.get("license") or row["licence"] for row in csv.DictReader(f)})
    parser = ConfigParser()
    parser.read_config(
        [str(BUNDLE / "configs" / n) for n in ("train.json", "semi.json")]
        + [
            str(REPO / "experiments" / "recipes" / n)
            for n in ("generalist_data.json", "permissive_data.json", "pool_semi.json", "permissive_pool.json")
        ]
    )
    parser["bundle_root"] = str(BUNDLE)
    train, val = parser.get_parsed_content("train#items"), parser.get_parsed_content("validate#datalist")
    unlabelled = parser.get_parsed_content("unlabelled#datalist")
    assert len(train) > 400 and len(val) > 50 and len(unlabelled) > 40
    for item in train + val + unlabelled:
        licence = licences[item["id"]]
        assert licence.startswith(("CC0", "MIT", "BSD", "repo: LICENSE-BSD3")), (item["id"], licence)
        assert not _NOT_PERMISSIVE.search(licence), (item["id"], licence)
    assert {i["source"] for i in train} == {"dsb_train", "usiigaci_maskrcnn"}
    sources = {i["source"] for i in unlabelled}
    assert "subhasishsaha/colorectal-histology" in sources  # H&E tissue reaches the model only unlabelled
    left_out = {"nadeemlab/DeepLIIF", "wiggins-lab/SuperSegger", "instanseg/instanseg", "deepcell_testing", "Shenggan/BCCD_Dataset"}
    assert not sources & left_out  # BCCD: MIT, but the repository relicenses images it credits to others
    assert not any("BBBC007" in i["id"] or "YIT" in i["id"] for i in unlabelled)


@pytest.mark.parametrize(
    "script, phases",
    [
        ("train_generalist.sh", ["phase1", "phase2", "pool", "size/phase1", "size/pool"]),
        ("train_permissive.sh", ["phase1", "pool", "size/phase1", "size/pool"]),
    ],
)
def test_each_rebuild_script_is_one_command_for_a_model_and_its_size_network(tmp_path, script, phases):
    """The scripts' wiring without their hours: a stand-in ``python`` (``MMCS_VENV``) records each phase's command
    line and writes the model files it names. Each phase is a bundle training run of existing config files into its
    own folder; each later phase starts from the one before it; the size network's phases run at half width."""
    venv, out = tmp_path / "venv", tmp_path / "runs"
    (venv / "bin").mkdir(parents=True)
    recorder = venv / "bin" / "python"
    recorder.write_text(
        f"#!{sys.executable}\n"
        "import json, pathlib, sys\n"
        "args = sys.argv[1:]\n"
        f"with open({str(tmp_path / 'calls.jsonl')!r}, 'a') as f: f.write(json.dumps(args) + '\\n')\n"
        "ckpt = pathlib.Path(args[args.index('--ckpt_dir') + 1])\n"
        "(ckpt / 'model.pt').write_text('x'); (ckpt / 'model_final.pt').write_text('x')\n"
    )
    recorder.chmod(0o755)
    env = {**subprocess_env(), "MMCS_VENV": str(venv), "MMCS_RUN_DIR": str(out)}
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / script), "--device", "cpu"], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 0, result.stderr[-2000:]
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert [Path(c[c.index("--ckpt_dir") + 1]).relative_to(out).as_posix() for c in calls] == phases
    previous = None
    for phase, call in zip(phases, calls):
        assert call[:4] == ["-m", "monai.bundle", "run", "training"] and call[-2:] == ["--device", "cpu"]
        configs = ast.literal_eval(call[call.index("--config_file") + 1])
        assert configs[0] == "bundle/configs/train.json" and all((REPO / c).is_file() for c in configs), configs
        assert (REPO / "bundle/configs/semi.json").as_posix() in {(REPO / c).as_posix() for c in configs} or phase.endswith("phase1")
        if phase.endswith("phase1"):
            assert "--pretrained" not in call  # from scratch
        else:
            assert Path(call[call.index("--pretrained") + 1]) == previous / "model.pt"
        width = call[call.index("--nbase") + 1] if "--nbase" in call else None
        assert width == ("[2,16,32,64,128]" if phase.startswith("size/") else None)
        assert (out / phase / "train.log").is_file()
        previous = out / phase
