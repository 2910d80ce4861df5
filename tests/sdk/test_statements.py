"""The payload-type table must cover every statement in the proto, as the proto names it."""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import collateral_sync.v1
import pytest
from collateral_sync import statements
from collateral_sync.errors import MalformedError
from collateral_sync.statements import (
    STATEMENT_TYPES,
    is_public,
    issuer_roles_of,
    message_class_of,
    payload_type_of,
    statement_type_of,
)
from collateral_sync.v1 import (
    attestation_pb2,
    common_pb2,
    custodian_service_pb2,
    emergency_pb2,
    envelope_pb2,
    errors_pb2,
)
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

PROTO_DIR = Path(__file__).resolve().parents[2] / "proto" / "collateral_sync" / "v1"
PREFIX = "application/vnd.collateral-sync.v1."
C = common_pb2.PARTY_ROLE_CUSTODIAN
E = common_pb2.PARTY_ROLE_EXCHANGE
R = common_pb2.PARTY_ROLE_REGULATOR
CL = common_pb2.PARTY_ROLE_CLIENT

# Issuer roles as the protocol brief assigns them, written out independently of the module.
EXPECTED_ROLES = {
    "holdings-statement": {C},
    "checkpoint": {C},
    "liquidation-receipt": {C},
    "emergency-release-receipt": {C},
    "margin-call-response": {C},
    "risk-policy": {E},
    "price-snapshot": {E},
    "credit-line": {E},
    "margin-call": {E},
    "margin-call-state": {E},
    "liquidation-instruction": {E},
    "shortfall-allocation": {E},
    "settlement-instruction": {E},
    "reconciliation-result": {R},
    "reconciliation-statement": {C, E},
    "settlement-dispute": {C, E},
    "sync-batch": {C, E},
    "emergency-release": {R, C, E},
    "liquidation-path": {CL},
    "pledge-instruction": {CL},
    "redemption-request": {CL},
    "pledge-release-request": {CL},
    "pledge-release-consent": {E},
    "pledge-release-receipt": {C},
}
EXPECTED_PUBLIC = {"checkpoint", "risk-policy", "reconciliation-result", "price-snapshot"}


def _all_descriptors(descriptor: Descriptor) -> list[Descriptor]:
    found = [descriptor]
    for nested in descriptor.nested_types:
        found.extend(_all_descriptors(nested))
    return found


def _generated_statement_classes() -> dict[str, type[Message]]:
    """Every generated message with a StatementHeader field, by full name."""
    found: dict[str, type[Message]] = {}
    for info in pkgutil.iter_modules(collateral_sync.v1.__path__):
        if not info.name.endswith("_pb2"):
            continue
        module = importlib.import_module(f"collateral_sync.v1.{info.name}")
        for top in module.DESCRIPTOR.message_types_by_name.values():
            for descriptor in _all_descriptors(top):
                # Any StatementHeader field, whatever its name, makes a statement.
                if any(
                    field.type == FieldDescriptor.TYPE_MESSAGE
                    and field.message_type is not None
                    and field.message_type.full_name == "collateral_sync.v1.StatementHeader"
                    for field in descriptor.fields
                ):
                    # Nested classes are attributes of their containing class.
                    path = descriptor.full_name.removeprefix("collateral_sync.v1.").split(".")
                    cls = module
                    for part in path:
                        cls = getattr(cls, part)
                    found[descriptor.full_name] = cls  # type: ignore[assignment]
    return found


def test_every_generated_statement_message_is_in_the_table() -> None:
    generated = _generated_statement_classes()
    in_table = {
        row.message_class.DESCRIPTOR.full_name: row.message_class for row in STATEMENT_TYPES
    }
    assert len(generated) >= 21
    missing = sorted(set(generated) - set(in_table))
    assert not missing, f"statement messages missing from STATEMENT_TYPES: {missing}"
    extra = sorted(set(in_table) - set(generated))
    assert not extra, f"table rows that are not statement messages: {extra}"
    for name, cls in generated.items():
        assert in_table[name] is cls


def test_every_statement_has_its_header_as_field_1() -> None:
    for row in STATEMENT_TYPES:
        field = row.message_class.DESCRIPTOR.fields_by_name["header"]
        assert field.number == 1, row.payload_type


def test_payload_types_match_the_proto_comments() -> None:
    # The comment above each statement message names its payload type.
    declared: dict[str, str] = {}
    pattern = re.compile(r"((?:^//[^\n]*\n)+)message (\w+) \{", re.MULTILINE)
    for proto in PROTO_DIR.glob("*.proto"):
        for comment, name in pattern.findall(proto.read_text(encoding="utf-8")):
            match = re.search(r'"(application/vnd\.collateral-sync\.v1\.[a-z-]+\+proto)"', comment)
            if match:
                declared[name] = match.group(1)
    table = {row.message_class.DESCRIPTOR.name: row.payload_type for row in STATEMENT_TYPES}
    assert table == declared


def test_table_has_the_brief_roles_and_public_types() -> None:
    names = {
        row.payload_type.removeprefix(PREFIX).removesuffix("+proto"): row for row in STATEMENT_TYPES
    }
    assert set(names) == set(EXPECTED_ROLES)
    for name, row in names.items():
        assert set(row.issuer_roles) == EXPECTED_ROLES[name], name
        assert issuer_roles_of(row.payload_type) == frozenset(EXPECTED_ROLES[name])
        assert row.public is (name in EXPECTED_PUBLIC), name
        assert is_public(row.payload_type) is (name in EXPECTED_PUBLIC)


def test_payload_types_are_unique_and_well_formed() -> None:
    types = [row.payload_type for row in STATEMENT_TYPES]
    assert len(types) == len(set(types)) == 24
    for payload_type in types:
        assert re.fullmatch(
            r"application/vnd\.collateral-sync\.v1\.[a-z]+(-[a-z]+)*\+proto", payload_type
        )


def test_lookups_both_ways() -> None:
    holdings = "application/vnd.collateral-sync.v1.holdings-statement+proto"
    assert payload_type_of(attestation_pb2.HoldingsStatement) == holdings
    assert payload_type_of(attestation_pb2.HoldingsStatement(account_id="a")) == holdings
    assert message_class_of(holdings) is attestation_pb2.HoldingsStatement
    assert (
        payload_type_of(custodian_service_pb2.PledgeInstruction)
        == "application/vnd.collateral-sync.v1.pledge-instruction+proto"
    )
    assert statement_type_of(holdings) is statement_type_of(attestation_pb2.HoldingsStatement)
    for row in STATEMENT_TYPES:
        assert message_class_of(payload_type_of(row.message_class)) is row.message_class


def test_emergency_release_may_be_issued_by_three_roles() -> None:
    assert issuer_roles_of(payload_type_of(emergency_pb2.EmergencyRelease)) == {R, C, E}
    assert CL not in issuer_roles_of(payload_type_of(emergency_pb2.EmergencyRelease))


@pytest.mark.parametrize(
    "payload_type",
    [
        "application/vnd.collateral-sync.v1.unknown+proto",
        "application/vnd.collateral-sync.v2.holdings-statement+proto",
        "application/vnd.collateral-sync.v1.holdings-statement+json",
        "",
    ],
)
def test_unknown_payload_type_is_a_type_mismatch(payload_type: str) -> None:
    for lookup in (message_class_of, issuer_roles_of, is_public):
        with pytest.raises(MalformedError) as info:
            lookup(payload_type)
        assert info.value.reason == errors_pb2.ERROR_REASON_PAYLOAD_TYPE_MISMATCH
        assert info.value.metadata["actual"] == payload_type


def test_non_statement_message_has_no_payload_type() -> None:
    for not_a_statement in (envelope_pb2.Envelope, attestation_pb2.InclusionProof()):
        with pytest.raises(MalformedError) as info:
            payload_type_of(not_a_statement)
        assert info.value.reason == errors_pb2.ERROR_REASON_PAYLOAD_TYPE_MISMATCH


def test_rows_are_frozen() -> None:
    row = STATEMENT_TYPES[0]
    with pytest.raises(AttributeError):
        row.public = True  # type: ignore[misc]
    assert "STATEMENT_TYPES" in statements.__all__
