"""Choose a batch of images to label that are uncertain *and* unlike each other.

Uncertainty alone (:func:`mmcs_monai.label.uncertainty.rank_by_uncertainty`) tends to spend a whole batch on
near-copies: the images a model is most unsure of usually share a modality, so the top five are five
images of one kind. This module adds a diversity term measured in the space of CPnet's *style vector*
(the L2-normalised global average of the deepest encoder features, which Cellpose uses to tell image
types apart):

- :func:`image_style`: the style vector of one image, at the scale the model segments it;
- :func:`select_diverse`: greedy ``score + weight * distance to the nearest already chosen or labelled
  image`` (a weight of 0 is plain top-k; a large weight is k-center-greedy, i.e. a core set);
- :func:`select_by_clusters`: k-means on the styles, the most uncertain image of each cluster;
- :func:`pick_diverse`: :func:`select_diverse` on ``{id: ...}`` mappings, as a label server stores them.

Distances are cosine distances ``1 - s.t`` between unit style vectors (in [0, 2]), divided by the largest
distance among the candidates and the labelled images, so the diversity term is in [0, 1] like the
uncertainty score and ``weight`` means the same for any model.

Used by the active-learning study (``python -m experiments.active_learning.run``), not by the label app: it
learnt no more than uncertainty alone there (``README.md`` beside this file).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mmcs_monai.inference import CellInferer
from mmcs_monai.networks.padding import pad_to_multiple

__all__ = ["image_style", "style_distances", "select_diverse", "select_by_clusters", "pick_diverse"]


def _tiles(size: int, tile: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of near-equal pieces of ``[0, size)``, none longer than ``tile``."""
    count = max(1, math.ceil(size / tile))
    edges = np.linspace(0, size, count + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def image_style(
    image: torch.Tensor | np.ndarray,
    network: torch.nn.Module,
    inferer: CellInferer | None = None,
    diameter: float | str | None = None,
    tile: int = 512,
) -> np.ndarray:
    """CPnet's style vector of one whole image, from the encoder alone (no decoder pass).

    The image is resized as :class:`~mmcs_monai.inference.CellInferer` resizes it for ``diameter`` (so the
    style describes what the network sees when it segments), cut into near-equal tiles of at most ``tile``
    pixels (bounded memory on large images), each tile zero-padded as ``CPnet.forward`` pads and run
    through ``network.downsample`` and ``network.make_style``; the tiles' unit styles are averaged,
    weighted by tile area, and L2-normalised again (as Cellpose averages its tiles' styles). For a
    single tile the result equals ``network.forward_with_style(x)[1]``.

    Args:
        image: ``[2, H, W]`` or ``[1, 2, H, W]`` float32, preprocessed as for inference
            (:func:`mmcs_monai.transforms.inference_preprocessing`).
        network: a :class:`~mmcs_monai.networks.CPnet` (needs ``downsample``, ``make_style``,
            ``pad_divisor``; an exported TorchScript model has no encoder to call and is refused). Run in
            eval mode for the call (its mode is restored afterwards).
        inferer: gives the resize factor (:meth:`CellInferer.zoom_for`); default ``CellInferer()``.
        diameter: cell diameter as the inferer takes it (None: the inferer's, else the model's stored
            mean; ``auto`` counts as the stored mean).
        tile: largest tile side (pixels, at network scale).

    Returns:
        ``[nbase[-1]]`` float32, unit L2 norm.

    Raises:
        TypeError: a network without the CPnet encoder.
        ValueError: an image that is not ``[2, H, W]``/``[1, 2, H, W]``.
    """
    if not all(hasattr(network, name) for name in ("downsample", "make_style", "pad_divisor")):
        raise TypeError(f"{type(network).__name__} has no CPnet encoder (downsample/make_style): load the checkpoint, not an export")
    x = torch.as_tensor(np.asarray(image) if isinstance(image, np.ndarray) else image, dtype=torch.float32)
    x = x[None] if x.ndim == 3 else x
    if x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(f"image must be [C, H, W] or [1, C, H, W], got {tuple(x.shape)}")
    inferer = inferer or CellInferer()
    zoom = inferer.zoom_for(network, diameter)
    parameter = next(iter(network.parameters()), None)
    x = x.to(parameter.device if parameter is not None else "cpu")
    if abs(zoom - 1.0) > 1e-3:
        size = (max(int(round(x.shape[-2] * zoom)), 1), max(int(round(x.shape[-1] * zoom)), 1))
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    was_training = network.training
    network.eval()
    try:
        total, weight = None, 0
        with torch.no_grad():
            for y0, y1 in _tiles(x.shape[-2], tile):
                for x0, x1 in _tiles(x.shape[-1], tile):
                    piece, _, _ = pad_to_multiple(x[..., y0:y1, x0:x1], network.pad_divisor)
                    style = network.make_style(network.downsample(piece)[-1])[0].float()
                    area = (y1 - y0) * (x1 - x0)
                    total = style * area if total is None else total + style * area
                    weight += area
    finally:
        network.train(was_training)
    return F.normalize(total / weight, dim=0).cpu().numpy().astype(np.float32)


def style_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine distances ``[N, M]`` float64 in [0, 2] between the rows of ``a [N, C]`` and ``b [M, C]``.

    Rows are L2-normalised first (an all-zero row counts as distance 1 from everything)."""
    a = np.asarray(a, dtype=np.float64).reshape(len(a), -1)
    b = np.asarray(b, dtype=np.float64).reshape(len(b), -1)
    if a.shape[1] != b.shape[1] and len(a) and len(b):
        raise ValueError(f"style lengths differ: {a.shape[1]} and {b.shape[1]}")
    na = np.linalg.norm(a, axis=1, keepdims=True)
    nb = np.linalg.norm(b, axis=1, keepdims=True)
    a = np.divide(a, na, out=np.zeros_like(a), where=na > 0)
    b = np.divide(b, nb, out=np.zeros_like(b), where=nb > 0)
    return np.clip(1.0 - a @ b.T, 0.0, 2.0)


def _check(scores, styles, k: int) -> tuple[np.ndarray, np.ndarray, int]:
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    styles = np.asarray(styles, dtype=np.float64)
    if styles.ndim != 2 or len(styles) != len(scores):
        raise ValueError(f"styles must be [N, C] with N = len(scores) = {len(scores)}, got {tuple(styles.shape)}")
    if not np.all(np.isfinite(scores)) or not np.all(np.isfinite(styles)):
        raise ValueError("scores and styles must be finite")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    return scores, styles, min(int(k), len(scores))


def select_diverse(
    scores: Sequence[float] | np.ndarray,
    styles: Sequence[Sequence[float]] | np.ndarray,
    k: int,
    weight: float = 1.0,
    reference: Sequence[Sequence[float]] | np.ndarray | None = None,
) -> list[int]:
    """Greedy batch: each pick maximises ``score + weight * d_min / scale``.

    ``d_min`` is the cosine distance (:func:`style_distances`) from a candidate to the nearest image already
    picked in this batch or in ``reference`` (the labelled images); ``scale`` is the largest distance among
    all candidates and reference images, so the diversity term is in [0, 1]. While nothing is picked and no
    reference is given the term is 1 for every candidate, so the first pick is the most uncertain image.
    Ties go to the lower index. ``weight=0`` gives top-k by score; a very large weight gives
    k-center-greedy (farthest-first traversal) on the styles.

    Asked once per image with ``k=1`` and the labelled (and already handed-out) images as ``reference``,
    it picks the same images as one call with ``k`` (what a label server's one-image-per-request strategy needs).

    Args:
        scores: ``[N]`` float, higher = more worth labelling (e.g. the TTA uncertainty in [0, 1]).
        styles: ``[N, C]`` float, the candidates' style vectors (:func:`image_style`).
        k: images to pick (fewer when there are fewer candidates).
        weight: weight of the diversity term (>= 0).
        reference: ``[M, C]`` float style vectors of images already labelled (None or empty: none).

    Returns:
        ``k`` distinct candidate indices (into ``scores``), in the order picked.
    """
    scores, styles, k = _check(scores, styles, k)
    if weight < 0:
        raise ValueError(f"weight must be >= 0, got {weight}")
    ref = np.zeros((0, styles.shape[1])) if reference is None else np.asarray(reference, dtype=np.float64).reshape(-1, styles.shape[1])
    everything = np.concatenate([styles, ref]) if len(ref) else styles
    scale = float(style_distances(everything, everything).max()) if len(everything) > 1 else 0.0
    nearest = style_distances(styles, ref).min(axis=1) if len(ref) else np.full(len(scores), np.inf)
    picked: list[int] = []
    available = np.ones(len(scores), dtype=bool)
    for _ in range(k):
        if not np.isfinite(nearest).any():  # nothing picked, no reference: no distance to reward yet
            diversity = np.ones(len(scores))
        elif scale > 0:
            diversity = np.minimum(nearest / scale, 1.0)
        else:  # every style identical
            diversity = np.zeros(len(scores))
        value = np.where(available, scores + weight * diversity, -np.inf)
        best = int(np.argmax(value))
        picked.append(best)
        available[best] = False
        nearest = np.minimum(nearest, style_distances(styles, styles[best : best + 1])[:, 0])
    return picked


def select_by_clusters(
    scores: Sequence[float] | np.ndarray,
    styles: Sequence[Sequence[float]] | np.ndarray,
    k: int,
    seed: int = 0,
    iterations: int = 50,
) -> list[int]:
    """The most uncertain image of each of ``k`` style clusters.

    k-means (k-means++ start from ``seed``, Lloyd iterations) on the unit style vectors; each cluster gives
    its highest-scoring member (ties: lower index). When fewer than ``k`` clusters are non-empty (repeated
    styles), the rest of the batch is the highest-scoring images not yet picked.

    Args:
        scores: ``[N]`` float, higher = more worth labelling.
        styles: ``[N, C]`` float style vectors.
        k: images to pick (fewer when there are fewer candidates).
        seed: random seed of the k-means++ start.
        iterations: at most this many Lloyd iterations.

    Returns:
        ``k`` distinct candidate indices, highest score first.
    """
    scores, styles, k = _check(scores, styles, k)
    if k == 0:
        return []
    norms = np.linalg.norm(styles, axis=1, keepdims=True)
    points = np.divide(styles, norms, out=np.zeros_like(styles), where=norms > 0)
    rng = np.random.default_rng(seed)
    centres = [points[int(rng.integers(len(points)))]]
    for _ in range(1, k):  # k-means++: next centre drawn in proportion to the squared distance
        d2 = ((points[:, None, :] - np.asarray(centres)[None]) ** 2).sum(-1).min(axis=1)
        if d2.sum() <= 0:
            break
        centres.append(points[int(rng.choice(len(points), p=d2 / d2.sum()))])
    centres = np.asarray(centres)
    assign = np.zeros(len(points), dtype=int)
    for step in range(iterations):
        new = ((points[:, None, :] - centres[None]) ** 2).sum(-1).argmin(axis=1)
        if step and np.array_equal(new, assign):
            break
        assign = new
        centres = np.asarray([points[assign == c].mean(axis=0) if np.any(assign == c) else centres[c] for c in range(len(centres))])
    picked = []
    for c in range(len(centres)):
        members = np.flatnonzero(assign == c)
        if len(members):
            picked.append(int(members[np.argmax(scores[members])]))  # argmax: first (lowest index) of ties
    rest = [i for i in np.lexsort((np.arange(len(scores)), -scores)) if i not in picked]
    picked += [int(i) for i in rest[: k - len(picked)]]
    return sorted(picked, key=lambda i: (-scores[i], i))


def pick_diverse(
    scores: Mapping[str, float],
    styles: Mapping[str, Sequence[float]],
    k: int = 1,
    weight: float = 1.0,
    labelled_styles: Sequence[Sequence[float]] | np.ndarray | None = None,
) -> list[str]:
    """:func:`select_diverse` on image ids: candidates are the ids in both ``scores`` and ``styles``.

    Args:
        scores: ``{image id: uncertainty score}``.
        styles: ``{image id: style vector [C]}`` (lists or arrays, as a datastore stores them).
        k: images to pick.
        weight: weight of the diversity term.
        labelled_styles: ``[M, C]`` styles of the labelled images (and of images handed out but not yet
            labelled), or None.

    Returns:
        up to ``k`` ids, in the order picked (ids sorted first, so equal inputs give equal picks).
    """
    ids = sorted(set(scores) & set(styles))
    if not ids:
        return []
    chosen = select_diverse(
        [float(scores[i]) for i in ids],
        np.asarray([np.asarray(styles[i], dtype=np.float64) for i in ids]),
        k,
        weight,
        None if labelled_styles is None or len(labelled_styles) == 0 else np.asarray(labelled_styles, dtype=np.float64),
    )
    return [ids[i] for i in chosen]
