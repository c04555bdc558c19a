"""Flows -> masks in TorchScript-compatible torch code: the one implementation the library and the export share.

Everything here imports torch and nothing else, and every function compiles with ``torch.jit.script``, so
the exported pipeline (:mod:`mmcs_monai.pipeline`, ``mmcs export --format pipeline``) runs *this* code
outside Python, and :func:`mmcs_monai.flows.flows_to_masks` (every library path: ``mmcs infer``, the
bundle, the apps) runs it inside. It runs on the device of its inputs, with no transfer to the host
(hole filling included), so a GPU segmenter keeps the flows on the GPU until the masks are made.

Conventions as :mod:`mmcs_monai.flows`: flows [2, H, W] (dY, dX) on the network's scale (5x unit vectors),
cell probability logits [H, W], labels [H, W] integers (0 = background).

The flow QC needs the flows of the predicted masks (Cellpose's heat diffusion): the library computes them with
:func:`mmcs_monai.flows.labels_to_flows`, the pipeline with :func:`label_flows`, the same packed-canvas
algorithm written for TorchScript. They add the same numbers in the same order and agree bit for bit, except
where float32 underflows (cells hundreds of pixels long and a few wide), which the library recomputes in
float64 and the pipeline does not.
"""

import torch
import torch.nn.functional as F

# Cellpose's network predicts flows scaled by this factor; integration and QC divide it out.
FLOW_SCALE = 5.0
# Histogram padding used by Cellpose around the image when counting converged pixels.
HIST_PAD = 20


def max_filter(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Max over a (2r+1)x(2r+1) window of the last two dims of ``x`` [..., H, W] (edges: window
    cut at the border).  Shifted ``torch.maximum`` calls: ~30x faster than CPU ``max_pool2d``."""
    out = x.clone()
    for d in range(1, radius + 1):  # along W
        torch.maximum(out[..., d:], x[..., :-d], out=out[..., d:])
        torch.maximum(out[..., :-d], x[..., d:], out=out[..., :-d])
    rows = out.clone()
    for d in range(1, radius + 1):  # along H
        torch.maximum(out[..., d:, :], rows[..., :-d, :], out=out[..., d:, :])
        torch.maximum(out[..., :-d, :], rows[..., d:, :], out=out[..., :-d, :])
    return out


def relabel_sequential(labels: torch.Tensor) -> torch.Tensor:
    """Map the ids of ``labels`` [H, W] (non-negative ints) to 1..n in increasing order, 0 stays 0.

    Returns int32 labels of the same shape on the same device.
    """
    flat = labels.reshape(-1).long()
    if flat.numel() == 0:
        return labels.to(torch.int32)
    max_id = int(flat.max())
    if max_id > 4 * flat.numel() + 4096:  # sparse huge ids: sort instead of a lookup table
        ids, inv = torch.unique(flat, sorted=True, return_inverse=True)
        inv = inv if int(ids[0]) == 0 else inv + 1
        return inv.to(torch.int32).view(labels.shape)
    present = torch.zeros(max_id + 1, dtype=torch.int32, device=labels.device)
    present[flat] = 1
    present[0] = 0
    lut = torch.cumsum(present, 0, dtype=torch.int32) * present
    return lut[flat].view(labels.shape)


def follow_flows(flows: torch.Tensor, inds: tuple[torch.Tensor, torch.Tensor], niter: int = 200) -> torch.Tensor:
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
    H, W = flows.shape[-2], flows.shape[-1]
    y, x = inds
    # grid_sample works in [-1, 1] coordinates (align_corners=True: -1/+1 = first/last pixel
    # centre); keeping positions and steps in those units saves two ops per step.
    sy = 2.0 / (H - 1) if H > 1 else 0.0
    sx = 2.0 / (W - 1) if W > 1 else 0.0
    field = torch.stack((flows[1] * sx, flows[0] * sy)).to(torch.float32)[None]  # [1, 2, H, W] (x, y)
    # positions stored planar [2, N] (x, y) so the update is a contiguous add; grid_sample reads
    # the transposed view [1, 1, N, 2] without a copy
    p = torch.stack((x * sx - 1.0, y * sy - 1.0)).to(torch.float32)
    grid = p.t().view(1, 1, -1, 2)
    for _ in range(int(niter)):
        # positions stay inside [-1, 1], where zero padding (faster) equals Cellpose's edge clamp:
        # an out-of-range corner only occurs at the last pixel, with weight 0
        step = F.grid_sample(field, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        p.add_(step.view(2, -1))
        p.clamp_(-1.0, 1.0)
    py = (p[1] + 1.0) / sy if sy != 0.0 else torch.zeros_like(p[1])
    px = (p[0] + 1.0) / sx if sx != 0.0 else torch.zeros_like(p[0])
    # undo the normalisation; clamp away float round-off at the upper edge
    return torch.stack((py.clamp(0, H - 1), px.clamp(0, W - 1)))


def remove_big_masks(labels: torch.Tensor, max_size_fraction: float = 0.4) -> torch.Tensor:
    """Zero out masks of ``labels`` [H, W] with more pixels than ``max_size_fraction * H * W``."""
    counts = torch.bincount(labels.reshape(-1).long())
    big = counts > max_size_fraction * labels.numel()
    big[0] = False
    if bool(big.any()):
        labels = torch.where(big[labels.long()], torch.zeros_like(labels), labels)
    return labels


def get_masks(
    positions: torch.Tensor,
    inds: tuple[torch.Tensor, torch.Tensor],
    shape: tuple[int, int],
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
    pad = 20  # HIST_PAD (TorchScript reads no globals)
    Hh, Wh = H + 2 * pad, W + 2 * pad
    pt = positions.to(torch.int64) + pad  # truncation == floor for positions >= 0
    bins = pt[0].clamp(0, Hh - 1) * Wh + pt[1].clamp(0, Wh - 1)
    hist = torch.bincount(bins, minlength=Hh * Wh).view(Hh, Wh).to(torch.float32)

    hmax = max_filter(hist, 2)
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
    allowed = hist.view(-1)[win] > 2
    grow = torch.zeros(n, 11, 11, dtype=torch.bool, device=device)
    grow[:, 5, 5] = True
    for _ in range(5):
        grow = max_filter(grow, 1) & allowed
    where = torch.nonzero(grow)
    k, iy, ix = where[:, 0], where[:, 1], where[:, 2]
    seed_map = torch.zeros(Hh * Wh, dtype=torch.int64, device=device)
    seed_map.scatter_reduce_(0, win[k, iy, ix], k + 1, "amax")

    y, x = inds
    labels[y * W + x] = seed_map[bins].to(torch.int32)
    labels = remove_big_masks(labels.view(H, W), max_size_fraction)
    return relabel_sequential(labels)


def remove_small_masks(labels: torch.Tensor, min_size: int = 15) -> torch.Tensor:
    """Zero out masks of ``labels`` [H, W] (int64) with fewer than ``min_size`` pixels (``<= 0``: keep all)."""
    if min_size <= 0 or labels.numel() == 0:
        return labels
    counts = torch.bincount(labels.reshape(-1))
    small = counts < min_size
    small[0] = False
    return torch.where(small[labels], torch.zeros_like(labels), labels)


def _shift(x: torch.Tensor, dy: int, dx: int, fill: int) -> torch.Tensor:
    """``out[y, x] = x[y + dy, x + dx]`` for ``x`` [H, W] (``fill`` outside), dy, dx in {-1, 0, 1}."""
    H, W = x.shape[0], x.shape[1]
    out = torch.full((H + 2, W + 2), fill, dtype=x.dtype, device=x.device)
    out[1 : H + 1, 1 : W + 1] = x
    return out[1 + dy : 1 + dy + H, 1 + dx : 1 + dx + W]


def _first_nonzero_along(labels: torch.Tensor, dim: int, reverse: bool) -> torch.Tensor:
    """For every pixel of ``labels`` [H, W] (int64), the label of the nearest non-zero pixel at or before it
    along ``dim`` (after it when ``reverse``); 0 when the image edge comes first."""
    lab = labels.flip(dim) if reverse else labels
    n = lab.shape[dim]
    pos = torch.arange(1, n + 1, device=labels.device)
    pos = pos[:, None] if dim == 0 else pos[None, :]
    last = torch.cummax(torch.where(lab > 0, pos.expand_as(lab), torch.zeros_like(lab)), dim)[0]  # 1-based
    hit = torch.gather(lab, dim, (last - 1).clamp_min(0))
    hit = torch.where(last > 0, hit, torch.zeros_like(hit))
    return hit.flip(dim) if reverse else hit


def fill_holes(labels: torch.Tensor) -> torch.Tensor:
    """Fill background regions enclosed by a single mask of ``labels`` [H, W] (int64).

    A hole is a 4-connected background region that does not touch the image border and whose
    4-neighbours all belong to one mask (``fill_voids`` semantics per mask, as in Cellpose). Unlike
    Cellpose, a mask completely enclosed by another mask is not swallowed by it.

    Candidates first: a background pixel can only be in a hole of mask k if the first labelled pixel in
    each of the four directions is k (cumulative maxima along rows and columns). Background that is not a
    candidate floods the candidates it touches (they are open to the outside); what stays is the enclosed
    background, split into 4-connected regions, each filled when all its labelled neighbours are one mask.
    The floods only run over the (few, small) candidate regions.
    """
    H, W = labels.shape[0], labels.shape[1]
    if H < 3 or W < 3:
        return labels
    bg = labels == 0
    up = _first_nonzero_along(labels, 0, False)
    down = _first_nonzero_along(labels, 0, True)
    left = _first_nonzero_along(labels, 1, False)
    right = _first_nonzero_along(labels, 1, True)
    cand = bg & (up > 0) & (up == down) & (up == left) & (up == right)
    if not bool(cand.any()):
        return labels
    # open: background reachable from background that is no candidate
    open_ = bg & ~cand
    enclosed = cand
    while True:
        reach = _shift(open_, -1, 0, 0) | _shift(open_, 1, 0, 0) | _shift(open_, 0, -1, 0) | _shift(open_, 0, 1, 0)
        grown = enclosed & reach
        if not bool(grown.any()):
            break
        open_ = open_ | grown
        enclosed = enclosed & ~grown
    if not bool(enclosed.any()):
        return labels
    # 4-connected regions of the enclosed background: smallest flat index of each region
    big = H * W
    idx = torch.arange(big, device=labels.device).view(H, W)
    region = torch.where(enclosed, idx, torch.full_like(idx, big))
    while True:
        m = torch.minimum(
            torch.minimum(_shift(region, -1, 0, big), _shift(region, 1, 0, big)),
            torch.minimum(_shift(region, 0, -1, big), _shift(region, 0, 1, big)),
        )
        new = torch.where(enclosed, torch.minimum(region, m), region)
        if bool(torch.equal(new, region)):
            break
        region = new
    # each region's labelled neighbours: fill when they are all one mask
    r = region[enclosed]
    lo = torch.full((big,), 2**62, dtype=torch.int64, device=labels.device)
    hi = torch.zeros(big, dtype=torch.int64, device=labels.device)
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        nb = _shift(labels, dy, dx, 0)[enclosed]
        keep = nb > 0
        lo.scatter_reduce_(0, r[keep], nb[keep], "amin")
        hi.scatter_reduce_(0, r[keep], nb[keep], "amax")
    fill = torch.where(lo == hi, hi, torch.zeros_like(hi))
    out = labels.clone()
    out[enclosed] = fill[r]
    return out


def fill_holes_and_remove_small(labels: torch.Tensor, min_size: int = 15) -> torch.Tensor:
    """Drop masks smaller than ``min_size`` pixels, fill holes (:func:`fill_holes`), relabel 1..n: int32 [H, W].

    Small masks go first (as in Cellpose), so a small mask cannot grow past ``min_size`` by filling.
    """
    labels = labels.long()
    if labels.numel() == 0 or int(labels.max()) == 0:
        return torch.zeros_like(labels, dtype=torch.int32)
    return relabel_sequential(fill_holes(remove_small_masks(labels, min_size)))


def label_flows(labels: torch.Tensor) -> torch.Tensor:
    """Cellpose 3 heat-diffusion flows of ``labels`` [H, W] (int64): unit (dY, dX) [2, H, W] float32, 0 outside cells.

    As :func:`mmcs_monai.flows.labels_to_flows`: per cell, heat enters at the in-cell pixel nearest the
    cell's mean position (ties: first in raster order) and spreads ``2 * (h + 2 + w + 2)`` steps
    ((h, w): the bounding box), each pixel taking the mean of its 3x3 neighbourhood where pixels outside the
    cell count as 0; the flow is the normalised central difference of the final heat.

    The same packed canvas as the library (cells in their bounding boxes, framed by zero rings, shelf-packed
    in decreasing order of their step counts, only the shelves still diffusing updated), written for
    TorchScript: each cell is frozen after its own number of steps instead of being read out then. Same sums
    in the same order, so the same numbers bit for bit, unless float32 underflows (the library then
    recomputes in float64; this does not).
    """
    H, W = labels.shape[0], labels.shape[1]
    device = labels.device
    out = torch.zeros(2, H * W, dtype=torch.float32, device=device)
    if H * W == 0 or not bool((labels > 0).any()):
        return out.view(2, H, W)
    flat = labels.reshape(-1)
    pix = torch.nonzero(flat).reshape(-1)  # raster order
    ids = flat[pix]
    present = torch.zeros(int(ids.max()) + 1, dtype=torch.int64, device=device)
    present[ids] = 1
    cell = (torch.cumsum(present, 0) - 1)[ids]  # 0..n-1 in increasing id order
    n = int(cell.max()) + 1
    y, x = pix // W, pix % W
    ymin = torch.full((n,), H, dtype=torch.int64, device=device).scatter_reduce(0, cell, y, "amin")
    ymax = torch.full((n,), -1, dtype=torch.int64, device=device).scatter_reduce(0, cell, y, "amax")
    xmin = torch.full((n,), W, dtype=torch.int64, device=device).scatter_reduce(0, cell, x, "amin")
    xmax = torch.full((n,), -1, dtype=torch.int64, device=device).scatter_reduce(0, cell, x, "amax")
    h, w = ymax - ymin + 1, xmax - xmin + 1
    # source: the pixel nearest the mean position, in float64 and Cellpose's frame (box coordinates + 1)
    yl = (y - ymin[cell] + 1).double()
    xl = (x - xmin[cell] + 1).double()
    count = torch.bincount(cell, minlength=n).double()
    ym = torch.zeros(n, dtype=torch.float64, device=device).index_add(0, cell, yl) / count
    xm = torch.zeros(n, dtype=torch.float64, device=device).index_add(0, cell, xl) / count
    d2 = (xl - xm[cell]) ** 2 + (yl - ym[cell]) ** 2
    dmin = torch.full((n,), float("inf"), dtype=torch.float64, device=device).scatter_reduce(0, cell, d2, "amin")
    order_pix = torch.arange(pix.numel(), device=device)
    first = torch.where(d2 == dmin[cell], order_pix, torch.full_like(order_pix, pix.numel()))
    centre = torch.full((n,), pix.numel(), dtype=torch.int64, device=device).scatter_reduce(0, cell, first, "amin")
    n_it = 2 * (h + 2 + w + 2)

    # shelf packing in decreasing step count (stable), each box + one ring row/column (the other is the neighbour's)
    order = torch.sort(n_it, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(n, device=device)
    hc, wc = h[order] + 1, w[order] + 1
    width = max(int(wc.max()), int(0.75 * float((hc * wc).sum()) ** 0.5))
    start = torch.cumsum(wc, 0) - wc
    shelf = torch.div(start, width, rounding_mode="floor")
    first_box = torch.searchsorted(shelf, shelf)
    ox = start - start[first_box]
    n_shelf = int(shelf[-1]) + 1
    shelf_h = torch.zeros(n_shelf, dtype=torch.int64, device=device).scatter_reduce(0, shelf, hc, "amax")
    shelf_top = torch.cumsum(shelf_h, 0) - shelf_h
    oy = shelf_top[shelf]
    Hc, Wc = int(shelf_h.sum()) + 1, int((ox + wc).max()) + 1  # + the closing ring row / column
    r = rank[cell]
    q = (y - ymin[cell] + 1 + oy[r]) * Wc + (x - xmin[cell] + 1 + ox[r])

    m9 = torch.zeros(Hc * Wc, dtype=torch.float32, device=device)
    m9[q] = 1.0 / 9.0
    m9 = m9.view(Hc, Wc)
    e = torch.zeros(Hc * Wc, dtype=torch.float32, device=device)
    e[q[centre]] = 1.0
    src = torch.zeros(Hc, Wc, dtype=torch.float32, device=device)
    src[1:-1, 1:-1] = _box3(e.view(Hc, Wc)) * m9[1:-1, 1:-1]
    steps = torch.zeros(Hc * Wc, dtype=torch.int64, device=device)
    steps[q] = n_it[cell]
    steps = steps.view(Hc, Wc)

    # rows still diffusing at each step: shelves 0..k while step <= the largest count of shelf k
    shelf_niter: list[int] = torch.zeros(n_shelf, dtype=torch.int64, device=device).scatter_reduce(0, shelf, n_it[order], "amax").tolist()
    shelf_end: list[int] = (shelf_top + shelf_h).tolist()  # row of each shelf's closing ring
    heat = torch.zeros(Hc, Wc, dtype=torch.float32, device=device)
    t = 1
    for k in range(n_shelf - 1, -1, -1):
        m = shelf_end[k] - 1  # interior rows 1..m
        while t <= shelf_niter[k]:
            new = torch.addcmul(src[1 : m + 1, 1:-1], _box3(heat[: m + 2]), m9[1 : m + 1, 1:-1])
            if t % 8 == 0:  # the library's flush of heat below 1e-30 (denormals are slow on some CPUs)
                new = F.threshold(new, 1e-30, 0.0)
            old = heat[1 : m + 1, 1:-1]
            heat[1 : m + 1, 1:-1] = torch.where(steps[1 : m + 1, 1:-1] >= t, new, old)
            t += 1
    hv = heat.view(-1)
    grads = torch.stack((hv[q + Wc] - hv[q - Wc], hv[q + 1] - hv[q - 1])).double()
    norm = torch.sqrt(grads[0] ** 2 + grads[1] ** 2)
    unit = torch.where(norm > 0, grads / norm.clamp_min(1e-300), torch.zeros_like(grads))
    out[:, pix] = unit.to(torch.float32)
    return out.view(2, H, W)


def _box3(x: torch.Tensor) -> torch.Tensor:
    """3x3 box sum of the interior of ``x`` [H, W] -> [H-2, W-2], in :func:`mmcs_monai.flows._box3`'s order."""
    r = (x[:-2] + x[2:]) + x[1:-1]
    return (r[:, :-2] + r[:, 2:]) + r[:, 1:-1]


def remove_bad_flow_masks(
    labels: torch.Tensor, flows: torch.Tensor, threshold: float, mask_flows: torch.Tensor | None = None
) -> torch.Tensor:
    """Zero out masks of ``labels`` [H, W] whose mean squared error between their own flows (``mask_flows``,
    unit [2, H, W]; default :func:`label_flows`) and the network's ``flows`` / 5 exceeds ``threshold``."""
    if labels.numel() == 0 or int(labels.max()) == 0:
        return labels
    lab = labels.long()
    mflows = label_flows(lab) if mask_flows is None else mask_flows
    n = int(lab.max()) + 1
    idx = lab.reshape(-1)
    diff2 = ((mflows - flows.to(torch.float32) / 5.0) ** 2).reshape(2, -1).sum(0)  # 5: FLOW_SCALE
    sums = torch.bincount(idx, weights=diff2.double(), minlength=n)
    counts = torch.bincount(idx, minlength=n).double()
    err = (sums / counts)[1:].to(torch.float32)  # 0/0 -> NaN for absent ids (never bad)
    bad = torch.cat((torch.zeros(1, dtype=torch.bool, device=err.device), err > threshold))
    return torch.where(bad[lab], torch.zeros_like(labels), labels)


def flows_to_masks(
    flows: torch.Tensor,
    cellprob: torch.Tensor,
    niter: int = 200,
    cellprob_threshold: float = 0.0,
    flow_threshold: float = 0.4,
    min_size: int = 15,
    max_size_fraction: float = 0.4,
) -> torch.Tensor:
    """Instance masks int32 [H, W] from network flows [2, H, W] and cell probability logits [H, W], on their
    device: follow the flows (:func:`follow_flows`), masks from the convergence (:func:`get_masks`), flow QC
    with :func:`label_flows` (``flow_threshold <= 0``: none), small masks out, holes filled, ids 1..n.

    The exported pipeline's mask step; :func:`mmcs_monai.flows.flows_to_masks` runs the same steps with the
    library's packed diffusion for the QC.
    """
    labels = masks_before_qc(flows, cellprob, niter, cellprob_threshold, max_size_fraction)
    if flow_threshold > 0 and int(labels.max()) > 0:
        labels = remove_bad_flow_masks(labels, flows, flow_threshold)
    return fill_holes_and_remove_small(labels.long(), min_size)


def masks_before_qc(
    flows: torch.Tensor, cellprob: torch.Tensor, niter: int, cellprob_threshold: float, max_size_fraction: float
) -> torch.Tensor:
    """Steps 1-2 of flows -> masks: int32 [H, W] masks from following ``flows`` from the pixels whose
    ``cellprob`` exceeds ``cellprob_threshold``."""
    H, W = cellprob.shape[0], cellprob.shape[1]
    flows = flows.to(torch.float32)
    inside = cellprob > cellprob_threshold
    where = torch.nonzero(inside)
    if where.shape[0] == 0:
        return torch.zeros(H, W, dtype=torch.int32, device=flows.device)
    y, x = where[:, 0], where[:, 1]
    pos = follow_flows(flows * inside / 5.0, (y, x), niter=niter)  # 5: FLOW_SCALE
    return get_masks(pos, (y, x), (H, W), max_size_fraction=max_size_fraction)
