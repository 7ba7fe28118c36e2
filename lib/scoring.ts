// scoring.ts — answer questions, and score the answers to questions with known answers: what `deno task generate`,
// `deno task eval`, training's val accuracy and the browser page share.
//
// One question is answered with its text streamed (`answerQuestion`); scored answers come from batched greedy generation (prompts left-padded to the longest, as the reference's lmms-eval
// wrapper does), and are scored in one of two ways:
//   - exact match after normalising (lower case, trimmed, a trailing period ignored), for open questions such as
//     "What color is the circle?" → "red";
//   - MMStar's letter check (the reference's check_multiple_choice_with_regex) for multiple-choice questions: the
//     option letter must appear as a word, before . , ), or inside parentheses.
// Images arrive decoded: reading files is the caller's (lib/eval.ts), so a browser can use this file as it is.

import * as tf from "@tensorflow/tfjs";
import {
  type ChatTokenizer,
  choiceParts,
  choicePrompt,
  collatePrompts,
  encodePrompt,
  makeShapesExample,
  resizeBilinearPIL,
  type RgbImage,
  type ShapesExample,
  type Split,
  toCHWFloat,
} from "../data.ts";
import type { GenerateOptions, VisionLanguageModel } from "../nanovlm.ts";

/** A question with its known answer. */
export interface EvalItem {
  /** Decoded RGB images, any size (evaluate resizes them as the reference's image processor does). */
  images: RgbImage[];
  question: string;
  /** The expected answer: text, or for multiple choice the option's letter (or the option's text). */
  answer: string;
  /** Options, shown as "A. …" lines and scored by letter. */
  choices?: string[];
  /** Groups the report ("color", "count", ...); "all" if absent. */
  kind?: string;
}

/**
 * Every question of the first `examples` scenes of a shapes-world split (seed 0, so the same questions in every run),
 * images rendered at `size`; with `plain`, the same scenes drawn in the plain style (black, hard edges, exact colours:
 * the first world). lib/eval.ts draws them with another program too (`independentQuestions`).
 */
export function shapesQuestions(
  split: Split,
  examples: number,
  size: number,
  { plain = false }: { plain?: boolean } = {},
): EvalItem[] {
  const scenes = Array.from({ length: examples }, (_, index) => makeShapesExample(split, 0, index, size, { plain }));
  return scenes.flatMap((example) => questionsAbout(example, { rgb: example.rgb, width: size, height: size }));
}

/** The questions of one scene, asked about `image`. */
export function questionsAbout(example: ShapesExample, image: RgbImage): EvalItem[] {
  return example.questions.map((q) => {
    if (q.kind !== "choice") return { images: [image], question: q.question, answer: q.answer, kind: q.kind };
    // A multiple-choice question as its parts, scored by MMStar's letter check: "B" and "red (B)" both answer B.
    const { question, options } = choiceParts(q.question, q.answer);
    return { images: [image], question, choices: options, answer: q.answer, kind: q.kind };
  });
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

// ---- Answering one question ----------------------------------------------------------------

/** An answer with its timings. */
export interface Answer {
  text: string;
  /** Generated ids, up to and including the first EOS. */
  ids: number[];
  /** The prompt's token ids (image slots included). */
  promptIds: number[];
  /** From the call to the first token chosen (includes the image encoder and the prefill). */
  timeToFirstTokenMs: number;
  /** Tokens after the first, per second of decoding. */
  tokensPerSecond: number;
}

/**
 * Generate the answer to one question about `images` (each [3, S, S] float32, already
 * preprocessed), calling `onText` with each new piece of text as it is decoded. A
 * prompt that does not fit the context is an Error giving its length and the limit;
 * maxNewTokens defaults to what is left of the context (at most 64).
 */
export async function answerQuestion(
  model: VisionLanguageModel,
  tokenizer: ChatTokenizer,
  images: Float32Array[],
  question: string,
  options: GenerateOptions & { onText?: (piece: string) => void } = {},
): Promise<Answer> {
  const cfg = model.cfg, S = cfg.vit_img_size;
  const prompt = encodePrompt(tokenizer, question, images.length, cfg.mp_image_token_length, cfg.lm_max_length);
  const room = cfg.lm_max_length - prompt.inputIds.length;
  if (room < 1) {
    throw new Error(
      `the prompt is ${prompt.inputIds.length} tokens long, which leaves no room to answer within the limit of ` +
        `${cfg.lm_max_length} (lm_max_length)`,
    );
  }
  const maxNewTokens = options.maxNewTokens ?? Math.min(64, room);

  const ids: number[] = [];
  let text = "", firstTokenAt = 0, finished = false;
  const started = performance.now();
  const inputIds = tf.tensor2d(prompt.inputIds, [1, prompt.inputIds.length], "int32");
  const pixels = images.length ? tf.tensor4d(concat(images), [images.length, 3, S, S]) : undefined;
  try {
    const out = await model.generate(inputIds, pixels, undefined, {
      ...options,
      maxNewTokens,
      onToken: (next, step) => {
        if (step === 0) firstTokenAt = performance.now();
        if (finished) return;
        ids.push(next[0]);
        finished = next[0] === model.eosTokenId;
        // Decode everything so far and emit only the new suffix: a token's text can depend on its neighbours.
        const now = tokenizer.decode(ids, { skipSpecialTokens: true });
        if (now.length > text.length) options.onText?.(now.slice(text.length));
        text = now;
      },
    });
    out.dispose();
  } finally {
    tf.dispose([inputIds, pixels]);
  }
  const decodeSeconds = (performance.now() - firstTokenAt) / 1000;
  return {
    text: text.trim(),
    ids,
    promptIds: prompt.inputIds,
    timeToFirstTokenMs: firstTokenAt - started,
    tokensPerSecond: ids.length > 1 ? (ids.length - 1) / decodeSeconds : 0,
  };
}

function concat(arrays: Float32Array[]): Float32Array {
  const out = new Float32Array(arrays.reduce((n, a) => n + a.length, 0));
  arrays.reduce((offset, a) => (out.set(a, offset), offset + a.length), 0);
  return out;
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

/** An image as the model reads it: Pillow's bilinear resize to S×S, then [3, S, S] in [0, 1]. */
function pixelsOf({ rgb, width, height }: RgbImage, size: number): Float32Array {
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
    const withImages = chunk.map((i) => ({
      ...prompts[i],
      images: items[i].images.map((image) => pixelsOf(image, S)),
    }));
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
export function tally(predictions: Prediction[]): EvalResult {
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
