// notebooks/trained.ts — the trained tiny model that notebooks 3 and 8 look inside.
//
// Notebook 7 trains the `tiny` preset with RECIPE, step by step with a live loss plot, and
// saves it to CHECKPOINT. `trainedTinyModel()` loads that checkpoint; when it is missing
// (notebook 7 has not run yet) it trains the same recipe here, without the pictures, and
// saves it, so every notebook runs on its own and they all see the same model. The training
// itself is `deno task train`'s: lrSchedule, paramGroups, AdamW (lib/optimizer.ts) and
// trainStep (lib/train_step.ts).

import { checkTokenizerFitsConfig, loadTokenizer, shapesBatches } from "../data.ts";
import { PRESETS, VisionLanguageModel } from "../nanovlm.ts";
import { AdamW, lrSchedule, paramGroups } from "../lib/optimizer.ts";
import { trainStep } from "../lib/train_step.ts";
import { fromPretrained, savePretrained } from "../lib/checkpoint.ts";

/** Where notebook 7 saves its model (nanoVLM's format: config.json + model.safetensors). */
export const CHECKPOINT: string = new URL("../runs/notebooks/tiny", import.meta.url).pathname;

/** The shapes tokenizer the tiny preset is built for. */
export const TOKENIZER_DIR: string = new URL("../tokenizers/shapes", import.meta.url).pathname;

/** How the notebooks train: about a minute on a 2-core CPU. `deno task train` trains far longer. */
export const RECIPE = Object.freeze({
  preset: "tiny",
  steps: 300, // optimizer steps
  batchSize: 8, // samples per step
  lr: 3e-3, // peak learning rate, for the projector and the backbones alike
  maxGradNorm: 1.0,
  seed: 0, // model init and data order
});

/**
 * The tiny model trained with RECIPE: loaded from CHECKPOINT, or trained now (and saved
 * there) when that is missing or does not fit the shapes tokenizer. `log` receives one
 * line saying which, and a progress line every 50 steps while training.
 */
export async function trainedTinyModel(
  log: (line: string) => void = console.log,
): Promise<{ model: VisionLanguageModel; source: string }> {
  const tokenizer = await loadTokenizer(TOKENIZER_DIR);
  try {
    const model = await fromPretrained(CHECKPOINT);
    try {
      checkTokenizerFitsConfig(tokenizer, model.cfg);
      const source = `loaded ${CHECKPOINT} (saved by notebook 7)`;
      log(source);
      return { model, source };
    } catch (e) {
      model.dispose();
      log(`${CHECKPOINT} does not fit the shapes tokenizer (${(e as Error).message}): training a new one`);
    }
  } catch {
    log(`no checkpoint at ${CHECKPOINT} yet (notebook 7 saves one): training one now, about a minute`);
  }

  const cfg = PRESETS[RECIPE.preset];
  const model = new VisionLanguageModel(cfg, { seed: RECIPE.seed });
  const groups = paramGroups(model, RECIPE.lr, RECIPE.lr);
  const optimizer = new AdamW(model.params, groups);
  const batches = shapesBatches({
    split: "train",
    seed: RECIPE.seed,
    batchSize: RECIPE.batchSize,
    tokenizer,
    config: cfg,
  });
  const start = performance.now();
  for (let step = 0; step < RECIPE.steps; step++) {
    const lrs = groups.map((g) => lrSchedule(step, g.maxLr, RECIPE.steps));
    const { loss } = await trainStep(model, [batches.next().value!], optimizer, {
      lrs,
      maxGradNorm: RECIPE.maxGradNorm,
    });
    if ((step + 1) % 50 === 0) {
      log(
        `step ${step + 1}/${RECIPE.steps} | loss ${loss.toFixed(3)} | ${
          ((performance.now() - start) / 1000).toFixed(0)
        } s`,
      );
    }
  }
  optimizer.dispose();
  await savePretrained(model, CHECKPOINT);
  return { model, source: `trained here for ${RECIPE.steps} steps (notebook 7's recipe) and saved to ${CHECKPOINT}` };
}
