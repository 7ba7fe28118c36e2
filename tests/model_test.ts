// Invariants of nanovlm.ts that need no reference: the KV cache changes nothing, save →
// load is exact, memory does not grow, presets have the reference's sizes, and bad input
// gets an error that names the problem.

import * as tf from "@tensorflow/tfjs";
import { assert, assertEquals, assertMatch, assertRejects, assertThrows } from "./assert.ts";
import { fromPretrained, savePretrained } from "../lib/checkpoint.ts";
import { checkpointFiles, configFromJSON, modelFromCheckpointFiles } from "../lib/state_dict.ts";
import {
  crossEntropy,
  decoder,
  lmHead,
  parameterSpecs,
  PRESETS,
  trainedPositions,
  visionEncoder,
  VisionLanguageModel,
  type VLMConfig,
} from "../nanovlm.ts";
import { encodeSafetensors, readSafetensors } from "../lib/safetensors.ts";
import { initBackend } from "../backend/runtime.ts";
import { assertNoLeak, FIXTURE_DIR, maxAbsDiff, SMALL } from "./helpers.ts";

await initBackend("wasm", { quiet: true });

const IMG = 39; // <|image|>

/** Two left-padded prompts: [pad, pad, img×4, 5, 6, 7] and [img×4, img×4, 8, 9, 10]. */
function batch() {
  const ids = [2, 2, IMG, IMG, IMG, IMG, 5, 6, 7, 3, 3, IMG, IMG, IMG, IMG, IMG, IMG, IMG, IMG, 8, 9];
  const rows = [[...ids.slice(0, 9), 11, 12], [...ids.slice(11), 10]];
  return {
    inputIds: tf.tensor2d(rows.flat(), [2, 11], "int32"),
    mask: tf.tensor2d([0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, ...new Array(11).fill(1)], [2, 11], "int32"),
    images: tf.randomUniform([3, 3, 16, 16], 0, 1, "float32", 7),
    targets: tf.tensor2d(
      [...new Array(8).fill(-100), 11, 12, -100, ...new Array(9).fill(-100), 10, -100],
      [2, 11],
      "int32",
    ),
  };
}

Deno.test("presets have the reference's parameter counts", () => {
  const count = (cfg: VLMConfig) => parameterSpecs(cfg).reduce((n, s) => n + s.shape.reduce((a, b) => a * b, 1), 0);
  assertEquals(count(PRESETS["nanovlm-222m"]), 222_082_176);
  assertEquals(count(PRESETS["nanovlm-450m"]), 450_614_400);
  assert(count(PRESETS.tiny) < 2_000_000, "tiny stays laptop-sized");
});

Deno.test("KV-cache decoding equals a full recompute", () => {
  const model = new VisionLanguageModel(SMALL, { seed: 1 });
  const p = model.params as Map<string, tf.Tensor>;
  tf.tidy(() => {
    const x = tf.randomNormal([2, 7, SMALL.lm_hidden_dim], 0, 1, "float32", 3);
    const mask = tf.tensor2d([0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], [2, 7], "int32");
    const full = decoder(p, SMALL, x, { attentionMask: mask }).hidden; // all 7 positions at once
    // Prefill 4, then feed positions 4, 5, 6 one at a time through the cache.
    let { hidden, cache } = decoder(p, SMALL, x.slice([0, 0, 0], [2, 4, -1]), {
      attentionMask: mask.slice([0, 0], [2, 4]),
    });
    const pieces = [hidden];
    for (let t = 4; t < 7; t++) {
      ({ hidden, cache } = decoder(p, SMALL, x.slice([0, t, 0], [2, 1, -1]), {
        attentionMask: mask.slice([0, 0], [2, t + 1]),
        cache,
        startPos: t,
      }));
      pieces.push(hidden);
    }
    const stepwise = tf.concat(pieces, 1);
    const diff = maxAbsDiff(full.dataSync(), stepwise.dataSync(), [0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]);
    assert(diff < 1e-5, `cache vs recompute differ by ${diff}`);
    const logitDiff = maxAbsDiff(lmHead(p, SMALL, full).dataSync(), lmHead(p, SMALL, stepwise).dataSync(), [
      0,
      1,
      1,
      1,
      1,
      1,
      1,
      1,
      1,
      1,
      1,
      1,
      1,
      1,
    ]);
    assert(logitDiff < 1e-5, `logits differ by ${logitDiff}`);
  });
  model.dispose();
});

Deno.test("save → load gives exactly the same logits, in nanoVLM's file layout", async () => {
  const dir = await Deno.makeTempDir();
  const model = new VisionLanguageModel(SMALL, { seed: 3 });
  await savePretrained(model, dir);
  const file = await readSafetensors(`${dir}/model.safetensors`);
  assert(file.tensors.has("decoder.head.weight") && !file.tensors.has("decoder.token_embedding.weight"));
  assertEquals(file.metadata["decoder.token_embedding.weight"], "decoder.head.weight");
  assertEquals(file.tensors.get("MP.proj.weight")!.shape, [48, 4 * 32]); // PyTorch [out, in]
  assertEquals(file.tensors.get("vision_encoder.patch_embedding.conv.weight")!.shape, [32, 3, 4, 4]);
  const config = JSON.parse(await Deno.readTextFile(`${dir}/config.json`));
  // Every field of nanoVLM's VLMConfig, in order; our vit_img_normalize only when it is on (nanoVLM's loader rejects it).
  const referenceFields = Object.keys(PRESETS.tiny).filter((key) => key !== "vit_img_normalize");
  assertEquals(Object.keys(config), SMALL.vit_img_normalize ? Object.keys(PRESETS.tiny) : referenceFields);
  const loaded = await fromPretrained(dir);
  const { inputIds, mask, images } = batch();
  const a = model.forward(inputIds, images, mask).logits, b = loaded.forward(inputIds, images, mask).logits;
  assertEquals(maxAbsDiff(await a.data(), await b.data()), 0);
  tf.dispose([a, b]);
  model.dispose();
  loaded.dispose();
});

Deno.test("no tensor leaks across repeated forward, backward (forward's loss and model.loss) and generate", async () => {
  const model = new VisionLanguageModel(SMALL, { seed: 4 });
  const { inputIds, mask, images, targets } = batch();
  const step = async () => {
    const { logits, loss } = model.forward(inputIds, images, mask, targets);
    await loss!.data();
    tf.dispose([logits, loss!]);
    const { value, grads } = tf.variableGrads(() => model.forward(inputIds, images, mask, targets).loss!);
    tf.dispose([value, ...Object.values(grads)]);
    const trained = tf.variableGrads(() => model.loss(inputIds, images, mask, targets));
    tf.dispose([trained.value, ...Object.values(trained.grads)]);
    const ids = await model.generate(inputIds, images, mask, { maxNewTokens: 3, topK: 5, topP: 0.9, seed: 1 });
    ids.dispose();
  };
  await step(); // warm-up: backends may cache constants on first use
  await assertNoLeak(async () => {
    for (let i = 0; i < 3; i++) await step();
  });
  model.dispose();
});

Deno.test("loss (the head on trained positions only) = forward's loss, weighted or not, with the same gradients", async () => {
  const model = new VisionLanguageModel(SMALL, { seed: 5 });
  const { inputIds, mask, images, targets } = batch();
  const weights = tf.tensor2d(Array.from({ length: 22 }, (_, i) => 1 + (i % 3)), [2, 11]);
  const fullLoss = (w?: tf.Tensor) => crossEntropy(model.forward(inputIds, images, mask).logits, targets, w);
  for (const w of [undefined, weights]) {
    const full = tf.variableGrads(() => fullLoss(w));
    const trained = tf.variableGrads(() => model.loss(inputIds, images, mask, targets, w));
    const [a, b] = [(await full.value.data())[0], (await trained.value.data())[0]];
    assert(a > 1 && Math.abs(a - b) < 1e-5, `loss ${b} vs forward's ${a}`);
    for (const [name, g] of Object.entries(full.grads)) {
      const diff = maxAbsDiff(await g.data(), await trained.grads[name].data());
      assert(diff < 1e-5, `gradient of ${name} differs by ${diff}`);
    }
    tf.dispose([full.value, trained.value, ...Object.values(full.grads), ...Object.values(trained.grads)]);
  }
  // No trained position: a zero loss, still a function of the weights (zero gradients), as crossEntropy gives.
  const none = tf.fill([2, 11], -100, "int32");
  const { value, grads } = tf.variableGrads(() => model.loss(inputIds, images, mask, none));
  assert((await value.data())[0] === 0, "zero loss (crossEntropy's -0 included)");
  assertEquals(Math.max(...Object.values(grads).map((g) => maxAbsDiff(g.dataSync(), new Float32Array(g.size)))), 0);
  assertEquals(Array.from(trainedPositions([-100, 5, -100, 0])), [1, 3]);
  tf.dispose([value, ...Object.values(grads), none, weights, inputIds, mask, images, targets]);
  model.dispose();
});

Deno.test("the RoPE table: made with the model, the per-call values exactly, no growth, freed by dispose", async () => {
  const before = tf.memory().numTensors;
  const model = new VisionLanguageModel(SMALL, { seed: 8 });
  assertEquals(tf.memory().numTensors - before, model.params.size + 2, "weights + the RoPE table (cos, sin)");
  const { inputIds, mask, images, targets } = batch();
  const forward = async () => {
    const { logits, loss } = model.forward(inputIds, images, mask, targets);
    const values = await logits.data();
    tf.dispose([logits, loss!]);
    return values;
  };
  const withInputs = tf.memory().numTensors;
  const first = await forward();
  assertEquals(tf.memory().numTensors, withInputs, "the first forward leaves nothing behind (no lazy cache)");
  await forward();
  assertEquals(tf.memory().numTensors, withInputs, "nor does the second");
  // The free decoder, which makes the RoPE rows for the call, gives the very same logits.
  const p = model.params as Map<string, tf.Tensor>;
  const perCall = tf.tidy(() =>
    lmHead(p, SMALL, decoder(p, SMALL, model.embed(inputIds, images), { attentionMask: mask }).hidden)
  );
  assertEquals(maxAbsDiff(first, await perCall.data()), 0);
  tf.dispose([perCall, inputIds, mask, images, targets]);
  model.dispose();
  assertEquals(tf.memory().numTensors, before);
  // A context that may pass lm_max_position_embeddings has no table: dynamic RoPE scaling is per call.
  const long = new VisionLanguageModel({ ...SMALL, lm_max_position_embeddings: 16 });
  assertEquals(tf.memory().numTensors - before, long.params.size);
  long.dispose();
});

Deno.test("sampling is repeatable with a seed and respects top-k", async () => {
  const model = new VisionLanguageModel(SMALL, { seed: 5 });
  const { inputIds, mask, images } = batch();
  const run = async (seed: number) =>
    Array.from(
      await (await model.generate(inputIds, images, mask, {
        maxNewTokens: 5,
        temperature: 1,
        topK: 3,
        seed,
        eosTokenId: -1,
      })).data(),
    );
  assertEquals(await run(11), await run(11));
  const greedy = Array.from(
    await (await model.generate(inputIds, images, mask, { maxNewTokens: 1, greedy: true })).data(),
  );
  const topOne = Array.from(
    await (await model.generate(inputIds, images, mask, { maxNewTokens: 1, topK: 1, seed: 9 })).data(),
  );
  assertEquals(topOne, greedy); // top-k = 1 leaves only the argmax
  model.dispose();
});

Deno.test("bad input gets an error that names the problem", async () => {
  const model = new VisionLanguageModel(SMALL, { seed: 6 });
  const { inputIds, mask, images } = batch();
  assertThrows(() => model.forward(inputIds, tf.zeros([3, 3, 20, 20]), mask), Error, "[N, 3, 16, 16]");
  assertThrows(() => model.forward(inputIds, tf.zeros([3, 1, 16, 16]), mask), Error, "got [3,1,16,16]");
  assertThrows(
    () => model.forward(inputIds, images.slice([0], [2]), mask),
    Error,
    "12 <|image|> slots but the images give 8",
  );
  assertThrows(() => model.forward(inputIds.toFloat(), images, mask), Error, "int32");
  const floatTargets = tf.zeros([2, 11]);
  assertThrows(() => model.loss(inputIds, images, mask, floatTargets), Error, "targets must be an int32 [B, T] tensor");
  const long = tf.zeros([1, 40], "int32");
  assertThrows(() => model.forward(long, undefined), Error, "the prompt has 40 tokens");
  await assertRejects(
    () => model.generate(inputIds, images, mask, { maxNewTokens: 30 }),
    Error,
    "lm_max_length) is 32",
  );
  model.dispose();
});

Deno.test("vit_img_normalize feeds the ViT (x − 0.5) / 0.5, and a checkpoint keeps the setting", async () => {
  const plain = new VisionLanguageModel({ ...SMALL, vit_img_normalize: false }, { seed: 5 });
  const normalizing = new VisionLanguageModel({ ...SMALL, vit_img_normalize: true }, { seed: 5 });
  const { inputIds, mask, images } = batch();
  const shifted = images.mul(2).sub(1);
  const a = plain.forward(inputIds, shifted, mask).logits, b = normalizing.forward(inputIds, images, mask).logits;
  const c = plain.forward(inputIds, images, mask).logits;
  assert(maxAbsDiff(await a.data(), await b.data()) < 1e-6, "normalizing x is feeding 2x − 1");
  assert(maxAbsDiff(await b.data(), await c.data()) > 1e-3, "and it changes what the model sees");
  const dir = await Deno.makeTempDir();
  await savePretrained(normalizing, dir);
  assertEquals(JSON.parse(await Deno.readTextFile(`${dir}/config.json`)).vit_img_normalize, true);
  const loaded = await fromPretrained(dir);
  assertEquals(loaded.cfg.vit_img_normalize, true);
  tf.dispose([inputIds, mask, images, shifted, a, b, c]);
  [plain, normalizing, loaded].forEach((m) => m.dispose());
});

Deno.test("the fixture checkpoint saves back to the same config.json and tensors", async () => {
  const dir = await Deno.makeTempDir();
  const model = await fromPretrained(FIXTURE_DIR);
  await savePretrained(model, dir);
  model.dispose();
  const config = (path: string) => JSON.parse(Deno.readTextFileSync(path));
  assertEquals(config(`${dir}/config.json`), config(`${FIXTURE_DIR}/config.json`));
  const [ours, theirs] = [
    await readSafetensors(`${dir}/model.safetensors`),
    await readSafetensors(`${FIXTURE_DIR}/model.safetensors`),
  ];
  assertEquals([...ours.tensors.keys()].sort(), [...theirs.tensors.keys()].sort());
  assertEquals(ours.metadata, theirs.metadata);
  for (const [name, t] of theirs.tensors) assertEquals(maxAbsDiff(ours.tensors.get(name)!.data, t.data), 0, name);
});

Deno.test("checkpoint problems are named: missing files, truncation, wrong shapes, unknown keys", async () => {
  const dir = await Deno.makeTempDir();
  await assertRejects(() => fromPretrained(dir), Error, "config.json is missing");
  const model = new VisionLanguageModel(SMALL, { seed: 7 });
  await savePretrained(model, dir);
  model.dispose();
  await Deno.remove(`${dir}/model.safetensors`);
  await assertRejects(() => fromPretrained(dir), Error, "model.safetensors is missing");

  // A truncated copy of the fixture checkpoint.
  const bytes = await Deno.readFile(`${FIXTURE_DIR}/model.safetensors`);
  await Deno.copyFile(`${FIXTURE_DIR}/config.json`, `${dir}/config.json`);
  await Deno.writeFile(`${dir}/model.safetensors`, bytes.slice(0, bytes.length - 1000));
  await assertRejects(() => fromPretrained(dir), Error, "model.safetensors");

  // One tensor of the wrong shape: the key and both shapes are named.
  const file = await readSafetensors(`${FIXTURE_DIR}/model.safetensors`);
  const wrong = new Map(
    [...file.tensors].map(([k, t]) => [k, { ...t, dtype: "F32" as const, data: t.data as Float32Array }]),
  );
  wrong.set("decoder.norm.weight", { dtype: "F32", shape: [32], data: new Float32Array(32) });
  await Deno.writeFile(`${dir}/model.safetensors`, encodeSafetensors(wrong, file.metadata));
  await assertRejects(
    () => fromPretrained(dir),
    Error,
    "tensor decoder.norm.weight has shape [32] but this config needs [64]",
  );

  // An unknown config key (old nanoVLM checkpoints carry lm_eos_token_id): a warning, then it loads.
  await Deno.copyFile(`${FIXTURE_DIR}/model.safetensors`, `${dir}/model.safetensors`);
  const config = JSON.parse(await Deno.readTextFile(`${FIXTURE_DIR}/config.json`));
  await Deno.writeTextFile(`${dir}/config.json`, JSON.stringify({ ...config, lm_eos_token_id: 0 }));
  const warnings: string[] = [];
  const original = console.warn;
  console.warn = (msg: string) => warnings.push(msg);
  try {
    const loaded = await fromPretrained(dir);
    loaded.dispose();
  } finally {
    console.warn = original;
  }
  assertMatch(warnings.join("\n"), /unknown key "lm_eos_token_id"/);
  assertThrows(() => configFromJSON({ lm_hidden_dim: "wide" }), Error, '"lm_hidden_dim" should be a number');
});

Deno.test("the two checkpoint files as text and bytes (the browser's download) load back to the same logits", async () => {
  const model = new VisionLanguageModel(SMALL, { seed: 5 });
  const { config, safetensors } = await checkpointFiles(model);
  const loaded = modelFromCheckpointFiles(config, safetensors, "download");
  const { inputIds, mask, images, targets } = batch();
  const a = model.forward(inputIds, images, mask).logits, b = loaded.forward(inputIds, images, mask).logits;
  assertEquals(maxAbsDiff(await a.data(), await b.data()), 0);
  tf.dispose([a, b, inputIds, mask, images, targets]);
  loaded.dispose();
  // What a user may pick by mistake: each named.
  assertThrows(
    () => modelFromCheckpointFiles("{ nope", safetensors, "upload"),
    Error,
    "upload: config.json is not valid JSON",
  );
  assertThrows(() => modelFromCheckpointFiles("[1]", safetensors, "upload"), Error, "should hold an object");
  assertThrows(() => modelFromCheckpointFiles(config, new Uint8Array(20), "upload"), Error, "upload/model.safetensors");
  const wider = JSON.stringify({ ...JSON.parse(config), lm_hidden_dim: 2 * SMALL.lm_hidden_dim });
  assertThrows(() => modelFromCheckpointFiles(wider, safetensors, "upload"), Error, "does not fit this model's config");
  model.dispose();
});

Deno.test("the ViT's attention probe sees each block's softmax weights and changes nothing", () => {
  const model = new VisionLanguageModel(SMALL, { seed: 2 });
  const { images, ...unused } = batch();
  tf.dispose(Object.values(unused));
  const seen: { block: number; shape: number[]; rowSums: number[] }[] = [];
  const [plain, probed] = tf.tidy(() => [
    visionEncoder(model.params, SMALL, images),
    visionEncoder(model.params, SMALL, images, (block, weights) => {
      seen.push({ block, shape: weights.shape, rowSums: Array.from(weights.sum(-1).dataSync()) });
    }),
  ]);
  const Np = (SMALL.vit_img_size / SMALL.vit_patch_size) ** 2;
  assertEquals(seen.map((s) => s.block), Array.from({ length: SMALL.vit_n_blocks }, (_, i) => i));
  for (const { shape, rowSums } of seen) {
    assertEquals(shape, [images.shape[0], SMALL.vit_n_heads, Np, Np]); // [N, H, Np, Np]
    assert(rowSums.every((sum) => Math.abs(sum - 1) < 1e-5), "each patch's weights sum to 1");
  }
  assertEquals(maxAbsDiff(plain.dataSync(), probed.dataSync()), 0);
  tf.dispose([plain, probed, images]);
  model.dispose();
});
