// lib/vision_pretrain.ts — a vision encoder that has seen shapes before it meets a decoder. nanoVLM never trains a
// vision encoder from scratch: it starts from SigLIP, which Google pretrained on images. The tiny model's ViT starts from
// random weights, and inside the VLM it learns shapes slowly: the only teacher is the next word, a few of which name a
// shape, and they reach the ViT through a decoder that is itself still learning where to look (tools/vision_probe.ts
// measures it; docs/training-the-shapes-world.md tells the story).
//
// So a run of the shapes world first trains the ViT and the projector alone, for `vision_pretrain_steps` steps: on each
// of the four image tokens (one per quadrant), one linear head per attribute names the quadrant's shape, colour and
// size, or "nothing", and a fourth names which quadrant the token is. That one keeps the token's place in it: the
// other three ask the same of all four tokens, which would teach them to forget where they are. The heads are thrown
// away afterwards; the model that goes on to train as nanoVLM does is the nanoVLM architecture, with a vision encoder
// that has been pretrained, as SigLIP is for nanoVLM.

import * as tf from "@tensorflow/tfjs";
import { COLORS, makeShapesExample, QUADRANTS, SHAPES, SIZES, type Split, toCHWFloat } from "../data.ts";
import { modalityProjector, visionEncoder, type VisionLanguageModel, type VLMConfig } from "../nanovlm.ts";
import { AdamW, lrSchedule } from "./optimizer.ts";
import { type TrainConfig, visionPretrainSkipped } from "./train_config.ts";
import { addHelperGradients, type GradientHelper } from "../backend/parallel.ts";

/**
 * What the heads name about each quadrant. Class 0 of each is "nothing here", class i + 1 the i-th value; every token
 * has a quadrant, so that head's class is never 0.
 */
export const QUADRANT_ATTRIBUTES = { shape: SHAPES, color: COLORS, size: SIZES, quadrant: QUADRANTS } as const;
/** shape, color, size or quadrant. */
export type QuadrantAttribute = keyof typeof QUADRANT_ATTRIBUTES;
const ATTRIBUTES = Object.keys(QUADRANT_ATTRIBUTES) as QuadrantAttribute[];

/** How many classes a head names for `attribute`: its values and "nothing here". */
export function classCount(attribute: QuadrantAttribute): number {
  return QUADRANT_ATTRIBUTES[attribute].length + 1;
}

/** Scenes as the model sees them and each quadrant's class per attribute. */
export interface QuadrantScenes {
  /** [N, 3, S, S] in [0, 1]. */
  images: tf.Tensor4D;
  /** Per attribute, [N·4] classes in quadrant order (top left, top right, bottom left, bottom right); 0 = empty. */
  labels: Record<QuadrantAttribute, Int32Array>;
}

/** Scenes `start` … `start + count − 1` of a split of the shapes world, with their quadrants' labels. */
export function quadrantScenes(
  split: Split,
  seed: number,
  start: number,
  count: number,
  size: number,
  { plain = false }: { plain?: boolean } = {},
): QuadrantScenes {
  const pixels = new Float32Array(count * 3 * size * size);
  const labels = {
    shape: new Int32Array(count * 4),
    color: new Int32Array(count * 4),
    size: new Int32Array(count * 4),
    quadrant: new Int32Array(count * 4),
  };
  for (let i = 0; i < count; i++) {
    const example = makeShapesExample(split, seed, start + i, size, { plain });
    toCHWFloat(example.rgb, size, pixels.subarray(i * 3 * size * size, (i + 1) * 3 * size * size));
    QUADRANTS.forEach((quadrant, q) => {
      labels.quadrant[i * 4 + q] = 1 + q;
      const object = example.objects.find((o) => o.quadrant === quadrant);
      if (!object) return;
      labels.shape[i * 4 + q] = 1 + SHAPES.indexOf(object.shape);
      labels.color[i * 4 + q] = 1 + COLORS.indexOf(object.color);
      labels.size[i * 4 + q] = 1 + SIZES.indexOf(object.size);
    });
  }
  return { images: tf.tensor4d(pixels, [count, 3, size, size]), labels };
}

/** The image tokens as the decoder receives them, one row per quadrant. images [N,3,S,S] → [N·4, D] */
export function quadrantTokens(params: Map<string, tf.Tensor>, cfg: VLMConfig, images: tf.Tensor): tf.Tensor2D {
  return modalityProjector(params, cfg, visionEncoder(params, cfg, images)).reshape([-1, cfg.lm_hidden_dim]);
}

/** Linear heads on the image tokens: one [D, classes + 1] matrix per attribute. */
export type QuadrantHeads = Record<QuadrantAttribute, tf.Variable>;

/** The heads, each [D, classCount] drawn from N(0, 0.02) with its own seed. */
export function createHeads(cfg: VLMConfig, seed: number): QuadrantHeads {
  return Object.fromEntries(ATTRIBUTES.map((attribute, i) => {
    // tfjs' randomNormal reads a seed of 0 as "no seed" (Math.random), so each run's head seeds start at 1.
    const init = tf.randomNormal(
      [cfg.lm_hidden_dim, classCount(attribute)],
      0,
      0.02,
      "float32",
      1 + seed * ATTRIBUTES.length + i,
    );
    const head = tf.variable(init);
    init.dispose(); // the variable holds its own copy
    return [attribute, head];
  })) as QuadrantHeads;
}

/**
 * What the first stage trains, by name, in a fixed order: every `vision_encoder.*` and `MP.*` weight, then the heads
 * (`head.shape`, ...). A helper thread receives and returns its weights in this order.
 */
export function quadrantWeights(model: VisionLanguageModel, heads: QuadrantHeads): Map<string, tf.Variable> {
  const vision = [...model.params].filter(([name]) => name.startsWith("vision_encoder.") || name.startsWith("MP."));
  return new Map([...vision, ...ATTRIBUTES.map((a) => [`head.${a}`, heads[a]] as [string, tf.Variable])]);
}

/** One thread's part of a pretraining step: scenes `start` … `start + count − 1`, and their share of the step's loss. */
export interface QuadrantWork {
  split: Split;
  seed: number;
  start: number;
  count: number;
  plain: boolean;
  /** count / the step's scenes: the parts' losses then add up to the mean over the whole step. */
  share: number;
}

/**
 * Draw `work`'s scenes and compute share × their loss (the heads' cross-entropies, added) and its gradient for each of
 * {@link quadrantWeights}, by name. This thread's part of a step, and a helper's (backend/parallel_worker.ts).
 */
export function quadrantGradients(
  model: VisionLanguageModel,
  heads: QuadrantHeads,
  work: QuadrantWork,
): { loss: tf.Scalar; grads: Map<string, tf.Tensor> } {
  const trained = quadrantWeights(model, heads);
  const scenes = quadrantScenes(work.split, work.seed, work.start, work.count, model.cfg.vit_img_size, {
    plain: work.plain,
  });
  const { value, grads } = tf.variableGrads(() => {
    const tokens = quadrantTokens(model.params, model.cfg, scenes.images); // [count·4, D]
    const losses = ATTRIBUTES.map((attribute) => {
      const targets = tf.oneHot(tf.tensor1d(scenes.labels[attribute], "int32"), classCount(attribute));
      return tf.losses.softmaxCrossEntropy(targets, tokens.matMul(heads[attribute]));
    });
    return tf.addN(losses).mul(work.share) as tf.Scalar;
  }, [...trained.values()]);
  scenes.images.dispose();
  return { loss: value, grads: new Map([...trained].map(([name, v]) => [name, grads[v.name]])) };
}

/** How pretrainVision trains, and what it reports. */
export interface VisionPretrainOptions {
  steps: number;
  seed: number;
  /** Scenes per step. */
  batchSize?: number;
  /** Peak learning rate of the reference's schedule (warmup, cosine to a tenth). */
  lr?: number;
  /** AdamW's β2, as the run's. */
  beta2?: number;
  /** Black, hard-edged scenes only (`plain_scenes`). */
  plain?: boolean;
  /** Helper threads (backend/parallel.ts) that draw and compute part of every step's scenes. */
  helpers?: GradientHelper[];
  /** Called every 100 steps and after the last, with the step, its loss and the heads (valid during the call). */
  report?: (step: number, loss: number, heads: QuadrantHeads) => void;
}

/**
 * Train `model`'s ViT and projector (every `vision_encoder.*` and `MP.*` weight) to name each quadrant's shape, colour,
 * size and place from its image token, on the shapes world's train split; the decoder is not touched. With helpers,
 * each thread draws and computes an equal part of every step's scenes, and the parts' shares add up to the step's
 * mean: the same step, to float rounding. Returns the last loss.
 */
export async function pretrainVision(model: VisionLanguageModel, options: VisionPretrainOptions): Promise<number> {
  const { steps, seed, batchSize = 64, lr = 1e-3, beta2 = 0.95, plain = false, helpers = [], report } = options;
  if (model.cfg.mp_image_token_length !== 4) {
    throw new Error(
      `vision pretraining names each quadrant from its own image token, so it needs 4 image tokens; this model makes ` +
        `${model.cfg.mp_image_token_length}: set vision_pretrain_steps=0`,
    );
  }
  const heads = createHeads(model.cfg, seed);
  // The run's AdamW (torch's, lib/optimizer.ts) over the ViT, the projector and the heads, on the reference's schedule.
  const trained = quadrantWeights(model, heads);
  const optimizer = new AdamW(trained, [{ name: "vision", maxLr: lr, params: [...trained.keys()] }], { beta2 });
  // Thread t trains scenes first[t] … first[t] + counts[t] − 1 of each step's batchSize.
  const threads = Math.min(helpers.length + 1, batchSize);
  const counts = Array.from({ length: threads }, (_, t) => Math.floor((batchSize + t) / threads));
  const first = counts.map((_, t) => counts.slice(0, t).reduce((a, b) => a + b, 0));
  let lastLoss = NaN;
  try {
    for (let step = 0; step < steps; step++) {
      const work = counts.map((count, t): QuadrantWork => ({
        split: "train",
        seed,
        start: step * batchSize + first[t],
        count,
        plain,
        share: count / batchSize,
      }));
      // Each helper takes over its own copy of the current weights, and computes while this thread does its part.
      const current = threads > 1 ? [...trained.values()].map((v) => v.dataSync() as Float32Array) : [];
      const pending = helpers.slice(0, threads - 1).map((helper, k) =>
        helper.computeQuadrants(current.map((w) => w.slice()), work[k + 1])
      );
      const reportNow = (step + 1) % 100 === 0 || step + 1 === steps;
      let loss: tf.Scalar | undefined, grads = new Map<string, tf.Tensor>();
      try {
        ({ loss, grads } = quadrantGradients(model, heads, work[0]));
        const helpersLoss = addHelperGradients(grads, [...trained.keys()], await Promise.all(pending));
        optimizer.step(grads, [lrSchedule(step, lr, steps)]);
        if (reportNow) lastLoss = (await loss.data())[0] + helpersLoss;
      } finally {
        // After a failure here or in one helper, wait for the others: their replies must not arrive unheard.
        await Promise.allSettled(pending);
        tf.dispose([loss, ...grads.values()]);
      }
      if (!reportNow) continue;
      if (!Number.isFinite(lastLoss)) {
        throw new Error(`vision pretraining: the loss is ${lastLoss} at step ${step + 1}; try a lower --lr_backbones`);
      }
      report?.(step + 1, lastLoss, heads);
    }
  } finally {
    optimizer.dispose();
    Object.values(heads).forEach((head) => head.dispose());
  }
  return lastLoss;
}

/** train.ts's stage before the VLM: `vision_pretrain_steps` steps of pretrainVision with the run's settings, logged. */
export async function pretrainRunVision(
  model: VisionLanguageModel,
  config: TrainConfig,
  log: (line: string) => void,
  helpers: GradientHelper[] = [],
): Promise<void> {
  const steps = config.vision_pretrain_steps, started = performance.now();
  if (steps === 0) return;
  const skipped = visionPretrainSkipped(config, model.cfg);
  if (skipped) {
    log(`vision pretraining skipped: ${skipped}`);
    return;
  }
  const threads = helpers.length ? `, on ${helpers.length + 1} threads` : "";
  log(
    `vision pretraining: ${steps} steps naming each quadrant's contents and place (lib/vision_pretrain.ts)${threads}`,
  );
  await pretrainVision(model, {
    steps,
    seed: config.seed,
    batchSize: config.batch_size * config.gradient_accumulation_steps,
    lr: config.lr_backbones,
    beta2: config.adam_beta2,
    plain: config.plain_scenes,
    helpers,
    report: (step, loss) => {
      const seconds = ((performance.now() - started) / 1000).toFixed(0);
      log(`vision step ${step}/${steps} | loss ${loss.toFixed(3)} | ${seconds} s`);
    },
  });
}
