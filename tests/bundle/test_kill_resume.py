"""Kill a real training process (SIGKILL) while it writes a checkpoint, then resume it."""

import os
import subprocess
import sys
import time

import pytest
import torch

from helpers import BUNDLE, REPO, TINY, bundle, subprocess_env
from mmcs_monai.workflows import bundle_command

pytestmark = pytest.mark.slow


def _training(ckpt_dir, out_dir, epochs, *extra):
    """``python -m monai.bundle run training`` with the tiny network, a checkpoint every iteration."""
    overrides = {"ckpt_dir": ckpt_dir, "output_dir": out_dir, "epochs": epochs, "val_interval": 100, "save_iteration_interval": 1}
    return [sys.executable, "-m", *bundle_command("training", bundle_root=BUNDLE, overrides=overrides), *extra, *TINY]


def _kill_while_writing(cmd, models, timeout=300):
    """Start ``cmd``; SIGKILL it the moment a temporary checkpoint file appears after a first checkpoint."""
    env = subprocess_env()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if models.is_dir() and (models / "checkpoint.pt").is_file():
                if any(p.name.endswith(".tmp") for p in os.scandir(models)):
                    proc.kill()
                    proc.wait()
                    return True
            time.sleep(0.0002)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    raise AssertionError(f"no checkpoint write was caught (exit {proc.returncode}): {proc.stderr.read()[-2000:]}")


def test_sigkill_mid_write_leaves_a_loadable_checkpoint_and_resume_finishes(tmp_path):
    models, out = tmp_path / "models", tmp_path / "eval"
    epochs = 4
    assert _kill_while_writing(_training(models, out, epochs), models)
    leftovers = [p.name for p in models.iterdir() if p.name.endswith(".tmp")]
    assert leftovers, "the kill should have interrupted a write"
    state = torch.load(models / "checkpoint.pt", weights_only=False)  # the previous complete file
    stopped_at = state["trainer"]["iteration"]
    total = epochs * state["trainer"]["epoch_length"]
    assert 0 < stopped_at < total and {"network", "optimizer", "lr_scheduler", "rng"} <= set(state)

    log = bundle(*_training(models, out, epochs, "--resume", "True")[3:])
    assert f"resumed from {models / 'checkpoint.pt'}" in log
    final = torch.load(models / "checkpoint.pt", weights_only=False)["trainer"]
    assert final["iteration"] == total
    assert not [p for p in models.iterdir() if p.name.endswith(".tmp")]  # stale temporaries cleared
    assert (models / "model_final.pt").is_file()


def test_semi_supervised_run_resumes_with_its_teacher_and_pseudo_labels(tmp_path):
    """Phase 2 stopped after epoch 1 and resumed: the pseudo-label store keeps its history. (Pseudo labels at the
    stored diameter: the size search is not what this test is about, and it doubles the run.)"""
    phase1 = tmp_path / "phase1"
    bundle(*_training(phase1, tmp_path / "eval1", 1)[3:])
    models = tmp_path / "semi"
    overrides = {"pretrained": phase1 / "model_final.pt", "ckpt_dir": models, "output_dir": tmp_path / "eval", "val_interval": 100}
    semi = [
        *bundle_command(
            "training",
            ["train.json", "semi.json"],
            BUNDLE,
            {**overrides, "pseudo_interval": 1, "unlabelled_batch_size": 2, "unlabelled_diameter": "stored"},
        ),
        *TINY,
    ]
    bundle(*semi, "--epochs", "1")
    first = torch.load(models / "checkpoint.pt", weights_only=False)
    assert {e["count"] for e in first["pseudo_labels"]["entries"].values()} == {2}  # pretrained + 1 refresh
    log = bundle(*semi, "--epochs", "2", "--resume", "True")
    assert "resumed from" in log
    second = torch.load(models / "checkpoint.pt", weights_only=False)
    assert {e["count"] for e in second["pseudo_labels"]["entries"].values()} == {3}  # history kept, not rebuilt
    assert second["trainer"]["iteration"] == 2 * first["trainer"]["iteration"]

    # the uninterrupted 2-epoch run: the resumed one must have the same student, teacher and pseudo labels
    whole = tmp_path / "semi_whole"
    bundle(*[a if a != str(models) else str(whole) for a in semi], "--epochs", "2")
    uninterrupted = torch.load(whole / "checkpoint.pt", weights_only=False)
    for key in ("network", "teacher"):
        _assert_close_states(
            {k: v for k, v in second[key].items() if torch.is_tensor(v)},
            {k: v for k, v in uninterrupted[key].items() if torch.is_tensor(v)},
        )
    for image, entry in uninterrupted["pseudo_labels"]["entries"].items():
        got = second["pseudo_labels"]["entries"][image]
        assert got["count"] == entry["count"]
        for k, v in entry.items():
            if torch.is_tensor(v):
                torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-5)


def _weights(path):
    return {k: v for k, v in torch.load(path, weights_only=False).items() if torch.is_tensor(v)}


def _assert_close_states(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_resumed_run_equals_the_uninterrupted_run(tmp_path):
    """2 epochs + resume to 4 gives the 4-epoch run: same augmentations drawn (MONAI's per-transform random
    states are in the checkpoint), same weights, same best validation score."""
    common = ["--val_interval", "1", "--save_iteration_interval", "0"]
    full, split = tmp_path / "full", tmp_path / "split"
    bundle(*_training(full, tmp_path / "eval_full", 4)[3:], *common)
    bundle(*_training(split, tmp_path / "eval_split", 2)[3:], *common)
    halfway = _weights(split / "model_final.pt")
    log = bundle(*_training(split, tmp_path / "eval_split", 4)[3:], *common, "--resume", "True")
    assert "resumed from" in log
    assert any(not torch.equal(halfway[k], v) for k, v in _weights(split / "model_final.pt").items())  # it trained on
    _assert_close_states(_weights(split / "model_final.pt"), _weights(full / "model_final.pt"))
    _assert_close_states(_weights(split / "model.pt"), _weights(full / "model.pt"))  # the same best epoch won
    states = [torch.load(d / "checkpoint.pt", weights_only=False) for d in (full, split)]
    assert states[0]["best_model"]["best"] == pytest.approx(states[1]["best_model"]["best"], abs=1e-6)
    assert states[0]["best_model"]["best"] > -1  # a real F1 was recorded
