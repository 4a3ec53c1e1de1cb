"""Structured output: JSON schemas for ``response_format`` and JSON extraction from free text.

Two ways to get a pydantic object out of a chat model:

- ``json_schema`` mode: the server constrains decoding to a schema passed as
  ``response_format={"type": "json_schema", "json_schema": {"name", "schema", "strict": True}}``.
  OpenAI's strict mode wants every object closed (``additionalProperties: false``) and every
  property listed in ``required``; :func:`strict_json_schema` rewrites a pydantic schema that way.
- ``instructions`` mode (servers without json_schema support): the schema goes into the system
  prompt (:func:`schema_instructions`) and :func:`extract_json` digs the first JSON object out of
  the answer, tolerating ```` ```json ```` fences and prose around it.

Both end in :func:`parse_model`, which raises :class:`OutputParseError` with a short machine-readable
reason ("empty", "unparseable", "schema_mismatch") and a message fit to send back to the model in a
repair turn.

>>> from pydantic import BaseModel
>>> class Box(BaseModel):
...     label: str
...     box: list[float]
>>> parse_model('Sure! ```json\\n{"label": "cup", "box": [1, 2, 3, 4]}\\n```', Box)
Box(label='cup', box=[1.0, 2.0, 3.0, 4.0])
>>> strict_json_schema(Box)["additionalProperties"], strict_json_schema(Box)["required"]
(False, ['label', 'box'])
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import pydantic

__all__ = [
    "OutputParseError",
    "extract_json",
    "looks_like_refusal",
    "parse_model",
    "response_format_for",
    "schema_instructions",
    "schema_name",
    "strict_json_schema",
]


class OutputParseError(ValueError):
    """An answer that is not the JSON the schema asks for. ``reason`` is machine-readable."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


# --------------------------------------------------------------------------------------------- schemas


def strict_json_schema(model: type[pydantic.BaseModel]) -> dict[str, Any]:
    """The model's JSON schema rewritten for strict structured output.

    Every object gets ``additionalProperties: false`` and all of its properties in ``required``
    (optional fields stay nullable through their ``anyOf [.., null]``); ``default: null`` is
    dropped; a ``$ref`` with sibling keys is inlined (strict mode forbids siblings of ``$ref``).
    """
    schema = copy.deepcopy(model.model_json_schema())
    return _strict(schema, root=schema)


def _strict(node: Any, *, root: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_strict(item, root=root) for item in node]
    if not isinstance(node, dict):
        return node
    for defs_key in ("$defs", "definitions"):
        defs = node.get(defs_key)
        if isinstance(defs, dict):
            for name, sub in defs.items():
                defs[name] = _strict(sub, root=root)
    if node.get("type") == "object" or "properties" in node:
        node.setdefault("additionalProperties", False)
        if node["additionalProperties"] is True:
            node["additionalProperties"] = False
    props = node.get("properties")
    if isinstance(props, dict):
        node["required"] = list(props)
        node["properties"] = {k: _strict(v, root=root) for k, v in props.items()}
    for key in ("items", "prefixItems", "anyOf", "oneOf"):
        if key in node:
            node[key] = _strict(node[key], root=root)
    all_of = node.get("allOf")
    if isinstance(all_of, list):
        if len(all_of) == 1:
            node.pop("allOf")
            node.update(_strict(all_of[0], root=root))
        else:
            node["allOf"] = _strict(all_of, root=root)
    if "default" in node and node["default"] is None:
        node.pop("default")
    ref = node.get("$ref")
    if isinstance(ref, str) and len(node) > 1:
        resolved = _resolve_ref(root, ref)
        merged = {**copy.deepcopy(resolved), **{k: v for k, v in node.items() if k != "$ref"}}
        node.clear()
        node.update(_strict(merged, root=root))
    return node


def _resolve_ref(root: dict[str, Any], ref: str) -> dict[str, Any]:
    if not ref.startswith("#/"):
        raise ValueError(f"unsupported $ref {ref!r} (only local refs)")
    node: Any = root
    for part in ref[2:].split("/"):
        node = node[part]
    if not isinstance(node, dict):
        raise ValueError(f"$ref {ref!r} does not point at a schema")
    return node


def schema_name(model: type[pydantic.BaseModel]) -> str:
    """A name the API accepts for ``json_schema.name`` (``^[a-zA-Z0-9_-]{1,64}$``)."""
    return re.sub(r"[^a-zA-Z0-9_-]", "_", model.__name__)[:64] or "response"


def response_format_for(model: type[pydantic.BaseModel]) -> dict[str, Any]:
    """``response_format`` for the chat-completions API, strict json_schema mode."""
    return {
        "type": "json_schema",
        "json_schema": {"name": schema_name(model), "schema": strict_json_schema(model), "strict": True},
    }


def schema_instructions(model: type[pydantic.BaseModel]) -> str:
    """The text appended to the system prompt when the server cannot enforce a schema."""
    schema = json.dumps(strict_json_schema(model), separators=(",", ":"), sort_keys=True)
    return (
        "Answer with one JSON object and nothing else: no prose, no markdown. "
        f"The object must validate against this JSON schema:\n{schema}"
    )


# ---------------------------------------------------------------------------------------------- parsing

_FENCE = re.compile(r"```(?:json|JSON)?\s*\n?(.*?)```", re.DOTALL)
_DECODER = json.JSONDecoder()
_REFUSAL = re.compile(
    r"^\s*(?:i['’]m sorry|i am sorry|sorry[,.!]|i apologi[sz]e|i can(?:no|['’])t|i cannot|i won['’]t|"
    r"i['’]m (?:not able|unable)|i am (?:not able|unable)|unfortunately,? i|as an ai\b)",
    re.IGNORECASE,
)


def looks_like_refusal(text: str) -> bool:
    """True for answers that open like a refusal ("I'm sorry, I can't ...")."""
    return bool(_REFUSAL.match(text))


def extract_json(text: str) -> Any:
    """The first JSON object in ``text`` (an array if there is no object); fenced blocks first.

    Raises :class:`OutputParseError` ("empty" or "unparseable").
    """
    if text is None or not text.strip():
        raise OutputParseError("empty", "the answer was empty")
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    for opener in "{[":  # objects first: a schema is an object, a stray "[1, 2]" in prose is not
        for chunk in candidates:
            found = _first_json(chunk, opener)
            if found is not None:
                return found[0]
    raise OutputParseError("unparseable", "the answer contains no complete JSON object")


def _first_json(text: str, opener: str) -> tuple[Any] | None:
    start = 0
    while True:
        pos = text.find(opener, start)
        if pos < 0:
            return None
        try:
            value, _ = _DECODER.raw_decode(text, pos)
        except json.JSONDecodeError:
            start = pos + 1
            continue
        if isinstance(value, dict | list):
            return (value,)
        start = pos + 1


def parse_model(text: str, model: type[pydantic.BaseModel]) -> pydantic.BaseModel:
    """Extract the first JSON object from ``text`` and validate it against ``model``.

    Raises :class:`OutputParseError` with reason "empty", "unparseable" or "schema_mismatch"
    (the message lists the validation errors briefly, for a repair turn).
    """
    data = extract_json(text)
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()[:8]
        )
        raise OutputParseError("schema_mismatch", f"the JSON does not match the schema: {problems}") from None
