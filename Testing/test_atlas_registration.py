"""Registration onto real MRI: recovering a known deformation of Colin27, the ITK-SNAP crop (expert labels),
transform composition, the on-disk cache of reference registrations, no-overlap and cancellation."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import data_path

from mrisegassist.atlas import space as space_module
from mrisegassist.atlas.augment import Deformation, deform, deformed_reference
from mrisegassist.atlas.builtin import mricron_dir
from mrisegassist.atlas.references import ReferenceSet, load_reference_set
from mrisegassist.atlas.registration import (FAST, RegistrationSettings, compose, flatten, plausible_affine,
                                             register, warp_labels, working_image)
from mrisegassist.atlas.space import CommonSpace
from mrisegassist.errors import Cancelled, InputError
from mrisegassist.progress import CancelToken
from mrisegassist.volume import Geometry, Volume, read_volume

DEEP = {"caudate": [71, 72], "putamen": [73, 74], "thalamus": [77, 78], "lateral ventricles": [201, 202]}


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


@pytest.fixture(scope="module")
def colin27() -> ReferenceSet:
    if not (mricron_dir() / "aal.nii.gz").is_file():
        pytest.skip("Colin27/AAL not installed (apt-get install mricron-data)")
    return load_reference_set("builtin:colin27")


@pytest.fixture(scope="module")
def crop():
    folder = data_path("itksnap-mricrop")
    return read_volume(folder / "t1.gipl.gz", name="crop"), read_volume(folder / "labels.gipl.gz", kind="label")


def test_compose_applies_the_last_transform_first():
    a, b = sitk.TranslationTransform(3, (5, 0, 0)), sitk.ScaleTransform(3, (2, 2, 2))
    c = sitk.Euler3DTransform((0, 0, 0), 0.1, 0.0, 0.0)
    t = compose(compose(a, b), c)
    assert len(flatten(t)) == 3
    p = (1.0, 2.0, 3.0)
    np.testing.assert_allclose(t.TransformPoint(p), a.TransformPoint(b.TransformPoint(c.TransformPoint(p))))


def test_implausible_affines_are_recognised():
    assert plausible_affine(np.eye(3)) and plausible_affine(np.diag([1.2, 0.9, 1.1]))
    assert not plausible_affine(np.diag([1, 1, -1]))  # a reflection
    assert not plausible_affine(np.diag([0.24, 1.19, 1.35]))  # a collapsed axis (diverged optimiser)
    assert not plausible_affine(np.array([[1, 2.5, 0], [0, 1, 0], [0, 0, 1]]))  # strong shear


def test_working_image_keeps_the_physical_extent(crop):
    image, _ = crop
    w = working_image(image, 3.0)
    assert w.GetSpacing() == (3.0, 3.0, 3.0) and w.GetSize() == (26, 37, 21)
    g = Geometry.from_sitk(w)
    lo, hi = g.corners_lps().min(0), g.corners_lps().max(0)
    olo, ohi = image.geometry.corners_lps().min(0), image.geometry.corners_lps().max(0)
    np.testing.assert_allclose(lo, olo, atol=1.6)
    np.testing.assert_allclose(hi, ohi, atol=1.6)


def test_registration_recovers_a_known_smooth_deformation(colin27):
    ref = colin27.references[0]
    moved_image, moved_labels = deform(ref.image, ref.labels, Deformation(seed=11, magnitude_mm=3.0))
    t = register(moved_image, ref.image, FAST)
    warped = warp_labels(ref.labels, moved_image.geometry, t)
    for name, values in DEEP.items():
        target = np.isin(moved_labels.array, values)
        before = _dice(np.isin(ref.labels.array, values), target)
        after = _dice(np.isin(warped, values), target)
        assert after > 0.75 and after > before + 0.05, (name, before, after)


def test_common_space_onto_the_itksnap_crop_matches_expert_labels(colin27, crop, tmp_path):
    image, labels = crop
    space = CommonSpace(colin27, FAST, cache=tmp_path)
    warped = space.warp(image)
    assert len(warped.labels) == 1 and warped.labels[0].shape == labels.array.shape
    w = warped.labels[0]
    # expert labels: lateral ventricles (1), caudate (7), both sides; atlas: AAL caudate, derived ventricles
    assert _dice(np.isin(w, [201, 202]), labels.array == 1) > 0.5
    assert _dice(np.isin(w, [71, 72]), labels.array == 7) > 0.5
    assert set(space.timings) >= {"references_s", "target_registration_s", "warp_s"}


def test_reference_registrations_are_cached_on_disk(colin27, crop, tmp_path, monkeypatch):
    image, _ = crop
    base = colin27.references[0]
    copy = deformed_reference(base, Deformation(seed=5, magnitude_mm=3.0))
    refset = ReferenceSet("two", [base, copy], colin27.structures)
    settings = FAST.__class__(**{**FAST.__dict__, "deformable": "none"})
    space = CommonSpace(refset, settings, cache=tmp_path)
    assert [r.name for r in space.missing()] == [copy.name]
    first = space.prepare()
    files = list(tmp_path.rglob("*.h5"))
    assert len(files) == 1 and copy.key in files[0].name and settings.key() in str(files[0])
    calls = []
    monkeypatch.setattr(space_module, "register", lambda *a, **k: calls.append(1) or (_ for _ in ()).throw(
        AssertionError("registered again")))
    again = CommonSpace(refset, settings, cache=tmp_path)
    assert again.missing() == []
    second = again.prepare()
    p = (10.0, -20.0, 30.0)
    np.testing.assert_allclose(second[1].TransformPoint(p), first[1].TransformPoint(p), atol=1e-6)
    assert calls == []
    # a different setting is a different cache entry
    assert CommonSpace(refset, FAST, cache=tmp_path).missing() == [copy]


def test_anchor_working_images_are_cached_on_disk_bit_for_bit(colin27, tmp_path, monkeypatch):
    """The anchor at the working and refinement spacings is computed once, written to the cache and read back
    identical (array, spacing, origin, direction), so a warm run gives the same registration; a damaged file
    is computed again and replaced."""
    space = CommonSpace(colin27, FAST, cache=tmp_path)
    computed = [space.anchor_image(), space.anchor_image(FAST.refine_resolution_mm)]
    files = sorted(tmp_path.glob("anchors/*.mha"))
    assert [f.name for f in files] == sorted(f"{colin27.references[0].key}-{r:g}mm.mha"
                                             for r in (FAST.resolution_mm, FAST.refine_resolution_mm))
    monkeypatch.setattr(space_module, "working_image", lambda *a, **k: (_ for _ in ()).throw(
        AssertionError("computed again")))
    again = CommonSpace(colin27, FAST, cache=tmp_path)
    for image, res in zip(computed, (FAST.resolution_mm, FAST.refine_resolution_mm)):
        back = again.anchor_image(res)
        np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(image))
        assert (back.GetSpacing(), back.GetOrigin(), back.GetDirection()) == \
            (image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    monkeypatch.undo()
    files[0].write_bytes(b"damaged")
    fresh = CommonSpace(colin27, FAST, cache=tmp_path)
    name = files[0].name
    res = FAST.resolution_mm if name.endswith(f"-{FAST.resolution_mm:g}mm.mha") else FAST.refine_resolution_mm
    expected = computed[0] if res == FAST.resolution_mm else computed[1]
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(fresh.anchor_image(res)),
                                  sitk.GetArrayViewFromImage(expected))
    assert files[0].stat().st_size > 1000


def test_registration_refuses_images_that_do_not_overlap(crop):
    image, _ = crop
    rng = np.random.default_rng(0)
    cube = np.zeros((60, 60, 60), np.float32)
    cube[5:55, 5:55, 5:55] = 100 + rng.normal(0, 5, (50, 50, 50))  # a 250 mm phantom, not a brain
    phantom = Volume(cube, Geometry((60, 60, 60), (5.0, 5.0, 5.0), (-150.0, -150.0, -150.0)), "phantom")
    with pytest.raises(InputError, match="do not overlap"):
        register(phantom, image, RegistrationSettings(deformable="none"))


def test_registration_can_be_cancelled(crop):
    image, _ = crop
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        register(image, image, FAST, cancel=token)
    token = CancelToken()
    seen = []

    def progress(fraction, message):
        seen.append(message)
        token.cancel()

    with pytest.raises(Cancelled):
        register(image, image, FAST, progress=progress, cancel=token)
    assert seen and seen[0].startswith("rigid")
    with pytest.raises(InputError, match="deformable"):
        RegistrationSettings(deformable="elastic")


@pytest.mark.parametrize("deformable", ["bspline", "demons"])
def test_deformable_stages_undo_a_deformation_of_the_crop(crop, deformable):
    image, labels = crop
    moved_image, moved_labels = deform(image, labels, Deformation(seed=4, magnitude_mm=3.0, rotation_deg=2,
                                                                  shift_mm=2))
    settings = RegistrationSettings(resolution_mm=2.0, deformable=deformable, bspline_spacing_mm=30)
    t = register(moved_image, image, settings)
    warped = warp_labels(labels, moved_image.geometry, t)
    for value in (1, 7, 8):  # expert lateral ventricles, caudate, corpus callosum
        target = moved_labels.array == value
        before, after = _dice(labels.array == value, target), _dice(warped == value, target)
        assert after > 0.7 and after > before, (deformable, value, before, after)


def test_transform_files_written_and_read_from_many_threads(tmp_path):
    """The cache writes .h5 transforms from the registration thread pool; ITK's HDF5 is not thread-safe
    (this crashed `bench atlas` with a segmentation fault before transform I/O was serialised)."""
    from concurrent.futures import ThreadPoolExecutor

    import SimpleITK as sitk

    from mrisegassist.atlas.registration import load_transform, save_transform

    def one(n: int) -> float:
        t = sitk.AffineTransform(3)
        t.SetTranslation((float(n), 0.0, 0.0))
        path = save_transform(sitk.CompositeTransform([t, sitk.Euler3DTransform()]), tmp_path / f"t{n}.h5")
        return load_transform(path).TransformPoint((0.0, 0.0, 0.0))[0]

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert list(pool.map(one, range(48))) == [float(n) for n in range(48)]


def test_registration_is_repeatable(colin27, crop):
    """The same images give the same transform on every run (single-threaded optimisation: ITK's threaded
    Mattes MI sums in a varying order, which moved atlas boxes of the crop by a voxel from run to run)."""
    from dataclasses import replace

    image, _ = crop
    template = colin27.references[0].image
    runs = [register(image, template, replace(FAST, deformable="none")) for _ in range(3)]
    params = [np.asarray(flatten(t)[0].GetParameters()) for t in runs]
    assert all(np.array_equal(params[0], p) for p in params[1:])
    assert FAST.deterministic and FAST.key() == replace(FAST, deterministic=False).key()


def test_demons_refinement_aligns_the_crop_ventricles_better_and_is_repeatable(colin27, crop):
    """The dense refinement after the B-spline (the default) follows the ventricle walls of a real T1 that a
    40 mm B-spline cannot (expert ITK-SNAP labels), and gives the same transform on every run."""
    from dataclasses import replace

    image, labels = crop
    ref = colin27.references[0]
    coarse = warp_labels(ref.labels, image.geometry, register(image, ref.image, replace(FAST, refine="none")))
    runs = [warp_labels(ref.labels, image.geometry, register(image, ref.image, FAST)) for _ in range(2)]
    np.testing.assert_array_equal(runs[0], runs[1])
    ventricles = labels.array == 1
    before, after = _dice(np.isin(coarse, [201, 202]), ventricles), _dice(np.isin(runs[0], [201, 202]), ventricles)
    assert after > before + 0.03 and after > 0.8, (before, after)
    with pytest.raises(InputError, match="refinement"):
        RegistrationSettings(refine="syn")
