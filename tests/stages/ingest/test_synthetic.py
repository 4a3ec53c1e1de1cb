"""The synthetic source: determinism, layout, exact boxes, rendering and the edits."""

from __future__ import annotations

import io
import json
import struct
from collections import Counter
from functools import cache

import numpy as np
import pytest
from PIL import Image

from refforge.stages.ingest import synthetic as S
from refforge.stages.scene.geometry import compute_relations
from refforge.stages.scene.lexicon import ATTRIBUTE_FAMILIES, CATEGORIES, CONTAINERS, MIRRORED, SUPPORTERS

SEEDS = range(200)


@cache
def scene(seed: int) -> S.SyntheticScene:
    return S.generate_scene(seed)


@cache
def pixels(seed: int) -> np.ndarray:
    sc = scene(seed)
    return np.asarray(S.render(sc.graph, sc.spec))


def clear_caches() -> None:
    for f in (S._shape, S._background_cached, S._patch_cached, S._pattern_mask):
        f.cache_clear()


def int_box(box) -> tuple[int, int, int, int]:
    assert all(float(v).is_integer() for v in box), box
    return tuple(int(v) for v in box)


def changed_bounds(a: np.ndarray, b: np.ndarray) -> tuple[int, int, int, int] | None:
    ys, xs = np.nonzero((a != b).any(axis=-1))
    if len(xs) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def overlap(a, b) -> bool:
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


def png_chunks(data: bytes) -> list[bytes]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, kinds = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kinds.append(data[pos + 4 : pos + 8])
        pos += 12 + length
    return kinds


# ---------------------------------------------------------------------------------------------------
# determinism and encoding
# ---------------------------------------------------------------------------------------------------


def test_same_seed_same_scene_and_bytes():
    a = S.generate_scene(7)
    png_a = S.encode_png(S.render(a.graph, a.spec))
    clear_caches()  # nothing may depend on cached state
    b = S.generate_scene(7)
    png_b = S.encode_png(S.render(b.graph, b.spec))
    assert a == b
    assert png_a == png_b


def test_different_seeds_differ():
    graphs = {repr(scene(s).graph) for s in range(20)}
    assert len(graphs) == 20
    assert S.encode_png(Image.fromarray(pixels(1))) != S.encode_png(Image.fromarray(pixels(2)))


def test_spec_is_json_and_sufficient():
    sc = scene(3)
    spec = json.loads(json.dumps(sc.spec))
    assert spec == sc.spec
    assert spec["generator"] == "synthetic/v1" and spec["seed"] == 3 and spec["mirrored"] is False
    assert np.array_equal(np.asarray(S.render(sc.graph, spec)), pixels(3))


def test_encode_png_roundtrip_and_no_metadata():
    img = Image.fromarray(pixels(4))
    data = S.encode_png(img)
    assert set(png_chunks(data)) == {b"IHDR", b"IDAT", b"IEND"}
    back = Image.open(io.BytesIO(data))
    assert back.mode == "RGB" and back.size == (512, 384)
    assert np.array_equal(np.asarray(back), pixels(4))


# ---------------------------------------------------------------------------------------------------
# scene contents
# ---------------------------------------------------------------------------------------------------


def test_object_counts_categories_and_attributes():
    counts = Counter()
    categories = Counter()
    repeated = 0
    for seed in SEEDS:
        g = scene(seed).graph
        assert (g.width, g.height) == (512, 384)
        assert 3 <= len(g.objects) <= 12
        counts[len(g.objects)] += 1
        assert [o.id for o in sorted(g.objects, key=lambda o: int(o.id[1:]))] == [
            f"o{i}" for i in range(len(g.objects))
        ]
        names = Counter(o.name for o in g.objects)
        categories.update(names)
        assert len(names) <= 5
        repeated += any(v > 1 for v in names.values())
        for o in g.objects:
            assert o.name in CATEGORIES
            assert len(o.attributes) == 3
            size, colour, pattern = o.attributes
            assert size in ATTRIBUTE_FAMILIES["size"]
            assert colour in ATTRIBUTE_FAMILIES["colour"]
            assert pattern in ATTRIBUTE_FAMILIES["pattern"]
    assert len(categories) >= 10
    assert set(counts) >= {3, 12}  # the whole range occurs
    assert repeated >= 100  # repeated categories are common


def test_object_count_bounds_are_respected():
    for seed in range(20):
        g = S.generate_scene(seed, min_objects=5, max_objects=6).graph
        assert 5 <= len(g.objects) <= 6


def test_attribute_palettes_repeat_within_scenes():
    repeats = 0
    for seed in SEEDS:
        colours = Counter(o.attributes[1] for o in scene(seed).graph.objects)
        assert len(colours) <= 3
        repeats += any(v > 1 for v in colours.values())
    assert repeats >= 150


def test_sizes_are_relative_to_nominal_size():
    ratios: dict[str, list[float]] = {"small": [], "medium": [], "large": []}
    for seed in range(60):
        for o in scene(seed).graph.objects:
            h = o.box[3] - o.box[1]
            ratios[o.attributes[0]].append(h / (S.NOMINAL[o.name][1] * 384))
    assert max(ratios["small"]) < min(ratios["medium"])
    assert max(ratios["medium"]) < min(ratios["large"])


def test_boxes_inside_image_and_no_overlap_except_inside():
    with_on = with_inside = 0
    for seed in SEEDS:
        g = scene(seed).graph
        rels = {(r.subject, r.predicate, r.object) for r in g.relations}
        for o in g.objects:
            x1, y1, x2, y2 = int_box(o.box)
            assert 0 <= x1 < x2 <= g.width and 0 <= y1 < y2 <= g.height
        for i, a in enumerate(g.objects):
            for b in g.objects[i + 1 :]:
                if overlap(a.box, b.box):
                    assert (a.id, "inside", b.id) in rels or (b.id, "inside", a.id) in rels
        with_on += any(p == "on" for _, p, _ in rels)
        with_inside += any(p == "inside" for _, p, _ in rels)
        assert g.relations == compute_relations(g.objects, g.width, g.height)
    assert with_on >= 20 and with_inside >= 20


def test_on_and_inside_use_the_right_categories():
    for seed in SEEDS:
        g = scene(seed).graph
        names = {o.id: o.name for o in g.objects}
        for r in g.relations:
            if r.predicate == "on":
                assert names[r.object] in SUPPORTERS
            if r.predicate == "inside":
                assert names[r.object] in CONTAINERS


def test_every_category_is_drawn_and_masks_are_tight():
    seen = set()
    for seed in SEEDS:
        sc = scene(seed)
        for o in sc.graph.objects:
            seen.add(o.name)
            mask = S._object_mask(o, sc.spec)
            x1, y1, x2, y2 = int_box(o.box)
            assert mask.shape == (y2 - y1, x2 - x1)
            for m in (mask, mask[:, ::-1]):
                assert m[0].any() and m[-1].any() and m[:, 0].any() and m[:, -1].any()
    assert seen == set(CATEGORIES)


# ---------------------------------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------------------------------


def test_render_size_and_textured_background():
    sc = scene(5)
    img = S.render(sc.graph, sc.spec)
    assert img.mode == "RGB" and img.size == (512, 384)
    empty = np.asarray(S.render(sc.graph.with_objects([], []), sc.spec)).astype(float)
    # no flat colour anywhere: every 16x16 block varies, and the whole background has many colours
    blocks = empty.reshape(24, 16, 32, 16, 3).std(axis=(1, 3)).mean(axis=-1)
    assert (blocks > 0.5).all()
    assert len(np.unique(empty.reshape(-1, 3), axis=0)) > 200


@pytest.mark.parametrize("seed", range(0, 200, 8))
def test_boxes_are_exact(seed):
    """Removing an object changes pixels inside its box only, and touches all four box edges."""
    sc = scene(seed)
    full = pixels(seed)
    for o in sc.graph.objects:
        g, spec = S.remove_object(sc.graph, sc.spec, o.id)
        assert changed_bounds(full, np.asarray(S.render(g, spec))) == int_box(o.box), o


@pytest.mark.parametrize("seed", range(0, 200, 10))
def test_mirror_renders_the_flipped_image(seed):
    sc = scene(seed)
    g, spec = S.mirror(sc.graph, sc.spec)
    assert spec["mirrored"] is True and sc.spec["mirrored"] is False
    flipped = np.asarray(S.render(g, spec))
    differ = (flipped != pixels(seed)[:, ::-1]).any(axis=-1).mean()
    assert differ <= 1e-3
    expected = sorted(
        (r.subject, MIRRORED.get(r.predicate, r.predicate), r.object) for r in sc.graph.relations
    )
    assert sorted((r.subject, r.predicate, r.object) for r in g.relations) == expected
    for a, b in zip(sc.graph.objects, g.objects, strict=True):
        assert b.box == (512 - a.box[2], a.box[1], 512 - a.box[0], a.box[3])
    g2, spec2 = S.mirror(g, spec)
    assert g2 == sc.graph and spec2 == sc.spec


def test_mirror_is_not_symmetric_content():
    # the scene itself is not mirror-symmetric, so the flip is a real change
    assert not np.array_equal(pixels(0), pixels(0)[:, ::-1])


# ---------------------------------------------------------------------------------------------------
# edits
# ---------------------------------------------------------------------------------------------------


def test_remove_object():
    sc = scene(11)
    before = repr(sc.graph), json.dumps(sc.spec)
    victim = sc.graph.objects[0]
    g, spec = S.remove_object(sc.graph, sc.spec, victim.id)
    assert (repr(sc.graph), json.dumps(sc.spec)) == before  # inputs untouched
    assert victim.id not in g.by_id() and len(g.objects) == len(sc.graph.objects) - 1
    assert all(victim.id not in (r.subject, r.object) for r in g.relations)
    assert g.relations == compute_relations(g.objects, g.width, g.height)
    assert [o for o in sc.graph.objects if o.id != victim.id] == g.objects
    with pytest.raises(KeyError):
        S.remove_object(sc.graph, sc.spec, "nope")


def test_remove_supporter_keeps_objects_on_it():
    for seed in SEEDS:
        sc = scene(seed)
        on = [r for r in sc.graph.relations if r.predicate == "on"]
        if on:
            break
    else:
        pytest.fail("no 'on' relation in any scene")
    r = on[0]
    g, _ = S.remove_object(sc.graph, sc.spec, r.object)
    assert g.by_id()[r.subject] == sc.graph.by_id()[r.subject]
    assert not any(
        x.subject == r.subject and x.predicate == "on" and x.object == r.object for x in g.relations
    )


@pytest.mark.parametrize("family", ["colour", "pattern"])
def test_set_colour_or_pattern_changes_only_the_object(family):
    checked = 0
    for seed in range(0, 40):
        sc = scene(seed)
        full = pixels(seed)
        for o in sc.graph.objects:
            current = o.attributes[S.FAMILIES.index(family)]
            if family == "pattern" and current == "plain":
                new = "checkered"
            elif family == "pattern":
                new = "plain"
            else:
                new = "blue" if current != "blue" else "red"
            g, spec = S.set_attribute(sc.graph, sc.spec, o.id, family, new)
            changed = g.by_id()[o.id]
            assert changed.box == o.box
            assert changed.attributes[S.FAMILIES.index(family)] == new
            assert g.relations == sc.graph.relations
            bounds = changed_bounds(full, np.asarray(S.render(g, spec)))
            assert bounds is not None
            x1, y1, x2, y2 = int_box(o.box)
            assert x1 <= bounds[0] and y1 <= bounds[1] and bounds[2] <= x2 and bounds[3] <= y2
            checked += 1
            break
    assert checked >= 30


def test_set_size_rescales_with_exact_box():
    checked = exact = 0
    for seed in range(0, 60, 3):
        sc = scene(seed)
        for o in sc.graph.objects[:2]:
            for new in ATTRIBUTE_FAMILIES["size"]:
                if new == o.attributes[0]:
                    continue
                g, spec = S.set_attribute(sc.graph, sc.spec, o.id, "size", new)
                n = g.by_id()[o.id]
                assert n.attributes == (new, *o.attributes[1:])
                x1, y1, x2, y2 = int_box(n.box)
                assert 0 <= x1 < x2 <= 512 and 0 <= y1 < y2 <= 384
                ratio = S.SIZE_SCALE[new] / S.SIZE_SCALE[o.attributes[0]]
                old_h = o.box[3] - o.box[1]
                if y2 - y1 < 384:  # not limited by the image
                    assert abs((y2 - y1) - old_h * ratio) <= 1.0
                if 0 < x1 and x2 < 512 and y2 == o.box[3]:  # not shifted: bottom centre kept
                    assert abs((x1 + x2) / 2 - (o.box[0] + o.box[2]) / 2) <= 0.5
                assert g.relations == compute_relations(g.objects, 512, 384)
                # exact box in the edited image: remove it again and compare. A grown object may now
                # overlap others (occluding or occluded); then only containment is checked.
                edited = np.asarray(S.render(g, spec))
                g2, spec2 = S.remove_object(g, spec, o.id)
                bounds = changed_bounds(edited, np.asarray(S.render(g2, spec2)))
                if any(overlap(n.box, m.box) for m in g.objects if m.id != o.id):
                    assert x1 <= bounds[0] and y1 <= bounds[1] and bounds[2] <= x2 and bounds[3] <= y2
                else:
                    assert bounds == (x1, y1, x2, y2)
                    exact += 1
                checked += 1
    assert checked >= 40 and exact >= 20


def test_set_attribute_rejects_bad_input():
    sc = scene(2)
    oid = sc.graph.objects[0].id
    with pytest.raises(ValueError):
        S.set_attribute(sc.graph, sc.spec, oid, "material", "wooden")
    with pytest.raises(ValueError):
        S.set_attribute(sc.graph, sc.spec, oid, "colour", "striped")
    with pytest.raises(KeyError):
        S.set_attribute(sc.graph, sc.spec, "o99", "colour", "red")


def test_edits_commute_with_mirror():
    sc = scene(13)
    oid = sc.graph.objects[-1].id
    g1, s1 = S.mirror(*S.set_attribute(sc.graph, sc.spec, oid, "pattern", "dotted"))
    g2, s2 = S.set_attribute(*S.mirror(sc.graph, sc.spec), oid, "pattern", "dotted")
    assert g1 == g2 and s1 == s2
    a = np.asarray(S.render(g1, s1))
    b = np.asarray(S.render(*S.set_attribute(sc.graph, sc.spec, oid, "pattern", "dotted")))
    assert np.array_equal(a, b[:, ::-1])

