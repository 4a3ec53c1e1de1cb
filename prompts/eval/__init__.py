"""Prompt templates for `refforge eval` (one per answer dialect)."""
