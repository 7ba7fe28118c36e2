// tools/lookup_probe.ts — can the tiny decoder, trained from scratch, learn to find a multiple-choice answer's letter
// in its prompt? A probe of the look-up alone: every sample is one of the shapes world's multiple-choice questions with
// its question line ending in the answer ("What color is the circle? red", then "A. blue", "B. red", ...), and its
// picture replaced with plain grey, so only the text can answer: "find the option line that says red, and answer its
// letter".
//
//   deno run -A tools/lookup_probe.ts [--prompt_loss none|options|all] [--steps 1000] [--seed 0]
//
// It trains the tiny preset with train.ts's optimizer settings on batches of 64 such samples and prints, every 100
// steps, the letter's accuracy on 256 val questions of the same kind (chance: 25%). With --prompt_loss none (only the
// answer trained, as nanoVLM trains) it stays at chance; with options (the option lines trained as text too) it leaves
// chance (for seed 0, after step 600). docs/training-the-shapes-world.md tells why.

import { parseArgs } from "node:util";
import * as tf from "@tensorflow/tfjs";
import {
  type Batch,
  CHOICE_LETTERS,
  IGNORE_INDEX,
  loadTokenizer,
  PROMPT_LOSSES,
  type PromptLoss,
  shapesBatches,
} from "../data.ts";
import { lmHead, PRESETS, VisionLanguageModel } from "../nanovlm.ts";
import { initBackend } from "../backend/runtime.ts";
import { runMain, snakeCaseFlags, wholeNumber } from "../lib/cli.ts";
import { AdamW, adamWOnHost, lrSchedule, paramGroups } from "../lib/optimizer.ts";
import { resolveTokenizerPath } from "../lib/inference.ts";
import { DEFAULT_TRAIN_CONFIG } from "../lib/train_config.ts";
import { batchTensors, shareSpacedWordEmbeddings, trainStep } from "../lib/train_step.ts";

const USAGE = "usage: deno run -A tools/lookup_probe.ts [--prompt_loss none|options|all] [--steps 1000] [--seed 0]";
const BATCH = 64;
const VAL_QUESTIONS = 256;

/** The share of rows whose letter (the first trained token) is the one with the largest logit among A–D. */
function letterAccuracy(model: VisionLanguageModel, batch: Batch, letterIds: number[]): number {
  const [B, T] = [batch.batchSize, batch.length];
  // The position predicting each row's letter: its first trained one (val batches train only the answer).
  const rows = Array.from(
    { length: B },
    (_, b) => b * T + batch.labels.subarray(b * T, (b + 1) * T).findIndex((l) => l !== IGNORE_INDEX),
  );
  const scores = tf.tidy(() => {
    const { inputIds, attentionMask, images } = batchTensors(batch);
    const hidden = model.hiddenStates(inputIds, images, attentionMask); // [B, T, D]
    const atLetters = tf.gather(hidden.reshape([B * T, -1]), rows); // [B, D]
    return tf.gather(lmHead(model.params, model.cfg, atLetters), letterIds, 1).arraySync() as number[][]; // [B, 4]
  });
  const right = scores.filter((row, b) => letterIds[row.indexOf(Math.max(...row))] === batch.labels[rows[b]]).length;
  return right / B;
}

async function main(args: string[]) {
  const { values } = parseArgs({
    args: snakeCaseFlags(args),
    options: {
      prompt_loss: { type: "string", default: "options" },
      steps: { type: "string", default: "1000" },
      seed: { type: "string", default: "0" },
    },
  });
  const promptLoss = values.prompt_loss as PromptLoss;
  if (!PROMPT_LOSSES.includes(promptLoss)) {
    throw new Error(`--prompt_loss ${promptLoss}: expected one of ${PROMPT_LOSSES.join(", ")}\n${USAGE}`);
  }
  const steps = wholeNumber("steps", values.steps, 1, USAGE);
  const seed = wholeNumber("seed", values.seed, 0, USAGE);

  await initBackend("wasm", { quiet: true });
  const cfg = PRESETS.tiny;
  const tokenizer = await loadTokenizer(resolveTokenizerPath(cfg.lm_tokenizer));
  const model = new VisionLanguageModel(cfg, { seed });
  model.eosTokenId = tokenizer.eosTokenId;
  shareSpacedWordEmbeddings(model, tokenizer);
  const { lr_mp, lr_backbones, adam_beta2, max_grad_norm } = DEFAULT_TRAIN_CONFIG;
  const optimizer = new AdamW(model.params, paramGroups(model, lr_mp, lr_backbones), {
    beta2: adam_beta2,
    momentsOnHost: adamWOnHost("wasm"),
  });
  const lookups = { kinds: ["choice"] as const, choiceHints: 1, tokenizer, config: cfg };
  // Every picture plain grey (pixels are in [0, 1]), so that only the text can give the answer.
  const greyed = (batch: Batch): Batch => ({ ...batch, images: batch.images.fill(0.5) });
  const batches = shapesBatches({ ...lookups, split: "train", seed, batchSize: BATCH, promptLoss });
  const [val] = shapesBatches({ ...lookups, split: "val", seed: 0, batchSize: VAL_QUESTIONS, count: VAL_QUESTIONS })
    .map(greyed);
  const letterIds = CHOICE_LETTERS.map((letter) => tokenizer.encode(letter)[0]);

  console.log(`prompt loss ${promptLoss} | seed ${seed} | ${steps} steps of ${BATCH} hinted multiple-choice questions`);
  const started = performance.now();
  for (let step = 0; step < steps; step++) {
    const lrs = optimizer.groups.map((g) => lrSchedule(step, g.maxLr, steps));
    const batch = greyed(batches.next().value!);
    const { loss } = await trainStep(model, [batch], optimizer, { lrs, maxGradNorm: max_grad_norm });
    if ((step + 1) % 100 === 0 || step + 1 === steps) {
      const accuracy = (100 * letterAccuracy(model, val, letterIds)).toFixed(1);
      const seconds = ((performance.now() - started) / 1000).toFixed(0);
      console.log(
        `step ${step + 1} | loss ${loss.toFixed(3)} | letter right ${accuracy}% of ${val.batchSize} | ${seconds} s`,
      );
    }
  }
  optimizer.dispose();
  model.dispose();
}

if (import.meta.main) await runMain(main);
