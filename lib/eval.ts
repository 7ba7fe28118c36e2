// eval.ts — score a model on questions with known answers: `deno task eval`.
//
// What this is: batched greedy generation (prompts left-padded to the longest, as the
// reference's lmms-eval wrapper does) and two ways to score an answer:
//   - exact match after normalising (lower case, trimmed, a trailing period ignored), for
//     open questions such as "What color is the circle?" → "red";
//   - MMStar's letter check (the reference's check_multiple_choice_with_regex) for
//     multiple-choice questions: the option letter must appear as a word, before . , ),
//     or inside parentheses.
// Questions come from the shapes world's splits or from a JSONL file, one per line:
//   {"image": "a.png", "question": "What color is the circle?", "answer": "red"}
//   {"image": "b.png", "question": "Which shape?", "choices": ["circle", "square"], "answer": "B"}
// Image paths are relative to the JSONL file; `"kind"` (optional) groups the report.
//
// Reusable pieces (train.ts and lib/train_*.ts evaluate with them): shapesQuestions, readQuestionsJsonl,
// normalizeAnswer, checkMultipleChoice, isCorrect, promptOf, evaluate, formatReport.

import * as tf from "@tensorflow/tfjs";
import { parseArgs } from "node:util";
import {
  type ChatTokenizer,
  choicePrompt,
  collatePrompts,
  encodePrompt,
  loadImage,
  makeShapesExample,
  resizeBilinearPIL,
  type RgbImage,
  type Split,
  SPLITS,
  toCHWFloat,
} from "../data.ts";
import { findLatestCheckpoint, loadForInference } from "./inference.ts";
import type { VisionLanguageModel } from "../nanovlm.ts";
import { type BackendName, initBackend } from "../backend/runtime.ts";
import { runMain, snakeCaseFlags } from "./cli.ts";

// ---- Questions ---------------------------------------------------------------------------

/** A question with its known answer. */
export interface EvalItem {
  /** Image files, or RGB images (the shapes world renders them directly). */
  images: (string | RgbImage)[];
  question: string;
  /** The expected answer: text, or for multiple choice the option's letter (or the option's text). */
  answer: string;
  /** Options, shown as "A. …" lines and scored by letter. */
  choices?: string[];
  /** Groups the report ("color", "count", ...); "all" if absent. */
  kind?: string;
}

/**
 * Every question of the first `examples` scenes of a shapes-world split (seed 0, so
 * the same questions in every run), images rendered at `size`.
 */
export function shapesQuestions(split: Split, examples: number, size: number): EvalItem[] {
  return Array.from({ length: examples }, (_, index) => {
    const example = makeShapesExample(split, 0, index, size);
    const image: RgbImage = { rgb: example.rgb, width: size, height: size };
    return example.questions.map((q) => ({ images: [image], question: q.question, answer: q.answer, kind: q.kind }));
  }).flat();
}

/** Questions from a JSONL file (see the top of this file); a bad line is an Error naming the file and line. */
export async function readQuestionsJsonl(path: string): Promise<EvalItem[]> {
  const dir = path.includes("/") ? path.slice(0, path.lastIndexOf("/")) : ".";
  const text = await Deno.readTextFile(path).catch((e) => {
    throw new Error(`cannot read ${path}: ${e instanceof Deno.errors.NotFound ? "no such file" : e.message}`);
  });
  const items: EvalItem[] = [];
  text.split("\n").forEach((line, i) => {
    if (!line.trim()) return;
    const where = `${path}:${i + 1}`;
    let row: Record<string, unknown>;
    try {
      row = JSON.parse(line);
    } catch (e) {
      throw new Error(`${where}: not JSON (${(e as Error).message})`);
    }
    const images = row.images ?? (row.image === undefined ? [] : [row.image]);
    const strings = (x: unknown) => Array.isArray(x) && x.every((s) => typeof s === "string");
    if (typeof row.question !== "string" || typeof row.answer !== "string" || !strings(images)) {
      throw new Error(`${where}: needs "image" (a path), "question" and "answer" strings`);
    }
    if (row.choices !== undefined && !strings(row.choices)) throw new Error(`${where}: "choices" must be strings`);
    items.push({
      images: (images as string[]).map((p) => p.startsWith("/") ? p : `${dir}/${p}`),
      question: row.question,
      answer: row.answer,
      choices: row.choices as string[] | undefined,
      kind: typeof row.kind === "string" ? row.kind : undefined,
    });
  });
  return items;
}

// ---- Scoring -------------------------------------------------------------------------------

const LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ";

/** Lower case, trimmed, one trailing period dropped: "A red circle." and "a red circle" match. */
export function normalizeAnswer(text: string): string {
  return text.trim().toLowerCase().replace(/\.$/, "").trim();
}

/**
 * The reference's check_multiple_choice_with_regex: `output` answers `letter` if it
 * contains the letter as a word, the letter followed by . , or ), or the letter inside
 * parentheses. Case-sensitive on the output, like the reference (only the letter is
 * upper-cased); lenient on purpose ("B. square" and "(B)" count).
 */
export function checkMultipleChoice(output: string, letter: string): boolean {
  const a = letter.toUpperCase().replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
  return [new RegExp(`\\b${a}\\b`), new RegExp(`\\b${a}[.,)]`), new RegExp(`\\(.*${a}.*\\)`)].some((re) =>
    re.test(output)
  );
}

/** The option letter a multiple-choice item expects (its answer is a letter, or one of the choices' text). */
function expectedLetter(item: EvalItem): string {
  const choices = item.choices!;
  const byText = choices.findIndex((c) => normalizeAnswer(c) === normalizeAnswer(item.answer));
  if (byText !== -1) return LETTERS[byText];
  const letter = item.answer.trim().replace(/[.)]$/, "").toUpperCase();
  if (letter.length === 1 && LETTERS.indexOf(letter) >= 0 && LETTERS.indexOf(letter) < choices.length) return letter;
  throw new Error(
    `the answer "${item.answer}" is neither an option letter nor one of the choices of "${item.question}"`,
  );
}

/** Is `prediction` right? Letter check for multiple choice, normalised exact match otherwise. */
export function isCorrect(item: EvalItem, prediction: string): boolean {
  if (item.choices) return checkMultipleChoice(prediction, expectedLetter(item));
  return normalizeAnswer(prediction) === normalizeAnswer(item.answer);
}

/** The user's text: the question, then for multiple choice MMStar's "A. …" lines and instruction. */
export function promptOf(item: EvalItem): string {
  if (!item.choices) return item.question;
  return choicePrompt(item.question, item.choices);
}

// ---- Batched generation ------------------------------------------------------------------

/** One scored answer. */
export interface Prediction {
  question: string;
  answer: string;
  prediction: string;
  correct: boolean;
  kind: string;
}

/** Accuracy overall and per kind, and every prediction in the items' order. */
export interface EvalResult {
  accuracy: number;
  correct: number;
  total: number;
  perKind: Record<string, { accuracy: number; correct: number; total: number }>;
  predictions: Prediction[];
}

async function pixelsOf(image: string | RgbImage, size: number): Promise<Float32Array> {
  const { rgb, width, height } = typeof image === "string" ? await loadImage(image) : image;
  const resized = width === size && height === size ? rgb : resizeBilinearPIL(rgb, width, height, size);
  return toCHWFloat(resized, size);
}

/**
 * Answer every item with greedy decoding, `batchSize` prompts at a time (sorted by
 * length so a batch pads little), and score the answers. A prompt longer than the
 * context is an Error with its length and the limit; an unreadable image names the file.
 */
export async function evaluate(
  model: VisionLanguageModel,
  tokenizer: ChatTokenizer,
  items: readonly EvalItem[],
  { batchSize = 32, maxNewTokens = 64, onProgress }: {
    batchSize?: number;
    maxNewTokens?: number;
    onProgress?: (done: number, total: number) => void;
  } = {},
): Promise<EvalResult> {
  const cfg = model.cfg, S = cfg.vit_img_size;
  const prompts = items.map((item) =>
    encodePrompt(tokenizer, promptOf(item), item.images.length, cfg.mp_image_token_length, cfg.lm_max_length)
  );
  const order = items.map((_, i) => i).sort((a, b) => prompts[a].inputIds.length - prompts[b].inputIds.length);
  const texts = new Array<string>(items.length);
  for (let start = 0; start < order.length; start += batchSize) {
    const chunk = order.slice(start, start + batchSize);
    const withImages = await Promise.all(chunk.map(async (i) => ({
      ...prompts[i],
      images: await Promise.all(items[i].images.map((image) => pixelsOf(image, S))),
    })));
    const batch = collatePrompts(withImages, { padTokenId: tokenizer.padTokenId, maxLength: cfg.lm_max_length });
    const [B, T] = [batch.batchSize, batch.length];
    const newTokens = Math.max(1, Math.min(maxNewTokens, cfg.lm_max_length - T)); // 0 left: generate says why
    const inputIds = tf.tensor2d(batch.inputIds, [B, T], "int32");
    const mask = tf.tensor2d(batch.attentionMask, [B, T], "int32");
    const images = batch.imageCount ? tf.tensor4d(batch.images, [batch.imageCount, 3, S, S]) : undefined;
    const out = await model.generate(inputIds, images, mask, { maxNewTokens: newTokens, greedy: true });
    const ids = await out.data();
    tf.dispose([inputIds, mask, images, out]);
    chunk.forEach((item, b) => {
      const row = Array.from(ids.subarray(b * newTokens, (b + 1) * newTokens));
      const end = row.indexOf(model.eosTokenId);
      texts[item] = tokenizer.decode(end === -1 ? row : row.slice(0, end), { skipSpecialTokens: true }).trim();
    });
    onProgress?.(Math.min(start + batchSize, items.length), items.length);
  }

  const predictions = items.map((item, i) => ({
    question: promptOf(item),
    answer: item.answer,
    prediction: texts[i],
    correct: isCorrect(item, texts[i]),
    kind: item.kind ?? "all",
  }));
  const perKind: EvalResult["perKind"] = {};
  for (const p of predictions) {
    const k = perKind[p.kind] ??= { accuracy: 0, correct: 0, total: 0 };
    k.total++;
    if (p.correct) k.correct++;
  }
  for (const k of Object.values(perKind)) k.accuracy = k.correct / k.total;
  const correct = predictions.filter((p) => p.correct).length;
  return { accuracy: correct / Math.max(1, items.length), correct, total: items.length, perKind, predictions };
}

/** A small table: accuracy overall, then per kind. */
export function formatReport(result: EvalResult, title: string): string {
  const pct = (a: number) => `${(100 * a).toFixed(1)}%`.padStart(6);
  const lines = [`${title}: accuracy ${pct(result.accuracy)} (${result.correct}/${result.total})`];
  for (const [kind, k] of Object.entries(result.perKind).sort(([a], [b]) => a.localeCompare(b))) {
    lines.push(`  ${kind.padEnd(10)} ${pct(k.accuracy)} (${k.correct}/${k.total})`);
  }
  return lines.join("\n");
}

// ---- main ------------------------------------------------------------------------------------

const USAGE = `usage: deno task eval [--checkpoint DIR] [--split test|test-novel|val | --data FILE.jsonl]
  [--examples N] [--batch_size N] [--out FILE.jsonl] [--backend NAME]`;

/** The command line; returns the result (for tests). */
export async function main(args: string[]): Promise<EvalResult> {
  const { values } = parseArgs({
    args: snakeCaseFlags(args),
    options: {
      checkpoint: { type: "string" },
      split: { type: "string" },
      data: { type: "string" },
      examples: { type: "string", default: "500" },
      batch_size: { type: "string", default: "64" },
      out: { type: "string" },
      backend: { type: "string" },
      help: { type: "boolean" },
    },
  });
  if (values.help) {
    console.log(USAGE);
    return { accuracy: 0, correct: 0, total: 0, perKind: {}, predictions: [] };
  }
  const count = (key: "examples" | "batch_size") => {
    const n = Number(values[key]);
    if (!Number.isInteger(n) || n < 1) throw new Error(`--${key}=${values[key]}: expected a positive integer`);
    return n;
  };
  if (values.split && values.data) throw new Error("give --split or --data, not both");
  const split = values.split ?? (values.data ? undefined : "test");
  if (split !== undefined && !(SPLITS as readonly string[]).includes(split)) {
    throw new Error(`unknown split "${split}": use one of ${SPLITS.join(", ")}`);
  }

  await initBackend(values.backend as BackendName | undefined, { quiet: true });
  const dir = values.checkpoint ?? await findLatestCheckpoint();
  const { model, tokenizer } = await loadForInference(dir);
  try {
    const items = split
      ? shapesQuestions(split as Split, count("examples"), model.cfg.vit_img_size)
      : await readQuestionsJsonl(values.data!);
    const source = split ? `${split} (${count("examples")} scenes)` : values.data!;
    console.error(`checkpoint ${dir} | ${items.length} questions from ${source}`);
    const started = performance.now();
    const result = await evaluate(model, tokenizer, items, {
      batchSize: count("batch_size"),
      onProgress: (done, total) => console.error(`  ${done}/${total}`),
    });
    console.log(formatReport(result, source));
    console.error(`${((performance.now() - started) / 1000).toFixed(1)} s`);
    if (values.out) {
      await Deno.writeTextFile(values.out, result.predictions.map((p) => JSON.stringify(p) + "\n").join(""));
      console.error(`predictions written to ${values.out}`);
    }
    return result;
  } finally {
    model.dispose();
  }
}

if (import.meta.main) await runMain(main);
