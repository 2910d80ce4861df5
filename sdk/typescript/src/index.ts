// The collateral-sync TypeScript SDK.
// Generated messages and services of collateral_sync.v1 (src/gen, from proto/ by `make gen`).
export * from "./gen/collateral_sync/v1/attestation_pb.js";
export * from "./gen/collateral_sync/v1/audit_pb.js";
export * from "./gen/collateral_sync/v1/common_pb.js";
export * from "./gen/collateral_sync/v1/custodian_service_pb.js";
export * from "./gen/collateral_sync/v1/emergency_pb.js";
export * from "./gen/collateral_sync/v1/emergency_release_service_pb.js";
export * from "./gen/collateral_sync/v1/envelope_pb.js";
export * from "./gen/collateral_sync/v1/equivocation_pb.js";
export * from "./gen/collateral_sync/v1/errors_pb.js";
export * from "./gen/collateral_sync/v1/exchange_service_pb.js";
export * from "./gen/collateral_sync/v1/keys_pb.js";
export * from "./gen/collateral_sync/v1/liquidation_pb.js";
export * from "./gen/collateral_sync/v1/margin_pb.js";
export * from "./gen/collateral_sync/v1/position_sync_pb.js";
export * from "./gen/collateral_sync/v1/reconciliation_pb.js";
export * from "./gen/collateral_sync/v1/reconciliation_service_pb.js";
export * from "./gen/collateral_sync/v1/regulator_service_pb.js";
export * from "./gen/collateral_sync/v1/test_control_pb.js";
export * from "./gen/collateral_sync/v1/valuation_pb.js";
