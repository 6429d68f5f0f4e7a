"""Parameter checking against the SDK's own request types.

The `stripe` package ships a TypedDict for every request of its pinned API
version (`stripe.params.SubscriptionCreateParams`, ...). Checking bodies
against those types gives the emulator Stripe's exact parameter surface:
a name Stripe would not know is a 400 `parameter_unknown`, a missing required
one a 400 `parameter_missing`, and form strings become ints, bools and lists
where the API says so.
"""

from __future__ import annotations

import builtins
import inspect
import sys
import typing
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from functools import cache
from typing import Any, ForwardRef, NotRequired, Required, Union, get_args, get_origin

from stripe._request_options import RequestOptions
from typing_extensions import is_typeddict

from stripe_emulator.errors import StripeError

_REQUEST_OPTION_KEYS = frozenset(RequestOptions.__annotations__)


class _Opaque:
    """Stands for a type the SDK imports only while type checking; accepts anything."""

    def __class_getitem__(cls, item: Any) -> type[_Opaque]:
        return cls


class _AnyName(dict[str, Any]):
    """Names the SDK imports only for type checking resolve to `_Opaque`."""

    def __missing__(self, key: str) -> Any:
        return getattr(builtins, key, _Opaque)


@dataclass(frozen=True)
class Node:
    """One compiled type: kind is any/scalar/literal/list/map/struct/union."""

    kind: str
    scalar: type | None = None
    literals: tuple[str, ...] = ()
    inner: tuple[Node, ...] = ()
    struct: type | None = field(default=None, compare=False)


ANY = Node("any")


def _evaluate(ref: Any, module: str) -> Any:
    namespace = vars(sys.modules[module]) if module in sys.modules else {}
    text = ref.__forward_arg__ if isinstance(ref, ForwardRef) else ref
    return eval(text, {"__builtins__": builtins}, _AnyName(namespace))


def compile_type(tp: Any, module: str) -> Node:
    """Turn an annotation of the SDK into a Node."""
    if isinstance(tp, (str, ForwardRef)):
        return compile_type(_evaluate(tp, module), module)
    origin = get_origin(tp)
    if origin in (NotRequired, Required, typing.NotRequired, typing.Required):
        return compile_type(get_args(tp)[0], module)
    if tp is Any or tp is _Opaque:
        return ANY
    if origin is Union or type(tp).__name__ == "UnionType":
        members = [compile_type(a, module) for a in get_args(tp) if a is not type(None)]
        return Node("union", inner=tuple(members))
    if origin is typing.Literal:
        return Node("literal", literals=tuple(str(a) for a in get_args(tp)))
    if origin in (list, typing.List):  # noqa: UP006
        args = get_args(tp)
        return Node("list", inner=(compile_type(args[0], module) if args else ANY,))
    if origin in (dict, dict, typing.Mapping) or (
        origin is not None and getattr(origin, "__name__", "") in ("Mapping", "UntypedStripeObject")
    ):
        args = get_args(tp)
        value = compile_type(args[-1], module) if args else ANY
        return Node("map", inner=(value,))
    if getattr(tp, "__name__", "") == "UntypedStripeObject":
        return Node("map", inner=(ANY,))
    if is_typeddict(tp):
        return Node("struct", struct=tp)
    if tp in (int, float, bool, str, Decimal):
        return Node("scalar", scalar=tp)
    return ANY


@cache
def struct_fields(cls: type, top: bool) -> tuple[dict[str, Node], frozenset[str]]:
    """The fields of a params TypedDict and its required names (request options dropped)."""
    fields: dict[str, Node] = {}
    for klass in reversed(cls.__mro__):
        annotations = inspect.get_annotations(klass)
        for name, annotation in annotations.items():
            if top and name in _REQUEST_OPTION_KEYS:
                continue
            fields[name] = compile_type(annotation, klass.__module__)
    required = frozenset(getattr(cls, "__required_keys__", frozenset())) - _REQUEST_OPTION_KEYS
    return fields, required


def _as_list(value: Any) -> list[Any] | None:
    if isinstance(value, list):
        return value
    if isinstance(value, dict) and all(k.isdigit() for k in value):
        return [value[k] for k in sorted(value, key=int)]
    return None


def _scalar(value: Any, scalar: type, param: str) -> Any:
    if not isinstance(value, str):
        raise StripeError(f"Invalid {scalar.__name__} value for {param}", param=param)
    if scalar is str:
        return value
    if scalar is bool:
        if value in ("true", "false"):
            return value == "true"
        raise StripeError(f"Invalid boolean: {value}", param=param)
    if scalar is int:
        try:
            return int(value)
        except ValueError:
            raise StripeError(
                f"Invalid integer: {value}", param=param, code="parameter_invalid_integer"
            ) from None
    if scalar is float:
        try:
            return float(value)
        except ValueError:
            raise StripeError(f"Invalid decimal: {value}", param=param) from None
    try:
        return Decimal(value)
    except InvalidOperation:
        raise StripeError(f"Invalid decimal: {value}", param=param) from None


def coerce(node: Node, value: Any, param: str) -> Any:
    """Check a parsed form value against a Node and return it typed."""
    if node.kind == "any":
        return value
    if node.kind == "scalar":
        assert node.scalar is not None
        return _scalar(value, node.scalar, param)
    if node.kind == "literal":
        if isinstance(value, str) and value in node.literals:
            return value
        choices = [v for v in node.literals if v]
        if value == "" and "" not in node.literals:
            raise StripeError(
                f"You passed an empty string for '{param}'. We assume empty values are an "
                "attempt to unset a parameter; however '{param}' cannot be unset. You should "
                f"remove '{param}' from your request or supply a non-empty value.",
                param=param,
                code="parameter_invalid_empty",
            )
        listed = ", ".join(choices[:-1]) + (", or " if len(choices) > 1 else "") + choices[-1]
        raise StripeError(f"Invalid {param}: must be one of {listed}", param=param)
    if node.kind == "list":
        items = _as_list(value)
        if items is None:
            raise StripeError(f"Invalid array for {param}", param=param)
        return [coerce(node.inner[0], item, f"{param}[{i}]") for i, item in enumerate(items)]
    if node.kind == "map":
        if not isinstance(value, dict):
            raise StripeError(f"Invalid object for {param}", param=param)
        return {k: coerce(node.inner[0], v, f"{param}[{k}]") for k, v in value.items()}
    if node.kind == "struct":
        assert node.struct is not None
        if not isinstance(value, dict):
            raise StripeError(f"Invalid object for {param}", param=param)
        return coerce_struct(node.struct, value, prefix=param)
    return _coerce_union(node, value, param)


def _coerce_union(node: Node, value: Any, param: str) -> Any:
    literal_choices: list[str] = []
    for member in node.inner:
        if member.kind == "literal":
            if isinstance(value, str) and value in member.literals:
                return value
            literal_choices.extend(member.literals)
    containers = [m for m in node.inner if m.kind in ("struct", "map", "list", "any")]
    scalars = [m for m in node.inner if m.kind == "scalar"]
    if isinstance(value, (dict, list)):
        if not containers:
            raise StripeError(f"Invalid value for {param}: expected a scalar", param=param)
        last_error: StripeError | None = None
        for member in containers:
            try:
                return coerce(member, value, param)
            except StripeError as exc:
                last_error = exc
        assert last_error is not None
        raise last_error
    order = {int: 0, float: 1, Decimal: 2, bool: 3, str: 4}
    scalars.sort(key=lambda m: order.get(m.scalar or str, 5))
    first_error: StripeError | None = None
    for member in scalars:
        try:
            return coerce(member, value, param)
        except StripeError as exc:
            first_error = first_error or exc
    if first_error is not None:
        raise first_error
    if literal_choices:
        return coerce(Node("literal", literals=tuple(literal_choices)), value, param)
    if any(m.kind == "any" for m in node.inner):
        return value
    raise StripeError(f"Invalid value for {param}", param=param)


def coerce_struct(cls: type, data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Check every key of `data` against a params TypedDict; unknown or missing keys are 400s."""
    fields, required = struct_fields(cls, prefix == "")
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}[{key}]" if prefix else key
        node = fields.get(key)
        if node is None:
            raise StripeError(
                f"Received unknown parameter: {name}", param=name, code="parameter_unknown"
            )
        out[key] = coerce(node, value, name)
    for key in sorted(required):
        if key not in data:
            name = f"{prefix}[{key}]" if prefix else key
            raise StripeError(
                f"Missing required param: {name}.", param=name, code="parameter_missing"
            )
    return out
