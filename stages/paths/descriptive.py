"""Descriptive positives: a relation path enriched with one attribute per node of a relation.

Minimal paths rarely describe both ends of a relation ("the ball to the left of the box"), yet
attribute-swap negatives need exactly that ("the red ball to the left of the blue box" -> "the blue
ball to the left of the red box"). For a relation path, :func:`descriptive_variant` picks the witness
objects the relation actually goes through (the target's anchor, and for a 2-hop chain the anchor's
anchor) and adds to two consecutive nodes of the chain the value each of them has in one shared
attribute family, where the two values differ. Adding true facts about the witnesses keeps the
target matching, and adding constraints cannot make another object match, so the enriched query
still refers to exactly the target (re-checked with :func:`query.evaluate`). For a 1-hop path the
enriched pair is (target, anchor), so swaps touch the target (L1); for a 2-hop chain it is (anchor,
anchor of the anchor), so swaps touch only context objects (L2).

The expression keeps the target's level (its minimal constraint count) and is marked
``descriptive`` in its path JSON.

Two paths of one target can enrich to the same query ("the pink cup inside a basket" and "the cup
inside the green basket" both become "the pink cup inside the green basket"): :func:`descriptive_paths`
adds each enriched query once per target, and never one that is already a path of that target, so the
stage writes no sample twice (a sample_id is a hash of the target, the text and the path).
"""

from __future__ import annotations

from dataclasses import replace

from refforge.stages.scene.graph import SceneGraph
from refforge.stages.scene.keys import stable_key
from refforge.stages.scene.lexicon import ATTRIBUTE_FAMILY, FAMILY_ORDER
from refforge.stages.scene.query import Node, evaluate

from .search import ReferringPath, kind_of, render_query


def _family_value(attributes, family: str) -> str | None:
    return next((a for a in attributes if ATTRIBUTE_FAMILY.get(a) == family), None)


def _shared_family(a_attrs, b_attrs, node_a: Node, node_b: Node, seed: int) -> tuple[str, str] | None:
    """Values (for a, for b) of one family both objects have, with different values, that the nodes
    can take (a node already holding another family's attribute can take only the target's)."""
    start = int(stable_key(seed, length=4), 16) % len(FAMILY_ORDER)
    for k in range(len(FAMILY_ORDER)):
        fam = FAMILY_ORDER[(start + k) % len(FAMILY_ORDER)]
        va, vb = _family_value(a_attrs, fam), _family_value(b_attrs, fam)
        if va is None or vb is None or va == vb:
            continue
        ok_a = not node_a.attributes or va in node_a.attributes
        ok_b = not node_b.attributes or vb in node_b.attributes
        if ok_a and ok_b:
            return va, vb
    return None


def _with_attr(node: Node, value: str, keep_one: bool) -> Node:
    if value in node.attributes:
        return node
    return replace(node, attributes=(value,) if keep_one else (*node.attributes, value))


def descriptive_paths(graph: SceneGraph, paths, *, share: float, seed: int = 0) -> list[ReferringPath]:
    """The descriptive variants to add to ``paths``: for a share of the relation paths (picked by a
    hash of the target and the text, so the pick is stable), :func:`descriptive_variant`, skipping a
    variant whose query is already among the target's paths or variants."""
    if share <= 0:
        return []
    seen = {(p.target_id, p.query) for p in paths}
    out = []
    for path in paths:
        if not path.query.relations:
            continue
        pick = int(stable_key("descriptive", seed, path.target_id, path.text, length=8), 16) / 16**8
        if pick >= share:
            continue
        d = descriptive_variant(graph, path, seed=seed)
        if d is not None and (d.target_id, d.query) not in seen:
            seen.add((d.target_id, d.query))
            out.append(d)
    return out


def descriptive_variant(graph: SceneGraph, path: ReferringPath, *, seed: int = 0) -> ReferringPath | None:
    """The enriched positive of a relation path, or None when the graph offers no such pair."""
    q = path.query
    if not q.relations:
        return None
    objs = graph.by_id()
    rel = {(r.subject, r.predicate, r.object) for r in graph.relations}
    t = path.target_id
    pred, child = q.relations[0]
    anchors = [y for y in evaluate(graph, child).ids if y != t and (t, pred, y) in rel]
    if not anchors:
        return None
    y = anchors[0]
    if child.relations:  # 2-hop: enrich anchor and anchor-of-anchor
        pred2, grand = child.relations[0]
        zs = [z for z in evaluate(graph, grand).ids if z not in (y, t) and (y, pred2, z) in rel]
        if not zs:
            return None
        pair = _shared_family(objs[y].attributes, objs[zs[0]].attributes, child, grand, seed)
        if pair is None:
            return None
        new_grand = _with_attr(grand, pair[1], keep_one=True)
        new_child = replace(_with_attr(child, pair[0], keep_one=True), relations=((pred2, new_grand),))
        new = replace(q, relations=((pred, new_child), *q.relations[1:]))
    else:  # 1-hop: enrich target and anchor
        pair = _shared_family(objs[t].attributes, objs[y].attributes, q, child, seed)
        if pair is None:
            return None
        new_child = _with_attr(child, pair[1], keep_one=True)
        target = _with_attr(q, pair[0], keep_one=False)
        new = replace(target, relations=((pred, new_child), *q.relations[1:]))
    if new == q or evaluate(graph, new).unique != t:
        return None
    text, ttext, name, variant = render_query(graph, t, new, seed=seed)
    return ReferringPath(target_id=t, query=new, kind=kind_of(new), hops=new.hops, level=path.level,
                         constraint_count=new.constraint_count, text=text, template_text=ttext, template_name=name,
                         template_variant=variant, descriptive=True)
