"""Cellpose flows: instance labels -> flow fields, and flow fields -> instance labels.

This module is the single home of flows in ``mmcs_monai``; everything else imports from here.

Conventions (all 2D):

- ``labels``: [H, W] integer instance ids, 0 = background; ids need not be consecutive.
- ``flows``: [2, H, W] float32, channel 0 = dY (rows), channel 1 = dX (columns).
  :func:`labels_to_flows` returns *unit* vectors inside cells and 0 outside.  Cellpose's network is
  trained on ``5 *`` those flows, so :func:`flows_to_masks`, :func:`flow_error` and
  :func:`remove_bad_flow_masks` take flows on that *network scale* and divide by 5 internally,
  exactly like ``cellpose.dynamics.compute_masks`` / ``cellpose.metrics.flow_error``.
  A ground-truth round trip is therefore ``flows_to_masks(5 * labels_to_flows(gt), cellprob)``.
- ``cellprob``: [H, W] cell-probability logits.

Both directions accept numpy arrays or torch tensors and return the same kind (torch results on the
input's device).  The heavy work is vectorised torch code that runs on the input's device (or
``device``), hole filling included (:mod:`mmcs_monai.masks`, shared with the exported pipeline).

The algorithms follow Cellpose 3 (``cellpose.dynamics``, v3.1): heat diffusion from each cell's
centre for ``labels_to_flows``, and Euler integration + convergence histogram for
``flows_to_masks``.  They are re-implemented here to avoid per-cell Python loops:

- diffusion runs for all cells at once on a *packed canvas*: each cell's bounding box (plus a zero
  ring) is cut out and the boxes are shelf-packed, sorted by their iteration count, so each step is
  a handful of dense tensor ops over the cells that are still iterating;
- seeds of the convergence histogram are grown in a batch of 11x11 windows.

Both use torch's current thread setting: they never change the process-wide thread count (doing so
inside CacheDataset's caching threads left whole training runs single-threaded).  Measured on the
68 dev-val label images (2-core CPU, ``python -m benchmarks.flows``): labels -> flows 0.06 s/MP vs
0.40 for Cellpose 3.1.1.3 (mean cosine 0.99999), flows -> masks 0.21 s/MP vs 0.72 (F1 of the
ground-truth round trip 0.9996 for both).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F

from mmcs_monai.masks import (
    fill_holes_and_remove_small,
    follow_flows,
    get_masks,
    masks_before_qc,
    relabel_sequential,
    remove_big_masks,
)
from mmcs_monai.masks import (
    remove_bad_flow_masks as _remove_bad_flow_masks_with,
)

__all__ = [
    "labels_to_flows",
    "flows_to_masks",
    "MaskSettings",
    "follow_flows",
    "get_masks",
    "flow_error",
    "remove_bad_flow_masks",
    "remove_big_masks",
    "fill_holes_and_remove_small_masks",
    "relabel_sequential",
]

ArrayLike = Union[np.ndarray, torch.Tensor]  # noqa: UP007 (a runtime alias, kept as typing.Union)

# Cellpose's network predicts flows scaled by this factor; integration and QC divide it out.
FLOW_SCALE = 5.0


# ----------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------


def _to_tensor(x: ArrayLike, device: str | torch.device | None = None) -> torch.Tensor:
    """numpy array or tensor -> tensor on ``device`` (default: the tensor's device, CPU for numpy)."""
    if isinstance(x, torch.Tensor):
        return x if device is None else x.to(device)
    x = np.asarray(x)
    if x.dtype == np.uint16 or x.dtype == np.uint32:  # torch lacks arithmetic for these
        x = x.astype(np.int64)
    t = torch.from_numpy(np.ascontiguousarray(x))
    return t if device is None else t.to(device)


def _like_input(t: torch.Tensor, ref: ArrayLike) -> ArrayLike:
    """Return ``t`` as the kind of ``ref``: numpy for numpy input, else a tensor on ref's device."""
    if isinstance(ref, torch.Tensor):
        return t.to(ref.device)
    return t.cpu().numpy()


# ----------------------------------------------------------------------------------------------
# labels -> flows
# ----------------------------------------------------------------------------------------------


def _cell_geometry(labels: torch.Tensor) -> dict:
    """Pixels, bounding boxes and diffusion sources of every cell of ``labels`` [H, W].

    Returns a dict of tensors on the labels' device:
    ``pix`` [P] int64 flat indices of the cell pixels in raster order, ``cell`` [P] int64 cell
    index (0..n-1, in increasing id order) of each pixel, ``y``/``x`` [P] int64 pixel coordinates,
    ``ymin``/``xmin``/``h``/``w`` [n] int64 bounding boxes (h, w in pixels), ``center`` [n] int64
    index into ``pix`` of each cell's diffusion source.
    """
    H, W = labels.shape
    flat = labels.reshape(-1)
    pix = torch.nonzero(flat, as_tuple=False).squeeze(1)  # raster order
    ids = flat[pix].long()
    max_id = int(ids.max())
    if 0 < ids.min() and max_id <= 4 * pix.numel() + 4096:
        # dense id range: a lookup table is much cheaper than unique() (a sort)
        present = torch.zeros(max_id + 1, dtype=torch.int64, device=labels.device)
        present[ids] = 1
        cell = (torch.cumsum(present, 0) - 1)[ids]
    else:
        cell = torch.unique(ids, return_inverse=True)[1]
    n = int(cell.max()) + 1
    y, x = pix // W, pix % W

    def reduce(v, how, init):
        return torch.full((n,), init, dtype=v.dtype, device=v.device).scatter_reduce_(0, cell, v, how)

    ymin, ymax = reduce(y, "amin", H), reduce(y, "amax", -1)
    xmin, xmax = reduce(x, "amin", W), reduce(x, "amax", -1)

    # Source = in-cell pixel closest to the mean pixel position.  Done in float64 in Cellpose's own
    # frame (bounding-box coordinates + 1) so that exact distance ties (common for symmetric
    # shapes) resolve identically: to the first such pixel in raster order.
    yl = (y - ymin[cell] + 1).double()
    xl = (x - xmin[cell] + 1).double()
    count = torch.bincount(cell, minlength=n).double()
    ym = torch.zeros(n, dtype=torch.float64, device=labels.device).index_add_(0, cell, yl) / count
    xm = torch.zeros(n, dtype=torch.float64, device=labels.device).index_add_(0, cell, xl) / count
    d2 = (xl - xm[cell]) ** 2 + (yl - ym[cell]) ** 2
    dmin = reduce(d2, "amin", float("inf"))
    order = torch.arange(pix.numel(), device=labels.device)
    candidates = torch.where(d2 == dmin[cell], order, pix.numel())
    center = reduce(candidates, "amin", pix.numel())
    return dict(pix=pix, cell=cell, y=y, x=x, ymin=ymin, xmin=xmin, h=ymax - ymin + 1, w=xmax - xmin + 1, center=center)


def _shelf_pack(hc: torch.Tensor, wc: torch.Tensor, width: int):
    """Place boxes [n] (heights ``hc``, widths ``wc``, already in packing order) on shelves.

    Boxes are laid left to right; a box starts a new shelf when its left edge would be at or past
    ``width`` (so a shelf may overhang by less than one box; ``width >= max(wc)`` keeps shelf ids
    dense).  Fully vectorised.

    Returns (oy [n], ox [n] box corners, shelf [n] shelf of each box, shelf_top [S],
    shelf_h [S], canvas_h, canvas_w).
    """
    start = torch.cumsum(wc, 0) - wc
    shelf = start // width
    first = torch.searchsorted(shelf, shelf)  # first box of each box's shelf (shelf is sorted)
    ox = start - start[first]
    n_shelf = int(shelf[-1]) + 1
    shelf_h = torch.zeros(n_shelf, dtype=torch.int64, device=hc.device).scatter_reduce_(0, shelf, hc, "amax")
    shelf_top = torch.cumsum(shelf_h, 0) - shelf_h
    return shelf_top[shelf], ox, shelf, shelf_top, shelf_h, int(shelf_h.sum()), int((ox + wc).max())


# Flush period and level keeping the heat out of the denormal range, whose arithmetic is many
# times slower on some x86 CPUs (no measurable effect on the AMD EPYC this was tuned on; the flush
# costs ~2%).  One step divides the smallest non-zero value by at most 9, and
# 1e-30 / 9**8 > 1.2e-38 (smallest normal float32).  Heat this small does not matter: images whose
# final heat gets near it are recomputed in float64 (see _underflow).
_FLUSH_EVERY = 8
_FLUSH_BELOW = {torch.float32: 1e-30, torch.float64: 1e-290}


def _diffuse_packed(geo: dict, niter: int | None, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Cellpose heat diffusion for all cells at once.

    Per cell, as ``cellpose.dynamics.masks_to_flows_cpu``: ``niter_c`` times (default
    ``2 * (h + 2 + w + 2)`` with (h, w) the bounding box), add 1 at the source, then replace every
    in-cell value by the mean of its 3x3 neighbourhood, where out-of-cell pixels count as 0.

    The update is linear, so with M the cell mask and e the source,
    ``T <- M * box(T + e) / 9 = (M / 9) * box(T) + S`` with ``S = (M / 9) * box(e)`` precomputed.
    Cells live on a shelf-packed canvas, each in its bounding box framed by a zero ring (shared
    with its neighbours), sorted by decreasing ``niter_c``: at step t only the leading shelves with
    cells still iterating are updated (5 dense ops), and a cell's heat is read out right after its
    last step.

    Returns:
        (grads [2, P] (dY, dX) central differences of the final heat, heat [5, P] final heat at the
        pixel and its up, down, left and right neighbours), in raster pixel order, ``dtype``.
    """
    device = geo["pix"].device
    h, w, cell = geo["h"], geo["w"], geo["cell"]
    n = h.numel()
    n_it = 2 * (h + 2 + w + 2) if niter is None else torch.full_like(h, int(niter))

    # packing order: decreasing iteration count (stable, for determinism)
    order = torch.sort(n_it, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(n, device=device)
    hc, wc = h[order] + 1, w[order] + 1  # box + one ring row/column (the other is the neighbour's)
    # near-square canvas, at least as wide as the widest box
    width = max(int(wc.max()), int(0.75 * float((hc * wc).sum()) ** 0.5))
    oy, ox, shelf, shelf_top, shelf_h, Hc, Wc = _shelf_pack(hc, wc, width)
    Hc, Wc = Hc + 1, Wc + 1  # closing ring row / column

    # pixels grouped by packing rank: cells with equal iteration counts become contiguous ranges
    r = rank[cell]
    perm = torch.sort(r, stable=True).indices
    rp, cp = r[perm], cell[perm]
    q = (geo["y"][perm] - geo["ymin"][cp] + 1 + oy[rp]) * Wc + (geo["x"][perm] - geo["xmin"][cp] + 1 + ox[rp])
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.numel(), device=device)

    m9 = torch.zeros(Hc * Wc, dtype=dtype, device=device)
    m9[q] = 1.0 / 9.0
    m9 = m9.view(Hc, Wc)
    e = torch.zeros(Hc * Wc, dtype=dtype, device=device)
    e[q[inv_perm[geo["center"]]]] = 1.0
    S = torch.zeros_like(m9)
    S[1:-1, 1:-1] = _box3(e.view(Hc, Wc)) * m9[1:-1, 1:-1]
    del e

    # host-side schedule: active shelves per step, and when each group of cells is final
    n_it_sorted = n_it[order]
    shelf_niter = torch.zeros(int(shelf[-1]) + 1, dtype=torch.int64, device=device)
    shelf_niter = shelf_niter.scatter_reduce_(0, shelf, n_it_sorted, "amax").tolist()
    shelf_end = (shelf_top + shelf_h).tolist()  # row of each shelf's closing ring
    pix_end = torch.cumsum(torch.bincount(r, minlength=n), 0).tolist()
    events = {}  # n_it -> [first, last) pixel (in rank order) of the cells that stop there
    for k, nk in enumerate(n_it_sorted.tolist()):
        events.setdefault(nk, [pix_end[k - 1] if k else 0, 0])[1] = pix_end[k]
    # neighbourhood of every pixel: centre, up, down, left, right
    nbr = torch.stack((q, q - Wc, q + Wc, q - 1, q + 1))

    # Double-buffered canvas: step t reads bufs[(t - 1) % 2] and writes bufs[t % 2].
    bufs = (torch.zeros(Hc, Wc, dtype=dtype, device=device), torch.zeros(Hc, Wc, dtype=dtype, device=device))
    rows = torch.empty(Hc - 2, Wc, dtype=dtype, device=device)
    box = torch.empty(Hc - 2, Wc - 2, dtype=dtype, device=device)

    def step_views(m, src, dst):
        # slicing costs as much as the arithmetic on small canvases: build the views once per
        # active prefix (interior rows 1..m) and buffer parity
        rv, bv = rows[:m], box[:m]
        return (
            src[:m],
            src[1 : m + 1],
            src[2 : m + 2],
            rv,
            rv[:, :-2],
            rv[:, 1:-1],
            rv[:, 2:],
            bv,
            S[1 : m + 1, 1:-1],
            m9[1 : m + 1, 1:-1],
            dst[1 : m + 1, 1:-1],
        )

    # segments of steps with the same active shelves
    t_last = max(events)
    segments, t0 = [], 1
    for k in range(len(shelf_end) - 1, -1, -1):
        t1 = min(shelf_niter[k], t_last)  # shelves 0..k are active up to step shelf_niter[k]
        if t1 >= t0:
            segments.append((t0, t1, shelf_end[k] - 1))
            t0 = t1 + 1
    flush = _FLUSH_BELOW[dtype]
    samples = []  # (first, last, [5, k] heat around the pixels)
    if 0 in events:  # niter=0: no diffusion, zero heat
        samples.append((*events[0], bufs[0].view(-1)[nbr[:, slice(*events[0])]]))
    add, addcmul = torch.add, torch.addcmul
    for t0, t1, m in segments:
        views = (step_views(m, bufs[1], bufs[0]), step_views(m, bufs[0], bufs[1]))  # by parity of t
        for t in range(t0, t1 + 1):
            a0, a1, a2, rv, r0, r1, r2, bv, s, mm, out = views[t & 1]
            # (up + down) + centre: mirror-symmetric rounding, so a cell symmetric about its
            # source gets exactly zero flow there, as in float64
            add(a0, a2, out=rv)
            rv.add_(a1)
            add(r0, r2, out=bv)
            bv.add_(r1)
            addcmul(s, bv, mm, out=out)
            if t % _FLUSH_EVERY == 0:
                F.threshold(out, flush, 0.0, inplace=True)
            if t in events:
                lo, hi = events[t]
                samples.append((lo, hi, bufs[t & 1].view(-1)[nbr[:, lo:hi]]))
    heat5 = torch.empty(5, q.numel(), dtype=dtype, device=device)
    for lo, hi, s5 in samples:
        heat5[:, lo:hi] = s5
    heat5 = heat5[:, inv_perm]  # back to raster pixel order
    return torch.stack((heat5[2] - heat5[1], heat5[4] - heat5[3])), heat5


def _box3(x: torch.Tensor) -> torch.Tensor:
    """3x3 box sum of the interior of ``x`` [H, W] -> [H-2, W-2]."""
    r = (x[:-2] + x[2:]) + x[1:-1]
    return (r[:, :-2] + r[:, 2:]) + r[:, 1:-1]


def labels_to_flows(labels: ArrayLike, niter: int | None = None, device: str | torch.device | None = None) -> ArrayLike:
    """Cellpose heat-diffusion flows of instance labels.

    Equivalent to ``cellpose.dynamics.masks_to_flows(labels, device=cpu)`` (Cellpose 3): for each
    cell, heat is injected at the in-cell pixel closest to the cell's mean position and diffused
    inside the cell (absorbing boundary) for ``2 * (h + w + 4)`` steps, (h, w) = bounding box; the
    flow is the normalised central-difference gradient of the heat.  All cells are computed at
    once on a packed canvas (see :func:`_diffuse_packed`), in float32 (float64 where float32
    would underflow).

    Args:
        labels: [H, W] integer instance ids (numpy array or torch tensor), 0 = background.
            Ids may be non-consecutive.
        niter: number of diffusion steps for every cell; ``None`` = per-cell default as above.
        device: where to compute (default: the tensor's device; CPU for numpy input).

    Returns:
        flows [2, H, W] float32 (dY, dX): unit vectors inside cells (0 where the gradient vanishes:
        single-pixel cells, the source of a mirror-symmetric cell, pieces of a cell not connected
        to its source), 0 outside.  numpy for numpy input, else a tensor on the input's device.

    Note:
        Cellpose normalises with ``v / (1e-60 + |v|)``, which shrinks its flows towards 0 where the
        heat is below ~1e-60 (far ends of cells hundreds of pixels long and a few wide); here they
        stay unit vectors.  Otherwise the two agree to a mean cosine of 0.99999 on the dev labels.
    """
    lab = _to_tensor(labels, device)
    if lab.ndim != 2:
        raise ValueError(f"labels must be [H, W], got shape {tuple(lab.shape)}")
    out = _labels_to_flows(lab, niter)
    return _like_input(out, labels)


def _labels_to_flows(labels: torch.Tensor, niter: int | None = None) -> torch.Tensor:
    """Tensor version of :func:`labels_to_flows`: [H, W] ints -> [2, H, W] float32, same device."""
    if labels.is_floating_point():
        labels = labels.long()
    H, W = labels.shape
    out = torch.zeros(2, H * W, dtype=torch.float32, device=labels.device)
    if H * W == 0 or not bool(labels.any()):
        return out.view(2, H, W)
    geo = _cell_geometry(labels)
    grads, heat = _diffuse_packed(geo, niter, torch.float32)
    if _underflow(heat):
        grads, _ = _diffuse_packed(geo, niter, torch.float64)
    # in float64: the squares of tiny gradients would underflow float32
    norm = torch.sqrt(grads[0].double() ** 2 + grads[1].double() ** 2)
    unit = torch.where(norm > 0, grads / norm.clamp_min(1e-300), 0.0)
    out[:, geo["pix"]] = unit.float()
    return out.view(2, H, W)


# Smallest heat trusted in float32: far above the flush level and float32's normal range, so that
# central differences keep ~all their bits.
_MIN_FLOAT32_HEAT = 1e-20


def _underflow(heat: torch.Tensor) -> bool:
    """Whether float32 heat [5, P] (pixel, up, down, left, right) may have underflowed.

    Far from the source of a long, thin cell the heat can fall below what float32 holds (Cellpose
    works in float64); there the heat is tiny, or flushed to 0 next to a pixel that still has some.
    Pixels with no heat in their whole 4-neighbourhood are fine: they are not connected to the
    source (cells made of several pieces), and Cellpose gives them no flow either.
    """
    if heat.dtype == torch.float64:
        return False
    centre = heat[0]
    tiny = (centre > 0) & (centre < _MIN_FLOAT32_HEAT)
    cut_off = (centre == 0) & (heat[1:].amax(0) > 0)
    return bool((tiny | cut_off).any())


# ----------------------------------------------------------------------------------------------
# flows -> masks
# ----------------------------------------------------------------------------------------------


def flow_error(labels: ArrayLike, flows: ArrayLike) -> tuple[ArrayLike, ArrayLike]:
    """Per-mask mean squared error between the flows of ``labels`` and given network flows.

    As ``cellpose.metrics.flow_error``: ``sum_c mean_{pixels of mask}((F_c(labels) - flows_c / 5)^2)``
    with ``F = labels_to_flows``.

    Args:
        labels: [H, W] integer masks (0 = background).
        flows: [2, H, W] float network-scale flows (dY, dX), i.e. 5x unit vectors.

    Returns:
        (errors [max_id] float32 (entry i-1 is mask i; NaN for absent ids),
        mask_flows [2, H, W] float32 unit flows of ``labels``), as numpy or tensors like ``labels``.
    """
    lab = _to_tensor(labels)
    fl = _to_tensor(flows, lab.device)
    err, mflows = _flow_error(lab.long(), fl)
    return _like_input(err, labels), _like_input(mflows, labels)


def _flow_error(labels: torch.Tensor, flows: torch.Tensor):
    mflows = _labels_to_flows(labels)
    n = int(labels.max()) + 1 if labels.numel() else 1
    idx = labels.reshape(-1)
    diff2 = ((mflows - flows.to(torch.float32) / FLOW_SCALE) ** 2).reshape(2, -1).sum(0)
    sums = torch.bincount(idx, weights=diff2.double(), minlength=n)
    counts = torch.bincount(idx, minlength=n).double()
    err = (sums / counts)[1:].to(torch.float32)  # 0/0 -> NaN for absent ids
    return err, mflows


def remove_bad_flow_masks(labels: ArrayLike, flows: ArrayLike, threshold: float = 0.4) -> ArrayLike:
    """Zero out masks whose :func:`flow_error` exceeds ``threshold`` (ids are kept, not renumbered).

    Args:
        labels: [H, W] integer masks.
        flows: [2, H, W] network-scale flows (5x unit vectors).
        threshold: maximum allowed mean squared flow error.

    Returns:
        labels [H, W] with the same dtype/kind as the input.
    """
    lab = _to_tensor(labels)
    out = _remove_bad_flow_masks(lab, _to_tensor(flows, lab.device), threshold)
    return _like_input(out, labels)


def _remove_bad_flow_masks(labels: torch.Tensor, flows: torch.Tensor, threshold: float) -> torch.Tensor:
    if labels.numel() == 0 or int(labels.max()) == 0:
        return labels
    return _remove_bad_flow_masks_with(labels, flows, float(threshold), _labels_to_flows(labels.long()))


def fill_holes_and_remove_small_masks(labels: ArrayLike, min_size: int = 15) -> ArrayLike:
    """Drop masks smaller than ``min_size`` pixels, fill holes, relabel 1..n.

    A hole is a 4-connected background region that does not touch the image border and whose
    4-neighbours all belong to one mask (``fill_voids`` semantics per mask, as in Cellpose).  Unlike
    Cellpose, a mask completely enclosed by another mask is not swallowed by it.

    Args:
        labels: [H, W] integer masks (0 = background).
        min_size: minimum mask size in pixels; ``<= 0`` keeps all.

    Returns:
        [H, W] int32 labels, consecutive from 1, numpy or tensor like the input.
    """
    lab = _to_tensor(labels)
    return _like_input(fill_holes_and_remove_small(lab.long(), min_size), labels)


@dataclass(frozen=True)
class MaskSettings:
    """The settings of flows -> masks, with Cellpose 3's defaults: the one place they are written.

    Every path from an image to masks (``CellSegmenter``, the bundle's ``FlowsToMasksd``, the label and
    Deploy apps, the command line) takes its thresholds from here; a config or a request overrides them.

    Attributes:
        flow_threshold: maximum mean squared flow error per mask (None or <= 0: no flow QC).
        cellprob_threshold: pixels with a cell-probability logit above it are in cells.
        min_size: minimum mask size in pixels (<= 0: keep all).
        niter: Euler steps of flow following.
        max_size_fraction: masks covering more than this fraction of the image are dropped.
    """

    flow_threshold: float | None = 0.4
    cellprob_threshold: float = 0.0
    min_size: int = 15
    niter: int = 200
    max_size_fraction: float = 0.4

    @classmethod
    def from_options(cls, **options) -> MaskSettings:
        """Settings from keyword options, where None means "the default" (command-line and request values).

        Raises:
            ValueError: an unknown option, or a value that is not a number.
        """
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"unknown mask setting(s) {unknown}; known: {sorted(known)}")
        values = {}
        for name, value in options.items():
            if value is None:
                continue
            try:
                values[name] = int(value) if name in ("min_size", "niter") else float(value)
            except (TypeError, ValueError):
                raise ValueError(f"{name} must be a number, got {value!r}") from None
        return cls(**values)

    def masks(self, output: ArrayLike) -> ArrayLike:
        """Instance masks int32 [H, W] from a network output [3, H, W] (dY, dX, cell probability logit)."""
        return flows_to_masks(output[:2], output[2], **asdict(self))


def flows_to_masks(
    flows: ArrayLike,
    cellprob: ArrayLike,
    niter: int = MaskSettings.niter,
    cellprob_threshold: float = MaskSettings.cellprob_threshold,
    flow_threshold: float | None = MaskSettings.flow_threshold,
    min_size: int = MaskSettings.min_size,
    max_size_fraction: float = MaskSettings.max_size_fraction,
) -> ArrayLike:
    """Instance masks from Cellpose network outputs (Cellpose 3 ``compute_masks`` + hole filling).

    1. pixels with ``cellprob > cellprob_threshold`` follow ``flows * (cellprob > th) / 5`` for
       ``niter`` Euler steps (:func:`follow_flows`);
    2. masks from the convergence histogram (:func:`get_masks`), dropping masks larger than
       ``max_size_fraction`` of the image;
    3. flow QC: masks whose :func:`flow_error` against ``flows`` exceeds ``flow_threshold`` are
       dropped (``flow_threshold`` None or <= 0 disables);
    4. masks smaller than ``min_size`` are dropped, holes filled, ids made consecutive.

    Args:
        flows: [2, H, W] float (dY, dX) on the network's scale, i.e. 5x unit vectors; divided by 5
            here (``flows_to_masks(5 * labels_to_flows(gt), ...)`` reproduces ``gt``).
        cellprob: [H, W] float cell-probability logits.
        niter: Euler steps.
        cellprob_threshold: pixels with ``cellprob`` above it are in cells.
        flow_threshold: maximum mean squared flow error per mask.
        min_size: minimum mask size in pixels (``<= 0``: keep all).
        max_size_fraction: masks covering more than this fraction of the image are dropped.

    Returns:
        labels [H, W] int32, consecutive from 1; numpy for numpy input, else a tensor on the
        input's device.
    """
    fl = _to_tensor(flows)
    if fl.ndim != 3 or fl.shape[0] != 2:
        raise ValueError(f"flows must be [2, H, W], got shape {tuple(fl.shape)}")
    prob = _to_tensor(cellprob, fl.device)
    if tuple(prob.shape) != tuple(fl.shape[1:]):
        raise ValueError(f"cellprob {tuple(prob.shape)} does not match flows {tuple(fl.shape)}")
    labels = _flows_to_masks(fl.to(torch.float32), prob, niter, cellprob_threshold, flow_threshold, min_size, max_size_fraction)
    return _like_input(labels, flows)


def _flows_to_masks(flows, cellprob, niter, cellprob_threshold, flow_threshold, min_size, max_size_fraction):
    """The steps of :func:`mmcs_monai.masks.flows_to_masks` (the exported pipeline's), with the flow QC's reference
    flows from the packed diffusion (:func:`labels_to_flows`: faster, float64 where float32 underflows)."""
    labels = masks_before_qc(flows, cellprob, int(niter), float(cellprob_threshold), float(max_size_fraction))
    if flow_threshold is not None and flow_threshold > 0:
        labels = _remove_bad_flow_masks(labels, flows, flow_threshold)
    return fill_holes_and_remove_small(labels.long(), min_size)
