"""The coronary tree: ARCADE topology, Dodge calibres, Murray's law, stenoses."""

from __future__ import annotations

import numpy as np
import pytest

from rau_rt.synthetic.anatomy import SEGMENTS, TEMPLATE, build_tree, segments_of


def test_topology_is_arcades():
    children = {}
    for name, spec in TEMPLATE.items():
        children.setdefault(spec.parent, set()).add(name)
    assert children == {
        None: {"1", "5"}, "1": {"2"}, "2": {"3"}, "3": {"4", "16"}, "16": {"16a", "16b", "16c"},
        "5": {"6", "11", "12"}, "6": {"7", "9"}, "7": {"8", "9a", "10"}, "8": {"10a"},
        "11": {"12a", "12b", "13"}, "13": {"14", "14a", "14b", "15"}}
    assert set(TEMPLATE) == set(SEGMENTS) and len(SEGMENTS) == 25


@pytest.mark.parametrize(("artery", "dominance"), [("left", "right"), ("right", "right"),
                                                   ("left", "left"), ("right", "left")])
def test_murrays_law_holds_where_a_segment_divides(artery, dominance):
    tree = build_tree(np.random.default_rng(0), artery, dominance)
    vessels = {v.name: v for v in tree.vessels if v.name is not None}
    assert tuple(vessels) == segments_of(artery, dominance)
    checked = 0
    for name, vessel in vessels.items():
        kids = [vessels[c] for c in vessels if TEMPLATE[c].parent == name]
        for kid in kids:  # the child starts on its parent's centerline
            assert np.min(np.linalg.norm(vessel.points - kid.points[0], axis=1)) < 1e-9
        at_end = [k for k in kids if np.allclose(k.points[0], vessel.points[-1])]
        if at_end:
            flow = sum(k.radii[0] ** 3 for k in at_end)
            assert vessel.radii[-1] ** 3 == pytest.approx(flow, rel=1e-6)
            checked += 1
    assert checked >= 1


def test_calibres_follow_dodge():
    radii = [build_tree(np.random.default_rng(s), "left", "right").vessels[0].radii[0]
             for s in range(20)]
    # left main 4.5 ± 0.5 mm diameter (Dodge 1992)
    assert 3.8 < 2 * np.mean(radii) < 5.2
    rca = [build_tree(np.random.default_rng(s), "right", d).vessels[0].radii[0]
           for s in range(10) for d in ("right", "left")]
    assert np.mean(rca[0::2]) > np.mean(rca[1::2]) * 1.2  # 3.9 vs 2.8 mm with dominance


def test_stenosis_narrows_the_lumen_by_its_reduction():
    tree = build_tree(np.random.default_rng(3), "left", "right", stenoses=3)
    assert len(tree.stenoses) == 3
    vessels = {v.name: v for v in tree.vessels}
    unnarrowed = build_tree(np.random.default_rng(3), "left", "right", stenoses=3)
    for lesion in tree.stenoses:
        r = vessels[lesion.segment].radii
        centre = round(lesion.position * (len(r) - 1))
        same = {v.name: v for v in unnarrowed.vessels}[lesion.segment].radii
        assert np.array_equal(r, same)  # deterministic
        # at the lesion's centre the radius is (1 - reduction) of the smooth profile around it
        half = int(lesion.length_mm / 2) + 1
        lo, hi = max(centre - half, 0), min(centre + half, len(r) - 1)
        around = np.interp(centre, [lo, hi], [r[lo], r[hi]])
        assert r[centre] / around == pytest.approx(1 - lesion.reduction, abs=0.12)
