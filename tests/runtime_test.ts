/**
 * Tests for runtime.ts: safetensors bytes (hand-made, round-tripped and the PyTorch-written fixtures), its error
 * messages, atomic writes, backend selection, and the wasm kernel fixes checked against the cpu backend, and AdamW's WebAssembly kernel against its source.
 * Run: deno test -A tests/runtime_test.ts
 */
import * as tf from "@tensorflow/tfjs";
import assert from "node:assert/strict";
import wabtInit from "wabt";
import { initBackend, requestWebGPUAdapter, wasmHeapBytes } from "../backend/runtime.ts";
import { ADAMW_WASM, ADAMW_WAT, COPY_ROWS_WASM, COPY_ROWS_WAT, registerWasmKernelFixes } from "../backend/kernels.ts";
import { decodeSafetensors, encodeSafetensors, readSafetensors, type SafetensorsTensor } from "../lib/safetensors.ts";
import { writeFileAtomic } from "../lib/files.ts";
import { testNeeding, WEBGPU_ADAPTER } from "./helpers.ts";

const FIXTURES = new URL("./fixtures/nanovlm-tiny-a/", import.meta.url).pathname;
const REPO_ROOT = new URL("../", import.meta.url).pathname;

// ---- Helpers ----

/** Deterministic values in [-1, 1) (a linear congruential generator), so failures reproduce. */
function randomValues(count: number, seed: number): Float32Array {
  let state = seed >>> 0;
  return Float32Array.from({ length: count }, () => {
    state = (Math.imul(state, 1664525) + 1013904223) >>> 0;
    return state / 2 ** 31 - 1;
  });
}

/** Switch to `backend`, run `build` in a tidy, and read every result back (with `data()`, which works on WebGPU). */
async function compute(backend: string, build: () => tf.Tensor[]): Promise<Float32Array[]> {
  await tf.setBackend(backend);
  const results = tf.tidy(build);
  const values = await Promise.all(results.map((t) => t.data() as Promise<Float32Array>));
  tf.dispose(results);
  return values;
}

function assertClose(actual: Float32Array, expected: Float32Array, tolerance: number, what: string): void {
  assert.equal(actual.length, expected.length, `${what}: length`);
  let worst = 0;
  for (let i = 0; i < actual.length; i++) worst = Math.max(worst, Math.abs(actual[i] - expected[i]));
  assert.ok(worst <= tolerance, `${what}: max |difference| ${worst} > ${tolerance}`);
}

/** Bytes of a safetensors file with a header written by hand, to test decoding independently of encoding. */
function handMade(header: Record<string, unknown>, data: Uint8Array = new Uint8Array()): Uint8Array {
  const json = new TextEncoder().encode(JSON.stringify(header));
  const bytes = new Uint8Array(8 + json.length + data.length);
  new DataView(bytes.buffer).setBigUint64(0, BigInt(json.length), true);
  bytes.set(json, 8);
  bytes.set(data, 8 + json.length);
  return bytes;
}

/** A hand-made file holding one tensor "x". */
const oneTensor = (dtype: string, shape: number[], data: Uint8Array) =>
  handMade({ x: { dtype, shape, data_offsets: [0, data.length] } }, data);

const u16Bytes = (values: number[]) => new Uint8Array(Uint16Array.from(values).buffer);

// ---- Safetensors ----

Deno.test("safetensors: F32, I32 and I64 round-trip with metadata, laid out as Python's safetensors lays them out", () => {
  const tensors = new Map([
    ["weight", { dtype: "F32" as const, shape: [2, 3], data: Float32Array.of(1.5, -2, 0, 3.25, 1e-8, -7) }],
    ["counts", { dtype: "I32" as const, shape: [3], data: Int32Array.of(0, -1, 2147483647) }],
    ["labels", { dtype: "I64" as const, shape: [2, 2], data: Int32Array.of(-100, 5, -2147483648, 299) }],
  ]);
  const bytes = encodeSafetensors(tensors, { format: "pt" });
  const headerLength = Number(new DataView(bytes.buffer).getBigUint64(0, true));
  assert.equal((8 + headerLength) % 8, 0);
  const header = JSON.parse(new TextDecoder().decode(bytes.subarray(8, 8 + headerLength)));
  assert.deepEqual(header.__metadata__, { format: "pt" });
  // By dtype (I64, F32, I32), then by name: the Map's order does not matter.
  assert.deepEqual(header.labels, { dtype: "I64", shape: [2, 2], data_offsets: [0, 32] });
  assert.deepEqual(header.weight, { dtype: "F32", shape: [2, 3], data_offsets: [32, 56] });
  assert.deepEqual(header.counts, { dtype: "I32", shape: [3], data_offsets: [56, 68] });

  const decoded = decodeSafetensors(bytes);
  assert.deepEqual([...decoded.tensors.keys()], ["labels", "weight", "counts"]); // file order
  assert.deepEqual(decoded.metadata, { format: "pt" });
  for (const [name, tensor] of tensors) assert.deepEqual(decoded.tensors.get(name), tensor, name);

  const plain = encodeSafetensors(new Map([["w", tensors.get("weight")!]]));
  assert.ok(!new TextDecoder().decode(plain).includes("__metadata__"), "no metadata written when none is given");
  assert.deepEqual(decodeSafetensors(plain).metadata, {});
});

Deno.test("safetensors: names sort as in Python's safetensors, by UTF-8 bytes, integer-like and astral ones too", () => {
  // A JS object would list "2" and "10" first; UTF-16 order would put the emoji (a surrogate pair) before U+FFFD.
  const names = ["b", "10", "\u{1F600}", "2", "\uFFFD", "B", "a.10", "a.9"];
  const one = { dtype: "F32" as const, shape: [1], data: Float32Array.of(1) };
  const bytes = encodeSafetensors(new Map(names.map((name) => [name, one])));
  const n = Number(new DataView(bytes.buffer).getBigUint64(0, true));
  const header = new TextDecoder().decode(bytes.subarray(8, 8 + n));
  const order = [...header.matchAll(/"([^"]+)":\{"dtype"/g)].map((m) => m[1]);
  assert.deepEqual(order, ["10", "2", "B", "a.10", "a.9", "b", "\uFFFD", "\u{1F600}"]);
  assert.ok(header.startsWith(`{"10":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"2":`), header);
});

Deno.test("safetensors: every header is padded with spaces so that the data starts at a multiple of 8, as in Python", () => {
  const floats = Float32Array.of(1, -2, 3), ids = Int32Array.of(-5, 7);
  // Names of 1 to 40 characters give JSON headers of every length modulo 8, with and without metadata.
  const metadatas = [undefined, ...[0, 1, 2, 3, 5, 8, 13].map((n) => ({ note: "m".repeat(n) }))];
  for (let length = 1; length <= 40; length++) {
    for (const metadata of metadatas) {
      const name = "abcdefghij".repeat(4).slice(0, length);
      const tensors = new Map([
        [name, { dtype: "F32" as const, shape: [3], data: floats }],
        ["ids", { dtype: "I64" as const, shape: [2], data: ids }],
      ]);
      const bytes = encodeSafetensors(tensors, metadata);
      const what = `a ${length}-character name, metadata ${JSON.stringify(metadata)}`;
      const n = Number(new DataView(bytes.buffer).getBigUint64(0, true));
      assert.equal((8 + n) % 8, 0, `${what}: 8 + ${n} header bytes`);
      const header = new TextDecoder().decode(bytes.subarray(8, 8 + n));
      const json = header.slice(0, header.lastIndexOf("}") + 1), padding = header.slice(json.length);
      assert.match(padding, /^ {0,7}$/, `${what}: the padding is up to 7 spaces, got ${JSON.stringify(padding)}`);
      assert.deepEqual(Object.keys(JSON.parse(json)), [...(metadata ? ["__metadata__"] : []), "ids", name]);
      assert.equal(bytes.length, 8 + n + 16 + 12, `${what}: file size`);
      const decoded = decodeSafetensors(bytes);
      assert.deepEqual(decoded.tensors.get(name)!.data, floats, what);
      assert.deepEqual(decoded.tensors.get("ids")!.data, ids, what);
      assert.deepEqual(decoded.metadata, metadata ?? {}, what);
    }
  }
});

/** The first index where two byte arrays differ (their common length if one is a prefix of the other), or -1. */
function firstDifference(a: Uint8Array, b: Uint8Array): number {
  const length = Math.min(a.length, b.length);
  for (let i = 0; i < length; i++) if (a[i] !== b[i]) return i;
  return a.length === b.length ? -1 : length;
}

/** Assert that two safetensors files are the same bytes; else name the first difference and the header around it. */
function assertSameFile(actual: Uint8Array, expected: Uint8Array, what: string): void {
  const i = firstDifference(actual, expected);
  if (i < 0) return;
  const ours = headerOf(actual).n, theirs = headerOf(expected).n;
  const around = (bytes: Uint8Array) =>
    JSON.stringify(new TextDecoder().decode(bytes.subarray(Math.max(8, i - 40), i + 40)));
  const where = i < 8
    ? `the header length: ours ${ours}, Python's ${theirs}`
    : i < 8 + theirs
    ? `header byte ${i - 8}: ours ${around(actual)}, Python's ${around(expected)}`
    : `data byte ${i - 8 - theirs}`;
  assert.fail(`${what}: ${actual.length} bytes vs Python's ${expected.length}; first difference at ${where}`);
}

/** A file's header: its length and its entries, in file order (no tensor name here is integer-like). */
function headerOf(bytes: Uint8Array) {
  const n = Number(new DataView(bytes.buffer, bytes.byteOffset).getBigUint64(0, true));
  const entries = JSON.parse(new TextDecoder().decode(bytes.subarray(8, 8 + n)));
  return { n, entries: entries as Record<string, { dtype: string; shape: number[]; data_offsets: [number, number] }> };
}

/** A decoded tensor as encodeSafetensors takes it (the fixtures hold F32 and I64 only). */
function encodable(t: SafetensorsTensor) {
  assert.ok(t.dtype === "F32" || t.dtype === "I64", t.dtype);
  return { ...t, dtype: t.dtype as "F32" | "I64" };
}

Deno.test("safetensors: re-encoding files Python's safetensors wrote gives them back byte for byte, in any Map order", async () => {
  for (const file of ["model", "hf_vit", "hf_lm"]) {
    const original = await Deno.readFile(`${FIXTURES}${file}.safetensors`);
    const { tensors, metadata } = decodeSafetensors(original);
    const inFileOrder = [...tensors].map(([name, t]) => [name, encodable(t)] as const);
    const keys = randomValues(inFileOrder.length, 7);
    const shuffled = inFileOrder.map((entry, i) => ({ entry, key: keys[i] })).sort((a, b) => a.key - b.key)
      .map(({ entry }) => entry);
    const orders = { file: inFileOrder, reversed: inFileOrder.toReversed(), shuffled };
    for (const [order, entries] of Object.entries(orders)) {
      const bytes = encodeSafetensors(new Map(entries), Object.keys(metadata).length ? metadata : undefined);
      assertSameFile(bytes, original, `${file}.safetensors re-encoded from the ${order} order`);
    }
  }
});

Deno.test("safetensors: a file of I64 and F32 tensors is laid out as Python's safetensors does: I64 first, each by name", async () => {
  // inputs and expected.safetensors mix the two dtypes. The fixture generator's own writer ordered them by name alone,
  // which no release of Python's safetensors does (from 0.3 on it groups by dtype), so compare them tensor by tensor.
  for (const file of ["inputs", "expected"]) {
    const original = await Deno.readFile(`${FIXTURES}${file}.safetensors`);
    const { tensors } = decodeSafetensors(original);
    const bytes = encodeSafetensors(new Map([...tensors].map(([name, t]) => [name, encodable(t)])));
    const names = (dtype: string) => [...tensors].filter(([, t]) => t.dtype === dtype).map(([name]) => name).sort();
    const ours = headerOf(bytes), theirs = headerOf(original);
    assert.deepEqual(Object.keys(ours.entries), [...names("I64"), ...names("F32")], `${file}: order`);
    assert.equal(bytes.length - ours.n, original.length - theirs.n, `${file}: data bytes`); // offsets' digits differ
    const raw = (b: Uint8Array, n: number, [from, to]: number[]) => b.subarray(8 + n + from, 8 + n + to);
    let end = 0;
    for (const [name, entry] of Object.entries(ours.entries)) {
      const their = theirs.entries[name];
      assert.deepEqual([entry.dtype, entry.shape], [their.dtype, their.shape], `${file}: ${name}`);
      assert.equal(entry.data_offsets[0], end, `${file}: ${name} starts where the tensor before it ends`);
      end = entry.data_offsets[1];
      const at = firstDifference(raw(bytes, ours.n, entry.data_offsets), raw(original, theirs.n, their.data_offsets));
      assert.equal(at, -1, `${file}: ${name}'s bytes differ from byte ${at}`);
    }
  }
});

Deno.test("safetensors: encoding refuses data that does not match dtype and shape", () => {
  const bad = (dtype: "F32" | "I32" | "I64", shape: number[], data: Float32Array | Int32Array) => () =>
    encodeSafetensors(new Map([["t", { dtype, shape, data }]]));
  assert.throws(bad("F32", [2], new Float32Array(3)), /"t": F32 \[2\] needs a Float32Array of 2 values/);
  assert.throws(bad("I64", [2], new Float32Array(2)), /needs a Int32Array/);
});

Deno.test("safetensors: the PyTorch-written fixtures decode (I64 ids, F32 weights, tied-weight metadata)", async () => {
  const inputs = await readSafetensors(`${FIXTURES}inputs.safetensors`);
  const ids = inputs.tensors.get("input_ids")!;
  assert.equal(ids.dtype, "I64");
  assert.deepEqual(ids.shape, [2, 48]);
  assert.ok(ids.data instanceof Int32Array && ids.data.length === 96);
  assert.ok(ids.data.every((id) => id >= 0 && id < 300), "token ids inside the vocabulary of 300");
  assert.ok(inputs.tensors.get("labels")!.data.includes(-100), "negative I64 values survive");
  assert.deepEqual(inputs.tensors.get("images")!.shape, [3, 3, 32, 32]);
  assert.ok(inputs.tensors.get("images")!.data instanceof Float32Array);

  const model = await readSafetensors(`${FIXTURES}model.safetensors`);
  assert.deepEqual(model.metadata, { "decoder.token_embedding.weight": "decoder.head.weight" });
  assert.ok(!model.tensors.has("decoder.token_embedding.weight"), "the tied copy is not stored");
  const head = model.tensors.get("decoder.head.weight")!;
  assert.deepEqual([head.dtype, head.shape], ["F32", [300, 64]]);
  assert.ok(head.data.every(Number.isFinite));
});

Deno.test("safetensors: BF16 and F16 decode to the right floats (subnormals, infinities, NaN, -0)", () => {
  // bfloat16 keeps the top 16 bits of a float32: 0x3F80 is 1, 0xC000 is -2, 0x4049 is 3.140625.
  const bf16 = decodeSafetensors(oneTensor("BF16", [4], u16Bytes([0x3F80, 0xC000, 0x4049, 0x0000]))).tensors.get("x")!;
  assert.equal(bf16.dtype, "BF16");
  assert.deepEqual([...bf16.data], [1, -2, 3.140625, 0]);

  const halves = [0x3C00, 0xC000, 0x7BFF, 0x0400, 0x0001, 0x8000, 0x7C00, 0xFC00, 0x7E00, 0x3555];
  const f16 = decodeSafetensors(oneTensor("F16", [2, 5], u16Bytes(halves))).tensors.get("x")!;
  assert.deepEqual(f16.shape, [2, 5]);
  const expected = [1, -2, 65504, 2 ** -14, 2 ** -24, -0, Infinity, -Infinity, NaN, 0.333251953125];
  expected.forEach((value, i) => assert.ok(Object.is(f16.data[i], value), `half 0x${halves[i].toString(16)}`));
});

Deno.test("safetensors: I64 values beyond int32 are refused, naming the file", () => {
  const tooBig = new Uint8Array(BigInt64Array.of(2n ** 31n).buffer);
  assert.throws(() => decodeSafetensors(oneTensor("I64", [1], tooBig), "ids.safetensors"), /ids\.safetensors.*int32/);
  const fits = new Uint8Array(BigInt64Array.of(-(2n ** 31n), 7n).buffer);
  assert.deepEqual([...decodeSafetensors(oneTensor("I64", [2], fits)).tensors.get("x")!.data], [-(2 ** 31), 7]);
});

Deno.test("safetensors: every malformed file gets an error that names it", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const missing = `${dir}/missing.safetensors`;
    await assert.rejects(readSafetensors(missing), { message: `not found: ${missing}` });

    const model = await Deno.readFile(`${FIXTURES}model.safetensors`);
    const truncated = `${dir}/truncated.safetensors`;
    await Deno.writeFile(truncated, model.subarray(0, model.length - 1000));
    await assert.rejects(readSafetensors(truncated), (e: Error) => {
      assert.match(e.message, new RegExp(`^${truncated}: truncated: expected \\d+ bytes of data, file has \\d+`));
      assert.match(e.message, /re-download or re-save/);
      return true;
    });

    const garbage = `${dir}/garbage.safetensors`;
    await Deno.writeFile(
      garbage,
      new Uint8Array([12, 0, 0, 0, 0, 0, 0, 0, ...new TextEncoder().encode("<html>oops</")]),
    );
    await assert.rejects(readSafetensors(garbage), new RegExp(`${garbage}: header is not JSON`));

    const tiny = `${dir}/tiny.safetensors`;
    await Deno.writeFile(tiny, new Uint8Array(5));
    await assert.rejects(readSafetensors(tiny), new RegExp(`${tiny}: not a safetensors file: 5 bytes`));

    const cutHeader = `${dir}/cut-header.safetensors`;
    await Deno.writeFile(cutHeader, model.subarray(0, 100));
    await assert.rejects(readSafetensors(cutHeader), new RegExp(`${cutHeader}: header length \\d+ goes beyond`));
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
  const wrongSize = oneTensor("F32", [3], new Uint8Array(8));
  assert.throws(
    () => decodeSafetensors(wrongSize, "w.safetensors"),
    /w\.safetensors: .*8 bytes, but F32 \[3\] needs 12/,
  );
  assert.throws(() => decodeSafetensors(oneTensor("C64", [1], new Uint8Array(8)), "c.st"), /c\.st: .*dtype C64/);
  assert.throws(() => decodeSafetensors(handMade({ x: { dtype: "F32" } }), "m.st"), /m\.st: .*malformed/);
});

// ---- Files ----

Deno.test("writeFileAtomic replaces the content and leaves no temporary file", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const path = `${dir}/config.json`;
    await writeFileAtomic(path, "first");
    await writeFileAtomic(path, new TextEncoder().encode("second, longer"));
    assert.equal(await Deno.readTextFile(path), "second, longer");
    const names = [];
    for await (const entry of Deno.readDir(dir)) names.push(entry.name);
    assert.deepEqual(names, ["config.json"]);
    await assert.rejects(writeFileAtomic(`${dir}/no/such/folder/x`, "x"));
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

// ---- Backend selection ----

Deno.test("initBackend: cpu and wasm by argument or NANOVLM_BACKEND; unknown names are refused", async () => {
  const saved = Deno.env.get("NANOVLM_BACKEND");
  try {
    Deno.env.delete("NANOVLM_BACKEND");
    assert.equal(await initBackend("cpu", { quiet: true }), "cpu");
    assert.equal(tf.getBackend(), "cpu");
    assert.equal(wasmHeapBytes(), null);
    assert.equal(await initBackend("wasm", { quiet: true }), "wasm");
    assert.equal(await initBackend("wasm", { quiet: true }), "wasm", "a second call is harmless");
    assert.equal(tf.getBackend(), "wasm");
    assert.ok(wasmHeapBytes()! >= 2 ** 20);

    Deno.env.set("NANOVLM_BACKEND", "cpu");
    assert.equal(await initBackend(undefined, { quiet: true }), "cpu");
    assert.equal(await initBackend("wasm", { quiet: true }), "wasm", "the argument wins over the environment");
    Deno.env.set("NANOVLM_BACKEND", "tpu");
    await assert.rejects(initBackend(undefined, { quiet: true }), /unknown backend "tpu" \(from NANOVLM_BACKEND\)/);
    await assert.rejects(
      initBackend("gpu" as "cpu", { quiet: true }),
      { message: 'unknown backend "gpu": expected one of webgpu, wasm, cpu' },
    );
  } finally {
    if (saved === undefined) Deno.env.delete("NANOVLM_BACKEND");
    else Deno.env.set("NANOVLM_BACKEND", saved);
  }
});

/** Run `code` in a fresh Deno process at the repository root (for its import map), with extra environment. */
async function runDeno(code: string, env: Record<string, string>): Promise<{ ok: boolean; output: string }> {
  const { success, stdout, stderr } = await new Deno.Command(Deno.execPath(), {
    args: ["eval", code],
    cwd: REPO_ROOT,
    env,
    stdout: "piped",
    stderr: "piped",
  }).output();
  return { ok: success, output: new TextDecoder().decode(stdout) + new TextDecoder().decode(stderr) };
}

Deno.test("initBackend without any WebGPU adapter: automatic picks wasm, explicit webgpu explains what to install", async () => {
  // Linux has no DirectX 12, so this environment leaves Deno without an adapter on any machine.
  const env = { DENO_WEBGPU_BACKEND: "dx12", NANOVLM_BACKEND: "" };
  const automatic = await runDeno(`import { initBackend } from "./backend/runtime.ts"; await initBackend();`, env);
  assert.ok(automatic.ok, automatic.output);
  assert.match(automatic.output, /^backend: wasm \| .* \| automatic: no WebGPU adapter$/m);

  const explicit = await runDeno(
    `import { initBackend } from "./backend/runtime.ts"; await initBackend("webgpu");`,
    env,
  );
  assert.ok(!explicit.ok, "an explicit webgpu request must fail without an adapter");
  assert.match(explicit.output, /no adapter/);
  assert.match(explicit.output, /mesa-vulkan-drivers/);
  assert.match(explicit.output, /NVIDIA driver and libvulkan1/);
});

// The test without an adapter is the one above, which hides this machine's.
const webgpuAdapter = await requestWebGPUAdapter();

testNeeding({ ...WEBGPU_ADAPTER, available: webgpuAdapter !== null }, {
  name: "initBackend with this machine's WebGPU adapter: automatic skips software ones, webgpu matMul = cpu",
  // The WebGPU device keeps internal async work alive after the test; that is Deno's, not a leak of ours.
  sanitizeOps: false,
  sanitizeResources: false,
  fn: async () => {
    const saved = Deno.env.get("NANOVLM_BACKEND");
    Deno.env.delete("NANOVLM_BACKEND");
    try {
      const automatic = await initBackend(undefined, { quiet: true });
      const software = webgpuAdapter!.info.isFallbackAdapter ||
        /llvmpipe|lavapipe|swiftshader/i.test(webgpuAdapter!.info.description);
      assert.equal(automatic, software ? "wasm" : "webgpu");
      assert.equal(await initBackend("webgpu", { quiet: true }), "webgpu");
      assert.equal(tf.getBackend(), "webgpu");
      const a = randomValues(3 * 17 * 9, 1), b = randomValues(3 * 11 * 9, 2);
      const product = () => [tf.matMul(tf.tensor3d(a, [3, 17, 9]), tf.tensor3d(b, [3, 11, 9]), false, true)];
      const [gpu] = await compute("webgpu", product);
      const [cpu] = await compute("cpu", product);
      assertClose(gpu, cpu, 1e-4, "webgpu batched matMul with transposeB");
    } finally {
      if (saved !== undefined) Deno.env.set("NANOVLM_BACKEND", saved);
      await tf.setBackend("cpu");
    }
  },
});

// ---- wasm kernel fixes ----

// [batch dims of a, batch dims of b]: plain 2-D, batched, 4-D, broadcast batches, one operand shared.
const BATCH_CASES = [[[], []], [[1], [1]], [[3], [3]], [[2, 3], [2, 3]], [[2, 1], [1, 3]], [[3], []], [[], [3]], [
  [4, 1],
  [3],
]];

Deno.test("wasm BatchMatMul = cpu for every transpose flag and batch layout, broadcast batches included", async () => {
  await initBackend("wasm", { quiet: true });
  let seed = 10;
  for (const [batchA, batchB] of BATCH_CASES) {
    // The stock kernels (cpu's too) only broadcast a batch of 1, so the cpu reference gets explicitly broadcast inputs.
    const batch = tf.broadcast_util.assertAndGetBroadcastShape(batchA, batchB);
    for (const transposeA of [false, true]) {
      for (const transposeB of [false, true]) {
        const [m, k, n] = [5, 7, 6];
        const matrixA = transposeA ? [k, m] : [m, k], matrixB = transposeB ? [n, k] : [k, n];
        const a = randomValues(tf.util.sizeFromShape([...batchA, ...matrixA]), seed++);
        const b = randomValues(tf.util.sizeFromShape([...batchB, ...matrixB]), seed++);
        const what = `[${batchA},${matrixA}]·[${batchB},${matrixB}] tA=${transposeA} tB=${transposeB}`;
        const [onWasm] = await compute("wasm", () => [
          tf.matMul(
            tf.tensor(a, [...batchA, ...matrixA]),
            tf.tensor(b, [...batchB, ...matrixB]),
            transposeA,
            transposeB,
          ),
        ]);
        const [onCpu] = await compute("cpu", () => [
          tf.matMul(
            tf.broadcastTo(tf.tensor(a, [...batchA, ...matrixA]), [...batch, ...matrixA]),
            tf.broadcastTo(tf.tensor(b, [...batchB, ...matrixB]), [...batch, ...matrixB]),
            transposeA,
            transposeB,
          ),
        ]);
        assertClose(onWasm, onCpu, 1e-4, what);
      }
    }
  }
});

Deno.test("wasm BatchMatMul gradients = cpu (attention-style transposeB, and a 2-D weight)", async () => {
  await initBackend("wasm", { quiet: true });
  const q = randomValues(2 * 4 * 8 * 16, 1), k = randomValues(2 * 4 * 8 * 16, 2), w = randomValues(2 * 4 * 8 * 8, 3);
  const x = randomValues(12 * 16, 4), weight = randomValues(16 * 10, 5);
  const build = () => {
    const weights = tf.tensor4d(w, [2, 4, 8, 8]);
    // (B, H, T, hd)·(B, H, T, hd)ᵀ → (B, H, T, T), weighted so every output has its own gradient.
    const attention = (qs: tf.Tensor, ks: tf.Tensor) => tf.sum(tf.mul(tf.matMul(qs, ks, false, true), weights));
    const linear = (xs: tf.Tensor, ws: tf.Tensor) => tf.sum(tf.square(tf.matMul(xs, ws)));
    return [
      ...tf.grads(attention)([tf.tensor4d(q, [2, 4, 8, 16]), tf.tensor4d(k, [2, 4, 8, 16])]),
      ...tf.grads(linear)([tf.tensor2d(x, [12, 16]), tf.tensor2d(weight, [16, 10])]),
    ];
  };
  const onWasm = await compute("wasm", build);
  const onCpu = await compute("cpu", build);
  ["dq", "dk", "dx", "dW"].forEach((name, i) => assertClose(onWasm[i], onCpu[i], 1e-4, name));
});

Deno.test("wasm kernel fixes leak nothing across repeated calls, and a shared-buffer clone outlives its source", async () => {
  await initBackend("wasm", { quiet: true });
  registerWasmKernelFixes(); // idempotent: a second registration must change nothing
  const a = tf.tensor3d(randomValues(4 * 9 * 5, 1), [4, 9, 5]), b = tf.tensor3d(randomValues(4 * 9 * 5, 2), [4, 9, 5]);
  const table = tf.tensor2d(randomValues(6 * 3, 3), [6, 3]), ids = tf.tensor1d([1, 3, 1], "int32");
  const step = () =>
    tf.tidy(() => {
      const [ga, gb] = tf.grads((x: tf.Tensor, y: tf.Tensor) => tf.sum(tf.matMul(x, y, true, false)))([a, b]);
      const gt = tf.grad((t: tf.Tensor) => tf.sum(tf.gather(t, ids)))(table);
      return tf.add(tf.sum(ga), tf.add(tf.sum(gb), tf.sum(gt)));
    });
  step().dispose(); // warm-up: first calls may create kernels' cached state
  // The kernels' temporaries live below the engine, so tf.memory() cannot see them: ask the backend too.
  const count = () => ({ ...tf.memory(), buffersInBackend: tf.engine().backend.numDataIds() });
  const before = count();
  for (let i = 0; i < 20; i++) step().dispose();
  const after = count();
  assert.equal(after.numTensors, before.numTensors);
  assert.equal(after.numDataBuffers, before.numDataBuffers);
  assert.equal(after.buffersInBackend, before.buffersInBackend);

  const clone = tf.clone(a);
  const expected = await a.data();
  tf.dispose([a, b, table, ids]);
  assert.deepEqual(await clone.data(), expected);
  clone.dispose();
});

Deno.test("wasm tf.gather has a gradient (JS UnsortedSegmentSum) equal to cpu; repeated ids accumulate", async () => {
  await initBackend("wasm", { quiet: true });
  const table = randomValues(7 * 5, 1), weights = randomValues(2 * 3 * 5, 2);
  const build = () => {
    const ids = tf.tensor2d([[1, 3, 1], [6, 3, 3]], [2, 3], "int32"); // id 3 three times, id 1 twice
    const w = tf.tensor3d(weights, [2, 3, 5]);
    const lookup = (t: tf.Tensor) => tf.sum(tf.mul(tf.gather(t, ids), w)); // (2, 3, 5)
    return [tf.grad(lookup)(tf.tensor2d(table, [7, 5]))];
  };
  const [onWasm] = await compute("wasm", build);
  const [onCpu] = await compute("cpu", build);
  assertClose(onWasm, onCpu, 1e-6, "d table");
  // Row 3 is the sum of three weight rows; row 0 was never looked up.
  const row = (r: number) => [...onWasm.subarray(r * 5, r * 5 + 5)];
  assert.deepEqual(row(0), [0, 0, 0, 0, 0]);
  const expected3 = [0, 1, 2, 3, 4].map((j) => weights[5 + j] + weights[20 + j] + weights[25 + j]);
  assertClose(Float32Array.from(row(3)), Float32Array.from(expected3), 1e-6, "row 3");
});

Deno.test("ADAMW_WASM is ADAMW_WAT assembled (wat2wasm from npm:wabt, SIMD and multi-memory)", async () => {
  const wabt = await wabtInit();
  const features = { simd: true, multi_memory: true }; // multi_memory is missing from wabt's typings, not from wabt
  const bytes = wabt.parseWat("adamw.wat", ADAMW_WAT, features as { simd: boolean }).toBinary({}).buffer;
  const base64 = btoa(String.fromCharCode(...bytes));
  assert.equal(ADAMW_WASM, base64, `ADAMW_WAT changed: set kernels.ts's ADAMW_WASM to\n${base64}`);
  assert(WebAssembly.validate(new Uint8Array(bytes)), "the kernel validates");
});

Deno.test("COPY_ROWS_WASM is COPY_ROWS_WAT assembled (bulk memory)", async () => {
  const wabt = await wabtInit();
  const bytes = wabt.parseWat("rows.wat", COPY_ROWS_WAT).toBinary({}).buffer;
  const base64 = btoa(String.fromCharCode(...bytes));
  assert.equal(COPY_ROWS_WASM, base64, `COPY_ROWS_WAT changed: set kernels.ts's COPY_ROWS_WASM to\n${base64}`);
});
