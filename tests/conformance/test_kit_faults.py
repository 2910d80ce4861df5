"""Each injected fault is caught by the cases meant for it, and by no others.

A fault proxy (:mod:`.fault_proxy`) sits between the kit and the reference
custodian and breaks one rule of the protocol; the kit runs the family of
cases the rule belongs to, and the set of failed cases must be exactly the
cases written for that rule. This shows both that the cases can fail and that
a failure points at the right place.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from collateral_sync.transport import TlsConfig
from collateral_sync.v1 import custodian_service_pb2
from collateral_sync_conformance import main
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from .conftest import CUSTODIAN, EXCHANGE, Parties, ServerProcess, further_tls, kit_argv
from .fault_proxy import Fault, FaultProxy, Refusal

_PLEDGE = "/collateral_sync.v1.CustodianService/PledgeCollateral"
#: What the reference itself does not do yet (a SHOULD): listed, so it is not mistaken for a catch.
KNOWN_FAILING = "# the reference servers pass every case; nothing is known to fail\n"


def _accept(reason: str, method: str | None = None) -> Fault:
    """A server that acts on statements it should refuse with ``reason``."""

    def on_refusal(called: str, refusal: Refusal) -> bytes | None:
        if refusal.reason == reason and (method is None or called == method):
            return b""  # an empty response: the call "succeeded"
        return None

    return Fault(f"accepts {reason}", on_refusal=on_refusal)


def _recode(old: grpc.StatusCode, new: grpc.StatusCode) -> Fault:
    def on_refusal(called: str, refusal: Refusal) -> Refusal | None:
        if refusal.code != old:
            return None
        return Refusal(new, refusal.details, refusal.trailing_metadata)

    return Fault(f"answers {new.name} for {old.name}", on_refusal=on_refusal)


def _without_details(called: str, refusal: Refusal) -> Refusal:
    kept = tuple((k, v) for k, v in refusal.trailing_metadata if k != "grpc-status-details-bin")
    return Refusal(refusal.code, refusal.details, kept)


def _corrupt_inclusion_proof(called: str, response: bytes) -> bytes | None:
    if called != "/collateral_sync.v1.CustodianService/GetInclusionProof":
        return None
    message = custodian_service_pb2.GetInclusionProofResponse.FromString(response)
    if not message.proof.audit_path:
        return None
    first = bytearray(message.proof.audit_path[0])
    first[0] ^= 0xFF
    message.proof.audit_path[0] = bytes(first)
    return message.SerializeToString()


def _rewrite_history(called: str, response: bytes) -> bytes | None:
    if called != "/collateral_sync.v1.CustodianService/GetConsistencyProof":
        return None
    message = custodian_service_pb2.GetConsistencyProofResponse.FromString(response)
    if not message.proof.consistency_path:
        return None
    last = bytearray(message.proof.consistency_path[-1])
    last[-1] ^= 0x01
    message.proof.consistency_path[-1] = bytes(last)
    return message.SerializeToString()


def _targets(slug: str) -> set[str]:
    return {
        f"envelope/{target}/{slug}"
        for target in ("pledge-collateral", "request-redemption", "submit-liquidation-instruction")
    }


_HEALTH_CHECK = "/grpc.health.v1.Health/Check"


def _not_serving(called: str, response: bytes) -> bytes | None:
    if called != _HEALTH_CHECK:
        return None
    return health_pb2.HealthCheckResponse(
        status=health_pb2.HealthCheckResponse.NOT_SERVING
    ).SerializeToString()


def _knows_every_service(called: str, refusal: Refusal) -> bytes | None:
    if called == _HEALTH_CHECK and refusal.code == grpc.StatusCode.NOT_FOUND:
        return health_pb2.HealthCheckResponse(
            status=health_pb2.HealthCheckResponse.SERVING
        ).SerializeToString()
    return None


def _lists_no_services(called: str, response: bytes) -> bytes | None:
    if not called.startswith("/grpc.reflection."):
        return None
    message = reflection_pb2.ServerReflectionResponse.FromString(response)
    if not message.HasField("list_services_response"):
        return None
    del message.list_services_response.service[:]
    return message.SerializeToString()


FAULTS: list[tuple[Fault, list[str], set[str]]] = [
    (
        _accept("SIGNATURE_INVALID", _PLEDGE),
        ["envelope/pledge-collateral/**"],
        {
            "envelope/pledge-collateral/forged-signature-refused",
            "envelope/pledge-collateral/malleated-signature-refused",
            "envelope/pledge-collateral/unverified-undecodable-payload-refused",
            "envelope/pledge-collateral/tampered-payload-refused",
        },
    ),
    (_accept("STATEMENT_EXPIRED"), ["envelope/**"], _targets("expired-refused")),
    (
        _accept("AUDIENCE_MISMATCH"),
        ["envelope/**"],
        _targets("wrong-audience-refused") | _targets("audience-anyone-refused"),
    ),
    (_accept("KEY_UNKNOWN"), ["envelope/**"], _targets("unknown-key-refused")),
    (_accept("TOO_LARGE"), ["envelope/**"], _targets("oversized-payload-refused")),
    (
        _accept("REPLAYED"),
        ["envelope/pledge-collateral/**"],
        {
            "envelope/pledge-collateral/replayed-refused",
            "envelope/pledge-collateral/lower-sequence-refused",
        },
    ),
    (
        _accept("INVALID_AMOUNT", _PLEDGE),
        ["envelope/pledge-collateral/*-amount-refused", "custodian/**"],
        {
            "envelope/pledge-collateral/invalid-amount-refused",
            "envelope/pledge-collateral/negative-amount-refused",
            # A path step's max_quantity is an amount too (§2.1).
            "custodian/path-with-bad-step-refused",
        },
    ),
    (
        _recode(grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.INVALID_ARGUMENT),
        ["attestation/**"],
        {
            "attestation/inclusion-index-out-of-range",
            "attestation/consistency-sizes-reversed-refused",
            "attestation/consistency-from-empty-refused",
            "attestation/tree-size-beyond-log-refused",
        },
    ),
    (
        Fault("drops the error details", on_refusal=_without_details),
        ["attestation/holdings-statement-*", "envelope/pledge-collateral/forged-signature-refused"],
        {
            "attestation/holdings-statement-unknown-account",
            "attestation/holdings-statement-account-required",
            "envelope/pledge-collateral/forged-signature-refused",
        },
    ),
    (
        Fault("sends a corrupt inclusion proof", on_response=_corrupt_inclusion_proof),
        ["attestation/**", "custodian/pledge-accepted"],
        {
            "attestation/inclusion-proof-verifies",
            "attestation/holdings-statement-attested",
            "custodian/pledge-accepted",
        },
    ),
    (
        Fault("rewrites history (a bad consistency proof)", on_response=_rewrite_history),
        ["attestation/**", "custodian/deposit-attested"],
        {"attestation/consistency-proof-verifies", "custodian/deposit-attested"},
    ),
    (
        Fault("reports itself NOT_SERVING", on_response=_not_serving),
        ["transport/**"],
        {"transport/health-serving"},
    ),
    (
        Fault("reports unknown services SERVING", on_refusal=_knows_every_service),
        ["transport/**"],
        {"transport/health-unknown-service-not-found"},
    ),
    (
        Fault("reflection lists no services", on_response=_lists_no_services),
        ["transport/**"],
        {
            "transport/reflection-lists-services",
            "transport/reflection-v1",
            "transport/reflection-v1alpha",
        },
    ),
    (
        Fault("answers unknown methods INTERNAL", unknown_method=grpc.StatusCode.INTERNAL),
        ["transport/**"],
        {"transport/unknown-method-unimplemented"},
    ),
    (
        Fault("also answers plaintext on its TLS port", answers_plaintext=True),
        ["transport/**"],
        {"transport/plaintext-refused"},
    ),
    (
        Fault("is wedged by abandoned calls", wedged_by_abandoned_calls=True),
        ["transport/**"],
        {"transport/deadline-exceeded-honoured"},
    ),
    (
        Fault("accepts clients without a certificate", require_client_auth=False),
        ["transport/**"],
        {"transport/mtls-required", "transport/untrusted-client-certificate-refused"},
    ),
]


@pytest.fixture
def proxy_for(custodian: ServerProcess, reference_parties: Parties) -> Iterator[list[FaultProxy]]:
    started: list[FaultProxy] = []
    yield started
    for proxy in started:
        proxy.stop()


@pytest.mark.parametrize(("fault", "run", "caught_by"), FAULTS, ids=[f.name for f, _, _ in FAULTS])
def test_the_fault_is_caught_by_its_cases(
    fault: Fault,
    run: list[str],
    caught_by: set[str],
    custodian: ServerProcess,
    reference_parties: Parties,
    kit_files: dict[str, Path],
    proxy_for: list[FaultProxy],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    proxy = FaultProxy(
        custodian.address,
        client_tls=TlsConfig.from_dev_pki(reference_parties.pki, EXCHANGE),
        server_tls=TlsConfig.from_dev_pki(reference_parties.pki, CUSTODIAN),
        fault=fault,
        identities=further_tls(reference_parties),
    )
    proxy_for.append(proxy)
    address = proxy.start()
    globs = [item for glob in run for item in ("--run", glob)]
    known = tmp_path / "known-failing.txt"
    known.write_text(KNOWN_FAILING, "utf-8")
    argv = kit_argv(
        kit_files,
        address,
        "--account",
        "acct-kit",
        "--known-failing",
        str(known),
        *globs,
        "--report-dir",
        str(tmp_path / "reports"),
    )
    code = main(argv)
    captured = capsys.readouterr()
    output = captured.out + captured.err
    assert code != 2, output
    cases = json.loads((tmp_path / "reports" / "results.json").read_text("utf-8"))["cases"]
    failed = {c["id"] for c in cases if c["verdict"] in ("failed", "error")}
    assert failed == caught_by, output
    assert not any(c["verdict"] == "error" for c in cases), output
    assert not any(c["verdict"] == "skipped" for c in cases), output
    # Non-zero exactly when a MUST case is among those caught.
    must = any(c["level"] == "MUST" for c in cases if c["id"] in caught_by)
    assert code == (1 if must else 0), output
    for case in cases:
        if case["id"] in caught_by:
            assert case["failure"]["expected"], case
            assert case["failure"]["got"], case
