"""A model endpoint in a build config (``[llm]``, ``[vlm]``) and the client made from it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from refforge._strict import _Strict

from .cache import ResponseCache
from .client import LLMClient

# where and how fast a model is served does not change the data: left out of the config hash
OPERATIONAL_ENDPOINT_KEYS = ("base_url", "api_key_env", "concurrency", "timeout_s", "max_retries", "max_wait_s",
                             "max_outage_s", "price_per_1k_input", "price_per_1k_output")
# keys added later that change the data only when set: left out of the config hash while unset, so a
# build made before they existed keeps its identity
UNSET_ENDPOINT_KEYS = ("max_tokens",)


class ModelEndpoint(_Strict):
    """An OpenAI-compatible endpoint (OpenAI, vLLM, SGLang, Ollama, LM Studio, Gemini/Qwen compatible
    modes). The API key is read from the environment variable named by ``api_key_env`` at run time.

    ``max_wait_s``: how long one request may wait on rate limits (HTTP 429 and its ``Retry-After``) in
    all; a ``Retry-After`` past it fails the request at once with a one-line ``LLMRequestError``, and
    the build's unit is done on the next run.

    ``max_outage_s``: how long one request waits out an unreachable endpoint (refused connections,
    HTTP 502/503/504) before its unit fails with one line; a resume completes the build.

    ``max_tokens``: the answer limit of every request: an int for all stages, or a table by stage
    (``{negatives_text = 192, cot = 640}``; keys are stage names, or their last word: "judge",
    "ground"); unset stages get :data:`refforge.llm.DEFAULT_MAX_TOKENS`.

    ``structured_output``: "auto" finds the form the server takes (and remembers it in the build's
    cache); or one of json_schema, json_object, guided_json, ollama_format, instructions
    (see :mod:`refforge.llm.capabilities`)."""

    base_url: str = Field(description="http(s)://host[:port]/v1")
    model: str
    api_key_env: str | None = "OPENAI_API_KEY"
    concurrency: int = Field(default=8, ge=1, le=4096)
    timeout_s: float = Field(default=60, gt=0, le=3600)
    max_retries: int = Field(default=5, ge=0, le=100)
    max_wait_s: float = Field(default=300, ge=0)
    image_longest_side: int = Field(default=1024, ge=32, le=16384)
    structured_output: Literal["auto", "json_schema", "json_object", "guided_json", "ollama_format",
                               "instructions"] = "auto"
    max_tokens: int | dict[str, int] | None = None
    max_outage_s: float = Field(default=300, ge=0)
    price_per_1k_input: float | None = None
    price_per_1k_output: float | None = None

    @field_validator("base_url")
    @classmethod
    def _http(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"must start with http:// or https://, not {v!r}")
        return v

    @field_validator("max_tokens")
    @classmethod
    def _positive(cls, v: int | dict[str, int] | None) -> int | dict[str, int] | None:
        values = v.values() if isinstance(v, dict) else [] if v is None else [v]
        for n in values:
            if not 1 <= n <= 1_000_000:
                raise ValueError(f"max_tokens must be between 1 and 1000000, not {n}")
        return v


def require_endpoint(cfg: Any, which: str, setting: str) -> None:
    """A config check: ``setting`` (e.g. "cot.backend = 'vlm'") needs the ``[which]`` endpoint section."""
    if getattr(cfg, which) is None:
        article = "an" if which == "llm" else "a"  # "an [llm]", "a [vlm]", as the words are said
        raise ValueError(f"{setting} needs {article} [{which}] section (base_url, model)")


def endpoint_client(ep: ModelEndpoint, cache_path: Path) -> LLMClient:
    """An LLMClient for an endpoint, with a persistent response cache at ``cache_path`` (the build's,
    or ``refforge eval``'s own)."""
    return LLMClient(
        ep.base_url, ep.model, api_key_env=ep.api_key_env, concurrency=ep.concurrency,
        timeout_s=ep.timeout_s, max_retries=ep.max_retries, max_rate_limit_wait_s=ep.max_wait_s,
        image_longest_side=ep.image_longest_side, max_tokens=ep.max_tokens, max_outage_s=ep.max_outage_s,
        structured_output=ep.structured_output, price_per_1k_input=ep.price_per_1k_input,
        price_per_1k_output=ep.price_per_1k_output, cache=ResponseCache(cache_path))


__all__ = ["OPERATIONAL_ENDPOINT_KEYS", "UNSET_ENDPOINT_KEYS", "ModelEndpoint", "endpoint_client", "require_endpoint"]
