// parallel.ts — data parallelism on one machine: helper threads that compute part of each training step's gradient.
//
// On the wasm backend a training step runs on one thread, except its matMuls (OpenBLAS may use a second one), so on two
// cores the second core idles for about half of every step. A helper is a Deno Worker with its own tfjs, its own WASM
// heap and its own copy of the model. Each step trainStep (lib/train_step.ts) shares the micro-batches (or, with fewer
// micro-batches than threads, their rows) between itself and its helpers, sends each helper the current weights and its
// part, computes its own part meanwhile, then adds the helpers' gradients to its own. Each part's loss is weighted by
// its share of the step's trained tokens, so the sum is the gradient of the whole batch: training is the same as
// without helpers (to float rounding), faster. Vision pretraining (lib/vision_pretrain.ts) shares its steps the same
// way: each helper draws and trains its part of the step's scenes.
//
// The helper's side is parallel_worker.ts. Shapes as in nanovlm.ts: B batch, T tokens, S image side.

import * as tf from "@tensorflow/tfjs";
import type { Batch } from "../data.ts";
import type { VLMConfig } from "../nanovlm.ts";
import type { QuadrantWork } from "../lib/vision_pretrain.ts";

/**
 * The rows of a collated batch in `parts` contiguous groups, as many rows each as can be (the first ones take the
 * remainder); each group keeps its samples' images (by `imageCounts`). A group may be empty when B < parts.
 */
export function splitRows(batch: Batch, parts: number): Batch[] {
  const { batchSize: B, length: T, imageSize: S } = batch;
  const plane = 3 * S * S;
  const groups: Batch[] = [];
  let row = 0, image = 0;
  for (let part = 0; part < parts; part++) {
    const rows = Math.floor(B / parts) + (part < B % parts ? 1 : 0);
    const counts = batch.imageCounts.slice(row, row + rows);
    const images = counts.reduce((n, c) => n + c, 0);
    const take = (x: Int32Array) => x.slice(row * T, (row + rows) * T);
    groups.push({
      ...batch,
      inputIds: take(batch.inputIds),
      labels: take(batch.labels),
      attentionMask: take(batch.attentionMask),
      batchSize: rows,
      images: batch.images.slice(image * plane, (image + images) * plane),
      imageCount: images,
      imageCounts: counts,
      dropped: part === 0 ? batch.dropped : 0,
    });
    [row, image] = [row + rows, image + images];
  }
  return groups;
}

/** One piece of a step's work: some rows of a micro-batch, the share of the step's loss they carry, token weights. */
export interface GradientWork {
  batch: Batch;
  share: number;
  /** [B·T] loss weight of each position (lib/train_step.ts's answerWeights), or undefined for the plain token mean. */
  tokenWeights?: Float32Array;
}

/** What a helper sends back: the sum of share·loss over its work, and the gradient of each trainable parameter. */
export interface HelperResult {
  loss: number;
  grads: Float32Array[];
}

/**
 * Add the helpers' gradients to this thread's `grads` (each helper's arrays in the order of `names`), freeing the
 * tensors they replace; returns the sum of the helpers' losses. A null result is a helper that had no part.
 */
export function addHelperGradients(
  grads: Map<string, tf.Tensor>,
  names: string[],
  results: (HelperResult | null)[],
): number {
  let loss = 0;
  for (const result of results) {
    if (!result) continue;
    names.forEach((name, i) => {
      const previous = grads.get(name)!;
      grads.set(name, tf.tidy(() => previous.add(tf.tensor(result.grads[i], previous.shape))));
      previous.dispose();
    });
    loss += result.loss;
  }
  return loss;
}

/** A worker thread that computes gradients for part of each step (see the top of this file). */
export class GradientHelper {
  private constructor(private readonly worker: Worker) {}

  /**
   * Start a helper for a model of `cfg` whose trainable parameters are `names` (in the optimizer's order): the
   * worker loads tfjs and the wasm backend and builds the model (its weights come with each step). Rejects with the
   * worker's error if it cannot start.
   */
  static async start(cfg: VLMConfig, names: string[]): Promise<GradientHelper> {
    // Bundled for an offline machine (scripts/pack-gpu.sh), this file is part of train.js or bench.js, and the
    // worker's bundle, parallel_worker.js, lies beside it.
    const file = import.meta.url.endsWith(".ts") ? "./parallel_worker.ts" : "./parallel_worker.js";
    const worker = new Worker(new URL(file, import.meta.url), { type: "module" });
    const helper = new GradientHelper(worker);
    try {
      await helper.request({ type: "init", cfg, names });
    } catch (e) {
      worker.terminate();
      throw e;
    }
    return helper;
  }

  /**
   * Up to `count` helpers: started one after another until one cannot start, which is reported through `log` (the
   * caller goes on with fewer threads: e.g. a bundle whose worker file is missing).
   */
  static async startUpTo(
    count: number,
    cfg: VLMConfig,
    names: string[],
    log: (line: string) => void,
  ): Promise<GradientHelper[]> {
    const helpers: GradientHelper[] = [];
    while (helpers.length < count) {
      try {
        helpers.push(await GradientHelper.start(cfg, names));
      } catch (e) {
        log(`threads: helper ${helpers.length + 1} did not start (${(e as Error).message}); going on with fewer`);
        break;
      }
    }
    return helpers;
  }

  /**
   * The loss and gradients of `work` at `weights` (one array per trainable parameter, in order). The weights are
   * transferred, not copied: they are the helper's from now on, unusable here. (Deno's structured clone, the
   * alternative, copies at about 200 MB/s: 100 ms a step for cpu-5m's 21 MB, half the step.)
   */
  compute(weights: Float32Array[], work: GradientWork[]): Promise<HelperResult> {
    const buffers = weights.map((w) => w.buffer as ArrayBuffer);
    return this.request({ type: "step", weights, work }, buffers) as Promise<HelperResult>;
  }

  /**
   * Vision pretraining's counterpart of {@link compute} (lib/vision_pretrain.ts): the helper draws `work`'s scenes and
   * answers share × their loss and the gradients, at `weights` (quadrantWeights' order, transferred).
   */
  computeQuadrants(weights: Float32Array[], work: QuadrantWork): Promise<HelperResult> {
    const buffers = weights.map((w) => w.buffer as ArrayBuffer);
    return this.request({ type: "quadrants", weights, work }, buffers) as Promise<HelperResult>;
  }

  /** Stop the worker (its memory goes with it). */
  close(): void {
    this.worker.terminate();
  }

  private request(message: unknown, transfer: Transferable[] = []): Promise<unknown> {
    return new Promise((resolve, reject) => {
      this.worker.onmessage = ({ data }) =>
        data.error ? reject(new Error(`gradient helper: ${data.error}`)) : resolve(data);
      this.worker.onerror = (event) => {
        event.preventDefault();
        reject(new Error(`gradient helper: ${event.message}`));
      };
      this.worker.postMessage(message, transfer);
    });
  }
}
