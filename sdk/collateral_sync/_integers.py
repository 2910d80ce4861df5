"""Protocol integers fit a signed 64-bit integer (docs/PROTOCOL.md §2.4).

The proto declares counters and sizes ``uint64``, but every party stores them
somewhere narrower: SQLite's INTEGER, a Java ``long``, PostgreSQL's
``bigint``. A value above 2^63 - 1 is refused where it enters — a request, a
statement's payload — with OUT_OF_RANGE, so that it never reaches storage as
an overflow (which a server would otherwise answer with INTERNAL).
"""

from __future__ import annotations

from collections.abc import Iterable

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from collateral_sync.errors import MalformedError
from collateral_sync.v1 import errors_pb2

__all__ = ["MAX_INTEGER", "check_integers"]

#: The largest integer any protocol field may carry.
MAX_INTEGER = 2**63 - 1

# Signed 64-bit types cannot exceed it; 32-bit types are far below it.
_UNSIGNED_64 = frozenset({FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64})

# What to look at in a message type: the fields that are, or can hold, an
# unsigned 64-bit integer. Worked out once per type: the check runs on every
# request and statement, sync batches of hundreds of entries included.
_INTEGER, _MESSAGE, _MAP = "integer", "message", "map"
# Field name, kind, repeated, and for a message whose only such fields are single
# integers their names, so that a long repeated field is scanned without a call per item.
_Step = tuple[str, str, bool, tuple[str, ...] | None]
_PLANS: dict[str, tuple[_Step, ...]] = {}


def check_integers(message: Message, prefix: str = "") -> None:
    """Refuse (OUT_OF_RANGE) a message with an unsigned 64-bit field above :data:`MAX_INTEGER`.

    Looks at every such field, in nested messages too; ``prefix`` names the
    message's path in the error (for example ``"margin_call."``).
    """
    found = _too_large(message)
    if found is None:
        return
    where, number = f"{prefix}{found[0]}", found[1]
    raise MalformedError(
        f"{where} is {number}, above the protocol's largest integer {MAX_INTEGER} (2^63 - 1)",
        reason=errors_pb2.ERROR_REASON_OUT_OF_RANGE,
        metadata={"field": where, "expected": f"<= {MAX_INTEGER}", "actual": str(number)},
        field_violations={where: f"must be <= {MAX_INTEGER}"},
    )


def _too_large(message: Message) -> tuple[str, int] | None:
    """The path and value of the first integer above the limit, if any."""
    descriptor: Descriptor = message.DESCRIPTOR  # type: ignore[assignment]  # upb or pure
    for name, kind, repeated, flat in _plan(descriptor):
        value = getattr(message, name)
        if kind == _INTEGER:
            if not repeated:
                if value > MAX_INTEGER:
                    return name, value
            elif value and max(value) > MAX_INTEGER:
                index = next(i for i, number in enumerate(value) if number > MAX_INTEGER)
                return f"{name}[{index}]", value[index]
            continue
        if kind == _MAP:
            items: Iterable[tuple[str, Message]] = (
                (f"[{key!r}]", item) for key, item in value.items()
            )
        elif repeated and flat is not None:
            for integer in flat:
                if value and max(getattr(item, integer) for item in value) > MAX_INTEGER:
                    index = next(
                        i for i, item in enumerate(value) if getattr(item, integer) > MAX_INTEGER
                    )
                    return f"{name}[{index}].{integer}", getattr(value[index], integer)
            continue
        elif repeated:
            items = ((f"[{index}]", item) for index, item in enumerate(value))
        elif message.HasField(name):
            items = (("", value),)
        else:
            continue
        for suffix, item in items:
            found = _too_large(item)
            if found is not None:
                return f"{name}{suffix}.{found[0]}", found[1]
    return None


def _plan(descriptor: Descriptor) -> tuple[_Step, ...]:
    plan = _PLANS.get(descriptor.full_name)
    if plan is None:
        plan = _PLANS[descriptor.full_name] = _make_plan(descriptor, set())
    return plan


def _make_plan(descriptor: Descriptor, visiting: set[str]) -> tuple[_Step, ...]:
    visiting = visiting | {descriptor.full_name}
    steps: list[_Step] = []
    for field in descriptor.fields:
        if field.type in _UNSIGNED_64:
            steps.append((field.name, _INTEGER, field.is_repeated, None))
            continue
        entry = field.message_type
        if field.type != FieldDescriptor.TYPE_MESSAGE or entry is None:
            continue
        if entry.GetOptions().map_entry:
            value = entry.fields_by_name["value"].message_type
            if value is not None and _holds_integers(value, visiting):
                steps.append((field.name, _MAP, True, None))
        elif entry.full_name in visiting:
            # A type that refers back to itself is looked at as if it could hold one.
            steps.append((field.name, _MESSAGE, field.is_repeated, None))
        elif inner := _make_plan(entry, visiting):
            flat = all(kind == _INTEGER and not many for _, kind, many, _ in inner)
            names = tuple(step[0] for step in inner) if flat else None
            steps.append((field.name, _MESSAGE, field.is_repeated, names))
    return tuple(steps)


def _holds_integers(descriptor: Descriptor, visiting: set[str]) -> bool:
    return descriptor.full_name in visiting or bool(_make_plan(descriptor, visiting))
