// tools/choice_probe.ts: the three ways it asks the test's multiple-choice questions, and its table for the committed
// checkpoint, whose "as asked" column must be what `deno task eval` scores for the same questions.
//
// Run: deno test -A tests/choice_probe_test.ts

import { makeShapesExample } from "../data.ts";
import { initBackend } from "../backend/runtime.ts";
import { COMMITTED_CHECKPOINT, loadForInference } from "../lib/inference.ts";
import { evaluate, promptOf, shapesQuestions } from "../lib/scoring.ts";
import { CHOICE_VARIANTS, choiceVariants } from "../tools/choice_probe.ts";
import { assert, assertEquals } from "./assert.ts";

const ROOT = new URL("..", import.meta.url).pathname;

Deno.test("choiceVariants: the same questions and answers, asked as the test asks them, sorted, or hinted", () => {
  const scenes = Array.from({ length: 60 }, (_, index) => makeShapesExample("test", 0, index, 64));
  const asked = scenes.flatMap((scene) => scene.questions.filter((q) => q.kind === "choice"));
  const variants = choiceVariants(scenes);
  for (const variant of CHOICE_VARIANTS) assertEquals(variants[variant].length, asked.length);
  assertEquals(new Set(variants["as asked"].map((item) => item.kind)), new Set(["color", "count", "position"]));
  variants["as asked"].forEach((item, i) => {
    const [sorted, hinted] = [variants.sorted[i], variants.hinted[i]];
    assertEquals(promptOf(item), asked[i].question); // the test's own prompt, options in its order
    assertEquals(item.choices!["ABCD".indexOf(asked[i].answer)], item.answer); // the answer is its option's text
    assertEquals(sorted.choices, item.choices!.toSorted());
    assertEquals(hinted.question, `${item.question} ${item.answer}`);
    assertEquals(hinted.choices, item.choices);
    for (const other of [sorted, hinted]) {
      assertEquals([other.answer, other.kind, other.images], [item.answer, item.kind, item.images]);
    }
  });
});

Deno.test("choice_probe on the committed checkpoint: 'as asked' is eval's score, and with sorted options it counts", async () => {
  const output = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", `${ROOT}tools/choice_probe.ts`, "--examples", "40"],
    stdout: "piped",
    stderr: "inherit",
  }).output();
  assert(output.success, "tools/choice_probe.ts failed");
  const lines = new TextDecoder().decode(output.stdout).trim().split("\n");
  const table = Object.fromEntries(
    lines.slice(2).map((line) => {
      const [kind, ...cells] = line.split(/\s{2,}/);
      return [kind, cells.map((cell) => cell.match(/\((\d+)\/(\d+)\)/)!.slice(1).map(Number))];
    }),
  );
  assertEquals(Object.keys(table), ["color", "count", "position", "all"]);

  await initBackend("wasm", { quiet: true });
  const { model, tokenizer } = await loadForInference(COMMITTED_CHECKPOINT);
  try {
    const choices = shapesQuestions("test", 40, model.cfg.vit_img_size).filter((item) => item.kind === "choice");
    const { correct, total } = await evaluate(model, tokenizer, choices);
    assertEquals(table.all[0], [correct, total]); // "as asked": the right letters of eval's own multiple-choice questions
  } finally {
    model.dispose();
  }
  const [right, asked] = table.count[1]; // sorted options: the letter follows from the answer alone
  assert(right >= 0.9 * asked, `with sorted options the checkpoint counted ${right} of ${asked}`);
});
