// generate.ts and eval.ts: train → save → load → generate round trip, the command lines
// (streaming, --quiet, JSONL eval with --out), the scoring rules, and bad input: a missing
// or corrupt image, a prompt longer than the context, a checkpoint folder without its files.
//
// For answers we can predict, a "stub" checkpoint: every decoder block's weights are zero,
// so each block passes its input through and the logits depend on the current token only
// (a bigram model). Its embedding and untied head are set so that after the prompt's last
// token "\n" it says "A", then <|im_end|>: whatever the image and question, the answer is "A".

import * as tf from "@tensorflow/tfjs";
import { encodePng, loadTokenizer, makeShapesExample, preprocessImage, shapesBatches } from "../data.ts";
import { main as evalMain, readQuestionsJsonl } from "../lib/eval.ts";
import {
  answerQuestion,
  checkMultipleChoice,
  type EvalItem,
  isCorrect,
  normalizeAnswer,
  promptOf,
  questionsAbout,
} from "../lib/scoring.ts";
import { checkpointToAsk, COMMITTED_CHECKPOINT, findLatestCheckpoint, loadForInference } from "../lib/inference.ts";
import { main as generateMain } from "../generate.ts";
import { VisionLanguageModel } from "../nanovlm.ts";
import { initBackend } from "../backend/runtime.ts";
import { modelConfig } from "../lib/train_config.ts";
import { AdamW, paramGroups } from "../lib/optimizer.ts";
import { trainStep } from "../lib/train_step.ts";
import { saveCheckpoint } from "../lib/train_state.ts";
import { assert, assertEquals, assertMatch, assertRejects } from "./assert.ts";
import { MICRO_OVERRIDES } from "./helpers.ts";
import { savePretrained } from "../lib/checkpoint.ts";

await initBackend("wasm", { quiet: true });
const ROOT = new URL("..", import.meta.url).pathname;
const tokenizer = await loadTokenizer(`${ROOT}tokenizers/shapes`);
const MICRO = modelConfig("tiny", { ...MICRO_OVERRIDES, lm_max_length: 40 }); // a context the errors below name

async function withTempDir(fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "nanovlm-scripts-test-" });
  try {
    await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

/** The stub checkpoint described at the top, saved to `dir`. */
async function saveStub(dir: string): Promise<void> {
  const model = new VisionLanguageModel({ ...MICRO, lm_tie_weights: false });
  const [newline, letterA, eos] = [tokenizer.tokenToId("\n")!, tokenizer.tokenToId("A")!, tokenizer.eosTokenId];
  const { lm_vocab_size: V, lm_hidden_dim: D } = model.cfg;
  for (const [name, p] of model.params) {
    if (name.startsWith("decoder.blocks.") && !name.includes("norm")) p.assign(tf.zerosLike(p));
  }
  const embedding = new Float32Array(V * D), head = new Float32Array(V * D); // both [V, D]
  embedding[newline * D + 0] = 1; // "\n" → direction 0
  embedding[letterA * D + 1] = 1; // "A"  → direction 1
  head[letterA * D + 0] = 1; // direction 0 → "A"
  head[eos * D + 1] = 1; // direction 1 → <|im_end|>
  model.params.get("decoder.token_embedding.weight")!.assign(tf.tensor2d(embedding, [V, D]));
  model.params.get("decoder.head.weight")!.assign(tf.tensor2d(head, [V, D]));
  await savePretrained(model, dir);
  model.dispose();
}

/** A shapes-world scene as a PNG file. */
async function writeScene(path: string, index: number): Promise<void> {
  const scene = makeShapesExample("test", 0, index, 24);
  await Deno.writeFile(path, await encodePng(scene.rgb, 24));
}

async function run(
  script: string,
  args: string[],
  cwd = ROOT,
): Promise<{ code: number; stdout: string; stderr: string }> {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", `${ROOT}${script}`, ...args],
    cwd,
    env: { NANOVLM_BACKEND: "wasm" },
  }).output();
  const text = new TextDecoder();
  return { code: out.code, stdout: text.decode(out.stdout), stderr: text.decode(out.stderr) };
}

// ---- Round trip ----

Deno.test("train → save → load → generate gives the same answer, in-process and from the command line", async () => {
  await withTempDir(async (dir) => {
    const model = new VisionLanguageModel(MICRO, { seed: 2 });
    model.eosTokenId = tokenizer.eosTokenId;
    const optimizer = new AdamW(model.params, paramGroups(model, 3e-3, 3e-3));
    for (const batch of shapesBatches({ split: "train", seed: 0, batchSize: 8, tokenizer, config: MICRO, count: 40 })) {
      await trainStep(model, [batch], optimizer, { lrs: [3e-3, 3e-3] });
    }
    await writeScene(`${dir}/scene.png`, 3);
    const question = "What color is the circle?";
    const pixels = await preprocessImage(`${dir}/scene.png`, 16);
    const before = await answerQuestion(model, tokenizer, [pixels], question, { greedy: true, maxNewTokens: 6 });
    await saveCheckpoint(`${dir}/ckpt`, model, {
      optimizer,
      state: { step: 5, examples_seen: 40, best_val_loss: null, elapsed_seconds: 1 },
    });
    optimizer.dispose();
    model.dispose();

    const loaded = await loadForInference(`${dir}/ckpt`);
    const streamed: string[] = [];
    const after = await answerQuestion(loaded.model, loaded.tokenizer, [pixels], question, {
      greedy: true,
      maxNewTokens: 6,
      onText: (piece) => streamed.push(piece),
    });
    loaded.model.dispose();
    assertEquals(after.ids, before.ids);
    assertEquals(after.text, before.text);
    assertEquals(streamed.join("").trim(), after.text);
    assert(after.timeToFirstTokenMs > 0);

    const cli = await run("generate.ts", [
      `--checkpoint=${dir}/ckpt`,
      `--image=${dir}/scene.png`,
      `--prompt=${question}`,
      "--greedy",
      "--max-new-tokens=6",
      "--quiet",
    ]);
    assertEquals(cli.code, 0, cli.stderr);
    assertEquals(cli.stdout, `${before.text}\n`); // --quiet: the answer and nothing else
  });
});

Deno.test("generate without --image streams an answer about a test scene, then timings on stderr", async () => {
  await withTempDir(async (dir) => {
    await saveStub(`${dir}/stub`);
    const cli = await run("generate.ts", [`--checkpoint=${dir}/stub`, "--greedy"]);
    assertEquals(cli.code, 0, cli.stderr);
    assertEquals(cli.stdout, "A\n");
    assert(cli.stderr.includes("no --image given: using scene 0 of the shapes world's test split"), cli.stderr);
    assert(/time to first token \d+ ms \| 2 tokens \| [\d.]+ tokens\/s/.test(cli.stderr), cli.stderr);
  });
});

Deno.test("findLatestCheckpoint picks the newest run's best/ (else latest/)", async () => {
  await withTempDir(async (dir) => {
    await assertRejects(() => findLatestCheckpoint(`${dir}/runs`), Error, "train one with `deno task train`");
    await saveStub(`${dir}/runs/old/best`);
    await saveStub(`${dir}/runs/new/latest`);
    assertEquals(await findLatestCheckpoint(`${dir}/runs`), `${dir}/runs/new/latest`);
    await saveStub(`${dir}/runs/new/best`);
    assertEquals(await findLatestCheckpoint(`${dir}/runs`), `${dir}/runs/new/best`);
  });
});

Deno.test("with no run of the user's own, generate and eval ask the committed checkpoint and say so", async () => {
  await withTempDir(async (dir) => {
    assertEquals(await checkpointToAsk(`${dir}/mine`, `${dir}/runs`), { dir: `${dir}/mine` }); // named: as is
    assertEquals((await checkpointToAsk(undefined, `${dir}/runs`)).dir, COMMITTED_CHECKPOINT);
    // From a folder without runs/, as on a fresh clone before any training.
    const cli = await run("generate.ts", ["--greedy", "--prompt=How many shapes are there?"], dir);
    assertEquals(cli.code, 0, cli.stderr);
    assert(cli.stderr.includes("checkpoints/shapes-tiny, the trained model that comes with the project"), cli.stderr);
    assertMatch(cli.stdout, /^(one|two|three|four)\n$/);
    // Once the user has a run, it is theirs that is asked.
    await saveStub(`${dir}/runs/mine/best`);
    assertEquals((await checkpointToAsk(undefined, `${dir}/runs`)).dir, `${dir}/runs/mine/best`);
  });
});

// ---- Scoring ----

Deno.test("exact match ignores case, surrounding space and one trailing period", () => {
  assertEquals(normalizeAnswer("  A red Circle. "), "a red circle");
  const item: EvalItem = { images: [], question: "?", answer: "a small red circle in the top left." };
  assert(isCorrect(item, "A small red circle in the top left"));
  assert(!isCorrect(item, "a small red circle in the top right."));
  assert(!isCorrect({ ...item, answer: "two" }, "two shapes"));
});

Deno.test("multiple choice is scored like the reference's check_multiple_choice_with_regex", () => {
  assert(checkMultipleChoice("B", "B"));
  assert(checkMultipleChoice("The answer is B.", "b"));
  assert(checkMultipleChoice("(B) square", "B"));
  assert(checkMultipleChoice("B, I think", "B"));
  assert(!checkMultipleChoice("A", "B"));
  assert(!checkMultipleChoice("b", "B")); // the output is not upper-cased
  assert(!checkMultipleChoice("Blue", "B")); // not a word of its own
  assert(checkMultipleChoice("A red circle", "A")); // the reference's leniency: any "A" word counts
  const item: EvalItem = { images: [], question: "?", choices: ["circle", "square"], answer: "square" };
  assert(isCorrect(item, "B")); // an answer given as the option's text means its letter
  assert(isCorrect({ ...item, answer: "B" }, "B."));
  assert(!isCorrect(item, "square")); // the model must answer with the letter
});

Deno.test("a shapes-world multiple-choice question is scored by its letter: 'B' and 'blue (B)' answer B", () => {
  const scene = makeShapesExample("test", 0, 0, 32);
  const question = scene.questions.find((q) => q.kind === "choice")!;
  const [item] = questionsAbout({ ...scene, questions: [question] }, { rgb: scene.rgb, width: 32, height: 32 });
  assertEquals(promptOf(item), question.question, "the prompt is the one the scene wrote");
  const letter = question.answer, option = item.choices!["ABCD".indexOf(letter)];
  const wrong = "ABCD".replace(letter, "")[0];
  assert(isCorrect(item, letter));
  assert(isCorrect(item, `${option} (${letter})`));
  assert(!isCorrect(item, wrong));
  assert(!isCorrect(item, `${option} (${wrong})`));
});

// ---- eval on a JSONL file ----

Deno.test("eval on a JSONL file: known answers give a known accuracy, per kind, and --out has every prediction", async () => {
  await withTempDir(async (dir) => {
    await saveStub(`${dir}/stub`);
    await Deno.mkdir(`${dir}/data/images`, { recursive: true });
    await writeScene(`${dir}/data/images/a.png`, 0);
    await writeScene(`${dir}/data/images/b.png`, 1);
    const rows = [
      { image: "images/a.png", question: "What shape is the red object?", answer: "A", kind: "open" }, // right
      { image: "images/a.png", question: "What color is the circle?", answer: "red", kind: "open" }, // wrong
      {
        image: "images/b.png",
        question: "What color is the circle?",
        choices: ["red", "blue"],
        answer: "A",
        kind: "choice",
      },
      {
        image: "images/b.png",
        question: "What color is the circle?",
        choices: ["red", "blue"],
        answer: "blue",
        kind: "choice",
      },
    ];
    await Deno.writeTextFile(`${dir}/data/q.jsonl`, rows.map((r) => JSON.stringify(r)).join("\n") + "\n");
    const result = await evalMain([`--checkpoint=${dir}/stub`, `--data=${dir}/data/q.jsonl`, `--out=${dir}/out.jsonl`]);
    assertEquals([result.correct, result.total], [2, 4]);
    assertEquals(result.perKind.open, { accuracy: 0.5, correct: 1, total: 2 });
    assertEquals(result.perKind.choice, { accuracy: 0.5, correct: 1, total: 2 });
    const out = (await Deno.readTextFile(`${dir}/out.jsonl`)).trim().split("\n").map((l) => JSON.parse(l));
    assertEquals(out.map((p) => [p.prediction, p.correct]), [["A", true], ["A", false], ["A", true], ["A", false]]);
    assert(
      out[2].question.endsWith("A. red\nB. blue\nAnswer with the option's letter from the given choices directly."),
    );

    // Bad lines and missing images are named.
    await Deno.writeTextFile(`${dir}/data/bad.jsonl`, `${JSON.stringify(rows[0])}\n{"image": "a.png"}\n`);
    await assertRejects(() => readQuestionsJsonl(`${dir}/data/bad.jsonl`), Error, `${dir}/data/bad.jsonl:2: needs`);
    await Deno.writeTextFile(`${dir}/data/gone.jsonl`, JSON.stringify({ ...rows[0], image: "gone.png" }));
    await assertRejects(
      () => evalMain([`--checkpoint=${dir}/stub`, `--data=${dir}/data/gone.jsonl`]),
      Error,
      `cannot read image ${dir}/data/gone.png: no such file`,
    );
  });
});

// ---- Bad input ----

Deno.test("bad input is named: missing or corrupt image, too-long prompt, checkpoint without its files", async () => {
  await withTempDir(async (dir) => {
    await saveStub(`${dir}/stub`);
    const ask = (args: string[]) => generateMain([`--checkpoint=${dir}/stub`, "--quiet", "--greedy", ...args]);
    await assertRejects(
      () => ask([`--image=${dir}/nope.png`, "--prompt=What color is the circle?"]),
      Error,
      `cannot read image ${dir}/nope.png: no such file`,
    );
    await Deno.writeTextFile(`${dir}/broken.png`, "not a picture");
    await assertRejects(
      () => ask([`--image=${dir}/broken.png`, "--prompt=What color is the circle?"]),
      Error,
      `cannot decode image ${dir}/broken.png`,
    );
    await writeScene(`${dir}/scene.png`, 0);
    await assertRejects(
      () => ask([`--image=${dir}/scene.png`, `--prompt=${"What color is the circle?\n".repeat(8)}`]),
      Error,
      "more than the limit of 40 (lm_max_length)",
    );
    await assertRejects(
      () => ask([`--image=${dir}/scene.png`, "--prompt=What color is the circle?", "--max-new-tokens=30"]),
      Error,
      "the prompt has 15 tokens and 30 new tokens were asked for, but the context (lm_max_length) is 40",
    );
    assertEquals(await ask([`--image=${dir}/scene.png`, "--prompt=What color is the circle?"]), "A");

    await Deno.mkdir(`${dir}/empty`);
    await assertRejects(() => loadForInference(`${dir}/empty`), Error, "config.json is missing");
    await Deno.copyFile(`${dir}/stub/config.json`, `${dir}/empty/config.json`);
    await assertRejects(() => ask([`--checkpoint=${dir}/empty`]), Error, "model.safetensors is missing");
  });
});

Deno.test("train's command line: an unknown option exits 1 listing the valid ones", async () => {
  const cli = await run("train.ts", ["--learning_rate=1"]);
  assertEquals(cli.code, 1);
  assert(cli.stderr.includes("error: unknown option --learning_rate"), cli.stderr);
  assert(cli.stderr.includes("--lr_mp") && cli.stderr.includes("--lm_hidden_dim"), cli.stderr);
});
