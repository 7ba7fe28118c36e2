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
// The shapes world's scenes can also be drawn by another program (--renderer=independent, lib/independent_render.ts)
// on plain backgrounds, one report per background: a model that learned shapes rather than data.ts's pixels scores
// about the same on them. --renderer=plain draws them as the first world did: black, hard edges, exact colours.
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
  type Rgb,
  type RgbImage,
  type ShapesExample,
  type Split,
  SPLITS,
  toCHWFloat,
} from "../data.ts";
import { checkpointToAsk, loadForInference } from "./inference.ts";
import type { VisionLanguageModel } from "../nanovlm.ts";
import { type BackendName, initBackend } from "../backend/runtime.ts";
import { runMain, snakeCaseFlags } from "./cli.ts";
import { INDEPENDENT_BACKGROUNDS, renderIndependent } from "./independent_render.ts";

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

/** Draw the shapes world's scenes in the plain style (black, hard edges, exact colours): the first world. */
export interface PlainScenes {
  renderer: "plain";
}

/** Draw the shapes world's scenes with lib/independent_render.ts instead of data.ts's renderer. */
export interface IndependentScenes {
  renderer: "independent";
  /** The plain background, e.g. `INDEPENDENT_BACKGROUNDS.white`. */
  background: Rgb;
  /** Draw at this many times the model's image size, then shrink as a user's picture is shrunk (default 4). */
  oversample?: number;
}

/**
 * Every question of the first `examples` scenes of a shapes-world split (seed 0, so
 * the same questions in every run), images rendered at `size`. With `drawing`, the same
 * scenes and questions, drawn by the independent renderer (asynchronous: it loads
 * WebAssembly).
 */
export function shapesQuestions(split: Split, examples: number, size: number, drawing?: PlainScenes): EvalItem[];
export function shapesQuestions(
  split: Split,
  examples: number,
  size: number,
  drawing: IndependentScenes,
): Promise<EvalItem[]>;
export function shapesQuestions(
  split: Split,
  examples: number,
  size: number,
  drawing?: IndependentScenes | PlainScenes,
): EvalItem[] | Promise<EvalItem[]> {
  const plain = drawing?.renderer === "plain";
  const scenes = Array.from({ length: examples }, (_, index) => makeShapesExample(split, 0, index, size, { plain }));
  if (drawing?.renderer === "independent") return independentQuestions(scenes, size, drawing);
  return scenes.flatMap((example) => questionsAbout(example, { rgb: example.rgb, width: size, height: size }));
}

/** The questions of one scene, asked about `image`. */
function questionsAbout(example: ShapesExample, image: RgbImage): EvalItem[] {
  return example.questions.map((q) => ({ images: [image], question: q.question, answer: q.answer, kind: q.kind }));
}

/** The scenes' questions, each scene drawn by lib/independent_render.ts at `oversample`·`size` and shrunk to `size`. */
async function independentQuestions(
  scenes: readonly ShapesExample[],
  size: number,
  { background, oversample = 4 }: IndependentScenes,
): Promise<EvalItem[]> {
  const drawnSize = size * oversample;
  const items: EvalItem[] = [];
  for (const example of scenes) {
    const rgb = await renderIndependent(example.objects, drawnSize, background);
    // A picture larger than the model's input goes through the reference's processor, Pillow's bilinear resize, as
    // pixelsOf does for a user's PNG. Resizing here rather than there keeps only S×S images in memory.
    const image = { rgb: resizeBilinearPIL(rgb, drawnSize, drawnSize, size), width: size, height: size };
    items.push(...questionsAbout(example, image));
  }
  return items;
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

  return tally(items.map((item, i) => ({
    question: promptOf(item),
    answer: item.answer,
    prediction: texts[i],
    correct: isCorrect(item, texts[i]),
    kind: item.kind ?? "all",
  })));
}

/** Accuracy overall and per kind of scored predictions. */
function tally(predictions: Prediction[]): EvalResult {
  const perKind: EvalResult["perKind"] = {};
  for (const p of predictions) {
    const k = perKind[p.kind] ??= { accuracy: 0, correct: 0, total: 0 };
    k.total++;
    if (p.correct) k.correct++;
  }
  for (const k of Object.values(perKind)) k.accuracy = k.correct / k.total;
  const correct = predictions.filter((p) => p.correct).length, total = predictions.length;
  return { accuracy: correct / Math.max(1, total), correct, total, perKind, predictions };
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

const RENDERERS = ["training", "plain", "independent"] as const;
const BACKGROUND_NAMES = Object.keys(INDEPENDENT_BACKGROUNDS);

const USAGE = `usage: deno task eval [--checkpoint DIR] [--split test|test-novel|val | --data FILE.jsonl]
  [--examples N] [--batch_size N] [--out FILE.jsonl] [--backend NAME]
  [--renderer training|plain|independent] [--background ${BACKGROUND_NAMES.join("|")}]
--renderer=plain draws the split's scenes as the first world did: black, hard edges, exact colours.
--renderer=independent draws them with another program (lib/independent_render.ts) on a plain background: one
report per --background (default: every one), then all of them together.`;

/** The command line; returns the result (for tests), with several backgrounds that of all of them together. */
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
      renderer: { type: "string", default: "training" },
      background: { type: "string" },
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
  // Flags are checked before the checkpoint loads, so a typo costs nothing.
  if (!(RENDERERS as readonly string[]).includes(values.renderer)) {
    throw new Error(`unknown renderer "${values.renderer}": use one of ${RENDERERS.join(", ")}`);
  }
  const independent = values.renderer === "independent";
  if (values.renderer !== "training" && split === undefined) {
    throw new Error(`--renderer=${values.renderer} draws a --split's scenes, not --data`);
  }
  if (values.background !== undefined && !independent) throw new Error("--background needs --renderer=independent");
  if (values.background !== undefined && !BACKGROUND_NAMES.includes(values.background)) {
    throw new Error(`unknown background "${values.background}": use one of ${BACKGROUND_NAMES.join(", ")}`);
  }
  // One report per background with the independent renderer; one report otherwise (no background).
  const backgrounds = independent ? (values.background ? [values.background] : BACKGROUND_NAMES) : [undefined];

  await initBackend(values.backend as BackendName | undefined, { quiet: true });
  const { dir, note: which } = await checkpointToAsk(values.checkpoint);
  if (which) console.error(which);
  const { model, tokenizer } = await loadForInference(dir);
  try {
    const S = model.cfg.vit_img_size, scenes = `${split} (${count("examples")} scenes`;
    // One report's questions and title.
    const questionsOn = async (background: string | undefined): Promise<[EvalItem[], string]> => {
      if (split === undefined) return [await readQuestionsJsonl(values.data!), values.data!];
      if (values.renderer === "plain") {
        return [shapesQuestions(split as Split, count("examples"), S, { renderer: "plain" }), `${scenes}, plain)`];
      }
      if (background === undefined) return [shapesQuestions(split as Split, count("examples"), S), `${scenes})`];
      const drawing = { renderer: "independent", background: INDEPENDENT_BACKGROUNDS[background] } as const;
      return [
        await shapesQuestions(split as Split, count("examples"), S, drawing),
        `${scenes}, independent renderer, ${background} background)`,
      ];
    };
    const reports: { background?: string; result: EvalResult }[] = [];
    for (const background of backgrounds) {
      const [items, source] = await questionsOn(background);
      console.error(`checkpoint ${dir} | ${items.length} questions from ${source}`);
      const started = performance.now();
      const result = await evaluate(model, tokenizer, items, {
        batchSize: count("batch_size"),
        onProgress: (done, total) => console.error(`  ${done}/${total}`),
      });
      console.log(formatReport(result, source));
      console.error(`${((performance.now() - started) / 1000).toFixed(1)} s`);
      reports.push({ background, result });
    }
    const result = reports.length === 1 ? reports[0].result : tally(reports.flatMap((r) => r.result.predictions));
    if (reports.length > 1) console.log(formatReport(result, `${scenes}, independent renderer, every background)`));
    if (values.out) {
      // With the independent renderer each line names the background its image was drawn on.
      const lines = reports.flatMap(({ background, result }) =>
        result.predictions.map((p) => JSON.stringify(background === undefined ? p : { background, ...p }) + "\n")
      );
      await Deno.writeTextFile(values.out, lines.join(""));
      console.error(`predictions written to ${values.out}`);
    }
    return result;
  } finally {
    model.dispose();
  }
}

if (import.meta.main) await runMain(main);
