// Shared test helpers: the nanovlm-tiny-a fixture, a micro model config, tolerant tensor comparison, leak checks,
// environment variables set for the length of a call, and tests that need something installed (ignored without it,
// failed without it under CI).

import * as tf from "@tensorflow/tfjs";
import { PRESETS, type VLMConfig } from "../nanovlm.ts";
import { readSafetensors, type SafetensorsTensor } from "../lib/safetensors.ts";
import { crc32 } from "../lib/image_bytes.ts";

/** The PyTorch reference fixture folder (a copy of ../shared/fixtures/nanovlm-tiny-a). */
export const FIXTURE_DIR = new URL("./fixtures/nanovlm-tiny-a", import.meta.url).pathname;

/** The fixture's inputs and expected outputs, by tensor name. */
export async function loadFixture(): Promise<{
  inputs: Map<string, SafetensorsTensor>;
  expected: Map<string, SafetensorsTensor>;
}> {
  const inputs = (await readSafetensors(`${FIXTURE_DIR}/inputs.safetensors`)).tensors;
  const expected = (await readSafetensors(`${FIXTURE_DIR}/expected.safetensors`)).tensors;
  return { inputs, expected };
}

/**
 * A micro model for the shapes tokenizer: the tiny preset with 16-px images, one image token and one block each, so
 * a training step takes milliseconds. The overrides are what `train()` takes; MICRO is the whole config.
 */
export const MICRO_OVERRIDES: Readonly<Partial<VLMConfig>> = Object.freeze({
  vit_hidden_dim: 32,
  vit_inter_dim: 64,
  vit_n_heads: 2,
  vit_n_blocks: 1,
  vit_img_size: 16,
  vit_patch_size: 8,
  mp_image_token_length: 1,
  lm_hidden_dim: 32,
  lm_inter_dim: 64,
  lm_n_heads: 2,
  lm_n_kv_heads: 1,
  lm_n_blocks: 1,
  lm_max_length: 64,
});
export const MICRO: Readonly<VLMConfig> = Object.freeze({ ...PRESETS.tiny, ...MICRO_OVERRIDES });

/**
 * A small random config for hand-built batches (token ids below 39, `<|image|>` = 39): 16-px images of 4 image tokens,
 * GQA with 6 query and 2 key/value heads, one ViT block and two decoder blocks.
 */
export const SMALL: Readonly<VLMConfig> = Object.freeze({
  ...PRESETS.tiny,
  vit_hidden_dim: 32,
  vit_inter_dim: 64,
  vit_img_size: 16,
  vit_patch_size: 4,
  vit_n_heads: 2,
  vit_n_blocks: 1,
  lm_hidden_dim: 48,
  lm_inter_dim: 96,
  lm_n_heads: 6,
  lm_n_kv_heads: 2,
  lm_n_blocks: 2,
  lm_base_vocab_size: 39,
  lm_vocab_size: 40,
  lm_max_length: 32,
  mp_image_token_length: 4,
});

/** A fixture tensor as a tf tensor (ints become int32). */
export function toTensor(t: SafetensorsTensor): tf.Tensor {
  return tf.tensor(t.data, t.shape, t.data instanceof Int32Array ? "int32" : "float32");
}

/**
 * Largest |actual - expected|. With `rowMask` ([B·T] of 0/1) the tensors are seen as
 * [B·T, rest] rows and only rows whose mask is 1 count: the reference's padded rows
 * hold implementation-specific garbage.
 */
export function maxAbsDiff(
  actual: ArrayLike<number>,
  expected: ArrayLike<number>,
  rowMask?: ArrayLike<number>,
): number {
  if (actual.length !== expected.length) {
    throw new Error(`length mismatch: actual ${actual.length}, expected ${expected.length}`);
  }
  const rowSize = rowMask ? actual.length / rowMask.length : actual.length;
  let worst = 0;
  for (let i = 0; i < actual.length; i++) {
    if (rowMask && rowMask[Math.floor(i / rowSize)] === 0) continue;
    const d = Math.abs(actual[i] - expected[i]);
    if (!(d <= worst)) worst = d; // NaN counts as the worst
  }
  return worst;
}

/** Assert that a tensor matches the expected values to `tol`, naming the tensor and the difference. */
export async function assertClose(
  name: string,
  actual: tf.Tensor,
  expected: SafetensorsTensor,
  tol = 1e-4,
  rowMask?: ArrayLike<number>,
): Promise<void> {
  if (actual.shape.join() !== expected.shape.join()) {
    throw new Error(`${name}: shape [${actual.shape}] but expected [${expected.shape}]`);
  }
  const diff = maxAbsDiff(await actual.data(), expected.data, rowMask);
  if (!(diff <= tol)) throw new Error(`${name}: max |diff| ${diff.toExponential(2)} > ${tol}`);
}

/** Run `fn` and assert that it creates no lasting tensors. */
export async function assertNoLeak(fn: () => Promise<void> | void): Promise<void> {
  const before = tf.memory().numTensors;
  await fn();
  const after = tf.memory().numTensors;
  if (after !== before) throw new Error(`tensor leak: ${after - before} tensors left behind`);
}

/** Run `fn` with these environment variables set (undefined = unset), restoring them after. */
export async function withEnv<T>(vars: Record<string, string | undefined>, fn: () => T | Promise<T>): Promise<T> {
  const saved = Object.fromEntries(Object.keys(vars).map((k) => [k, Deno.env.get(k)]));
  const apply = (values: Record<string, string | undefined>) => {
    for (const [k, v] of Object.entries(values)) v === undefined ? Deno.env.delete(k) : Deno.env.set(k, v);
  };
  apply(vars);
  try {
    return await fn();
  } finally {
    apply(saved);
  }
}

/**
 * Something on the machine that some tests need: a WebGPU adapter, a native library. Probe it once when the test file
 * loads (top-level await), before defining the tests.
 */
export interface Dependency {
  /** Whether this machine has it. */
  available: boolean;
  /** What is missing, as a reason: "no WebGPU adapter". */
  missing: string;
  /** What to run to get it: "apt-get install mesa-vulkan-drivers". */
  install: string;
}

/** A WebGPU adapter, as CI gets one (Mesa's llvmpipe); a real GPU needs its driver and libvulkan1 instead. */
export const WEBGPU_ADAPTER = { missing: "no WebGPU adapter", install: "apt-get install mesa-vulkan-drivers" };

/** OpenBLAS behind the wasm backend's matMul (runtime.ts), as CI installs it. */
export const OPENBLAS = { missing: "no OpenBLAS", install: "apt-get install libopenblas0-pthread" };

/** Debian's Chromium, which tests/web_test.ts drives through npm:playwright-core, as CI installs it. */
export const CHROMIUM = { missing: "no /usr/bin/chromium", install: "apt-get install chromium" };

/** Whether this run is CI's (`CI=true`), where .ci/run has installed every dependency of the tests. */
export function underCI(): boolean {
  return /^(true|1)$/i.test(Deno.env.get("CI") ?? "");
}

/**
 * Define a test that needs `dependency`. Where it is missing the test is reported as ignored, never as passed, with
 * the reason in its name: "... (ignored: no WebGPU adapter; apt-get install mesa-vulkan-drivers)". Under CI=true it
 * is never ignored: a missing dependency fails the test with a message saying what to install.
 */
export function testNeeding(dependency: Dependency, definition: Deno.TestDefinition): void {
  if (dependency.available) return Deno.test(definition);
  if (!underCI()) {
    const reason = `${dependency.missing}; ${dependency.install}`;
    return Deno.test({ ...definition, name: `${definition.name} (ignored: ${reason})`, ignore: true });
  }
  Deno.test({
    ...definition,
    fn: () => {
      throw new Error(`${dependency.missing} under CI=true: run \`${dependency.install}\` (as .ci/run does)`);
    },
  });
}

/** Collect console.warn output while `fn` runs. */
export async function captureWarnings<T>(fn: () => Promise<T>): Promise<{ result: T; warnings: string[] }> {
  const warnings: string[] = [];
  const original = console.warn;
  console.warn = (...args: unknown[]) => warnings.push(args.join(" "));
  try {
    return { result: await fn(), warnings };
  } finally {
    console.warn = original;
  }
}

/** A PNG chunk: length, type, data, CRC-32 of type + data (tests build PNG files by hand with it). */
export function pngChunk(type: string, data: Uint8Array): Uint8Array {
  const out = new Uint8Array(12 + data.length);
  const view = new DataView(out.buffer);
  view.setUint32(0, data.length);
  out.set(new TextEncoder().encode(type), 4);
  out.set(data, 8);
  view.setUint32(8 + data.length, crc32(out.subarray(4, 8 + data.length)));
  return out;
}
