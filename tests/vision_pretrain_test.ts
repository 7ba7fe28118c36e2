// lib/vision_pretrain.ts: the quadrants' labels are the scene's, pretraining teaches the ViT and projector (and nothing
// else) to name what each quadrant holds, and train.ts runs it before the VLM.

import * as tf from "@tensorflow/tfjs";
import { COLORS, makeShapesExample, QUADRANTS, SHAPES, SIZES } from "../data.ts";
import { PRESETS, VisionLanguageModel } from "../nanovlm.ts";
import { initBackend } from "../backend/runtime.ts";
import { GradientHelper } from "../backend/parallel.ts";
import { train } from "../train.ts";
import { pretrainVision, quadrantScenes, quadrantTokens } from "../lib/vision_pretrain.ts";
import { assert, assertEquals, assertRejects } from "./assert.ts";
import { assertNoLeak, maxAbsDiff, MICRO, MICRO_OVERRIDES } from "./helpers.ts";

await initBackend("wasm", { quiet: true });

Deno.test("quadrantScenes: each quadrant's labels are its object's shape, colour and size (0 if empty), and its place", () => {
  const scenes = quadrantScenes("train", 3, 10, 20, 64);
  assertEquals(scenes.images.shape, [20, 3, 64, 64]);
  let empty = 0;
  for (let i = 0; i < 20; i++) {
    const { objects } = makeShapesExample("train", 3, 10 + i, 64);
    QUADRANTS.forEach((quadrant, q) => {
      const object = objects.find((o) => o.quadrant === quadrant);
      const labels = [scenes.labels.shape[i * 4 + q], scenes.labels.color[i * 4 + q], scenes.labels.size[i * 4 + q]];
      if (!object) empty++;
      const expected = object
        ? [1 + SHAPES.indexOf(object.shape), 1 + COLORS.indexOf(object.color), 1 + SIZES.indexOf(object.size)]
        : [0, 0, 0];
      assertEquals(labels, expected, `scene ${10 + i}, ${quadrant}`);
      assertEquals(scenes.labels.quadrant[i * 4 + q], 1 + q, "every token names its own quadrant, empty or not");
    });
  }
  assert(empty > 0 && empty < 80, `${empty} empty quadrants of 80`);
  scenes.images.dispose();
});

Deno.test("pretrainVision: 100 steps name the quadrants well beyond presence; the decoder is untouched; no leaks", async () => {
  const model = new VisionLanguageModel(PRESETS.tiny, { seed: 0 });
  const snapshot = (name: string) => model.params.get(name)!.dataSync().slice();
  const decoderBefore = snapshot("decoder.token_embedding.weight");
  const visionBefore = snapshot("vision_encoder.patch_embedding.conv.weight");
  const projectorBefore = snapshot("MP.proj.weight");
  const losses: number[] = [];
  await assertNoLeak(async () => {
    await pretrainVision(model, { steps: 100, seed: 0, report: (_, loss) => losses.push(loss) });
  });
  // Knowing only which quadrants are occupied, and which quadrant each token is, leaves a loss of about 2.0 (ln 3 + ln 4
  // + ln 2, weighted by the 62.5% of occupied quadrants); predicting the classes' frequencies alone, about 5.4.
  assertEquals(losses.length, 1);
  assert(losses[0] < 1.5, `loss after 100 steps: ${losses[0]}`);
  assertEquals(snapshot("decoder.token_embedding.weight"), decoderBefore);
  assert(snapshot("vision_encoder.patch_embedding.conv.weight").some((v, i) => v !== visionBefore[i]));
  assert(snapshot("MP.proj.weight").some((v, i) => v !== projectorBefore[i]));
  // The tokens it trained are the ones the decoder reads: one per quadrant.
  const scenes = quadrantScenes("val", 0, 0, 2, 64);
  const tokens = quadrantTokens(model.params, model.cfg, scenes.images);
  assertEquals(tokens.shape, [8, PRESETS.tiny.lm_hidden_dim]);
  tf.dispose([tokens, scenes.images]);
  model.dispose();
});

Deno.test("pretrainVision is repeatable: the same seed, 0 included, makes the same weights", async () => {
  // tfjs' randomNormal reads a seed of 0 as "no seed"; the heads once started from it, and seed 0 varied run to run.
  const projector = async () => {
    const model = new VisionLanguageModel(PRESETS.tiny, { seed: 0 });
    await pretrainVision(model, { steps: 2, seed: 0, batchSize: 8 });
    const weights = model.params.get("MP.proj.weight")!.dataSync().slice();
    model.dispose();
    return weights;
  };
  const [first, second] = [await projector(), await projector()];
  const differing = first.filter((value, i) => value !== second[i]).length; // a count: a diff of 49,152 floats is slow
  assertEquals(differing, 0, `${differing} of ${first.length} projector weights differ between two runs`);
});

Deno.test("pretrainVision with a helper thread makes the steps it makes alone; a helper's error is named, nothing leaked", async () => {
  const trainWith = async (helpers: GradientHelper[], batchSize = 9) => {
    const model = new VisionLanguageModel(PRESETS.tiny, { seed: 0 });
    const losses: number[] = [];
    await pretrainVision(model, { steps: 3, seed: 0, batchSize, helpers, report: (_, loss) => losses.push(loss) });
    const weights = model.params.get("MP.proj.weight")!.dataSync().slice();
    model.dispose();
    return { losses, weights };
  };
  const alone = await trainWith([]), mainPartOnly = await trainWith([], 5);
  const helper = await GradientHelper.start(PRESETS.tiny, []);
  try {
    // 9 scenes a step: 4 on this thread, 5 on the helper, each drawing its own; the shares add up to the same mean.
    const shared = await trainWith([helper]);
    assert(Math.abs(alone.losses[0] - shared.losses[0]) < 1e-5, `loss ${alone.losses[0]} vs ${shared.losses[0]}`);
    // The same steps to float rounding (AdamW moves a weight by about the learning rate, 1e-3, whatever its gradient's
    // size, so a near-zero gradient's rounding shows), far closer than without the helper's scenes.
    const diff = maxAbsDiff(alone.weights, shared.weights), without = maxAbsDiff(alone.weights, mainPartOnly.weights);
    assert(diff < 1e-5 && without > 1e-3, `weights differ by ${diff}; without the helper's scenes, by ${without}`);
  } finally {
    helper.close();
  }
  // A helper whose model has another ViT cannot take these weights: the step fails with the helper's words.
  const other = await GradientHelper.start({ ...PRESETS.tiny, vit_inter_dim: 192 }, []);
  const model = new VisionLanguageModel(PRESETS.tiny, { seed: 0 });
  try {
    await assertNoLeak(() =>
      assertRejects(
        () => pretrainVision(model, { steps: 1, seed: 0, batchSize: 8, helpers: [other] }),
        Error,
        "gradient helper:",
      )
    );
  } finally {
    other.close();
    model.dispose();
  }
});

Deno.test("pretrainVision needs one image token per quadrant: otherwise an error that names the fix", async () => {
  const model = new VisionLanguageModel(MICRO, { seed: 0 }); // one image token
  await assertRejects(
    () => pretrainVision(model, { steps: 1, seed: 0 }),
    Error,
    "it needs 4 image tokens; this model makes 1: set vision_pretrain_steps=0",
  );
  model.dispose();
});

Deno.test("train runs vision pretraining before the first step of a fresh run, and skips it where it cannot", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const run = {
      backend: "wasm",
      batch_size: 4,
      max_training_steps: 1,
      val_samples: 4,
      val_questions: 4,
      test_examples: 0,
      runs_dir: dir,
      vision_pretrain_steps: 3,
    };
    const fourTokens = { ...MICRO_OVERRIDES, vit_img_size: 32, mp_image_token_length: 4 }; // 4×4 patches, shuffle 2
    const lines: string[] = [];
    await train({ ...run, run_name: "four" }, fourTokens, { log: (line) => lines.push(line) });
    const pretraining = lines.findIndex((l) => l.startsWith("vision pretraining: 3 steps"));
    const firstStep = lines.findIndex((l) => l.startsWith("step 1/1"));
    assert(pretraining >= 0 && lines[pretraining + 1].startsWith("vision step 3/3 | loss "), lines.join("\n"));
    assert(firstStep > pretraining, lines.join("\n"));

    const oneToken: string[] = [];
    await train({ ...run, run_name: "one" }, MICRO_OVERRIDES, { log: (line) => oneToken.push(line) });
    assert(
      oneToken.includes("vision pretraining skipped: it needs one image token per quadrant (4); this model makes 1"),
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
