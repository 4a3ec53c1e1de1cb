"""Task labels for referring expressions, by rule, in several benchmark taxonomies (configurable).

:func:`tasks_for` gives one label per taxonomy for a path (a :class:`~refforge.stages.paths.search.ReferringPath`
or a bare :class:`~refforge.stages.scene.query.Node`), e.g.
``{"refbench_pro": "position", "groundingme": "spatial/counting"}``. Keys are the taxonomy names of
:attr:`TaxonomyConfig.taxonomies` (the first is the build's *primary* taxonomy: the ``task`` column);
labels are lowercase.

Predicates fall into three classes (sets in :class:`TaxonomyConfig`): *interaction* (holding, wearing,
riding, eating ... :data:`INTERACTION_PREDICATES`), *part* (has, with, of ... :data:`PART_PREDICATES`)
and *spatial* (every other predicate: left of, on, next to, behind ...).

RefBench-PRO (``"refbench_pro"``)
---------------------------------
Source: Gao et al., "RefBench-PRO: Perceptual and Reasoning Oriented Benchmark for Referring
Expression Comprehension", arXiv:2512.06276 (abstract: two dimensions, perception and reasoning, six
progressively challenging tasks: attribute, position, interaction, commonsense, relation, reject).
Labels: ``attribute``, ``position``, ``interaction``, ``relation``, ``commonsense``, ``reject``, and
refforge's ``category`` (below). By rule, taking the most demanding dimension the expression uses
(``refbench_precedence``):

* ``reject``: every negative (``polarity="negative"``);
* ``relation``: a spatial relation anywhere in the query (relative position to other objects);
* ``interaction``: an interaction predicate anywhere in the query;
* ``position``: an absolute position or ordinal of the target (``query.Position``);
* ``attribute``: attributes (of the target or of an anchor) and part relations ("the man with a hat");
* ``category``: the bare category ("the only umbrella", level 1). RefBench-PRO has no task for it: each
  of its six tasks tests a dimension beyond naming the object, and its ``attribute`` task measures
  attribute perception, which a category-only expression never needs. Labelling such expressions
  ``attribute`` would inflate that task's accuracy, so they carry this extra label: a RefBench-PRO user
  compares per task with the paper on the six labels and keeps or drops ``category`` samples knowingly
  (the ``refbench-pro`` export writes it as the ``task_type``).
* ``commonsense`` (knowledge and function: "the thing used to cut bread") cannot be derived offline from
  a scene graph: it is **never assigned by rule**; it is a valid label for human review or for a VLM
  description backend.

GroundingME (``"groundingme"``)
-------------------------------
Source: Li et al., "GroundingME: Exposing the Visual Grounding Gap in MLLMs through Multi-Dimensional
Evaluation", arXiv:2512.17495; repository github.com/lirang04/GroundingME (README and ``evaluate.py``:
the dataset's ``subtask_l1`` column is Discriminative / Spatial / Limited / Rejection, with a
``subtask_l2`` column below it; the paper describes a 12-subtask taxonomy). The level-2 names used here
are those of the dataset's ``subtask_l2`` values as a public third-party analysis of the released data
reports them: Discriminative and Rejection: Appearance, Component, State, Text; Limited: Small,
Occlusion. For Spatial the search found only descriptions ("relationships and counting"), not the
exact strings: ``relationship`` and ``counting`` are our best reading, unverified. Labels are
``"level1/level2"`` in lowercase:

* ``rejection/<l2>`` for negatives, with ``<l2>`` the discriminative rule below applied to the negative's
  query, unless ``negative_l2`` maps the ``negative_type`` (first key contained in it wins);
* ``limited/small`` when the target box covers less than ``small_area_frac`` of the image;
* ``limited/occlusion`` when another object's box covers at least ``occlusion_frac`` of the target box
  (a box-overlap proxy: the graph has no depth, so overlap stands in for occlusion);
* ``spatial/counting`` for an ordinal (rank >= 1, or a stated count); ``spatial/relationship`` for any
  other position or any spatial relation;
* ``discriminative/<l2>``: ``component`` with a part predicate; ``state`` with an interaction predicate
  or a state attribute (:data:`STATE_ATTRIBUTES`); ``text`` with a text attribute (quoted, or
  ``text:...``); else ``appearance`` (colour, size, material ...) when the query has an attribute, and
  ``category`` for the bare category. GroundingME's Discriminative subtasks tell a target from similar
  objects by appearance, parts, state or text; a category-only expression has no similar object to tell
  it from, so (as for RefBench-PRO) it gets refforge's extra level-2 label ``category``
  (``discriminative/category``; a bare-category negative is ``rejection/category``). GroundingME's own
  evaluation groups by ``subtask_l1``, which stays ``discriminative`` / ``rejection``.

The target (for the Limited rules) is ``path.target_id``, or for a bare query the one object it refers
to (``query.evaluate``); with no single target the Limited rules are skipped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .graph import GObject, SceneGraph
from .query import Node, evaluate

__all__ = [
    "GROUNDINGME",
    "GROUNDINGME_LABELS",
    "INTERACTION_PREDICATES",
    "PART_PREDICATES",
    "REFBENCH_PRO",
    "REFBENCH_PRO_LABELS",
    "STATE_ATTRIBUTES",
    "TaxonomyConfig",
    "predicate_class",
    "tasks_for",
]

REFBENCH_PRO = "refbench_pro"
GROUNDINGME = "groundingme"

# The benchmarks' labels, then refforge's "category" for category-only expressions (module docstring).
REFBENCH_PRO_LABELS: tuple[str, ...] = ("attribute", "position", "interaction", "relation", "commonsense", "reject",
                                        "category")
GROUNDINGME_LABELS: tuple[str, ...] = (
    "discriminative/appearance", "discriminative/component", "discriminative/state", "discriminative/text",
    "spatial/relationship", "spatial/counting",
    "limited/small", "limited/occlusion",
    "rejection/appearance", "rejection/component", "rejection/state", "rejection/text",
    "discriminative/category", "rejection/category",
)

INTERACTION_PREDICATES: frozenset[str] = frozenset({
    "holding", "holds", "wearing", "wears", "riding", "rides", "eating", "eats", "drinking", "carrying",
    "carries", "playing", "playing with", "throwing", "catching", "hitting", "kicking", "swinging",
    "pulling", "pushing", "touching", "feeding", "petting", "hugging", "using", "reading", "watching",
    "looking at", "talking on", "talking to", "cutting", "chewing", "licking", "biting", "grazing on",
    "sitting on", "sitting in", "standing on", "lying on", "laying on", "walking on", "walking", "leaning on",
    "driving", "flying", "skiing on", "surfing", "sleeping on", "holding up", "waiting for", "covered by",
})
PART_PREDICATES: frozenset[str] = frozenset({"has", "have", "with", "of", "part of", "belonging to"})
STATE_ATTRIBUTES: frozenset[str] = frozenset({
    "open", "closed", "empty", "full", "standing", "sitting", "walking", "running", "lying", "parked",
    "lit", "on", "off", "broken", "wet", "dry", "smiling", "sleeping", "playing", "flying", "hanging",
    "folded", "sliced", "cut", "melted", "cooked", "raw", "dirty", "clean", "bare", "leafless", "rolled",
    "stacked", "burning", "crouching", "jumping", "swimming", "driving", "moving", "turned", "tied",
})


@dataclass(frozen=True)
class TaxonomyConfig:
    """Which taxonomies to label and the word lists and thresholds of their rules."""

    taxonomies: tuple[str, ...] = (REFBENCH_PRO, GROUNDINGME)
    interaction_predicates: frozenset[str] = INTERACTION_PREDICATES
    part_predicates: frozenset[str] = PART_PREDICATES
    state_attributes: frozenset[str] = STATE_ATTRIBUTES
    refbench_precedence: tuple[str, ...] = ("reject", "relation", "interaction", "position", "attribute", "category")
    small_area_frac: float = 0.005
    occlusion_frac: float = 0.5
    negative_l2: Mapping[str, str] = field(default_factory=dict)

    @property
    def primary(self) -> str:
        return self.taxonomies[0]


DEFAULT = TaxonomyConfig()


def predicate_class(predicate: str, config: TaxonomyConfig = DEFAULT) -> str:
    """``"interaction"``, ``"part"`` or ``"spatial"``."""
    p = predicate.strip().lower()
    if p in config.interaction_predicates:
        return "interaction"
    if p in config.part_predicates:
        return "part"
    return "spatial"


def _is_text_attribute(a: str) -> bool:
    a = a.strip()
    return (len(a) >= 2 and a[0] == a[-1] and a[0] in "\"'") or a.lower().startswith("text:")


def _features(node: Node, config: TaxonomyConfig) -> dict[str, bool]:
    f = {"spatial": False, "interaction": False, "part": False, "state": False, "text": False, "attribute": False}
    _add_features(node, config, f)
    return f


def _add_features(n: Node, config: TaxonomyConfig, f: dict[str, bool]) -> None:
    """Set the features of ``n`` and its anchors in ``f`` (a module function: a recursive closure would
    be a reference cycle per call)."""
    if n.attributes:
        f["attribute"] = True
    for a in n.attributes:
        if _is_text_attribute(a):
            f["text"] = True
        elif a.strip().lower() in config.state_attributes:
            f["state"] = True
    for p, c in n.relations:
        f[predicate_class(p, config)] = True
        _add_features(c, config, f)


def _discriminative_l2(f: Mapping[str, bool]) -> str:
    if f["part"]:
        return "component"
    if f["interaction"] or f["state"]:
        return "state"
    if f["text"]:
        return "text"
    return "appearance" if f["attribute"] else "category"


def _limited(graph: SceneGraph, target: GObject | None, config: TaxonomyConfig) -> str | None:
    if target is None:
        return None
    image_area = float(graph.width) * float(graph.height)
    if image_area > 0 and target.area / image_area < config.small_area_frac:
        return "small"
    area = target.area
    if area > 0:
        x1, y1, x2, y2 = target.box
        for o in graph.objects:
            if o.id == target.id:
                continue
            ox1, oy1, ox2, oy2 = o.box
            iw = min(x2, ox2) - max(x1, ox1)
            ih = min(y2, oy2) - max(y1, oy1)
            if iw > 0 and ih > 0 and iw * ih / area >= config.occlusion_frac:
                return "occlusion"
    return None


def _refbench(node: Node, f: Mapping[str, bool], negative: bool, config: TaxonomyConfig) -> str:
    present = {
        "reject": negative,
        "relation": f["spatial"],
        "interaction": f["interaction"],
        "position": node.position is not None,
        "attribute": f["attribute"] or f["part"],
        "category": True,
    }
    for label in config.refbench_precedence:
        if present.get(label):
            return label
    return "category"


def _groundingme(node: Node, f: Mapping[str, bool], negative: bool, negative_type: str | None,
                 graph: SceneGraph, target: GObject | None, config: TaxonomyConfig) -> str:
    if negative:
        if negative_type:
            for key, l2 in config.negative_l2.items():
                if key in negative_type:
                    return f"rejection/{l2}"
        return f"rejection/{_discriminative_l2(f)}"
    lim = _limited(graph, target, config)
    if lim is not None:
        return f"limited/{lim}"
    pos = node.position
    if pos is not None:
        if pos.kind == "order" and (pos.rank or pos.count is not None):
            return "spatial/counting"
        return "spatial/relationship"
    if f["spatial"]:
        return "spatial/relationship"
    return f"discriminative/{_discriminative_l2(f)}"


def tasks_for(
    path_or_query,
    graph: SceneGraph,
    polarity: str = "positive",
    negative_type: str | None = None,
    *,
    config: TaxonomyConfig = DEFAULT,
) -> dict[str, str]:
    """One task label per taxonomy of ``config`` (see the module docstring for the rules).

    ``path_or_query`` is a ReferringPath (anything with ``.query`` and ``.target_id``) or a Node.
    """
    if polarity not in ("positive", "negative"):
        raise ValueError(f"polarity must be 'positive' or 'negative' (got {polarity!r})")
    node: Node = getattr(path_or_query, "query", path_or_query)
    negative = polarity == "negative"
    target: GObject | None = None
    if not negative:
        tid = getattr(path_or_query, "target_id", None)
        if tid is None:
            tid = evaluate(graph, node).unique
        if tid is not None:
            target = next((o for o in graph.objects if o.id == tid), None)
    f = _features(node, config)
    out: dict[str, str] = {}
    for name in config.taxonomies:
        if name == REFBENCH_PRO:
            out[name] = _refbench(node, f, negative, config)
        elif name == GROUNDINGME:
            out[name] = _groundingme(node, f, negative, negative_type, graph, target, config)
        else:
            raise ValueError(f"unknown taxonomy {name!r} (known: {REFBENCH_PRO}, {GROUNDINGME})")
    return out
