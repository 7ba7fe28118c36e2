// generate() tested against its definition, through generate itself:
// - every decoding step's logits (KV cache, position bookkeeping, padding mask) equal a full recompute of the same
//   prefix, on a left-padded batch of prompts of unequal lengths;
// - sampling draws from softmax(filtered logits / temperature), top-k keeps exactly k tokens, and top-p keeps the
//   reference's set (nanoVLM models/utils.py, top_k_top_p_filtering: no shift, the token that crosses top_p goes).

import * as tf from "@tensorflow/tfjs";
import { assert, assertEquals } from "./assert.ts";
import { softmax, topKTopPFilter, VisionLanguageModel } from "../nanovlm.ts";
import { initBackend } from "../backend/runtime.ts";
import { FIXTURE_DIR, loadFixture, maxAbsDiff, SMALL, toTensor } from "./helpers.ts";
import { fromPretrained } from "../lib/checkpoint.ts";

await initBackend("wasm", { quiet: true });
const { inputs, expected } = await loadFixture();

/** Run generate and keep the logits [B, V] it chose each token from. */
async function generateWithLogits(
  model: VisionLanguageModel,
  ids: tf.Tensor,
  images: tf.Tensor,
  mask: tf.Tensor | undefined,
  options: Parameters<VisionLanguageModel["generate"]>[3],
): Promise<{ tokens: Int32Array; logits: Float32Array[] }> {
  const logits: Float32Array[] = [];
  const out = await model.generate(ids, images, mask, { ...options, onLogits: (l) => logits.push(l) });
  const tokens = (await out.data()) as Int32Array;
  out.dispose();
  return { tokens, logits };
}

/** The last position's logits [B, V] of a full forward pass (no cache) over the given rows. */
function recomputeLastLogits(model: VisionLanguageModel, rows: number[][], masks: number[][], images: tf.Tensor) {
  const [B, T] = [rows.length, rows[0].length];
  return tf.tidy(() => {
    const ids = tf.tensor2d(rows.flat(), [B, T], "int32"), mask = tf.tensor2d(masks.flat(), [B, T], "int32");
    return model.forward(ids, images, mask).logits.slice([0, T - 1, 0], [B, 1, -1]).dataSync() as Float32Array;
  });
}

/** Check each step's logits against a recompute of the prompt plus the tokens generated so far. */
async function checkDecodeSteps(model: VisionLanguageModel, ids: tf.Tensor, images: tf.Tensor, mask: tf.Tensor) {
  const steps = 6;
  const [B, T] = ids.shape as [number, number];
  const { tokens, logits } = await generateWithLogits(model, ids, images, mask, {
    maxNewTokens: steps,
    greedy: true,
    eosTokenId: -1, // never stop early
  });
  assertEquals(logits.length, steps);
  const idRows = Array.from({ length: B }, (_, b) => Array.from(ids.dataSync().slice(b * T, (b + 1) * T)));
  const maskRows = Array.from({ length: B }, (_, b) => Array.from(mask.dataSync().slice(b * T, (b + 1) * T)));
  let scale = 0;
  for (let step = 0; step < steps; step++) {
    const full = recomputeLastLogits(model, idRows, maskRows, images);
    const diff = maxAbsDiff(logits[step], full);
    for (const v of full) scale = Math.max(scale, Math.abs(v));
    assert(diff < 1e-4, `step ${step}: cached logits differ from a full recompute by ${diff.toExponential(2)}`);
    for (let b = 0; b < B; b++) {
      idRows[b].push(tokens[b * steps + step]);
      maskRows[b].push(1);
    }
  }
  return scale;
}

Deno.test("generate: each decode step's logits equal a full recompute (fixture model, left-padded prompts of unequal lengths)", async () => {
  const model = await fromPretrained(FIXTURE_DIR);
  const ids = toTensor(inputs.get("gen.input_ids")!), mask = toTensor(inputs.get("gen.attention_mask")!);
  const images = toTensor(inputs.get("gen.images")!);
  const padding = Array.from(mask.dataSync());
  assert(padding[0] === 0 && padding.includes(0), "the prompts are left padded");
  assert(padding.slice(0, 18).reduce((a, b) => a + b) !== padding.slice(18).reduce((a, b) => a + b), "unequal");
  const scale = await checkDecodeSteps(model, ids, images, mask);
  assert(scale > 1, "the logits are large enough for a wrong position or mask to show");

  // And against the reference's own no-cache recomputation (nanoVLM generate with the full forward each step).
  const { logits } = await generateWithLogits(model, ids, images, mask, { maxNewTokens: 8, greedy: true });
  const [B, steps, V] = expected.get("gen.logits_nokv")!.shape;
  const reference = expected.get("gen.logits_nokv")!.data as Float32Array;
  for (let step = 0; step < logits.length; step++) {
    for (let b = 0; b < B; b++) {
      const want = reference.subarray((b * steps + step) * V, (b * steps + step + 1) * V);
      const diff = maxAbsDiff(logits[step].subarray(b * V, (b + 1) * V), want);
      assert(diff < 1e-4, `row ${b} step ${step}: logits differ from nanoVLM's no-cache logits by ${diff}`);
    }
  }
  tf.dispose([ids, mask, images]);
  model.dispose();
});

Deno.test("generate: each decode step's logits equal a full recompute (random GQA model, two pads in one row)", async () => {
  const model = new VisionLanguageModel(SMALL, { seed: 2 });
  const IMG = 39;
  const rows = [[2, 2, IMG, IMG, IMG, IMG, 5, 6, 7, 11, 12], [IMG, IMG, IMG, IMG, IMG, IMG, IMG, IMG, 8, 9, 10]];
  const ids = tf.tensor2d(rows.flat(), [2, 11], "int32");
  const mask = tf.tensor2d([0, 0, ...new Array(9).fill(1), ...new Array(11).fill(1)], [2, 11], "int32");
  const images = tf.randomUniform([3, 3, 16, 16], 0, 1, "float32", 7);
  await checkDecodeSteps(model, ids, images, mask);
  tf.dispose([ids, mask, images]);
  model.dispose();
});

// ---- Sampling --------------------------------------------------------------------------------------------------

const DRAWS = 2000;

/**
 * Draw the first generated token DRAWS times in one call: the fixture's single prompt repeated as DRAWS rows, so every
 * row samples from the same logits. Returns the step-0 logits row and how often each id was drawn.
 */
async function drawFirstTokens(options: { temperature: number; topK: number; topP: number; seed: number }) {
  const model = await fromPretrained(FIXTURE_DIR);
  const prompt = toTensor(inputs.get("gen_single.input_ids")!), image = toTensor(inputs.get("gen_single.images")!);
  const ids = tf.tile(prompt, [DRAWS, 1]), images = tf.tile(image, [DRAWS, 1, 1, 1]);
  const { tokens, logits } = await generateWithLogits(model, ids, images, undefined, { maxNewTokens: 1, ...options });
  tf.dispose([prompt, image, ids, images]);
  model.dispose();
  const V = logits[0].length / DRAWS;
  const counts = new Float64Array(V);
  for (const id of tokens) counts[id]++;
  return { row: logits[0].slice(0, V), counts };
}

/** Ids sorted from the largest logit down. */
const byLogit = (row: Float32Array) => Array.from(row.keys()).sort((a, b) => row[b] - row[a]);

/**
 * The empirical frequencies match `probs`: each of the 5 most likely ids, and the rest pooled, within 5 standard
 * deviations of a binomial count (a false alarm about once in a million seeds; a fixed seed makes each run the same).
 */
function assertFrequencies(counts: Float64Array, probs: Float64Array, row: Float32Array, what: string) {
  const top = byLogit(row).slice(0, 5);
  const buckets = [...top.map((id) => [id]), Array.from(row.keys()).filter((id) => !top.includes(id))];
  for (const bucket of buckets) {
    const p = bucket.reduce((s, id) => s + probs[id], 0);
    const seen = bucket.reduce((s, id) => s + counts[id], 0) / DRAWS;
    const tolerance = 5 * Math.sqrt(Math.max(p * (1 - p), 1e-4) / DRAWS);
    assert(
      Math.abs(seen - p) <= tolerance,
      `${what}: ids ${bucket.length > 1 ? "(the rest)" : bucket[0]} drawn ${seen.toFixed(4)} of the time, ` +
        `softmax(logits / T) says ${p.toFixed(4)} (± ${tolerance.toFixed(4)})`,
    );
  }
}

Deno.test("sampling: the draws follow softmax(logits / temperature), and temperature changes them as it says", async () => {
  const distributions: Float64Array[] = [];
  for (const temperature of [0.5, 2]) {
    const { row, counts } = await drawFirstTokens({ temperature, topK: 0, topP: 1, seed: 3 });
    const probs = softmax(row, temperature);
    assertFrequencies(counts, probs, row, `temperature ${temperature}`);
    distributions.push(probs);
  }
  // The two temperatures must be told apart by the check above: the most likely id's probability differs by far more
  // than the tolerance (so sampling that ignored the temperature would fail one of them).
  const { row } = await drawFirstTokens({ temperature: 1, topK: 0, topP: 1, seed: 4 });
  const best = byLogit(row)[0];
  assert(distributions[0][best] - distributions[1][best] > 0.2, "the temperatures give clearly different draws");
});

Deno.test("sampling: top-k = 3 draws only the 3 most likely tokens, and each of them", async () => {
  const { row, counts } = await drawFirstTokens({ temperature: 3, topK: 3, topP: 1, seed: 5 });
  const top3 = byLogit(row).slice(0, 3);
  const drawn = Array.from(counts.keys()).filter((id) => counts[id] > 0).sort((a, b) => a - b);
  assertEquals(drawn, [...top3].sort((a, b) => a - b), "the drawn ids are exactly the top 3");
  assertFrequencies(counts, softmax(topKTopPFilter(row, 3, 1), 3), row, "top-k 3");
});

Deno.test("sampling: top-p keeps the reference's set (cumulative probability ≤ p, the crossing token removed)", async () => {
  const topP = 0.5, temperature = 1;
  const { row, counts } = await drawFirstTokens({ temperature, topK: 0, topP, seed: 6 });
  // By definition: sort descending, keep a token while the cumulative probability including it is ≤ top_p; the most
  // likely token is always kept.
  const order = byLogit(row), probs = softmax(order.map((id) => row[id]));
  const kept: number[] = [];
  let cumulative = 0;
  for (let rank = 0; rank < order.length; rank++) {
    cumulative += probs[rank];
    if (rank === 0 || cumulative <= topP) kept.push(order[rank]);
  }
  assert(kept.length >= 2, `the fixture's logits keep ${kept.length} token(s) at top-p ${topP}: pick another p`);
  const drawn = Array.from(counts.keys()).filter((id) => counts[id] > 0);
  assertEquals(drawn.sort((a, b) => a - b), [...kept].sort((a, b) => a - b));
  // The crossing token (the first one past p) is never drawn: the reference has no shift, unlike Hugging Face's.
  assertEquals(counts[order[kept.length]], 0);
  assertFrequencies(counts, softmax(topKTopPFilter(row, 0, topP), temperature), row, `top-p ${topP}`);
});
