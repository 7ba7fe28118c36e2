// Shared test helpers: the nanovlm-tiny-a fixture and tolerant tensor comparison.

import * as tf from "@tensorflow/tfjs";
import { readSafetensors, type SafetensorsTensor } from "../runtime.ts";

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
