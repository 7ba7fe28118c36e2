// The full-size model on a CPU: the nanovlm-222m preset (SigLIP-B/16-224 + SmolLM2-135M,
// random weights: there is no Hub here) builds with exactly the reference's parameter
// count and runs one forward pass on the wasm backend. About 15 s (10 s of it drawing
// 222 M random weights); training and generation at this size are measured by
// `deno task bench --preset nanovlm-222m`, not tested here (README, "Full size on a CPU").

import * as tf from "@tensorflow/tfjs";
import { assert, assertEquals } from "./assert.ts";
import { PRESETS, VisionLanguageModel } from "../nanovlm.ts";
import { initBackend } from "../backend/runtime.ts";

await initBackend("wasm", { quiet: true });

Deno.test("nanovlm-222m: 222,082,176 parameters, one forward on wasm gives finite logits [1, T, V]", async () => {
  const before = tf.memory().numTensors;
  const cfg = PRESETS["nanovlm-222m"];
  const model = new VisionLanguageModel(cfg, { seed: 0 });
  try {
    assertEquals(model.parameterCount(), 222_082_176);
    // One 224×224 image (49 image tokens) and 15 text tokens, with a loss on the text.
    const L = cfg.mp_image_token_length, T = L + 15;
    const ids = Array.from({ length: T }, (_, t) => t < L ? model.imageTokenId : 100 + 37 * t);
    const targets = Array.from({ length: T }, (_, t) => t < L || t === T - 1 ? -100 : ids[t + 1]);
    const inputIds = tf.tensor2d(ids, [1, T], "int32"), labels = tf.tensor2d(targets, [1, T], "int32");
    const images = tf.randomUniform([1, 3, cfg.vit_img_size, cfg.vit_img_size], -1, 1, "float32", 1);
    const { logits, loss } = model.forward(inputIds, images, undefined, labels);
    assertEquals(logits.shape, [1, T, cfg.lm_vocab_size]);
    const values = (await logits.data()) as Float32Array;
    assert(values.every(Number.isFinite), "every logit is finite");
    // Random weights (std 0.02) predict close to uniformly: the loss is about ln V ≈ 10.8.
    const lossValue = (await loss!.data())[0];
    assert(Math.abs(lossValue - Math.log(cfg.lm_vocab_size)) < 0.5, `loss ${lossValue} should be near ln V`);
    tf.dispose([inputIds, labels, images, logits, loss!]);
  } finally {
    model.dispose();
  }
  assertEquals(tf.memory().numTensors, before, "every tensor is freed");
});
