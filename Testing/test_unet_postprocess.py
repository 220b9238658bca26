"""U-Net post-processing on real expert labels: BraTS regions, small-component removal, class mapping."""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from conftest import data_path
from mrisegassist.unet.postprocess import BRATS_REGIONS, map_classes, region_masks, remove_small_components
from mrisegassist.volume import read_volume


def test_brats_regions_on_expert_labels():
    labels = read_volume(data_path("brats2013-deepmedic", "pat0001", "labels.nii.gz"), kind="label").array
    regions = region_masks(labels)
    assert set(regions) == set(BRATS_REGIONS)
    counts = {v: int((labels == v).sum()) for v in range(1, 5)}
    assert regions["whole tumour"].sum() == sum(counts.values())
    assert regions["tumour core"].sum() == counts[1] + counts[3] + counts[4]
    assert regions["enhancing tumour"].sum() == counts[4]
    # nesting: ET inside TC inside WT
    assert not (regions["enhancing tumour"] & ~regions["tumour core"]).any()
    assert not (regions["tumour core"] & ~regions["whole tumour"]).any()


def test_small_component_removal_on_ms_lesions():
    vol = read_volume(data_path("ms-lesjak", "patient07", "lesions.nii.gz"), kind="label")
    labels = vol.array
    before = labels.copy()
    comps, n = ndimage.label(labels > 0, structure=np.ones((3, 3, 3)))
    sizes = np.bincount(comps.ravel())[1:]
    threshold = float(np.median(sizes)) + 0.5  # mm³ (1 mm voxels): about half the lesions are smaller
    out = remove_small_components(labels, vol.geometry.spacing, threshold)
    assert np.array_equal(labels, before)  # input untouched
    kept = int((sizes >= threshold).sum())
    assert 0 < kept < n
    assert ndimage.label(out > 0, structure=np.ones((3, 3, 3)))[1] == kept
    big = np.isin(comps, np.flatnonzero(sizes >= threshold) + 1)
    assert np.array_equal(out > 0, big)  # large lesions unchanged, small ones gone
    assert np.array_equal(remove_small_components(labels, vol.geometry.spacing, 0), labels)


def test_component_removal_keeps_tumour_subregions_together():
    labels = read_volume(data_path("brats2013-deepmedic", "pat0002", "labels.nii.gz"), kind="label").array
    out = remove_small_components(labels, (1.0, 1.0, 1.0), 50.0)
    wt = labels > 0
    comps, n = ndimage.label(wt, structure=np.ones((3, 3, 3)))
    sizes = np.bincount(comps.ravel())
    main = comps == int(np.argmax(sizes[1:]) + 1)
    assert np.array_equal(out[main], labels[main])  # every sub-label of the main tumour kept
    per_label = remove_small_components(labels, (1.0, 1.0, 1.0), 50.0, per_label=True)
    assert per_label.sum() <= out.sum()


def test_map_classes():
    classes = np.array([[[0, 1, 2, 3]]], dtype=np.uint8)
    assert map_classes(classes, [0, 2, 4, 1]).tolist() == [[[0, 2, 4, 1]]]
