"""Image edits on the scene graph: which object to edit, how, and whether the edit makes a negative.

An edit changes one object of an image: ``remove`` it, ``replace_category`` (it becomes another
category in the same place) or ``change_attribute`` (one of its attribute values becomes another of
the same family). The object is a positive's target (level ``L1``) or a context object of its path:
an anchor the target is related to (level ``L2``). The edit is first made on the scene graph
(:func:`edited_graph`); the positive's path is then evaluated on the edited graph and the edit is a
negative only when the path refers to nothing there and nothing is ambiguous (:func:`verify`). Only
then are pixels made (by re-rendering a synthetic scene, or by an inpainting backend).

Edits are planned per image (:func:`plan_image`): each positive proposes its edits in a seeded order
(kinds and levels taken in turn, so every kind appears), an edit already planned for the image is
shared (one edited image serves every positive it negates), and at most ``per_image`` edits are made.
Every positive the edit negates at level L1 or L2 becomes a negative of that edit, provided its path
says what the edit changed (an attribute edit counts only for paths that name the attribute at the
edited object); a positive the edit leaves referring to something, or referring ambiguously, is not.

Replacement words come from the unit's own vocabulary (the build's categories and attributes, the
fixed lexicon as the fallback: :class:`~refforge.stages.negatives_text.plausible.VocabularyBackend`)
or from the LLM backend of negatives_text where configured. A replaced category must not be a
possible name of the object it replaces (:func:`~refforge.stages.scene.vocabulary.related`), so the
verification cannot be fooled by a synonym.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from refforge.stages.ingest import synthetic as syn
from refforge.stages.negatives_text.edits import ReplacementContext
from refforge.stages.scene.graph import GObject, GRelation, SceneGraph
from refforge.stages.scene.lexicon import ATTRIBUTE_FAMILY
from refforge.stages.scene.query import Node, evaluate
from refforge.stages.scene.vocabulary import related

EDIT_KINDS: tuple[str, ...] = ("remove", "replace_category", "change_attribute")
LEVELS: tuple[str, ...] = ("L1", "L2")
NEGATIVE_TYPES: dict[str, str] = {"remove": "inpaint_remove", "replace_category": "inpaint_object",
                                  "change_attribute": "inpaint_attribute"}
"""Edit kind -> the negative_type of its negatives."""


@dataclass(frozen=True)
class ImageEdit:
    """One planned edit of one image, verified on the scene graph for at least one positive."""

    kind: str
    object_id: str
    word: str | None = None          # replace_category: the new category; change_attribute: the new value
    attribute: str | None = None     # change_attribute: the value it replaces
    family: str | None = None        # change_attribute: the attribute family

    @property
    def key(self) -> str:
        return "|".join((self.kind, self.object_id, self.word or "", self.attribute or ""))

    def describe(self, graph: SceneGraph) -> str:
        obj = graph.by_id()[self.object_id]
        if self.kind == "remove":
            return f"remove the {obj.name} {self.object_id}"
        if self.kind == "replace_category":
            return f"the {obj.name} {self.object_id} becomes a {self.word}"
        return f"the {self.attribute} {obj.name} {self.object_id} becomes {self.word}"

    def prompt(self, graph: SceneGraph) -> tuple[str, str | None]:
        """(prompt, negative prompt) for an inpainting model: what the masked area should show."""
        obj = graph.by_id()[self.object_id]
        if self.kind == "remove":
            return "background, empty", obj.name
        if self.kind == "replace_category":
            return f"a {self.word}", obj.name
        kept = [a for a in obj.attributes if a != self.attribute and ATTRIBUTE_FAMILY.get(a) != self.family]
        return " ".join(["a", self.word or "", *kept, obj.name]).replace("  ", " "), self.attribute


@dataclass
class Negation:
    """A positive the edit turns into a negative."""

    positive: dict[str, Any]
    query: Node
    level: str


@dataclass
class PlannedEdit:
    edit: ImageEdit
    graph: SceneGraph                  # the edited scene graph
    spec: dict | None                  # the edited synthetic spec (None for real images)
    negations: list[Negation]


def anchors(graph: SceneGraph, query: Node, target_id: str) -> list[str]:
    """The context objects of a path: for each relation ``(predicate, child)`` of the target's node, the
    object matching ``child`` that the target has that relation to, when there is exactly one."""
    rel = {(r.subject, r.predicate, r.object) for r in graph.relations}
    out: list[str] = []
    for predicate, child in query.relations:
        ids = [i for i in evaluate(graph, child).ids if (target_id, predicate, i) in rel]
        if len(ids) == 1 and ids[0] != target_id and ids[0] not in out:
            out.append(ids[0])
    return out


def node_of(query: Node, graph: SceneGraph, target_id: str, object_id: str) -> Node | None:
    """The path node that names ``object_id`` (the target's node, or the child of a relation whose
    single anchor it is)."""
    if object_id == target_id:
        return query
    rel = {(r.subject, r.predicate, r.object) for r in graph.relations}
    for predicate, child in query.relations:
        ids = [i for i in evaluate(graph, child).ids if (target_id, predicate, i) in rel]
        if ids == [object_id]:
            return child
    return None


def names_the_change(query: Node, graph: SceneGraph, target_id: str, edit: ImageEdit) -> bool:
    """Whether the path says what the edit changed, so the negative's type tells the truth: an attribute
    edit counts only for a path whose node of the edited object names that attribute (a path that never
    says "large" is not an attribute negative when a resize happens to break one of its relations)."""
    if edit.kind != "change_attribute":
        return True
    node = node_of(query, graph, target_id, edit.object_id)
    return node is not None and edit.attribute in node.attributes


def real_edit(graph: SceneGraph, edit: ImageEdit) -> SceneGraph:
    """The annotated graph after an edit of a real image: a removed object leaves with its relations;
    a replaced category or attribute changes the object's name or attributes, nothing else."""
    if edit.kind == "remove":
        objects = [o for o in graph.objects if o.id != edit.object_id]
        rels = [r for r in graph.relations if edit.object_id not in (r.subject, r.object)]
        return graph.with_objects(objects, rels)
    objects = []
    for o in graph.objects:
        if o.id == edit.object_id:
            if edit.kind == "replace_category":
                o = replace(o, name=edit.word or o.name)
            else:
                attrs = tuple(dict.fromkeys(edit.word if a == edit.attribute else a for a in o.attributes))
                o = replace(o, attributes=attrs)
        objects.append(o)
    return graph.with_objects(objects, [GRelation(r.subject, r.predicate, r.object) for r in graph.relations])


def synthetic_edit(graph: SceneGraph, spec: dict, edit: ImageEdit) -> tuple[SceneGraph, dict]:
    """The synthetic scene after an edit (relations recomputed by geometry, boxes exact)."""
    if edit.kind == "remove":
        return syn.remove_object(graph, spec, edit.object_id)
    if edit.kind == "replace_category":
        return syn.set_category(graph, spec, edit.object_id, edit.word or "")
    return syn.set_attribute(graph, spec, edit.object_id, edit.family or "", edit.word or "")


def verify(edited: SceneGraph, query: Node) -> str | None:
    """None when the path refers to nothing on the edited graph; else why not (a drop reason)."""
    res = evaluate(edited, query)
    if res.ambiguous:
        return "ambiguous_after_edit"
    if res.ids:
        return "still_refers_after_edit"
    return None


def _h(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(json.dumps(parts, default=str).encode()).digest()[:8], "big")


@dataclass
class Planner:
    """Plans the edits of one image (module docstring).

    ``supports(kind, family)``: whether the pixel backend can make an edit; ``drawable(category)``:
    whether a replacement category can be drawn (the synthetic renderer's categories; always true for
    models); ``backend``: replacement words (a negatives_text NegativeBackend)."""

    kinds: Sequence[str]
    levels: Sequence[str]
    per_image: int
    backend: Any
    supports: Callable[[str, str | None], bool]
    drawable: Callable[[str], bool]
    seed: int
    spec_edit: Callable[[SceneGraph, ImageEdit], tuple[SceneGraph, dict | None]]
    min_area_frac: float = 0.002

    def proposals(self, graph: SceneGraph, query: Node, target_id: str, salt: int) -> list[tuple[ImageEdit, str]]:
        """The edits one positive proposes, (edit, level), in its seeded order of kinds and levels."""
        objects = graph.by_id()
        targets: list[tuple[str, str]] = []
        if "L1" in self.levels and target_id in objects:
            targets.append((target_id, "L1"))
        if "L2" in self.levels:
            targets += [(a, "L2") for a in anchors(graph, query, target_id)]
        cats = frozenset(o.name for o in graph.objects)
        attrs = frozenset(a for o in graph.objects for a in o.attributes)
        area = float(graph.width * graph.height) or 1.0
        out: list[tuple[ImageEdit, str]] = []
        for kind in self.kinds:
            for object_id, level in targets:
                obj = objects[object_id]
                if obj.area / area < self.min_area_frac:
                    continue
                node = node_of(query, graph, target_id, object_id)
                ctx = ReplacementContext(node=1 if level == "L1" else 2, category=obj.name, image_categories=cats,
                                         image_attributes=attrs, salt=salt, limit=4)
                edit = self._edit(kind, obj, node, ctx)
                if edit is not None:
                    out.append((edit, level))
        out.sort(key=lambda el: _h(self.seed, salt, el[0].kind, el[1]) % 997 + 1000 * (el[1] == "L2"))
        # kinds in turn: the first proposal of each kind before the second of any
        by_kind: dict[str, list[tuple[ImageEdit, str]]] = {}
        for e in out:
            by_kind.setdefault(e[0].kind, []).append(e)
        order = sorted(by_kind, key=lambda k: _h(self.seed, salt, k))
        mixed: list[tuple[ImageEdit, str]] = []
        while any(by_kind.values()):
            for k in order:
                if by_kind[k]:
                    mixed.append(by_kind[k].pop(0))
        return mixed

    def _edit(self, kind: str, obj: GObject, node: Node | None, ctx: ReplacementContext) -> ImageEdit | None:
        if kind == "remove":
            return ImageEdit("remove", obj.id) if self.supports("remove", None) else None
        if kind == "replace_category":
            if not self.supports("replace_category", None):
                return None
            for w in self.backend.replacements_for_category(obj.name, ctx):
                if w != obj.name and not related(w, obj.name) and self.drawable(w):
                    return ImageEdit("replace_category", obj.id, word=w)
            return None
        # change_attribute: an attribute the path names at this node (else the path still matches)
        named = [a for a in (node.attributes if node is not None else ()) if a in obj.attributes]
        for value in named:
            fam = ATTRIBUTE_FAMILY.get(value)
            if fam is None or not self.supports("change_attribute", fam):
                continue
            for w in self.backend.replacements_for_attribute(value, fam, ctx):
                if w != value and ATTRIBUTE_FAMILY.get(w) == fam:
                    return ImageEdit("change_attribute", obj.id, word=w, attribute=value, family=fam)
        return None

    def plan_image(self, graph: SceneGraph, positives: Iterable[tuple[dict[str, Any], Node]]
                   ) -> tuple[list[PlannedEdit], list[tuple[str, str, str]]]:
        """The image's edits with the positives each negates, and (sample_id, reason, detail) of the
        proposals that did not verify."""
        positives = list(positives)
        planned: dict[str, PlannedEdit] = {}
        refused: list[tuple[str, str, str]] = []
        made: dict[str, tuple[SceneGraph, dict | None]] = {}
        for pos, query in positives:
            if len(planned) >= self.per_image:
                break
            salt = _h(self.seed, pos["sample_id"])
            for edit, _level in self.proposals(graph, query, pos["target_object_id"], salt):
                if edit.key not in made:
                    made[edit.key] = self.spec_edit(graph, edit)
                edited, spec = made[edit.key]
                why = verify(edited, query)
                if why is not None:
                    refused.append((pos["sample_id"], why, edit.describe(graph)))
                    continue
                planned.setdefault(edit.key, PlannedEdit(edit, edited, spec, []))
                break  # one edit per positive; an edit planned already serves it
        # every positive of the image an edit negates through its target (L1) or an anchor (L2)
        for p in planned.values():
            for pos, query in positives:
                target = pos["target_object_id"]
                if p.edit.object_id == target:
                    level = "L1"
                elif p.edit.object_id in anchors(graph, query, target):
                    level = "L2"
                else:
                    continue
                if level not in self.levels or not names_the_change(query, graph, target, p.edit):
                    continue
                if verify(p.graph, query) is None:
                    p.negations.append(Negation(pos, query, level))
        return list(planned.values()), refused


__all__ = ["EDIT_KINDS", "LEVELS", "NEGATIVE_TYPES", "ImageEdit", "Negation", "PlannedEdit", "Planner", "anchors",
           "names_the_change", "node_of", "real_edit", "synthetic_edit", "verify"]
