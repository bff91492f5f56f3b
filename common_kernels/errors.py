"""The project's error classes: each message names the file, field, tensor or argument, and the fix.

The CLI prints any `RingLinearError` as one line (`--debug` shows the traceback); all are `ValueError`s, so
code that caught `ValueError` before still does.
"""

from __future__ import annotations


class RingLinearError(ValueError):
    """Base of the errors the user can fix (bad config, checkpoint or argument)."""


class InvalidInputError(RingLinearError):
    """An argument or input tensor this model cannot take (a negative temperature, an id outside the vocabulary)."""
