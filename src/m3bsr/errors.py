"""User-facing errors: one line naming the file, the row/column/key, what is wrong and how to fix it.

The CLI turns an :class:`InputError` into that line on stderr and exit code 2 (no traceback
unless ``--debug``). Anything else that escapes is a bug in m3bsr.
"""

from __future__ import annotations


class InputError(Exception):
    """Bad input from the user (a file, a row, a config key, a flag).

    Build the message with :func:`input_error` so every message has the same shape:
    ``<where>: <what is wrong>. <how to fix>``.
    """


def clip(text: str, limit: int = 80) -> str:
    """``text``, or its first ``limit`` characters and ``... (N characters)``: what a message may repeat of
    an input that can be arbitrarily long (an id sent to the HTTP service)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def input_error(where: str, problem: str, fix: str = "") -> InputError:
    """Return an :class:`InputError` whose message is ``'<where>: <problem>. <fix>'`` on one line."""
    msg = f"{where}: {problem}"
    if fix:
        msg = f"{msg.rstrip('.')}. {fix}"
    return InputError(" ".join(msg.split()))


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped a command that left work behind; the message names it and the one command that
    continues it (``'<where>: <what stopped>. <command>'``). The CLI prints it after ``m3bsr: interrupted:``."""
