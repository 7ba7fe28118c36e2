// lib/train_config.ts — the training settings: one typed config with commented defaults, overridable from the
// command line (`--key=value`, type-checked against the default), and the model config a run trains (a preset with
// overrides). train.ts prints both at the start of a run and saves them beside its checkpoints.

import { PRESETS, validateConfig, type VLMConfig } from "../config.ts";
import { PROMPT_LOSSES, type PromptLoss } from "../data.ts";
import { snakeCaseFlags } from "./cli.ts";
import { fileExists } from "./files.ts";

/**
 * Everything about a run that is not the model's shape (the model is a `VLMConfig`).
 * Names follow the reference's TrainConfig where it has the field.
 */
export interface TrainConfig {
  preset: string; // the model preset (PRESETS) that model-config overrides apply to
  lr_mp: number; // peak learning rate of the modality projector (MP.*)
  lr_backbones: number; // peak learning rate of the ViT and the decoder; 0 freezes them
  lr_vision_backbone: number; // the ViT's own peak learning rate after vision pretraining (0 freezes it); -1: lr_backbones
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
  choice_verdicts: boolean; // shapes world: the answer's option line learns, at its word, to predict its letter
  choice_names_option: boolean; // shapes world: a multiple-choice answer names its option, then the letter: "red (B)"
  untrained_option_breaks: boolean; // shapes world: the newlines before the options' letters are not trained
  choice_copy_drills: number; // shapes world: share of multiple-choice answers that name another option, then its letter
  prompt_loss: PromptLoss; // shapes world: prompt tokens trained besides the answer: "none" (the reference), "options", "all"
  plain_scenes: boolean; // shapes world: train on black, hard-edged, exact-colour scenes only (the world before it varied)
  vision_pretrain_steps: number; // shapes world, ViT from scratch: steps naming each quadrant's contents first (0 = none)
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
  lr_vision_backbone: 1e-4,
  adam_beta2: 0.95,
  batch_size: 32,
  gradient_accumulation_steps: 2,
  max_training_steps: 2000,
  max_grad_norm: 1.0,
  eval_interval: 200,
  val_samples: 128,
  val_questions: 128,
  test_examples: 300,
  caption_weight: 2,
  choice_weight: 2,
  position_weight: 2,
  sort_by_length: true,
  share_spaced_words: true,
  choice_hints: 0.5,
  sorted_choices: 0.5,
  choice_verdicts: true,
  choice_names_option: true,
  untrained_option_breaks: false,
  choice_copy_drills: 0.25,
  prompt_loss: "all",
  plain_scenes: false,
  vision_pretrain_steps: 3000,
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

/** Why a run's vision pretraining stage (lib/vision_pretrain.ts) does not run, or undefined when it does. */
export function visionPretrainSkipped(config: TrainConfig, cfg: VLMConfig): string | undefined {
  if (config.vision_pretrain_steps === 0) return "--vision_pretrain_steps=0";
  if (config.data !== "shapes") return `it names the shapes world's quadrants, and this run trains on ${config.data}`;
  if (cfg.vlm_load_backbone_weights) return `the vision encoder is ${cfg.vit_model_type}, pretrained already`;
  if (cfg.mp_image_token_length !== 4) {
    return `it needs one image token per quadrant (4); this model makes ${cfg.mp_image_token_length}`;
  }
}

/**
 * The vision encoder's peak learning rate in the VLM stage. A pretrained one (the run's own first stage, or SigLIP's
 * weights) trains at lr_vision_backbone, gently, to keep what it learned; one that starts from nothing, or
 * lr_vision_backbone = -1, at lr_backbones like the decoder.
 */
export function visionLearningRate(config: TrainConfig, cfg: VLMConfig): number {
  const pretrained = cfg.vlm_load_backbone_weights || visionPretrainSkipped(config, cfg) === undefined;
  return pretrained && config.lr_vision_backbone !== -1 ? config.lr_vision_backbone : config.lr_backbones;
}

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
  "vision_pretrain_steps",
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
  let values: Record<string, string>;
  try {
    values = keyValueArgs(snakeCaseFlags(args), [...trainKeys, ...modelKeys]);
  } catch (e) {
    throw new Error(
      `${(e as Error).message}\n\nTraining options: ${trainKeys.map((k) => `--${k}`).join(" ")}\n` +
        `Model options (override the preset): ${modelKeys.map((k) => `--${k}`).join(" ")}`,
    );
  }
  const train: Record<string, ConfigValue> = {}, model: Record<string, ConfigValue> = {};
  for (const [key, raw] of Object.entries(values)) {
    if (key in DEFAULT_TRAIN_CONFIG) {
      const example = DEFAULT_TRAIN_CONFIG[key as keyof TrainConfig];
      train[key] = parseValue(key, raw, example, INTEGER_TRAIN_KEYS.has(key));
    } else {
      model[key] = parseValue(key, raw, PRESETS.tiny[key as keyof VLMConfig], false);
    }
  }
  const lrVision = train.lr_vision_backbone as number | undefined;
  if (lrVision !== undefined && lrVision < 0 && lrVision !== -1) {
    throw new Error(`--lr_vision_backbone=${lrVision}: expected a learning rate ≥ 0, or -1 to use --lr_backbones`);
  }
  const promptLoss = train.prompt_loss as PromptLoss | undefined;
  if (promptLoss !== undefined && !PROMPT_LOSSES.includes(promptLoss)) {
    throw new Error(`--prompt_loss=${promptLoss}: expected one of ${PROMPT_LOSSES.join(", ")}`);
  }
  return { train: train as Partial<TrainConfig>, model: model as Partial<VLMConfig> };
}

// Settings that only the built-in shapes world reads (lib/train_data.ts's shapesTrainingData).
const SHAPES_WORLD_SETTINGS = [
  "caption_weight",
  "choice_weight",
  "position_weight",
  "sort_by_length",
  "choice_hints",
  "sorted_choices",
  "choice_verdicts",
  "choice_names_option",
  "untrained_option_breaks",
  "choice_copy_drills",
  "prompt_loss",
  "plain_scenes",
  "vision_pretrain_steps",
] as const;

/**
 * A run on a dataset (`--data`) that changes a setting only the shapes world reads is an Error naming each such
 * setting, rather than a run that silently ignores it.
 */
export function checkSettingsForData(config: TrainConfig): void {
  if (config.data === "shapes") return;
  const changed = SHAPES_WORLD_SETTINGS.filter((key) => config[key] !== DEFAULT_TRAIN_CONFIG[key]);
  if (changed.length === 0) return;
  const given = changed.map((key) => `--${key}=${config[key]}`).join(" ");
  throw new Error(`${given}: only the built-in shapes world reads this; drop it to train on --data=${config.data}`);
}

/**
 * Multiple-choice settings that cannot work together are an Error before anything is made: a copy drill names another
 * option than the answer, so it needs answers that name one ("red (B)"), and it is a share of the samples.
 */
export function checkChoiceSettings(config: TrainConfig): void {
  const drills = config.choice_copy_drills;
  if (!(drills >= 0 && drills <= 1)) throw new Error(`--choice_copy_drills=${drills}: expected a share in [0, 1]`);
  if (drills > 0 && !config.choice_names_option) {
    throw new Error(
      `--choice_copy_drills=${drills} drills answers that name their option, and --choice_names_option=false ` +
        "answers with a bare letter: add --choice_copy_drills=0",
    );
  }
}

/**
 * `--key=value` and `--key value` pairs, each key one of `keys`; anything else is an Error saying what it is. (Written
 * out rather than node:util's parseArgs: the browser page imports this file for DEFAULT_TRAIN_CONFIG.)
 */
function keyValueArgs(args: string[], keys: readonly string[]): Record<string, string> {
  const values: Record<string, string> = {};
  for (let i = 0; i < args.length; i++) {
    const match = /^--([^=]+)(?:=(.*))?$/s.exec(args[i]);
    if (!match) throw new Error(`unexpected argument "${args[i]}": give settings as --key=value`);
    const [, key, inline] = match;
    if (!keys.includes(key)) throw new Error(`unknown option --${key}`);
    const value = inline ?? args[++i];
    if (value === undefined) throw new Error(`--${key} needs a value`);
    values[key] = value;
  }
  return values;
}

/** The preset with the overrides applied, validated (an unknown preset lists the known ones). */
export function modelConfig(preset: string, overrides: Partial<VLMConfig> = {}): VLMConfig {
  const base = PRESETS[preset];
  if (!base) throw new Error(`unknown preset "${preset}": use one of ${Object.keys(PRESETS).join(", ")}`);
  const cfg = { ...base, ...overrides };
  validateConfig(cfg);
  return cfg;
}

/**
 * The settings of the run in `runDir`, to resume it: its saved train_config.json with `overrides` applied. stop_at is a
 * one-off: a resumed run goes to the end unless told again. A setting added after the run was saved takes its default.
 */
export async function resumedTrainConfig(runDir: string, overrides: Partial<TrainConfig>): Promise<TrainConfig> {
  if (!await fileExists(`${runDir}/train_config.json`)) {
    throw new Error(`cannot resume ${runDir}: it has no train_config.json (is it a run folder?)`);
  }
  const saved = JSON.parse(await Deno.readTextFile(`${runDir}/train_config.json`)) as Partial<TrainConfig>;
  // A run saved before these settings existed resumes as it trained: its ViT at lr_backbones (-1), its
  // multiple-choice answers as bare letters, and none of them a copy drill.
  const before = {
    lr_vision_backbone: saved.lr_vision_backbone ?? -1,
    choice_names_option: saved.choice_names_option ?? false,
    choice_copy_drills: saved.choice_copy_drills ?? 0,
  };
  return { ...DEFAULT_TRAIN_CONFIG, ...saved, ...before, stop_at: 0, ...overrides, resume: runDir };
}
