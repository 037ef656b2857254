"""The base of the errors a user can act on: what is wrong, and one line of what to do.

``fedllama``'s commands print such an error as ``fedllama: <message>`` and, when it has one,
``fedllama: to fix: <hint>``, with no traceback unless ``-v``. Library code raises the
subclasses (``ConfigError``, ``ModelError``, ``DataError``); a caller that catches them gets a
plain ``ValueError`` or ``RuntimeError`` as before.
"""

from __future__ import annotations


class UserError(Exception):
    """An error in what a user gave (a file, a path, a setting) rather than in fedllama.

    Attributes:
        hint: one line that says what to do about it ("" when the message says it already).
    """

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint
