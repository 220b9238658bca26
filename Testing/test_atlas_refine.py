"""Per-structure rules learnt on the references (``atlas.refine``): the rule's masks, the choice between
fusion and engine, leave-one-source-out folds, learning that never sees the target's labels (ITK-SNAP crop,
expert labels), and the prompted pipeline against a direct affine + B-spline warp on the crop."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import data_path

from mrisegassist.atlas import refine
from mrisegassist.atlas.augment import Deformation, deform
from mrisegassist.atlas.boxes import ScoreMap
from mrisegassist.atlas.builtin import mricron_dir
from mrisegassist.atlas.evaluation import EvalCase, evaluate
from mrisegassist.atlas.references import Reference, ReferenceSet, Structure
from mrisegassist.atlas.registration import RegistrationSettings
from mrisegassist.volume import Geometry, Volume, read_volume

AFFINE = RegistrationSettings(deformable="none")


def _score(array: np.ndarray, structure: Structure) -> ScoreMap:
    box = (slice(0, array.shape[0]), slice(0, array.shape[1]), slice(0, array.shape[2]))
    return ScoreMap(structure, 1, array.astype(np.float32), box, array.shape, 4)


def test_one_rule_gives_fusion_engine_and_their_combinations():
    s = Structure("x", (1,), threshold=0.5)
    score = _score(np.array([[[0.0, 0.25, 0.5, 0.75, 1.0]]]), s)
    engine = np.array([[[True, True, False, False, True]]])
    cases = {(0.5, 0.5): ("fusion", [0, 0, 1, 1, 1]), (0.0, refine.NEVER): ("engine", [1, 1, 0, 0, 1]),
             (0.5, refine.NEVER): ("engine AND fusion", [0, 0, 0, 0, 1]),
             (0.0, 0.5): ("engine OR fusion", [1, 1, 1, 1, 1]), (0.2, 0.8): ("combined", [0, 1, 0, 0, 1])}
    for (t_in, t_out), (kind, expected) in cases.items():
        rule = refine.StructureRule("x", 0.5, t_in, t_out)
        assert rule.kind == kind
        np.testing.assert_array_equal(rule.mask(score, engine)[0, 0], np.array(expected, bool))
    # without an engine the rule is fusion at its learnt threshold
    np.testing.assert_array_equal(refine.StructureRule("x", 0.75, 0.0, 2.0).mask(score, None)[0, 0],
                                  [False, False, False, True, True])


def test_dice_table_matches_a_direct_computation():
    rng = np.random.default_rng(0)
    s = Structure("x", (1,))
    score = _score(np.round(rng.random((6, 7, 8)) * 4) / 4, s)
    engine, truth = rng.random((6, 7, 8)) > 0.6, rng.random((6, 7, 8)) > 0.5
    # a score map over part of the volume (counted over its box, the engine's and the truth's): same result
    box = (slice(1, 4), slice(2, 6), slice(0, 5))
    part = ScoreMap(s, 1, score.array[box].copy(), box, score.shape, 4)
    small_engine = np.zeros_like(engine)
    small_engine[2:5, 1:3, 3:7] = engine[2:5, 1:3, 3:7]
    inner = truth & (score.array > 0.3)
    for sc, eng, tru in ((score, engine, truth), (part, engine, truth), (part, small_engine, inner), (part, None, truth)):
        table = refine._dice_table(refine._counts(sc, eng, tru))
        for a, t_in in enumerate(refine.GRID):
            for b, t_out in enumerate(refine.GRID):
                pred = refine.StructureRule("x", 0.5, t_in, t_out).mask(sc, np.zeros_like(tru) if eng is None else eng)
                d = 2 * (pred & tru).sum() / (pred.sum() + tru.sum())
                assert table[a, b] == pytest.approx(d)


def test_rule_choice_keeps_the_atlas_on_ties_and_takes_a_clearly_better_engine():
    s = Structure("x", (1,), threshold=0.5)
    n = len(refine.GRID)
    flat = np.full((n, n), 0.6)
    rule = refine.choose_rule(s, [flat, flat], with_engine=True)
    assert (rule.fusion_threshold, rule.t_in, rule.t_out, rule.kind) == (0.5, 0.5, 0.5, "fusion")
    better = flat.copy()
    better[0, -1] = 0.9  # the engine alone
    better[3, 3] = 0.605  # a fusion threshold within MIN_GAIN of the defined one: not taken
    rule = refine.choose_rule(s, [better, flat], with_engine=True)
    assert rule.kind == "engine" and rule.fusion_threshold == 0.5
    assert rule.dice_engine == pytest.approx(0.75) and rule.dice_refined == pytest.approx(0.75)
    # learning fusion thresholds only: the engine's cells are ignored
    assert refine.choose_rule(s, [better, flat], with_engine=False).kind == "fusion"
    # a candidate worse than fusion on one fold is not taken, however good on the mean
    worse = flat.copy()
    worse[0, -1] = 0.55
    assert refine.choose_rule(s, [better, worse], with_engine=True).kind == "fusion"
    # graded threshold pairs are not candidates (two folds would fit their noise): engine AND fusion is
    graded = flat.copy()
    graded[2, 8] = 0.95
    graded[5, -1] = 0.7
    rule = refine.choose_rule(s, [graded, graded], with_engine=True)
    assert (rule.kind, rule.t_in, rule.t_out) == ("engine AND fusion", 0.5, refine.NEVER)


def test_a_users_threshold_replaces_the_learnt_rule():
    s = Structure("x", (1,), threshold=0.5)
    score = _score(np.array([[[0.0, 0.25, 0.5, 0.75, 1.0]]]), s)
    engine = np.array([[[True, True, False, False, True]]])
    learnt = refine.Refinement("classical", {"x": refine.StructureRule("x", 0.5, 0.5, 0.5)}, ["a", "b"], "folds")
    given = learnt.with_thresholds({"x": 0.75})
    assert learnt.rule(s).kind == "fusion" and given.rule(s).kind == "engine"
    np.testing.assert_array_equal(given.rule(s).mask(score, None)[0, 0], [False, False, False, True, True])
    np.testing.assert_array_equal(given.rule(s).mask(score, engine)[0, 0], engine[0, 0])
    assert learnt.with_thresholds({}) is learnt


def _ref(name: str, value: float, source: str = "") -> Reference:
    g = Geometry((4, 4, 4), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    image = Volume(np.full((4, 4, 4), value, np.float32), g)
    return Reference(name, image, Volume(np.ones((4, 4, 4), np.uint8), g), source=source)


def test_folds_hold_out_whole_sources():
    a, a2, b, b2, c = _ref("a", 1), _ref("a~0", 2, "A"), _ref("b", 3), _ref("b~0", 4, "B"), _ref("c", 5)
    a.source, b.source = "A", "B"
    refset = ReferenceSet("s", [a, b, a2, b2, c], [Structure("x", (1,))])
    plan = refine.folds(refset)
    assert [(held, used) for held, used in plan] == [(0, [1, 3, 4]), (1, [0, 2, 4]), (4, [0, 1, 2, 3])]
    one = ReferenceSet("one", [a, a2, _ref("a~1", 6, "A"), _ref("a~2", 7, "A")], [Structure("x", (1,))])
    assert refine.folds(one, max_folds=2) == [(1, [0, 2, 3]), (2, [0, 1, 3])]  # copies only, original kept
    assert refine.folds(ReferenceSet("single", [a], [Structure("x", (1,))])) == []
    rules = refine.learn_refinement(ReferenceSet("single", [a], [Structure("x", (1,), threshold=0.4)]), None)
    assert rules.folds == [] and rules.rule(Structure("x", (1,), threshold=0.4)).kind == "fusion"


@pytest.fixture(scope="module")
def crop():
    folder = data_path("itksnap-mricrop")
    return read_volume(folder / "t1.gipl.gz", name="crop"), read_volume(folder / "labels.gipl.gz", kind="label")


def test_rules_are_learnt_on_the_references_only_and_cached(crop, tmp_path, monkeypatch):
    """Two "subjects" (the crop and a deformed copy standing for another brain, both with the expert labels):
    the rules come from the two folds; changing the target's labels changes the scores, never the rules."""
    monkeypatch.setenv("MRISEGASSIST_CACHE", str(tmp_path))
    image, labels = crop
    other_image, other_labels = deform(image, labels, Deformation(seed=3, magnitude_mm=3.0))
    refset = ReferenceSet("pair", [Reference("crop", image, labels, source="subject-1"),
                                   Reference("other", other_image, other_labels, source="subject-2")],
                          [Structure("lateral-ventricles", (1,)), Structure("caudate", (7,))], "expert")
    masks = {"lateral-ventricles": labels.array == 1, "caudate": labels.array == 7}
    case = EvalCase("pair", image, masks, refset, "expert (manual ITK-SNAP labels)")
    result = evaluate(case, cascades=(), settings=AFFINE, baseline=AFFINE)
    assert result["refinement"]["folds"] == ["crop", "other"]
    assert len(list((tmp_path / "atlas" / "refine").glob("*.json"))) == 1
    wrong = EvalCase("pair", image, {k: np.roll(m, 9, axis=2) for k, m in masks.items()}, refset, "shifted")
    shifted = evaluate(wrong, cascades=(), settings=AFFINE, baseline=AFFINE)
    for r, s in zip(result["rows"], shifted["rows"]):
        assert (r["fusion_threshold"], r["rule"]) == (s["fusion_threshold"], s["rule"])
        assert r["dice_fusion"] > s["dice_fusion"]
    # the second run read the cached rules: same evidence, no new file
    assert shifted["refinement"]["evidence"] == result["refinement"]["evidence"]
    assert len(list((tmp_path / "atlas" / "refine").glob("*.json"))) == 1
    assert 0 <= result["mean"]["dice_prompted"] <= 1 and "fusion_ge_direct" in result["goals"]


@pytest.mark.slow
def test_prompted_pipeline_beats_a_direct_warp_on_the_itksnap_crop(crop):
    """Regression on real expert labels: Colin27 + MNI152 (+ one deformed copy) onto the ITK-SNAP crop. The label
    fusion and the prompted pipeline (atlas boxes -> classical engine -> rules learnt on the references) are at
    least as good as the better of the two direct affine + B-spline warps (measured margins: 0.016 and 0.028)."""
    if not (mricron_dir() / "aal.nii.gz").is_file():
        pytest.skip("Colin27/AAL not installed (apt-get install mricron-data)")
    from mrisegassist.atlas.evaluation import dataset

    case = dataset("itksnap", data_path(), n_references=3)
    result = evaluate(case, cascades=())
    mean = result["mean"]
    assert result["refinement"]["folds"] == ["colin27", "mni152"]
    assert mean["dice_fusion"] >= mean["dice_direct"], mean
    assert mean["dice_prompted"] >= mean["dice_direct"] and mean["dice_prompted"] >= mean["dice_fusion"], mean
    assert mean["dice_prompted"] > 0.6, mean


@pytest.fixture(scope="module")
def brain():
    if not (mricron_dir() / "aal.nii.gz").is_file():
        pytest.skip("Colin27/AAL not installed (apt-get install mricron-data)")
    from mrisegassist.atlas.builtin import builtin_reference_set

    return builtin_reference_set("brain")


def test_shipped_rules_are_found_and_a_stale_file_is_detected(brain, tmp_path, monkeypatch):
    """The package ships the rules of builtin:brain (learnt leave-one-source-out: Colin27 <-> MNI152), stamped
    with what they depend on; a stamp that differs from the installed atlases, the registration settings or the
    learning procedure makes the file stale (named), and a damaged file is reported."""
    import json
    from dataclasses import replace

    from mrisegassist.atlas.registration import FAST

    rules, how = refine.shipped_rules("brain", brain, "classical", strategy="A")
    assert rules is not None and how == "shipped (brain.classical.A.json)", how
    assert rules.folds == ["colin27", "mni152"] and set(rules.rules) == set(brain.structure_names)
    fusion, _ = refine.shipped_rules("brain", brain, None, strategy="B")  # label fusion: no strategy
    assert fusion is not None and fusion.engine == "" and {r.kind for r in fusion.rules.values()} == {"fusion"}
    # a selection of structures takes its rules from the whole set's file
    one, _ = refine.shipped_rules("brain", brain.select(["caudate-left"]), "classical")
    assert list(one.rules) == ["caudate-left"] and one.rules["caudate-left"] == rules.rules["caudate-left"]
    # other registration settings than those the rules were learnt with
    none, why = refine.shipped_rules("brain", brain, "classical", settings=replace(FAST, refine_iterations=(10, 5)))
    assert none is None and why == "brain.classical.A.json is stale: learnt for other settings"
    # no file for an engine with downloaded weights: learnt on first use
    assert refine.shipped_rules("brain", brain, "sam2")[0] is None
    doc = json.loads(refine.shipped_path("brain", "classical", "A").read_text())
    monkeypatch.setattr(refine, "SHIPPED_DIR", tmp_path)
    target = tmp_path / "brain.classical.A.json"
    for change, field in (({"version": refine.VERSION - 1}, "version"), ({"references": ["other"]}, "references"),
                          ({"engine_code": "0" * 16}, "engine_code")):
        target.write_text(json.dumps({**doc, "made_for": {**doc["made_for"], **change}}))
        none, why = refine.shipped_rules("brain", brain, "classical")
        assert none is None and why == f"brain.classical.A.json is stale: learnt for other {field}"
        found, why = refine.find_rules(brain, "classical", builtin="brain", cache=False)
        assert found is None and "stale" in why and "not learnt yet" in why
    target.write_text(json.dumps(doc))
    assert refine.shipped_rules("brain", brain, "classical")[0] is not None
    target.write_text("{not json")
    assert "damaged" in refine.shipped_rules("brain", brain, "classical")[1]
