// lib/train_step.ts — one optimizer step of train.ts and what it is computed with: a collated batch as tensors, its
// padding trimmed, the loss weights of its tokens, forward + backward on this thread and on helper threads
// (backend/parallel.ts), the NaN guard, clipping and AdamW. Also how a run decides how much memory and how many threads
// a step uses, and how a decoder trained from scratch starts its word embeddings.
//
// Shapes as in nanovlm.ts: B batch, T tokens, N images, S image side, V vocabulary.

import * as tf from "@tensorflow/tfjs";
import { type Batch, type ChatTokenizer, IGNORE_INDEX } from "../data.ts";
import { parameterSpecs, type VisionLanguageModel, type VLMConfig } from "../nanovlm.ts";
import { addHelperGradients, type GradientHelper, type GradientWork, splitRows } from "../backend/parallel.ts";
import { shareBlasThreads } from "../backend/kernels.ts";
import { type AdamW, clipCoefficient, gradientNorm } from "./optimizer.ts";

// ---- One optimizer step -------------------------------------------------------------------------

/** The model's input tensors for a collated batch. Free them with `tf.dispose(Object.values(...))`. */
export function batchTensors(
  batch: Batch,
): { inputIds: tf.Tensor2D; attentionMask: tf.Tensor2D; labels: tf.Tensor2D; images?: tf.Tensor4D } {
  const [B, T, S] = [batch.batchSize, batch.length, batch.imageSize];
  return {
    inputIds: tf.tensor2d(batch.inputIds, [B, T], "int32"),
    attentionMask: tf.tensor2d(batch.attentionMask, [B, T], "int32"),
    labels: tf.tensor2d(batch.labels, [B, T], "int32"),
    images: batch.imageCount ? tf.tensor4d(batch.images, [batch.imageCount, 3, S, S]) : undefined,
  };
}

/**
 * Drop the columns that are padding in every row. Batches come left-padded to
 * lm_max_length (as the reference's collator does), but padded keys are masked out
 * and RoPE makes attention depend only on the distance between real tokens, so the
 * loss is the same (to float noise) and the step is cheaper: T is the batch's longest
 * sample instead of the context.
 */
export function trimPadding(batch: Batch): Batch {
  const { batchSize: B, length: T } = batch;
  let first = T; // the first column any row uses
  for (let b = 0; b < B; b++) {
    const row = batch.attentionMask.subarray(b * T, (b + 1) * T);
    const start = row.indexOf(1);
    if (start !== -1) first = Math.min(first, start);
  }
  if (first === 0 || first === T) return batch;
  const keep = T - first;
  const cut = (x: Int32Array) => {
    const out = new Int32Array(B * keep);
    for (let b = 0; b < B; b++) out.set(x.subarray(b * T + first, (b + 1) * T), b * keep);
    return out;
  };
  return {
    ...batch,
    inputIds: cut(batch.inputIds),
    labels: cut(batch.labels),
    attentionMask: cut(batch.attentionMask),
    length: keep,
  };
}

/** Raised by trainStep when the loss or the gradient norm is NaN or infinite; the weights are left untouched. */
export class NonFiniteError extends Error {}

/** What one optimizer step measured. */
export interface StepResult {
  /** Mean loss over the step's trained tokens (weighted, with an answer floor). */
  loss: number;
  /** Global gradient norm before clipping. */
  gradNorm: number;
  /** Threads that computed part of the gradient: 1 when this thread did it alone (no helpers, or too little work). */
  threads: number;
}

/**
 * The loss weight of every position of a batch (labels [B·T], row-major): 0 where nothing is trained, else
 * max(1, floor / n) for a row with n trained tokens, so a short answer ("red", <|im_end|>, newline: 3 tokens) weighs
 * as much as `floor` tokens while a 40-token caption keeps weight 1 per token. With floor 0 every trained token
 * weighs 1: the reference's mean over tokens.
 */
export function answerWeights(labels: Int32Array, B: number, T: number, floor: number): Float32Array {
  const weights = new Float32Array(B * T);
  for (let b = 0; b < B; b++) {
    const row = labels.subarray(b * T, (b + 1) * T);
    const trained = row.reduce((n, label) => n + (label === IGNORE_INDEX ? 0 : 1), 0);
    const weight = Math.max(1, floor / Math.max(trained, 1));
    row.forEach((label, t) => weights[b * T + t] = label === IGNORE_INDEX ? 0 : weight);
  }
  return weights;
}

/**
 * Add the gradient of Σ share·loss over `work` (micro-batches or their rows, parallel.ts) to `grads`, by name, for the
 * parameters `names`, and return that weighted loss: the forward + backward of a training step, shared by trainStep
 * and its helper threads (parallel_worker.ts).
 */
export function gradientsOf(
  model: VisionLanguageModel,
  names: string[],
  work: GradientWork[],
  grads: Map<string, tf.Tensor>,
): tf.Scalar {
  const variables = names.map((name) => model.params.get(name)!);
  const nameOf = new Map(variables.map((v, i) => [v.name, names[i]]));
  const losses: tf.Scalar[] = []; // share·loss of each part
  try {
    for (const { batch, share, tokenWeights } of work) {
      // The part's inputs and activations live in one tidy: freed when it ends, also when forward or backward throws.
      const { value, grads: g } = tf.tidy(() => {
        const t = batchTensors(batch);
        const weights = tokenWeights && tf.tensor2d(tokenWeights, [batch.batchSize, batch.length]);
        return tf.variableGrads(
          () => model.loss(t.inputIds, t.images, t.attentionMask, t.labels, weights).mul(share) as tf.Scalar,
          variables,
        );
      });
      losses.push(value);
      for (const [varName, grad] of Object.entries(g)) {
        const name = nameOf.get(varName)!, previous = grads.get(name);
        grads.set(name, previous ? previous.add(grad) : grad);
        if (previous) tf.dispose([previous, grad]);
      }
    }
    return tf.tidy(() => (losses.length ? tf.stack(losses).sum() : tf.scalar(0)) as tf.Scalar);
  } finally {
    tf.dispose(losses);
  }
}

/**
 * The least work, in parameters × rows, that a part of a split micro-batch should hold. A helper costs about the same
 * each step whatever its part (the weights sent, its gradients read back and added: 10-20 ms for cpu-5m's 21 MB), and
 * two threads computing at once slow each other; below this a micro-batch is faster on one thread with OpenBLAS on
 * both cores. Measured on 2 cores (one step, median of 10): cpu-5m (5.3M parameters) at batch 8 286 ms in two parts
 * of 4 (21M each) against 320 ms on one thread, at batch 4 226 against 169 (parts of 10.6M); the tiny preset (0.9M)
 * at batch 32 111 against 134 (14M), at batch 16 72 against 65 (7M).
 */
export const MIN_PART_WORK = 12e6;

/** The fewest rows of a micro-batch worth a thread of their own for `model` ({@link MIN_PART_WORK}). */
export function minRowsFor(model: VisionLanguageModel): number {
  return Math.max(1, Math.ceil(MIN_PART_WORK / model.parameterCount()));
}

/**
 * One optimizer step: forward + backward on each micro-batch, clip, then AdamW with one
 * learning rate per group. Each micro-batch's loss (a mean over its trained tokens) is
 * weighted by its share of the step's trained tokens, so the step's loss and gradient are
 * those of one batch holding every micro-batch: exact also when micro-batches differ in
 * length (sort_by_length). The reference divides by the number of micro-batches instead,
 * the same when every micro-batch trains as many tokens. With `answerFloor` > 0 tokens
 * are weighted by `answerWeights` (and shares by weight). With `helpers` (parallel.ts) the
 * micro-batches, or their rows (at least `minRowsPerPart` to a thread; by default as many as
 * make {@link MIN_PART_WORK}), are shared between this thread and the helpers, each part
 * weighted by its share in the same way, so the sum is unchanged. If the loss or the
 * gradient norm is not finite, nothing is updated and a NonFiniteError is thrown. One read
 * from the device per step (loss and norm together); every tensor it makes is freed.
 */
export async function trainStep(
  model: VisionLanguageModel,
  microBatches: Batch[],
  optimizer: AdamW,
  { lrs, maxGradNorm = 1.0, answerFloor = 0, helpers = [], minRowsPerPart = minRowsFor(model) }: {
    lrs: number[];
    maxGradNorm?: number;
    answerFloor?: number;
    helpers?: GradientHelper[];
    minRowsPerPart?: number;
  },
): Promise<StepResult> {
  const names = optimizer.trainable, threads = helpers.length + 1;
  // Who computes what: whole micro-batches in turn when there are enough (the first, of the shortest samples when
  // sorted by length, stays on this thread, which also runs AdamW), else the rows of each micro-batch split between
  // threads, at least minRowsPerPart each (see MIN_PART_WORK).
  const pieces = microBatches.length >= threads
    ? microBatches.map((batch, i) => ({ batch: trimPadding(batch), thread: i % threads }))
    : microBatches.flatMap((micro) => {
      const parts = Math.max(1, Math.min(threads, Math.floor(micro.batchSize / minRowsPerPart)));
      return splitRows(micro, parts).map((rows, thread) => ({ batch: trimPadding(rows), thread }));
    });
  // OpenBLAS on every core when this thread computes alone, one thread per caller when helpers compute too.
  const busyThreads = new Set(pieces.filter(({ batch }) => batch.batchSize > 0).map(({ thread }) => thread)).size;
  if (helpers.length) shareBlasThreads(busyThreads);
  const weights = pieces.map(({ batch }) => answerWeights(batch.labels, batch.batchSize, batch.length, answerFloor));
  const trained = weights.map((w) => w.reduce((a, b) => a + b, 0));
  const total = trained.reduce((a, b) => a + b, 0), rows = microBatches.reduce((n, b) => n + b.batchSize, 0);
  const work = (thread: number): GradientWork[] =>
    pieces.flatMap(({ batch, thread: owner }, i) =>
      owner === thread && batch.batchSize > 0
        ? [{
          batch,
          share: total > 0 ? trained[i] / total : batch.batchSize / rows,
          tokenWeights: answerFloor > 0 ? weights[i] : undefined,
        }]
        : []
    );
  // The helpers start on the current weights, read once, each on its own copy, which it takes over (on the cpu backend
  // dataSync returns the tensor's own storage); then this thread computes its own part meanwhile.
  const current = busyThreads > 1 ? optimizer.variables.map((v) => v.dataSync() as Float32Array) : [];
  const pending = helpers.map((helper, k) => {
    const part = work(k + 1);
    return part.length ? helper.compute(current.map((w) => w.slice()), part) : null;
  });
  const grads = new Map<string, tf.Tensor>();
  let lossSum: tf.Tensor | undefined, measured: tf.Tensor | undefined;
  try {
    lossSum = gradientsOf(model, names, work(0), grads);
    const helpersLoss = addHelperGradients(grads, names, await Promise.all(pending));
    // The step's only GPU→CPU read: loss and gradient norm together, before AdamW, so a NaN changes nothing.
    measured = tf.tidy(() => tf.stack([lossSum!.add(helpersLoss), gradientNorm(grads)])); // [2]
    const [loss, gradNorm] = await measured.data();
    if (!Number.isFinite(loss) || !Number.isFinite(gradNorm)) {
      throw new NonFiniteError(`loss ${loss}, gradient norm ${gradNorm}`);
    }
    optimizer.step(grads, lrs, clipCoefficient(gradNorm, maxGradNorm));
    return { loss, gradNorm, threads: busyThreads };
  } finally {
    // After a failure here or in one helper, wait for the other helpers: their replies must not arrive unheard.
    await Promise.allSettled(pending);
    tf.dispose([lossSum, measured, ...grads.values()]);
  }
}

// ---- Memory and threads -------------------------------------------------------------------------

/**
 * Whether to train a model in low-memory mode: every block checkpointed (`model.checkpointBlocks`: backprop keeps one
 * tensor per block and recomputes the rest). "auto" turns it on for the wasm backend when weights, gradients and the
 * two moments (16 bytes per parameter) would fill half of its 4 GiB heap, leaving too little for activations even with
 * the moments outside it (`adamWOnHost`): nanovlm-222m needs it, tiny does not (README, "Full size on a CPU").
 */
export function lowMemoryTraining(setting: string, backend: string, cfg: VLMConfig): boolean {
  if (!["auto", "on", "off"].includes(setting)) throw new Error(`--low_memory=${setting}: expected auto, on or off`);
  const parameters = parameterSpecs(cfg).reduce((n, spec) => n + spec.shape.reduce((a, b) => a * b, 1), 0);
  return setting === "on" || (setting === "auto" && backend === "wasm" && 16 * parameters > 2 * 2 ** 30);
}

/**
 * How many threads compute each step's gradient: this one plus helpers (parallel.ts). Automatic (0) is up to 2 on
 * the wasm backend, one per core, and 1 in low-memory mode (each helper holds a copy of the model) and on the other
 * backends (WebGPU runs on one device; the cpu backend is for tests).
 */
export function trainingThreads(setting: number, backend: string, lowMemory: boolean): number {
  if (!(Number.isInteger(setting) && setting >= 0)) {
    throw new Error(`--threads=${setting}: expected 0 (automatic), 1, 2, ...`);
  }
  if (setting > 0) return setting;
  return backend === "wasm" && !lowMemory ? Math.min(2, navigator.hardwareConcurrency) : 1;
}

// ---- Word embeddings of a decoder trained from scratch ------------------------------------------

/** The id of " word" when the tokenizer has it as one token. */
function spacedId(tokenizer: ChatTokenizer, word: string): number | undefined {
  try {
    const ids = tokenizer.encode(" " + word);
    return ids.length === 1 ? ids[0] : undefined;
  } catch {
    return undefined; // a vocabulary without " word" (the shapes tokenizer has no " A")
  }
}

/**
 * Start each word that the tokenizer spells two ways, with a leading space (" red" inside
 * a question) and without ("red" opening an answer, right after "assistant\n"), from one
 * embedding row. A pretrained decoder already knows that the two mean the same; one trained
 * from scratch learns it only from the few questions that need it, such as a multiple-choice
 * answer ("red") to be found among the options (" red"). The rows drift apart in training
 * as far as they need to. Returns the number of words shared.
 */
export function shareSpacedWordEmbeddings(model: VisionLanguageModel, tokenizer: ChatTokenizer): number {
  const source = Array.from({ length: model.cfg.lm_vocab_size }, (_, id) => id); // row id starts as row source[id]
  let pairs = 0;
  for (let id = 0; id < tokenizer.baseVocabSize; id++) {
    const word = tokenizer.decode([id]);
    // Words and the shapes tokenizer's places ("top left"); not special tokens, punctuation or spaced words.
    if (!/^[A-Za-z]+( [A-Za-z]+)?$/.test(word)) continue;
    const spaced = spacedId(tokenizer, word);
    if (spaced !== undefined) [source[id], pairs] = [spaced, pairs + 1];
  }
  const embedding = model.params.get("decoder.token_embedding.weight")!; // [V, D] (the output layer too, when tied)
  tf.tidy(() => embedding.assign(tf.gather(embedding, source)));
  return pairs;
}
