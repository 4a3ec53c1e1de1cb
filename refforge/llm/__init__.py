"""Model calls for LLM/VLM stages: one client for every OpenAI-compatible endpoint.

::

    from refforge.llm import LLMClient, ResponseCache
    client = LLMClient("http://localhost:8000/v1", "Qwen/Qwen2.5-VL-7B-Instruct",
                       cache=ResponseCache("builds/demo/cache/llm.sqlite"))
    results = client.run_many([{"messages": [...], "prompt_version": "rewrite@3f2a",
                                "stage": "rewrite", "response_schema": Rewrite}])  # sync code
    client.usage()["rewrite"]["requests"]

See :mod:`refforge.llm.client` for the retry, rate-limit, structured-output and secret policies.
"""

from .cache import CachedResponse, ResponseCache, request_key
from .capabilities import FORMS, Capabilities
from .client import (
    DEFAULT_MAX_TOKENS,
    ChatRequest,
    ChatResult,
    EncodedImage,
    EndpointError,
    LLMClient,
    LLMError,
    LLMOutputError,
    LLMRequestError,
    Usage,
    abort_all,
    encode_image,
    image_part,
)
from .structured import OutputParseError, extract_json, parse_model, response_format_for, strict_json_schema

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "FORMS",
    "Capabilities",
    "EndpointError",
    "abort_all",
    "CachedResponse",
    "ChatRequest",
    "ChatResult",
    "EncodedImage",
    "LLMClient",
    "LLMError",
    "LLMOutputError",
    "LLMRequestError",
    "OutputParseError",
    "ResponseCache",
    "Usage",
    "encode_image",
    "extract_json",
    "image_part",
    "parse_model",
    "request_key",
    "response_format_for",
    "strict_json_schema",
]
