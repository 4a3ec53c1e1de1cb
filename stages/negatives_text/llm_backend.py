"""The ``llm`` backend of negatives_text: the model proposes replacement words; ``text_negatives``
verifies them against the scene graph as it does the lexicon's."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable
from typing import Any

import pydantic

from refforge.llm import ChatRequest, ChatResult, LLMClient, LLMOutputError
from refforge.schemas import Drop
from refforge.stages.llm_common import _drop, _macros, _messages, prompt_version
from refforge.stages.negatives_text.edits import (
    NEGATIVE_TYPES,
    LexiconBackend,
    NegativeBackend,
    ReplacementContext,
)
from refforge.stages.rewrite import CATEGORY_SYNONYMS, _norm
from refforge.stages.scene.lexicon import (
    ATTRIBUTE_FAMILIES,
    ATTRIBUTE_FAMILY,
    CATEGORIES,
    NEGATIVE_CATEGORIES,
    RELATION_ALTERNATIVES,
    RELATIONS,
    plural,
)
from refforge.stages.scene.query import Node
from refforge.stages.scene.vocabulary import family

# ================================================================================ negatives backend


class CandidatesOut(pydantic.BaseModel):
    candidates: list[str]


_KNOWN_CATEGORIES: tuple[str, ...] = tuple(dict.fromkeys([*CATEGORIES, *NEGATIVE_CATEGORIES]))
_KNOWN_PREDICATES: tuple[str, ...] = tuple(dict.fromkeys(
    [*RELATIONS, *RELATION_ALTERNATIVES, *(p for alts in RELATION_ALTERNATIVES.values() for p in alts)]))
_PHRASE_TO_PREDICATE: dict[str, str] = {_norm(v): k for k, v in RELATIONS.items()} | {_norm(p): p
                                                                                       for p in _KNOWN_PREDICATES}
_TYPE_KIND = {"replace_attribute": "attribute", "replace_object": "category", "replace_relation": "relation"}


def _clean_word(word: str) -> str:
    w = " ".join(str(word).lower().replace("_", " ").split()).strip(" .,;:!\"'`")
    return re.sub(r"^(?:a|an|the) ", "", w)


class LLMNegativeBackend:
    """A :class:`~refforge.stages.negatives.NegativeBackend` that asks the model for replacements.

    One request per distinct ``(kind, word[, family])``: the prompt (``prompts/llm/negatives.j2``)
    depends on the word alone, never on the image, so a word costs one request per build (and none
    on a re-run with a :class:`~refforge.llm.ResponseCache`). Answers are memoised in the backend
    too. Call :meth:`prefetch` with a shard's queries first: it sends every missing request in one
    concurrent ``run_many``; the per-word Protocol calls that ``text_negatives`` makes then read
    the memo.

    Vocabulary (an LLM proposes synonyms and shades that the graph cannot refute, so proposals are
    restricted to words the graph's vocabulary can verify):

    * attributes: other values of the same lexicon family only;
    * relations: the lexicon's predicates only (phrases such as "to the left of" are mapped back);
    * categories: the lexicon's categories (``CATEGORIES`` and ``NEGATIVE_CATEGORIES``), or any word
      with ``open_categories=True`` (then always minus the word, its plural and its
      :data:`CATEGORY_SYNONYMS`); on incomplete graphs ``text_negatives`` flags replace_object
      candidates for review anyway.

    Per image: categories present in the image are removed (the driver does too) and, with
    ``prefer_present``, attribute values that occur in the image come first (harder negatives).

    With a ``vocabulary`` (the unit's :class:`~refforge.stages.negatives_text.plausible.BuildVocabulary`)
    the proposed categories are filtered to the replaced category's family
    (:func:`~refforge.stages.scene.vocabulary.family`: "a lamp" is no hard negative of "a skier"), those
    the unit's scene graphs name first; when nothing of the family is left, ``fallback`` answers.

    A word whose answer is unusable becomes a drop in :attr:`drops` (stage ``negatives_text``, key
    ``"llm:<kind>:<word>"``) and is answered by ``fallback`` (default: no proposals; the
    negatives_text stage passes its :class:`~refforge.stages.negatives_text.plausible.VocabularyBackend`).
    """

    def __init__(self, client: LLMClient, *, max_candidates: int = 8, open_categories: bool = False,
                 prefer_present: bool = True, fallback: NegativeBackend | None = None, temperature: float = 0,
                 stage: str = "negatives_text", vocabulary: Any = None) -> None:
        self.client = client
        self.max_candidates = max_candidates
        self.open_categories = open_categories
        self.prefer_present = prefer_present
        self.fallback = fallback
        self.temperature = temperature
        self.stage = stage
        self.vocabulary = vocabulary
        self.prompt_version = prompt_version("negatives")
        self.drops: list[Drop] = []
        self._memo: dict[tuple[str, str, str], list[str] | None] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"LLMNegativeBackend(model={self.client.model!r}, open_categories={self.open_categories!r})"

    @property
    def model(self) -> str:
        return self.client.model

    def __getstate__(self) -> dict[str, Any]:  # picklable for Prefect/dask workers (the lock is not)
        state = dict(self.__dict__)
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # -- requests
    def _allowed(self, kind: str, word: str, family: str) -> list[str]:
        if kind == "attribute":
            return [v for v in ATTRIBUTE_FAMILIES.get(family, ()) if v != word]
        if kind == "relation":
            return [p for p in _KNOWN_PREDICATES if p != word]
        if self.open_categories:
            return []
        return sorted(c for c in _KNOWN_CATEGORIES if c != word)

    def _request(self, kind: str, word: str, family: str) -> ChatRequest:
        m = _macros("negatives")
        user = m.user(kind, word, family, RELATIONS.get(word, word), self._allowed(kind, word, family),
                      self.max_candidates)
        return ChatRequest(_messages(m.system(), user), self.prompt_version, self.stage, self.temperature, None,
                           CandidatesOut)

    def _accept(self, kind: str, word: str, family: str, raw: Iterable[str]) -> list[str]:
        out: list[str] = []
        banned = {word, plural(word), *CATEGORY_SYNONYMS.get(word, ())} if kind == "category" else {word}
        allowed = set(self._allowed(kind, word, family))
        for cand in raw:
            w = _clean_word(cand)
            if kind == "relation":
                w = _PHRASE_TO_PREDICATE.get(_norm(w), w)
            if not w or w in banned or w in out:
                continue
            if allowed and w not in allowed:
                continue
            if kind == "category" and not allowed and not re.fullmatch(r"[a-z][a-z \-]{0,40}", w):
                continue
            out.append(w)
        return out[: self.max_candidates]

    def _store(self, key: tuple[str, str, str], res: ChatResult | LLMOutputError) -> None:
        kind, word, family = key
        if isinstance(res, LLMOutputError):
            value = None
            drop = _drop(self.stage, f"llm:{kind}:{word}", f"llm {res.reason}", res.detail)
            with self._lock:
                self.drops.append(drop)
        else:
            value = self._accept(kind, word, family, res.parsed.candidates)  # type: ignore[union-attr]
        with self._lock:
            self._memo[key] = value

    def prefetch(self, items: Iterable[Any], types: Iterable[str] = NEGATIVE_TYPES) -> int:
        """Ask for every word the driver will need for these positives; returns the requests sent
        (words already memoised are skipped; a response cache may still answer the rest for free).

        ``items``: :class:`~refforge.stages.scene.query.Node` queries, or objects with a ``query`` attribute.
        """
        kinds = {_TYPE_KIND[t] for t in types if t in _TYPE_KIND}
        keys: dict[tuple[str, str, str], None] = {}
        for item in items:
            query = item if isinstance(item, Node) else item.query
            for n in query.nodes():
                if "category" in kinds:
                    keys[("category", n.category, "")] = None
                if "attribute" in kinds:
                    for a in n.attributes:
                        fam = ATTRIBUTE_FAMILY.get(a)
                        if fam is not None:
                            keys[("attribute", a, fam)] = None
                if "relation" in kinds:
                    for pred, _child in n.relations:
                        keys[("relation", pred, "")] = None
        with self._lock:
            todo = [k for k in keys if k not in self._memo]
        if not todo:
            return 0
        results = self.client.run_many([self._request(*k) for k in todo])
        for k, res in zip(todo, results, strict=True):
            self._store(k, res)
        return len(todo)

    def _get(self, kind: str, word: str, family: str = "") -> list[str] | None:
        key = (kind, word, family)
        with self._lock:
            if key in self._memo:
                return self._memo[key]
        res: ChatResult | LLMOutputError
        try:
            res = self.client.chat_sync(**_request_kwargs(self._request(kind, word, family)))
        except LLMOutputError as exc:
            res = exc
        self._store(key, res)
        return self._memo[key]

    def take_drops(self) -> list[Drop]:
        """The drops recorded so far, and forget them (call once per shard)."""
        with self._lock:
            out, self.drops = self.drops, []
        return out

    # -- the Protocol
    def replacements_for_attribute(self, value: str, family: str, context: ReplacementContext) -> list[str]:
        got = self._get("attribute", value, family)
        if got is None:
            return self.fallback.replacements_for_attribute(value, family, context) if self.fallback else []
        if self.prefer_present:
            present = context.image_attributes
            got = sorted(got, key=lambda v: v not in present)
        return list(got)

    def replacements_for_category(self, category: str, context: ReplacementContext) -> list[str]:
        got = self._get("category", category)
        if got is not None:
            got = [c for c in got if c not in context.image_categories]
            if self.vocabulary is not None:
                fam = family(category)
                named = self.vocabulary.categories
                got = sorted((c for c in got if family(c) == fam), key=lambda c: c not in named)
        if not got:
            return self.fallback.replacements_for_category(category, context) if self.fallback else []
        return got

    def replacements_for_relation(self, predicate: str, context: ReplacementContext) -> list[str]:
        got = self._get("relation", predicate)
        if got is None:
            return self.fallback.replacements_for_relation(predicate, context) if self.fallback else []
        return list(got)


def _request_kwargs(req: ChatRequest) -> dict[str, Any]:
    return {"messages": req.messages, "prompt_version": req.prompt_version, "stage": req.stage,
            "temperature": req.temperature, "max_tokens": req.max_tokens, "response_schema": req.response_schema,
            "extra": req.extra, "sample": req.sample}


def negative_backend(client: LLMClient | None, **kwargs: Any) -> NegativeBackend:
    """The negatives backend for a client: :class:`LLMNegativeBackend`, or the offline
    :class:`~refforge.stages.negatives.LexiconBackend` when ``client`` is None."""
    return LexiconBackend() if client is None else LLMNegativeBackend(client, **kwargs)


