// parallel.ts: rows split without losing or reordering anything, and a training step with helper threads that is the
// step without them (loss, gradient norm and weights), whole micro-batches or rows, with and without an answer floor.

import * as tf from "@tensorflow/tfjs";
import { type Batch, loadTokenizer, shapesBatches } from "../data.ts";
import { VisionLanguageModel } from "../nanovlm.ts";
import { initBackend } from "../backend/runtime.ts";
import { AdamW, paramGroups } from "../lib/optimizer.ts";
import { minRowsFor, trainingThreads, trainStep } from "../lib/train_step.ts";
import { GradientHelper, splitRows } from "../backend/parallel.ts";
import { assert, assertEquals, assertRejects, assertThrows } from "./assert.ts";
import { maxAbsDiff, MICRO } from "./helpers.ts";

await initBackend("wasm", { quiet: true });
const tokenizer = await loadTokenizer(new URL("../tokenizers/shapes", import.meta.url).pathname);

/** `count` samples of the shapes world, sorted by length into micro-batches of `batchSize`. */
function sortedMicroBatches(batchSize: number, count: number): Batch[] {
  const options = { split: "train" as const, seed: 5, tokenizer, config: MICRO, captionWeight: 2, choiceWeight: 2 };
  return [...shapesBatches({ ...options, batchSize, lengthBuckets: count / batchSize, count })];
}

Deno.test("splitRows: contiguous row groups that put the batch back together, images following their samples", () => {
  const [batch] = sortedMicroBatches(7, 7);
  // A sample with two images and one with none, to check that images follow imageCounts rather than rows.
  const S = batch.imageSize, plane = 3 * S * S;
  const counts = [1, 2, 0, 1, 1, 1, 1];
  const images = Float32Array.from({ length: 7 * plane }, (_, i) => i);
  const odd: Batch = { ...batch, imageCounts: counts, images, imageCount: 7 };
  const groups = splitRows(odd, 3);
  assertEquals(groups.map((g) => g.batchSize), [3, 2, 2]);
  assertEquals(groups.map((g) => g.imageCounts), [[1, 2, 0], [1, 1], [1, 1]]);
  assertEquals(groups.map((g) => g.imageCount), [3, 2, 2]);
  const joined = (pick: (g: Batch) => Int32Array | Float32Array) => groups.flatMap((g) => [...pick(g)]);
  assertEquals(joined((g) => g.inputIds), [...odd.inputIds]);
  assertEquals(joined((g) => g.labels), [...odd.labels]);
  assertEquals(joined((g) => g.attentionMask), [...odd.attentionMask]);
  assertEquals(joined((g) => g.images), [...images]);
  // More parts than rows: the last groups are empty.
  assertEquals(splitRows(batch, 9).map((g) => g.batchSize), [1, 1, 1, 1, 1, 1, 1, 0, 0]);
});

/** One step of a fresh MICRO model (seed 2) with `helpers` helper threads: its result, a weight after it, leaks. */
async function stepWith(helperCount: number, batches: Batch[], answerFloor = 0) {
  const model = new VisionLanguageModel(MICRO, { seed: 2 });
  const optimizer = new AdamW(model.params, paramGroups(model, 1e-3, 1e-3));
  const helpers = await Promise.all(
    Array.from({ length: helperCount }, () => GradientHelper.start(MICRO, optimizer.trainable)),
  );
  try {
    const before = tf.memory().numTensors;
    const result = await trainStep(model, batches, optimizer, {
      lrs: [1e-3, 1e-3],
      maxGradNorm: 0.5,
      answerFloor,
      helpers,
    });
    assertEquals(tf.memory().numTensors, before, "trainStep leaves no tensor behind");
    const weights = await model.params.get("decoder.blocks.0.mlp.up_proj.weight")!.data();
    return { ...result, weights };
  } finally {
    helpers.forEach((helper) => helper.close());
    optimizer.dispose();
    model.dispose();
  }
}

Deno.test("trainStep with helper threads makes the step it makes alone: whole micro-batches or rows", async () => {
  const four = sortedMicroBatches(6, 24); // 4 micro-batches: whole ones go to 2 threads, in turn
  const one = [sortedMicroBatches(24, 24)[0]]; // 1 micro-batch: its rows are split between 3 threads
  for (const [name, batches, helpers] of [["whole", four, 1], ["rows", one, 2]] as const) {
    for (const floor of [0, 12]) {
      const alone = await stepWith(0, batches, floor), shared = await stepWith(helpers, batches, floor);
      const what = `${name}, answer floor ${floor}`;
      assert(Math.abs(alone.loss - shared.loss) < 1e-5, `${what}: loss ${alone.loss} vs ${shared.loss}`);
      assert(Math.abs(alone.gradNorm - shared.gradNorm) < 1e-4 * alone.gradNorm, `${what}: norm differs`);
      assert(alone.gradNorm > 0.5, `${what}: clipped, so the norm scaled the step both ways`);
      const diff = maxAbsDiff(alone.weights, shared.weights);
      assert(diff < 1e-6, `${what}: weights differ by ${diff}`);
    }
  }
  // The same sum from a different split of the same 24 samples: four micro-batches on one thread, or the rows of a
  // single micro-batch on two.
  const whole = await stepWith(0, four), rows = await stepWith(1, one);
  assert(Math.abs(whole.loss - rows.loss) < 1e-5, `loss ${whole.loss} vs ${rows.loss}`);
  assert(maxAbsDiff(whole.weights, rows.weights) < 1e-6, "weights differ");
});

Deno.test("a helper's errors are named: at start, and in a step (reaching trainStep's caller, nothing leaked)", async () => {
  const model = new VisionLanguageModel(MICRO, { seed: 2 });
  const optimizer = new AdamW(model.params, paramGroups(model, 1e-3, 1e-3));
  await assertRejects(
    () => GradientHelper.start(MICRO, [...optimizer.trainable, "no.such.weight"]),
    Error,
    "gradient helper: the model has no parameter no.such.weight",
  );
  // startUpTo, as train and bench start their helpers: the first that fails is logged, and none after it is tried.
  const lines: string[] = [];
  const none = await GradientHelper.startUpTo(2, MICRO, ["no.such.weight"], (line) => lines.push(line));
  assertEquals(none.length, 0);
  assertEquals(lines, [
    "threads: helper 1 did not start (gradient helper: the model has no parameter no.such.weight); going on with fewer",
  ]);
  // A helper whose model has another shape cannot take these weights.
  const helper = await GradientHelper.start({ ...MICRO, lm_inter_dim: 48 }, optimizer.trainable);
  try {
    const before = tf.memory().numTensors;
    await assertRejects(
      () => trainStep(model, sortedMicroBatches(6, 12), optimizer, { lrs: [1e-3, 1e-3], helpers: [helper] }),
      Error,
      "gradient helper:",
    );
    assertEquals(tf.memory().numTensors, before, "the failed step freed its own gradients");
  } finally {
    helper.close();
    optimizer.dispose();
    model.dispose();
  }
});

Deno.test("rows are split only into parts of minRowsPerPart (default: MIN_PART_WORK) or more: a small micro-batch stays on this thread", async () => {
  const model = new VisionLanguageModel(MICRO, { seed: 2 });
  const optimizer = new AdamW(model.params, paramGroups(model, 1e-3, 1e-3));
  // A helper that fails whenever it is given work (its model has another shape): a step that succeeds never used it.
  const helper = await GradientHelper.start({ ...MICRO, lm_inter_dim: 48 }, optimizer.trainable);
  try {
    // 12 rows: two parts of 6 would hold far less than MIN_PART_WORK for this small model.
    assert(6 < minRowsFor(model), `the default split is ${minRowsFor(model)} rows`);
    const one = [sortedMicroBatches(12, 12)[0]];
    const step = (minRowsPerPart?: number) =>
      trainStep(model, one, optimizer, { lrs: [1e-3, 1e-3], helpers: [helper], minRowsPerPart });
    const alone = await stepWith(0, one), result = await step();
    assert(Math.abs(result.loss - alone.loss) < 1e-5, `loss ${result.loss} vs ${alone.loss} without helper`);
    await assertRejects(() => step(6), Error, "gradient helper:"); // parts of 6 allowed: the helper gets one
  } finally {
    helper.close();
    optimizer.dispose();
    model.dispose();
  }
});

Deno.test("a failure on the main thread waits for the helpers: nothing leaked, the next step hears its own reply", async () => {
  const model = new VisionLanguageModel(MICRO, { seed: 2 });
  const optimizer = new AdamW(model.params, paramGroups(model, 1e-3, 1e-3));
  const helper = await GradientHelper.start(MICRO, optimizer.trainable);
  try {
    // The first micro-batch (this thread's) lost its images; the second goes to the helper, which is still computing
    // when this thread fails. It is not a micro-batch of the next step, whose reply must not be this one's.
    const [broken, , , other] = sortedMicroBatches(6, 24);
    const before = tf.memory().numTensors;
    await assertRejects(
      () =>
        trainStep(model, [{ ...broken, images: broken.images.subarray(0, 5) }, other], optimizer, {
          lrs: [1e-3, 1e-3],
          helpers: [helper],
        }),
      Error,
    );
    assertEquals(tf.memory().numTensors, before, "the failed step freed its gradients");
    // Had the helper's late reply been left unheard, it would answer the next step's request with the wrong gradient.
    const batches = sortedMicroBatches(6, 12);
    const withHelper = await trainStep(model, batches, optimizer, { lrs: [1e-3, 1e-3], helpers: [helper] });
    const alone = await stepWith(0, batches);
    assert(Math.abs(withHelper.loss - alone.loss) < 1e-5, `loss ${withHelper.loss} vs ${alone.loss} without helper`);
  } finally {
    helper.close();
    optimizer.dispose();
    model.dispose();
  }
});

Deno.test("trainingThreads: automatic is up to 2 on wasm, 1 in low-memory mode and elsewhere; bad values named", () => {
  assertEquals(trainingThreads(0, "wasm", false), Math.min(2, navigator.hardwareConcurrency));
  assertEquals(trainingThreads(0, "wasm", true), 1);
  assertEquals(trainingThreads(0, "webgpu", false), 1);
  assertEquals(trainingThreads(3, "wasm", false), 3);
  assertThrows(() => trainingThreads(-1, "wasm", false), Error, "--threads=-1");
  assertThrows(() => trainingThreads(1.5, "wasm", false), Error, "--threads=1.5");
});
