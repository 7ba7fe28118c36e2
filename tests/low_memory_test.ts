// Activation checkpointing (runtime.ts `recomputeInBackward`, `model.checkpointBlocks`):
// the gradients are the plain ones, on wasm and cpu, nothing leaks, and the forward and
// generation are unchanged. Run: deno test -A tests/checkpoint_test.ts

import * as tf from "@tensorflow/tfjs";
import { assert, assertEquals } from "./assert.ts";
import { PRESETS, VisionLanguageModel, type VLMConfig } from "../nanovlm.ts";
import { initBackend, recomputeInBackward } from "../runtime.ts";
import { assertNoLeak, maxAbsDiff } from "./helpers.ts";

await initBackend("wasm", { quiet: true });

/** 2 ViT blocks and 3 decoder blocks (GQA, left padding), 2 images of 16×16 with 4 image tokens each. */
const small: VLMConfig = {
  ...PRESETS.tiny,
  vit_hidden_dim: 32,
  vit_inter_dim: 64,
  vit_img_size: 16,
  vit_patch_size: 4,
  vit_n_heads: 2,
  vit_n_blocks: 2,
  lm_hidden_dim: 48,
  lm_inter_dim: 96,
  lm_n_heads: 6,
  lm_n_kv_heads: 2,
  lm_n_blocks: 3,
  lm_base_vocab_size: 39,
  lm_vocab_size: 40,
  lm_max_length: 32,
  mp_image_token_length: 4,
};
const IMG = 39; // <|image|>

/** Two prompts, the first left-padded: [pad, pad, img×4, 5, 6, 7, 8] and [img×4, 9, 10, 11, 12, 13, 14]. */
function batch() {
  return {
    inputIds: tf.tensor2d(
      [3, 3, IMG, IMG, IMG, IMG, 5, 6, 7, 8, IMG, IMG, IMG, IMG, 9, 10, 11, 12, 13, 14],
      [2, 10],
      "int32",
    ),
    mask: tf.tensor2d([0, 0, 1, 1, 1, 1, 1, 1, 1, 1, ...new Array(10).fill(1)], [2, 10], "int32"),
    images: tf.randomUniform([2, 3, 16, 16], -1, 1, "float32", 7),
    targets: tf.tensor2d([
      -100,
      -100,
      -100,
      -100,
      -100,
      6,
      7,
      8,
      1,
      -100,
      -100,
      -100,
      -100,
      10,
      11,
      12,
      13,
      14,
      2,
      -100,
    ], [
      2,
      10,
    ], "int32"),
  };
}

/** The loss and every parameter's gradient, by name, read back to the host. */
async function lossAndGrads(model: VisionLanguageModel, checkpoint: boolean) {
  model.checkpointBlocks = checkpoint;
  const t = batch();
  const { value, grads } = tf.variableGrads(() => model.forward(t.inputIds, t.images, t.mask, t.targets).loss!);
  const byName = new Map<string, Float32Array>();
  for (const [name, v] of model.params) byName.set(name, (await grads[v.name].data()) as Float32Array);
  const loss = (await value.data())[0];
  tf.dispose([value, ...Object.values(grads), ...Object.values(t)]);
  return { loss, grads: byName };
}

for (const backend of ["wasm", "cpu"]) {
  Deno.test(`${backend}: checkpointed blocks give the plain gradients (to 1e-6) and leak nothing`, async () => {
    await tf.setBackend(backend);
    const model = new VisionLanguageModel(small, { seed: 1 });
    const plain = await lossAndGrads(model, false);
    await lossAndGrads(model, true); // warm-up: backends may cache constants on first use
    let checkpointed: Awaited<ReturnType<typeof lossAndGrads>> | undefined;
    await assertNoLeak(async () => {
      checkpointed = await lossAndGrads(model, true);
    });
    assertEquals(checkpointed!.loss, plain.loss);
    assertEquals([...checkpointed!.grads.keys()].length, model.params.size);
    for (const [name, g] of plain.grads) {
      const diff = maxAbsDiff(checkpointed!.grads.get(name)!, g);
      assert(diff <= 1e-6, `${name}: gradients differ by ${diff}`);
      assert(g.some((x) => x !== 0), `${name}: no gradient reached it`);
    }
    model.dispose();
    await tf.setBackend("wasm");
  });
}

Deno.test("checkpointBlocks changes neither the logits nor what generate picks", async () => {
  const model = new VisionLanguageModel(small, { seed: 2 });
  const t = batch();
  const run = async () => {
    const { logits } = model.forward(t.inputIds, t.images, t.mask);
    const ids = await model.generate(t.inputIds, t.images, t.mask, { maxNewTokens: 4, greedy: true, eosTokenId: -1 });
    const out = { logits: await logits.data(), ids: Array.from(await ids.data()) };
    tf.dispose([logits, ids]);
    return out;
  };
  const plain = await run();
  model.checkpointBlocks = true;
  const checkpointed = await run();
  assertEquals(maxAbsDiff(checkpointed.logits, plain.logits), 0);
  assertEquals(checkpointed.ids, plain.ids);
  tf.dispose(Object.values(t));
  model.dispose();
});

Deno.test("recomputeInBackward: exact gradients for every input, a constant disposed before backward is fine", () => {
  const [a, b] = [tf.variable(tf.tensor1d([0.5, -1, 2])), tf.variable(tf.tensor1d([3, 0.25, -2]))];
  const f = (x: tf.Tensor, w: tf.Tensor, c: tf.Tensor) => tf.sin(x.mul(w)).mul(c).add(x.square());
  const loss = (wrap: boolean) => () => {
    // c lives only for the forward pass, as the decoder's RoPE tables do.
    const c = tf.tensor1d([1, 2, 3]);
    const y = wrap ? recomputeInBackward(f, [a.mul(2), b, c]) : f(a.mul(2), b, c);
    c.dispose();
    return y.sum() as tf.Scalar;
  };
  const plain = tf.variableGrads(loss(false), [a, b]);
  const recomputed = tf.variableGrads(loss(true), [a, b]);
  for (const v of [a, b]) {
    assert(maxAbsDiff(recomputed.grads[v.name].dataSync(), plain.grads[v.name].dataSync()) <= 1e-6, v.name);
  }
  assertEquals(recomputed.value.dataSync()[0], plain.value.dataSync()[0]);
  tf.dispose([plain.value, recomputed.value, ...Object.values(plain.grads), ...Object.values(recomputed.grads), a, b]);
});
