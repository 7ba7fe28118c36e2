// parallel_worker.ts — the helper thread of parallel.ts: a copy of the model that computes gradients on request.
//
// Messages in: {type: "init", cfg, names} builds the model (wasm backend); {type: "step", weights, work} sets every
// trainable parameter to `weights` and answers {loss, grads} for `work`, computed by lib/train_step.ts's gradientsOf,
// the same code as the main thread's share of the step. Any error is answered as {error} instead.

/// <reference lib="deno.worker" />
import * as tf from "@tensorflow/tfjs";
import { VisionLanguageModel, type VLMConfig } from "../nanovlm.ts";
import { initBackend } from "./runtime.ts";
import { gradientsOf } from "../lib/train_step.ts";
import type { GradientWork } from "./parallel.ts";

let model: VisionLanguageModel | undefined;
let names: string[] = [];

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
    const params = model!.params;
    names.forEach((name, i) => {
      const p = params.get(name)!;
      tf.tidy(() => p.assign(tf.tensor(data.weights[i], p.shape)));
    });
    const grads = new Map<string, tf.Tensor>();
    const loss = gradientsOf(model!, names, data.work as GradientWork[], grads);
    const arrays = names.map((name) => grads.get(name)!.dataSync() as Float32Array);
    const value = (await loss.data())[0];
    tf.dispose([loss, ...grads.values()]);
    self.postMessage({ loss: value, grads: arrays }, arrays.map((a) => a.buffer as ArrayBuffer));
  } catch (e) {
    self.postMessage({ error: (e as Error).message });
  }
};
