"""Does the semi-supervised phase help? 10% labels, the rest unlabelled, equal CPU time, two seeds.

    python -m experiments.semi_supervised.run --seeds 0 1 [--fraction 0.1] [--pretrain_minutes 5]
        [--phase2_minutes 6] [--unlabelled 100] [--out runs/semi_experiment]

For each seed, on ``../shared/data/dev``:

1. keep labels for ``fraction`` of train (seeded draw, at least one image per modality);
   ``--unlabelled`` other train images (seeded) become unlabelled images (labels removed);
2. phase 1: supervised pretraining on the labelled fraction (``pretrain_minutes`` of wall time);
3. from that model, the same wall time each (``phase2_minutes``, pseudo-label refreshes included):
   (a) supervised only, on the labelled fraction; (b) semi-supervised (``bundle/configs/semi.json``)
   on the labelled fraction + the unlabelled images;
4. F1 at IoU 0.5 on dev val (gt_complete yes/mostly), overall and per modality, for the student of
   each run (the model inference would use), and for (b)'s teacher.

Writes ``<out>/results.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from benchmarks.common import REPO
from experiments.same_budget.run import DEV, _run_with_budget, ours_masks_fn, score
from mmcs_monai.workflows import bundle_command


def split_labels(seed: int, fraction: float, n_unlabelled: int):
    """(labelled, unlabelled) rows of dev train, drawn with ``seed``."""
    from mmcs_monai.data import load_datalist, unlabelled

    rng = random.Random(seed)
    train = load_datalist(DEV / "manifest.csv", split="train")
    rng.shuffle(train)
    n_labelled = max(1, round(fraction * len(train)))
    labelled = []
    for subset in sorted({r["subset"] for r in train}):  # one of each modality first
        labelled.append(next(r for r in train if r["subset"] == subset))
    labelled += [r for r in train if r not in labelled][: max(0, n_labelled - len(labelled))]
    rest = [r for r in train if r not in labelled]
    return labelled, unlabelled(rest[:n_unlabelled])


def bundle_cmd(configs: list[str], **overrides) -> list[str]:
    return [sys.executable, "-m", *bundle_command("training", configs, REPO / "bundle", overrides)]


def train(folder: Path, configs: list[str], minutes: float, **overrides) -> Path:
    cmd = bundle_cmd(
        configs,
        ckpt_dir=folder / "models",
        output_dir=folder / "eval",
        time_budget_minutes=minutes,
        epochs=100000,
        val_interval=10**9,
        **overrides,
    )
    seconds = _run_with_budget(cmd, minutes + 5, folder / "train.log")
    model = folder / "models" / "model_final.pt"
    if not model.is_file():
        raise RuntimeError(f"{folder}: no model written; see {folder / 'train.log'}")
    print(f"{folder.name}: {seconds / 60:.1f} min", flush=True)
    return model


def teacher_file(folder: Path) -> Path:
    """Save (b)'s teacher from its checkpoint as a model file."""
    import torch

    state = torch.load(folder / "models" / "checkpoint.pt", map_location="cpu", weights_only=False)
    path = folder / "models" / "teacher.pt"
    torch.save(state["teacher"], path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--unlabelled", type=int, default=100)
    parser.add_argument("--pretrain_minutes", type=float, default=5.0)
    parser.add_argument("--phase2_minutes", type=float, default=6.0)
    parser.add_argument("--pseudo_interval", type=int, default=10, help="epochs between pseudo-label refreshes")
    parser.add_argument("--w", type=float, default=0.4, help="weight of the unlabelled loss")
    parser.add_argument("--out", default=str(REPO / "runs" / "semi_experiment"))
    args = parser.parse_args()
    if not (DEV / "manifest.csv").is_file():
        raise SystemExit(f"dev data not found at {DEV}")
    out = Path(args.out)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for seed in args.seeds:
        folder = out / f"seed{seed}"
        folder.mkdir(parents=True, exist_ok=True)
        labelled, unlabelled = split_labels(seed, args.fraction, args.unlabelled)
        labelled_list = folder / "labelled.json"
        labelled_list.write_text(json.dumps({"training": labelled, "validation": []}))
        unlabelled_list = folder / "unlabelled.json"
        unlabelled_list.write_text(json.dumps(unlabelled))
        common = dict(data_source=labelled_list, seed=seed)
        pretrained = train(folder / "phase1", ["train.json"], args.pretrain_minutes, **common)
        sup = train(folder / "supervised", ["train.json"], args.phase2_minutes, pretrained=pretrained, **common)
        semi = train(
            folder / "semi",
            ["train.json", "semi.json"],
            args.phase2_minutes,
            pretrained=pretrained,
            unlabelled_source=unlabelled_list,
            pseudo_interval=args.pseudo_interval,
            w_unlabelled=args.w,
            **common,
        )
        results[f"seed{seed}"] = {
            "labelled": len(labelled),
            "unlabelled": len(unlabelled),
            "phase1": score(pretrained, ours_masks_fn(pretrained)),
            "supervised": score(sup, ours_masks_fn(sup)),
            "semi": score(semi, ours_masks_fn(semi)),
            "semi_teacher": score(teacher_file(folder / "semi"), ours_masks_fn(teacher_file(folder / "semi"))),
        }
        results_path.write_text(json.dumps(results, indent=1))
    print(
        f"\nF1@0.5 on dev val; {args.fraction:.0%} of train labelled; phase 1 {args.pretrain_minutes:g} min, "
        f"phase 2 {args.phase2_minutes:g} min each\n"
    )
    print("| seed | subset | phase 1 | (a) supervised | (b) semi student | (b) semi teacher |\n|---|---|---|---|---|---|")
    for seed, r in results.items():
        for subset in sorted(r["supervised"], key=lambda k: (k != "overall", k)):
            cells = [f"{r[k][subset]['f1']:.3f}" for k in ("phase1", "supervised", "semi", "semi_teacher")]
            print(f"| {seed} | {subset} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
