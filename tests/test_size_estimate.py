"""The multi-scale diameter search: finds the cell size from far off the stored one, on stand-ins and a trained model."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage.draw import disk
from skimage.measure import label, regionprops

from helpers import SAMPLE_IMAGES, disk_labels
from mmcs_monai.diameters import median_diameter
from mmcs_monai.flows import MaskSettings, labels_to_flows
from mmcs_monai.inference import CellInferer
from mmcs_monai.io import read_labels
from mmcs_monai.metrics import f1_score
from mmcs_monai.networks import load_model
from mmcs_monai.segmentation import CellSegmenter
from mmcs_monai.size_estimate import DiameterSearch, busiest_window, estimate_diameter, search_diameter
from mmcs_monai.transforms import inference_preprocessing


def _disc_grid(diameter: float, side: int) -> np.ndarray:
    """Labels [side, side] of discs of ``diameter`` px on a grid (1.6 diameters apart)."""
    step = int(diameter * 1.6)
    centers = [(y, x) for y in range(step // 2, side - step // 2, step) for x in range(step // 2, side - step // 2, step)]
    return disk_labels((side, side), centers, [diameter / 2] * len(centers))


class SizeLimitedNetwork:
    """A stand-in CPnet that, like a trained one, sees cells only near its training size.

    Discs of 15-60 network px are found exactly; larger ones come back cut into four quarters
    (fragments that measure about half their size); smaller ones are missed.
    """

    def __init__(self):
        self.calls = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(x.shape[-2:]))
        found = np.zeros(x.shape[-2:], np.int32)
        components = label(x[0, 0].numpy() > 0.5)
        for cell in range(1, components.max() + 1):
            mask = components == cell
            size = 2 * math.sqrt(mask.sum() / math.pi)
            if size < 15:
                continue
            if size <= 60:
                found[mask] = found.max() + 1
                continue
            ys, xs = np.nonzero(mask)
            cy, cx = ys.mean(), xs.mean()
            for qy in (ys < cy, ys >= cy):
                for qx in (xs < cx, xs >= cx):
                    part = qy & qx
                    found[ys[part], xs[part]] = found.max() + 1
        flows = torch.as_tensor(labels_to_flows(found)) * 5
        return torch.cat([flows, torch.where(torch.as_tensor(found > 0), 10.0, -10.0)[None]])[None]


def _masks(flows: np.ndarray) -> np.ndarray:
    return MaskSettings(min_size=0).masks(flows)


@pytest.mark.parametrize(("stored", "true"), [(20.0, 6.0), (20.0, 20.0), (20.0, 45.0), (20.0, 75.0), (40.0, 12.0), (40.0, 150.0)])
def test_search_finds_cells_far_from_the_stored_size(stored, true):
    """From 0.3x to 3.75x the stored size, the estimate lands within 10 % of the true diameter."""
    labels = _disc_grid(true, side=int(true * 10))
    image = torch.stack([torch.as_tensor(labels > 0, dtype=torch.float32), torch.zeros(labels.shape)])
    network = SizeLimitedNetwork()
    estimate, candidates = estimate_diameter(image, network, _masks, stored_diameter=stored, diam_mean=30.0)
    assert estimate == pytest.approx(median_diameter(labels), rel=0.1), candidates
    # largest first: the first candidate tried is 4x the stored diameter
    assert candidates[0].diameter == pytest.approx(4 * stored)


def test_fragments_at_a_fine_zoom_do_not_win():
    """Cells 100 px, stored 25: the 1x candidate sees 120 px discs and measures quarters of about half the size
    (agreeing better than nothing), but the 4x candidate, tried first, sees them whole and agrees."""
    labels = _disc_grid(100.0, side=800)
    image = torch.stack([torch.as_tensor(labels > 0, dtype=torch.float32), torch.zeros(labels.shape)])
    estimate, candidates = estimate_diameter(image, SizeLimitedNetwork(), _masks, 25.0, 30.0)
    assert estimate == pytest.approx(median_diameter(labels), rel=0.1)
    assert [c.diameter for c in candidates[:1]] == [100.0]


class CompressingNetwork:
    """A stand-in CPnet that sees every cell, but as if it were closer to its training size (30 network px):
    a cell of ``d`` network px comes back as a disc of ``30 * sqrt(d / 30)`` px, as a trained network
    measures cells it sees off size. Searching at candidate ``c`` for cells of true diameter ``D`` (image px)
    therefore measures ``sqrt(D * c)``: one step closer to ``D`` in log scale per refinement. Its output carries
    the cell ids themselves (no flows to follow: the search's logic is under test, not the mask step).
    ``keep`` (default 0.5) is the exponent: ``30 * (d / 30) ** keep``, so the measurement is ``D**keep * c**(1 - keep)``;
    a small ``keep`` is a network that pulls every size hard toward its training size (dense tissue)."""

    def __init__(self, keep: float = 0.5):
        self.keep = keep

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        found = np.zeros((height, width), np.int32)
        for cell, region in enumerate(regionprops(label(x[0, 0].numpy() > 0.5)), start=1):
            y0, x0, y1, x1 = region.bbox
            if y0 == 0 or x0 == 0 or y1 == height or x1 == width:
                continue  # cut by the crop: not measured anyway
            seen = 30 * (region.equivalent_diameter_area / 30) ** self.keep
            found[disk(region.centroid, seen / 2, shape=(height, width))] = cell
        return torch.as_tensor(found, dtype=torch.float32)[None, None].repeat(1, 3, 1, 1)  # ids for _ids_as_masks


def _ids_as_masks(output: np.ndarray) -> np.ndarray:
    return output[0].astype(np.int32)


def test_refinement_steps_toward_the_true_size():
    """Cells of 12 px, stored 30, a network that sees cells of D px at candidate c as sqrt(D * c). Without
    following (``follow_within`` 0): 4x and 2x disagree, the 1x candidate measures sqrt(12 * 30) = 18.97 px (agrees
    within the tolerance, 0.66 < 0.75); the first refinement measures sqrt(12 * 18.97) = 15.09 (still 0.33 off its
    candidate, above ``refine_above`` 0.25), the second sqrt(12 * 15.09) = 13.46."""
    true = 12.0
    labels = _disc_grid(true, side=512)
    image = torch.stack([torch.as_tensor(labels > 0, dtype=torch.float32), torch.zeros(labels.shape)])
    expected = {0: math.sqrt(true * 30.0)}
    for k in (1, 2, 3):
        expected[k] = math.sqrt(true * expected[k - 1])
    for refinements in (0, 1, 2):
        search = DiameterSearch(refinements=refinements, follow_within=0.0)
        estimate, candidates = estimate_diameter(image, CompressingNetwork(), _ids_as_masks, 30.0, 30.0, search)
        assert estimate == pytest.approx(expected[refinements], rel=0.04), (refinements, candidates)
    # refining twice, then stopping: the second refinement agreed within refine_above
    search = DiameterSearch(follow_within=0.0)
    estimate, candidates = estimate_diameter(image, CompressingNetwork(), _ids_as_masks, 30.0, 30.0, search)
    assert estimate == pytest.approx(expected[2], rel=0.04) and len(candidates) == 3 + 2, candidates
    # a search that may refine more stops by itself once the last step agreed within refine_above
    search = DiameterSearch(refinements=5, follow_within=0.0)
    estimate, candidates = estimate_diameter(image, CompressingNetwork(), _ids_as_masks, 30.0, 30.0, search)
    assert math.log2(expected[2] / expected[3]) < DiameterSearch().refine_above and len(candidates) == 3 + 2


def test_refinement_goes_on_until_the_measurement_agrees():
    """Dense tissue: a network that measures cells of D px at candidate c as ``D**0.3 * c**0.7`` (each step 30 %
    of the way in log scale; a candidate disagrees by ``0.3 * |log2(D / c)|``). Cells of 12 px, stored 48: 4x and
    2x disagree (1.2, 0.9 > 0.75), the 1x candidate agrees (0.6) although it is 4x the true size, and each
    refinement disagrees by 0.42, 0.29, then 0.20 (below ``refine_above`` 0.25). Stopping after two refinements
    (the old default) measured 19.3 px; the default goes on to the third and measures 16.7 px."""
    true, keep, stored = 12.0, 0.3, 48.0
    chain = [stored]  # the chosen candidate, then each refinement's candidate: the previous one's measurement
    for _ in range(4):
        chain.append(true**keep * chain[-1] ** (1 - keep))
    step = int(true * 3)  # sparse enough that the discs the network paints larger do not overlap
    centers = [(y, x) for y in range(step // 2, 512 - step // 2, step) for x in range(step // 2, 512 - step // 2, step)]
    labels = disk_labels((512, 512), centers, [true / 2] * len(centers))
    image = torch.stack([torch.as_tensor(labels > 0, dtype=torch.float32), torch.zeros(labels.shape)])
    network = CompressingNetwork(keep)
    two, _ = estimate_diameter(image, network, _ids_as_masks, stored, 30.0, DiameterSearch(refinements=2, follow_within=0.0))
    estimate, candidates = estimate_diameter(image, network, _ids_as_masks, stored, 30.0, DiameterSearch(follow_within=0.0))
    assert [c.diameter for c in candidates[:3]] == [192.0, 96.0, 48.0], candidates
    assert two == pytest.approx(chain[3], rel=0.03), two
    assert estimate == pytest.approx(chain[4], rel=0.03) and len(candidates) == 3 + 3, candidates
    assert abs(math.log2(estimate / true)) < abs(math.log2(two / true))


def test_a_candidate_with_many_cells_off_its_size_is_followed_to_their_size():
    """Cells of 12 px, stored 30. The 2x candidate (60 px) finds many cells measured at about 21 px (merged
    discs at that zoom): 1.5 off, outside the tolerance 0.75 but within ``follow_within``, so the search follows
    it at once (segments the crop as 21 px cells) instead of going on to the 1x grid point; the follow-up agrees
    and is refined once: 4 network runs instead of the grid path's 5, both within 20 % of 12 px."""
    true = 12.0
    labels = _disc_grid(true, side=512)
    image = torch.stack([torch.as_tensor(labels > 0, dtype=torch.float32), torch.zeros(labels.shape)])
    estimate, candidates = estimate_diameter(image, CompressingNetwork(), _ids_as_masks, 30.0, 30.0)
    grid, followed = candidates[1], candidates[2]
    assert grid.diameter == 60.0 and DiameterSearch().tolerance < grid.disagreement <= DiameterSearch().follow_within
    assert followed.diameter == grid.measured and followed.disagreement <= DiameterSearch().tolerance, candidates
    no_follow, grid_path = estimate_diameter(image, CompressingNetwork(), _ids_as_masks, 30.0, 30.0, DiameterSearch(follow_within=0))
    assert len(candidates) == 4 < len(grid_path) == 5  # 120, 60, followed at 21.4, one refinement
    assert estimate == pytest.approx(true, rel=0.2) and no_follow == pytest.approx(true, rel=0.2), candidates


class MergingNetwork:
    """A stand-in CPnet whose masks, at a zoom too coarse for the cells, are a few merged objects near its training
    size, as a trained one gives on dense rods (E. coli at 2-4x their size): cells of at least 20 network px are
    found exactly; cells of 10-20 px are all called cell (probability channel) but only every tenth becomes a mask,
    a disc of 28 px (about the training size, so it agrees with the candidate), the rest failing the flow check;
    smaller cells are missed. Output ``[ids, ids, cell logit]`` for :func:`_ids_as_masks`."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        found = np.zeros((height, width), np.int32)
        cell = torch.full((height, width), -10.0)
        for n, region in enumerate(regionprops(label(x[0, 0].numpy() > 0.5)), start=1):
            size = region.equivalent_diameter_area
            if size >= 20:
                found[tuple(region.coords.T)] = n
            elif size >= 10:
                cell[tuple(torch.as_tensor(region.coords).T)] = 10.0
                if n % 10 == 0:
                    disc = disk(region.centroid, 14, shape=(height, width))
                    found[disc] = n
                    cell[disc] = 10.0
        if found.any():
            cell[torch.as_tensor(found > 0)] = 10.0
        ids = torch.as_tensor(found, dtype=torch.float32)
        return torch.stack([ids, ids, cell])[None]


def test_merged_objects_covering_few_cell_pixels_do_not_agree():
    """Cells of 12 px, stored 24. The 1x candidate (24 px) sees 15 px cells and returns merged 28 px objects that
    agree with it (22.4 image px) while covering about a quarter of the pixels the network called cell; without the
    coverage check the search stops there (0.9 log2 off). With it (the default) the candidate does not count and
    the 0.5x candidate (12 px) finds every cell."""
    true = 12.0
    labels = _disc_grid(true, side=480)
    image = torch.stack([torch.as_tensor(labels > 0, dtype=torch.float32), torch.zeros(labels.shape)])
    found = search_diameter(image, MergingNetwork(), _ids_as_masks, 24.0, 30.0)
    merged = next(c for c in found.candidates if c.diameter == 24.0)
    assert merged.cells >= DiameterSearch().min_cells and merged.disagreement <= DiameterSearch().tolerance, found.candidates
    assert merged.coverage < DiameterSearch().min_coverage and not merged.agrees(DiameterSearch()), merged
    assert found.diameter == pytest.approx(median_diameter(labels), rel=0.1), found.candidates
    unchecked = search_diameter(image, MergingNetwork(), _ids_as_masks, 24.0, 30.0, DiameterSearch(min_coverage=0))
    assert unchecked.diameter > 1.6 * true, unchecked.candidates


class HazyNetwork:
    """A stand-in CPnet that calls every pixel cell (a hazy background), so no candidate's masks cover half of the
    cell pixels: cells of at least 20 network px are found exactly; when it finds none it returns one 30 px
    object in the middle (a single blob that agrees with any candidate). Output as :class:`MergingNetwork`'s."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        found = np.zeros((height, width), np.int32)
        for n, region in enumerate(regionprops(label(x[0, 0].numpy() > 0.5)), start=1):
            if region.equivalent_diameter_area >= 20:
                found[tuple(region.coords.T)] = n
        if not found.any():
            found[disk((height / 2, width / 2), 15, shape=(height, width))] = 1
        ids = torch.as_tensor(found, dtype=torch.float32)
        return torch.stack([ids, ids, torch.full((height, width), 10.0)])[None]


def test_when_nothing_covers_enough_the_candidate_with_enough_cells_wins():
    """Cells of 12 px, stored 24, every candidate covering under half of the cell pixels: the 4x and 2x candidates
    find one agreeing blob each, the 0.5x one (12 px) finds every cell. Of the agreeing candidates the one with
    ``min_cells`` cells is kept, not the largest (which the fallback for sparse images would take)."""
    true = 12.0
    labels = _disc_grid(true, side=480)
    image = torch.stack([torch.as_tensor(labels > 0, dtype=torch.float32), torch.zeros(labels.shape)])
    found = search_diameter(image, HazyNetwork(), _ids_as_masks, 24.0, 30.0)
    assert not any(c.agrees(DiameterSearch()) for c in found.candidates), found.candidates
    assert found.candidates[0].cells == 1 and found.candidates[0].disagreement <= DiameterSearch().tolerance, found.candidates
    assert found.diameter == pytest.approx(median_diameter(labels), rel=0.1), found.candidates


def test_no_cells_anywhere_keeps_the_stored_diameter():
    image = torch.zeros(2, 200, 200)
    network = SizeLimitedNetwork()
    estimate, candidates = estimate_diameter(image, network, _masks, 20.0, 30.0)
    assert estimate == 20.0 and len(candidates) == len(DiameterSearch().factors)


class SpeckNetwork:
    """A stand-in that, at any zoom, finds two specks of 2 x 2 network px on a crop (and nothing else): what a network
    does on an image without cells of any size it knows. Each refinement then measures the specks smaller in image
    pixels (2.26 network px at an ever finer zoom)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        found = torch.zeros(x.shape[-2:])
        found[4:6, 4:6], found[10:12, 10:12] = 1, 2
        return found[None, None].repeat(1, 3, 1, 1)


def test_the_estimate_stays_within_the_searched_range():
    """Specks measured ever smaller must not become the estimate: 0.5-2 px made the image segmented at a zoom of 15-60
    (the permissive half-width network on a pool image took more than 24 GB). The estimate stays within the
    candidates' range widened by ``max_beyond`` on each side: 20 * 0.25 / 2 = 2.5 px here; with a narrower margin the
    bound moves with it; the default search refines at most six times, so without the bound it would end far below."""
    image = torch.rand(2, 300, 300)
    found = search_diameter(image, SpeckNetwork(), _ids_as_masks, 20.0, 30.0)
    assert min(c.measured for c in found.candidates) < 1.0, found.candidates  # what the search saw
    assert found.diameter == pytest.approx(2.5) and DiameterSearch().bounds(20.0) == (2.5, 160.0)
    assert search_diameter(image, SpeckNetwork(), _ids_as_masks, 20.0, 30.0, DiameterSearch(max_beyond=1.0)).diameter == 5.0
    with pytest.raises(ValueError, match="max_beyond"):
        DiameterSearch(max_beyond=0.5)


class HazeNetwork(SpeckNetwork):
    """The specks of :class:`SpeckNetwork` in a haze: the network calls every pixel cell, and the two specks are all
    its flows make of them (a modality it has no labels for)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = super().__call__(x)
        out[:, 2] = 10.0
        return out


def test_specks_that_explain_none_of_the_cell_pixels_keep_the_stored_diameter():
    """No candidate agrees, and the only ones with cells cover almost none of the pixels the network calls cell: the
    last resort (the candidate closest to agreeing) does not take them, and the estimate is the stored diameter. With
    the specks alone (the network calls only them cell) the same candidates are taken, down to the lower bound.
    Found on the DeepCell 3T3 val image with the permissive size network: 2.8 px measured in a haze, 3.3 px chosen
    (F1 0 and five minutes for the one image; the stored 26.5 px takes seconds, F1 0.05)."""
    image = torch.rand(2, 300, 300)
    found = search_diameter(image, HazeNetwork(), _ids_as_masks, 20.0, 30.0)
    assert all(c.cells == 2 and c.coverage < 0.01 for c in found.candidates), found.candidates
    assert found.diameter == 20.0
    assert search_diameter(image, SpeckNetwork(), _ids_as_masks, 20.0, 30.0).diameter == 2.5


def test_search_cost_is_bounded():
    """Each candidate's network input is at most crop x crop, and no larger than the whole image at its zoom."""
    labels = _disc_grid(10.0, side=400)
    image = torch.stack([torch.as_tensor(labels > 0, dtype=torch.float32), torch.zeros(labels.shape)])
    network = SizeLimitedNetwork()
    estimate_diameter(image, network, _masks, 10.0, 30.0, DiameterSearch(crop=128))
    assert network.calls and all(h <= 128 and w <= 128 for h, w in network.calls)
    network = SizeLimitedNetwork()
    _, candidates = estimate_diameter(torch.zeros(2, 40, 40), network, _masks, 30.0, 30.0)
    for (h, w), candidate in zip(network.calls, candidates):
        side = min(160, 40 * 30.0 / candidate.diameter)
        assert max(h, w) <= max(16, round(side)), (h, w, candidate)


def test_busiest_window_finds_the_cells():
    image = torch.zeros(2, 300, 400)
    image[0, 200:260, 300:380] = torch.rand(60, 80)
    y, x = busiest_window(image, 64, 64)
    assert 200 - 64 < y <= 260 and 300 - 64 < x <= 380
    assert busiest_window(image, 500, 500) == (0, 0)


def test_bad_settings():
    with pytest.raises(ValueError, match="positive"):
        DiameterSearch(factors=(1.0, 0.0))
    with pytest.raises(ValueError, match="crop"):
        DiameterSearch(crop=8)
    with pytest.raises(ValueError, match="unknown diameter estimate"):
        CellInferer().estimate_diameter(torch.zeros(2, 32, 32), load_model_or_skip(), method="guess")


def load_model_or_skip():
    from helpers import TINY_MODEL

    return load_model(TINY_MODEL)


def _sample(name_index: int = 3, side: int = 160):
    """A sample image [2, side, side] and its labels (the top-left corner: 160 px hold about 40 cells)."""
    path = sorted(SAMPLE_IMAGES.glob("*.tif"))[name_index]
    image = torch.as_tensor(np.asarray(inference_preprocessing("image")({"image": str(path)})["image"]))
    labels = read_labels(str(path).replace("/images/", "/labels/"))
    return image[:, :side, :side], labels[:side, :side]


def _resampled(image, labels, scale):
    size = tuple(int(round(s * scale)) for s in labels.shape)
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    labels = F.interpolate(torch.as_tensor(labels.astype(np.int64))[None, None].float(), size=size, mode="nearest")[0, 0]
    return image, labels.long().numpy()


@pytest.mark.parametrize("scale", [1 / 3, 3.0])
def test_trained_model_finds_cells_at_the_right_size(tiny_model, scale):
    """The small trained model on a sample image scaled 1/3x and 3x (cells 8 and 70 px, stored 19): ``auto``
    finds the size within 25 % and scores within 0.1 F1 of segmenting at the true diameter (F1 above 0.4 there)."""
    network = load_model(tiny_model).eval()
    image, labels = _resampled(*_sample(), scale)
    true = median_diameter(labels)
    segmenter = CellSegmenter(network, CellInferer(precision="fp32"))
    auto = segmenter(image, diameter="auto")
    assert abs(math.log2(auto.diameter / true)) < math.log2(1.25), (auto.diameter, true)
    at_true = f1_score(labels, segmenter(image, diameter=true).masks)["f1"]
    assert at_true > 0.4 and f1_score(labels, auto.masks)["f1"] > at_true - 0.1


def test_cellpose_file_without_extra_state_gets_an_estimate(tiny_model, tmp_path):
    """A Cellpose 3 checkpoint (only Cellpose's keys: no subset table) estimates the same way."""
    state = torch.load(tiny_model, map_location="cpu", weights_only=True)
    state = {k: v.float() for k, v in state.items() if k not in ("subset_diameters", "_extra_state")}
    path = tmp_path / "cellpose_style"
    torch.save(state, path)
    network = load_model(path).eval()
    image, labels = _resampled(*_sample(), 3.0)
    used = CellSegmenter(network, CellInferer(precision="fp32"))(image, diameter="auto").diameter
    assert abs(math.log2(used / median_diameter(labels))) < math.log2(1.25)


def test_a_whole_image_candidate_that_agrees_settles_the_search():
    """Cells of 24 px, stored 30, a network that measures ``sqrt(D * c)``, on a 200 px image the network sees whole:
    the 2x candidate agrees (60 -> 37.4 px) and is refined twice (37.4 -> 29.8, 29.8 -> 26.6 px, 0.165 off in log2,
    below ``refine_above``). Within ``settle_within`` 0.2 the estimate is the last candidate's 29.8 px and its
    segmentation (the whole image at that zoom) comes back with it; within 0.1 it is not, and the estimate is
    the measurement, 26.6 px, with no segmentation (the caller segments the image at 26.6 px)."""
    labels = _disc_grid(24.0, side=200)
    image = torch.stack([torch.as_tensor(labels > 0, dtype=torch.float32), torch.zeros(labels.shape)])
    network = CompressingNetwork()
    chain = [60.0, math.sqrt(24.0 * 60.0)]
    chain += [math.sqrt(24.0 * chain[-1]), math.sqrt(24.0 * math.sqrt(24.0 * chain[-1]))]
    settled = search_diameter(image, network, _ids_as_masks, 30.0, 30.0, DiameterSearch(settle_within=0.2, follow_within=0.0))
    last = settled.candidates[-1]
    assert settled.diameter == last.diameter == pytest.approx(chain[2], rel=0.04), settled.candidates
    assert 0.1 < last.disagreement <= 0.2
    side = round(200 * 30.0 / last.diameter)
    assert settled.flows is not None and tuple(settled.flows.shape) == (3, side, side)
    expected = network(F.interpolate(image[None], size=(side, side), mode="bilinear", align_corners=False))[0]
    assert torch.equal(settled.flows, expected)
    measured = search_diameter(image, network, _ids_as_masks, 30.0, 30.0, DiameterSearch(settle_within=0.1, follow_within=0.0))
    assert measured.flows is None and measured.diameter == pytest.approx(chain[3], rel=0.04)


def test_only_an_image_the_network_sees_whole_settles():
    """A 400 px image at 1x is 2.4x the 256 px crop's area: above ``whole_below`` 2 the candidates see crops and
    nothing settles; with ``whole_below`` 3 the candidate sees the whole image (network input 400 x 400) and does."""
    labels = _disc_grid(30.0, side=400)
    image = torch.stack([torch.as_tensor(labels > 0, dtype=torch.float32), torch.zeros(labels.shape)])
    network = SizeLimitedNetwork()
    cropped = search_diameter(image, network, _masks, 30.0, 30.0, DiameterSearch(settle_within=0.2))
    assert cropped.flows is None and max(max(c) for c in network.calls) <= 256
    network = SizeLimitedNetwork()
    whole = search_diameter(image, network, _masks, 30.0, 30.0, DiameterSearch(settle_within=0.2, whole_below=3.0))
    assert whole.flows is not None and (400, 400) in network.calls and whole.diameter == 30.0


class CountingNetwork(torch.nn.Module):
    """Wraps a CPnet and counts the network pixels it is run on."""

    def __init__(self, network):
        super().__init__()
        self.network, self.pixels = network, 0
        self.diam_mean, self.diam_labels = network.diam_mean, network.diam_labels

    def forward(self, x):
        self.pixels += x.shape[0] * x.shape[-2] * x.shape[-1]
        return self.network(x)


@pytest.mark.parametrize("settle", [0.0, 10.0])
def test_auto_reuses_the_searchs_segmentation_of_the_whole_image(tiny_model, settle):
    """The small trained model on a 160 px sample image (whole at every candidate's zoom). Settled (``settle_within``
    10: any agreeing whole-image candidate), ``auto`` runs the network only for the search, and its flows are the
    ones a run at the chosen diameter gives; not settled (0), it segments the image once more at the estimate."""
    image, _ = _sample()
    network = CountingNetwork(load_model(tiny_model).eval())
    inferer = CellInferer(precision="fp32", search=DiameterSearch(settle_within=settle))

    def pixels(run):
        network.pixels = 0
        result = run()
        return result, network.pixels

    found, search = pixels(lambda: inferer._estimate(image, network, "auto", None))
    (flows, diameter), auto = pixels(lambda: inferer.predict_estimated(image, network))
    again, once = pixels(lambda: inferer._predict(image[None], network, diameter))
    assert diameter == found.diameter and search > 0 and once > 0
    assert (found.flows is not None) == bool(settle)
    assert auto == (search if settle else search + once)
    assert torch.allclose(flows, again, atol=1e-5)
