"""Estimate the cell diameter of an image with the segmentation network itself: no first guess needed.

A CPnet finds cells well only when they are near its training size (``diam_mean`` pixels, 30 by
default, give or take its scale augmentation). Segmenting once at the stored diameter and measuring
what was found (the old ``auto``, now ``refine``) therefore fails when cells are 3-4x off: there is
nothing to measure, or only fragments. :func:`estimate_diameter` instead

1. segments a crop of the image as if its cells had each of a few candidate diameters, spread over
   0.25x-4x the model's stored mean (:attr:`DiameterSearch.factors`), largest first; each crop is
   resized so the network sees at most ``crop x crop`` pixels (256: five candidates cost about as
   much as segmenting a 570 x 570 image once, whatever the image's size);
2. measures the cells found and stops at the first candidate whose measured median diameter agrees
   with it (``|log2(measured / candidate)| <= tolerance``: the network saw the cells near its
   training size; the tolerance is wide because a network measures cells it sees off its
   training size as closer to that size than they are). Largest first, because a too-fine zoom cuts big cells into pieces that can also
   agree with a small candidate, while a too-coarse one finds nothing or cells that disagree. When
   no candidate agrees, the one closest to agreeing is kept;
3. refines until the measurement agrees closely with the size it was made at (``refine_above``; at most
   ``refinements`` times): segments the crop at the measured diameter and measures again. On dense tissue a
   candidate well above the true size can agree within the tolerance (touching nuclei merge into larger
   objects at that zoom) and each refinement then moves only part of the way down (108 -> 88 -> 64 -> 42 ->
   31 -> 26 px on an H&E image whose nuclei measure 26 px): stopping after two left ``auto`` at 42 px there,
   below the stored diameter's F1. A candidate that already agrees closely costs no refinement.

4. settles: on an image the network sees whole at the chosen candidate's zoom (one that fits the crop; with
   ``whole_below`` > 0 also one up to that many times the crop's area), a measurement within ``settle_within``
   of the candidate's size makes that size the estimate, and that segmentation the image's
   (:attr:`SizeEstimate.flows`): the caller does not segment the image a second time. On images of 256-400 px
   this is most of what ``auto`` cost over a run at the true diameter.

   ``whole_below`` is 0 by default since 0.4.1. With 2 (0.4.0) the 4x candidate measured the E. coli val image
   (1002 x 1004 px, rods of 25 px) whole, 56 px instead of 55 on its busiest crop, and the follow-up at 56 px found
   7 objects of about 48 px (touching rods merged at that zoom) in its crop: enough to agree, so ``auto`` chose
   47.8 px (F1 0.14 against 0.95, main model). The follow-up at 55 px finds 3 in its crop, fewer than
   ``min_cells``; the search goes on and finds 25 px. The margin was thin (3 objects against 5 needed): the
   half-width network of ``experiments/half_width`` and the permissive model found 6-7 there and chose 48-52 px
   (F1 0.04-0.06); step 5 is the fix.

5. checks coverage (``min_coverage``, since 0.4.3): merged cells at a coarse zoom measure near the candidate's size,
   but they are a few objects while the network calls far more pixels cell; the rest fail the flow check. A
   candidate agrees only when its masks cover at least half of those pixels (:attr:`Candidate.coverage`). On the
   E. coli val image the 4x and 2x candidates covered 0.20-0.45 of them, the 1x one 0.80-0.84; on the 81 val
   images the candidates the search kept covered 0.59-1.0.

6. stays in range (``max_beyond``, since 0.4.5): follow-ups, refinements and the estimate stay within the candidates'
   range widened 2x on each side (0.125x-8x the stored mean). On an image without cells of any size it knows, a
   network may find a few specks at every zoom; each refinement then measured them smaller (0.5-2 px), and the image
   was segmented at a zoom of 15-60.

It works for any CPnet, including a Cellpose 3 checkpoint file, and needs no fitting. The crop is the
square window of the image with the most intensity variation (at the candidate's scale), so sparse
images are measured where their cells are.

The network that measures need not be the one that segments: a model with a size network (since 0.4.4,
:meth:`~mmcs_monai.networks.CPnet.attach_size_network`; the shipped ``model.pt`` has ``size_model.pt``, the half-width
network of ``fast.pt``) runs this search on it, a quarter of the compute per pixel, and segments only at the size it
finds (:meth:`~mmcs_monai.inference.CellInferer.estimate_diameter`). On the 69 val images that changed F1 by -0.005
over images and +0.001 over modalities, and ``auto`` went from 1.5-2.4x to 1.2-1.8x the time of a run at the true
diameter (benchmarks/README.md, "0.4.4").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from mmcs_monai.diameters import cell_areas, equivalent_diameters


@dataclass(frozen=True)
class DiameterSearch:
    """Settings of the multi-scale diameter search.

    Attributes:
        factors: candidate diameters as multiples of the model's stored mean diameter (``diam_labels``).
        crop: side (network pixels) of the square the network sees per candidate.
        min_cells: a candidate must find at least this many cells to count.
        tolerance: largest ``|log2(measured / candidate)|`` that counts as agreement.
        refine_above: refine when the chosen candidate's ``|log2(measured / candidate)|`` exceeds this.
        refinements: at most this many refinements (each segments the crop at the last measured diameter); the
            search stops sooner once a measurement agrees within ``refine_above``.
        follow_within: a candidate with ``min_cells`` cells that disagrees by at most this much is followed at
            once (the crop segmented at its measured diameter), and the follow-up taken if it agrees: cells
            between two grid points are found at their size instead of at a finer grid point, in pieces.
        whole_below: a candidate segments the whole image instead of the busiest crop when the image, at the
            candidate's zoom, is at most this many times the crop's area (0, the default: only when it fits the crop).
        settle_within: the chosen candidate's size is the estimate, and its segmentation the image's, when it
            covered the whole image and measured within this (``|log2(measured / candidate)|``) of its size;
            otherwise the estimate is the measurement (0: always the measurement).
        min_coverage: a candidate agrees only when its masks cover at least this fraction of the pixels the network
            called cell (:attr:`Candidate.coverage`): at a zoom too coarse for the cells, touching cells merge into a
            few objects near the candidate's size while most of the cell pixels fail the flow check (0: no check).
        max_beyond: the estimate stays within the candidates' range widened by this factor on each side
            (``[min(factors) / max_beyond, max(factors) * max_beyond]`` times the stored mean: 3.4-216 px for a
            model that stored 27 px). A few specks measured on a crop with no cells of the network's sizes once gave
            0.5-2 px, and segmenting a 512 px image at that size (a zoom of 15-60) took more memory than the machine
            had (the permissive half-width network on a BBBC022 pool image, 2026-12-05).
    """

    factors: tuple[float, ...] = (4.0, 2.0, 1.0, 0.5, 0.25)
    crop: int = 256
    min_cells: int = 5
    tolerance: float = 0.75
    refine_above: float = 0.25
    refinements: int = 6
    follow_within: float = 1.5
    whole_below: float = 0.0
    settle_within: float = 0.1
    min_coverage: float = 0.5
    max_beyond: float = 2.0

    def __post_init__(self):
        if not self.factors or any(not f > 0 for f in self.factors):
            raise ValueError(f"factors must be positive, got {self.factors}")
        if not 0 <= self.min_coverage <= 1:
            raise ValueError(f"min_coverage must be in [0, 1], got {self.min_coverage}")
        if self.crop < 32:
            raise ValueError(f"crop must be at least 32 network pixels, got {self.crop}")
        if not self.max_beyond >= 1:
            raise ValueError(f"max_beyond must be at least 1, got {self.max_beyond}")

    def bounds(self, stored_diameter: float) -> tuple[float, float]:
        """The smallest and largest estimate (pixels) for a model whose stored mean diameter is ``stored_diameter``."""
        return (
            stored_diameter * min(self.factors) / self.max_beyond,
            stored_diameter * max(self.factors) * self.max_beyond,
        )


@dataclass(frozen=True)
class Candidate:
    """What one candidate diameter found on the crop: ``cells`` count and their median ``measured`` diameter (image px),
    and ``coverage``: the fraction of the crop's cell pixels (cell-probability logit above the masks' threshold) that
    lie in a mask (1.0 when the network called no pixel cell).

    ``flows``: the network's output ``[3, h, w]`` float32 at the candidate's zoom when the crop was the whole image
    (else None), kept so that the search's answer can be that segmentation.
    """

    diameter: float
    measured: float
    cells: int
    coverage: float = 1.0
    flows: torch.Tensor | None = field(default=None, compare=False, repr=False)

    @property
    def disagreement(self) -> float:
        return abs(math.log2(self.measured / self.diameter)) if self.measured > 0 else math.inf

    def agrees(self, search: DiameterSearch) -> bool:
        """Enough cells, measured within ``search.tolerance`` of the candidate, covering enough of the cell pixels."""
        return self.cells >= search.min_cells and self.disagreement <= search.tolerance and self.coverage >= search.min_coverage


def _median_diameter_and_count(masks: np.ndarray) -> tuple[float, int]:
    """Median equivalent diameter and count of the cells in ``masks`` that the crop's edge does not cut
    (a cut cell measures small); ``(0.0, 0)`` when every cell is cut."""
    edge = np.unique(np.concatenate([masks[0], masks[-1], masks[:, 0], masks[:, -1]]))
    areas = cell_areas(np.where(np.isin(masks, edge[edge > 0]), 0, masks))
    return (float(np.median(equivalent_diameters(areas))), int(areas.size)) if areas.size else (0.0, 0)


def busiest_window(image: torch.Tensor, height: int, width: int) -> tuple[int, int]:
    """Top-left corner (y, x) of the ``height x width`` window of ``image`` [C, H, W] with the largest intensity variance.

    Computed on a coarse grid (window / 4 steps) from box means of ``x`` and ``x**2``, summed over channels.
    """
    _, full_h, full_w = image.shape
    if height >= full_h and width >= full_w:
        return 0, 0
    height, width = min(height, full_h), min(width, full_w)
    step = max(1, min(height, width) // 4)
    x = image.float()[None]
    # coarse box statistics: pool by `step`, then sum over the window in cells of `step`
    mean = F.avg_pool2d(x, step, step, ceil_mode=True)
    square = F.avg_pool2d(x * x, step, step, ceil_mode=True)
    kh, kw = max(1, height // step), max(1, width // step)
    kh, kw = min(kh, mean.shape[-2]), min(kw, mean.shape[-1])
    window_mean = F.avg_pool2d(mean, (kh, kw), 1)
    window_square = F.avg_pool2d(square, (kh, kw), 1)
    variance = (window_square - window_mean**2).sum(dim=1)[0]
    flat = int(torch.argmax(variance))
    gy, gx = divmod(flat, variance.shape[-1])
    return min(gy * step, full_h - height), min(gx * step, full_w - width)


@dataclass(frozen=True)
class SizeEstimate:
    """The search's answer: ``diameter`` (image px), the ``candidates`` tried in order, and ``flows``
    ``[3, h, w]`` float32: the network's output on the whole image at ``diameter``'s zoom when the search settled
    on a whole-image candidate (``h, w`` = the image's size times ``diam_mean / diameter``, rounded), else None."""

    diameter: float
    candidates: list[Candidate]
    flows: torch.Tensor | None = None


def estimate_diameter(
    image: torch.Tensor,
    run_network: Callable[[torch.Tensor], torch.Tensor],
    masks: Callable[[np.ndarray], np.ndarray],
    stored_diameter: float,
    diam_mean: float,
    search: DiameterSearch | None = None,
    cell_threshold: float = 0.0,
) -> tuple[float, list[Candidate]]:
    """``(diameter, candidates)`` of :func:`search_diameter` (same arguments)."""
    found = search_diameter(image, run_network, masks, stored_diameter, diam_mean, search, cell_threshold)
    return found.diameter, found.candidates


def search_diameter(
    image: torch.Tensor,
    run_network: Callable[[torch.Tensor], torch.Tensor],
    masks: Callable[[np.ndarray], np.ndarray],
    stored_diameter: float,
    diam_mean: float,
    search: DiameterSearch | None = None,
    cell_threshold: float = 0.0,
) -> SizeEstimate:
    """Cell diameter (pixels of ``image``) found by the multi-scale search, and the segmentation it settled on.

    Args:
        image: [2, H, W] float32, normalised as for the network.
        run_network: ``[1, 2, h, w] -> [1, 3, h, w]`` flows at the size given (tiling and precision are the caller's).
        masks: flows ``[3, h, w]`` numpy -> int instance labels [h, w] (the caller's mask thresholds).
        stored_diameter: the model's stored mean cell diameter (``diam_labels``, pixels).
        diam_mean: the diameter the network is trained to see (pixels at network scale).
        search: the search settings (default :class:`DiameterSearch`()).
        cell_threshold: cell-probability logit above which a pixel is cell (the masks' ``cellprob_threshold``), for
            :attr:`Candidate.coverage`.

    Returns:
        the estimate, what each candidate (then the refinement) found, and the settled segmentation if any
        (:class:`SizeEstimate`). When no candidate agrees (:meth:`Candidate.agrees`), the one covering most among
        those with ``min_cells`` cells measured within the tolerance is taken, else the largest agreeing one with
        any cell, else the one closest to agreeing among those whose masks cover ``min_coverage`` of the cell pixels;
        when there is none, ``stored_diameter``. Follow-ups, refinements and the estimate stay within
        :meth:`DiameterSearch.bounds` (a measurement beyond one is taken as that bound).
    """
    search = search or DiameterSearch()
    side = search.crop
    low, high = search.bounds(stored_diameter)

    def _within(diameter: float) -> float:
        return min(max(diameter, low), high)

    def _try(diameter: float) -> Candidate:
        # follow-ups and refinements try measured sizes: kept within the bounds, where the zoom stays reasonable
        return _segment_and_measure(image, _within(diameter), run_network, masks, diam_mean, side, search.whole_below, cell_threshold)

    candidates: list[Candidate] = []
    chosen = None
    for factor in sorted(search.factors, reverse=True):
        candidate = _try(stored_diameter * factor)
        candidates.append(candidate)
        if candidate.agrees(search):
            chosen = candidate
            break
        if (
            candidate.cells >= search.min_cells
            and candidate.coverage >= search.min_coverage
            and search.tolerance < candidate.disagreement <= search.follow_within
        ):
            # enough cells, measured off the candidate (cells between two grid points): follow the measurement
            followed = _try(candidate.measured)
            candidates.append(followed)
            if followed.agrees(search):
                chosen = followed
                break
    if chosen is None:
        # none agrees with enough cells covering enough: of those agreeing with enough cells, the one covering most
        # (merged cells cover least); else (a small or sparse image) the largest agreeing candidate that found any,
        # else the one closest to agreeing, else the stored diameter
        found = [c for c in candidates if c.cells]
        agreeing = [c for c in found if c.disagreement <= search.tolerance]
        enough = [c for c in agreeing if c.cells >= search.min_cells]
        # the last resort takes only masks that explain the cell pixels: specks in a haze the network calls cell at
        # every zoom (a modality it does not know) say nothing about the cells' size
        covering = [c for c in found if c.coverage >= search.min_coverage]
        if enough:
            chosen = max(enough, key=lambda c: c.coverage)
        elif agreeing:
            chosen = max(agreeing, key=lambda c: c.diameter)
        elif covering:
            chosen = min(covering, key=lambda c: c.disagreement)
        else:
            return SizeEstimate(float(stored_diameter), candidates)
    for _ in range(search.refinements):
        if chosen.disagreement <= search.refine_above or _within(chosen.measured) == chosen.diameter:
            break  # agrees closely, or measures beyond a bound it was already tried at
        refined = _try(chosen.measured)
        candidates.append(refined)
        if refined.cells < min(search.min_cells, chosen.cells):
            break
        chosen = refined
    if chosen.flows is not None and chosen.cells and chosen.disagreement <= search.settle_within:
        return SizeEstimate(float(chosen.diameter), candidates, chosen.flows)
    return SizeEstimate(float(_within(chosen.measured)), candidates)


def _segment_and_measure(
    image, diameter, run_network, masks, diam_mean, side: int, whole_below: float, cell_threshold: float = 0.0
) -> Candidate:
    """Segment the busiest crop of ``image`` (``side`` network px; the whole image when that is at most ``whole_below``
    times the crop's area) as if its cells were ``diameter`` px; measure what is found."""
    zoom = diam_mean / diameter
    _, height, width = image.shape
    side = max(1, int(side / zoom))  # rounded down: the network sees at most ``side`` px
    if height * width <= whole_below * side * side:
        crop_h, crop_w = height, width
    else:
        crop_h, crop_w = min(side, height), min(side, width)
    whole = (crop_h, crop_w) == (height, width)
    y, x = busiest_window(image, crop_h, crop_w)
    crop = image[None, :, y : y + crop_h, x : x + crop_w]
    size = (max(int(round(crop_h * zoom)), 16), max(int(round(crop_w * zoom)), 16))
    crop = F.interpolate(crop.float(), size=size, mode="bilinear", align_corners=False)
    output = run_network(crop)[0].float()
    labels = masks(output.cpu().numpy())
    measured, cells = _median_diameter_and_count(labels)
    cell_pixels = (output[2] > cell_threshold).cpu().numpy()
    coverage = float((labels[cell_pixels] > 0).mean()) if cell_pixels.any() else 1.0
    # measured at network scale; back to image pixels (the crop was resized by zoom on both axes)
    scale = math.sqrt((crop_h / size[0]) * (crop_w / size[1]))
    return Candidate(float(diameter), measured * scale, cells, coverage, output if whole else None)


__all__ = ["Candidate", "DiameterSearch", "SizeEstimate", "busiest_window", "estimate_diameter", "search_diameter"]
