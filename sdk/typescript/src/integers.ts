// Protocol integers fit a signed 64-bit integer (PROTOCOL.md §2.4, stage c3 of §3.6).
//
// The proto declares counters and sizes uint64, but every party stores them in something
// narrower (SQLite INTEGER, a Java long, PostgreSQL bigint). A value above 2^63 - 1 is refused
// where it enters — a request, a statement's payload — with OUT_OF_RANGE. Mirrors
// sdk/collateral_sync/_integers.py, including the order in which fields are examined, so that
// both SDKs name the same offending field.

import { type DescField, type DescMessage, type Message, ScalarType } from "@bufbuild/protobuf";
import { reflect, type ReflectMessage } from "@bufbuild/protobuf/reflect";
import { ErrorReason } from "./gen/collateral_sync/v1/errors_pb.js";
import { MalformedError } from "./errors.js";

/** The largest integer any protocol field may carry. */
export const MAX_INTEGER = 2n ** 63n - 1n;

type Kind = "integer" | "message" | "map";

interface Step {
  readonly field: DescField;
  readonly kind: Kind;
  readonly repeated: boolean;
  // For a repeated message whose only integer-holding fields are single integers: those
  // fields, so that a long list is scanned field by field (as the Python SDK does).
  readonly flat: readonly DescField[] | undefined;
}

// Worked out once per message type: the check runs on every statement.
const PLANS = new Map<string, readonly Step[]>();

function isUnsigned64(scalar: ScalarType | undefined): boolean {
  return scalar === ScalarType.UINT64 || scalar === ScalarType.FIXED64;
}

function makePlan(desc: DescMessage, visiting: ReadonlySet<string>): readonly Step[] {
  const inside = new Set(visiting).add(desc.typeName);
  const steps: Step[] = [];
  for (const field of desc.fields) {
    switch (field.fieldKind) {
      case "scalar":
        if (isUnsigned64(field.scalar)) steps.push({ field, kind: "integer", repeated: false, flat: undefined });
        break;
      case "list":
        if (field.listKind === "scalar" && isUnsigned64(field.scalar)) {
          steps.push({ field, kind: "integer", repeated: true, flat: undefined });
        } else if (field.listKind === "message") {
          pushMessageStep(steps, field, field.message, true, inside);
        }
        break;
      case "map":
        if (
          (field.mapKind === "scalar" && isUnsigned64(field.scalar)) ||
          (field.mapKind === "message" && holdsIntegers(field.message, inside))
        ) {
          steps.push({ field, kind: "map", repeated: true, flat: undefined });
        }
        break;
      case "message":
        pushMessageStep(steps, field, field.message, false, inside);
        break;
      case "enum":
        break;
    }
  }
  return steps;
}

function pushMessageStep(
  steps: Step[],
  field: DescField,
  message: DescMessage,
  repeated: boolean,
  visiting: ReadonlySet<string>,
): void {
  if (visiting.has(message.typeName)) {
    // A type that refers back to itself is looked at as if it could hold one.
    steps.push({ field, kind: "message", repeated, flat: undefined });
    return;
  }
  const inner = makePlan(message, visiting);
  if (inner.length === 0) return;
  const flat = inner.every((s) => s.kind === "integer" && !s.repeated) ? inner.map((s) => s.field) : undefined;
  steps.push({ field, kind: "message", repeated, flat });
}

function holdsIntegers(desc: DescMessage, visiting: ReadonlySet<string>): boolean {
  return visiting.has(desc.typeName) || makePlan(desc, visiting).length > 0;
}

function plan(desc: DescMessage): readonly Step[] {
  let found = PLANS.get(desc.typeName);
  if (found === undefined) {
    found = makePlan(desc, new Set());
    PLANS.set(desc.typeName, found);
  }
  return found;
}

function asBigInt(value: unknown): bigint {
  // 64-bit fields are bigint, or string with the jstype=JS_STRING option.
  return typeof value === "bigint" ? value : BigInt(String(value));
}

function mapKeyText(key: unknown): string {
  return typeof key === "string" ? `['${key}']` : `[${String(key)}]`;
}

/** The path and value of the first integer above the limit, if any. */
function tooLarge(message: ReflectMessage): [string, bigint] | undefined {
  for (const step of plan(message.desc)) {
    const { field } = step;
    const name = field.name;
    if (step.kind === "integer") {
      if (!step.repeated) {
        const value = asBigInt(message.get(field));
        if (value > MAX_INTEGER) return [name, value];
      } else {
        const list = message.get(field) as Iterable<unknown>;
        let index = 0;
        for (const item of list) {
          const value = asBigInt(item);
          if (value > MAX_INTEGER) return [`${name}[${index}]`, value];
          index += 1;
        }
      }
      continue;
    }
    let items: [string, ReflectMessage | bigint][] = [];
    if (step.kind === "map") {
      const map = message.get(field) as ReadonlyMap<unknown, unknown>;
      for (const [key, value] of map) {
        items.push([mapKeyText(key), typeof value === "object" ? (value as ReflectMessage) : asBigInt(value)]);
      }
    } else if (step.repeated && step.flat !== undefined) {
      const list = [...(message.get(field) as Iterable<ReflectMessage>)];
      for (const integer of step.flat) {
        const index = list.findIndex((item) => asBigInt(item.get(integer)) > MAX_INTEGER);
        const item = list[index];
        if (item !== undefined) return [`${name}[${index}].${integer.name}`, asBigInt(item.get(integer))];
      }
      continue;
    } else if (step.repeated) {
      items = [...(message.get(field) as Iterable<ReflectMessage>)].map((item, index) => [`[${index}]`, item]);
    } else if (message.isSet(field)) {
      items = [["", message.get(field) as ReflectMessage]];
    }
    for (const [suffix, item] of items) {
      if (typeof item === "bigint") {
        if (item > MAX_INTEGER) return [`${name}${suffix}`, item];
        continue;
      }
      const found = tooLarge(item);
      if (found !== undefined) return [`${name}${suffix}.${found[0]}`, found[1]];
    }
  }
  return undefined;
}

/**
 * Refuse (OUT_OF_RANGE) a message with an unsigned 64-bit field above MAX_INTEGER.
 *
 * Looks at every such field, in nested messages too; `prefix` names the message's path in
 * the error (for example "margin_call.").
 */
export function checkIntegers(schema: DescMessage, message: Message, prefix = ""): void {
  const found = tooLarge(reflect(schema, message));
  if (found === undefined) return;
  const where = `${prefix}${found[0]}`;
  const number = found[1];
  throw new MalformedError(
    `${where} above the protocol's largest integer (2^63 - 1): expected <= ${MAX_INTEGER}, got ${number}`,
    {
      reason: ErrorReason.OUT_OF_RANGE,
      metadata: { field: where, expected: `<= ${MAX_INTEGER}`, actual: String(number) },
      fieldViolations: { [where]: `must be <= ${MAX_INTEGER}` },
    },
  );
}
