"""The base of every config section: unknown keys are errors; and the error a bad config raises."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key and the allowed values."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


__all__ = ["ConfigError", "_Strict"]
