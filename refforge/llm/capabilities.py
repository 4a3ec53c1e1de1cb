"""What an OpenAI-compatible endpoint can do, found out once and remembered in the build's cache.

Servers that speak the chat-completions protocol differ in what they accept beyond the core:

- **structured output**: OpenAI and recent vLLM/SGLang/llama.cpp's llama-server take
  ``response_format: {"type": "json_schema", ...}``; llama-cpp-python's server takes only ``text`` or
  ``json_object`` (with a ``schema`` beside it); older vLLM takes ``guided_json``; Ollama's own API
  takes ``format`` with a schema; every server takes the schema as instructions in the prompt.
- **logprobs**: some return them for ``logprobs: true``; llama-cpp-python returns ``null`` unless
  ``top_logprobs`` is sent too; some reject the parameter.
- **system messages**: some chat templates drop them (llama-cpp-python's ``gemma`` format does, as
  Gemma's models have no system role): a prompt that does not grow when a system message is added
  shows it, and the client then puts the system text at the start of the first user message.
- **images**: a text-only model behind a server either refuses an image part (llama-server: HTTP 500
  "image input is not supported"; OpenAI/vLLM: a 400) or drops it silently (llama-cpp-python), and
  then answers as a blind model.

A refusal is recognised by what its message says, whatever its status code (400, 422 or 500):
:func:`classify_refusal`. The client then moves on at once (the next structured-output form,
logprobs off) without spending a retry; permanent errors (an unsupported input, a prompt over the
context, an unknown model) are never retried.

What was learnt is a :class:`Capabilities` record, kept per (base URL, model) in the build's response
cache (``cache/llm.sqlite``, table ``capabilities``), so a resumed build and the next build start from
it and send no probe again.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "FORMS",
    "Capabilities",
    "Refusal",
    "classify_refusal",
    "structured_body",
]

# The structured-output forms, in the order "auto" tries them.
FORMS: tuple[str, ...] = ("json_schema", "json_object", "guided_json", "ollama_format", "instructions")
FORM_NAMES = {
    "json_schema": 'response_format {"type": "json_schema"}',
    "json_object": 'response_format {"type": "json_object", "schema": ...}',
    "guided_json": "guided_json",
    "ollama_format": "format (Ollama)",
    "instructions": "the schema as instructions in the prompt",
}
# the request fields each form adds (a refusal naming one of them refuses that form)
FORM_FIELDS: dict[str, tuple[str, ...]] = {
    "json_schema": ("response_format", "json_schema"),
    "json_object": ("response_format", "json_object"),
    "guided_json": ("guided_json",),
    "ollama_format": ("format",),
    "instructions": (),
}


@dataclass
class Capabilities:
    """What one model on one endpoint accepts. ``None``: not found out yet."""

    structured: str | None = None  # the form that works (one of FORMS)
    refused_forms: dict[str, str] = field(default_factory=dict)  # form -> the server's words
    logprobs: Literal["logprobs", "top_logprobs", "none"] | None = None
    images: bool | None = None
    images_detail: str = ""  # why images are taken to be unsupported
    system: bool | None = None  # whether a system message reaches the model (False: folded into the user turn)
    models: list[str] | None = None  # what GET /models listed (None: not asked or not served)
    checked: float = 0.0

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Capabilities:
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def stamp(self) -> Capabilities:
        self.checked = time.time()
        return self


@dataclass(frozen=True)
class Refusal:
    """A server's "no" that retrying cannot change.

    ``kind``: "unsupported" (a request field the server does not take: ``feature`` names it:
    "response_format", "json_schema", "json_object", "guided_json", "format", "logprobs",
    "top_logprobs", "n", "seed"), "images" (image content refused), "context_overflow" (the prompt
    and max_tokens do not fit the model's context), "unknown_model".
    """

    kind: str
    feature: str = ""
    message: str = ""


# -- recognisers: the words servers use (sources in the comments) ----------------------------------

_CONTEXT = re.compile(
    r"maximum context length|context length exceeded|context_length_exceeded|exceed(?:s|ed)? (?:the )?"
    r"(?:available )?context|exceed_context_size|context window|too many tokens|prompt is too long|"
    r"input is too long|requested tokens \(\d+\) exceed|longer than the model's context length|"
    r"exceeds the maximum number of tokens allowed",
    re.IGNORECASE)
# OpenAI: "This model's maximum context length is 8192 tokens..." (code context_length_exceeded);
# vLLM: "This model's maximum context length is N tokens. However, you requested M tokens ...";
# llama-cpp-python: "Requested tokens (N) exceed context window of M";
# llama-server: "the request exceeds the available context size, try increasing it" (exceed_context_size_error);
# SGLang: "The input (P tokens) is longer than the model's context length (N tokens)."; Gemini: "The input
# token count (P) exceeds the maximum number of tokens allowed (N)."

_IMAGES = re.compile(
    r"image input is not supported|image_url is only supported|does not support (?:image|vision|multimodal)|"
    r"not a multimodal model|multimodal (?:input|content)? ?(?:is )?not supported|images? (?:are|is) not supported|"
    r"vision is not (?:supported|enabled)|invalid content type\. image_url|model does not support images|"
    r"no (?:multimodal|vision) (?:projector|model|support)|mmproj",
    re.IGNORECASE)

_UNKNOWN_MODEL = re.compile(
    r"model [`'\"]?[^`'\"]*[`'\"]? (?:does not exist|not found)|model_not_found|no such model|"
    r"unknown model|model .{0,80} is not (?:found|available|served)|try pulling it first",
    re.IGNORECASE)

# a field named in the message as not taken: "Unrecognized request argument supplied: guided_json"
# (OpenAI), 'Unknown name "guided_json": Cannot find field.' (Gemini), "Unsupported parameter:
# 'logprobs'" (OpenAI), "'response_format' of type 'json_schema' is not supported" (OpenAI),
# "Input should be 'text' or 'json_object'" (a pydantic literal error on response_format.type:
# llama-cpp-python, older vLLM)
_UNSUPPORTED_WORDS = re.compile(
    r"unrecogni[sz]ed|unknown (?:name|field|parameter|argument)|unsupported|not supported|"
    r"not (?:be )?(?:allowed|permitted|implemented)|cannot find field|extra (?:inputs|fields) (?:are|is) not permitted|"
    r"input should be|invalid (?:value|parameter|type)|is not (?:a )?valid|unexpected keyword|does not support",
    re.IGNORECASE)

_FEATURES = ("response_format", "json_schema", "json_object", "guided_json", "top_logprobs", "logprobs",
             "format", "seed", "n")


def _mentions(text: str, feature: str) -> bool:
    if feature in ("n", "format"):  # short words: only quoted or as a field path
        return bool(re.search(rf"""(?:['"`]|\b(?:body|parameter|argument|field|name)\W{{0,3}}){feature}['"`]|"""
                              rf"""\b{feature}\s*(?:>|must|is|should|=)|'{feature}'|"{feature}"|\b{feature}\b(?= ?:)""",
                              text))
    return feature in text.lower()


def classify_refusal(status: int | None, message: str, *, param: str | None = None, code: str | None = None,
                     sent: set[str] | frozenset[str] = frozenset(), has_images: bool = False) -> Refusal | None:
    """A :class:`Refusal` when an error answer says the request cannot be served as sent, else None.

    ``sent``: the optional fields the request carried (a feature is blamed only when it was sent);
    ``has_images``: the request had image content. The status code is not trusted alone: servers say
    "unsupported" with 400, 422 and 500 alike; a 5xx counts only when its words say so.
    """
    text = f"{message} {param or ''} {code or ''}"
    low = text.lower()
    if status is not None and status in (408, 409, 429, 502, 503, 504):
        return None
    if _CONTEXT.search(text):
        return Refusal("context_overflow", message=message)
    if has_images and _IMAGES.search(text):
        return Refusal("images", "image_url", message)
    if _UNKNOWN_MODEL.search(text) and (status in (400, 404) or "model" in (param or "")):
        return Refusal("unknown_model", message=message)
    if param:
        p = param.split(".")[0].strip().lower()
        if p in sent:
            return Refusal("unsupported", p, message)
    if not _UNSUPPORTED_WORDS.search(text):
        return None
    # the literal error of a server that knows only text/json_object: json_schema is what it refuses
    if "json_schema" in sent and re.search(r"'text'.{0,12}'json_object'|json_object.{0,12}'text'", low):
        return Refusal("unsupported", "json_schema", message)
    for feature in _FEATURES:
        if feature in sent and _mentions(text, feature):
            return Refusal("unsupported", feature, message)
    return None


# -- request bodies per form -----------------------------------------------------------------------


def structured_body(form: str, name: str, schema: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """(fields to add to the request body, whether the schema goes into the prompt too) for ``form``.

    Every form but json_schema also puts the schema in the prompt: a server that accepts a field but
    ignores it (json_object without schema support, an unknown field dropped quietly) still gets an
    answer the parser can use, and OpenAI's json_object mode requires the word JSON in the messages.
    """
    if form == "json_schema":
        return {"response_format": {"type": "json_schema",
                                    "json_schema": {"name": name, "schema": schema, "strict": True}}}, False
    if form == "json_object":
        return {"response_format": {"type": "json_object", "schema": schema}}, True
    if form == "guided_json":
        return {"guided_json": schema}, True
    if form == "ollama_format":
        return {"format": schema}, True
    if form == "instructions":
        return {}, True
    raise ValueError(f"unknown structured-output form {form!r}; one of {', '.join(FORMS)}")


def next_form(form: str, refused: dict[str, str]) -> str:
    """The form after ``form`` in :data:`FORMS` that has not been refused (instructions always works)."""
    start = FORMS.index(form) + 1 if form in FORMS else 0
    for f in FORMS[start:]:
        if f not in refused:
            return f
    return "instructions"
