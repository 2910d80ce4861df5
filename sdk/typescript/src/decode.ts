// Decoding protobuf bytes the way the reference runtimes (upb, C++, Java, Go) do.
//
// The protobuf encoding rules say that a record whose field number is known but whose wire
// type does not fit the field (a string field sent as a varint, say) is an unknown field.
// upb — behind the Python SDK — follows that rule; @bufbuild/protobuf's fromBinary (2.17)
// instead reads such a record with the field's own type, which either throws or silently
// reads different values. Two verifiers of one signed payload must not disagree about what it
// says (§3.6 stage c1), so decodeMessage first drops those records, at every nesting level,
// and hands the rest to fromBinary. Bytes with no such record are decoded as they are.

import { type DescField, type DescMessage, fromBinary, type MessageShape, ScalarType } from "@bufbuild/protobuf";
import { BinaryReader, WireType } from "@bufbuild/protobuf/wire";

const RECURSION_LIMIT = 100; // as upb and fromBinary
const MAX_VARINT_BYTES = 10;

function scalarWireType(scalar: ScalarType): WireType {
  switch (scalar) {
    case ScalarType.DOUBLE:
    case ScalarType.FIXED64:
    case ScalarType.SFIXED64:
      return WireType.Bit64;
    case ScalarType.FLOAT:
    case ScalarType.FIXED32:
    case ScalarType.SFIXED32:
      return WireType.Bit32;
    case ScalarType.STRING:
    case ScalarType.BYTES:
      return WireType.LengthDelimited;
    default:
      return WireType.Varint;
  }
}

function messageWireType(field: { delimitedEncoding: boolean }): WireType {
  return field.delimitedEncoding ? WireType.StartGroup : WireType.LengthDelimited;
}

/** Whether a record of `wireType` may carry `field`; repeated numbers may come packed or not. */
function fits(field: DescField, wireType: WireType): boolean {
  switch (field.fieldKind) {
    case "scalar":
      return wireType === scalarWireType(field.scalar);
    case "enum":
      return wireType === WireType.Varint;
    case "message":
      return wireType === messageWireType(field);
    case "map":
      return wireType === WireType.LengthDelimited;
    case "list":
      if (field.listKind === "message") return wireType === messageWireType(field);
      if (field.listKind === "enum") return wireType === WireType.Varint || wireType === WireType.LengthDelimited;
      return (
        wireType === scalarWireType(field.scalar) ||
        (wireType === WireType.LengthDelimited && field.scalar !== ScalarType.STRING && field.scalar !== ScalarType.BYTES)
      );
  }
}

/** How to read what is inside a length-delimited record of a known field, if it is a message. */
type Inner = { kind: "message"; desc: DescMessage } | { kind: "mapEntry"; field: DescField & { fieldKind: "map" } };

function innerOf(field: DescField, wireType: WireType): Inner | undefined {
  if (wireType !== WireType.LengthDelimited) return undefined;
  if (field.fieldKind === "message") return { kind: "message", desc: field.message };
  if (field.fieldKind === "list" && field.listKind === "message") return { kind: "message", desc: field.message };
  if (field.fieldKind === "map") return { kind: "mapEntry", field };
  return undefined;
}

/** Whether a map entry record (1: key, 2: value) fits the map field. */
function entryFits(field: DescField & { fieldKind: "map" }, number: number, wireType: WireType): boolean {
  if (number === 1) return wireType === scalarWireType(field.mapKey);
  if (number !== 2) return true; // unknown entry fields are skipped by every runtime
  switch (field.mapKind) {
    case "scalar":
      return wireType === scalarWireType(field.scalar);
    case "enum":
      return wireType === WireType.Varint;
    case "message":
      return wireType === WireType.LengthDelimited;
  }
}

function varintBytes(value: number): number[] {
  const out: number[] = [];
  let rest = value;
  while (rest > 0x7f) {
    out.push((rest & 0x7f) | 0x80);
    rest = Math.floor(rest / 128);
  }
  out.push(rest);
  return out;
}

function concat(chunks: readonly Uint8Array[]): Uint8Array {
  const out = new Uint8Array(chunks.reduce((n, c) => n + c.length, 0));
  let offset = 0;
  for (const chunk of chunks) {
    out.set(chunk, offset);
    offset += chunk.length;
  }
  return out;
}

/**
 * The bytes without records whose wire type does not fit their known field, at every level;
 * the input itself when there are none.
 */
function withoutMisfits(inner: Inner, bytes: Uint8Array, depth: number): Uint8Array {
  if (depth > RECURSION_LIMIT) throw new Error("maximum recursion depth reached");
  const reader = new BinaryReader(bytes);
  const chunks: Uint8Array[] = [];
  let changed = false;
  while (reader.pos < reader.len) {
    const recordStart = reader.pos;
    const [number, wireType] = reader.tag();
    const valueStart = reader.pos;
    const data = reader.skip(wireType, number, RECURSION_LIMIT - depth);
    if (wireType === WireType.Varint && data.length > MAX_VARINT_BYTES) {
      throw new Error(`varint of field ${number} is longer than ${MAX_VARINT_BYTES} bytes`);
    }
    const record = bytes.subarray(recordStart, reader.pos);
    let field: DescField | undefined;
    let keep: boolean;
    if (inner.kind === "message") {
      field = inner.desc.fields.find((f) => f.number === number);
      keep = field === undefined || fits(field, wireType);
    } else {
      keep = entryFits(inner.field, number, wireType);
      const mapField = inner.field;
      field = number === 2 && mapField.mapKind === "message" ? mapField : undefined;
    }
    if (!keep) {
      changed = true; // an unknown field to upb; never read as the known one
      continue;
    }
    const nested: Inner | undefined =
      field === undefined
        ? undefined
        : inner.kind === "mapEntry"
          ? field.fieldKind === "map" && field.mapKind === "message"
            ? { kind: "message", desc: field.message }
            : undefined
          : innerOf(field, wireType);
    if (nested === undefined) {
      chunks.push(record);
      continue;
    }
    // Re-read the length prefix to find the content of the length-delimited record.
    const lengthReader = new BinaryReader(bytes.subarray(valueStart, reader.pos));
    const length = lengthReader.uint32();
    const content = bytes.subarray(valueStart + lengthReader.pos, valueStart + lengthReader.pos + length);
    const cleaned = withoutMisfits(nested, content, depth + 1);
    if (cleaned === content) {
      chunks.push(record);
      continue;
    }
    changed = true;
    chunks.push(bytes.subarray(recordStart, valueStart), Uint8Array.from(varintBytes(cleaned.length)), cleaned);
  }
  return changed ? concat(chunks) : bytes;
}

/**
 * Decode `bytes` as a message of `schema`, treating records whose wire type does not fit
 * their field as unknown fields (as upb does). Throws like fromBinary on bytes that are not
 * a message at all.
 */
export function decodeMessage<Desc extends DescMessage>(schema: Desc, bytes: Uint8Array): MessageShape<Desc> {
  return fromBinary(schema, withoutMisfits({ kind: "message", desc: schema }, bytes, 1));
}
