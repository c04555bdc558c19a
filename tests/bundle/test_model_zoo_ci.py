"""Model-zoo's own CI checks (``../shared/tools/model-zoo-ci``, MONAI model-zoo's unmodified ``ci/``) pass on the bundle.

The shipped model (``bundle/models/model.pt``) is tracked in this repository. Model-zoo keeps weights out of
git and lists them in ``large_files.yml`` (downloaded by its CI): the test checks the bundle as a
model-zoo pull request would add it (configs and docs tracked, the weights beside them as the download),
where every check passes. On the bundle as it is tracked here, only check 6 (the large-file hook) objects, to
the weights; ``bash ../shared/hooks/before-stop`` shows that, and the suite does not run the checks twice.
"""

import shutil
import subprocess
import sys

import pytest

from helpers import BUNDLE, REPO, _missing, subprocess_env

pytestmark = pytest.mark.slow
TOOL = REPO.parent / "shared" / "tools" / "model-zoo-ci" / "check_bundle.sh"


def test_model_zoo_ci_passes_every_check(tmp_path):
    if not TOOL.is_file():
        _missing("DEV_DATA", f"model-zoo CI tool not found at {TOOL}")
    bundle = tmp_path / "mmcs_cell_segmentation"
    shutil.copytree(BUNDLE, bundle, ignore=shutil.ignore_patterns("eval", "outputs", "trained"))
    # as in the repository: the bundle's files tracked by git, the model beside them untracked (what the
    # tool copies as a stand-in for model-zoo's large-file download)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(bundle)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "--", ".", ":!models"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "bundle"], check=True)
    assert (bundle / "models" / "model.pt").is_file() and (bundle / "large_files.yml").is_file()
    result = subprocess.run(
        ["bash", str(TOOL), str(bundle), "--python", sys.executable],
        capture_output=True, text=True, timeout=600, env=subprocess_env(), cwd=tmp_path,
    )  # fmt: skip
    lines = [ln for ln in result.stdout.splitlines() if ln[:4] in ("PASS", "FAIL", "SKIP")]
    failed = [ln for ln in lines if not ln.startswith("PASS")]
    assert result.returncode == 0 and not failed and len(lines) >= 15, result.stdout[-4000:] + result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1].endswith("0 failed")
    assert "large_files" not in result.stdout or "not present locally" not in result.stdout


def test_large_files_entries_match_the_shipped_models():
    """``large_files.yml`` names the five tracked weights and the int8 calibration with their current hash (regenerated
    when a model changes)."""
    import hashlib

    import yaml

    entries = yaml.safe_load((BUNDLE / "large_files.yml").read_text())["large_files"]
    assert [e["path"] for e in entries] == [
        "models/model.pt",
        "models/permissive.pt",
        "models/fast.pt",
        "models/size_model.pt",
        "models/size_permissive.pt",
        "models/model.int8.json",
    ]
    for entry in entries:
        digest = hashlib.new(entry["hash_type"], (BUNDLE / entry["path"]).read_bytes()).hexdigest()
        assert digest == entry["hash_val"], entry["path"]
