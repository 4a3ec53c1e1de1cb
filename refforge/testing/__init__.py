"""Test helpers shipped with refforge (usable from other projects' test suites too).

``OpenAITestServer``: a local test server speaking the OpenAI chat-completions protocol, scriptable
per request (replies, 429 with Retry-After, 5xx, stalls, dropped connections, malformed bodies,
truncation, refusals), recording every request it received; ``flavour=`` makes it refuse what a given
real server (vLLM, SGLang, llama.cpp, Ollama, Gemini...) refuses, with that server's status and text. Run it standalone with
``python -m refforge.testing.openai_server --latency-ms 100``.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "FLAVOURS",
    "Drop",
    "Fail",
    "Flavour",
    "Malformed",
    "OpenAITestServer",
    "RawError",
    "RecordedRequest",
    "Reply",
    "Stall",
    "drop_connection",
    "empty",
    "estimate_prompt_tokens",
    "fail",
    "http_date",
    "image_size",
    "image_tokens",
    "malformed_body",
    "rate_limit",
    "refusal",
    "reject_response_format",
    "reply",
    "server_error",
    "stall",
    "structured_form",
    "truncated",
]


def __getattr__(name: str) -> Any:
    # Imported on first use, so that `python -m refforge.testing.openai_server` runs the module once.
    if name in __all__:
        from . import openai_server

        return getattr(openai_server, name)
    raise AttributeError(name)


def __dir__() -> list[str]:
    return sorted(__all__)
