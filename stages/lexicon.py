"""The offline lexicon: categories, attribute families, relation words, plurals and articles.

Used by the synthetic source (what it can draw), by path templates (word order, articles, plurals)
and by later stages (negative replacement candidates come from the same families).
"""

from __future__ import annotations

# Attribute families, in the order adjectives are spoken: "the small red striped ball".
ATTRIBUTE_FAMILIES: dict[str, tuple[str, ...]] = {
    "size": ("small", "medium", "large"),
    "colour": ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "white", "black", "gray"),
    "pattern": ("plain", "striped", "dotted", "checkered"),
    "material": ("wooden", "metal", "glass", "plastic", "paper", "fabric"),
}
FAMILY_ORDER: tuple[str, ...] = ("size", "colour", "pattern", "material")

ATTRIBUTE_FAMILY: dict[str, str] = {a: fam for fam, values in ATTRIBUTE_FAMILIES.items() for a in values}

# Category -> super-category. The synthetic source draws every category listed here.
CATEGORIES: dict[str, str] = {
    "ball": "toy",
    "kite": "toy",
    "star": "toy",
    "cup": "kitchenware",
    "bottle": "kitchenware",
    "vase": "kitchenware",
    "bowl": "container",
    "basket": "container",
    "box": "container",
    "book": "stationery",
    "lamp": "furniture",
    "table": "furniture",
    "shelf": "furniture",
    "plant": "plant",
    "hat": "clothing",
    "umbrella": "accessory",
}

# Categories that other objects can rest on, and those that can hold objects inside them.
SUPPORTERS: frozenset[str] = frozenset({"table", "shelf"})
CONTAINERS: frozenset[str] = frozenset({"basket", "box", "bowl"})

# Relation phrases as they read in an expression, and their geometric inverse.
RELATIONS: dict[str, str] = {
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "above",
    "below": "below",
    "next to": "next to",
    "on": "on",
    "inside": "inside",
    "under": "under",
}
INVERSE: dict[str, str] = {
    "left of": "right of",
    "right of": "left of",
    "above": "below",
    "below": "above",
    "next to": "next to",
    "on": "under",
    "under": "on",
}
HORIZONTAL: frozenset[str] = frozenset({"left of", "right of"})
MIRRORED: dict[str, str] = {"left of": "right of", "right of": "left of"}

_IRREGULAR_PLURALS = {
    "person": "people",
    "man": "men",
    "woman": "women",
    "child": "children",
    "foot": "feet",
    "tooth": "teeth",
    "mouse": "mice",
    "shelf": "shelves",
    "knife": "knives",
    "leaf": "leaves",
    "sheep": "sheep",
    "fish": "fish",
    "glasses": "glasses",
    "pants": "pants",
    "jeans": "jeans",
    "scissors": "scissors",
}


def plural(noun: str) -> str:
    """English plural of a (possibly multi-word) noun phrase; the last word is inflected.

    >>> plural("box"), plural("shelf"), plural("teddy bear"), plural("strawberry"), plural("toy")
    ('boxes', 'shelves', 'teddy bears', 'strawberries', 'toys')
    """
    head, _, last = noun.rpartition(" ")
    prefix = head + " " if head else ""
    low = last.lower()
    if low in _IRREGULAR_PLURALS:
        return prefix + _IRREGULAR_PLURALS[low]
    if low.endswith(("s", "x", "z", "ch", "sh")):
        return prefix + last + "es"
    if low.endswith("y") and len(low) > 1 and low[-2] not in "aeiou":
        return prefix + last[:-1] + "ies"
    return prefix + last + "s"


_AN_EXCEPTIONS = ("uni", "use", "usu", "one", "eu", "ur")
_AN_SILENT_H = ("hour", "honest", "honor", "heir")


def indefinite_article(phrase: str) -> str:
    """'a' or 'an' for the phrase that follows it.

    >>> indefinite_article("orange cup"), indefinite_article("umbrella"), indefinite_article("unicorn")
    ('an', 'an', 'a')
    """
    w = phrase.strip().lower()
    if not w:
        return "a"
    if w.startswith(_AN_SILENT_H):
        return "an"
    if w.startswith(_AN_EXCEPTIONS):
        return "a"
    return "an" if w[0] in "aeiou" else "a"


def order_attributes(attributes: tuple[str, ...] | list[str]) -> list[str]:
    """Attributes in spoken order (size, colour, pattern, material, then unknown ones as given)."""
    rank = {fam: i for i, fam in enumerate(FAMILY_ORDER)}
    return sorted(attributes, key=lambda a: rank.get(ATTRIBUTE_FAMILY.get(a, ""), len(rank)))
