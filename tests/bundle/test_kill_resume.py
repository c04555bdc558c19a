"""Kill a real training process (SIGKILL) while it writes a checkpoint, then resume it."""

import os
import subprocess
import sys
import time

import torch

from test_bundle_runs import BUNDLE, REPO, TINY, bundle, configs


def _training(ckpt_dir, out_dir, epochs, *extra):
    return [
        sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", configs("train.json"),
        "--bundle_root", str(BUNDLE), "--ckpt_dir", str(ckpt_dir), "--output_dir", str(out_dir),
        "--epochs", str(epochs), "--val_interval", "100", "--save_iteration_interval", "1", *extra, *TINY,
    ]


def _kill_while_writing(cmd, models, timeout=300):
    """Start ``cmd``; SIGKILL it the moment a temporary checkpoint file appears after a first checkpoint."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
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
    """Phase 2 stopped after epoch 1 and resumed: the pseudo-label store keeps its history."""
    from test_bundle_runs import BUNDLE as B

    phase1 = tmp_path / "phase1"
    bundle(*_training(phase1, tmp_path / "eval1", 1)[3:])
    models = tmp_path / "semi"
    semi = [
        "run", "training", "--config_file", configs("train.json", "semi.json"), "--bundle_root", str(B),
        "--pretrained", str(phase1 / "model_final.pt"), "--ckpt_dir", str(models), "--output_dir", str(tmp_path / "eval"),
        "--val_interval", "100", "--pseudo_interval", "1", "--unlabelled_batch_size", "2", *TINY,
    ]
    bundle(*semi, "--epochs", "1")
    first = torch.load(models / "checkpoint.pt", weights_only=False)
    assert {e["count"] for e in first["pseudo_labels"]["entries"].values()} == {2}  # pretrained + 1 refresh
    log = bundle(*semi, "--epochs", "2", "--resume", "True")
    assert "resumed from" in log
    second = torch.load(models / "checkpoint.pt", weights_only=False)
    assert {e["count"] for e in second["pseudo_labels"]["entries"].values()} == {3}  # history kept, not rebuilt
    assert second["trainer"]["iteration"] == 2 * first["trainer"]["iteration"]
