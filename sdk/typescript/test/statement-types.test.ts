// The payload-type table (PROTOCOL.md §3.5) covers every statement message of the generated
// code — every message whose field 1 is a StatementHeader — and nothing else.

import assert from "node:assert/strict";
import { test } from "node:test";
import type { DescFile, DescMessage } from "@bufbuild/protobuf";
import * as attestation from "../src/gen/collateral_sync/v1/attestation_pb.js";
import * as audit from "../src/gen/collateral_sync/v1/audit_pb.js";
import * as common from "../src/gen/collateral_sync/v1/common_pb.js";
import * as custodianService from "../src/gen/collateral_sync/v1/custodian_service_pb.js";
import * as emergency from "../src/gen/collateral_sync/v1/emergency_pb.js";
import * as emergencyService from "../src/gen/collateral_sync/v1/emergency_release_service_pb.js";
import * as envelope from "../src/gen/collateral_sync/v1/envelope_pb.js";
import * as equivocation from "../src/gen/collateral_sync/v1/equivocation_pb.js";
import * as exchangeService from "../src/gen/collateral_sync/v1/exchange_service_pb.js";
import * as keys from "../src/gen/collateral_sync/v1/keys_pb.js";
import * as liquidation from "../src/gen/collateral_sync/v1/liquidation_pb.js";
import * as margin from "../src/gen/collateral_sync/v1/margin_pb.js";
import * as pledgeRelease from "../src/gen/collateral_sync/v1/pledge_release_pb.js";
import * as positionSync from "../src/gen/collateral_sync/v1/position_sync_pb.js";
import * as reconciliation from "../src/gen/collateral_sync/v1/reconciliation_pb.js";
import * as reconciliationService from "../src/gen/collateral_sync/v1/reconciliation_service_pb.js";
import * as regulatorService from "../src/gen/collateral_sync/v1/regulator_service_pb.js";
import * as testControl from "../src/gen/collateral_sync/v1/test_control_pb.js";
import * as valuation from "../src/gen/collateral_sync/v1/valuation_pb.js";
import { PartyRole } from "../src/gen/collateral_sync/v1/common_pb.js";
import { ErrorReason } from "../src/gen/collateral_sync/v1/errors_pb.js";
import { isPublic, issuerRolesOf, PAYLOAD_TYPES, payloadTypeOf, schemaOf, STATEMENT_TYPES, statementTypeOf } from "../src/statements.js";
import { caught } from "./verification-fixtures.js";

const FILES: DescFile[] = [
  attestation.file_collateral_sync_v1_attestation,
  audit.file_collateral_sync_v1_audit,
  common.file_collateral_sync_v1_common,
  custodianService.file_collateral_sync_v1_custodian_service,
  emergency.file_collateral_sync_v1_emergency,
  emergencyService.file_collateral_sync_v1_emergency_release_service,
  envelope.file_collateral_sync_v1_envelope,
  equivocation.file_collateral_sync_v1_equivocation,
  exchangeService.file_collateral_sync_v1_exchange_service,
  keys.file_collateral_sync_v1_keys,
  liquidation.file_collateral_sync_v1_liquidation,
  margin.file_collateral_sync_v1_margin,
  pledgeRelease.file_collateral_sync_v1_pledge_release,
  positionSync.file_collateral_sync_v1_position_sync,
  reconciliation.file_collateral_sync_v1_reconciliation,
  reconciliationService.file_collateral_sync_v1_reconciliation_service,
  regulatorService.file_collateral_sync_v1_regulator_service,
  testControl.file_collateral_sync_v1_test_control,
  valuation.file_collateral_sync_v1_valuation,
];

function allMessages(): DescMessage[] {
  const out: DescMessage[] = [];
  const visit = (message: DescMessage): void => {
    out.push(message);
    message.nestedMessages.forEach(visit);
  };
  for (const file of FILES) file.messages.forEach(visit);
  return out;
}

test("every message with StatementHeader header = 1 is in the table, and only those", () => {
  const statements = allMessages()
    .filter((m) => {
      const first = m.fields.find((f) => f.number === 1);
      return first?.fieldKind === "message" && first.message.typeName === "collateral_sync.v1.StatementHeader";
    })
    .map((m) => m.typeName)
    .sort();
  assert.deepEqual(STATEMENT_TYPES.map((t) => t.schema.typeName).sort(), statements);
  assert.equal(STATEMENT_TYPES.length, 24);
});

test("payload types follow application/vnd.collateral-sync.v1.<name>+proto", () => {
  for (const row of STATEMENT_TYPES) {
    assert.equal(row.payloadType, `application/vnd.collateral-sync.v1.${row.name}+proto`);
    assert.equal(statementTypeOf(row.payloadType), row);
    assert.equal(payloadTypeOf(row.schema), row.payloadType);
    assert.equal(schemaOf(row.payloadType), row.schema);
    assert.equal(PAYLOAD_TYPES[row.name], row.payloadType);
  }
});

test("public types and issuers are those of §3.5", () => {
  assert.deepEqual(
    STATEMENT_TYPES.filter((t) => t.public).map((t) => t.name),
    ["checkpoint", "risk-policy", "price-snapshot", "reconciliation-result"],
  );
  assert.equal(isPublic(PAYLOAD_TYPES["holdings-statement"] ?? ""), false);
  assert.deepEqual([...issuerRolesOf(PAYLOAD_TYPES["emergency-release"] ?? "")].sort(), [
    PartyRole.CUSTODIAN,
    PartyRole.EXCHANGE,
    PartyRole.REGULATOR,
  ]);
  assert.deepEqual([...issuerRolesOf(PAYLOAD_TYPES["liquidation-path"] ?? "")], [PartyRole.CLIENT]);
});

test("unknown payload types and non-statement messages are PAYLOAD_TYPE_MISMATCH", () => {
  assert.equal(caught(() => statementTypeOf("application/json")).reason, ErrorReason.PAYLOAD_TYPE_MISMATCH);
  assert.equal(caught(() => statementTypeOf(envelope.EnvelopeSchema)).reason, ErrorReason.PAYLOAD_TYPE_MISMATCH);
});
