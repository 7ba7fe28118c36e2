// parallel_worker.ts — the helper thread of parallel.ts: a copy of the model that computes gradients on request.
//
// Messages in: {type: "init", cfg, names} builds the model (wasm backend); {type: "step", weights, work} sets every
// trainable parameter to `weights` and answers {loss, grads} for `work`, computed by lib/train_step.ts's gradientsOf,
// the same code as the main thread's share of the step. {type: "quadrants", weights, work} does the same for a part of
// a vision pretraining step (lib/vision_pretrain.ts's quadrantGradients, on the ViT's, projector's and heads' weights).
// Any error is answered as {error} instead.

/// <reference lib="deno.worker" />
import * as tf from "@tensorflow/tfjs";
import { VisionLanguageModel, type VLMConfig } from "../nanovlm.ts";
import { initBackend } from "./runtime.ts";
import { gradientsOf } from "../lib/train_step.ts";
import type { GradientWork } from "./parallel.ts";
import {
  createHeads,
  quadrantGradients,
  type QuadrantHeads,
  quadrantWeights,
  type QuadrantWork,
} from "../lib/vision_pretrain.ts";

let model: VisionLanguageModel | undefined;
let names: string[] = [];
let heads: QuadrantHeads | undefined; // vision pretraining's heads, made at its first step; every step sets them

/** Set each of `variables` to the matching array of `weights`, in order. */
function assignAll(variables: tf.Variable[], weights: Float32Array[]): void {
  variables.forEach((v, i) => tf.tidy(() => v.assign(tf.tensor(weights[i], v.shape))));
}

self.onmessage = async ({ data }) => {
  try {
    if (data.type === "init") {
      await initBackend("wasm", { quiet: true });
      model = new VisionLanguageModel(data.cfg as VLMConfig);
      names = data.names;
      const unknown = names.filter((name) => !model!.params.has(name));
      if (unknown.length) throw new Error(`the model has no parameter ${unknown.join(", ")}`);
      self.postMessage({ ready: true });
      return;
    }
    // The gradients go back in the order the weights came in.
    let loss: tf.Scalar, grads = new Map<string, tf.Tensor>(), order = names;
    if (data.type === "quadrants") {
      heads ??= createHeads(model!.cfg, 0); // its values are replaced by every step's
      const trained = quadrantWeights(model!, heads);
      assignAll([...trained.values()], data.weights);
      ({ loss, grads } = quadrantGradients(model!, heads, data.work as QuadrantWork));
      order = [...trained.keys()];
    } else {
      assignAll(names.map((name) => model!.params.get(name)!), data.weights);
      loss = gradientsOf(model!, names, data.work as GradientWork[], grads);
    }
    const arrays = order.map((name) => grads.get(name)!.dataSync() as Float32Array);
    const value = (await loss.data())[0];
    tf.dispose([loss, ...grads.values()]);
    self.postMessage({ loss: value, grads: arrays }, arrays.map((a) => a.buffer as ArrayBuffer));
  } catch (e) {
    self.postMessage({ error: (e as Error).message });
  }
};
