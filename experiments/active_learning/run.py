"""Active-learning simulation: which images should a user label first, on a modality-balanced score?

Runs the label app's own pieces in process, without the HTTP server: a :class:`CellDatastore` per arm over
a pool of dev-train and extra-train images, :class:`CellTrainTask` to fine-tune (from the previous round's
model, as the server does), :class:`UncertaintyScoring` (+ :class:`MostUncertain`) for the uncertainty
scores, :mod:`mmcs_monai.label.diversity` for the style vectors and the diversity-aware picks, and
"labelling" = saving the image's reference label into the datastore. Arms (``--strategies``):

- ``random``: ``step`` images drawn at random (seeded);
- ``uncertainty``: the ``step`` most uncertain images (the server's strategy, asked ``step`` times);
- ``uncertainty_diverse``: greedy uncertainty + ``--diversity-weight`` x style distance to the nearest
  labelled or already chosen image (:func:`~mmcs_monai.label.diversity.select_diverse`);
- ``uncertainty_clusters``: k-means on the style vectors, the most uncertain image of each cluster
  (:func:`~mmcs_monai.label.diversity.select_by_clusters`);
- ``quota``: per-modality quotas from the manifest's modality (oracle metadata a server only has if the
  user tags images): each pick goes to the modality with the fewest labelled images, its most uncertain one.

All arms of a seed share the pool, the ``start`` labelled images and the round-0 model (trained once), and
train the same way; they differ only in what is labelled next. The score is F1 at IoU 0.5 (CellSeg border)
on a validation set drawn from dev val and extra val (complete labels), at most ``--val-per-modality`` images
per modality, each segmented at its true median cell diameter (so the score measures segmentation, not the
model's size estimate), averaged per modality and then over modalities. Images larger than ``--crop``
pixels on a side (the extra set's 1024-1280 px fields, a few dev images) enter pool and validation as their
central ``--crop`` x ``--crop`` crop, so uncertainty scoring stays affordable on a CPU; crops are written
under ``<out>/data``. Images are read as the label server reads datastore images: no ``nucleus_channel``
(a 2-channel image's channels are averaged into the first network channel), in training and validation alike.

Run it in the label environment (it imports MONAI Label); the defaults are the run in its ``README.md``
(5 strategies x 5 seeds, about 40 min on one CPU thread)::

    OMP_NUM_THREADS=1 nice -n 15 ~/.venvs/mmcs-label/bin/python -m experiments.active_learning.run

Writes ``<out>/active_learning.csv`` (one row per seed, strategy and round) and ``--plot``, and prints
the tables of its ``README.md``.
"""

from __future__ import annotations

import argparse
import csv
import logging
import random
import shutil
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import (
    DEV_MANIFEST,  # noqa: E402
    REPO,
)
from experiments.active_learning.diversity import image_style, pick_diverse, select_by_clusters
from mmcs_monai.data import load_datalist
from mmcs_monai.diameters import median_diameter
from mmcs_monai.evaluation import diameter_sweep
from mmcs_monai.inference import CellInferer
from mmcs_monai.io import read_labels
from mmcs_monai.label.activelearning import SCORE_KEY, MostUncertain, UncertaintyScoring
from mmcs_monai.label.datastore import CellDatastore
from mmcs_monai.label.model import ServedModel
from mmcs_monai.label.train import CellTrainTask
from mmcs_monai.label.uncertainty import rank_by_uncertainty
from mmcs_monai.transforms import inference_preprocessing

EXTRA_MANIFEST = DEV_MANIFEST.parent.parent / "extra" / "manifest.csv"
SAMPLE_IDS = {p.stem for p in (REPO / "bundle" / "sample_data" / "images").glob("*")}  # the start model saw these
STRATEGIES = ("random", "uncertainty", "uncertainty_diverse", "uncertainty_clusters", "quota")
SHORT = {  # modality -> table column
    "fluorescence_nuclei": "fluo",
    "brightfield_H&E_tissue": "H&E",
    "brightfield_grey": "bf_grey",
    "brightfield_stained_purple": "purple",
    "phase_contrast_bacteria": "bacteria",
    "phase_contrast_cells+nucleus": "phase+nuc",
    "phase_contrast_cells": "phase",
}


def short(modality: str) -> str:
    for prefix, name in SHORT.items():  # "phase_contrast_cells+nucleus" is listed before its prefix
        if modality.startswith(prefix):
            return name
    return modality[:12]


# ---------------------------------------------------------------------------------------------- data
def central_crop(item: dict, folder: Path, crop: int) -> dict:
    """``item`` as the benchmark uses it: no nucleus channel; images over ``crop`` px a side replaced by
    their central crop (image and label written once under ``folder``)."""
    import tifffile

    item = {**item, "nucleus_channel": None, "modality": short(item["subset"])}
    labels = read_labels(item["label"])
    height, width = labels.shape
    if max(height, width) <= crop:
        return item
    top, left = max((height - crop) // 2, 0), max((width - crop) // 2, 0)
    rows, cols = slice(top, top + min(crop, height)), slice(left, left + min(crop, width))
    image_out, label_out = folder / "images" / f"{item['id']}.tif", folder / "labels" / f"{item['id']}.tif"
    if not (image_out.is_file() and label_out.is_file()):
        image = tifffile.imread(item["image"])
        if image.shape[:2] == (height, width):  # H, W[, C]
            cropped, planar = image[rows, cols], False
        elif image.shape[-2:] == (height, width):  # C, H, W (the extra set's 2-channel rows)
            cropped, planar = image[..., rows, cols], True
        else:
            raise SystemExit(f"{item['image']}: image {image.shape} does not match its label {labels.shape}")
        image_out.parent.mkdir(parents=True, exist_ok=True)
        label_out.parent.mkdir(parents=True, exist_ok=True)
        extra = {"planarconfig": "separate", "photometric": "minisblack"} if planar else {}
        tifffile.imwrite(image_out, np.ascontiguousarray(cropped), compression="zlib", **extra)
        tifffile.imwrite(label_out, labels[rows, cols].astype(np.uint16 if labels.max() < 65536 else np.uint32), compression="zlib")
    return {**item, "image": str(image_out), "label": str(label_out)}


def validation_set(args, folder: Path) -> list[dict]:
    """Dev val + extra val (complete labels), at most ``val_per_modality`` random images per modality, each with
    its true median cell diameter."""
    rows = []
    for manifest in (args.data, args.extra):
        rows += [i for i in load_datalist(manifest, split="val", exclude_partial=True) if i["id"] not in SAMPLE_IDS]
    by_modality = defaultdict(list)
    for item in rows:
        by_modality[short(item["subset"])].append(item)
    rng = random.Random(1234)
    chosen = []
    for modality in sorted(by_modality):
        group = sorted(by_modality[modality], key=lambda i: i["id"])
        chosen += rng.sample(group, min(args.val_per_modality, len(group)))
    val = [central_crop(i, folder, args.crop) for i in chosen]
    for item in val:
        item["true_diameter"] = median_diameter(read_labels(item["label"]))
    return val


def draw_pool(train: list[dict], size: int, per_modality: int, rng: random.Random) -> list[dict]:
    """``size`` train images: ``per_modality`` of every modality (or all it has), the rest at random."""
    by_modality = defaultdict(list)
    for item in train:
        by_modality[item["modality"]].append(item)
    pool = []
    for modality in sorted(by_modality):
        pool += rng.sample(by_modality[modality], min(per_modality, len(by_modality[modality])))
    taken = {i["id"] for i in pool}
    rest = [i for i in train if i["id"] not in taken]
    pool += rng.sample(rest, max(0, min(size - len(pool), len(rest))))
    rng.shuffle(pool)
    return pool


# ---------------------------------------------------------------------------------------------- pieces
def evaluate(network, val: list[dict], precision: str) -> dict:
    """Per-image F1 at each image's true diameter -> ``{"modality_mean", "image_mean", <modality>: mean}``."""
    inferer = CellInferer(precision=precision)
    per_modality = defaultdict(list)
    for item in val:
        row = diameter_sweep(network, [item], [item["true_diameter"]], inferer=inferer)[0]
        per_modality[item["modality"]].append(row["f1"])
    result = {m: float(np.mean(v)) for m, v in sorted(per_modality.items())}
    return {
        "modality_mean": float(np.mean(list(result.values()))),
        "image_mean": float(np.mean([f for v in per_modality.values() for f in v])),
        **result,
    }


def styles_of(model: ServedModel, items: list[dict], precision: str) -> dict[str, np.ndarray]:
    """Style vector of every pool image under the served model, at the scale its scores are computed at."""
    preprocess = inference_preprocessing("image")
    inferer = CellInferer(precision=precision)
    network = model.network()
    return {i["id"]: image_style(preprocess({"image": i["image"]})["image"], network, inferer) for i in items}


def stored_scores(datastore: CellDatastore, ids) -> dict[str, dict]:
    scores = {}
    for image_id in ids:
        entry = datastore.get_image_info(image_id).get(SCORE_KEY, {})
        if "score" in entry:
            scores[image_id] = entry
    return scores


def choose(strategy: str, step: int, datastore: CellDatastore, by_id: dict, styles, rng: random.Random, args, seed: int) -> list[str]:
    """The ``step`` images ``strategy`` labels next (scores already in the datastore)."""
    unlabelled = sorted(datastore.get_unlabeled_images())
    if strategy == "random":
        return rng.sample(unlabelled, min(step, len(unlabelled)))
    if strategy == "uncertainty":
        chosen = []
        for _ in range(min(step, len(unlabelled))):  # the server's strategy, asked once per image as a client would
            image_id = MostUncertain()({}, datastore)["id"]
            chosen.append(image_id)
            datastore.update_image_info(image_id, {SCORE_KEY: {}})  # handed out: no longer a candidate
        return chosen
    scores = stored_scores(datastore, unlabelled)
    labelled = [i for i in by_id if i not in set(unlabelled)]
    if strategy == "uncertainty_diverse":
        reference = np.asarray([styles[i] for i in labelled]) if labelled else None
        return pick_diverse({i: s["score"] for i, s in scores.items()}, styles, step, args.diversity_weight, reference)
    if strategy == "uncertainty_clusters":
        ids = sorted(scores)
        picks = select_by_clusters([scores[i]["score"] for i in ids], np.asarray([styles[i] for i in ids]), step, seed=seed)
        return [ids[i] for i in picks]
    if strategy == "quota":
        counts = Counter(by_id[i]["modality"] for i in labelled)
        ranked = rank_by_uncertainty(scores)
        chosen = []
        for _ in range(min(step, len(ranked))):
            left = [i for i in ranked if i not in chosen]
            # the least-labelled modality that still has candidates; ties: the one whose best image ranks first
            modality = min(
                {by_id[i]["modality"] for i in left},
                key=lambda m: (counts[m], next(n for n, i in enumerate(left) if by_id[i]["modality"] == m)),
            )
            pick = next(i for i in left if by_id[i]["modality"] == modality)
            chosen.append(pick)
            counts[modality] += 1
        return chosen
    raise ValueError(f"unknown strategy {strategy!r}")


class Arm:
    """One strategy's datastore, served model and train task for one seed."""

    def __init__(self, root: Path, pool: list[dict], model_source: Path):
        shutil.rmtree(root, ignore_errors=True)
        studies = root / "studies"
        studies.mkdir(parents=True)
        for item in pool:  # the datastore names images by file name: link each under its id
            (studies / f"{item['id']}{Path(item['image']).suffix}").symlink_to(item["image"])
        self.by_id = {item["id"]: item for item in pool}
        self.datastore = CellDatastore(str(studies))
        self.model = ServedModel.install(model_source, root / "model", "cpu")
        self.trainer = CellTrainTask(self.model, root / "model", defaults={"semi": False, "publish": "always", "score_after": False})

    def label(self, ids) -> None:
        for image_id in ids:
            self.datastore.save_label(image_id, self.by_id[image_id]["label"], "final", {})

    def train(self, args, seed: int) -> float:
        start = time.time()
        request = {"epochs": args.epochs, "precision": args.precision, "seed": seed}
        if args.learning_rate is not None:
            request["learning_rate"] = args.learning_rate
        self.trainer(request, self.datastore)
        return time.time() - start

    def score(self, args) -> float:
        start = time.time()
        UncertaintyScoring(self.model, precision=args.precision)({}, self.datastore)
        return time.time() - start


def run_seed(seed: int, train: list[dict], val: list[dict], args, out: Path) -> list[dict]:
    """Every strategy for one seed; one row per (strategy, round), round 0 shared."""
    rng = random.Random(seed)
    pool = draw_pool(train, args.pool, args.pool_per_modality, rng)
    start_ids = [i["id"] for i in rng.sample(pool, args.start)]
    strategies = args.strategies
    needs_scores = any(s != "random" for s in strategies)
    needs_styles = any(s in ("uncertainty_diverse", "uncertainty_clusters") for s in strategies)
    print(f"seed {seed}: pool {dict(sorted(Counter(i['modality'] for i in pool).items()))}", flush=True)

    # round 0, shared by every arm: the start labels, one training run, its score and its picks' inputs
    base = Arm(out / f"seed{seed}" / "start", pool, Path(args.model))
    base.label(start_ids)
    train_s = base.train(args, seed)
    start_f1 = evaluate(base.model.network(), val, args.precision)
    score_s = base.score(args) if needs_scores else 0.0
    base_scores = {i: {SCORE_KEY: s} for i, s in stored_scores(base.datastore, base.by_id).items()}
    t0 = time.time()
    base_styles = styles_of(base.model, pool, args.precision) if needs_styles else {}
    style_s = time.time() - t0
    start_model = base.model.path
    common = {"seed": seed, "round": 0, "labelled": len(start_ids), "train_s": round(train_s, 1)}
    print(
        f"  round 0: {len(start_ids)} labelled, F1 {start_f1['modality_mean']:.4f} (train {train_s:.0f} s, score {score_s:.0f} s)",
        flush=True,
    )

    rows = []
    for strategy in strategies:
        t_arm = time.time()
        arm = Arm(out / f"seed{seed}" / strategy, pool, start_model)
        arm.label(start_ids)
        if strategy != "random":
            arm.datastore.update_image_infos(base_scores)
        styles = dict(base_styles)
        pick_rng = random.Random(seed)
        row = {**common, "strategy": strategy, "score_s": round(score_s, 1), "style_s": round(style_s, 1), **start_f1}
        for round_index in range(1, args.rounds + 1):
            chosen = choose(strategy, args.step, arm.datastore, arm.by_id, styles, pick_rng, args, seed)
            row["chosen"] = " ".join(sorted(arm.by_id[i]["modality"] for i in chosen))
            rows.append(row)
            arm.label(chosen)
            labelled = len(arm.datastore.labelled_items())
            train_s = arm.train(args, seed)
            f1 = evaluate(arm.model.network(), val, args.precision)
            row = {"seed": seed, "strategy": strategy, "round": round_index, "labelled": labelled, "train_s": round(train_s, 1), **f1}
            row["score_s"] = row["style_s"] = 0.0
            if round_index < args.rounds and strategy != "random":
                row["score_s"] = round(arm.score(args), 1)
                if strategy in ("uncertainty_diverse", "uncertainty_clusters"):
                    t0 = time.time()
                    styles = styles_of(arm.model, pool, args.precision)
                    row["style_s"] = round(time.time() - t0, 1)
        row["chosen"] = ""
        rows.append(row)
        curve = " ".join(f"{r['modality_mean']:.3f}" for r in rows if r["strategy"] == strategy and r["seed"] == seed)
        print(f"  {strategy}: {curve} ({time.time() - t_arm:.0f} s)", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------- report
def table(rows: list[dict], strategies: list[str]) -> str:
    """Markdown: F1 (mean over seeds, seed spread max-min) per labelled count, and each strategy against random."""
    seeds = sorted({r["seed"] for r in rows})
    counts = sorted({r["labelled"] for r in rows})
    value = {(r["strategy"], r["labelled"], r["seed"]): r["modality_mean"] for r in rows}

    def per_seed(strategy, n):
        return np.asarray([value[(strategy, n, s)] for s in seeds])

    def later(strategy):  # mean over the acquisition rounds (every count after the start), per seed
        return np.mean([per_seed(strategy, n) for n in counts[1:]], axis=0)

    lines = [
        f"F1 at IoU 0.5, mean over modalities, mean of {len(seeds)} seeds (seed spread = max - min over seeds):",
        "",
        "| labelled | " + " | ".join(strategies) + " |",
        "|---" * (len(strategies) + 1) + "|",
    ]
    for label, get in [(str(n), lambda s, n=n: per_seed(s, n)) for n in counts] + [(f"mean of {counts[1]}-{counts[-1]}", later)]:
        cells = [f"{get(s).mean():.4f} ({np.ptp(get(s)):.3f})" for s in strategies]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if "random" in strategies:
        others = [s for s in strategies if s != "random"]
        lines += [
            "",
            "Against random: mean difference [per-seed differences, min..max]; '>' marks a difference larger than both strategies' seed spreads:",
            "",
            "| labelled | " + " | ".join(others) + " |",
            "|---" * (len(others) + 1) + "|",
        ]
        for label, get in [(str(n), lambda s, n=n: per_seed(s, n)) for n in counts[1:]] + [(f"mean of {counts[1]}-{counts[-1]}", later)]:
            cells = []
            for s in others:
                paired = get(s) - get("random")
                beyond = paired.mean() > max(np.ptp(get(s)), np.ptp(get("random")))
                cells.append(f"{paired.mean():+.4f} [{paired.min():+.3f}..{paired.max():+.3f}]{' >' if beyond else ''}")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    modalities = sorted(k for k in rows[0] if k not in _ROW_KEYS)
    last = counts[-1]
    lines += [
        "",
        f"At {last} labelled, F1 per modality (mean of seeds), and the images each strategy labelled (all seeds, start excluded):",
        "",
    ]
    lines += ["| strategy | " + " | ".join(modalities) + " | labelled images by modality |", "|---" * (len(modalities) + 2) + "|"]
    for s in strategies:
        mine = [r for r in rows if r["strategy"] == s]
        f1s = [np.mean([r[m] for r in mine if r["labelled"] == last]) for m in modalities]
        picked = Counter(m for r in mine for m in r.get("chosen", "").split())
        lines.append(
            f"| {s} | " + " | ".join(f"{f:.3f}" for f in f1s) + " | " + ", ".join(f"{m} {c}" for m, c in sorted(picked.items())) + " |"
        )
    return "\n".join(lines)


_ROW_KEYS = {"seed", "strategy", "round", "labelled", "train_s", "score_s", "style_s", "chosen", "modality_mean", "image_mean"}


def plot(rows: list[dict], strategies: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    seeds = sorted({r["seed"] for r in rows})
    for strategy in strategies:
        mine = [r for r in rows if r["strategy"] == strategy]
        counts = sorted({r["labelled"] for r in mine})
        values = np.asarray(
            [[next(r["modality_mean"] for r in mine if r["labelled"] == n and r["seed"] == s) for s in seeds] for n in counts]
        )
        (line,) = ax.plot(counts, values.mean(axis=1), "o-", label=strategy)
        ax.fill_between(counts, values.min(axis=1), values.max(axis=1), color=line.get_color(), alpha=0.12)
    ax.set_xlabel("labelled pool images")
    ax.set_ylabel("F1 @ IoU 0.5, mean over modalities")
    ax.set_title(f"Active learning: mean of {len(seeds)} seeds, band = min..max")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEV_MANIFEST), help="dev manifest")
    parser.add_argument("--extra", default=str(EXTRA_MANIFEST), help="extra manifest")
    parser.add_argument("--model", default=str(REPO / "tests" / "data" / "tiny_cpnet.pt"), help="start model")
    parser.add_argument("--pool", type=int, default=32, help="train images the arms choose from (per seed)")
    parser.add_argument("--pool-per-modality", type=int, default=2, help="images of every train modality in the pool (or all it has)")
    parser.add_argument("--val-per-modality", type=int, default=4, help="validation images per modality (or all it has)")
    parser.add_argument("--crop", type=int, default=384, help="larger images enter as their central crop of this size")
    parser.add_argument("--start", type=int, default=4)
    parser.add_argument("--step", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30, help="fine-tuning epochs per round")
    parser.add_argument("--learning-rate", type=float, default=None, help="fine-tuning learning rate (default: the server's)")
    parser.add_argument("--diversity-weight", type=float, default=1.0, help="weight of the style-distance term (uncertainty_diverse)")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", default=str(REPO / "runs" / "active_learning"))
    parser.add_argument("--plot", default=str(REPO / "experiments" / "active_learning" / "active_learning.png"))
    args = parser.parse_args()
    args.strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = sorted(set(args.strategies) - set(STRATEGIES))
    if unknown:
        raise SystemExit(f"unknown strategies {unknown}; choose from {', '.join(STRATEGIES)}")
    for manifest in (args.data, args.extra):
        if not Path(manifest).is_file():
            raise SystemExit(f"{manifest}: manifest not found (pass --data / --extra)")
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    started = time.time()

    out = Path(args.out)
    data = out / "data"
    train = []
    for manifest in (args.data, args.extra):
        train += [i for i in load_datalist(manifest, split="train", exclude_partial=True) if i["id"] not in SAMPLE_IDS and "label" in i]
    train = [central_crop(i, data, args.crop) for i in train]
    val = validation_set(args, data)
    print(f"validation: {dict(sorted(Counter(i['modality'] for i in val).items()))}; train: {len(train)} images", flush=True)

    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        rows += run_seed(seed, train, val, args, out)

    out.mkdir(parents=True, exist_ok=True)
    fields = ["seed", "strategy", "round", "labelled", "modality_mean", "image_mean"]
    fields += sorted({k for r in rows for k in r} - set(fields) - {"train_s", "score_s", "style_s", "chosen"})
    fields += ["train_s", "score_s", "style_s", "chosen"]
    with open(out / "active_learning.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in rows)
    plot(rows, args.strategies, Path(args.plot))
    print("\n" + table(rows, args.strategies))
    print(f"\n{(time.time() - started) / 60:.1f} min; plot: {args.plot}; rows: {out / 'active_learning.csv'}")


if __name__ == "__main__":
    main()
