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
``device``); only hole filling uses ``scipy.ndimage.label`` on the CPU.

The algorithms follow Cellpose 3 (``cellpose.dynamics``, v3.1): heat diffusion from each cell's
centre for ``labels_to_flows``, and Euler integration + convergence histogram for
``flows_to_masks``.  They are re-implemented here to avoid per-cell Python loops:

- diffusion runs for all cells at once on a *packed canvas*: each cell's bounding box (plus a zero
  ring) is cut out and the boxes are shelf-packed, sorted by their iteration count, so each step is
  a handful of dense tensor ops over the cells that are still iterating;
- seeds of the convergence histogram are grown in a batch of 11x11 windows.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

__all__ = [
    "labels_to_flows",
    "flows_to_masks",
    "follow_flows",
    "get_masks",
    "flow_error",
    "remove_bad_flow_masks",
    "remove_big_masks",
    "fill_holes_and_remove_small_masks",
    "relabel_sequential",
]

ArrayLike = Union[np.ndarray, torch.Tensor]

# Cellpose's network predicts flows scaled by this factor; integration and QC divide it out.
FLOW_SCALE = 5.0
# Histogram padding used by Cellpose around the image when counting converged pixels.
_HIST_PAD = 20


# ----------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------


def _to_tensor(x: ArrayLike, device: Optional[Union[str, torch.device]] = None) -> torch.Tensor:
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


def relabel_sequential(labels: torch.Tensor) -> torch.Tensor:
    """Map the ids of ``labels`` [H, W] (any int dtype) to 1..n in increasing order, 0 stays 0.

    Returns int32 labels of the same shape on the same device.
    """
    ids, inv = torch.unique(labels, return_inverse=True)
    # unique() sorts, so background (0) is ids[0] when present and keeps index 0
    if ids.numel() and ids[0] != 0:
        inv = inv + 1
    return inv.to(torch.int32).reshape(labels.shape)


# ----------------------------------------------------------------------------------------------
# labels -> flows
# ----------------------------------------------------------------------------------------------


def _cell_geometry(labels: torch.Tensor):
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
    _, cell = torch.unique(flat[pix], return_inverse=True)
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
    return dict(pix=pix, cell=cell, y=y, x=x, ymin=ymin, xmin=xmin,
                h=ymax - ymin + 1, w=xmax - xmin + 1, center=center)


def _shelf_pack(hc: torch.Tensor, wc: torch.Tensor, width: int):
    """Place boxes [n] (heights ``hc``, widths ``wc``, already in packing order) on shelves.

    Boxes are laid left to right; a box starts a new shelf when its left edge would be at or past
    ``width`` (so a shelf may overhang by less than one box).  Fully vectorised.

    Returns (oy [n], ox [n], shelf [n], shelf_top [S], shelf_height [S], canvas_h, canvas_w).
    """
    start = torch.cumsum(wc, 0) - wc
    shelf = start // width
    # renumber shelves densely (an extra-wide box can skip shelf ids)
    _, shelf = torch.unique_consecutive(shelf, return_inverse=True)
    n_shelf = int(shelf[-1]) + 1
    first = torch.full((n_shelf,), start.numel(), dtype=torch.int64, device=hc.device)
    first.scatter_reduce_(0, shelf, torch.arange(start.numel(), device=hc.device), "amin")
    ox = start - start[first][shelf]
    shelf_h = torch.zeros(n_shelf, dtype=torch.int64, device=hc.device).scatter_reduce_(0, shelf, hc, "amax")
    shelf_top = torch.cumsum(shelf_h, 0) - shelf_h
    oy = shelf_top[shelf]
    return oy, ox, shelf, shelf_top, shelf_h, int(shelf_h.sum()), int((ox + wc).max())


def _diffuse_packed(geo: dict, niter: Optional[int], dtype: torch.dtype) -> torch.Tensor:
    """Cellpose heat diffusion for all cells at once; returns the raw gradients [2, P] (dY, dX).

    Per cell, as ``cellpose.dynamics.masks_to_flows_cpu``: ``niter_c`` times (default
    ``2 * (h + 2 + w + 2)`` with (h, w) the bounding box), add 1 at the source, then replace every
    in-cell value by the mean of its 3x3 neighbourhood, where out-of-cell pixels count as 0.
    The gradient is the central difference of the final heat (0 outside the cell).

    The update is linear, so with M the cell mask and e the source,
    ``T <- M * box(T + e) / 9 = (M / 9) * box(T) + S`` with ``S = (M / 9) * box(e)`` precomputed.
    Cells live on a shelf-packed canvas, each in its bounding box plus a zero ring, sorted by
    decreasing ``niter_c``: at step t only the leading shelves with cells still iterating are
    updated, and a cell's gradient is read out right after its last step.
    """
    device = geo["pix"].device
    h, w, cell = geo["h"], geo["w"], geo["cell"]
    n = h.numel()
    n_it = 2 * (h + 2 + w + 2) if niter is None else torch.full_like(h, int(niter))

    # packing order: decreasing iteration count (stable, for determinism)
    order = torch.sort(n_it, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(n, device=device)
    hc, wc = h[order] + 2, w[order] + 2  # + zero ring (the "outside" of the cell)
    total = int((hc * wc).sum())
    # near-square canvas; wide enough for the widest box
    width = max(int(wc.max()), int(np.sqrt(total)))
    oy, ox, shelf, shelf_top, shelf_h, Hc, Wc = _shelf_pack(hc, wc, width)
    Hc += 2  # one spare zero row above/below so every shelf can be updated with plain slicing
    oy = oy + 1
    shelf_top = shelf_top + 1

    # canvas coordinates of the pixels, grouped by packing rank (cells with the same number of
    # iterations become contiguous ranges)
    r = rank[cell]
    perm = torch.sort(r, stable=True).indices
    cy = geo["y"][perm] - geo["ymin"][cell[perm]] + 1 + oy[r[perm]]
    cx = geo["x"][perm] - geo["xmin"][cell[perm]] + 1 + ox[r[perm]]
    q = cy * Wc + cx  # [P] flat canvas index, in rank order

    m9 = torch.zeros(Hc * Wc, dtype=dtype, device=device)
    m9[q] = 1.0 / 9.0
    m9 = m9.view(Hc, Wc)
    e = torch.zeros(Hc * Wc, dtype=dtype, device=device)
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.numel(), device=device)
    e[q[inv_perm[geo["center"]]]] = 1.0
    S = torch.zeros_like(m9)
    S[1:-1, 1:-1] = _box3(e.view(Hc, Wc)) * m9[1:-1, 1:-1]

    # schedule (host side): cells sorted by decreasing niter -> end of the active shelf rows
    n_it_sorted = n_it[order]
    shelf_niter = torch.zeros(int(shelf.max()) + 1, dtype=torch.int64, device=device)
    shelf_niter.scatter_reduce_(0, shelf, n_it_sorted, "amax")
    shelf_end = (shelf_top + shelf_h).tolist()
    shelf_niter = shelf_niter.tolist()
    cells_per_rank = torch.bincount(r, minlength=n)
    pix_end = torch.cumsum(cells_per_rank, 0).tolist()  # pixel range end of each rank
    n_it_sorted = n_it_sorted.tolist()

    # readout events: after step t, the cells with n_it == t are final
    events = {}
    for k, nk in enumerate(n_it_sorted):
        lo = pix_end[k - 1] if k else 0
        ev = events.setdefault(nk, [lo, lo])
        ev[1] = pix_end[k]
    grads = torch.zeros(2, q.numel(), dtype=dtype, device=device)

    def read_out(lo, hi, T):
        qq = q[lo:hi]
        Tf = T.view(-1)
        grads[0, lo:hi] = Tf[qq + Wc] - Tf[qq - Wc]
        grads[1, lo:hi] = Tf[qq + 1] - Tf[qq - 1]

    A = torch.zeros(Hc, Wc, dtype=dtype, device=device)
    B = torch.zeros_like(A)
    rows = torch.empty(Hc - 2, Wc, dtype=dtype, device=device)
    box = torch.empty(Hc - 2, Wc - 2, dtype=dtype, device=device)
    if 0 in events:  # niter=0: no diffusion, zero heat
        read_out(*events[0], A)
    n_active_shelves = len(shelf_end)
    for t in range(1, max(n_it_sorted) + 1):
        while shelf_niter[n_active_shelves - 1] < t:
            n_active_shelves -= 1
        end = shelf_end[n_active_shelves - 1] + 1  # rows [0, end) hold every active shelf
        m = end - 2  # interior rows updated this step
        rv = rows[:m]
        torch.add(A[:m], A[1 : m + 1], out=rv)
        rv.add_(A[2 : m + 2])
        bv = box[:m]
        torch.add(rv[:, :-2], rv[:, 1:-1], out=bv)
        bv.add_(rv[:, 2:])
        torch.addcmul(S[1 : m + 1, 1:-1], bv, m9[1 : m + 1, 1:-1], out=B[1 : m + 1, 1:-1])
        A, B = B, A
        if t in events:
            read_out(*events[t], A)
    # back to raster pixel order
    return grads[:, inv_perm]


def _box3(x: torch.Tensor) -> torch.Tensor:
    """3x3 box sum of the interior of ``x`` [H, W] -> [H-2, W-2]."""
    r = x[:-2] + x[1:-1] + x[2:]
    return r[:, :-2] + r[:, 1:-1] + r[:, 2:]


def labels_to_flows(
    labels: ArrayLike, niter: Optional[int] = None, device: Optional[Union[str, torch.device]] = None
) -> ArrayLike:
    """Cellpose heat-diffusion flows of instance labels.

    Equivalent to ``cellpose.dynamics.masks_to_flows(labels, device=cpu)`` (Cellpose 3): for each
    cell, heat is injected at the in-cell pixel closest to the cell's mean position and diffused
    inside the cell (absorbing boundary) for ``2 * (h + w + 4)`` steps, (h, w) = bounding box; the
    flow is the normalised central-difference gradient of the heat.  All cells are computed at
    once on a packed canvas (see :func:`_diffuse_packed`).

    Args:
        labels: [H, W] integer instance ids (numpy array or torch tensor), 0 = background.
            Ids may be non-consecutive.
        niter: number of diffusion steps for every cell; ``None`` = per-cell default as above.
        device: where to compute (default: the tensor's device; CPU for numpy input).

    Returns:
        flows [2, H, W] float32 (dY, dX): unit vectors inside cells (0 where the gradient vanishes,
        e.g. single-pixel cells), 0 outside.  numpy for numpy input, else a tensor on the input's
        device.
    """
    lab = _to_tensor(labels, device)
    if lab.ndim != 2:
        raise ValueError(f"labels must be [H, W], got shape {tuple(lab.shape)}")
    if lab.is_floating_point():
        lab = lab.long()
    H, W = lab.shape
    out = torch.zeros(2, H * W, dtype=torch.float32, device=lab.device)
    if H * W and bool((lab != 0).any()):
        geo = _cell_geometry(lab)
        grads = _diffuse_packed(geo, niter, torch.float32)
        # float32 heat can underflow far from the source in very long/thin cells (Cellpose uses
        # float64); redo in float64 when any reachable pixel got (nearly) no heat.
        if _needs_float64(grads):
            grads = _diffuse_packed(geo, niter, torch.float64)
        norm = torch.sqrt((grads.double() ** 2).sum(0)) if grads.dtype == torch.float64 else grads.norm(dim=0)
        unit = torch.where(norm > 0, grads / norm.clamp_min(torch.finfo(grads.dtype).tiny), 0.0)
        out[:, geo["pix"]] = unit.float()
    return _like_input(out.view(2, H, W), labels)


def _needs_float64(grads: torch.Tensor) -> bool:
    """True when float32 gradients are so small that they may have lost precision (underflow)."""
    if grads.dtype == torch.float64:
        return False
    mag = grads.abs().amax(0)
    # exact zeros are legitimate (symmetric points, single pixels); tiny non-zeros are not trustworthy
    return bool(((mag > 0) & (mag < 1e-30)).any())


# ----------------------------------------------------------------------------------------------
# flows -> masks
# ----------------------------------------------------------------------------------------------


def follow_flows(flows: torch.Tensor, inds: Tuple[torch.Tensor, torch.Tensor], niter: int = 200) -> torch.Tensor:
    """Euler integration of pixels along a flow field, with bilinear interpolation.

    As Cellpose 3's CPU path (``steps_interp``): ``p <- clip(p + bilinear(flows, p), 0, L - 1)``
    per axis, ``niter`` times.

    Args:
        flows: [2, H, W] float step field (dY, dX) in pixels per step, i.e. already divided by 5 and
            zeroed outside the cell pixels.
        inds: (y, x) int64 tensors [N]: start pixels.
        niter: number of Euler steps.

    Returns:
        [2, N] float32 final (y, x) positions in pixel units, in [0, H-1] x [0, W-1].
    """
    H, W = flows.shape[-2:]
    y, x = inds
    # grid_sample works in [-1, 1] coordinates (align_corners=True: -1/+1 = first/last pixel
    # centre); keeping positions and steps in those units saves two ops per step.
    sy = 2.0 / (H - 1) if H > 1 else 0.0
    sx = 2.0 / (W - 1) if W > 1 else 0.0
    field = torch.stack((flows[1] * sx, flows[0] * sy)).to(torch.float32)[None]  # [1, 2, H, W] (x, y)
    grid = torch.stack((x * sx - 1.0, y * sy - 1.0), -1).to(torch.float32).view(1, 1, -1, 2)
    g = grid.view(-1, 2)
    for _ in range(int(niter)):
        step = F.grid_sample(field, grid, mode="bilinear", padding_mode="border", align_corners=True)
        g.add_(step.view(2, -1).t())
        g.clamp_(-1.0, 1.0)
    pos = torch.stack(((g[:, 1] + 1.0) / sy if sy else torch.zeros_like(g[:, 1]),
                       (g[:, 0] + 1.0) / sx if sx else torch.zeros_like(g[:, 0])))
    # undo the normalisation; clamp away float round-off at the upper edge
    pos[0].clamp_(0, H - 1)
    pos[1].clamp_(0, W - 1)
    return pos


def get_masks(
    positions: torch.Tensor,
    inds: Tuple[torch.Tensor, torch.Tensor],
    shape: Tuple[int, int],
    max_size_fraction: float = 0.4,
) -> torch.Tensor:
    """Masks from the convergence of pixels (Cellpose 3 ``get_masks_torch``).

    The final positions are counted in a histogram padded by 20 pixels; seeds are the local maxima
    (5x5) with more than 10 pixels; each seed grows for 5 steps (3x3 dilation) inside its 11x11
    window over histogram bins with more than 2 pixels (where windows overlap, the seed with more
    pixels wins); every pixel takes the label of the bin it converged to.  Masks larger than
    ``max_size_fraction`` of the image are removed.

    Args:
        positions: [2, N] float final (y, x) positions (from :func:`follow_flows`).
        inds: (y, x) int64 tensors [N]: the start pixel of each position.
        shape: (H, W) of the image.
        max_size_fraction: masks with more pixels than this fraction of H * W are dropped.

    Returns:
        [H, W] int32 labels, consecutive from 1 (0 = background).
    """
    H, W = shape
    device = positions.device
    labels = torch.zeros(H * W, dtype=torch.int32, device=device)
    if positions.shape[1] == 0:
        return labels.view(H, W)
    Hh, Wh = H + 2 * _HIST_PAD, W + 2 * _HIST_PAD
    pt = positions.to(torch.int64) + _HIST_PAD  # truncation == floor for positions >= 0
    pt[0].clamp_(0, Hh - 1)
    pt[1].clamp_(0, Wh - 1)
    bins = pt[0] * Wh + pt[1]
    hist = torch.bincount(bins, minlength=Hh * Wh).view(Hh, Wh).to(torch.float32)

    hmax = F.max_pool2d(hist[None, None], 5, stride=1, padding=2)[0, 0]
    seeds = torch.nonzero((hist >= hmax) & (hist > 10))  # [n, 2] raster order
    if seeds.shape[0] == 0:
        return labels.view(H, W)
    # fewest pixels first, so that "larger label wins" below == "larger seed wins" (Cellpose
    # paints seeds in this order, later ones overwriting earlier ones)
    seeds = seeds[torch.sort(hist[seeds[:, 0], seeds[:, 1]], stable=True).indices]
    n = seeds.shape[0]

    off = torch.arange(-5, 6, device=device)
    wy = (seeds[:, 0, None] + off)[:, :, None].expand(n, 11, 11)  # seeds are >= 20 px from the edge
    wx = (seeds[:, 1, None] + off)[:, None, :].expand(n, 11, 11)
    win = wy * Wh + wx  # [n, 11, 11] flat histogram index
    allowed = (hist.view(-1)[win] > 2).to(torch.float32)
    grow = torch.zeros(n, 1, 11, 11, device=device)
    grow[:, 0, 5, 5] = 1.0
    for _ in range(5):
        grow = F.max_pool2d(grow, 3, stride=1, padding=1) * allowed[:, None]
    k, iy, ix = torch.nonzero(grow[:, 0] > 0, as_tuple=True)
    seed_map = torch.zeros(Hh * Wh, dtype=torch.int64, device=device)
    seed_map.scatter_reduce_(0, win[k, iy, ix], k + 1, "amax")

    y, x = inds
    labels[y * W + x] = seed_map[bins].to(torch.int32)
    labels = remove_big_masks(labels.view(H, W), max_size_fraction)
    return relabel_sequential(labels)


def remove_big_masks(labels: torch.Tensor, max_size_fraction: float = 0.4) -> torch.Tensor:
    """Zero out masks of ``labels`` [H, W] with more pixels than ``max_size_fraction * H * W``."""
    counts = torch.bincount(labels.reshape(-1).long())
    big = counts > max_size_fraction * labels.numel()
    big[0] = False
    if bool(big.any()):
        labels = torch.where(big[labels.long()], 0, labels)
    return labels


def flow_error(labels: ArrayLike, flows: ArrayLike) -> Tuple[ArrayLike, ArrayLike]:
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
    mflows = labels_to_flows(labels)
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
    err, _ = _flow_error(labels.long(), flows)
    bad = torch.cat((torch.zeros(1, dtype=torch.bool, device=err.device), err > threshold))
    return torch.where(bad[labels.long()], torch.zeros_like(labels), labels)


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
    return _like_input(_fill_holes_and_remove_small(lab.long(), min_size), labels)


def _fill_holes_and_remove_small(labels: torch.Tensor, min_size: int) -> torch.Tensor:
    if labels.numel() == 0 or int(labels.max()) == 0:
        return torch.zeros_like(labels, dtype=torch.int32)
    # small masks go first (Cellpose does the same, so a small mask cannot grow past min_size by
    # filling)
    if min_size > 0:
        counts = torch.bincount(labels.reshape(-1))
        small = counts < min_size
        small[0] = False
        labels = torch.where(small[labels], 0, labels)
    labels = _fill_holes(labels)
    return relabel_sequential(labels)


def _fill_holes(labels: torch.Tensor) -> torch.Tensor:
    """Fill background regions enclosed by a single mask (see fill_holes_and_remove_small_masks)."""
    H, W = labels.shape
    bg = (labels == 0).cpu().numpy()
    comp_np, n_comp = ndimage.label(bg)  # 4-connectivity, like fill_voids in 2D
    if n_comp == 0:
        return labels
    comp = torch.from_numpy(comp_np.astype(np.int64)).to(labels.device)
    # regions touching the image border are outside, never holes
    border = torch.cat((comp[0], comp[-1], comp[:, 0], comp[:, -1]))
    lo = torch.full((n_comp + 1,), torch.iinfo(torch.int64).max, dtype=torch.int64, device=labels.device)
    hi = torch.full((n_comp + 1,), -1, dtype=torch.int64, device=labels.device)
    # each background pixel looks at its 4 neighbours: which masks surround its region?
    for a, b in (((slice(1, None), slice(None)), (slice(None, -1), slice(None))),
                 ((slice(None, -1), slice(None)), (slice(1, None), slice(None))),
                 ((slice(None), slice(1, None)), (slice(None), slice(None, -1))),
                 ((slice(None), slice(None, -1)), (slice(None), slice(1, None)))):
        c, nb = comp[a].reshape(-1), labels[b].reshape(-1)
        keep = (c > 0) & (nb > 0)
        lo.scatter_reduce_(0, c[keep], nb[keep], "amin")
        hi.scatter_reduce_(0, c[keep], nb[keep], "amax")
    fill = torch.where((lo == hi) & (hi > 0), hi, 0)
    fill[border] = 0
    fill[0] = 0
    return torch.where(comp > 0, fill[comp], labels)


def flows_to_masks(
    flows: ArrayLike,
    cellprob: ArrayLike,
    niter: int = 200,
    cellprob_threshold: float = 0.0,
    flow_threshold: Optional[float] = 0.4,
    min_size: int = 15,
    max_size_fraction: float = 0.4,
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
    H, W = prob.shape
    fl = fl.to(torch.float32)
    inside = prob > cellprob_threshold
    y, x = torch.nonzero(inside, as_tuple=True)
    if y.numel() == 0:
        return _like_input(torch.zeros(H, W, dtype=torch.int32, device=fl.device), flows)
    step = fl * inside / FLOW_SCALE
    pos = follow_flows(step, (y, x), niter=niter)
    labels = get_masks(pos, (y, x), (H, W), max_size_fraction=max_size_fraction)
    if flow_threshold is not None and flow_threshold > 0:
        labels = _remove_bad_flow_masks(labels, fl, flow_threshold)
    labels = _fill_holes_and_remove_small(labels.long(), min_size)
    return _like_input(labels, flows)
