"""In-memory scene graphs: the shape every stage reasons over.

A scene graph is the pure-Python view of one image's rows in the ``objects`` and ``relations``
tables. Stages take and return these; storage converts them to and from Parquet rows.
Object ids inside a graph are local strings (``"o0"``, ``"o1"`` ... for synthetic scenes, the source's
own ids for GQA/COCO); the tables store them as given, scoped by ``image_id``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

Box = tuple[float, float, float, float]


@dataclass(frozen=True, slots=True)
class GObject:
    id: str
    name: str
    box: Box
    attributes: tuple[str, ...] = ()
    origin: str = "scene_graph"
    score: float | None = None

    @property
    def area(self) -> float:
        x1, y1, x2, y2 = self.box
        return max(0.0, x2 - x1) * max(0.0, y2 - y1)

    @property
    def center(self) -> tuple[float, float]:
        x1, y1, x2, y2 = self.box
        return (x1 + x2) / 2.0, (y1 + y2) / 2.0


@dataclass(frozen=True, slots=True)
class GRelation:
    subject: str
    predicate: str
    object: str


@dataclass
class SceneGraph:
    width: int
    height: int
    objects: list[GObject] = field(default_factory=list)
    relations: list[GRelation] = field(default_factory=list)

    def by_id(self) -> dict[str, GObject]:
        return {o.id: o for o in self.objects}

    def out_relations(self) -> dict[str, list[GRelation]]:
        """subject id -> its relations, in graph order."""
        out: dict[str, list[GRelation]] = {o.id: [] for o in self.objects}
        for r in self.relations:
            out.setdefault(r.subject, []).append(r)
        return out

    def with_objects(self, objects: Iterable[GObject], relations: Iterable[GRelation]) -> SceneGraph:
        return SceneGraph(self.width, self.height, list(objects), list(relations))
