// eval.ts — score a model on questions with known answers: `deno task eval`. Answering and scoring are
// lib/scoring.ts's (batched greedy generation; exact match, or MMStar's letter check for multiple choice).
// Questions come from the shapes world's splits or from a JSONL file, one per line:
//   {"image": "a.png", "question": "What color is the circle?", "answer": "red"}
//   {"image": "b.png", "question": "Which shape?", "choices": ["circle", "square"], "answer": "B"}
// Image paths are relative to the JSONL file; `"kind"` (optional) groups the report.
//
// The shapes world's scenes can also be drawn by another program (--renderer=independent, lib/independent_render.ts)
// on plain backgrounds, one report per background: a model that learned shapes rather than data.ts's pixels scores
// about the same on them. --renderer=plain draws them as the first world did: black, hard edges, exact colours.
//
// Reusable pieces: readQuestionsJsonl, independentQuestions.

import { parseArgs } from "node:util";
import { loadImage, makeShapesExample, resizeBilinearPIL, type Rgb, type Split, SPLITS } from "../data.ts";
import {
  type EvalItem,
  type EvalResult,
  evaluate,
  formatReport,
  questionsAbout,
  shapesQuestions,
  tally,
} from "./scoring.ts";
import { checkpointToAsk, loadForInference } from "./inference.ts";
import { type BackendName, initBackend } from "../backend/runtime.ts";
import { runMain, snakeCaseFlags } from "./cli.ts";
import { INDEPENDENT_BACKGROUNDS, renderIndependent } from "./independent_render.ts";

// ---- Questions ---------------------------------------------------------------------------

/** Draw the shapes world's scenes with lib/independent_render.ts instead of data.ts's renderer. */
export interface IndependentScenes {
  /** The plain background, e.g. `INDEPENDENT_BACKGROUNDS.white`. */
  background: Rgb;
  /** Draw at this many times the model's image size, then shrink as a user's picture is shrunk (default 4). */
  oversample?: number;
}

/**
 * The questions of scoring.ts's `shapesQuestions` (the same scenes), each scene drawn by lib/independent_render.ts at
 * `oversample`·`size` and shrunk to `size`. Asynchronous: the renderer loads WebAssembly.
 */
export async function independentQuestions(
  split: Split,
  examples: number,
  size: number,
  { background, oversample = 4 }: IndependentScenes,
): Promise<EvalItem[]> {
  const drawnSize = size * oversample;
  const items: EvalItem[] = [];
  for (let index = 0; index < examples; index++) {
    const example = makeShapesExample(split, 0, index, size);
    const rgb = await renderIndependent(example.objects, drawnSize, background);
    // A picture larger than the model's input goes through the reference's processor, Pillow's bilinear resize, as
    // evaluate does for a user's PNG. Resizing here rather than there keeps only S×S images in memory.
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
  const imagePaths: string[][] = [];
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
    imagePaths.push((images as string[]).map((p) => p.startsWith("/") ? p : `${dir}/${p}`));
    items.push({
      images: [],
      question: row.question,
      answer: row.answer,
      choices: row.choices as string[] | undefined,
      kind: typeof row.kind === "string" ? row.kind : undefined,
    });
  });
  // Every line is checked before any image is read; an unreadable image is an Error naming its file.
  for (const [i, paths] of imagePaths.entries()) items[i].images = await Promise.all(paths.map(loadImage));
  return items;
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
        return [shapesQuestions(split as Split, count("examples"), S, { plain: true }), `${scenes}, plain)`];
      }
      if (background === undefined) return [shapesQuestions(split as Split, count("examples"), S), `${scenes})`];
      const drawing = { background: INDEPENDENT_BACKGROUNDS[background] };
      return [
        await independentQuestions(split as Split, count("examples"), S, drawing),
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
