"""Stripe's bracket notation (`items[0][price]`, `expand[]`) turned into nested values.

Stripe clients send arrays as `key[0]`, `key[1]` (the official SDKs) or `key[]`
(curl users); both arrive here, and the schema step later turns index maps into
lists where the API expects a list.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl

from stripe_emulator.errors import StripeError

_KEY = re.compile(r"^([^\[\]]+)((?:\[[^\[\]]*\])*)$")
_PART = re.compile(r"\[([^\[\]]*)\]")

Form = dict[str, Any]


def _malformed(key: str) -> StripeError:
    return StripeError(
        "Invalid request (check that your POST content type is "
        f"application/x-www-form-urlencoded). Could not parse the parameter '{key}'.",
        param=key,
    )


def parse_pairs(pairs: list[tuple[str, str]]) -> Form:
    """Nest `a[b][c]=v` pairs; a key used both as a value and as a hash is malformed."""
    root: Form = {}
    for key, value in pairs:
        match = _KEY.match(key)
        if match is None:
            raise _malformed(key)
        parts = [match.group(1), *_PART.findall(match.group(2))]
        node: Any = root
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            if isinstance(node, list):
                if part != "" or not last:
                    raise _malformed(key)
                node.append(value)
                break
            if part == "":
                raise _malformed(key)
            following = None if last else parts[depth + 1]
            if last:
                if part in node and isinstance(node[part], (dict, list)):
                    raise _malformed(key)
                node[part] = value
            else:
                wanted: type = list if following == "" else dict
                current = node.get(part)
                if current is None:
                    current = wanted()
                    node[part] = current
                elif not isinstance(current, wanted):
                    raise _malformed(key)
                node = current
    return root


def parse_query(query: str) -> Form:
    """Parse a query string or a form body with Stripe's notation."""
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=False)
    except ValueError as exc:
        raise _malformed(query[:50]) from exc
    return parse_pairs(pairs)
