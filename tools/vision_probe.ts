// tools/vision_probe.ts — what do a model's image tokens know about the picture? The tiny preset makes one image
// token per quadrant; a probe asks whether that token holds its quadrant's shape, colour and size, and which quadrant
// it is.
//
//   deno run -A tools/vision_probe.ts --checkpoint checkpoints/shapes-tiny   # a trained model's image tokens
//   deno run -A tools/vision_probe.ts --checkpoint random                    # the same preset, untrained
//   deno run -A tools/vision_probe.ts --train_vit [--steps 1500]              # the ViT told the answers directly
//   deno run -A tools/vision_probe.ts --checkpoint checkpoints/shapes-tiny --novel   # test-novel's new objects
//
// A probe is a small classifier (one hidden layer of 256) trained on frozen image tokens of 3,000 train scenes and
// scored on the occupied quadrants of 1,000 test scenes (on every quadrant, for which one it is). It measures what can
// be read from the tokens, not what the decoder does read. The untrained model is the baseline: random features of the
// pixels already tell colours apart.
//
// --novel scores the same probes on test-novel's new objects instead: the yellow triangles and green circles that no
// train scene holds. A probe trained on train tokens never saw a yellow triangle either, so it may lean on what colour
// goes with what shape there; the untrained model shows how far (docs/training-the-shapes-world.md).
//
// --train_vit asks the other question: how fast does the tiny ViT learn the quadrants' contents when it is trained on
// them directly, as train.ts's vision pretraining does (lib/vision_pretrain.ts: a linear head per attribute on each
// image token instead of a decoder and a caption)? It prints the heads' test accuracy every 100 steps.
// docs/training-the-shapes-world.md compares the two.

import { parseArgs } from "node:util";
import * as tf from "@tensorflow/tfjs";
import { PRESETS, VisionLanguageModel } from "../nanovlm.ts";
import { initBackend } from "../backend/runtime.ts";
import { fromPretrained } from "../lib/checkpoint.ts";
import { runMain, snakeCaseFlags, wholeNumber } from "../lib/cli.ts";
import {
  classCount,
  pretrainVision,
  QUADRANT_ATTRIBUTES,
  type QuadrantAttribute,
  type QuadrantScenes,
  quadrantScenes,
  quadrantTokens,
} from "../lib/vision_pretrain.ts";
import { COLORS, NOVEL_PAIRS, SHAPES } from "../data.ts";

const USAGE =
  "usage: deno run -A tools/vision_probe.ts (--checkpoint DIR|random [--novel] | --train_vit) [--steps N] [--seed 0]";
const TRAIN_SCENES = 3000;
const TEST_SCENES = 1000;
const NAMES = Object.keys(QUADRANT_ATTRIBUTES) as QuadrantAttribute[];

/** The share of labelled quadrants (occupied ones; every one for `quadrant`) whose largest logit is their class. */
function labelledAccuracy(logits: tf.Tensor, labels: Int32Array): number {
  const predicted = tf.tidy(() => logits.argMax(-1).dataSync());
  let right = 0, labelled = 0;
  labels.forEach((label, i) => {
    if (label === 0) return;
    labelled++;
    if (predicted[i] === label) right++;
  });
  return right / labelled;
}

/**
 * test-novel's scenes with only their new objects labelled (NOVEL_PAIRS: the yellow triangle, the green circle): every
 * other quadrant gets label 0, which labelledAccuracy skips.
 */
function novelObjects(count: number, size: number): QuadrantScenes {
  const scenes = quadrantScenes("test-novel", 0, 0, count, size);
  const { shape, color } = scenes.labels;
  for (let row = 0; row < shape.length; row++) {
    const pair = shape[row] && color[row] ? `${COLORS[color[row] - 1]} ${SHAPES[shape[row] - 1]}` : "";
    if (NOVEL_PAIRS.includes(pair)) continue;
    for (const name of NAMES) scenes.labels[name][row] = 0;
  }
  return scenes;
}

/** Image tokens of many scenes, computed 100 scenes at a time without gradients. → [N·4, D] */
function frozenTokens(model: VisionLanguageModel, images: tf.Tensor4D): tf.Tensor2D {
  const chunks: tf.Tensor2D[] = [];
  for (let i = 0; i < images.shape[0]; i += 100) {
    chunks.push(tf.tidy(() => quadrantTokens(model.params, model.cfg, images.slice(i, 100))));
  }
  const tokens = tf.concat(chunks);
  chunks.forEach((t) => t.dispose());
  return tokens;
}

/** Train a one-hidden-layer probe per attribute on frozen tokens; print each one's test accuracy. */
function probe(model: VisionLanguageModel, steps: number, seed: number, novel: boolean): void {
  const S = model.cfg.vit_img_size;
  const train = quadrantScenes("train", 0, 0, TRAIN_SCENES, S);
  const test = novel ? novelObjects(TEST_SCENES, S) : quadrantScenes("test", 0, 0, TEST_SCENES, S);
  const trainTokens = frozenTokens(model, train.images), testTokens = frozenTokens(model, test.images);
  // Standardise each feature with the train tokens' statistics, so one learning rate suits every checkpoint.
  const { mean, variance } = tf.moments(trainTokens, 0);
  const scale = variance.add(1e-6).rsqrt();
  const standard = (t: tf.Tensor) => t.sub(mean).mul(scale);
  const D = model.cfg.lm_hidden_dim, rows = TRAIN_SCENES * 4;
  for (const name of NAMES) {
    const classes = classCount(name);
    // tidy frees the initial values; the variables keep their own reference to the data. (tfjs' randomNormal reads a
    // seed of 0 as "no seed", so the seeds start at 1.)
    const [w1, b1, w2] = tf.tidy(() => [
      tf.variable(tf.randomNormal([D, 256], 0, 1 / Math.sqrt(D), "float32", 2 * seed + 1)),
      tf.variable(tf.zeros([256])),
      tf.variable(tf.randomNormal([256, classes], 0, 1 / 16, "float32", 2 * seed + 2)),
    ]);
    const head = (x: tf.Tensor) => tf.relu(standard(x).matMul(w1).add(b1)).matMul(w2);
    const optimizer = tf.train.adam(1e-3);
    const targets = tf.oneHot(tf.tensor1d(train.labels[name], "int32"), classes);
    for (let step = 0; step < steps; step++) {
      const rowsOfStep = tf.tensor1d(Array.from({ length: 256 }, (_, i) => (step * 256 + i) % rows), "int32");
      optimizer.minimize(() =>
        tf.losses.softmaxCrossEntropy(tf.gather(targets, rowsOfStep), head(tf.gather(trainTokens, rowsOfStep)))
      );
      rowsOfStep.dispose();
    }
    const logits = tf.tidy(() => head(testTokens));
    const accuracy = 100 * labelledAccuracy(logits, test.labels[name]);
    console.log(
      `${name.padEnd(8)} ${accuracy.toFixed(1)}% (chance ${(100 / (classes - 1)).toFixed(0)}%)`,
    );
    [w1, b1, w2, targets, logits].forEach((t) => t.dispose());
    optimizer.dispose();
  }
  [train.images, test.images, trainTokens, testTokens, mean, variance, scale].forEach((t) => t.dispose());
}

/** Train the ViT and projector on the quadrants' labels directly (pretrainVision); print the heads' test accuracy. */
async function trainVit(steps: number, seed: number): Promise<void> {
  const model = new VisionLanguageModel(PRESETS.tiny, { seed });
  const test = quadrantScenes("test", 0, 0, TEST_SCENES / 2, model.cfg.vit_img_size);
  const started = performance.now();
  await pretrainVision(model, {
    steps,
    seed,
    report: (step, loss, heads) => {
      const tokens = frozenTokens(model, test.images);
      const scores = NAMES.map((name) => {
        const logits = tokens.matMul(heads[name]);
        const accuracy = labelledAccuracy(logits, test.labels[name]);
        logits.dispose();
        return `${name} ${(100 * accuracy).toFixed(1)}%`;
      });
      tokens.dispose();
      const seconds = ((performance.now() - started) / 1000).toFixed(0);
      console.log(
        `step ${step} | loss ${loss.toFixed(3)} | ${scores.join(" | ")} | ${seconds} s`,
      );
    },
  });
  test.images.dispose();
  model.dispose();
}

async function main(args: string[]) {
  const { values } = parseArgs({
    args: snakeCaseFlags(args),
    options: {
      checkpoint: { type: "string" },
      train_vit: { type: "boolean", default: false },
      novel: { type: "boolean", default: false },
      steps: { type: "string" },
      seed: { type: "string", default: "0" },
    },
  });
  if (values.train_vit === (values.checkpoint !== undefined)) {
    throw new Error(`give either --checkpoint (a model folder, or "random") or --train_vit\n${USAGE}`);
  }
  if (values.train_vit && values.novel) {
    throw new Error(`--novel probes a checkpoint's tokens; drop it with --train_vit\n${USAGE}`);
  }
  const steps = wholeNumber("steps", values.steps ?? (values.train_vit ? "1500" : "1000"), 1, USAGE);
  const seed = wholeNumber("seed", values.seed, 0, USAGE);
  await initBackend("wasm", { quiet: true });
  if (values.train_vit) return await trainVit(steps, seed);

  const model = values.checkpoint === "random"
    ? new VisionLanguageModel(PRESETS.tiny, { seed })
    : await fromPretrained(values.checkpoint!);
  if (model.cfg.mp_image_token_length !== 4) {
    throw new Error(
      `the probe reads one image token per quadrant; this model makes ${model.cfg.mp_image_token_length}`,
    );
  }
  const scored = values.novel
    ? `the new objects of ${TEST_SCENES} test-novel scenes (${NOVEL_PAIRS.join(", ")})`
    : `${TEST_SCENES} test scenes' occupied quadrants (every quadrant, for quadrant)`;
  console.log(
    `${values.checkpoint}: probes trained on ${TRAIN_SCENES} train scenes' image tokens, ${steps} steps each; ` +
      `accuracy on ${scored}`,
  );
  probe(model, steps, seed, values.novel);
  model.dispose();
}

if (import.meta.main) await runMain(main);
