// tools/choice_probe.ts — when a model picks the wrong letter in a multiple-choice question, does it not know the
// answer, or can it not find the option that says it? The test split's multiple-choice questions are asked three ways,
// each scored as `deno task eval` scores them (a greedy answer, MMStar's letter check), per question (counting,
// colour, place):
//
//   as asked  the options in the test's random order, as `deno task eval` asks them;
//   sorted    the options in alphabetical order, as train.ts's --sorted_choices shows half of training's questions:
//             the answer alone gives the letter ("blue" is always A), so this measures whether the model knows it;
//   hinted    the test's order, with the question line ending in its answer ("What color is the circle? red"), as
//             --choice_hints shows half of them: only the look-up in the text is left, finding the line that says red.
//
//   deno run -A tools/choice_probe.ts [--checkpoint checkpoints/shapes-tiny] [--examples 300]
//
// docs/training-the-shapes-world.md ("The answer is known, its letter is not found") reads the three columns.

import { parseArgs } from "node:util";
import { choiceParts, makeShapesExample, type ShapesExample } from "../data.ts";
import { initBackend } from "../backend/runtime.ts";
import { runMain, snakeCaseFlags, wholeNumber } from "../lib/cli.ts";
import { COMMITTED_CHECKPOINT, loadForInference } from "../lib/inference.ts";
import { type EvalItem, type EvalResult, evaluate } from "../lib/scoring.ts";

const USAGE = "usage: deno run -A tools/choice_probe.ts [--checkpoint DIR] [--examples 300]";
export const CHOICE_VARIANTS = ["as asked", "sorted", "hinted"] as const;
export type ChoiceVariant = typeof CHOICE_VARIANTS[number];

/** Which question a multiple-choice question asks, from its question line. */
function questionKind(line: string): string {
  if (line.startsWith("How many")) return "count";
  if (line.startsWith("What color")) return "color";
  if (line.startsWith("Where")) return "position";
  throw new Error(`not a multiple-choice question of the shapes world: "${line}"`);
}

/**
 * Each scene's multiple-choice question asked three ways (`CHOICE_VARIANTS`): the same scenes, questions and answers
 * in every variant, in the same order, each taken apart by data.ts's `choiceParts` as training takes apart its hinted
 * and sorted questions. An item's answer is the option's text, so its letter follows the options.
 */
export function choiceVariants(scenes: readonly ShapesExample[]): Record<ChoiceVariant, EvalItem[]> {
  const variants: Record<ChoiceVariant, EvalItem[]> = { "as asked": [], sorted: [], hinted: [] };
  for (const scene of scenes) {
    const images = [{ rgb: scene.rgb, width: scene.size, height: scene.size }];
    for (const q of scene.questions.filter((q) => q.kind === "choice")) {
      for (const variant of CHOICE_VARIANTS) {
        const { question, options, answer } = choiceParts(q.question, q.answer, {
          hinted: variant === "hinted",
          sorted: variant === "sorted",
        });
        variants[variant].push({ images, question, answer, choices: options, kind: questionKind(question) });
      }
    }
  }
  return variants;
}

/** A table: one row per question (and all), one column per variant, each "accuracy (right/asked)". */
export function formatChoiceTable(results: Record<ChoiceVariant, EvalResult>): string {
  const cell = (k: { accuracy: number; correct: number; total: number }) =>
    `${(100 * k.accuracy).toFixed(1)}% (${k.correct}/${k.total})`.padEnd(20);
  const kinds = Object.keys(results["as asked"].perKind).sort();
  const rows = ["question".padEnd(10) + CHOICE_VARIANTS.map((variant) => variant.padEnd(20)).join("")];
  for (const kind of kinds) {
    rows.push(kind.padEnd(10) + CHOICE_VARIANTS.map((v) => cell(results[v].perKind[kind])).join(""));
  }
  rows.push("all".padEnd(10) + CHOICE_VARIANTS.map((v) => cell(results[v])).join(""));
  return rows.map((row) => row.trimEnd()).join("\n");
}

async function main(args: string[]) {
  const { values } = parseArgs({
    args: snakeCaseFlags(args),
    options: {
      checkpoint: { type: "string", default: COMMITTED_CHECKPOINT },
      examples: { type: "string", default: "300" },
    },
  });
  const examples = wholeNumber("examples", values.examples, 1, USAGE);
  await initBackend(undefined, { quiet: true });
  const { model, tokenizer } = await loadForInference(values.checkpoint);
  const shown = values.checkpoint === COMMITTED_CHECKPOINT ? "checkpoints/shapes-tiny" : values.checkpoint;
  try {
    const size = model.cfg.vit_img_size;
    const scenes = Array.from({ length: examples }, (_, index) => makeShapesExample("test", 0, index, size));
    const variants = choiceVariants(scenes);
    console.log(
      `${shown} | ${variants["as asked"].length} multiple-choice questions of ${examples} test scenes`,
    );
    const results = {} as Record<ChoiceVariant, EvalResult>;
    for (const variant of CHOICE_VARIANTS) results[variant] = await evaluate(model, tokenizer, variants[variant]);
    console.log(formatChoiceTable(results));
  } finally {
    model.dispose();
  }
}

if (import.meta.main) await runMain(main);
