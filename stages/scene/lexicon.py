"""The offline lexicon: categories, attribute families, relation words, plurals, articles, agreement.

Used by the synthetic source (what it can draw), by path templates (word order, articles, plurals,
"is"/"are") and by later stages (negative replacement candidates come from the same families). Number
and inflection of category names come from :mod:`refforge.stages.scene.vocabulary` (WordNet and
LemmInflect), so they hold for every name a real source brings ("shorts", "wine glasses", "people").
"""

from __future__ import annotations

from . import vocabulary

# Attribute families, in the order adjectives are spoken: "the small red striped ball".
ATTRIBUTE_FAMILIES: dict[str, tuple[str, ...]] = {
    "size": ("small", "medium", "large"),
    "colour": ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "white", "black", "gray"),
    "pattern": ("plain", "striped", "dotted", "checkered"),
    "material": ("wooden", "metal", "glass", "plastic", "paper", "fabric"),
}
FAMILY_ORDER: tuple[str, ...] = ("size", "colour", "pattern", "material")
_FAMILY_RANK: dict[str, int] = {fam: i for i, fam in enumerate(FAMILY_ORDER)}

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

def plural(noun: str) -> str:
    """English plural of a (possibly multi-word) noun phrase; the head noun is inflected and a phrase
    already plural stays as it is (:func:`refforge.stages.scene.vocabulary.plural`: WordNet and LemmInflect).

    >>> plural("box"), plural("shelf"), plural("teddy bear"), plural("strawberry"), plural("toy")
    ('boxes', 'shelves', 'teddy bears', 'strawberries', 'toys')
    >>> plural("socks"), plural("jeans"), plural("wine glass"), plural("man")
    ('socks', 'jeans', 'wine glasses', 'men')
    """
    return vocabulary.plural(noun)


def copula(noun: str) -> str:
    """"is" or "are": the present tense of *be* agreeing with the noun phrase's head.

    >>> copula("sock"), copula("socks"), copula("jeans"), copula("red shirt"), copula("people")
    ('is', 'are', 'are', 'is', 'are')
    """
    return "are" if vocabulary.is_plural(noun) else "is"


# Vowel letters that sound as a consonant ("a unicorn", "a one-way sign", "a ewe") and silent h's ("an hour").
_AN_EXCEPTIONS = ("uni", "use", "usu", "uten", "uku", "ure", "uri", "uro", "one", "once", "eu", "ewe")
_AN_SILENT_H = ("hour", "honest", "honor", "honour", "heir")


def indefinite_article(phrase: str) -> str:
    """'a' or 'an' for the phrase that follows it (by the sound of its first word).

    >>> indefinite_article("orange cup"), indefinite_article("umbrella"), indefinite_article("unicorn")
    ('an', 'an', 'a')
    >>> indefinite_article("urn"), indefinite_article("hour glass"), indefinite_article("european car")
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


def article(phrase: str, noun: str | None = None) -> str:
    """The indefinite article of a noun phrase: "a"/"an" by its first word, or "" when its head noun
    (``noun``, else the phrase's last word) is plural: "a red shirt", "an umbrella", but "blue shorts",
    never "a shorts".

    >>> article("red shirt"), article("umbrella"), article("blue shorts"), article("red pair", "jeans")
    ('a', 'an', '', '')
    """
    head = noun if noun is not None else phrase
    if vocabulary.is_plural(head):
        return ""
    return indefinite_article(phrase)


def order_attributes(attributes: tuple[str, ...] | list[str]) -> list[str]:
    """Attributes in spoken order (size, colour, pattern, material, then unknown ones as given)."""
    if len(attributes) < 2:
        return list(attributes)
    rank, family, last = _FAMILY_RANK, ATTRIBUTE_FAMILY, len(_FAMILY_RANK)
    return sorted(attributes, key=lambda a: rank.get(family.get(a, ""), last))


# ------------------------------------------------------------------------------ text negatives
# Read by ``stages/negatives.py`` (replacement candidates and verification of text negatives).

# Categories the synthetic source never draws but real scene graphs (GQA, COCO, Visual Genome) name,
# with a super-category (the same super-category names as CATEGORIES where they overlap). Replace-object
# negatives draw from CATEGORIES and these. Words that name a super-class of another entry ("person",
# "animal", "vehicle", "food") are left out on purpose: "the person" is no negative of "the man". Words
# that are also attribute values ("orange", "glass", "paper") are left out too.
NEGATIVE_CATEGORIES: dict[str, str] = {
    "man": "person", "woman": "person", "boy": "person", "girl": "person",
    "dog": "animal", "cat": "animal", "horse": "animal", "cow": "animal", "sheep": "animal",
    "bird": "animal", "elephant": "animal", "zebra": "animal", "giraffe": "animal", "bear": "animal",
    "car": "vehicle", "bus": "vehicle", "truck": "vehicle", "bicycle": "vehicle", "motorcycle": "vehicle",
    "train": "vehicle", "airplane": "vehicle", "boat": "vehicle",
    "chair": "furniture", "couch": "furniture", "bed": "furniture", "bench": "furniture", "desk": "furniture",
    "plate": "kitchenware", "fork": "kitchenware", "knife": "kitchenware", "spoon": "kitchenware",
    "mug": "kitchenware", "jar": "kitchenware",
    "pizza": "food", "banana": "food", "apple": "food", "sandwich": "food", "cake": "food", "donut": "food",
    "broccoli": "food", "carrot": "food", "bread": "food",
    "shirt": "clothing", "jacket": "clothing", "dress": "clothing", "shoe": "clothing", "coat": "clothing",
    "scarf": "clothing",
    "laptop": "electronics", "television": "electronics", "phone": "electronics", "keyboard": "electronics",
    "bag": "accessory", "backpack": "accessory", "suitcase": "accessory",
    "teddy bear": "toy", "frisbee": "toy", "doll": "toy",
    "bucket": "container", "crate": "container",
    "pen": "stationery", "pencil": "stationery", "notebook": "stationery",
    "tree": "plant", "flower": "plant", "bush": "plant",
    "building": "structure", "fence": "structure", "pole": "structure", "sign": "structure",
    "door": "structure", "window": "structure",
    "skateboard": "sports", "surfboard": "sports", "racket": "sports",
}

# The opposite of a predicate: the first choice of a replace-relation negative.
RELATION_OPPOSITES: dict[str, str] = {
    "left of": "right of",
    "right of": "left of",
    "above": "below",
    "below": "above",
    "on": "under",
    "under": "on",
    "inside": "next to",
    "behind": "in front of",
    "in front of": "behind",
    "near": "far from",
    "far from": "near",
    "holding": "wearing",
    "wearing": "holding",
    "sitting on": "standing on",
    "standing on": "sitting on",
}

# Replacement predicates for replace-relation negatives, the opposite first. Near-synonyms are never
# listed ("on" -> "above", "next to" -> "near"): a replacement must change what the expression says.
RELATION_ALTERNATIVES: dict[str, tuple[str, ...]] = {
    "left of": ("right of", "above", "below"),
    "right of": ("left of", "above", "below"),
    "above": ("below", "left of", "right of"),
    "below": ("above", "left of", "right of"),
    "on": ("under", "next to", "inside"),
    "under": ("on", "next to", "inside"),
    "inside": ("next to", "on", "under"),
    "next to": ("on", "inside", "above", "below"),
    "behind": ("in front of", "on", "under"),
    "in front of": ("behind", "on", "under"),
    "near": ("far from",),
    "far from": ("near",),
    "holding": ("wearing", "sitting on", "throwing"),
    "wearing": ("holding", "carrying"),
    "carrying": ("wearing", "riding"),
    "riding": ("carrying", "walking next to"),
    "sitting on": ("standing on", "under"),
    "standing on": ("sitting on", "under"),
    "eating": ("holding",),
    "looking at": ("behind",),
    "in": ("next to", "under"),
}

# Predicates that the graph's facts imply: a fact (x, p, y) also makes (x, q, y) true for q in
# RELATION_IMPLIES[p]. Together with INVERSE ((x, p, y) makes (y, INVERSE[p], x) true) this closes the
# graph before a text negative is accepted, so "the table under the cup" is never a negative of a
# scene whose graph says only "the cup on the table".
RELATION_IMPLIES: dict[str, tuple[str, ...]] = {
    "on": ("above",),
    "under": ("below",),
    "sitting on": ("on", "above"),
    "standing on": ("on", "above"),
    "lying on": ("on",),
    "inside": ("in",),
    "in": ("inside",),
    "next to": ("near",),
}

# Predicates that cannot hold of the same ordered pair: a fact (x, q, y) with q in
# RELATION_EXCLUSIVE[p] rules (x, p, y) out. Used on incomplete graphs, where a missing fact proves
# nothing: a replaced relation is decided only for pairs that an exclusive fact rules out.
RELATION_EXCLUSIVE: dict[str, frozenset[str]] = {
    "left of": frozenset({"right of"}),
    "right of": frozenset({"left of"}),
    "above": frozenset({"below", "under"}),
    "below": frozenset({"above", "on"}),
    "on": frozenset({"under", "below", "inside"}),
    "under": frozenset({"on", "above"}),
    "inside": frozenset({"on", "under"}),
    "next to": frozenset({"on", "inside", "under"}),
    "behind": frozenset({"in front of"}),
    "in front of": frozenset({"behind"}),
    "near": frozenset({"far from"}),
    "far from": frozenset({"near", "next to", "on", "inside", "under"}),
}
