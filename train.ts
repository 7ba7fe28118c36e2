// train.ts — train a small VLM on one machine: `deno task train`.
//
// What this is: nanoVLM's training loop (train.py at 8374ce1, reference §13) for the
// built-in shapes world: AdamW with two parameter groups (projector vs backbones), the
// reference's warmup + cosine schedule, gradient accumulation, clipping at 1.0, a val
// loss and a val accuracy every `eval_interval` steps, checkpoints in nanoVLM's format
// that survive a crash, and `--resume` that continues a run exactly where it stopped.
// With no arguments it trains the `tiny` preset from scratch in minutes on a laptop CPU.
//
// Real data and pretrained backbones come from datasets.ts and hub.ts: `--data
// cauldron:vqav2` (or a .jsonl / .parquet path) streams conversations instead of the shapes
// world, a preset with `vlm_load_backbone_weights` (nanovlm-222m) starts from SigLIP and
// SmolLM2 downloaded from the Hub, and `--push_to_hub owner/repo` shares the result.
//
// What this is not: the reference's data mix (45 Cauldron subsets, packing), mixed
// precision, multi-GPU, or lmms-eval. The model is nanovlm.ts, the data data.ts, the
// answer scoring eval.ts; this file only wires them into a loop.
//
// Reusable pieces (exercises, notebooks and benchmarks import them): lrSchedule, AdamW,
// clipGradients (gradientNorm + scaleGradients), trainStep, saveCheckpoint / loadCheckpoint,
// parseTrainArgs, train.
//
// Shapes as in nanovlm.ts: B batch, T tokens, N images, S image side, V vocabulary.

import * as tf from "@tensorflow/tfjs";
import { parseArgs } from "node:util";
import { type Batch, type ChatTokenizer, checkTokenizerFitsConfig, IGNORE_INDEX, shapesBatches } from "./data.ts";
import { evaluate, shapesQuestions } from "./lib/eval.ts";
import { resolveTokenizerPath } from "./lib/inference.ts";
import { loadBackbones, modelFromBackbones } from "./lib/backbones.ts";
import { type DataSource, heldOutBatches, newDataStats, openDataset, trainingBatches } from "./lib/datasets.ts";
import { hubToken, hubTokenizer, pushToHub } from "./lib/hub.ts";
import { GradientHelper, type GradientWork, splitRows } from "./backend/parallel.ts";
import { configFromJSON, fromPretrained, savePretrained } from "./lib/checkpoint.ts";
import { parameterSpecs, PRESETS, validateConfig, VisionLanguageModel, type VLMConfig } from "./nanovlm.ts";
import {
  type BackendName,
  initBackend,
  shareBlasThreads,
  SimdAdamW,
  wasmMatMulEngine,
  webgpuAdamWStep,
  webgpuSumOfSquares,
} from "./backend/runtime.ts";
import { encodeSafetensors, readSafetensors, type SafetensorsTensor } from "./lib/safetensors.ts";
import { writeFileAtomic } from "./lib/files.ts";
import { useActivationCheckpointing } from "./backend/low_memory.ts";
import { snakeCaseFlags } from "./lib/cli.ts";

// ---- Training configuration -----------------------------------------------------------

/**
 * Everything about a run that is not the model's shape (the model is a `VLMConfig`).
 * Names follow the reference's TrainConfig where it has the field.
 */
export interface TrainConfig {
  preset: string; // the model preset (PRESETS) that model-config overrides apply to
  lr_mp: number; // peak learning rate of the modality projector (MP.*)
  lr_backbones: number; // peak learning rate of the ViT and the decoder; 0 freezes them
  adam_beta2: number; // AdamW's β2: its squared-gradient average spans about 1/(1−β2) steps (reference: torch's 0.999)
  batch_size: number; // samples per micro-batch (on average when sort_by_length cuts them: evenCuts in data.ts)
  gradient_accumulation_steps: number; // micro-batches per optimizer step
  max_training_steps: number; // optimizer steps; the schedule spans exactly these
  max_grad_norm: number; // clip the global gradient norm to this (0 = no clipping)
  eval_interval: number; // val loss, val accuracy and checkpoints every this many steps
  val_samples: number; // val-split samples in the val loss (a fixed subset)
  val_questions: number; // val-split questions answered for the val accuracy (a fixed subset)
  test_examples: number; // after training, score the questions of this many test and test-novel scenes (0 = skip)
  caption_weight: number; // shapes world: how often a caption question is drawn relative to each other kind
  choice_weight: number; // shapes world: how often a multiple-choice question is drawn relative to each other kind
  position_weight: number; // shapes world: how often a position question is drawn relative to each other kind (README)
  sort_by_length: boolean; // shapes world: sort each step's samples by length into its micro-batches (less padding)
  share_spaced_words: boolean; // a decoder from scratch: "red" and " red" start from one embedding row
  choice_hints: number; // shapes world: share of multiple-choice questions that say their answer (a reading exercise)
  sorted_choices: number; // shapes world: share of multiple-choice questions with options in alphabetical order
  answer_floor: number; // a sample's answer weighs at least this many tokens in the loss (0: every token 1, the reference)
  seed: number; // model init and data order
  backend: string; // "webgpu" | "wasm" | "cpu", or "" for the best available
  runs_dir: string; // runs go to runs_dir/run_name/
  run_name: string; // "" = the preset and the date
  resume: string; // a run folder to continue from its latest checkpoint
  stop_at: number; // stop (with a checkpoint) after this step, to finish later with --resume; 0 = run to the end
  data: string; // "shapes" (the built-in world), "cauldron:<subset>", a .jsonl file, or .parquet file(s) (datasets.ts)
  shuffle_buffer: number; // conversations mixed at a time when streaming --data (0 = in file order)
  push_to_hub: string; // "owner/repo": upload the best checkpoint with a model card when training ends ("" = don't)
  low_memory: string; // "auto" | "on" | "off": activation checkpointing + AdamW moments in JS memory (lowMemoryTraining)
  threads: number; // threads computing each step's gradient (parallel.ts): 0 = automatic (trainingThreads)
}

/** The defaults: `deno task train` with no arguments (chosen for the shapes world on a 2-core CPU: see README). */
export const DEFAULT_TRAIN_CONFIG: Readonly<TrainConfig> = Object.freeze({
  preset: "tiny",
  lr_mp: 1e-3,
  lr_backbones: 1e-3,
  adam_beta2: 0.95,
  batch_size: 32,
  gradient_accumulation_steps: 2,
  max_training_steps: 5000,
  max_grad_norm: 1.0,
  eval_interval: 200,
  val_samples: 128,
  val_questions: 128,
  test_examples: 300,
  caption_weight: 2,
  choice_weight: 1,
  position_weight: 2,
  sort_by_length: true,
  share_spaced_words: true,
  choice_hints: 0.5,
  sorted_choices: 0.5,
  answer_floor: 0,
  seed: 0,
  backend: "",
  runs_dir: "runs",
  run_name: "",
  resume: "",
  stop_at: 0,
  data: "shapes",
  shuffle_buffer: 1000,
  push_to_hub: "",
  low_memory: "auto",
  threads: 0,
});

/** A VLMConfig key, a TrainConfig key, or neither. */
type ConfigValue = string | number | boolean | Record<string, string>;

/**
 * Parse one `--key=value` against the type of its default: numbers must be finite
 * (integers where the default is an integer train setting), booleans true/false,
 * objects JSON. Throws an Error naming the key, the value and the expected type.
 */
function parseValue(key: string, raw: string, example: ConfigValue, integer: boolean): ConfigValue {
  const bad = (what: string) => new Error(`--${key}=${raw}: expected ${what}`);
  if (typeof example === "number") {
    const value = Number(raw);
    if (raw.trim() === "" || !Number.isFinite(value)) throw bad("a number");
    if (integer && !Number.isInteger(value)) throw bad("an integer");
    return value;
  }
  if (typeof example === "boolean") {
    if (raw !== "true" && raw !== "false") throw bad("true or false");
    return raw === "true";
  }
  if (typeof example === "object") {
    try {
      const value = JSON.parse(raw);
      if (typeof value === "object" && value !== null && !Array.isArray(value)) return value;
    } catch {
      // reported below
    }
    throw bad("a JSON object");
  }
  return raw;
}

// Train settings that count things: they must be whole numbers.
const INTEGER_TRAIN_KEYS = new Set([
  "batch_size",
  "gradient_accumulation_steps",
  "max_training_steps",
  "eval_interval",
  "val_samples",
  "val_questions",
  "test_examples",
  "seed",
  "stop_at",
  "shuffle_buffer",
]);

/**
 * Read `--key=value` (or `--key value`) arguments: any TrainConfig key and any VLMConfig
 * key, each type-checked against its default. Returns only what was given: train
 * settings to apply to the defaults (or to a resumed run's settings) and model settings
 * to apply to the preset. An unknown key is an Error that lists every valid key.
 */
export function parseTrainArgs(args: string[]): { train: Partial<TrainConfig>; model: Partial<VLMConfig> } {
  const trainKeys = Object.keys(DEFAULT_TRAIN_CONFIG);
  const modelKeys = Object.keys(PRESETS.tiny);
  const options = Object.fromEntries([...trainKeys, ...modelKeys].map((k) => [k, { type: "string" as const }]));
  let values: Record<string, string | undefined>;
  try {
    ({ values } = parseArgs({ args: snakeCaseFlags(args), options, strict: true, allowPositionals: false }));
  } catch (e) {
    throw new Error(
      `${(e as Error).message}\n\nTraining options: ${trainKeys.map((k) => `--${k}`).join(" ")}\n` +
        `Model options (override the preset): ${modelKeys.map((k) => `--${k}`).join(" ")}`,
    );
  }
  const train: Record<string, ConfigValue> = {}, model: Record<string, ConfigValue> = {};
  for (const [key, raw] of Object.entries(values)) {
    if (raw === undefined) continue;
    if (key in DEFAULT_TRAIN_CONFIG) {
      const example = DEFAULT_TRAIN_CONFIG[key as keyof TrainConfig];
      train[key] = parseValue(key, raw, example, INTEGER_TRAIN_KEYS.has(key));
    } else {
      model[key] = parseValue(key, raw, PRESETS.tiny[key as keyof VLMConfig], false);
    }
  }
  return { train: train as Partial<TrainConfig>, model: model as Partial<VLMConfig> };
}

/** The preset with the overrides applied, validated (an unknown preset lists the known ones). */
export function modelConfig(preset: string, overrides: Partial<VLMConfig> = {}): VLMConfig {
  const base = PRESETS[preset];
  if (!base) throw new Error(`unknown preset "${preset}": use one of ${Object.keys(PRESETS).join(", ")}`);
  const cfg = { ...base, ...overrides };
  validateConfig(cfg);
  return cfg;
}

// ---- Learning-rate schedule ----------------------------------------------------------

/**
 * The reference's `get_lr`: linear warmup over the first 3% of the steps, then a cosine
 * from maxLr down to 10% of it at the last step (and 10% after). `step` counts from 0.
 */
export function lrSchedule(step: number, maxLr: number, maxSteps: number): number {
  const minLr = 0.1 * maxLr;
  const warmup = 0.03 * maxSteps; // a float, as in the reference: 150 for 5000 steps
  if (step < warmup) return (maxLr * (step + 1)) / warmup;
  if (step > maxSteps) return minLr;
  const ratio = (step - warmup) / (maxSteps - warmup);
  return minLr + 0.5 * (1 + Math.cos(Math.PI * ratio)) * (maxLr - minLr);
}

// ---- AdamW ---------------------------------------------------------------------------
//
// torch.optim.AdamW with its defaults, written out so a reader sees every term. Step t
// (from 1) for each parameter p with gradient g:
//   p ← p − lr·wd·p                       decoupled weight decay, on every parameter
//   m ← β1·m + (1−β1)·g                   first moment
//   v ← β2·v + (1−β2)·g²                  second moment
//   p ← p − lr/(1−β1ᵗ) · m / (√v/√(1−β2ᵗ) + ε)   bias-corrected step
// The reference gives the projector its own, larger learning rate: freshly initialised
// layers between two (normally pretrained) backbones need to move faster.

/** A named set of parameters sharing one learning rate. */
export interface ParamGroup {
  name: string;
  /** Peak learning rate (the schedule scales it). */
  maxLr: number;
  /** nanoVLM parameter names. */
  params: string[];
}

/**
 * The reference's groups: `MP.*` at lr_mp, the vision encoder and the decoder at
 * lr_backbones. With lr_backbones = 0 the backbones are frozen: they are left out
 * entirely (no gradient, no weight decay), as the reference sets requires_grad = False.
 */
export function paramGroups(model: VisionLanguageModel, lrMp: number, lrBackbones: number): ParamGroup[] {
  const names = [...model.params.keys()];
  const groups: ParamGroup[] = [{ name: "mp", maxLr: lrMp, params: names.filter((n) => n.startsWith("MP.")) }];
  if (lrBackbones > 0) {
    groups.push({ name: "backbones", maxLr: lrBackbones, params: names.filter((n) => !n.startsWith("MP.")) });
  }
  return groups;
}

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
    if (!/^[A-Za-z]+$/.test(word)) continue; // special tokens, punctuation and spaced words
    const spaced = spacedId(tokenizer, word);
    if (spaced !== undefined) [source[id], pairs] = [spaced, pairs + 1];
  }
  const embedding = model.params.get("decoder.token_embedding.weight")!; // [V, D] (the output layer too, when tied)
  tf.tidy(() => embedding.assign(tf.gather(embedding, source)));
  return pairs;
}

/** AdamW options; the defaults are torch's. */
export interface AdamWOptions {
  beta1?: number;
  beta2?: number;
  eps?: number;
  weightDecay?: number;
  /**
   * Keep m and v outside the tensors, in a WebAssembly memory of their own, and update one parameter at a time
   * with runtime.ts's SIMD kernel (`SimdAdamW`), instead of as tensors beside the weights: for the wasm backend, whose
   * heap holds at most 4 GiB (the 222M preset's moments alone are 1.8 GB; README, "Full size on a CPU"). Same results
   * to float32 rounding; wasm and cpu only (it reads the weights synchronously).
   */
  momentsOnHost?: boolean;
}

/**
 * torch.optim.AdamW over parameter groups; moments live beside the weights as tf tensors, or on the host. With tensor
 * moments a step only queues device work and reads nothing back; momentsOnHost reads every weight and gradient on the
 * host, which is the point of it (wasm and cpu only, where the host is the same memory).
 */
export class AdamW {
  readonly groups: ParamGroup[];
  readonly beta1: number;
  readonly beta2: number;
  readonly eps: number;
  readonly weightDecay: number;
  readonly momentsOnHost: boolean;
  /** Optimizer steps taken so far (t of the bias correction is stepCount + 1 during a step). */
  stepCount = 0;
  private readonly params: Map<string, tf.Variable>;
  private readonly expAvg = new Map<string, tf.Tensor>(); // m
  private readonly expAvgSq = new Map<string, tf.Tensor>(); // v
  private hostMoments: SimdAdamW | undefined; // m and v with momentsOnHost

  constructor(params: Map<string, tf.Variable>, groups: ParamGroup[], options: AdamWOptions = {}) {
    this.params = params;
    this.groups = groups;
    this.beta1 = options.beta1 ?? 0.9;
    this.beta2 = options.beta2 ?? 0.999;
    this.eps = options.eps ?? 1e-8;
    this.weightDecay = options.weightDecay ?? 0.01;
    this.momentsOnHost = options.momentsOnHost ?? false;
    for (const [name, beta] of [["beta1", this.beta1], ["beta2", this.beta2]] as const) {
      if (!(beta >= 0 && beta < 1)) throw new Error(`AdamW: ${name} must be in [0, 1), got ${beta}`);
    }
    if (this.momentsOnHost && tf.getBackend() === "webgpu") {
      throw new Error("AdamW: momentsOnHost is for the wasm and cpu backends (it reads tensors synchronously)");
    }
    for (const name of this.trainable) {
      const p = params.get(name);
      if (!p) throw new Error(`AdamW: the model has no parameter ${name}`);
      if (!this.momentsOnHost) {
        this.expAvg.set(name, tf.zerosLike(p));
        this.expAvgSq.set(name, tf.zerosLike(p));
      }
    }
    if (this.momentsOnHost) {
      this.hostMoments = new SimdAdamW(new Map(this.trainable.map((name) => [name, params.get(name)!.size])));
    }
  }

  /** Names of every parameter the optimizer updates, group by group. */
  get trainable(): string[] {
    return this.groups.flatMap((g) => g.params);
  }

  /** The trainable variables, in `trainable` order (for tf.variableGrads). */
  get variables(): tf.Variable[] {
    return this.trainable.map((name) => this.params.get(name)!);
  }

  /**
   * One update with `grads` (by parameter name) times `gradScale` (gradient clipping's coefficient, applied as each
   * gradient is read rather than in a pass of its own) and one learning rate per group (same order as `groups`).
   */
  step(grads: Map<string, tf.Tensor>, lrs: number[], gradScale = 1): void {
    if (lrs.length !== this.groups.length) throw new Error(`AdamW: ${this.groups.length} groups but ${lrs.length} lrs`);
    const t = ++this.stepCount;
    const bc1 = 1 - this.beta1 ** t, bc2Sqrt = Math.sqrt(1 - this.beta2 ** t);
    this.groups.forEach((group, i) => {
      const { beta1, beta2, eps } = this, lr = lrs[i];
      const decay = 1 - lr * this.weightDecay, stepSize = lr / bc1, invBc2Sqrt = 1 / bc2Sqrt;
      const constants = { gradScale, beta1, beta2, decay, stepSize, invBc2Sqrt, eps };
      for (const name of group.params) {
        const p = this.params.get(name)!, g = grads.get(name);
        if (!g) throw new Error(`AdamW: no gradient for ${name}`);
        if (this.hostMoments) {
          const updated = this.hostMoments.step(name, p, g, constants);
          p.assign(updated);
          updated.dispose();
          continue;
        }
        const [m, v] = [this.expAvg.get(name)!, this.expAvgSq.get(name)!];
        // On WebGPU three fused passes (runtime.ts: ops would be about fifteen dispatches); elsewhere tfjs ops, which
        // round as torch.optim.AdamW does.
        const next = tf.getBackend() === "webgpu" ? webgpuAdamWStep(p, g, m, v, constants) : tf.tidy(() => {
          const scaled = gradScale === 1 ? g : g.mul(gradScale);
          const m1 = m.mul(beta1).add(scaled.mul(1 - beta1));
          const v1 = v.mul(beta2).add(scaled.square().mul(1 - beta2));
          const denom = v1.sqrt().div(bc2Sqrt).add(eps);
          return { p: p.mul(decay).sub(m1.div(denom).mul(stepSize)), m: m1, v: v1 };
        });
        p.assign(next.p);
        next.p.dispose();
        this.expAvg.set(name, next.m);
        this.expAvgSq.set(name, next.v);
        tf.dispose([m, v]);
      }
    });
  }

  /** The moments as F32 tensors named `exp_avg.<param>` / `exp_avg_sq.<param>` (torch's names; our layout). */
  async state(): Promise<Map<string, { dtype: "F32"; shape: number[]; data: Float32Array }>> {
    const out = new Map<string, { dtype: "F32"; shape: number[]; data: Float32Array }>();
    for (const name of this.hostMoments ? this.trainable : []) {
      const shape = this.params.get(name)!.shape, { m, v } = this.hostMoments!.state(name);
      out.set(`exp_avg.${name}`, { dtype: "F32", shape, data: m });
      out.set(`exp_avg_sq.${name}`, { dtype: "F32", shape, data: v });
    }
    for (const [kind, moments] of [["exp_avg", this.expAvg], ["exp_avg_sq", this.expAvgSq]] as const) {
      for (const [name, t] of moments) {
        out.set(`${kind}.${name}`, { dtype: "F32", shape: t.shape, data: (await t.data()) as Float32Array });
      }
    }
    return out;
  }

  /** Restore moments saved by `state` (every trainable parameter's, with matching shapes) and the step count. */
  loadState(tensors: Map<string, SafetensorsTensor>, stepCount: number, source = "optimizer state"): void {
    const problems: string[] = [];
    for (const kind of ["exp_avg", "exp_avg_sq"]) {
      for (const name of this.trainable) {
        const saved = tensors.get(`${kind}.${name}`), shape = this.params.get(name)!.shape;
        if (!saved) problems.push(`missing ${kind}.${name}`);
        else if (saved.shape.join() !== shape.join()) {
          problems.push(`${kind}.${name} has shape [${saved.shape}], the model needs [${shape}]`);
        }
      }
    }
    if (problems.length) {
      throw new Error(`${source} does not fit this model and optimizer:\n  ${problems.join("\n  ")}`);
    }
    for (const [kind, moments] of [["exp_avg", this.expAvg], ["exp_avg_sq", this.expAvgSq]] as const) {
      for (const name of this.trainable) {
        const saved = tensors.get(`${kind}.${name}`)!;
        if (this.hostMoments) this.hostMoments.state(name)[kind === "exp_avg" ? "m" : "v"].set(saved.data);
        else {
          moments.get(name)!.dispose();
          moments.set(name, tf.tensor(saved.data as Float32Array, saved.shape, "float32"));
        }
      }
    }
    this.stepCount = stepCount;
  }

  /** Free the moments. */
  dispose(): void {
    tf.dispose([...this.expAvg.values(), ...this.expAvgSq.values()]);
    this.expAvg.clear();
    this.expAvgSq.clear();
    this.hostMoments = undefined; // its memory goes with the last reference
  }
}

/**
 * Whether AdamW keeps its moments outside the tensors and updates each parameter with a WebAssembly SIMD kernel
 * (`momentsOnHost`): on wasm and cpu, where that kernel reads the weights and gradients in place. There it is quicker
 * than AdamW's fifteen or so tfjs kernels per parameter (a step of the tiny preset's optimizer: 1.4 against 19 ms;
 * cpu-5m: 5 against 36 ms) and keeps 8 bytes per parameter off the 4 GiB wasm heap, which the 222M needs (README,
 * "Full size on a CPU"). On WebGPU the moments stay on the GPU: reading every weight back each step would cost far
 * more.
 */
export function adamWOnHost(backend: string): boolean {
  return backend !== "webgpu";
}

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

// ---- Gradient clipping -----------------------------------------------------------------
//
// torch.nn.utils.clip_grad_norm_ in two halves, so that trainStep can read the norm together with the loss in one
// GPU→CPU read: `gradientNorm` stays on the device, `scaleGradients` acts on the number once it is read. (The scale
// could stay on the device too, but the norm is read anyway for the log and the NaN guard, and a JS number lets an
// unclipped step skip the multiply.)

/** The L2 norm of all gradients together, as a scalar tensor (not read). grads: any shapes → [] */
export function gradientNorm(grads: Map<string, tf.Tensor>): tf.Scalar {
  // On wasm and cpu each sum of squares is the dot product g·g, a [1, n]·[n, 1] matMul: it reads g once (with BLAS on
  // every core, in SIMD partial sums), where square().sum() writes g² first and then adds it up in one float32 (for
  // the 222M's 47M-float embedding 0.5% off, and 5× slower). WebGPU's matMul is not made for a single output: there
  // one WGSL program reads g once and adds in a tree (runtime.ts).
  const sumOfSquares = tf.getBackend() === "webgpu" ? webgpuSumOfSquares : (g: tf.Tensor) => {
    const row = g.reshape([1, -1]); // [1, n]
    return row.matMul(row, false, true).reshape([]); // [1, n]·[n, 1] → []
  };
  return tf.tidy(() => tf.addN([...grads.values()].map(sumOfSquares)).sqrt() as tf.Scalar);
}

/** What clipping multiplies every gradient by: maxNorm / (norm + 1e-6) when that is below 1, else 1 (maxNorm ≤ 0: 1). */
export function clipCoefficient(norm: number, maxNorm: number): number {
  const coef = maxNorm / (norm + 1e-6);
  return maxNorm <= 0 || coef >= 1 ? 1 : coef;
}

/**
 * When `norm` exceeds maxNorm, scale every gradient by maxNorm / (norm + 1e-6); maxNorm ≤ 0 never clips. The map's
 * tensors are replaced (and the old ones disposed), as torch scales them in place. (trainStep instead hands the
 * coefficient to AdamW, which applies it as it reads each gradient.)
 */
export function scaleGradients(grads: Map<string, tf.Tensor>, norm: number, maxNorm: number): void {
  const coef = clipCoefficient(norm, maxNorm);
  if (coef === 1) return;
  for (const [name, g] of grads) {
    grads.set(name, g.mul(coef));
    g.dispose();
  }
}

/** torch.nn.utils.clip_grad_norm_ in one call: clip `grads` in place and return the norm before clipping. */
export async function clipGradients(grads: Map<string, tf.Tensor>, maxNorm: number): Promise<number> {
  const normTensor = gradientNorm(grads);
  const norm = (await normTensor.data())[0];
  normTensor.dispose();
  scaleGradients(grads, norm, maxNorm);
  return norm;
}

// ---- One optimizer step ------------------------------------------------------------------

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
    let helpersLoss = 0;
    for (const result of await Promise.all(pending)) {
      if (!result) continue;
      names.forEach((name, i) => {
        const previous = grads.get(name)!;
        grads.set(name, tf.tidy(() => previous.add(tf.tensor(result.grads[i], previous.shape))));
        previous.dispose();
      });
      helpersLoss += result.loss;
    }
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

// ---- Checkpoints ---------------------------------------------------------------------------
//
// A checkpoint folder holds nanoVLM's two files (config.json, model.safetensors: loadable
// by generate.ts, eval.ts and PyTorch nanoVLM) plus what --resume needs: the AdamW
// moments (optimizer.safetensors) and trainer_state.json (step, data position, best val
// loss). A crash must never leave a half-written checkpoint where a good one was, so
// every file goes into `<dir>.partial/` first and the finished folder is swapped in with
// two renames: `<dir>` → `<dir>.previous`, `<dir>.partial` → `<dir>`. A crash between
// the renames leaves `<dir>.previous`, which recoverCheckpoint puts back.

/** Where the training loop is: everything besides weights and moments that --resume needs. */
export interface TrainerState {
  /** Optimizer steps done. */
  step: number;
  /** Training examples consumed: the data stream restarts here (shapesBatches' `start`). */
  examples_seen: number;
  /** Best val loss so far (the `best/` checkpoint's), or null before the first eval. */
  best_val_loss: number | null;
  /** Seconds spent training so far (for the summary). */
  elapsed_seconds: number;
}

/** The files of a resumable checkpoint; the first two alone are a nanoVLM checkpoint. */
export const CHECKPOINT_FILES = ["config.json", "model.safetensors", "optimizer.safetensors", "trainer_state.json"];

async function exists(path: string): Promise<boolean> {
  try {
    await Deno.lstat(path);
    return true;
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return false;
    throw e;
  }
}

/** Undo an interrupted swap: if `dir` is missing but `dir.previous` is there, put it back. Drop a stale `.partial`. */
export async function recoverCheckpoint(dir: string): Promise<void> {
  if (!await exists(dir) && await exists(`${dir}.previous`)) await Deno.rename(`${dir}.previous`, dir);
  if (await exists(`${dir}.partial`)) await Deno.remove(`${dir}.partial`, { recursive: true });
}

/**
 * Write a checkpoint to `dir` so that a crash at any moment leaves either the old or
 * the new checkpoint loadable. Without `optimizer` only the nanoVLM files are written
 * (the `best/` checkpoint). `writeFile` exists for tests that simulate a crash.
 */
export async function saveCheckpoint(
  dir: string,
  model: VisionLanguageModel,
  training?: { optimizer: AdamW; state: TrainerState },
  { writeFile = writeFileAtomic }: { writeFile?: (path: string, data: Uint8Array | string) => Promise<void> } = {},
): Promise<void> {
  const partial = `${dir}.partial`, previous = `${dir}.previous`;
  await recoverCheckpoint(dir);
  await savePretrained(model, partial);
  if (training) {
    await writeFile(`${partial}/optimizer.safetensors`, encodeSafetensors(await training.optimizer.state()));
    await writeFile(`${partial}/trainer_state.json`, JSON.stringify(training.state, null, 2) + "\n");
  }
  if (await exists(dir)) await Deno.rename(dir, previous);
  await Deno.rename(partial, dir);
  if (await exists(previous)) await Deno.remove(previous, { recursive: true });
}

/**
 * Load a resumable checkpoint: the model, the optimizer (moments restored, groups from
 * the learning rates given) and the trainer state. A missing file is an Error naming it.
 */
export async function loadCheckpoint(
  dir: string,
  lrMp: number,
  lrBackbones: number,
  optimizerOptions: AdamWOptions = {},
): Promise<{ model: VisionLanguageModel; optimizer: AdamW; state: TrainerState }> {
  await recoverCheckpoint(dir);
  for (const file of CHECKPOINT_FILES) {
    if (!await exists(`${dir}/${file}`)) throw new Error(`cannot resume from ${dir}: ${file} is missing`);
  }
  const model = await fromPretrained(dir);
  const optimizer = new AdamW(model.params, paramGroups(model, lrMp, lrBackbones), optimizerOptions);
  try {
    const state = JSON.parse(await Deno.readTextFile(`${dir}/trainer_state.json`)) as TrainerState;
    const moments = await readSafetensors(`${dir}/optimizer.safetensors`);
    optimizer.loadState(moments.tensors, state.step, `${dir}/optimizer.safetensors`);
    return { model, optimizer, state };
  } catch (e) {
    optimizer.dispose();
    model.dispose();
    throw e;
  }
}

// ---- Metrics and the loss curve ---------------------------------------------------------

/** One line of metrics.jsonl: a training step, or an evaluation (val_loss present). */
export interface MetricsRecord {
  step: number;
  loss?: number;
  lr?: number[];
  grad_norm?: number;
  ms?: number;
  val_loss?: number;
  val_accuracy?: number;
}

/**
 * The loss curve as a self-contained SVG: training loss per step (a line) and val loss
 * (dots), linear axes from 0. Opens in any browser; notebooks can display it.
 */
export function lossCurveSvg(records: readonly MetricsRecord[], title = "loss"): string {
  const train = records.filter((r) => r.loss !== undefined), val = records.filter((r) => r.val_loss !== undefined);
  const [W, H, left, right, top, bottom] = [640, 360, 56, 16, 28, 40];
  const maxStep = Math.max(1, ...records.map((r) => r.step));
  const maxLoss = Math.max(1e-6, ...train.map((r) => r.loss!), ...val.map((r) => r.val_loss!));
  const x = (step: number) => (left + (step / maxStep) * (W - left - right)).toFixed(1);
  const y = (loss: number) => (top + (1 - loss / maxLoss) * (H - top - bottom)).toFixed(1);
  const ticks = [0, 0.25, 0.5, 0.75, 1].map((f) =>
    `<line x1="${left}" x2="${W - right}" y1="${y(f * maxLoss)}" y2="${y(f * maxLoss)}" stroke="#ddd"/>` +
    `<text x="${left - 6}" y="${y(f * maxLoss)}" text-anchor="end" dominant-baseline="middle">` +
    `${(f * maxLoss).toPrecision(2)}</text>`
  );
  const line = train.map((r) => `${x(r.step)},${y(r.loss!)}`).join(" ");
  const dots = val.map((r) => `<circle cx="${x(r.step)}" cy="${y(r.val_loss!)}" r="3.5" fill="#d62728"/>`);
  return [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" font-family="sans-serif" font-size="11">`,
    `<rect width="${W}" height="${H}" fill="white"/>`,
    ...ticks,
    `<text x="${W / 2}" y="18" text-anchor="middle" font-size="13">${title}</text>`,
    `<text x="${W / 2}" y="${H - 8}" text-anchor="middle">step (max ${maxStep})</text>`,
    `<polyline points="${line}" fill="none" stroke="#1f77b4" stroke-width="1.2"/>`,
    ...dots,
    `<text x="${W - right}" y="18" text-anchor="end"><tspan fill="#1f77b4">— train</tspan>` +
    `<tspan fill="#d62728"> ● val</tspan></text>`,
    `</svg>`,
  ].join("\n") + "\n";
}

async function readMetrics(path: string): Promise<MetricsRecord[]> {
  if (!await exists(path)) return [];
  const text = await Deno.readTextFile(path);
  return text.split("\n").filter((line) => line.trim()).map((line) => JSON.parse(line));
}

// ---- Evaluation during training ----------------------------------------------------------

/** Mean loss over fixed batches (forward only). */
export async function meanLoss(model: VisionLanguageModel, batches: readonly Batch[]): Promise<number> {
  let total = 0, samples = 0;
  for (const batch of batches) {
    const t = batchTensors(trimPadding(batch));
    const loss = model.loss(t.inputIds, t.images, t.attentionMask, t.labels);
    total += (await loss.data())[0] * batch.batchSize;
    samples += batch.batchSize;
    tf.dispose([loss, ...Object.values(t)]);
  }
  return total / Math.max(1, samples);
}

// ---- The training loop -------------------------------------------------------------------

/** "3m10s", "45s", "1h02m". */
export function formatDuration(seconds: number): string {
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, "0")}s`;
  return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
}

/** What a finished (or stopped) run reports. */
export interface TrainSummary {
  runDir: string;
  steps: number;
  seconds: number;
  finalLoss: number;
  valLoss: number | null;
  valAccuracy: number | null;
  /** Accuracy on test and test-novel (all question kinds), when test_examples > 0 and the run finished. */
  test?: Record<string, { accuracy: number; perKind: Record<string, number> }>;
}

/** A new run's folder name: the preset and the local date and time. */
function runName(preset: string): string {
  const d = new Date(), p = (n: number) => String(n).padStart(2, "0");
  return `${preset}-${d.getFullYear()}${p(d.getMonth() + 1)}${p(d.getDate())}-${p(d.getHours())}${p(d.getMinutes())}${
    p(d.getSeconds())
  }`;
}

/**
 * Train (or resume) a run. `trainOverrides` are applied to the defaults (a new run) or
 * to the run's saved train_config.json (with `resume`); `modelOverrides` to the preset
 * (new runs only). Prints through `log` (default console.log). Throws NonFiniteError
 * when the loss or gradient norm stops being finite; the last good checkpoint stays.
 */
export async function train(
  trainOverrides: Partial<TrainConfig> = {},
  modelOverrides: Partial<VLMConfig> = {},
  { log = console.log }: { log?: (line: string) => void } = {},
): Promise<TrainSummary> {
  // Settings: defaults + overrides, or the resumed run's settings + overrides.
  let config: TrainConfig = { ...DEFAULT_TRAIN_CONFIG, ...trainOverrides };
  let runDir: string;
  if (config.resume) {
    runDir = config.resume;
    if (Object.keys(modelOverrides).length) {
      throw new Error(`a resumed run keeps its model; drop ${Object.keys(modelOverrides).map((k) => `--${k}`)}`);
    }
    if (!await exists(`${runDir}/train_config.json`)) {
      throw new Error(`cannot resume ${runDir}: it has no train_config.json (is it a run folder?)`);
    }
    const saved = JSON.parse(await Deno.readTextFile(`${runDir}/train_config.json`)) as TrainConfig;
    // stop_at is a one-off: a resumed run goes to the end unless told again. A setting added
    // after the run was saved takes its default.
    config = { ...DEFAULT_TRAIN_CONFIG, ...saved, stop_at: 0, ...trainOverrides, resume: runDir };
  } else {
    runDir = `${config.runs_dir}/${config.run_name || runName(config.preset)}`;
    if (await exists(`${runDir}/latest`) || await exists(`${runDir}/train_config.json`)) {
      throw new Error(`${runDir} already holds a run: continue it with --resume=${runDir} or pick another --run_name`);
    }
  }
  if (config.push_to_hub && !hubToken()) {
    throw new Error(`--push_to_hub ${config.push_to_hub} needs a token with write access: set HF_TOKEN`);
  }
  // Open the dataset first, so a wrong --data fails before any model is built.
  const source = config.data === "shapes" ? undefined : await openDataset(config.data);
  // initBackend prints its own detailed line; a caller with its own `log` gets just the name.
  const backend = await initBackend((config.backend || undefined) as BackendName | undefined, {
    quiet: log !== console.log,
  });
  if (log !== console.log) log(`backend: ${backend}`);

  // Model, optimizer and where the loop is. A model too big for the wasm heap trains in low-memory mode.
  const runConfig = config.resume
    ? configFromJSON(JSON.parse(await Deno.readTextFile(`${runDir}/config.json`)))
    : modelConfig(config.preset, modelOverrides);
  const lowMemory = lowMemoryTraining(config.low_memory, backend, runConfig);
  let model: VisionLanguageModel, optimizer: AdamW;
  let state: TrainerState = { step: 0, examples_seen: 0, best_val_loss: null, elapsed_seconds: 0 };
  if (config.resume) {
    ({ model, optimizer, state } = await loadCheckpoint(`${runDir}/latest`, config.lr_mp, config.lr_backbones, {
      beta2: config.adam_beta2,
      momentsOnHost: adamWOnHost(backend),
    }));
    log(`resuming ${runDir} at step ${state.step} (${state.examples_seen} examples seen)`);
  } else {
    const cfg = runConfig;
    if (cfg.vlm_load_backbone_weights) {
      // The reference's start: pretrained SigLIP and SmolLM2 (downloaded once into the Hub cache), projector random.
      log(`backbones: ${cfg.vit_model_type} + ${cfg.lm_model_type} (pretrained, from the Hugging Face Hub cache)`);
      model = modelFromBackbones(cfg, await loadBackbones(cfg), { seed: config.seed });
    } else model = new VisionLanguageModel(cfg, { seed: config.seed });
    optimizer = new AdamW(model.params, paramGroups(model, config.lr_mp, config.lr_backbones), {
      beta2: config.adam_beta2,
      momentsOnHost: adamWOnHost(backend),
    });
  }
  if (lowMemory) useActivationCheckpointing(model);
  const cfg = model.cfg;
  // A tokenizer folder of this project (tokenizers/shapes), or a Hub repo such as HuggingFaceTB/SmolLM2-135M.
  const localTokenizer = resolveTokenizerPath(cfg.lm_tokenizer);
  const tokenizer = await hubTokenizer(await exists(localTokenizer) ? localTokenizer : cfg.lm_tokenizer);
  checkTokenizerFitsConfig(tokenizer, cfg);
  model.eosTokenId = tokenizer.eosTokenId;
  if (!config.resume && !cfg.vlm_load_backbone_weights && config.share_spaced_words) {
    log(`${shareSpacedWordEmbeddings(model, tokenizer)} words start with the embedding of their spaced spelling`);
  }

  const helpers: GradientHelper[] = [];
  try {
    const threads = trainingThreads(config.threads, backend, lowMemory);
    shareBlasThreads(threads);
    helpers.push(...await GradientHelper.startUpTo(threads - 1, cfg, optimizer.trainable, log));
    await Deno.mkdir(runDir, { recursive: true });
    await writeFileAtomic(`${runDir}/config.json`, JSON.stringify(cfg, null, 4) + "\n");
    await writeFileAtomic(`${runDir}/train_config.json`, JSON.stringify(config, null, 2) + "\n");
    // Steps logged after the checkpoint we resume from happened in a timeline that is gone.
    const metricsPath = `${runDir}/metrics.jsonl`;
    const metrics = (await readMetrics(metricsPath)).filter((r) => r.step <= state.step);
    await writeFileAtomic(metricsPath, metrics.map((r) => JSON.stringify(r) + "\n").join(""));

    const overridden = Object.entries(modelOverrides).map(([k, v]) => `${k}=${JSON.stringify(v)}`);
    log(`run: ${runDir}`);
    log(`train config: ${JSON.stringify(config)}`);
    log(
      `model: preset ${config.preset}${overridden.length ? ` with ${overridden.join(", ")}` : ""} | ` +
        `${model.parameterCount().toLocaleString("en-US")} parameters | image ${cfg.vit_img_size}px, ` +
        `${cfg.mp_image_token_length} image tokens | context ${cfg.lm_max_length} | vocabulary ${cfg.lm_vocab_size}`,
    );
    log(`optimizer: AdamW, ${
      optimizer.groups.map((g) => `${g.name} lr ${g.maxLr} (${g.params.length} tensors)`)
        .join(", ")
    }${config.lr_backbones > 0 ? "" : ", backbones frozen"}`);
    if (lowMemory) log("low memory: every block checkpointed (--low_memory=off to stop)");
    if (helpers.length) {
      log(
        `threads: ${helpers.length + 1}, each computing part of every step's gradient (parallel.ts; --threads=1: one)` +
          ` | matMul on each: ${wasmMatMulEngine()}`,
      );
    }

    if (source) log(`data: ${source.name}`);
    const summary = await trainLoop(model, optimizer, state, tokenizer, config, runDir, metrics, log, helpers, source);
    if (config.push_to_hub && summary.steps === config.max_training_steps) {
      const { url } = await pushToHub(`${runDir}/best`, config.push_to_hub, {
        log,
        trainingSummary: {
          init: cfg.vlm_load_backbone_weights
            ? `${cfg.vit_model_type} + ${cfg.lm_model_type}`
            : "random (from scratch)",
          data: source ? source.name : "the built-in shapes world (nanovlm.ts data.ts)",
          steps: summary.steps,
          batchSize: config.batch_size * config.gradient_accumulation_steps,
          learningRates: `projector ${config.lr_mp}, backbones ${config.lr_backbones} (warmup + cosine)`,
          finalLoss: summary.finalLoss,
          hardware: `nanovlm.ts on the ${backend} backend`,
          duration: formatDuration(summary.seconds),
          notes: summary.valLoss === null ? [] : [`Best val loss: ${state.best_val_loss?.toFixed(4)}`],
        },
      });
      log(`pushed ${runDir}/best to ${url}`);
    }
    return summary;
  } finally {
    helpers.forEach((helper) => helper.close());
    optimizer.dispose();
    model.dispose();
  }
}

/** The loop proper: steps, logs, evals, checkpoints; then the summary. */
async function trainLoop(
  model: VisionLanguageModel,
  optimizer: AdamW,
  state: TrainerState,
  tokenizer: ChatTokenizer,
  config: TrainConfig,
  runDir: string,
  metrics: MetricsRecord[],
  log: (line: string) => void,
  helpers: GradientHelper[],
  source?: DataSource,
): Promise<TrainSummary> {
  const cfg = model.cfg, maxSteps = config.max_training_steps;
  const samplesPerStep = config.batch_size * config.gradient_accumulation_steps;
  const lastStep = config.stop_at > 0 ? Math.min(config.stop_at, maxSteps) : maxSteps;
  // A real dataset (--data): its first val_samples conversations are the val set, the rest streams, shuffled.
  const stats = newDataStats(), streamOptions = { tokenizer, config: cfg, batchSize: config.batch_size, stats };
  const data = source
    ? trainingBatches(source, {
      ...streamOptions,
      holdout: config.val_samples,
      shuffle: config.shuffle_buffer,
      seed: config.seed,
      skip: state.examples_seen,
    })
    : shapesBatches({
      split: "train",
      seed: config.seed,
      batchSize: config.batch_size,
      tokenizer,
      config: cfg,
      captionWeight: config.caption_weight,
      choiceWeight: config.choice_weight,
      positionWeight: config.position_weight,
      lengthBuckets: config.sort_by_length ? config.gradient_accumulation_steps : 1,
      choiceHints: config.choice_hints,
      sortedChoices: config.sorted_choices,
      start: state.examples_seen,
    });
  // Fixed val subsets, the same at every eval and in every run (seed 0).
  const valBatches = source
    ? await heldOutBatches(source, config.val_samples, { ...streamOptions, stats: undefined })
    : [
      ...shapesBatches({
        split: "val",
        seed: 0,
        batchSize: config.batch_size,
        tokenizer,
        config: cfg,
        count: config.val_samples,
      }),
    ];
  // Val accuracy asks shapes-world questions: only for the shapes world.
  const valQuestions = source
    ? []
    : shapesQuestions("val", Math.ceil(config.val_questions / 4), cfg.vit_img_size).slice(0, config.val_questions);
  const metricsPath = `${runDir}/metrics.jsonl`;
  const record = async (r: MetricsRecord) => {
    metrics.push(r);
    await Deno.writeTextFile(metricsPath, JSON.stringify(r) + "\n", { append: true });
  };

  let lastLoss = NaN, valLoss: number | null = null, valAccuracy: number | null = null;
  let sessionSteps = 0, sessionMs = 0;
  // A step's micro-batches are made during the step before: a promise callback runs at trainStep's first await,
  // after this thread's own part, so rendering and collating (about 5 ms a step in the shapes world) hide behind the
  // helpers' part (or the GPU's work) instead of adding to every step. On one WASM thread nothing is gained.
  const nextMicroBatches = async () => {
    const micro: Batch[] = [];
    for (let i = 0; i < config.gradient_accumulation_steps; i++) micro.push((await data.next()).value as Batch);
    return micro;
  };
  let upcoming = nextMicroBatches();
  while (state.step < lastStep) {
    const micro = await upcoming;
    upcoming = state.step + 1 < lastStep ? Promise.resolve().then(nextMicroBatches) : Promise.resolve([]);
    upcoming.catch(() => {}); // a failure surfaces at the next step's await, not as an unhandled rejection
    const lrs = optimizer.groups.map((g) => lrSchedule(state.step, g.maxLr, maxSteps));
    const started = performance.now();
    let result: StepResult;
    try {
      result = await trainStep(model, micro, optimizer, {
        lrs,
        maxGradNorm: config.max_grad_norm,
        answerFloor: config.answer_floor,
        helpers,
      });
    } catch (e) {
      if (!(e instanceof NonFiniteError)) throw e;
      const kept = await exists(`${runDir}/latest`)
        ? `the last good checkpoint, ${runDir}/latest, is untouched`
        : "no checkpoint was written yet";
      throw new NonFiniteError(
        `step ${state.step + 1}: ${e.message} is not finite, so training stopped without applying this update; ` +
          `${kept}. Try a lower --lr_mp / --lr_backbones or --max_grad_norm.`,
      );
    }
    const ms = performance.now() - started;
    state.step++;
    // A dataset counts the conversations it used; the shapes stream counts places (batch_size per batch).
    state.examples_seen += source ? micro.reduce((n, b) => n + b.batchSize, 0) : samplesPerStep;
    state.elapsed_seconds += ms / 1000;
    lastLoss = result.loss;
    // The first step of a session pays for kernel compilation and warm-up: keep it out of the ETA.
    if (sessionSteps++ > 0) sessionMs += ms;
    const perStep = sessionSteps > 1 ? sessionMs / (sessionSteps - 1) : ms;
    const lrText = lrs.map((lr) => lr.toExponential(1)).join("/");
    log(
      `step ${state.step}/${maxSteps} | loss ${result.loss.toFixed(3)} | lr ${lrText} | ` +
        `grad ${result.gradNorm.toFixed(2)} | ${ms.toFixed(0)} ms | ${(samplesPerStep / (ms / 1000)).toFixed(1)} ` +
        `samples/s | ETA ${formatDuration(((lastStep - state.step) * perStep) / 1000)}`,
    );
    await record({ step: state.step, loss: result.loss, lr: lrs, grad_norm: result.gradNorm, ms: Math.round(ms) });

    const stopping = state.step === lastStep;
    if (state.step % config.eval_interval === 0 || stopping) {
      const evalStart = performance.now();
      valLoss = await meanLoss(model, valBatches);
      if (valQuestions.length) {
        valAccuracy = (await evaluate(model, tokenizer, valQuestions, { batchSize: 64 })).accuracy;
      }
      const improved = state.best_val_loss === null || valLoss < state.best_val_loss;
      if (improved) {
        state.best_val_loss = valLoss;
        await saveCheckpoint(`${runDir}/best`, model);
      }
      await saveCheckpoint(`${runDir}/latest`, model, { optimizer, state });
      await record({ step: state.step, val_loss: valLoss, val_accuracy: valAccuracy ?? undefined });
      await writeFileAtomic(`${runDir}/loss.svg`, lossCurveSvg(metrics, `${runDir}: loss`));
      log(
        `eval step ${state.step} | val loss ${valLoss.toFixed(3)}${improved ? " (best, saved)" : ""} | ` +
          (valAccuracy === null
            ? `data: ${stats.rows} rows, ${stats.skippedRows} skipped (${stats.corruptImages} bad images) | `
            : `val accuracy ${(100 * valAccuracy).toFixed(1)}% (${valQuestions.length} questions) | `) +
          `${((performance.now() - evalStart) / 1000).toFixed(1)} s`,
      );
    }
  }

  const summary: TrainSummary = {
    runDir,
    steps: state.step,
    seconds: state.elapsed_seconds,
    finalLoss: lastLoss,
    valLoss,
    valAccuracy,
  };
  if (state.step < maxSteps) {
    log(`stopped at step ${state.step} of ${maxSteps}; continue with: deno task train --resume=${runDir}`);
    return summary;
  }
  log(
    `done: ${state.step} steps in ${formatDuration(state.elapsed_seconds)} of training | final loss ` +
      `${lastLoss.toFixed(3)} | best val loss ${state.best_val_loss?.toFixed(3)} | checkpoints ${runDir}/best, latest`,
  );
  if (config.test_examples > 0 && !source) {
    summary.test = {};
    const best = await fromPretrained(`${runDir}/best`);
    best.eosTokenId = tokenizer.eosTokenId;
    try {
      for (const split of ["test", "test-novel"] as const) {
        const result = await evaluate(best, tokenizer, shapesQuestions(split, config.test_examples, cfg.vit_img_size), {
          batchSize: 64,
        });
        const perKind = Object.fromEntries(Object.entries(result.perKind).map(([k, v]) => [k, v.accuracy]));
        summary.test[split] = { accuracy: result.accuracy, perKind };
        log(
          `${split} (best checkpoint, ${result.total} questions of ${config.test_examples} scenes): ` +
            `accuracy ${(100 * result.accuracy).toFixed(1)}% | ` +
            Object.entries(perKind).map(([k, a]) => `${k} ${(100 * a).toFixed(1)}%`).join(" | "),
        );
      }
    } finally {
      best.dispose();
    }
  }
  log(`try it: deno task generate --checkpoint=${runDir}/best --prompt="Describe the image."`);
  return summary;
}

// ---- main ------------------------------------------------------------------------------------

if (import.meta.main) {
  try {
    const { train: trainOverrides, model: modelOverrides } = parseTrainArgs(Deno.args);
    await train(trainOverrides, modelOverrides);
  } catch (e) {
    console.error(`error: ${(e as Error).message}`);
    Deno.exit(1);
  }
}
