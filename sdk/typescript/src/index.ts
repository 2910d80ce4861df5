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
// Verification core: errors, amounts, key registry, statements, Merkle proofs, checkpoints.
export * from "./errors.js";
export * from "./amounts.js";
export { KeyRegistry, keyId, roleName, type ResolveOptions } from "./registry.js";
export type { KeyRegistry as KeyRegistryMessage } from "./gen/collateral_sync/v1/keys_pb.js";
export { SignedKeyRegistry, REGISTRY_PAYLOAD_TYPE, MAX_REGISTRY_SIGNATURES } from "./signedRegistry.js";
export * from "./statements.js";
export * from "./signing.js";
export * from "./merkle.js";
export * from "./checkpoints.js";
// Sync hash chain (§6.3–§6.5) and position trees (§10.3).
export * from "./syncChain.js";
export * from "./positionTree.js";
// Valuation, credit, margin calls and liquidation (§7–§9), recomputable from signed inputs.
export * from "./valuation.js";
export { MAX_INTEGER, checkIntegers } from "./integers.js";
export { Ed25519VerifyKey } from "./ed25519.js";
export { decodeMessage } from "./decode.js";
// Network: mutual-TLS transport, error details from peers, typed clients (§12.2, §13).
export * from "./transport.js";
export * from "./clients.js";
// Position sync, exchange side (§6): session, durable received log, batch and update checks.
export {
  ExchangeSyncSession,
  PeerSilentError,
  DEFAULT_WINDOW,
  DEFAULT_HEARTBEAT_INTERVAL_MS,
  LIVENESS_INTERVALS,
  type ApplyResult,
  type ApplyUpdates,
  type ExchangeSessionOptions,
  type FrameChannel,
  type SyncEvent,
} from "./sync/session.js";
export {
  FileSyncStore,
  EMPTY_HEAD,
  type EquivocationEvidence,
  type LogHead,
  type ReceivedCommit,
  type ReceivedLogStore,
} from "./sync/store.js";
export { verifySyncBatch, SYNC_BATCH_TYPE, type VerifiedSyncBatch, type VerifyBatchOptions } from "./sync/batch.js";
export { validateUpdates, ALLOWED_VARIANTS, type ReceivedUpdate, type ValidateUpdatesOptions } from "./sync/updates.js";
export { PushQueue } from "./sync/queue.js";
