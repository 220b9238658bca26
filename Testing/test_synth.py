"""Synthetic cases from the MNI152 template in the nilearn wheel: contrasts, labels, determinism, grids, files."""
from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from mrisegassist.cli import main
from mrisegassist.errors import InputError
from mrisegassist.labels import read_labelmap
from mrisegassist.synth import BRATS_GEOMETRY, SEQUENCES, _anatomy, make_case, write_case
from mrisegassist.volume import read_volume

pytest.importorskip("nilearn", reason="synthetic cases need the MNI152 template shipped with nilearn")


@pytest.fixture(scope="module")
def cases():
    return {kind: make_case(kind, seed=3) for kind in ("glioma", "metastases", "ms", "healthy")}


@pytest.fixture(scope="module")
def tissue():
    """Tissue fractions of the seed-3 BraTS grid, regenerated exactly as make_case draws them."""
    from mrisegassist.synth import SYNTH_KINDS

    rng = np.random.default_rng([3, SYNTH_KINDS.index("healthy")])
    return _anatomy("brats", rng, True)[1]


def test_brats_grid_geometry(cases):
    for case in cases.values():
        assert case.geometry == BRATS_GEOMETRY
        assert case.labels.array.shape == (155, 240, 240) and case.labels.array.dtype == np.uint8
        for seq in SEQUENCES:
            assert case.images[seq].array.shape == (155, 240, 240)
            assert case.images[seq].array.dtype == np.float32
    brain = cases["healthy"].brainmask.array > 0
    idx = np.argwhere(brain)
    lo, hi = idx.min(axis=0), idx.max(axis=0)
    assert np.all(lo >= 2) and np.all(hi <= np.array([152, 237, 237]))  # brain fits with a margin
    assert 1100 < brain.sum() / 1000 < 1800  # ml: an adult brain (template scaled 0.88-0.95)


def test_contrasts_inside_tissue(cases, tissue):
    """T1: WM > GM > CSF; T2: CSF > GM > WM; FLAIR: GM > WM > CSF (CSF dark); T1c = T1 outside lesions."""
    case = cases["healthy"]
    pure = {t: (tissue[t] > 0.95) & ndimage.binary_erosion(tissue["brain"], iterations=3)
            for t in ("csf", "gm", "wm")}
    assert all(m.sum() > 1000 for m in pure.values())
    med = {seq: {t: float(np.median(case.images[seq].array[m])) for t, m in pure.items()} for seq in SEQUENCES}
    assert med["t1"]["wm"] > med["t1"]["gm"] > med["t1"]["csf"]
    assert med["t2"]["csf"] > med["t2"]["gm"] > med["t2"]["wm"]
    assert med["flair"]["gm"] > med["flair"]["wm"] > med["flair"]["csf"]
    ratio = {t: med["t1c"][t] / med["t1"][t] for t in pure}  # per-sequence gain differs; ratios must agree
    assert max(ratio.values()) / min(ratio.values()) < 1.1
    outside = ~case.brainmask.array.astype(bool)
    assert all(np.all(case.images[s].array[outside] == 0) for s in SEQUENCES)


def test_lesions_bright_and_enhancing(cases, tissue):
    wm = (tissue["wm"] > 0.95)
    g = cases["glioma"]
    flair, t1, t1c = (g.images[s].array for s in ("flair", "t1", "t1c"))
    lab = g.labels.array
    oedema = ndimage.binary_erosion(lab == 2)
    assert np.median(flair[oedema]) > 1.5 * np.median(flair[wm & (lab == 0)])
    enh = ndimage.binary_erosion(lab == 4) if ndimage.binary_erosion(lab == 4).sum() > 20 else lab == 4
    # enhancement: T1c / T1 far above the normal-tissue ratio
    normal = np.median(t1c[wm & (lab == 0)] / t1[wm & (lab == 0)])
    assert np.median(t1c[enh] / t1[enh]) > 1.8 * normal
    assert np.median(t1[lab == 1]) < np.median(t1[wm & (lab == 0)])  # necrosis dark on T1
    ms = cases["ms"]
    core = ndimage.binary_erosion(ms.labels.array == 1) | (ms.labels.array == 1)
    assert np.median(ms.images["flair"].array[core]) > 1.4 * np.median(ms.images["flair"].array[wm & (ms.labels.array == 0)])
    assert np.median(ms.images["t1"].array[core]) < np.median(ms.images["t1"].array[wm & (ms.labels.array == 0)])


def test_labels_inside_brain_with_sensible_volumes(cases, tissue):
    for kind, case in cases.items():
        lab = case.labels.array
        assert not np.any(lab[case.brainmask.array == 0]), kind
        vols = {int(v): float((lab == v).sum()) / 1000 for v in np.unique(lab) if v}  # ml (1 mm voxels)
        values = {info.value for info in case.label_info}
        assert set(vols) <= values, kind
        if kind == "glioma":
            assert set(vols) == {1, 2, 3, 4}
            assert 10 < sum(vols.values()) < 250 and 2 < vols[1] + vols[3] + vols[4] < 60
            wm_frac = tissue["wm"][lab == 2].mean()
            assert wm_frac > 0.5  # oedema follows white matter
        elif kind == "metastases":
            n = ndimage.label(lab == 1, structure=np.ones((3, 3, 3)))[1]
            assert 2 <= n <= 5 and 0.2 < vols[1] < 30 and vols[2] > vols[1]
        elif kind == "ms":
            n = ndimage.label(lab == 1, structure=np.ones((3, 3, 3)))[1]
            assert 4 <= n <= 20 and 0.2 < vols[1] < 20
            assert tissue["wm"][lab == 1].mean() > 0.6  # white-matter lesions
        else:
            assert vols == {} and case.label_info == []


def test_deterministic_and_seed_dependent(cases):
    again = make_case("ms", seed=3)
    assert np.array_equal(again.labels.array, cases["ms"].labels.array)
    assert np.array_equal(again.images["flair"].array, cases["ms"].images["flair"].array)
    other = make_case("ms", seed=4)
    assert not np.array_equal(other.labels.array, cases["ms"].labels.array)
    assert {tuple(les["centre_ijk"]) for les in other.lesions}.isdisjoint(
        {tuple(les["centre_ijk"]) for les in cases["ms"].lesions})


def test_mni_grid_and_bad_options():
    case = make_case("healthy", seed=0, grid="mni", noise=0.0, bias_field=0.0)
    assert case.geometry.size == (197, 233, 189)
    assert case.geometry.origin == pytest.approx((98.0, 134.0, -72.0))
    with pytest.raises(InputError, match="unknown synthetic case kind"):
        make_case("lymphoma")
    with pytest.raises(InputError, match="unknown grid"):
        make_case("ms", grid="colin")


def test_write_case_layouts_and_cli(cases, tmp_path, capsys):
    case = cases["glioma"]
    paths = write_case(case, tmp_path / "case2013")
    assert sorted(p.name for p in (tmp_path / "case2013").iterdir()) == sorted(
        ["flair.nii.gz", "t1.nii.gz", "t1c.nii.gz", "t2.nii.gz", "labels.nii.gz", "labels.labels.json",
         "brainmask.nii.gz"])
    flair = read_volume(paths["flair"])
    assert flair.geometry.same_as(case.geometry) and np.array_equal(flair.array, case.images["flair"].array)
    lm = read_labelmap(paths["labels"])
    assert np.array_equal(lm.volume.array, case.labels.array)
    assert lm.names == {1: "necrosis", 2: "oedema", 3: "non-enhancing tumour", 4: "enhancing tumour"}
    p23 = write_case(case, tmp_path / "BraTS-SYN-00003-000", naming="brats2023")
    assert p23["labels"].name == "BraTS-SYN-00003-000-seg.nii.gz" and p23["flair"].name.endswith("-t2f.nii.gz")
    seg = read_labelmap(p23["labels"])
    lab = case.labels.array
    assert np.array_equal(seg.volume.array == 1, (lab == 1) | (lab == 3))  # BraTS 2023: NCR = necrosis + NET
    assert np.array_equal(seg.volume.array == 3, lab == 4)
    with pytest.raises(InputError, match="unknown naming"):
        write_case(case, tmp_path / "x", naming="nnunet")
    rc = main(["synth", "--kind", "metastases", "--seed", "5", "-o", str(tmp_path / "cli"), "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out[0]["seed"] == 5 and (tmp_path / "cli" / "labels.nii.gz").exists()
    assert np.array_equal(read_volume(tmp_path / "cli" / "labels.nii.gz", kind="label").array,
                          make_case("metastases", seed=5).labels.array)
