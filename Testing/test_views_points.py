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
