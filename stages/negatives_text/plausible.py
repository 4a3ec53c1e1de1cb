"""Plausible hard negatives: replacement words from the build's own vocabulary, and the checks that a
verified negative is a *hard* one rather than an absurd or a possibly true one.

Vocabulary source
-----------------
:class:`BuildVocabulary` is made from the scene graphs of one unit of work, that is the images of one
shard (``build.shard_size`` images; the negatives_text stage builds it once per unit from the graphs
it reads). It holds how often each category and each attribute is named there (objects carrying it)
and which ``(family(subject), predicate, family(object))`` patterns the shard's relations show, with
:func:`refforge.stages.scene.vocabulary.family` as the coarse class (person, animal, artifact, food,
plant, ... or unknown). A shard is the unit that a resumed or re-run build recomputes identically, so
the choice stays deterministic and resumable; it is the vocabulary of the images the negatives are
about (a ski-slope shard proposes skis and poles, not lamps).

Replacement words (:class:`VocabularyBackend`)
----------------------------------------------
* a category: the shard's categories of the same family as the replaced one, not present in the image
  and not :func:`~refforge.stages.scene.vocabulary.related` to the replaced category itself,
  frequency-matched: ranked by ``round(|log2((n(w) + 1) / (n(c) + 1))|)`` (words named about as often
  as the replaced one first), ties by a stable hash of the word and the positive's seed. Then, as the
  fallback for when these run out (or fail verification), the fixed lexicon's words
  (:class:`~refforge.stages.negatives_text.edits.LexiconBackend`), those of the same family first;
* an attribute: the shard's attributes of the same kind (``lexicon.ATTRIBUTE_FAMILY``: a colour for
  a colour, a material for a material), values present in the image first (a distractor in the image
  makes the negative harder, as in FineCops-Ref), then by the same frequency rank and hash; then the
  lexicon's other values of the kind;
* a relation: the lexicon's alternatives (the opposite first), as before.

Checks (:class:`PlausibilityJudge`, applied by ``text_negatives`` to every verified candidate)
---------------------------------------------------------------------------------------------
* ``replacement_related_to_present``: a replaced category that is ``related()`` to a category present
  in the image (a synonym, hypernym or hyponym: "the person" beside a boy, "the hats" beside a hat) may
  name an object that is there, so it is no negative;
* ``implausible_relation``: every relation of the edited query whose subject, predicate or object
  changed (replace_relation, swap_object, replace_object) must be a plausible pattern:

  - directional predicates (``DIRECTIONAL``: left of, right of, above, below, next to, near, behind,
    in front of, ...) hold between any two things that have boxes: always plausible;
  - interaction predicates (``INTERACTION``: wearing, holding, riding, eating, carrying, ...) need an
    animate subject (:func:`~refforge.stages.scene.vocabulary.animate`): "the hat that is wearing the
    guy" never; and their family pattern must be seen in the shard;
  - every other predicate (on, inside, of, has, ...) needs its family pattern seen in the shard; a
    predicate the shard never uses needs the pattern of its opposite (``lexicon.RELATION_OPPOSITES``)
    with the same roles: "the vase under the table" is plausible where vases stand on tables, "the
    table under the vase" is not.

Refused candidates become ``drops`` rows of negatives_text (the category above as the reason; the
type, the text and why in the detail), so nothing is lost silently.
"""

from __future__ import annotations

import math
import zlib
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from functools import lru_cache

from refforge.stages.scene.graph import SceneGraph
from refforge.stages.scene.lexicon import ATTRIBUTE_FAMILY, RELATION_OPPOSITES
from refforge.stages.scene.vocabulary import animate, family, related

from .edits import LexiconBackend, ReplacementContext, _attribute_words, _category_words, _relation_words

__all__ = [
    "DIRECTIONAL",
    "IMPLAUSIBLE_RELATION",
    "INTERACTION",
    "RELATED_TO_PRESENT",
    "BuildVocabulary",
    "PlausibilityJudge",
    "VocabularyBackend",
]

RELATED_TO_PRESENT = "replacement_related_to_present"
IMPLAUSIBLE_RELATION = "implausible_relation"

# Spatial predicates that any two boxed things can stand in (the geometry rules' directions and their
# everyday phrasings).
DIRECTIONAL: frozenset[str] = frozenset({
    "left of", "right of", "above", "below", "next to", "near", "far from", "behind", "in front of",
    "beside", "by", "close to", "around", "across from", "opposite",
})
# Predicates that something does to something: the subject must be a person or an animal.
INTERACTION: frozenset[str] = frozenset({
    "wearing", "holding", "riding", "eating", "carrying", "throwing", "catching", "drinking", "looking at",
    "watching", "playing", "playing with", "using", "pulling", "pushing", "walking", "walking on",
    "walking next to", "walking down", "feeding", "petting", "touching", "hugging", "talking on", "reading",
    "swinging", "kicking", "hitting", "driving", "grazing on", "chewing", "biting", "licking", "walking in",
    "skiing on", "skiing in", "surfing", "surfing in", "grabbing", "cutting", "waiting for", "working on",
    "typing on", "brushing", "preparing", "serving", "selling", "talking to", "smiling at", "staring at",
})
# (postures such as "sitting on", "lying on", "leaning on" are said of things too: "the laptop sitting on
# the desk"; they are judged by the shard's patterns like "on")


def _h(word: str, salt: int) -> int:
    return zlib.crc32(word.encode(), salt)


def _bucket(n_word: int, n_ref: int) -> int:
    """Frequency distance: words named about as often as the reference share bucket 0."""
    return round(abs(math.log2((n_word + 1) / (n_ref + 1))))


class BuildVocabulary:
    """Categories, attributes and relation patterns named by a unit's scene graphs (module docstring)."""

    def __init__(self, graphs: Iterable[SceneGraph]) -> None:
        cats: Counter = Counter()
        attrs: Counter = Counter()
        preds: Counter = Counter()
        patterns: Counter = Counter()
        for g in graphs:
            names = {}
            for o in g.objects:
                cats[o.name] += 1
                names[o.id] = o.name
                for a in o.attributes:
                    attrs[a] += 1
            for r in g.relations:
                s, t = names.get(r.subject), names.get(r.object)
                if s is None or t is None or r.subject == r.object:
                    continue
                preds[r.predicate] += 1
                patterns[(family(s), r.predicate, family(t))] += 1
        self.categories: dict[str, int] = dict(cats)
        self.attributes: dict[str, int] = dict(attrs)
        self.predicates: dict[str, int] = dict(preds)
        self.patterns: dict[tuple[str, str, str], int] = dict(patterns)
        by_family: dict[str, list[str]] = {}
        for c in sorted(cats):
            by_family.setdefault(family(c), []).append(c)
        self._by_family = by_family
        by_kind: dict[str, list[str]] = {}
        for a in sorted(attrs):
            kind = ATTRIBUTE_FAMILY.get(a)
            if kind is not None:
                by_kind.setdefault(kind, []).append(a)
        self._by_kind = by_kind
        self._cat_buckets: dict[str, tuple[tuple[str, ...], ...]] = {}

    def __repr__(self) -> str:
        return (f"BuildVocabulary({len(self.categories)} categories, {len(self.attributes)} attributes, "
                f"{len(self.patterns)} relation patterns)")

    def category_buckets(self, category: str) -> tuple[tuple[str, ...], ...]:
        """The shard's categories of ``category``'s family, unrelated to it, grouped by frequency bucket
        (nearest first; each group in name order)."""
        got = self._cat_buckets.get(category)
        if got is None:
            n_ref = self.categories.get(category, 0)
            groups: dict[int, list[str]] = {}
            for w in self._by_family.get(family(category), ()):
                if w != category and not related(w, category):
                    groups.setdefault(_bucket(self.categories[w], n_ref), []).append(w)
            got = self._cat_buckets[category] = tuple(tuple(groups[b]) for b in sorted(groups))
        return got

    def attributes_of_kind(self, kind: str) -> list[str]:
        """The shard's attributes of a lexicon attribute family ("colour", "material" ...), by name."""
        return self._by_kind.get(kind, [])

    def plausible(self, subject: str, predicate: str, obj: str) -> bool:
        """Is ``(subject, predicate, object)`` a plausible relation by the module docstring's rules?"""
        if predicate in DIRECTIONAL:
            return True
        fs, fo = family(subject), family(obj)
        if predicate in INTERACTION and not animate(subject):
            return False
        if predicate in self.predicates:
            return (fs, predicate, fo) in self.patterns
        opposite = RELATION_OPPOSITES.get(predicate)
        return opposite is not None and (fs, opposite, fo) in self.patterns


class VocabularyBackend:
    """A :class:`~refforge.stages.negatives_text.edits.NegativeBackend` over a :class:`BuildVocabulary`,
    with the lexicon as the fallback (module docstring)."""

    def __init__(self, vocabulary: BuildVocabulary, fallback: LexiconBackend | None = None) -> None:
        self.vocabulary = vocabulary
        self.fallback = fallback or LexiconBackend()

    def __repr__(self) -> str:
        return f"VocabularyBackend({self.vocabulary!r})"

    def replacements_for_category(self, category: str, context: ReplacementContext) -> list[str]:
        present = context.image_categories
        salt = context.salt
        out: list[str] = []
        for group in self.vocabulary.category_buckets(category):
            words = [w for w in group if w not in present]
            words.sort(key=lambda w: _h(w, salt))
            out += words
            if len(out) >= context.limit:
                break
        seen = set(out)
        lex = [w for w in _category_words(category, present, salt, max(context.limit, 8),
                                          self.fallback.use_wordnet) if w not in seen]
        fam = family(category)
        out += [w for w in lex if family(w) == fam]
        out += [w for w in lex if family(w) != fam]
        return out

    def replacements_for_attribute(self, value: str, family_: str, context: ReplacementContext) -> list[str]:
        vocab = self.vocabulary
        present = context.image_attributes
        n_ref = vocab.attributes.get(value, 0)
        own = [a for a in vocab.attributes_of_kind(family_) if a != value]
        own.sort(key=lambda a: (a not in present, _bucket(vocab.attributes[a], n_ref), _h(a, context.salt)))
        seen = set(own)
        return own + [v for v in _attribute_words(value, family_, present, context.salt) if v not in seen]

    def replacements_for_relation(self, predicate: str, context: ReplacementContext) -> list[str]:
        return _relation_words(predicate, context.salt)


class PlausibilityJudge:
    """The checks of the module docstring, called by ``text_negatives`` for each verified candidate;
    refusals are collected (:meth:`take`) for the stage's drops rows."""

    def __init__(self, vocabulary: BuildVocabulary) -> None:
        self.vocabulary = vocabulary
        self.refusals: list[tuple[str, str, str]] = []  # (reason, negative type, detail)

    def category(self, new: str, present: Collection[str]) -> tuple[str, str] | None:
        """Why the replaced category ``new`` is no negative in an image with these categories, or None."""
        hit = _related_present(new, present if isinstance(present, frozenset) else frozenset(present))
        if hit is None:
            return None
        return RELATED_TO_PRESENT, f"'{new}' may name the '{hit}' in the image (same word, synonym, hypernym or hyponym)"

    def edges(self, edges: Sequence[tuple[str, str, str]]) -> tuple[str, str] | None:
        """Why one of these (subject, predicate, object) relations is implausible, or None."""
        plausible = self.vocabulary.plausible
        for s, p, o in edges:
            if not plausible(s, p, o):
                if p in INTERACTION and not animate(s):
                    why = f"'{p}' needs a person or an animal as its subject, not '{s}'"
                elif p in self.vocabulary.predicates or p not in RELATION_OPPOSITES:
                    why = f"no ({family(s)}, {p}, {family(o)}) relation in this shard's scene graphs"
                else:
                    why = (f"'{p}' never occurs in this shard's scene graphs, nor does ({family(s)}, "
                           f"{RELATION_OPPOSITES[p]}, {family(o)})")
                return IMPLAUSIBLE_RELATION, f"'{s} {p} {o}': {why}"
        return None

    def refused(self, text: str, negative_type: str, reason: str, detail: str) -> None:
        self.refusals.append((reason, negative_type, f"{negative_type} '{text}': {detail}"))

    def take(self) -> list[tuple[str, str, str]]:
        """The refusals since the last call, and forget them (call once per positive)."""
        out, self.refusals = self.refusals, []
        return out


@lru_cache(maxsize=65536)
def _related_present(new: str, present: frozenset[str]) -> str | None:
    for c in sorted(present):
        if related(new, c):
            return c
    return None
