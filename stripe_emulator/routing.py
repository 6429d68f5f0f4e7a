"""Routes, and the shared answers every resource gives: expansion, lists, search, diffs."""

from __future__ import annotations

import base64
import copy
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from stripe_emulator.errors import StripeError, missing
from stripe_emulator.state import KINDS_BY_PREFIX, Obj, State

Params = dict[str, Any]


@dataclass
class Ctx:
    """What a handler needs besides its parameters."""

    state: State
    base_url: str
    api_key: str
    request_id: str


Handler = Callable[[Ctx, Params, dict[str, str]], Obj]


@dataclass
class Route:
    method: str
    template: str
    params: type | None
    handler: Handler
    regex: re.Pattern[str] = field(init=False)

    def __post_init__(self) -> None:
        pattern = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", self.template)
        self.regex = re.compile(f"^{pattern}$")


class Router:
    """Method + path template to handler; literal segments win over `{id}` ones."""

    def __init__(self) -> None:
        self.routes: list[Route] = []

    def add(self, method: str, template: str, params: type | None) -> Callable[[Handler], Handler]:
        def register(handler: Handler) -> Handler:
            self.routes.append(Route(method, template, params, handler))
            self.routes.sort(key=lambda r: (r.template.count("{"), -len(r.template)))
            return handler

        return register

    def match(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        for route in self.routes:
            if route.method != method:
                continue
            found = route.regex.match(path)
            if found is not None:
                return route, found.groupdict()
        raise StripeError(
            f"Unrecognized request URL ({method}: {path}). Please see https://stripe.com/docs "
            "or we can help at https://support.stripe.com/.",
            status=404,
        )


router = Router()


# -- rendering -------------------------------------------------------------------------------


def _expand_path(state: State, obj: Any, parts: list[str], full: str) -> None:
    if not parts or not isinstance(obj, dict):
        return
    key, rest = parts[0], parts[1:]
    if obj.get("object") in ("list", "search_result") and key == "data":
        for element in obj.get("data", []):
            _expand_path(state, element, rest, full)
        return
    if key not in obj and obj.get("object") == "customer" and key == "subscriptions":
        subs = [
            copy.deepcopy(sub)
            for sub in newest_first(state.collection("subscription").values())
            if sub["customer"] == obj["id"]
            and sub["status"] not in ("canceled", "incomplete_expired")
        ]
        obj[key] = {
            "object": "list",
            "data": subs,
            "has_more": False,
            "total_count": len(subs),
            "url": f"/v1/customers/{obj['id']}/subscriptions",
        }
    if key not in obj:
        raise StripeError(f"This property cannot be expanded ({full}).", param="expand")
    value = obj[key]
    if isinstance(value, str) and value.split("_", 1)[0] in KINDS_BY_PREFIX:
        target = state.by_id(value)
        if target is not None:
            value = copy.deepcopy(target)
            strip_private(value)
            obj[key] = value
    if rest:
        _expand_path(state, value, rest, full)


def strip_private(obj: Obj) -> None:
    """Stripe shows a webhook endpoint's secret only in the create answer."""
    if obj.get("object") == "webhook_endpoint":
        obj.pop("secret", None)


def render(state: State, obj: Obj, expand: Iterable[str] | None) -> Obj:
    """A copy of the stored object with the requested fields expanded."""
    out = copy.deepcopy(obj)
    for path in expand or []:
        if path == "total_count":
            continue
        _expand_path(state, out, path.split("."), path)
    return out


def diff(old: Any, new: Any) -> Any:
    """Stripe's `previous_attributes`: old values of what changed, nested hashes partially."""
    if isinstance(old, dict) and isinstance(new, dict) and old.get("object") != "list":
        out: dict[str, Any] = {}
        for key in set(old) | set(new):
            before, after = old.get(key), new.get(key)
            if before == after:
                continue
            if (
                isinstance(before, dict)
                and isinstance(after, dict)
                and before.get("object") != "list"
            ):
                out[key] = diff(before, after)
            else:
                out[key] = copy.deepcopy(before)
        return out
    return copy.deepcopy(old)


def merge_metadata(current: dict[str, str], update: Any) -> dict[str, str]:
    """Stripe's metadata rules: "" clears everything, a key set to "" is removed."""
    if update == "":
        return {}
    merged = dict(current)
    for key, value in (update or {}).items():
        if value == "":
            merged.pop(key, None)
        else:
            merged[key] = str(value)
    return merged


def timestamp_filter(value: Any, actual: int) -> bool:
    """`created=123` or `created[gte]=...` style range filters."""
    if value is None:
        return True
    if isinstance(value, int):
        return actual == value
    checks = {
        "gt": lambda b: actual > b,
        "gte": lambda b: actual >= b,
        "lt": lambda b: actual < b,
        "lte": lambda b: actual <= b,
    }
    return all(checks[k](int(v)) for k, v in value.items() if k in checks)


def paginate(items: list[Obj], params: Params, url: str) -> Obj:
    """A Stripe list object over `items` (newest first) with cursor pagination."""
    limit = int(params.get("limit", 10))
    if not 1 <= limit <= 100:
        raise StripeError("Invalid limit: must be between 1 and 100", param="limit")
    ids = [item["id"] for item in items]
    start, stop = 0, len(items)
    if params.get("starting_after"):
        cursor = params["starting_after"]
        if cursor not in ids:
            raise missing(_kind_name(cursor), cursor, "starting_after")
        start = ids.index(cursor) + 1
        page = items[start : start + limit]
        has_more = start + limit < len(items)
    elif params.get("ending_before"):
        cursor = params["ending_before"]
        if cursor not in ids:
            raise missing(_kind_name(cursor), cursor, "ending_before")
        stop = ids.index(cursor)
        page = items[max(0, stop - limit) : stop]
        has_more = stop - limit > 0
    else:
        page = items[:limit]
        has_more = len(items) > limit
    return {"object": "list", "data": page, "has_more": has_more, "url": url}


def _kind_name(object_id: str) -> str:
    kind = KINDS_BY_PREFIX.get(object_id.split("_", 1)[0], "object")
    return kind.rsplit(".", 1)[-1].replace("_", " ")


def newest_first(objects: Iterable[Obj]) -> list[Obj]:
    return list(reversed(list(objects)))


# -- search ----------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<op>AND|OR)\b
      | (?P<neg>-)?(?P<field>metadata\[(?:'[^']*'|"[^"]*")\]|[a-z_][a-z_.]*)
        \s*(?P<cmp>:|~|>=|<=|>|<)\s*
        (?P<value>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|[^\s]+)
    )""",
    re.VERBOSE,
)


@dataclass
class Clause:
    negate: bool
    field: str
    comparison: str
    value: str


def parse_search(query: str) -> tuple[list[Clause], str]:
    """Stripe's search language: clauses joined by AND or by OR (not both)."""
    clauses: list[Clause] = []
    joins: set[str] = set()
    position = 0
    query = query.strip()
    while position < len(query):
        found = _TOKEN.match(query, position)
        if found is None or found.end() == position:
            raise StripeError(
                f"Invalid search query: could not parse at position {position} of '{query}'.",
                param="query",
            )
        position = found.end()
        if found.group("op"):
            joins.add(found.group("op"))
            continue
        value = found.group("value")
        if value[:1] in ("'", '"'):
            value = value[1:-1].replace("\\'", "'").replace('\\"', '"')
        clauses.append(
            Clause(bool(found.group("neg")), found.group("field"), found.group("cmp"), value)
        )
    if len(joins) > 1:
        raise StripeError(
            "Invalid search query: AND and OR cannot be combined in one query.", param="query"
        )
    if not clauses:
        raise StripeError("Missing required param: query.", param="query", code="parameter_missing")
    return clauses, (joins.pop() if joins else "AND")


def _field_value(obj: Obj, name: str) -> Any:
    if name.startswith("metadata["):
        return (obj.get("metadata") or {}).get(name[10:-2])
    value: Any = obj
    for part in name.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _clause_matches(obj: Obj, clause: Clause) -> bool:
    actual = _field_value(obj, clause.field)
    if clause.comparison in (">", "<", ">=", "<="):
        try:
            left, right = float(actual), float(clause.value)
        except (TypeError, ValueError):
            return False
        return {
            ">": left > right,
            "<": left < right,
            ">=": left >= right,
            "<=": left <= right,
        }[clause.comparison]
    if clause.value == "null":
        result = actual in (None, "")
    elif actual is None:
        result = False
    elif clause.comparison == "~":
        result = clause.value.lower() in str(actual).lower()
    elif isinstance(actual, bool):
        result = str(actual).lower() == clause.value.lower()
    else:
        result = str(actual).lower() == clause.value.lower()
    return result != clause.negate


def search(items: list[Obj], params: Params, url: str) -> Obj:
    """A `search_result` page; `page` is an opaque offset token."""
    clauses, join = parse_search(str(params.get("query", "")))
    combine = all if join == "AND" else any
    hits = [item for item in items if combine(_clause_matches(item, c) for c in clauses)]
    limit = int(params.get("limit", 10))
    if not 1 <= limit <= 100:
        raise StripeError("Invalid limit: must be between 1 and 100", param="limit")
    offset = 0
    if params.get("page"):
        try:
            offset = int(base64.urlsafe_b64decode(str(params["page"]).encode()).decode())
        except (ValueError, UnicodeDecodeError):
            raise StripeError("Invalid page token.", param="page") from None
    page = hits[offset : offset + limit]
    has_more = offset + limit < len(hits)
    next_page = (
        base64.urlsafe_b64encode(str(offset + limit).encode()).decode() if has_more else None
    )
    return {
        "object": "search_result",
        "data": page,
        "has_more": has_more,
        "next_page": next_page,
        "url": url,
    }
