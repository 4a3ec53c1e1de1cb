"""What every model-backed step shares: the prompt templates and their versions, message building,
drops, the served model's id.

Prompts are the Jinja templates ``prompts/llm/*.j2``. Every request carries
``prompt_version = "<template name>@<template_hash>"`` (part of the response-cache key, so editing
a prompt re-asks the model) and every outcome returns the same string.

Failure policy (every model-backed step):

* an unusable answer (the client's :class:`~refforge.llm.LLMOutputError` after its repair retries:
  "refusal", "empty", "unparseable", "schema_mismatch", "truncated") or an answer that fails the
  step's own check becomes a drop with a reason: it never raises; replayed from the response cache
  (a re-run, a resume) it is the same drop, reason and detail word for word;
* a failed request (:class:`~refforge.llm.LLMRequestError`: the endpoint down past the retries,
  the rate-limit budget spent, bad credentials) propagates, after every answer of the batch that
  did arrive was cached, so a retried task pays only for what is missing. A ``Retry-After`` longer
  than the endpoint's ``max_wait_s`` is not waited out: the request fails at once, with one line
  that says to run the build again later.
"""

from __future__ import annotations

from typing import Any

from refforge.llm import ChatResult, LLMClient
from refforge.schemas import Drop
from refforge.stages.scene.templates import load_template, template_hash

Box = tuple[float, float, float, float]

PROMPTS: dict[str, str] = {
    "rewrite": "llm/rewrite.j2",
    "negatives": "llm/negatives.j2",
    "describe": "llm/describe.j2",
    "ground": "llm/ground.j2",
    "cot": "llm/cot.j2",
    "judge": "llm/judge.j2",
}


def prompt_version(name: str) -> str:
    """``"<template name>@<sha256 of the template>"`` for a key of :data:`PROMPTS` or a template name."""
    name = PROMPTS.get(name, name)
    return f"{name}@{template_hash(name)}"


def prompt_versions() -> dict[str, str]:
    """``{template name: sha256}`` of every LLM prompt (for the run file's provenance)."""
    return {name: template_hash(name) for name in PROMPTS.values()}


def _macros(name: str):
    return load_template(PROMPTS[name]).module


def _messages(system: str, user: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"role": "system", "content": system.strip()},
            {"role": "user", "content": user.strip() if isinstance(user, str) else user}]


def _extra(seed: int | None) -> dict[str, Any] | None:
    return None if seed is None else {"seed": int(seed)}


def _drop(stage: str, key: str, reason: str, detail: str | None = None) -> Drop:
    return Drop(stage=stage, key=key, reason=reason, detail=(detail[:500] if detail else None))


def _model_of(result: ChatResult, client: LLMClient) -> str:
    return result.model or client.model


