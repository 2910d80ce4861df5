"""What failure reports show of a message: maps as mappings, enums by name, Decimals as text."""

from __future__ import annotations

from collateral_sync.v1 import common_pb2, errors_pb2, position_sync_pb2, test_control_pb2
from collateral_sync_conformance._expect import describe


def test_a_map_field_is_shown_as_a_mapping() -> None:
    close = position_sync_pb2.SyncClose(
        reason=errors_pb2.ERROR_REASON_EQUIVOCATION,
        message="two hashes at sequence 3",
        metadata={"expected": "ab", "actual": "cd"},
    )
    shown = describe(position_sync_pb2.SyncFrame(close=close))
    assert shown == {
        "close": {
            "reason": "ERROR_REASON_EQUIVOCATION",
            "message": "two hashes at sequence 3",
            "metadata": {"expected": "ab", "actual": "cd"},
        }
    }


def test_repeated_fields_and_decimals() -> None:
    entry = position_sync_pb2.SyncEntry(sequence=1, entry_hash=b"\x01" * 4)
    batch = position_sync_pb2.SyncBatch(entries=[entry, entry])
    assert describe(batch)["entries"] == [{"sequence": 1, "entry_hash": "01010101"}] * 2
    request = test_control_pb2.SetExposureRequest(
        account_id="a", exposure=common_pb2.Decimal(value="1.5")
    )
    assert describe(request) == {"account_id": "a", "exposure": "1.5"}
