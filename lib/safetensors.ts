// lib/safetensors.ts — the safetensors file format, read and written as Python's `safetensors` library does.
//
// A file is an 8-byte little-endian header length n, n bytes of JSON ({"__metadata__": {...}, name: {dtype, shape,
// data_offsets}}) padded with spaces so that the data starts at a multiple of 8, then the tensors' raw bytes.

/** The dtypes {@link decodeSafetensors} reads. Floats decode to Float32Array, integers and BOOL to Int32Array. */
export type SafetensorsDtype = "F64" | "F32" | "F16" | "BF16" | "I64" | "I32" | "I16" | "I8" | "U8" | "BOOL";

/** One decoded tensor. `dtype` is the dtype stored in the file (a BF16 tensor still decodes to a Float32Array). */
export interface SafetensorsTensor {
  dtype: string;
  shape: number[];
  data: Float32Array | Int32Array;
}

/** A float32 tensor as stored in a safetensors file. */
export type F32Tensor = { dtype: "F32"; shape: number[]; data: Float32Array };

/** A decoded file: its tensors in file order, and its string-to-string `__metadata__` ({} when absent). */
export interface SafetensorsFile {
  tensors: Map<string, SafetensorsTensor>;
  metadata: Record<string, string>;
}

const DTYPE_BYTES: Record<SafetensorsDtype, number> = {
  F64: 8,
  F32: 4,
  F16: 2,
  BF16: 2,
  I64: 8,
  I32: 4,
  I16: 2,
  I8: 1,
  U8: 1,
  BOOL: 1,
};

/**
 * Parse the bytes of a .safetensors file. `source` (a path) is named in every error. Each tensor's bytes are
 * copied, so typed arrays are aligned and independent of `bytes`. Throws on a file shorter than 8 bytes, a header
 * that is cut off or not JSON, a data section shorter than the header promises (a truncated download), an
 * unknown dtype, a byte length that does not match the shape, and an I64 value outside the int32 range.
 */
export function decodeSafetensors(bytes: Uint8Array, source = "<bytes>"): SafetensorsFile {
  const fail = (why: string): never => {
    throw new Error(`${source}: ${why}`);
  };
  if (bytes.length < 8) fail(`not a safetensors file: ${bytes.length} bytes, the 8-byte header length is missing`);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const headerLength = Number(view.getBigUint64(0, true));
  if (8 + headerLength > bytes.length) {
    fail(`header length ${headerLength} goes beyond the file (${bytes.length} bytes): truncated or not safetensors`);
  }
  let header: Record<string, unknown>;
  try {
    header = JSON.parse(new TextDecoder().decode(bytes.subarray(8, 8 + headerLength)));
  } catch (e) {
    return fail(`header is not JSON (${(e as Error).message}): not a safetensors file?`);
  }
  const dataStart = 8 + headerLength, dataLength = bytes.length - dataStart;
  const { __metadata__: metadata = {}, ...entries } = header as Record<string, Record<string, unknown>>;

  // Check the promised size once, so a cut-off download gets one clear message rather than a per-tensor one.
  const ends = Object.values(entries).map((e) => (e.data_offsets as number[] | undefined)?.[1] ?? 0);
  const expected = Math.max(0, ...ends);
  if (expected > dataLength) {
    fail(`truncated: expected ${expected} bytes of data, file has ${dataLength}; re-download or re-save it`);
  }
  const tensors = new Map<string, SafetensorsTensor>();
  for (const [name, entry] of Object.entries(entries)) {
    const { dtype, shape, data_offsets: offsets } = entry as { dtype: string; shape: number[]; data_offsets: number[] };
    if (!Array.isArray(shape) || !Array.isArray(offsets)) fail(`tensor "${name}" has a malformed header entry`);
    if (!(dtype in DTYPE_BYTES)) fail(`tensor "${name}" has dtype ${dtype}; supported: ${Object.keys(DTYPE_BYTES)}`);
    const [begin, end] = offsets;
    const count = shape.reduce((p, d) => p * d, 1), needed = count * DTYPE_BYTES[dtype as SafetensorsDtype];
    if (end - begin !== needed) {
      fail(`tensor "${name}" has ${end - begin} bytes, but ${dtype} [${shape}] needs ${needed}`);
    }
    const raw = bytes.slice(dataStart + begin, dataStart + end).buffer; // a copy: aligned, and ours
    const tooBig = () => fail(`tensor "${name}" (I64) has a value outside the int32 range`);
    const data = decodeValues(dtype as SafetensorsDtype, raw, count, tooBig);
    tensors.set(name, { dtype, shape, data });
  }
  return { tensors, metadata: metadata as Record<string, string> };
}

// The format is little-endian, as is every machine Deno runs on, so raw bytes can be viewed directly.
function decodeValues(dtype: SafetensorsDtype, raw: ArrayBuffer, count: number, tooBig: () => never) {
  switch (dtype) {
    case "F32":
      return new Float32Array(raw);
    case "I32":
      return new Int32Array(raw);
    case "F64":
      return Float32Array.from(new Float64Array(raw));
    case "BF16": {
      // bfloat16 is the top half of a float32: shift the 16 bits back into place.
      const halves = new Uint16Array(raw), words = new Uint32Array(count);
      for (let i = 0; i < count; i++) words[i] = halves[i] << 16;
      return new Float32Array(words.buffer);
    }
    case "F16":
      return Float32Array.from(new Uint16Array(raw), halfToFloat);
    case "I64": {
      // Each value is a (low, high) pair of int32s; it fits int32 when high is the sign extension of low.
      const pairs = new Int32Array(raw), values = new Int32Array(count);
      for (let i = 0; i < count; i++) {
        if (pairs[2 * i + 1] !== pairs[2 * i] >> 31) tooBig();
        values[i] = pairs[2 * i];
      }
      return values;
    }
    case "I16":
      return Int32Array.from(new Int16Array(raw));
    case "I8":
      return Int32Array.from(new Int8Array(raw));
    case "U8":
    case "BOOL":
      return Int32Array.from(new Uint8Array(raw));
  }
}

/** IEEE half → float: 1 sign bit, 5 exponent bits (bias 15), 10 fraction bits. */
function halfToFloat(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exponent = (h >> 10) & 0x1f, fraction = h & 0x3ff;
  if (exponent === 0) return sign * fraction * 2 ** -24; // zero and subnormals: no implicit leading 1
  if (exponent === 31) return fraction === 0 ? sign * Infinity : NaN;
  return sign * (1 + fraction / 1024) * 2 ** (exponent - 15);
}

/** Read and decode a .safetensors file; a missing file throws "not found: <path>". */
export async function readSafetensors(path: string): Promise<SafetensorsFile> {
  let bytes: Uint8Array;
  try {
    bytes = await Deno.readFile(path);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) throw new Error(`not found: ${path}`);
    throw e;
  }
  return decodeSafetensors(bytes, path);
}

// The order in which Python's safetensors (0.3.1 on, its Rust core) lays out a file: tensors by dtype in descending
// order of its `Dtype` enum (for our dtypes I64, then F32, then I32), then by name, byte-wise. The header lists them in
// that same order, after "__metadata__".
const DTYPE_RANK: Record<"F32" | "I32" | "I64", number> = { I64: 0, F32: 1, I32: 2 };

/** Compare two names as Rust compares Strings: by their UTF-8 bytes, which is code point order (not UTF-16's). */
function compareCodePoints(a: string, b: string): number {
  const x = [...a].map((c) => c.codePointAt(0)!), y = [...b].map((c) => c.codePointAt(0)!);
  for (let i = 0; i < Math.min(x.length, y.length); i++) if (x[i] !== y[i]) return x[i] - y[i];
  return x.length - y.length;
}

/**
 * Encode tensors as safetensors bytes, byte for byte as Python's `safetensors.torch.save_file` writes them: tensors
 * ordered by dtype (I64, F32, I32) then by name whatever the Map's order, a compact JSON header with "__metadata__"
 * first (only when given) and each entry as {dtype, shape, data_offsets}, padded with spaces so that the data starts
 * at a multiple of 8. F32 takes a Float32Array, I32 an Int32Array, and I64 an
 * Int32Array written as little-endian int64 (so ids and labels round-trip with PyTorch's int64). Python writes several
 * metadata keys in an order of its hash map's choosing; here they keep the object's order.
 */
export function encodeSafetensors(
  tensors: Map<string, { dtype: "F32" | "I32" | "I64"; shape: number[]; data: Float32Array | Int32Array }>,
  metadata?: Record<string, string>,
): Uint8Array {
  for (const [name, { dtype, shape, data }] of tensors) {
    const count = shape.reduce((p, d) => p * d, 1);
    const wantFloat = dtype === "F32";
    if (name === "__metadata__") throw new Error(`"__metadata__" is reserved and cannot name a tensor`);
    if (data.length !== count || (data instanceof Float32Array) !== wantFloat) {
      throw new Error(
        `tensor "${name}": ${dtype} [${shape}] needs a ${wantFloat ? "Float32Array" : "Int32Array"} of ` +
          `${count} values, got a ${data.constructor.name} of ${data.length}`,
      );
    }
  }
  const ordered = [...tensors].sort(([nameA, a], [nameB, b]) =>
    DTYPE_RANK[a.dtype] - DTYPE_RANK[b.dtype] || compareCodePoints(nameA, nameB)
  );
  // The header is written out entry by entry: a JS object would put integer-like names ("0", "12") first.
  const entries = metadata ? [`"__metadata__":${JSON.stringify(metadata)}`] : [];
  let offset = 0;
  for (const [name, { dtype, shape, data }] of ordered) {
    const size = data.length * DTYPE_BYTES[dtype];
    entries.push(`${JSON.stringify(name)}:${JSON.stringify({ dtype, shape, data_offsets: [offset, offset + size] })}`);
    offset += size;
  }
  const json = new TextEncoder().encode(`{${entries.join(",")}}`);
  const headerLength = Math.ceil(json.length / 8) * 8; // padded with spaces, so that the data is 8-byte aligned
  const out = new Uint8Array(8 + headerLength + offset);
  new DataView(out.buffer).setBigUint64(0, BigInt(headerLength), true);
  out.set(json, 8);
  out.fill(0x20, 8 + json.length, 8 + headerLength);
  let position = 8 + headerLength;
  for (const [, { dtype, data }] of ordered) {
    if (dtype === "I64") {
      // Sign-extend each int32 into a (low, high) pair.
      const pairs = new Int32Array(data.length * 2);
      data.forEach((v, i) => {
        pairs[2 * i] = v;
        pairs[2 * i + 1] = v < 0 ? -1 : 0;
      });
      out.set(new Uint8Array(pairs.buffer), position);
      position += pairs.byteLength;
    } else {
      out.set(new Uint8Array(data.buffer, data.byteOffset, data.byteLength), position);
      position += data.byteLength;
    }
  }
  return out;
}
