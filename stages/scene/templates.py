"""Prompt and expression templates: loading, hashing and slot-aware rendering.

Templates are Jinja2 files shipped as package data under ``prompts/`` (the ``refforge.prompts``
package) and are read through :mod:`importlib.resources`, so they work from a wheel or a zip as
well as from an editable checkout. Names are ``/``-separated paths relative to ``prompts/``, e.g.
``"paths/hop1_relations.j2"``.

The environment uses ``StrictUndefined`` (a missing variable is an error, never an empty string),
``trim_blocks`` and ``lstrip_blocks``, and no autoescaping (the output is plain text, not HTML).

Filters registered on the environment:

``plural``     English plural of a noun phrase, head noun inflected: ``"shelf"|plural`` -> ``shelves``; a
               phrase already plural stays (``"socks"|plural`` -> ``socks``).
``article``    the phrase prefixed with its indefinite article: ``"orange cup"|article`` -> ``an orange cup``;
               none before a plural noun (``"blue shorts"|article`` -> ``blue shorts``).
``another``    "another" before the phrase, "other" before a plural one (``"jeans"|another`` -> ``other jeans``).
``be``         "is" or "are" agreeing with a noun phrase (``"socks"|be`` -> ``are``).
``and_join``   a list joined as English prose: ``["small", "red"]|and_join`` -> ``small and red``;
               three or more items use commas: ``small, red and striped``.

Slots, ``template_text`` and fast filling
-----------------------------------------
Expression templates (``prompts/paths/*.j2``) are not rendered once per expression: that costs
tens of microseconds in Jinja. Instead :func:`compile_expression` renders a template once with
:class:`Slot` values, strings whose text is a placeholder such as ``{O}`` or ``{A1} {O}`` (names as
:func:`refforge.stages.scene.query.slots_of` gives them: ``O``, ``A1``, ``O2``, ``O2_A1``, ``R1`` ..., each with
an optional ``_PL`` plural suffix), and the
result (a :class:`CompiledExpression`) is filled with words many times by plain string joins.
The filters are slot-aware: ``plural`` turns the last placeholder ``{O}`` into ``{O_PL}`` (filled
with ``plural(word)``), and ``article`` emits a marker resolved at fill time to "a"/"an" for the
word of the placeholder that follows, so ``{{ r.O | article }}`` fills to ``an umbrella`` and
appears as ``an {O2}`` in the filled ``template_text``. :func:`fill_template` substitutes words back
into a filled ``template_text`` and agrees its function words with them: a ``template_text`` always
spells the singular forms ("a"/"an", "another", "that is"), and the text says "blue shorts", "other
jeans", "the socks that are blue" when the word in the slot is plural (see :func:`fill_template`).
Slot renderings of ``another`` and ``be`` are the literal singular words, agreed at fill time.

Rules for template authors, so that one slot rendering is valid for every choice of words:

* apply ``plural``/``article``/``another``/``be``/``and_join`` directly to slot variables (``O``, ``np``, ``adj``,
  ``attrs``, ``r.O``, ``r.np``), never to a string built with ``~``: concatenation drops the slot type;
  ``article`` must be applied to a value that starts with a placeholder;
* branch only on the booleans, numbers and literal strings the caller passes (``variant``,
  ``r.det``, ``pos.kind``, ``pos.rank``, the length of ``attrs``), never on the words themselves;
* write literal text in lowercase (filled text is lowercased anyway);
* write "a"/"an", "another" and "is"/"are" about a slot only through the filters, and put a relative
  clause's ``be`` right after its subject's category slot ("{O} that is ...").

The same templates also render directly with plain words via ``load_template(name).render(...)``
(the filters then act on the words); the tests check both ways agree.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from functools import cache, lru_cache
from importlib import resources
from importlib.resources.abc import Traversable

import jinja2
from jinja2 import StrictUndefined, nodes

from refforge.stages.scene.lexicon import article, copula, indefinite_article, plural
from refforge.stages.scene.vocabulary import is_plural

PROMPTS_PACKAGE = "refforge.prompts"

__all__ = [
    "PROMPTS_PACKAGE",
    "ARTICLE_MARK",
    "CompiledExpression",
    "Slot",
    "all_template_hashes",
    "compile_expression",
    "environment",
    "fill_template",
    "slot_word",
    "load_template",
    "template_hash",
    "template_names",
    "template_source",
    "template_variants",
]


# --------------------------------------------------------------------------------------------- slots


class Slot(str):
    """A placeholder value (``"{O2}"``, or a phrase of placeholders such as ``"{A1} {O}"``).

    Rendering a template with slots in place of words gives its ``template_text``; the filters
    keep slots symbolic (``plural`` -> ``{O2_PL}``, ``article`` -> an article marker resolved when
    words are filled in), so one rendering serves every choice of words (:func:`compile_expression`).
    """

    __slots__ = ()


# Emitted by ``article`` in front of a slot: "the indefinite article of the next placeholder's word".
ARTICLE_MARK = "\x1a"

# Placeholder names: O, A1, O2, O2_A1, R1 ... (query.slots_of), each optionally with the _PL suffix.
_NAME = r"[A-Z][A-Z0-9]*(?:_A[0-9]+)?"
_PLACEHOLDER_RE = re.compile(r"\{(" + _NAME + r"(?:_PL)?)\}")
_LAST_PLACEHOLDER_RE = re.compile(r"\{(" + _NAME + r")\}$")
_TOKEN_RE = re.compile("(" + ARTICLE_MARK + r")?\{(" + _NAME + r")(_PL)?\}")


def _plural_filter(value: str) -> str:
    if isinstance(value, Slot):
        return Slot(_LAST_PLACEHOLDER_RE.sub(r"{\1_PL}", value))
    return plural(value) if value else value


def _article_filter(value: str) -> str:
    if isinstance(value, Slot):
        return Slot(ARTICLE_MARK + value)
    a = article(value)
    return f"{a} {value}" if a else value


def _another_filter(value: str) -> str:
    if isinstance(value, Slot):
        return Slot("another " + value)  # fill_template agrees it ("other" before a plural noun)
    return ("other " if copula(value) == "are" else "another ") + value


def _be_filter(value: str) -> str:
    if isinstance(value, Slot):
        return "is"  # fill_template agrees it with the category word right before it
    return copula(value)


def _and_join_filter(values: Iterable[str]) -> str:
    items = list(values)
    words = [str(v) for v in items]
    if len(words) <= 1:
        text = "".join(words)
    else:
        text = ", ".join(words[:-1]) + " and " + words[-1]
    return Slot(text) if items and all(isinstance(v, Slot) for v in items) else text


def _lower_outside_placeholders(text: str) -> str:
    out = []
    pos = 0
    for m in _PLACEHOLDER_RE.finditer(text):
        out.append(text[pos : m.start()].lower())
        out.append(m.group(0))
        pos = m.end()
    out.append(text[pos:].lower())
    return "".join(out)


class CompiledExpression:
    """A template rendered once with slots, filled with words many times (no Jinja per fill).

    ``raw`` is the slot rendering (lowercased outside placeholders, whitespace collapsed) and may
    hold :data:`ARTICLE_MARK`; :meth:`fill` resolves the marks for the given words and returns
    both the expression and its ``template_text``.
    """

    __slots__ = ("raw", "_ops", "_tail")

    def __init__(self, rendered: str) -> None:
        raw = _lower_outside_placeholders(" ".join(rendered.split()))
        ops = []
        pos = 0
        for m in _TOKEN_RE.finditer(raw):
            ops.append((raw[pos : m.start()], m.group(2), bool(m.group(3)), bool(m.group(1))))
            pos = m.end()
        if ARTICLE_MARK in raw[pos:] or any(ARTICLE_MARK in op[0] for op in ops):
            raise ValueError(f"'article' applied to something that does not start with a slot: {raw!r}")
        self.raw = raw
        self._ops = tuple(ops)
        self._tail = raw[pos:]

    def placeholders(self) -> list[str]:
        return [name + ("_PL" if pl else "") for _, name, pl, _ in self._ops]

    def fill(self, values: Mapping[str, str]) -> tuple[str, str]:
        """(text, template_text) for ``values`` (placeholder name without braces -> word).

        ``template_text`` spells the singular forms ("a"/"an" by the word that follows, "another",
        "that is"); the text agrees them with the words (:func:`fill_template`)."""
        ttext = []
        for lit, name, pl, art in self._ops:
            if art:
                lit += indefinite_article(values[name]) + " "
            ttext.append(lit)
            ttext.append("{" + name + ("_PL}" if pl else "}"))
        ttext.append(self._tail)
        template_text = "".join(ttext)
        return fill_template(template_text, values), template_text


def compile_expression(name: str, context: Mapping[str, object]) -> CompiledExpression:
    """Render template ``name`` once with ``context`` (slot values in place of words)."""
    return CompiledExpression(load_template(name).render(context))


def slot_word(values: Mapping[str, str], name: str) -> str:
    """The word for placeholder ``name``: its value, or for ``X_PL`` the plural of ``X``'s value;
    ``KeyError(name)`` when neither is given."""
    w = values.get(name)
    if w is None:
        if name.endswith("_PL") and name[:-3] in values:
            return plural(values[name[:-3]])
        raise KeyError(name)
    return w


def fill_template(template_text: str, values: Mapping[str, str]) -> str:
    """Substitute words into a filled ``template_text`` (``{O}``, ``{A1}``, ``{O2}``, ``{O2_PL}`` ...).

    ``values`` maps placeholder names without braces (``"O"``, ``"A1"``) to words; a missing
    ``X_PL`` is derived as ``plural(values["X"])``. Raises ``KeyError`` for a placeholder with no value.
    The function words of ``template_text`` are its singular forms; they agree with the words filled in,
    so swapping ``{O2}`` from "umbrella" to "box" or "shorts" stays grammatical:

    * "a"/"an" directly before a run of placeholders (``a {O2_A1} {O2}``) is recomputed for the run's
      first word, and dropped when the run's noun (its first category placeholder ``O``, ``O2`` ..., else
      its last) is plural: "wearing blue shorts", never "a blue shorts";
    * "another" before such a run becomes "other" when its noun is plural;
    * "that is" / "which is" right after a category placeholder becomes "that are" / "which are" when
      that word is plural (always after ``{X_PL}``): "the socks that are blue".
    """
    names, plan, tail = _fill_plan(template_text)
    words = [slot_word(values, name) for name in names]
    out = []
    for k, (lit, lit_are, det, noun) in enumerate(plan):
        if lit_are is not None and _plural_word(names[k - 1], words[k - 1]):
            lit = lit_are
        out.append(lit)
        if det is not None:
            many = _plural_word(names[noun], words[noun])
            if det in ("another", "Another"):
                a = ("O" if det[0] == "A" else "o") + "ther" if many else det
            else:
                a = "" if many else indefinite_article(words[k])
                if a and det[0] == "A":
                    a = a.capitalize()
            if a:
                out.append(a + " ")
        out.append(words[k])
    lit, lit_are = tail
    if lit_are is not None and names and _plural_word(names[-1], words[-1]):
        lit = lit_are
    out.append(lit)
    return "".join(out)


_CATEGORY_RE = re.compile(r"O[0-9]*(?:_PL)?$")
_DET_END_RE = re.compile(r"(?<![\w-])([Aa]nother|[Aa]n?) $")
_COPULA_START_RE = re.compile(r"^ (that|which) is\b")


def _plural_word(name: str, word: str) -> bool:
    """Is the word of placeholder ``name`` grammatically plural (``X_PL`` always is)?"""
    return name.endswith("_PL") or is_plural(word)


@lru_cache(maxsize=1 << 14)
def _fill_plan(template_text: str) -> tuple[tuple[str, ...], tuple, tuple[str, str | None]]:
    """(placeholder names, per placeholder (literal before it, that literal with "is" -> "are" when it
    follows a category placeholder else None, determiner before it or None, index of the run's noun),
    (tail, tail with "are" or None)) of a template_text; cached per text."""
    matches = list(_PLACEHOLDER_RE.finditer(template_text))
    names = tuple(m.group(1) for m in matches)
    lits = []
    pos = 0
    for m in matches:
        lits.append(template_text[pos : m.start()])
        pos = m.end()
    tail = template_text[pos:]

    def agreeing(k: int, lit: str) -> str | None:
        """``lit`` with "that are" when it follows category placeholder ``k - 1`` (None if no such site)."""
        if k == 0 or not _CATEGORY_RE.match(names[k - 1]):
            return None
        m = _COPULA_START_RE.match(lit)
        return None if m is None else " " + m.group(1) + " are" + lit[m.end():]

    plan = []
    for k, lit in enumerate(lits):
        lit_are = agreeing(k, lit)
        det = None
        noun = k
        m = _DET_END_RE.search(lit)
        if m is not None:
            det = m.group(1)
            lit = lit[: m.start()]
            if lit_are is not None:
                lit_are = lit_are[: len(lit_are) - (len(lits[k]) - m.start())]
            run = [k]
            while run[-1] + 1 < len(names) and lits[run[-1] + 1] == " ":
                run.append(run[-1] + 1)
            cats = [j for j in run if _CATEGORY_RE.match(names[j])]
            noun = cats[0] if cats else run[-1]
        plan.append((lit, lit_are, det, noun))
    return names, tuple(plan), (tail, agreeing(len(names), tail))


# ---------------------------------------------------------------------------------------- resources


def _root() -> Traversable:
    return resources.files(PROMPTS_PACKAGE)


def _resource(name: str) -> Traversable:
    node = _root()
    for part in name.split("/"):
        if part in ("", ".", ".."):
            raise jinja2.TemplateNotFound(name)
        node = node.joinpath(part)
    if not node.is_file():
        raise jinja2.TemplateNotFound(name)
    return node


class _ResourceLoader(jinja2.BaseLoader):
    """Loads ``prompts/<name>`` through importlib.resources (package data, zip-safe)."""

    def get_source(self, environment: jinja2.Environment, template: str) -> tuple[str, str | None, None]:
        node = _resource(template)
        source = node.read_bytes().decode("utf-8")
        # No uptodate callable: packaged templates do not change under a running process.
        return source, f"{PROMPTS_PACKAGE}/{template}", None

    def list_templates(self) -> list[str]:
        return template_names()


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    """The shared Jinja2 environment (StrictUndefined, trim/lstrip blocks, no autoescape)."""
    env = jinja2.Environment(
        loader=_ResourceLoader(),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
        keep_trailing_newline=False,
        auto_reload=False,
        cache_size=-1,
    )
    env.filters["plural"] = _plural_filter
    env.filters["article"] = _article_filter
    env.filters["and_join"] = _and_join_filter
    env.filters["another"] = _another_filter
    env.filters["be"] = _be_filter
    return env


@cache
def load_template(name: str) -> jinja2.Template:
    """Compiled template ``prompts/<name>``; cached per name for the life of the process."""
    return environment().get_template(name)


def template_source(name: str) -> str:
    return _resource(name).read_bytes().decode("utf-8")


def template_hash(name: str) -> str:
    """sha256 hex digest of the template's source bytes (as shipped)."""
    return hashlib.sha256(_resource(name).read_bytes()).hexdigest()


def _walk(node: Traversable, prefix: str) -> Iterable[str]:
    for child in node.iterdir():
        if child.name.startswith((".", "__")):
            continue
        rel = f"{prefix}{child.name}"
        if child.is_dir():
            yield from _walk(child, rel + "/")
        elif child.name.endswith(".j2"):
            yield rel


def template_names(prefix: str = "") -> list[str]:
    """Sorted names of every ``.j2`` under prompts/ whose name starts with ``prefix``."""
    return sorted(n for n in _walk(_root(), "") if n.startswith(prefix))


def all_template_hashes(prefix: str = "") -> dict[str, str]:
    """``{name: sha256}`` for every ``.j2`` under prompts/ starting with ``prefix`` (run provenance)."""
    return {n: template_hash(n) for n in template_names(prefix)}


@cache
def template_variants(name: str) -> int:
    """Number of surface-form variants in a multi-variant template.

    A multi-variant template branches on ``variant == 0``, ``variant == 1`` ... (integer
    literals, contiguous from 0); the count is read from the template's syntax tree. A template
    that never compares ``variant`` has one variant.
    """
    tree = environment().parse(template_source(name))
    seen: set[int] = set()
    for cmp in tree.find_all(nodes.Compare):
        if isinstance(cmp.expr, nodes.Name) and cmp.expr.name == "variant" and len(cmp.ops) == 1:
            op = cmp.ops[0]
            if op.op == "eq" and isinstance(op.expr, nodes.Const) and type(op.expr.value) is int:
                seen.add(op.expr.value)
    if not seen:
        return 1
    if seen != set(range(len(seen))):
        raise ValueError(f"template {name!r}: variants must be 0..n-1, found {sorted(seen)}")
    return len(seen)
