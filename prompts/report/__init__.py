"""The HTML page of `refforge report` (package data)."""
