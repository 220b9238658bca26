"""Prompts in any view and point prompts, at the service level (no Slicer; runs on Python 3.9 too).

Real data: BraTS 2013 pat0002 FLAIR with its expert tumour (labels > 0, largest component), stored axially as
distributed and re-stored sagittally and coronally (``SimpleITK.PermuteAxes``: the same physical image, another
voxel order), plus an oblique copy resampled on a grid rotated by 30 degrees; ms-lesjak patient26 FLAIR with its
expert lesions for a second lesion reached by a positive point.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import data_path
from scipy import ndimage

from mrisegassist.errors import InputError
from mrisegassist.prompt.base import Box2D, ObjectPrompt, Point2D
from mrisegassist.prompt.strategies import box_slices, objects_from_mask
from mrisegassist.service import PromptRequest, Service, wire
from mrisegassist.service.views import MAX_TILT_DEG, VIEWS, view_grid, view_name, voxel_extent
from mrisegassist.volume import Geometry, Volume, read_volume, resample_to

STORAGES = {"axial": (0, 1, 2), "sagittal": (1, 2, 0), "coronal": (0, 2, 1)}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def largest(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask, np.ones((3, 3, 3)))
    return labels == 1 + int(np.argmax(ndimage.sum(mask, labels, range(1, n + 1))))


def permuted(volume: Volume, order) -> Volume:
    f = sitk.PermuteAxesImageFilter()
    f.SetOrder(list(order))
    return Volume.from_sitk(f.Execute(volume.to_sitk()), volume.name)


@pytest.fixture(scope="module")
def pat0002():
    flair = read_volume(data_path("brats2013-deepmedic", "pat0002", "flair.nii.gz"))
    labels = read_volume(data_path("brats2013-deepmedic", "pat0002", "labels.nii.gz"), kind="label")
    return flair, largest(labels.array > 0)


@pytest.fixture(scope="module")
def service():
    return Service(device="cpu")


def flat_box_in_view(volume: Volume, mask: np.ndarray, normal) -> ObjectPrompt:
    """The box a person draws in a view: the lesion's rectangle on its middle slice of that view."""
    grid = view_grid(volume.geometry, normal)
    on_view = grid.to_view(mask.astype(np.uint8)) > 0
    ks = np.nonzero(on_view.any(axis=(1, 2)))[0]
    k = box_slices((int(ks[0]), int(ks[-1])), "A")[0]
    jj, ii = np.nonzero(on_view[k])
    return ObjectPrompt(1, [Box2D(k, int(ii.min()), int(jj.min()), int(ii.max()), int(jj.max()))], view=normal)


# ------------------------------------------------------------------------------------------------ views
def test_view_grid_transposes_exactly_and_canonically(pat0002):
    """An aligned volume is seen from a view by transposing its axes: exact both ways, the same view array
    whatever the storage order, the slice axis named, and Slicer's crop rule in the view grid."""
    flair, _ = pat0002
    arrays = {}
    for storage, order in STORAGES.items():
        volume = permuted(flair, order)
        for view, normal in VIEWS.items():
            grid = view_grid(volume.geometry, normal)
            assert grid.exact and view_name(normal) == view
            on_view = grid.to_view(volume.array)
            assert np.array_equal(grid.from_view(on_view), volume.array)
            arrays.setdefault(view, []).append(on_view)
            # the view's k axis is the volume axis along the normal
            n_lps = np.diag([-1.0, -1.0, 1.0]) @ np.asarray(normal)
            assert abs(abs(grid.geometry.direction_matrix[:, 2] @ n_lps) - 1) < 1e-9
        assert view_grid(volume.geometry, VIEWS[storage]).slice_axis == "k"
    for view, on_views in arrays.items():
        assert all(np.array_equal(a, on_views[0]) for a in on_views), view
    # Slicer's rule: voxels wholly inside, a flat box gets its nearest slice, outside refused
    assert voxel_extent(np.array([[9.4, 9.6, 3.0], [20.6, 19.4, 3.2]]), (30, 30, 10)) == (10, 20, 11, 18, 3, 3)
    with pytest.raises(InputError, match="outside"):
        voxel_extent(np.array([[40.0, 1, 1], [50.0, 5, 5]]), (30, 30, 10))


def test_boxes_in_any_view_on_any_storage(pat0002, service):
    """The same lesion boxed (flat box on its middle slice) in the axial, coronal and sagittal view, on the volume
    stored axially, sagittally and coronally: every Dice within 0.05 of the axial/axial result, and the same view
    gives the same mask whatever the storage (expert labels)."""
    flair, tumour = pat0002
    reference = flair.with_array(tumour.astype(np.uint8))
    results, masks = {}, {}
    for storage, order in STORAGES.items():
        volume, truth = permuted(flair, order), permuted(reference, order).array > 0
        for view, normal in VIEWS.items():
            result = service.prompt(PromptRequest(volume, [flat_box_in_view(volume, truth, normal)]))
            mask = result.array == 1
            results[storage, view] = dice(mask, truth)
            masks[storage, view] = np.transpose(mask, np.argsort([2 - o for o in order[::-1]]))
            summary = result.objects[0]
            assert summary.view == tuple(normal)
            assert summary.slice_axis == ("k" if storage == view else summary.slice_axis) and summary.slice_axis in "ij" + "k"
    print({f"{s}/{v}": round(d, 3) for (s, v), d in results.items()})
    baseline = results["axial", "axial"]
    assert baseline > 0.85
    for key, value in results.items():
        assert abs(value - baseline) <= 0.05, (key, value, baseline)
    for view in VIEWS:
        assert all(np.array_equal(masks[s, view], masks["axial", view]) for s in STORAGES), view


def test_request_checks_use_the_views_grid(pat0002):
    """The request checks (``Service.run`` -> ``check_request``) judge each object's boxes on the grid of the view
    it was drawn in: a coronal box of the axial case has its slice along A-P (up to 239, the volume has 155 axial
    slices) and is accepted; reaching beyond that view's slice is warned as clipped; a slice beyond it is refused."""
    import warnings

    from mrisegassist.errors import InputWarning
    from mrisegassist.service.checks import check_request

    flair, tumour = pat0002
    coronal = VIEWS["coronal"]
    prompt = flat_box_in_view(flair, tumour, coronal)
    box = prompt.boxes[0]
    nk, nj, ni = view_grid(flair.geometry, coronal).geometry.shape
    assert box.k >= flair.array.shape[0] and box.k < nk  # only valid in the coronal view's grid
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)
        check_request(PromptRequest(flair, [prompt]))
    wide = ObjectPrompt(1, [Box2D(box.k, box.i0, box.j0, ni + 5, box.j1)], view=coronal)
    with pytest.warns(InputWarning, match=rf"clipped to \({box.k}, {box.i0}, {box.j0}, {ni - 1}, {box.j1}\)"):
        check_request(PromptRequest(flair, [wide]))
    with pytest.raises(InputError, match=rf"box slice k={nk} is outside the volume \(0..{nk - 1}\)"):
        check_request(PromptRequest(flair, [ObjectPrompt(1, [Box2D(nk, 10, 10, 20, 20)], view=coronal)]))


def test_oblique_volume_is_resampled_for_a_view(pat0002, service):
    """A copy of the case on a grid rotated by 30 degrees about A-P (beyond MAX_TILT_DEG): the axial view is
    resampled, propagated across axial planes and mapped back onto the oblique grid; Dice stays near the
    axial/axial result (expert labels, resampled with the image)."""
    flair, tumour = pat0002
    g = flair.geometry
    angle = math.radians(30.0)
    assert 30.0 > MAX_TILT_DEG
    rotation = np.array([[math.cos(angle), 0, math.sin(angle)], [0, 1, 0], [-math.sin(angle), 0, math.cos(angle)]])
    direction = rotation @ g.direction_matrix
    centre = (g.ijk_to_lps @ np.r_[(np.array(g.size) - 1) / 2.0, 1.0])[:3]
    origin = centre - direction @ (np.array(g.spacing) * (np.array(g.size) - 1) / 2.0)
    oblique = Geometry(g.size, g.spacing, tuple(origin), tuple(direction.ravel()))
    volume = resample_to(flair, oblique, "linear")
    truth = resample_to(flair.with_array(tumour.astype(np.uint8)), oblique, "nearest").array > 0
    grid = view_grid(volume.geometry, VIEWS["axial"])
    assert not grid.exact and grid.slice_axis == "oblique"
    result = service.prompt(PromptRequest(volume, [flat_box_in_view(volume, truth, VIEWS["axial"])]))
    value = dice(result.array == 1, truth)
    axial = dice(service.prompt(PromptRequest(flair, [flat_box_in_view(flair, tumour, VIEWS["axial"])])).array == 1,
                 tumour)
    print(f"oblique 30 deg, axial view: Dice {value:.3f} (axial volume: {axial:.3f})")
    assert value > axial - 0.1


# ----------------------------------------------------------------------------------------------- points
def deepest(mask: np.ndarray) -> tuple[int, int, int]:
    depth = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1, 1:-1]
    return tuple(int(v) for v in np.unravel_index(int(np.argmax(depth)), depth.shape))


def test_positive_point_alone_finds_the_lesion(pat0002, service):
    """One positive click inside the tumour (its deepest voxel on its middle slice) segments it about as well as
    a box around it (expert labels)."""
    flair, tumour = pat0002
    box = flat_box_in_view(flair, tumour, None)
    k = box.boxes[0].k
    depth = ndimage.distance_transform_edt(tumour[k])
    j, i = np.unravel_index(int(np.argmax(depth)), depth.shape)
    by_box = dice(service.prompt(PromptRequest(flair, [box])).array == 1, tumour)
    result = service.prompt(PromptRequest(flair, [ObjectPrompt(1, [], points=[Point2D(k, int(i), int(j))])]))
    by_point = dice(result.array == 1, tumour)
    print(f"pat0002 tumour: box Dice {by_box:.3f}, one positive point {by_point:.3f}")
    assert by_point > 0.8 and by_point > by_box - 0.05
    (found,) = result.objects[0].boxes  # the box found around the point is reported
    assert found.k == k and found.i0 <= i <= found.i1 and found.j0 <= j <= found.j1


def test_negative_point_removes_the_part_it_is_on(pat0002, service):
    """A negative click on the tumour's top slices removes the region around it (cut at the mask's narrowest
    neck), leaves the prompted slice as it was, and only ever takes voxels away."""
    flair, tumour = pat0002
    box = flat_box_in_view(flair, tumour, None)
    first = service.prompt(PromptRequest(flair, [box])).array == 1
    ks = np.nonzero(first.any(axis=(1, 2)))[0]
    top = first.copy()
    top[:ks[-1] - 3] = False
    k, j, i = deepest(top)
    negative = ObjectPrompt(1, box.boxes, points=[Point2D(k, i, j, positive=False)])
    cut = service.prompt(PromptRequest(flair, [negative])).array == 1
    assert first[k, j, i] and not cut[k, j, i]
    assert not (cut & ~first).any() and cut.sum() < first.sum()
    assert np.array_equal(cut[box.boxes[0].k], first[box.boxes[0].k])
    assert dice(cut, tumour) > 0.8  # the tumour is still there


def test_positive_point_adds_a_second_lesion():
    """A box on one MS lesion and a positive click on another lesion far from it (ms-lesjak patient26, expert
    lesions): the object holds both (fusion keeps the clicked component), the first unchanged."""
    flair = read_volume(data_path("ms-lesjak", "patient26", "flair.nii.gz"))
    lesions = read_volume(data_path("ms-lesjak", "patient26", "lesions.nii.gz"), kind="label").array > 0
    objects = objects_from_mask(lesions, "components", min_voxels=200)
    (_, a), (_, b) = objects[0], next((o for o in objects[1:] if _far(objects[0][1], o[1])), objects[1])
    box = flat_box_in_view(flair, a, None)
    service = Service(device="cpu")
    alone = service.prompt(PromptRequest(flair, [box])).array == 1
    k, j, i = deepest(b)
    both = service.prompt(PromptRequest(flair, [ObjectPrompt(1, box.boxes, points=[Point2D(k, i, j)])])).array == 1
    print(f"lesion A Dice {dice(alone, a):.3f}; with a click on lesion B: A {dice(both & _near(a), a):.3f}, "
          f"B {dice(both & _near(b), b):.3f}")
    assert both[k, j, i] and dice(both & _near(b), b) > 0.5
    assert np.array_equal(both & _near(a), alone & _near(a))


def test_weights_free_engine_reads_points_as_seeds(pat0002):
    """The weights-free engine takes points itself (``accepts_points``): a negative point on a propagated slice is a
    background seed of its walker there (and a hole holding it is not filled), so the engine alone (no service
    cut) leaves it out, the prompted slice unchanged (expert labels)."""
    from mrisegassist.prompt.base import PromptableEngine
    from mrisegassist.prompt.classical import ClassicalEngine

    flair, tumour = pat0002
    assert ClassicalEngine.accepts_points and not PromptableEngine.accepts_points
    engine = ClassicalEngine()
    prepared = engine.prepare(flair.array)
    box = flat_box_in_view(flair, tumour, None).validate(flair.array.shape)
    (first,) = engine.segment(prepared, [box])
    first_mask = first.full_mask()  # results live on their box
    ks = np.nonzero(first_mask.any(axis=(1, 2)))[0]
    top = first_mask.copy()
    top[:ks[-1] - 3] = False
    k, j, i = deepest(top)
    clicked = ObjectPrompt(1, box.boxes, points=[Point2D(k, i, j, positive=False)]).validate(flair.array.shape)
    (cut,) = engine.segment(prepared, [clicked])
    cut_mask = cut.full_mask()
    assert first_mask[k, j, i] and not cut_mask[k, j, i]
    b = box.boxes[0].k
    assert np.array_equal(cut_mask[b], first_mask[b])
    assert dice(cut_mask, tumour) > 0.85


def _largest_leak(result: np.ndarray, truth: np.ndarray, grid) -> tuple[int, int, int]:
    """The deepest voxel ``(k, j, i)`` (view grid) of the slice with the most false positives (2 voxels away from
    the expert mask)."""
    on_view, t = grid.to_view(result.astype(np.uint8)) > 0, grid.to_view(truth.astype(np.uint8)) > 0
    leak = on_view & ~ndimage.binary_dilation(t, iterations=2)
    k = int(np.argmax(leak.sum(axis=(1, 2))))
    depth = ndimage.distance_transform_edt(leak[k])
    j, i = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return k, int(j), int(i)


def test_native_points_as_good_as_the_fallback(pat0002, service, monkeypatch):
    """The weights-free engine reading points (seeds) against the same engine through the box-only fallback
    (``accepts_points`` False: boxes found around points and the 3D negative cut only), expert labels:
    1-3 positive clicks alone on BraTS pat0002's tumour (deepest voxel of the slices at 1/2, 3/20, 17/20 of its
    extent) and a negative click on the largest leak of a coronal box on pat0003. Measured: equal Dice to the
    third decimal (clicks 0.895 / 0.900 / 0.898; leak 0.850 -> 0.904 either way): the seeds agree with what the
    fallback finds on these cases; the threshold allows no loss."""
    from mrisegassist.prompt.classical import ClassicalEngine

    flair, tumour = pat0002
    ks = np.nonzero(tumour.any(axis=(1, 2)))[0]

    def click(f: float) -> Point2D:
        k = int(round(ks[0] + f * (ks[-1] - ks[0])))
        depth = ndimage.distance_transform_edt(tumour[k])
        j, i = np.unravel_index(int(np.argmax(depth)), depth.shape)
        return Point2D(k, int(i), int(j))

    requests = {f"{n} click(s)": PromptRequest(flair, [ObjectPrompt(1, [], points=[click(f) for f in fs])])
                for n, fs in ((1, (0.5,)), (2, (0.5, 0.15)), (3, (0.5, 0.15, 0.85)))}
    flair3 = read_volume(data_path("brats2013-deepmedic", "pat0003", "flair.nii.gz"))
    labels3 = read_volume(data_path("brats2013-deepmedic", "pat0003", "labels.nii.gz"), kind="label")
    tumour3 = largest(labels3.array > 0)
    coronal = VIEWS["coronal"]
    box = flat_box_in_view(flair3, tumour3, coronal)
    by_box = service.prompt(PromptRequest(flair3, [box])).array == 1
    k, j, i = _largest_leak(by_box, tumour3, view_grid(flair3.geometry, coronal))
    requests["negative click on a leak"] = PromptRequest(
        flair3, [ObjectPrompt(1, box.boxes, points=[Point2D(k, i, j, positive=False)], view=coronal)])
    truths = {name: (tumour3 if name.startswith("negative") else tumour) for name in requests}
    figures = {}
    for native in (False, True):
        monkeypatch.setattr(ClassicalEngine, "accepts_points", native)
        for name, request in requests.items():
            figures.setdefault(name, []).append(dice(service.prompt(request).array == 1, truths[name]))
    print({name: f"fallback {a:.3f}, native {b:.3f}" for name, (a, b) in figures.items()},
          f"(pat0003 coronal box alone {dice(by_box, tumour3):.3f})")
    for name, (fallback, native) in figures.items():
        assert native >= fallback - 0.005, name
    assert min(figures[f"{n} click(s)"][1] for n in (1, 2, 3)) > 0.85
    assert figures["negative click on a leak"][1] > dice(by_box, tumour3) + 0.03


def _near(mask: np.ndarray) -> np.ndarray:
    return ndimage.binary_dilation(mask, iterations=6)


def _far(a: np.ndarray, b: np.ndarray) -> bool:
    return not (_near(a) & _near(b)).any()


def test_points_travel_on_the_wire_and_are_validated():
    volume = Volume(np.random.default_rng(0).random((6, 8, 9)).astype(np.float32),
                    Geometry((9, 8, 6), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0)))
    prompt = ObjectPrompt(3, [Box2D(2, 1, 1, 4, 4)], name="x", points=[Point2D(2, 3, 3), Point2D(4, 5, 6, False)],
                          view=(0.0, 1.0, 0.0))
    back = wire.loads(bytes(wire.dumps(PromptRequest(volume, [prompt]))), 1 << 24)
    assert back.objects[0] == prompt and back.objects[0].negative_points == [Point2D(4, 5, 6, False)]
    with pytest.raises(InputError, match="only negative points"):
        ObjectPrompt(1, [], points=[Point2D(1, 1, 1, False)]).validate(volume.array.shape)
    with pytest.raises(InputError, match="outside the volume"):
        ObjectPrompt(1, [], points=[Point2D(9, 1, 1)]).validate(volume.array.shape)
    with pytest.raises(InputError, match="outside z-range"):
        ObjectPrompt(1, [Box2D(2, 1, 1, 4, 4)], (1, 3), points=[Point2D(5, 1, 1)]).validate(volume.array.shape)
    with pytest.raises(InputError, match="not a direction"):
        view_grid(volume.geometry, (0.0, 0.0, 0.0))
