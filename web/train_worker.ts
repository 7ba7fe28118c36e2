// web/train_worker.ts — `deno task train`'s loop in a Web Worker, so the page never freezes while it trains.
//
// The same recipe as train.ts: the tiny preset from scratch, the default settings of lib/train_config.ts, the shapes
// world's batches and val questions of lib/train_data.ts, AdamW with the reference's parameter groups and schedule
// (lib/optimizer.ts), one lib/train_step.ts step at a time, and the val accuracy of lib/scoring.ts every
// eval_interval steps and at the end. What train.ts does and this does not: helper threads (a step runs on this one
// worker; tfjs' wasm build has its own threads), checkpoints on disk (the page asks for the files instead), the val
// loss and the test accuracy after training, and the vision pretraining stage (lib/vision_pretrain.ts): a run in the
// page starts its ViT from random weights.
//
// Messages: the page sends `ToWorker`, the worker answers with `FromWorker`.

/// <reference lib="dom" />

import { type Batch, buildShapesTokenizerConfig, buildShapesTokenizerJson, tokenizerFromJson } from "../data.ts";
import { VisionLanguageModel } from "../nanovlm.ts";
import { DEFAULT_TRAIN_CONFIG, modelConfig, type TrainConfig } from "../lib/train_config.ts";
import { AdamW, adamWOnHost, lrSchedule, paramGroups } from "../lib/optimizer.ts";
import { shareSpacedWordEmbeddings, trainStep } from "../lib/train_step.ts";
import { evaluate } from "../lib/scoring.ts";
import { shapesTrainingData } from "../lib/train_data.ts";
import { checkpointFiles } from "../lib/state_dict.ts";
import { type BrowserBackend, startBackend } from "./backend.ts";

/** What the page asks of the worker. */
export type ToWorker =
  | { type: "start"; backend?: BrowserBackend; steps: number; batchSize: number }
  | { type: "pause" }
  | { type: "resume" }
  | { type: "checkpoint"; purpose: "download" | "use" };

/** What the worker tells the page. */
export type FromWorker =
  | { type: "started"; backend: string; config: TrainConfig; parameters: number }
  | { type: "step"; step: number; steps: number; loss: number; lrs: number[]; gradNorm: number; ms: number }
  | { type: "eval"; step: number; valAccuracy: number; questions: number; seconds: number }
  | { type: "done"; steps: number }
  | { type: "checkpoint"; purpose: "download" | "use"; config: string; safetensors: Uint8Array; step: number }
  | { type: "error"; message: string };

const post = (message: FromWorker, transfer: Transferable[] = []) => self.postMessage(message, { transfer });

let model: VisionLanguageModel | undefined;
let step = 0;
let paused = false;
let wakeUp: (() => void) | undefined; // resolves the wait of a paused loop

/** Train the tiny preset for `steps` steps with the default settings (and the page's batch size). */
async function train(requested: BrowserBackend | undefined, steps: number, batchSize: number): Promise<void> {
  const config: TrainConfig = { ...DEFAULT_TRAIN_CONFIG, max_training_steps: steps, batch_size: batchSize };
  const backend = await startBackend(requested);
  const tokenizer = tokenizerFromJson(buildShapesTokenizerJson(), buildShapesTokenizerConfig());
  const cfg = modelConfig(config.preset);
  model = new VisionLanguageModel(cfg, { seed: config.seed });
  model.eosTokenId = tokenizer.eosTokenId;
  if (config.share_spaced_words) shareSpacedWordEmbeddings(model, tokenizer);
  const optimizer = new AdamW(model.params, paramGroups(model, config.lr_mp, config.lr_backbones), {
    beta2: config.adam_beta2,
    momentsOnHost: adamWOnHost(backend.name),
  });
  // The shapes world's batches from the start, and its fixed val questions, as train.ts gets them.
  const { batches, valQuestions } = shapesTrainingData(config, cfg, tokenizer, 0);
  post({ type: "started", backend: backend.description, config, parameters: model.parameterCount() });

  while (step < steps) {
    const micro = Array.from(
      { length: config.gradient_accumulation_steps },
      () => (batches as Iterator<Batch>).next().value!,
    );
    const lrs = optimizer.groups.map((g) => lrSchedule(step, g.maxLr, steps));
    const started = performance.now();
    const result = await trainStep(model, micro, optimizer, {
      lrs,
      maxGradNorm: config.max_grad_norm,
      answerFloor: config.answer_floor,
    });
    step++;
    post({
      type: "step",
      step,
      steps,
      loss: result.loss,
      lrs,
      gradNorm: result.gradNorm,
      ms: performance.now() - started,
    });
    if (step % config.eval_interval === 0 || step === steps) {
      const evalStarted = performance.now();
      const { accuracy } = await evaluate(model, tokenizer, valQuestions, { batchSize: 64 });
      const seconds = (performance.now() - evalStarted) / 1000;
      post({ type: "eval", step, valAccuracy: accuracy, questions: valQuestions.length, seconds });
    }
    // A macrotask between steps lets the page's messages in (pause, a checkpoint): a step's own awaits resolve at once
    // on wasm and would never let them.
    await new Promise((resolve) => setTimeout(resolve, 0));
    while (paused) await new Promise<void>((resolve) => wakeUp = resolve);
  }
  post({ type: "done", steps: step });
}

/** The model as nanoVLM's two files, to download or to ask in the page. */
async function sendCheckpoint(purpose: "download" | "use"): Promise<void> {
  if (!model) throw new Error("there is no model yet: start training first");
  const { config, safetensors } = await checkpointFiles(model);
  post({ type: "checkpoint", purpose, config, safetensors, step }, [safetensors.buffer as ArrayBuffer]);
}

self.onmessage = (event: MessageEvent<ToWorker>) => {
  const message = event.data;
  const failed = (error: unknown) => post({ type: "error", message: (error as Error).message ?? String(error) });
  if (message.type === "start") train(message.backend, message.steps, message.batchSize).catch(failed);
  else if (message.type === "checkpoint") sendCheckpoint(message.purpose).catch(failed);
  else {
    paused = message.type === "pause";
    if (!paused) wakeUp?.();
  }
};
