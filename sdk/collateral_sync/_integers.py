"""Protocol integers fit a signed 64-bit integer (docs/PROTOCOL.md §2.4).

The proto declares counters and sizes ``uint64``, but every party stores them
somewhere narrower: SQLite's INTEGER, a Java ``long``, PostgreSQL's
``bigint``. A value above 2^63 - 1 is refused where it enters — a request, a
statement's payload — with OUT_OF_RANGE, so that it never reaches storage as
an overflow (which a server would otherwise answer with INTERNAL).
"""

from __future__ import annotations

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from collateral_sync.errors import MalformedError
from collateral_sync.v1 import errors_pb2

__all__ = ["MAX_INTEGER", "check_integers"]

#: The largest integer any protocol field may carry.
MAX_INTEGER = 2**63 - 1

# Signed 64-bit types cannot exceed it; 32-bit types are far below it.
_UNSIGNED_64 = frozenset({FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64})


def check_integers(message: Message, prefix: str = "") -> None:
    """Refuse (OUT_OF_RANGE) a message with an unsigned 64-bit field above :data:`MAX_INTEGER`.

    Walks the set fields and nested messages; ``prefix`` names the message's
    path in the error (for example ``"margin_call."``).
    """
    for field, value in message.ListFields():
        path = f"{prefix}{field.name}"
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            entry = field.message_type
            if entry is not None and entry.GetOptions().map_entry:
                items = [(f"{path}[{key!r}]", item) for key, item in value.items()]
            elif field.is_repeated:
                items = [(f"{path}[{index}]", item) for index, item in enumerate(value)]
            else:
                items = [(path, value)]
            for item_path, item in items:
                if isinstance(item, Message):
                    check_integers(item, f"{item_path}.")
        elif field.type in _UNSIGNED_64:
            values = enumerate(value) if field.is_repeated else [(None, value)]
            for index, number in values:
                if number > MAX_INTEGER:
                    where = path if index is None else f"{path}[{index}]"
                    raise MalformedError(
                        f"{where} is {number}, above the protocol's largest integer "
                        f"{MAX_INTEGER} (2^63 - 1)",
                        reason=errors_pb2.ERROR_REASON_OUT_OF_RANGE,
                        metadata={
                            "field": where,
                            "expected": f"<= {MAX_INTEGER}",
                            "actual": str(number),
                        },
                        field_violations={where: f"must be <= {MAX_INTEGER}"},
                    )
