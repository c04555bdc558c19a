"""Active-learning simulation: does labelling the most uncertain image first beat labelling at random?

Runs the label app's own pieces, in process, without the HTTP server: a :class:`CellDatastore` per arm over
a pool of dev-train images, :class:`CellTrainTask` to fine-tune (from the previous round's model, as the
server does), :class:`UncertaintyScoring` + :class:`MostUncertain` to choose, and "labelling" = saving the
image's dev label into the datastore. Arms:

- ``uncertainty``: each round, score the unlabelled pool, label the ``step`` most uncertain images;
- ``random``: label ``step`` images drawn at random (seeded).

Both arms start from the same ``start`` random images and the same model, train the same way, and are
scored on the same dev-val images (F1 at IoU 0.5, CellSeg border, the model's stored diameter).

Run it in the label environment (it imports MONAI Label)::

    ~/.venvs/mmcs-label/bin/python benchmarks/active_learning.py --model tests/data/tiny_cpnet.pt

Writes ``<out>/active_learning.csv`` and ``benchmarks/active_learning.png`` and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import logging
import random
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bundle_runs import DEV_MANIFEST  # noqa: E402
from mmcs_monai.data import load_datalist  # noqa: E402
from mmcs_monai.label.activelearning import MostUncertain, UncertaintyScoring  # noqa: E402
from mmcs_monai.label.datastore import CellDatastore  # noqa: E402
from mmcs_monai.label.model import ServedModel  # noqa: E402
from mmcs_monai.label.train import CellTrainTask  # noqa: E402

SAMPLE_IDS = {p.stem for p in (REPO / "bundle" / "sample_data" / "images").glob("*")}  # the start model saw these


def run_arm(strategy: str, seed: int, pool: list[dict], start: list[str], val: list[dict], args, out: Path) -> list[dict]:
    """One arm of one seed: rounds of (train, evaluate, choose ``step`` more), returns one row per round."""
    root = out / f"seed{seed}_{strategy}"
    shutil.rmtree(root, ignore_errors=True)
    studies = root / "studies"
    studies.mkdir(parents=True)
    by_id = {item["id"]: item for item in pool}
    for item in pool:  # the datastore names images by file name: link each under its id
        (studies / f"{item['id']}{Path(item['image']).suffix}").symlink_to(item["image"])
    datastore = CellDatastore(str(studies))
    model = ServedModel.install(args.model, root / "model", "cpu")
    scoring = UncertaintyScoring(model, precision=args.precision)
    trainer = CellTrainTask(model, root / "model", defaults={"semi": False, "publish": "always", "score_after": False})
    rng = random.Random(seed)
    to_label = list(start)
    rows = []
    for round_index in range(args.rounds + 1):
        for image_id in to_label:
            datastore.save_label(image_id, by_id[image_id]["label"], "final", {})
        labelled = len(datastore.labelled_items())
        t0 = time.time()
        trainer({"epochs": args.epochs, "precision": args.precision, "seed": seed}, datastore)
        train_s = time.time() - t0
        f1 = trainer.served_f1(val, args.precision)  # the F1 the server compares models by
        row = {
            "seed": seed,
            "strategy": strategy,
            "labelled": labelled,
            "val_f1": round(f1, 4),
            "train_s": round(train_s, 1),
            "score_s": 0.0,
        }
        if round_index == args.rounds:
            rows.append(row)
            break
        unlabelled = datastore.get_unlabeled_images()
        if strategy == "uncertainty":
            t0 = time.time()
            scoring({}, datastore)
            row["score_s"] = round(time.time() - t0, 1)
            to_label = []
            for _ in range(args.step):  # the strategy, asked once per image as a client would
                chosen = MostUncertain()({}, datastore)["id"]
                to_label.append(chosen)
                datastore.update_image_info(chosen, {"mmcs_uncertainty": {}})  # taken: no longer a candidate
        else:
            to_label = rng.sample(sorted(unlabelled), args.step)
        row["chosen"] = " ".join(sorted(by_id[i]["subset"][:12] for i in to_label))
        rows.append(row)
        print(row, flush=True)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for strategy, colour in (("uncertainty", "tab:red"), ("random", "tab:blue")):
        mine = [r for r in rows if r["strategy"] == strategy]
        seeds = sorted({r["seed"] for r in mine})
        for seed in seeds:
            points = sorted((r["labelled"], r["val_f1"]) for r in mine if r["seed"] == seed)
            ax.plot(*zip(*points), color=colour, alpha=0.3, linewidth=1)
        counts = sorted({r["labelled"] for r in mine})
        means = [sum(r["val_f1"] for r in mine if r["labelled"] == n) / len(seeds) for n in counts]
        ax.plot(counts, means, "o-", color=colour, label=f"{strategy} (mean of {len(seeds)} seeds)")
    ax.set_xlabel("labelled dev-train images")
    ax.set_ylabel("dev-val F1 @ IoU 0.5")
    ax.set_title("Active learning: most uncertain vs random")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEV_MANIFEST), help="dev manifest")
    parser.add_argument("--model", default=str(REPO / "tests" / "data" / "tiny_cpnet.pt"), help="start model")
    parser.add_argument("--pool", type=int, default=48, help="dev-train images the arms choose from (random, per seed)")
    parser.add_argument("--val", type=int, default=32, help="dev-val images scored (complete labels, fixed random subset)")
    parser.add_argument("--start", type=int, default=5)
    parser.add_argument("--step", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=30, help="fine-tuning epochs per round")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--out", default=str(REPO / "runs" / "active_learning"))
    parser.add_argument("--plot", default=str(REPO / "benchmarks" / "active_learning.png"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if not Path(args.data).is_file():
        raise SystemExit(f"{args.data}: dev manifest not found (pass --data)")

    train = [i for i in load_datalist(args.data, split="train", exclude_partial=True) if i["id"] not in SAMPLE_IDS]
    val = [i for i in load_datalist(args.data, split="val", exclude_partial=True) if i["id"] not in SAMPLE_IDS]
    val = random.Random(1234).sample(val, min(args.val, len(val)))
    out = Path(args.out)
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        rng = random.Random(seed)
        pool = rng.sample(train, min(args.pool, len(train)))
        start = [i["id"] for i in rng.sample(pool, args.start)]
        for strategy in ("uncertainty", "random"):
            rows += run_arm(strategy, seed, pool, start, val, args, out)

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "active_learning.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["seed", "strategy", "labelled", "val_f1", "train_s", "score_s", "chosen"])
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, Path(args.plot))

    counts = sorted({r["labelled"] for r in rows})
    seeds = sorted({r["seed"] for r in rows})
    print(f"\n| labelled | uncertainty F1 | random F1 | difference |  (mean of {len(seeds)} seeds)")
    print("|---|---|---|---|")
    wins = 0
    for n in counts:
        mean = {
            s: sum(r["val_f1"] for r in rows if r["strategy"] == s and r["labelled"] == n) / len(seeds) for s in ("uncertainty", "random")
        }
        wins += n != counts[0] and mean["uncertainty"] > mean["random"]
        print(f"| {n} | {mean['uncertainty']:.4f} | {mean['random']:.4f} | {mean['uncertainty'] - mean['random']:+.4f} |")
    print(f"\nuncertainty ahead at {wins} of {len(counts) - 1} acquisition rounds; plot: {args.plot}; rows: {out / 'active_learning.csv'}")


if __name__ == "__main__":
    main()
