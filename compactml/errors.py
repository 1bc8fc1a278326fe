"""Errors that mean "the user's input is wrong", as opposed to a bug in compactml.

Every message is one line that names the problem and says how to fix it. The CLI turns these
into ``error: <message>`` and exit code 2, without a traceback unless ``--debug`` is given.
"""

from __future__ import annotations


class CompactMLError(Exception):
    """Bad input: a missing file, a damaged artifact, a wrong shape, an unknown name."""


class ArtifactError(CompactMLError):
    """A .cml file that is truncated, damaged, or not a compactml artifact at all."""


class SignatureError(ArtifactError):
    """A signature that is missing when a key is given, or that does not match the key."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty),
    for quoting a low-level error inside a one-line user message."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
