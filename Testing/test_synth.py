"""Synthetic cases from the MNI152 template in the nilearn wheel: contrasts, labels, determinism, grids, files."""
from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.transform import Rotation

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
            assert 20 < sum(vols.values()) < 350 and 5 < vols[1] + vols[3] + vols[4] < 100  # BraTS-like
            wm_frac = tissue["wm"][lab == 2].mean()
            assert wm_frac > 0.5  # oedema follows white matter
        elif kind == "metastases":
            n = ndimage.label(lab == 1, structure=np.ones((3, 3, 3)))[1]
            assert 2 <= n <= 5 and 0.2 < vols[1] < 30 and vols[2] > vols[1]
        elif kind == "ms":
            n = ndimage.label(lab == 1, structure=np.ones((3, 3, 3)))[1]
            assert 4 <= n <= 25 and 0.5 < vols[1] < 20
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


def test_mni_grid_progress_cancel_and_bad_options():
    from mrisegassist.errors import Cancelled
    from mrisegassist.progress import CancelToken

    seen = []
    case = make_case("healthy", seed=0, grid="mni", noise=0.0, bias_field=0.0,
                     progress=lambda f, m: seen.append(f))
    assert seen[0] == 0.0 and seen[-1] == 1.0 and seen == sorted(seen)
    assert case.geometry.size == (197, 233, 189)
    assert case.geometry.origin == pytest.approx((98.0, 134.0, -72.0))
    with pytest.raises(InputError, match="unknown synthetic case kind"):
        make_case("lymphoma")
    with pytest.raises(InputError, match="unknown grid"):
        make_case("ms", grid="colin")
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        make_case("ms", cancel=token)


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
    rc = main(["synth", "--kind", "metastases", "--seed", "3", "-o", str(tmp_path / "cli"), "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out[0]["seed"] == 3 and (tmp_path / "cli" / "labels.nii.gz").exists()
    assert np.array_equal(read_volume(tmp_path / "cli" / "labels.nii.gz", kind="label").array,
                          cases["metastases"].labels.array)
    assert out[0]["label_volumes_ml"]["metastasis"] == pytest.approx((cases["metastases"].labels.array == 1).sum() / 1000)


# -------------------------------------------------------------------------------------------- overlays
def _lps_grids(geometry):
    """LPS x, y, z of every voxel centre as ``[k, j, i]`` arrays."""
    k, j, i = np.meshgrid(*[np.arange(n) for n in geometry.shape], indexing="ij")
    pts = np.stack([i, j, k, np.ones_like(i)], axis=-1) @ geometry.ijk_to_lps.T
    return pts[..., 0], pts[..., 1], pts[..., 2]


@pytest.mark.parametrize("direction", [
    (1, 0, 0, 0, -1, 0, 0, 0, 1),            # ms-lesjak / radiomics
    (-1, 0, 0, 0, -1, 0, 0, 0, 1),           # MNI template (RAS-stored NIfTI)
    (0, 0, -1, 1, 0, 0, 0, -1, 0),           # sagittal acquisition, axes permuted
    tuple(Rotation.from_rotvec([0.15, 0.3, 0.45]).as_matrix().ravel()),  # oblique
])
def test_canonical_orientation(direction):
    """After reorientation the display array runs inferior->superior, anterior->posterior, right->left."""
    from mrisegassist.viz import canonical_axes, to_canonical
    from mrisegassist.volume import Geometry

    g = Geometry((7, 6, 5), (1.0, 2.0, 3.0), (10.0, -20.0, 30.0), tuple(float(v) for v in direction))
    x, y, z = (to_canonical(a, canonical_axes(g.direction_matrix)) for a in _lps_grids(g))
    assert np.all(np.diff(z, axis=0) > 0)  # S increases along axis 0
    assert np.all(np.diff(y, axis=1) > 0)  # P increases along axis 1: anterior at the top of an axial view
    assert np.all(np.diff(x, axis=2) > 0)  # L increases along axis 2: patient left on the right (radiological)


def test_overlay_png_of_synthetic_case(cases, artifacts, tmp_path):
    import matplotlib.image as mpimg

    from mrisegassist.errors import InputError as Err
    from mrisegassist.viz import overlay_png, plot_bars, plot_benchmark

    case = cases["glioma"]
    pred = np.where(case.labels.array == 3, 0, case.labels.array)  # a "prediction" missing one label
    out = overlay_png(case.images["flair"], case.labels.with_array(pred), artifacts / "synth_glioma_overlay.png",
                      label_info=case.label_info, reference=case.labels.array, title="synthetic glioma, seed 3")
    png = mpimg.imread(out)
    assert png.shape[0] > 700 and png.shape[1] > 1000
    rgb = png[..., :3]
    saturated = np.count_nonzero(rgb.max(axis=-1) - rgb.min(axis=-1) > 0.25)
    plain = mpimg.imread(overlay_png(case.images["flair"], None, tmp_path / "plain.png"))[..., :3]
    assert saturated > 20 * max(np.count_nonzero(plain.max(axis=-1) - plain.min(axis=-1) > 0.25), 1)
    with pytest.raises(Err, match="differs from image shape"):
        overlay_png(case.images["flair"], np.zeros((3, 3, 3)), tmp_path / "x.png")
    with pytest.raises(Err, match="outside the volume"):
        overlay_png(case.images["flair"], None, tmp_path / "x.png", slices=(500, 1, 1))
    bars = plot_bars({"necrosis": {"2d": 0.7, "3d": 0.8}, "oedema": {"2d": 0.6, "3d": 0.65}},
                     tmp_path / "bars.png", title="Dice", ylabel="Dice")
    bench = plot_benchmark({"MONAI sliding window": 12.0, "ours": 9.0}, tmp_path / "bench.png",
                           baseline="MONAI sliding window", title="inference")
    assert mpimg.imread(bars).size and mpimg.imread(bench).size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bars.png", "bench.png", "plain.png"]


@pytest.fixture(scope="module")
def failure_kinds():
    """The kinds built for the U-Nets' known failures: low-grade glioma without enhancement, confluent MS."""
    return {kind: [make_case(kind, seed=s) for s in (0, 1)] for kind in ("lgg", "ms-confluent")}


def test_low_grade_glioma_has_no_enhancement(failure_kinds):
    for case in failure_kinds["lgg"]:
        lab = case.labels.array
        vols = {int(v): float((lab == v).sum()) / 1000 for v in np.unique(lab) if v}
        assert 4 not in vols and {2, 3} <= set(vols) <= {1, 2, 3}  # no enhancing label
        assert 30 < vols[3] < 250  # a large non-enhancing mass (ml)
        brain = case.brainmask.array > 0
        normal = brain & (lab == 0)
        flair, t1, t1c = (case.images[s].array for s in ("flair", "t1", "t1c"))
        core = ndimage.binary_erosion(lab == 3, iterations=2)
        assert np.median(flair[core]) > 1.4 * np.median(flair[normal])  # FLAIR-bright
        # no enhancement: T1c / T1 in the mass is what it is in normal tissue (only the per-sequence gain)
        ratio_mass = np.median(t1c[core] / np.maximum(t1[core], 1))
        ratio_normal = np.median(t1c[normal] / np.maximum(t1[normal], 1))
        assert 0.85 < ratio_mass / ratio_normal < 1.15
        assert np.median(t1c[core]) < np.median(t1c[normal])  # darker than brain on T1c, not brighter


def test_confluent_ms_lesion_load(failure_kinds):
    for case in failure_kinds["ms-confluent"]:
        lab = case.labels.array == 1
        total = float(lab.sum()) / 1000
        sizes = np.bincount(ndimage.label(lab, structure=np.ones((3, 3, 3)))[0].ravel())[1:]
        assert 15 < total < 75 and sizes.max() / 1000 > 5  # a large confluent lesion, plus scattered ones
        assert len(sizes) >= 5
        flair = case.images["flair"].array
        normal = (case.brainmask.array > 0) & ~ndimage.binary_dilation(lab, iterations=2)
        assert np.median(flair[ndimage.binary_erosion(lab)]) > 1.3 * np.median(flair[normal])
    first, second = failure_kinds["ms-confluent"]
    assert not np.array_equal(first.labels.array, second.labels.array)
    assert np.array_equal(make_case("ms-confluent", seed=0).labels.array, first.labels.array)  # deterministic
