"""Untrusted text (org names, emails, Stripe's and Temporal's messages) made safe to print.

Names arrive from the console, from customers and from Stripe. Printed raw, a
newline forges a table row and an escape sequence rewrites the terminal (colours,
title, cursor moves, hyperlinks). Every human output passes such text through
`safe`; `--json` output needs nothing (JSON escapes control characters itself).
"""

from __future__ import annotations

import unicodedata

# Format characters that reorder what is shown (bidi overrides and isolates).
_REORDERING = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f")


def _visible(char: str) -> str:
    if char in _REORDERING or unicodedata.category(char) == "Cc":
        code = ord(char)
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
    return char


def safe(value: object) -> str:
    """`value` as one printable line, control characters shown as escapes.

    stdout's console has markup off; where a message is printed with markup
    (warnings and errors), escape it too: `rich.markup.escape(safe(text))`.
    """
    text = str(value)
    if text.isprintable():
        return text
    return "".join(_visible(char) for char in text)
