// lib/train_state.ts — what a run leaves on disk and reads back: crash-safe checkpoints for --resume, metrics.jsonl
// and its loss curve; plus the val loss and the durations train.ts logs.

import * as tf from "@tensorflow/tfjs";
import type { Batch, ChatTokenizer } from "../data.ts";
import type { VisionLanguageModel } from "../nanovlm.ts";
import { fromPretrained, savePretrained } from "./checkpoint.ts";
import { evaluate, shapesQuestions } from "./scoring.ts";
import { fileExists, isDirectory, writeFileAtomic } from "./files.ts";
import { AdamW, type AdamWOptions, paramGroups } from "./optimizer.ts";
import { encodeSafetensors, readSafetensors } from "./safetensors.ts";
import { batchTensors, trimPadding } from "./train_step.ts";

// ---- Checkpoints --------------------------------------------------------------------------------
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

/** Undo an interrupted swap: if `dir` is missing but `dir.previous` is there, put it back. Drop a stale `.partial`. */
export async function recoverCheckpoint(dir: string): Promise<void> {
  if (!await isDirectory(dir) && await isDirectory(`${dir}.previous`)) await Deno.rename(`${dir}.previous`, dir);
  if (await isDirectory(`${dir}.partial`)) await Deno.remove(`${dir}.partial`, { recursive: true });
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
  if (await isDirectory(dir)) await Deno.rename(dir, previous);
  await Deno.rename(partial, dir);
  if (await isDirectory(previous)) await Deno.remove(previous, { recursive: true });
}

/**
 * Load a resumable checkpoint: the model, the optimizer (moments restored, groups from
 * the learning rates given) and the trainer state. A missing file is an Error naming it.
 */
export async function loadCheckpoint(
  dir: string,
  lrMp: number,
  lrBackbones: number,
  lrVision = lrBackbones,
  optimizerOptions: AdamWOptions = {},
): Promise<{ model: VisionLanguageModel; optimizer: AdamW; state: TrainerState }> {
  await recoverCheckpoint(dir);
  for (const file of CHECKPOINT_FILES) {
    if (!await fileExists(`${dir}/${file}`)) throw new Error(`cannot resume from ${dir}: ${file} is missing`);
  }
  const model = await fromPretrained(dir);
  const optimizer = new AdamW(model.params, paramGroups(model, lrMp, lrBackbones, lrVision), optimizerOptions);
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

// ---- Metrics and the loss curve -----------------------------------------------------------------

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

/** The records of a metrics.jsonl file, oldest first; none when there is no file yet. */
export async function readMetrics(path: string): Promise<MetricsRecord[]> {
  if (!await fileExists(path)) return [];
  const text = await Deno.readTextFile(path);
  return text.split("\n").filter((line) => line.trim()).map((line) => JSON.parse(line));
}

/**
 * The records of a run's metrics.jsonl up to `step`, the file rewritten to hold only them: a run resumed from the
 * checkpoint of `step` drops what it logged after it.
 */
export async function metricsUpTo(path: string, step: number): Promise<MetricsRecord[]> {
  const records = (await readMetrics(path)).filter((r) => r.step <= step);
  await writeFileAtomic(path, records.map((r) => JSON.stringify(r) + "\n").join(""));
  return records;
}

/** Add `record` to `records` and as a line to the metrics.jsonl at `path`. */
export async function appendMetrics(path: string, records: MetricsRecord[], record: MetricsRecord): Promise<void> {
  records.push(record);
  await Deno.writeTextFile(path, JSON.stringify(record) + "\n", { append: true });
}

// ---- Evaluation ---------------------------------------------------------------------------------

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

/** Accuracy on one split: overall and per question kind. */
export interface SplitAccuracy {
  accuracy: number;
  perKind: Record<string, number>;
}

/**
 * Accuracy of a run's best checkpoint on every question of the first `examples` scenes of the test and test-novel
 * splits, one line logged per split: how a shapes-world run that finished is scored.
 */
export async function testAccuracy(
  runDir: string,
  tokenizer: ChatTokenizer,
  examples: number,
  log: (line: string) => void,
): Promise<Record<string, SplitAccuracy>> {
  const test: Record<string, SplitAccuracy> = {};
  const best = await fromPretrained(`${runDir}/best`);
  best.eosTokenId = tokenizer.eosTokenId;
  try {
    for (const split of ["test", "test-novel"] as const) {
      const result = await evaluate(best, tokenizer, shapesQuestions(split, examples, best.cfg.vit_img_size), {
        batchSize: 64,
      });
      const perKind = Object.fromEntries(Object.entries(result.perKind).map(([k, v]) => [k, v.accuracy]));
      test[split] = { accuracy: result.accuracy, perKind };
      log(
        `${split} (best checkpoint, ${result.total} questions of ${examples} scenes): ` +
          `accuracy ${(100 * result.accuracy).toFixed(1)}% | ` +
          Object.entries(perKind).map(([k, a]) => `${k} ${(100 * a).toFixed(1)}%`).join(" | "),
      );
    }
  } finally {
    best.dispose();
  }
  return test;
}

// ---- Durations ----------------------------------------------------------------------------------

/** "3m10s", "45s", "1h02m". */
export function formatDuration(seconds: number): string {
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, "0")}s`;
  return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
}
