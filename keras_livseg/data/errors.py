"""The one exception type for bad input data, shared by every stage."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data: the message names the file or value and says how to fix it."""
