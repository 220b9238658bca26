"""U-Net preprocessing on real scans: model-grid mapping keeps geometry, normalisation is robust."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import data_path
from mrisegassist.unet.preprocess import ModelGrid, foreground_mask, normalise
from mrisegassist.volume import read_volume


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


def test_exact_grid_is_a_lossless_transpose_flip_on_flipped_header():
    """ms-lesjak has a flipped j axis: the model grid is an exact reordering, and mapping back is the identity."""
    flair = read_volume(data_path("ms-lesjak", "patient07", "flair.nii.gz"))
    grid = ModelGrid.for_geometry(flair.geometry, [1.0, 1.0, None])
    assert grid.exact
    moved = grid.to_model(flair.array)
    # the model grid is axis-aligned LPS: every voxel keeps its physical position
    k, j, i = 60, 100, 70
    lps_source = flair.geometry.ijk_to_lps @ np.array([i, j, k, 1.0])
    idx = np.round(grid.target.lps_to_continuous_ijk(lps_source[:3])[0]).astype(int)
    assert moved[idx[2], idx[1], idx[0]] == flair.array[k, j, i]
    back = grid.to_reference(moved)
    assert np.array_equal(back, flair.array)
    assert flair.array.flags.writeable  # input untouched (compared above)


def test_anisotropic_nrrd_resampled_to_model_spacing_and_back_keeps_geometry():
    """radiomics-brain (0.78 x 0.78 x 6.5 mm NRRD): to the 1 mm in-plane model grid and back."""
    image = read_volume(data_path("radiomics-brain", "brain1_image.nrrd"))
    label = read_volume(data_path("radiomics-brain", "brain1_label.nrrd"), kind="label")
    grid = ModelGrid.for_geometry(image.geometry, [1.0, 1.0, None])
    assert not grid.exact
    assert grid.target.spacing == pytest.approx((1.0, 1.0, image.geometry.spacing[2]))
    # the model grid covers the same physical box
    assert np.allclose(grid.target.corners_lps().min(0), image.geometry.corners_lps().min(0), atol=1.0)
    assert np.allclose(grid.target.corners_lps().max(0), image.geometry.corners_lps().max(0), atol=1.0)
    moved = grid.to_model(label.array.astype(np.float32))
    assert moved.shape == grid.target.shape
    back = grid.to_reference(moved) > 0.5
    assert back.shape == label.array.shape
    assert _dice(back, label.array > 0) > 0.9  # only interpolation blur is lost
    volume_ml = lambda m, g: float(m.sum()) * g.voxel_volume_ml  # noqa: E731
    assert volume_ml(moved > 0.5, grid.target) == pytest.approx(volume_ml(label.array > 0, image.geometry), rel=0.05)


def test_oblique_scan_maps_to_axis_aligned_grid():
    """ms-longitudinal FLAIR has a slightly oblique direction: general resampling path, geometry preserved."""
    flair = read_volume(data_path("ms-longitudinal", "patient01", "study1_FLAIR.nii.gz"))
    grid = ModelGrid.for_geometry(flair.geometry, [1.0, 1.0, 1.0])
    assert not grid.exact
    assert grid.target.direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    back = grid.to_reference(grid.to_model(flair.array))
    assert back.shape == flair.array.shape
    centre = tuple(s // 2 for s in flair.array.shape)
    window = tuple(slice(c - 20, c + 20) for c in centre[:2]) + (slice(centre[2] - 40, centre[2] + 40),)
    corr = np.corrcoef(back[window].ravel(), flair.array[window].ravel())[0, 1]
    assert corr > 0.9


def test_normalisation_agrees_between_pre_zscored_and_raw_scans():
    """brats2013 (pre-z-scored, background -3.6) and brats-gli-00001 (raw int16, background 0)."""
    pre = read_volume(data_path("brats2013-deepmedic", "pat0001", "flair.nii.gz")).array
    brainmask = read_volume(data_path("brats2013-deepmedic", "pat0001", "brainmask.nii.gz"), kind="label").array
    fg = foreground_mask(pre)
    assert _dice(fg, brainmask > 0) > 0.99  # the constant background is recognised
    raw_vol = read_volume(data_path("brats-gli-00001", "BraTS-GLI-00001-000-t2f.nii.gz"))
    raw = raw_vol.array
    original = raw.copy()
    for arr in (pre, raw):
        out = normalise(arr)
        mask = foreground_mask(arr)
        assert abs(float(out[mask].mean())) < 0.05
        assert 0.9 < float(out[mask].std()) < 1.05
        assert np.all(out[~mask] == 0)
    assert np.array_equal(raw, original)
    # a global intensity scale (different scanner gain) does not change the normalised image
    assert np.allclose(normalise(raw * 3.7 + 0.0), normalise(raw), atol=1e-4)
