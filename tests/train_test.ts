// train.ts: the schedule and two AdamW steps against the PyTorch reference (nanovlm-tiny-a
// fixture), then the loop's promises: the loss of a fixed batch goes down, a crash while
// writing a checkpoint leaves the previous one loadable, --resume continues exactly, a
// NaN stops the run without touching the last good checkpoint, options are type-checked.

import * as tf from "@tensorflow/tfjs";
import { type Batch, IGNORE_INDEX, loadTokenizer, shapesBatches } from "../data.ts";
import { fromPretrained } from "../lib/checkpoint.ts";
import { configFromJSON } from "../lib/state_dict.ts";
import { PRESETS, VisionLanguageModel } from "../nanovlm.ts";
import { initBackend } from "../backend/runtime.ts";
import { readSafetensors } from "../lib/safetensors.ts";
import { train } from "../train.ts";
import {
  DEFAULT_TRAIN_CONFIG,
  modelConfig,
  parseTrainArgs,
  resumedTrainConfig,
  type TrainConfig,
  visionLearningRate,
} from "../lib/train_config.ts";
import { AdamW, clipCoefficient, gradientNorm, lrSchedule, paramGroups } from "../lib/optimizer.ts";
import {
  answerWeights,
  batchTensors,
  NonFiniteError,
  shareSpacedWordEmbeddings,
  trainStep,
  trimPadding,
} from "../lib/train_step.ts";
import { loadCheckpoint, lossCurveSvg, saveCheckpoint } from "../lib/train_state.ts";
import { assert, assertEquals, assertMatch, assertRejects, assertThrows } from "./assert.ts";
import { assertNoLeak, FIXTURE_DIR, loadFixture, maxAbsDiff, MICRO, MICRO_OVERRIDES } from "./helpers.ts";

await initBackend("wasm", { quiet: true });
const SHAPES_TOKENIZER = new URL("../tokenizers/shapes", import.meta.url).pathname;
const { inputs, expected } = await loadFixture();
const fixture = (name: string) => {
  const t = inputs.get(name) ?? expected.get(name);
  if (!t) throw new Error(`fixture has no tensor ${name}`);
  return t;
};

// ---- Against the PyTorch reference ----

Deno.test("lrSchedule is the reference's get_lr (fixture train.lr_schedule)", () => {
  const table = fixture("train.lr_schedule"); // rows [step, get_lr(step, 0.00512, 5000), get_lr(step, 5e-5, 5000)]
  for (let row = 0; row < table.shape[0]; row++) {
    const [step, a, b] = Array.from(table.data.subarray(row * 3, row * 3 + 3));
    for (const [maxLr, want] of [[0.00512, a], [5e-5, b]]) {
      const got = lrSchedule(step, maxLr, 5000);
      assert(Math.abs(got - want) <= 1e-6 * maxLr, `step ${step}, max ${maxLr}: ${got} vs ${want}`);
    }
  }
});

/** The fixture's training batch as data.ts collates it. */
function fixtureBatch(): Batch {
  const ids = fixture("input_ids"), images = fixture("images");
  return {
    inputIds: Int32Array.from(ids.data),
    labels: Int32Array.from(fixture("labels").data),
    attentionMask: Int32Array.from(fixture("attention_mask").data),
    batchSize: ids.shape[0],
    length: ids.shape[1],
    images: Float32Array.from(images.data),
    imageCount: images.shape[0],
    imageCounts: Array.from(fixture("image_counts").data, Number),
    imageSize: images.shape[2],
    dropped: 0,
  };
}

// inputs.json train_steps: AdamW defaults, lr_mp 0.01, lr_backbones 0.001, clipping at 1.0. The
// fixture's README does not say whether the schedule was applied; the parameters after step 1 moved
// by ≈ 0.01 (MP) and ≈ 0.001 (the rest), which is what a first Adam step does at a constant lr
// (the schedule would have given lr·1/0.06), so both steps use the constant rates.
const PROBES = [
  "MP.proj.weight",
  "vision_encoder.patch_embedding.position_embedding",
  "vision_encoder.blocks.0.attn.qkv_proj.weight",
  "vision_encoder.blocks.1.mlp.fc2.bias",
  "decoder.token_embedding.weight",
  "decoder.blocks.0.attn.k_proj.weight",
  "decoder.norm.weight",
];
const LINEAR = new Set([
  "MP.proj.weight",
  "vision_encoder.blocks.0.attn.qkv_proj.weight",
  "decoder.blocks.0.attn.k_proj.weight",
]);
const LRS = [0.01, 0.001]; // [mp, backbones]

/** A parameter in PyTorch layout (Linear weights are stored [in, out] here). */
async function torchValues(model: VisionLanguageModel, name: string): Promise<Float32Array> {
  const p = model.params.get(name)!;
  const t = LINEAR.has(name) ? p.transpose() : p.clone();
  const values = (await t.data()) as Float32Array;
  t.dispose();
  return values;
}

Deno.test("AdamW's update is torch's: the reference's step-1 gradients give its step-1 parameters", async () => {
  // The optimizer alone, fed the fixture's own gradients (clipped as clip_grad_norm_ does), so no
  // float noise from our backward pass enters: agreement must be at float32 precision.
  const model = await fromPretrained(FIXTURE_DIR);
  const probes = new Map(PROBES.map((name) => [name, model.params.get(name)!]));
  const optimizer = new AdamW(probes, [
    { name: "mp", maxLr: LRS[0], params: ["MP.proj.weight"] },
    { name: "backbones", maxLr: LRS[1], params: PROBES.slice(1) },
  ]);
  const coef = 1 / (fixture("train.step1.grad_norm").data[0] + 1e-6);
  const grads = new Map(PROBES.map((name) => {
    const g = fixture(`train.step1.grad.${name}`);
    const torchGrad = tf.tensor(g.data as Float32Array, g.shape);
    const ours = LINEAR.has(name) ? torchGrad.transpose() : torchGrad.clone();
    torchGrad.dispose();
    return [name, ours.mul(coef)] as const;
  }));
  optimizer.step(grads, LRS);
  for (const name of PROBES) {
    const diff = maxAbsDiff(await torchValues(model, name), fixture(`train.step1.param.${name}`).data);
    assert(diff <= 1e-6, `${name}: max |diff| ${diff.toExponential(2)}`);
  }
  tf.dispose([...grads.values()]);
  optimizer.dispose();
  model.dispose();
});

Deno.test("AdamW with another β2 (the default run's 0.95) follows torch's formula over two steps", async () => {
  const [beta1, beta2, eps, wd, lr] = [0.9, 0.95, 1e-8, 0.01, 0.1];
  const p = tf.variable(tf.tensor1d([1, -2]), true, "p");
  const optimizer = new AdamW(new Map([["p", p]]), [{ name: "all", maxLr: lr, params: ["p"] }], { beta2 });
  // By hand: torch.optim.AdamW, decoupled decay, bias-corrected moments.
  const expected = [1, -2], m = [0, 0], v = [0, 0];
  for (const [t, g] of [[1, [0.5, 0.1]], [2, [-0.2, 3]]] as const) {
    for (let i = 0; i < 2; i++) {
      expected[i] *= 1 - lr * wd;
      m[i] = beta1 * m[i] + (1 - beta1) * g[i];
      v[i] = beta2 * v[i] + (1 - beta2) * g[i] ** 2;
      expected[i] -= (lr / (1 - beta1 ** t)) * m[i] / (Math.sqrt(v[i] / (1 - beta2 ** t)) + eps);
    }
    const grads = new Map([["p", tf.tensor1d([...g])]]);
    optimizer.step(grads, [lr]);
    tf.dispose([...grads.values()]);
  }
  // With 0.999 the second step would differ: v̂ of the second coordinate is 4.51 there, 4.62 here (9e-4 in p).
  assert(maxAbsDiff(await p.data(), expected) < 1e-6, `${await p.data()} vs ${expected}`);
  optimizer.dispose();
  p.dispose();
  assertThrows(() => new AdamW(new Map(), [], { beta2: 1 }), Error, "AdamW: beta2 must be in [0, 1), got 1");
});

Deno.test("two training steps match the reference: loss, gradient norm and parameters", async () => {
  const model = await fromPretrained(FIXTURE_DIR);
  const optimizer = new AdamW(model.params, paramGroups(model, LRS[0], LRS[1]));
  for (const step of [1, 2]) {
    const { loss, gradNorm } = await trainStep(model, [fixtureBatch()], optimizer, { lrs: LRS, maxGradNorm: 1 });
    const [wantLoss, wantNorm] = [
      fixture(`train.step${step}.loss`).data[0],
      fixture(`train.step${step}.grad_norm`).data[0],
    ];
    assert(Math.abs(loss - wantLoss) <= 1e-4, `step ${step} loss ${loss} vs ${wantLoss}`);
    assert(Math.abs(gradNorm - wantNorm) <= 1e-4 * wantNorm, `step ${step} grad norm ${gradNorm} vs ${wantNorm}`);
    for (const name of PROBES) {
      // Adam divides by √v: where a gradient is ~1e-7 (far below the typical 1e-4), float32 noise in
      // our backward pass (≈5e-7 absolute, like the reference's own float64 check) changes that
      // element's step by up to its lr. Those elements (few, listed by the reference's step-1
      // gradient) may differ by one lr per step; every other element must agree to 1e-5.
      const ours = await torchValues(model, name), want = fixture(`train.step${step}.param.${name}`).data;
      const grad = fixture(`train.step1.grad.${name}`).data;
      const lr = name.startsWith("MP.") ? LRS[0] : LRS[1];
      let noisy = 0;
      for (let i = 0; i < ours.length; i++) {
        const tiny = Math.abs(grad[i]) < 1e-6;
        noisy += tiny ? 1 : 0;
        const bound = tiny ? step * lr : 1e-5;
        assert(Math.abs(ours[i] - want[i]) <= bound, `step ${step} ${name}[${i}]: ${ours[i]} vs ${want[i]}`);
      }
      assert(noisy <= 0.01 * ours.length, `${name}: ${noisy} near-zero gradients`);
    }
  }
  optimizer.dispose();
  model.dispose();
});

// ---- Pieces ----

Deno.test("gradientNorm + clipCoefficient: torch's clip_grad_norm_ (global norm, scale by max/(norm+1e-6))", async () => {
  const grads = new Map([["a", tf.tensor1d([3, 0])], ["b", tf.tensor1d([0, 4])]]);
  const normTensor = gradientNorm(grads);
  const norm = (await normTensor.data())[0];
  normTensor.dispose();
  assertEquals(norm, 5);
  assertEquals(clipCoefficient(norm, 10), 1); // under the limit: untouched
  assertEquals(clipCoefficient(norm, 0), 1); // 0 = no clipping
  assertEquals(Array.from(await grads.get("a")!.data()), [3, 0]); // measuring the norm leaves the gradients alone
  assertEquals(Array.from(await grads.get("b")!.data()), [0, 4]);
  // Over the limit: AdamW.step multiplies each gradient by the coefficient as it reads it (its gradScale).
  const coef = clipCoefficient(norm, 1);
  const scaled = [...await grads.get("a")!.data(), ...await grads.get("b")!.data()].map((g) => g * coef);
  assert(maxAbsDiff(scaled, [0.6, 0, 0, 0.8]) < 1e-6, `${scaled}`);
  tf.dispose([...grads.values()]);
});

Deno.test("gradientNorm adds 20M squares where a float32 running sum would stop at 2^24", async () => {
  // The 222M's embedding gradient alone has 47M elements: a sum of squares kept in one float32 stops growing once
  // each square is below half its spacing. Here 2e7 ones: such a sum stays at 16,777,216 (a norm of 4,096).
  const grads = new Map([["big", tf.ones([20_000_000])], ["small", tf.tensor1d([3, 4])]]);
  const norm = gradientNorm(grads);
  const expected = Math.sqrt(2e7 + 25);
  const got = (await norm.data())[0];
  assert(Math.abs(got - expected) <= 1e-5 * expected, `norm ${got}, expected ${expected}`);
  tf.dispose([norm, ...grads.values()]);
});

Deno.test("AdamW.step's gradScale is the same as scaling the gradients first, moments on the heap or host", async () => {
  // Adam's step hardly depends on the gradients' scale (m / √v), its moments do: compare those.
  const run = async (scale: number, scaleFirst: boolean, momentsOnHost: boolean) => {
    const p = tf.variable(tf.tensor1d([1, -2, 0.5]), true, "p");
    const optimizer = new AdamW(new Map([["p", p]]), [{ name: "all", maxLr: 0.1, params: ["p"] }], { momentsOnHost });
    for (const g of [[0.5, 0.1, -3], [-0.2, 3, 1]]) {
      const grads = new Map([["p", tf.tensor1d(scaleFirst ? g.map((x) => x * scale) : g)]]);
      optimizer.step(grads, [0.1], scaleFirst ? 1 : scale);
      tf.dispose([...grads.values()]);
    }
    const state = await optimizer.state();
    const values = [...state.get("exp_avg.p")!.data, ...state.get("exp_avg_sq.p")!.data, ...await p.data()];
    optimizer.dispose();
    p.dispose();
    return values;
  };
  for (const onHost of [false, true]) {
    const [first, inStep, unscaled] = [
      await run(0.25, true, onHost),
      await run(0.25, false, onHost),
      await run(1, false, onHost),
    ];
    assert(maxAbsDiff(first, inStep) < 1e-7, `momentsOnHost ${onHost}: ${first} vs ${inStep}`);
    assert(maxAbsDiff(first, unscaled) > 0.01, `momentsOnHost ${onHost}: the scale changed nothing`);
  }
  assertEquals(clipCoefficient(5, 1), 1 / (5 + 1e-6));
  assertEquals([clipCoefficient(0.5, 1), clipCoefficient(5, 0)], [1, 1]);
});

Deno.test("paramGroups: MP vs backbones; lr_backbones = 0 leaves the backbones out (frozen)", () => {
  const model = new VisionLanguageModel(MICRO);
  const [mp, backbones] = paramGroups(model, 1e-3, 1e-4);
  assertEquals(mp.params, ["MP.proj.weight"]);
  assertEquals(backbones.params.length, model.params.size - 1);
  assertEquals(paramGroups(model, 1e-3, 0).map((g) => g.name), ["mp"]);
  model.dispose();
});

Deno.test("paramGroups with a vision rate of its own: the ViT is a group apart, and at 0 a step leaves it as it was", async () => {
  const model = new VisionLanguageModel(MICRO, { seed: 1 });
  const names = [...model.params.keys()];
  const vision = names.filter((n) => n.startsWith("vision_encoder."));
  const groups = paramGroups(model, 1e-3, 1e-3, 1e-4);
  assertEquals(groups.map((g) => [g.name, g.maxLr]), [["mp", 1e-3], ["vision", 1e-4], ["decoder", 1e-3]]);
  assertEquals(groups[1].params, vision);
  assertEquals(groups.flatMap((g) => g.params).sort(), names.toSorted());
  assertEquals(paramGroups(model, 1e-3, 1e-3, 1e-3).map((g) => g.name), ["mp", "backbones"], "the reference's two");
  assertEquals(paramGroups(model, 1e-3, 0, 1e-4).map((g) => g.name), ["mp", "vision"], "decoder frozen");

  const tokenizer = await loadTokenizer(SHAPES_TOKENIZER);
  const batch = shapesBatches({ split: "train", seed: 3, batchSize: 4, tokenizer, config: MICRO }).next().value!;
  const optimizer = new AdamW(model.params, paramGroups(model, 3e-3, 3e-3, 0));
  const decoderName = names.find((n) => n.startsWith("decoder.blocks."))!;
  const before = (name: string) => model.params.get(name)!.dataSync().slice();
  const [vitBefore, decoderBefore] = [before(vision[0]), before(decoderName)];
  await trainStep(model, [batch], optimizer, { lrs: [3e-3, 3e-3] });
  assertEquals(model.params.get(vision[0])!.dataSync(), vitBefore, "the frozen ViT");
  const decoderAfter = model.params.get(decoderName)!.dataSync();
  assert(decoderAfter.some((value, i) => value !== decoderBefore[i]), "the decoder trains");
  optimizer.dispose();
  model.dispose();
});

Deno.test("a run saved before lr_vision_backbone, choice_names_option and copy drills existed resumes as it trained", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const { lr_vision_backbone: _, choice_names_option: __, choice_copy_drills: ___, ...before } = DEFAULT_TRAIN_CONFIG;
    await Deno.writeTextFile(`${dir}/train_config.json`, JSON.stringify(before));
    const resumedOld = await resumedTrainConfig(dir, {});
    assertEquals(resumedOld.lr_vision_backbone, -1, "one rate for both backbones");
    assertEquals(resumedOld.choice_names_option, false, "bare-letter answers");
    assertEquals(resumedOld.choice_copy_drills, 0, "no copy drills");
    await Deno.writeTextFile(`${dir}/train_config.json`, JSON.stringify(DEFAULT_TRAIN_CONFIG));
    const resumedNew = await resumedTrainConfig(dir, {});
    assertEquals(resumedNew.lr_vision_backbone, DEFAULT_TRAIN_CONFIG.lr_vision_backbone);
    assertEquals(resumedNew.choice_names_option, true);
    assertEquals(resumedNew.choice_copy_drills, 0.25);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("copy drills without answers that name their option, or outside [0, 1], are errors before a run is made", async () => {
  const runs_dir = await Deno.makeTempDir();
  try {
    const quiet = { log: () => {} };
    await assertRejects(
      () => train({ runs_dir, run_name: "letters", choice_names_option: false }, {}, quiet),
      Error,
      "--choice_copy_drills=0.25 drills answers that name their option, and --choice_names_option=false answers with " +
        "a bare letter: add --choice_copy_drills=0",
    );
    await assertRejects(
      () => train({ runs_dir, run_name: "share", choice_copy_drills: 2 }, {}, quiet),
      Error,
      "--choice_copy_drills=2: expected a share in [0, 1]",
    );
    assertEquals([...Deno.readDirSync(runs_dir)], [], "no run folder");
  } finally {
    await Deno.remove(runs_dir, { recursive: true });
  }
});

Deno.test("trimPadding drops all-padding columns and keeps the loss (RoPE sees only distances)", async () => {
  const model = await fromPretrained(FIXTURE_DIR);
  const full = fixtureBatch(), trimmed = trimPadding(full);
  assert(trimmed.length < full.length, `${trimmed.length}`);
  const lossOf = async (b: Batch) => {
    const ids = tf.tensor2d(b.inputIds, [b.batchSize, b.length], "int32");
    const mask = tf.tensor2d(b.attentionMask, [b.batchSize, b.length], "int32");
    const labels = tf.tensor2d(b.labels, [b.batchSize, b.length], "int32");
    const images = tf.tensor4d(b.images, [b.imageCount, 3, b.imageSize, b.imageSize]);
    const { logits, loss } = model.forward(ids, images, mask, labels);
    const value = (await loss!.data())[0];
    tf.dispose([ids, mask, labels, images, logits, loss!]);
    return value;
  };
  const [a, b] = [await lossOf(full), await lossOf(trimmed)];
  assert(Math.abs(a - b) < 1e-5, `${a} vs ${b}`);
  assert(Math.abs(a - fixture("loss").data[0]) < 1e-4);
  model.dispose();
});

// ---- Training on a micro model ----

const MICRO_TRAIN: Partial<TrainConfig> = {
  backend: "wasm",
  batch_size: 4,
  max_training_steps: 6,
  eval_interval: 3,
  val_samples: 4,
  val_questions: 4,
  test_examples: 0,
  lr_mp: 3e-3,
  lr_backbones: 3e-3,
};
const quiet = { log: () => {} };

Deno.test("the loss of a fixed batch falls during 30 steps, and steps leak no tensors", async () => {
  const tokenizer = await loadTokenizer(SHAPES_TOKENIZER);
  const batch = shapesBatches({ split: "train", seed: 3, batchSize: 8, tokenizer, config: MICRO }).next().value!;
  const model = new VisionLanguageModel(MICRO, { seed: 1 });
  const optimizer = new AdamW(model.params, paramGroups(model, 3e-3, 3e-3));
  const losses: number[] = [];
  let tensorsAfterFirst = 0;
  for (let step = 0; step < 30; step++) {
    losses.push((await trainStep(model, [batch], optimizer, { lrs: [3e-3, 3e-3] })).loss);
    if (step === 0) tensorsAfterFirst = tf.memory().numTensors;
  }
  assertEquals(tf.memory().numTensors, tensorsAfterFirst);
  assert(losses[29] < 0.5 * losses[0], `loss ${losses[0].toFixed(3)} → ${losses[29].toFixed(3)}`);
  optimizer.dispose();
  model.dispose();
});

Deno.test("shareSpacedWordEmbeddings starts 'red' from the row of ' red' and leaves every other row alone", async () => {
  const tokenizer = await loadTokenizer(SHAPES_TOKENIZER);
  const model = new VisionLanguageModel(MICRO, { seed: 1 });
  const embedding = model.params.get("decoder.token_embedding.weight")!;
  const before = await embedding.array() as number[][];
  let pairs = 0;
  await assertNoLeak(() => {
    pairs = shareSpacedWordEmbeddings(model, tokenizer);
  });
  const after = await embedding.array() as number[][];
  const id = (token: string) => tokenizer.tokenToId(token)!;
  // The shapes vocabulary's 22 words in both spellings: a, the colours, shapes (and plurals), sizes, places, numbers.
  assertEquals(pairs, 22);
  for (const word of ["red", "triangles", "top left", "four", "a"]) {
    assertEquals(after[id(word)], before[id(" " + word)]);
  }
  const changed = after.filter((row, i) => row.some((x, j) => x !== before[i][j])).length;
  assertEquals(changed, 22);
  for (const token of [" red", "yes", "A", "<|im_end|>"]) assertEquals(after[id(token)], before[id(token)]);
  model.dispose();
});

/** One batch of 12 shapes-world samples, and the same 12 sorted by length into two micro-batches of 6. */
async function wholeAndSortedHalves(): Promise<{ whole: Batch; halves: Batch[] }> {
  const tokenizer = await loadTokenizer(SHAPES_TOKENIZER);
  const options = { split: "train" as const, seed: 3, tokenizer, config: MICRO, captionWeight: 2 };
  const [whole] = shapesBatches({ ...options, batchSize: 12 });
  return { whole, halves: [...shapesBatches({ ...options, batchSize: 6, lengthBuckets: 2, count: 12 })] };
}

/** One training step of a fresh MICRO model (seed 1) on these micro-batches: its result and a weight after it. */
async function stepFromInit(batches: Batch[], options: { maxGradNorm?: number; answerFloor?: number } = {}) {
  const model = new VisionLanguageModel(MICRO, { seed: 1 });
  const optimizer = new AdamW(model.params, paramGroups(model, 1e-3, 1e-3));
  const result = await trainStep(model, batches, optimizer, { lrs: [1e-3, 1e-3], ...options });
  const weights = await model.params.get("decoder.blocks.0.attn.q_proj.weight")!.data();
  optimizer.dispose();
  model.dispose();
  return { ...result, weights };
}

Deno.test("micro-batches sorted by length make the same step as one batch: loss, norm and weights", async () => {
  const { whole, halves } = await wholeAndSortedHalves();
  // The sorted halves differ in length and in trained tokens: dividing each half's mean by 2 would not match.
  assert(trimPadding(halves[0]).length < trimPadding(halves[1]).length);
  const trained = (b: Batch) => b.labels.filter((l) => l !== IGNORE_INDEX).length;
  assert(trained(halves[0]) !== trained(halves[1]), `${trained(halves[0])} and ${trained(halves[1])} trained tokens`);
  const one = await stepFromInit([whole], { maxGradNorm: 0.5 }), two = await stepFromInit(halves, { maxGradNorm: 0.5 });
  assert(Math.abs(one.loss - two.loss) < 1e-5, `loss ${one.loss} vs ${two.loss}`);
  assert(Math.abs(one.gradNorm - two.gradNorm) < 1e-4 * one.gradNorm, `norm ${one.gradNorm} vs ${two.gradNorm}`);
  assert(one.gradNorm > 0.5); // clipped: the scale came from the norm both ways
  assert(maxAbsDiff(one.weights, two.weights) < 1e-6, `weights differ by ${maxAbsDiff(one.weights, two.weights)}`);
});

Deno.test("answerWeights: a short answer weighs `floor` tokens; trainStep takes the weighted mean, split or not", async () => {
  const I = IGNORE_INDEX;
  // Rows: 3 trained tokens, 6 trained tokens, none. T = 7.
  const labels = new Int32Array([I, I, I, I, 5, 6, 7, I, 1, 2, 3, 4, 5, 6, I, I, I, I, I, I, I]);
  assertEquals([...answerWeights(labels, 3, 7, 12)], [0, 0, 0, 0, 4, 4, 4, 0, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0]);
  assertEquals([...answerWeights(labels, 3, 7, 4)].slice(4, 14), [
    ...new Float32Array([4 / 3, 4 / 3, 4 / 3, 0, 1, 1, 1, 1, 1, 1]),
  ]);
  assertEquals([...answerWeights(labels, 3, 7, 0)], [...labels].map((l) => (l === I ? 0 : 1)));

  const { whole, halves } = await wholeAndSortedHalves();
  // The expected loss by hand: per-token cross-entropy of the initial model, weighted by answerWeights.
  const expected = await (async () => {
    const model = new VisionLanguageModel(MICRO, { seed: 1 });
    const batch = trimPadding(whole), t = batchTensors(batch);
    const logProbs = tf.tidy(() => tf.logSoftmax(model.forward(t.inputIds, t.images, t.attentionMask).logits));
    const rows = (await logProbs.array()) as number[][][];
    tf.dispose([logProbs, ...Object.values(t)]);
    model.dispose();
    const weights = answerWeights(batch.labels, batch.batchSize, batch.length, 12);
    let sum = 0, total = 0, plain = 0, count = 0;
    batch.labels.forEach((label, i) => {
      if (label === IGNORE_INDEX) return;
      const ce = -rows[Math.floor(i / batch.length)][i % batch.length][label];
      [sum, total, plain, count] = [sum + weights[i] * ce, total + weights[i], plain + ce, count + 1];
    });
    return { weighted: sum / total, plain: plain / count };
  })();
  const one = await stepFromInit([whole], { answerFloor: 12 }), two = await stepFromInit(halves, { answerFloor: 12 });
  const plain = await stepFromInit([whole]);
  assert(Math.abs(one.loss - expected.weighted) < 1e-4, `loss ${one.loss} vs ${expected.weighted} by hand`);
  assert(Math.abs(plain.loss - expected.plain) < 1e-4, `loss ${plain.loss} vs ${expected.plain} by hand`);
  assert(Math.abs(expected.weighted - expected.plain) > 1e-3, "the floor changes the loss of this batch");
  assert(Math.abs(one.loss - two.loss) < 1e-5, `loss ${one.loss} vs ${two.loss}`);
  assert(maxAbsDiff(one.weights, two.weights) < 1e-6, `weights differ by ${maxAbsDiff(one.weights, two.weights)}`);
});

Deno.test("a non-finite loss throws NonFiniteError and leaves weights and optimizer untouched", async () => {
  const model = new VisionLanguageModel(MICRO, { seed: 1 });
  const optimizer = new AdamW(model.params, paramGroups(model, 1e-3, 1e-3));
  const tokenizer = await loadTokenizer(SHAPES_TOKENIZER);
  const batch = shapesBatches({ split: "train", seed: 3, batchSize: 2, tokenizer, config: MICRO }).next().value!;
  batch.images[5] = NaN; // one poisoned pixel
  const before = await model.params.get("MP.proj.weight")!.data();
  await assertRejects(() => trainStep(model, [batch], optimizer, { lrs: [1e-3, 1e-3] }), NonFiniteError, "NaN");
  assertEquals(await model.params.get("MP.proj.weight")!.data(), before);
  assertEquals(optimizer.stepCount, 0);
  optimizer.dispose();
  model.dispose();
});

Deno.test("a training step reads from the device once: loss and gradient norm together", async () => {
  const tokenizer = await loadTokenizer(SHAPES_TOKENIZER);
  const batch = shapesBatches({ split: "train", seed: 3, batchSize: 2, tokenizer, config: MICRO }).next().value!;
  const model = new VisionLanguageModel(MICRO, { seed: 1 });
  const optimizer = new AdamW(model.params, paramGroups(model, 1e-3, 1e-3));
  // Record every read of a tensor; int32 dataSync is forward's look at token ids that were made on the host.
  const proto = tf.Tensor.prototype, { data, dataSync } = proto, reads: string[] = [];
  proto.data = function (this: tf.Tensor) {
    reads.push(`data ${this.dtype} [${this.shape}]`);
    return data.call(this);
  } as typeof data;
  proto.dataSync = function (this: tf.Tensor) {
    if (this.dtype !== "int32") reads.push(`dataSync ${this.dtype} [${this.shape}]`);
    return dataSync.call(this);
  } as typeof dataSync;
  try {
    await trainStep(model, [batch], optimizer, { lrs: [1e-3, 1e-3], maxGradNorm: 1e-3 }); // clipping on
  } finally {
    Object.assign(proto, { data, dataSync });
  }
  assertEquals(reads, ["data float32 [2]"]);
  optimizer.dispose();
  model.dispose();
});

async function withTempDir(fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "nanovlm-train-test-" });
  try {
    await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

Deno.test("a crash while writing a checkpoint leaves the previous one loadable", async () => {
  await withTempDir(async (dir) => {
    const tokenizer = await loadTokenizer(SHAPES_TOKENIZER);
    const batch = shapesBatches({ split: "train", seed: 3, batchSize: 2, tokenizer, config: MICRO }).next().value!;
    const model = new VisionLanguageModel(MICRO, { seed: 1 });
    const optimizer = new AdamW(model.params, paramGroups(model, 1e-3, 1e-3));
    const state = { step: 1, examples_seen: 2, best_val_loss: null, elapsed_seconds: 1 };
    await trainStep(model, [batch], optimizer, { lrs: [1e-3, 1e-3] });
    await saveCheckpoint(`${dir}/latest`, model, { optimizer, state });
    const saved = await model.params.get("MP.proj.weight")!.data();

    // Step 2, then a "crash" halfway through writing the optimizer file of the new checkpoint.
    await trainStep(model, [batch], optimizer, { lrs: [1e-3, 1e-3] });
    const crash = async (path: string, data: Uint8Array | string) => {
      const bytes = typeof data === "string" ? new TextEncoder().encode(data) : data;
      await Deno.writeFile(path, bytes.subarray(0, bytes.length >> 1));
      throw new Error("simulated crash");
    };
    await assertRejects(
      () => saveCheckpoint(`${dir}/latest`, model, { optimizer, state: { ...state, step: 2 } }, { writeFile: crash }),
      Error,
      "simulated crash",
    );
    const restored = await loadCheckpoint(`${dir}/latest`, 1e-3, 1e-3);
    assertEquals(restored.state.step, 1);
    assertEquals(restored.optimizer.stepCount, 1);
    assertEquals(await restored.model.params.get("MP.proj.weight")!.data(), saved);
    restored.optimizer.dispose();
    restored.model.dispose();

    // A crash between the two renames of the swap: latest/ was moved aside and is put back.
    await Deno.rename(`${dir}/latest`, `${dir}/latest.previous`);
    await Deno.mkdir(`${dir}/latest.partial`);
    const again = await loadCheckpoint(`${dir}/latest`, 1e-3, 1e-3);
    assertEquals(again.state.step, 1);
    again.optimizer.dispose();
    again.model.dispose();

    // A folder without its files says which one is missing.
    await Deno.remove(`${dir}/latest/optimizer.safetensors`);
    await assertRejects(() => loadCheckpoint(`${dir}/latest`, 1e-3, 1e-3), Error, "optimizer.safetensors is missing");
    optimizer.dispose();
    model.dispose();
  });
});

Deno.test("--resume continues step count, schedule and data: 3 + 3 steps equal 6 straight", async () => {
  await withTempDir(async (dir) => {
    const straight = await train({ ...MICRO_TRAIN, runs_dir: dir, run_name: "straight" }, MICRO_OVERRIDES, quiet);
    const half = await train({ ...MICRO_TRAIN, runs_dir: dir, run_name: "split", stop_at: 3 }, MICRO_OVERRIDES, quiet);
    assertEquals(half.steps, 3);
    const lines: string[] = [];
    const resumed = await train({ resume: `${dir}/split` }, {}, { log: (l) => lines.push(l) });
    assert(lines.some((l) => l.startsWith("resuming") && l.includes("at step 3")), lines.join("\n"));
    assertEquals(resumed.steps, 6);
    assertEquals(resumed.finalLoss, straight.finalLoss);

    // Identical metrics (losses, learning rates, gradient norms) and identical weights.
    const metrics = async (run: string) =>
      (await Deno.readTextFile(`${dir}/${run}/metrics.jsonl`)).trim().split("\n").map((l) => {
        const { ms: _ms, ...rest } = JSON.parse(l);
        return rest;
      });
    assertEquals(await metrics("split"), await metrics("straight"));
    const weights = async (run: string) => (await readSafetensors(`${dir}/${run}/latest/model.safetensors`)).tensors;
    const [a, b] = [await weights("straight"), await weights("split")];
    for (const [name, t] of a) assertEquals(b.get(name)!.data, t.data, name);

    // The run folder has everything the README promises.
    for (const file of ["config.json", "train_config.json", "metrics.jsonl", "loss.svg", "best/model.safetensors"]) {
      await Deno.stat(`${dir}/split/${file}`);
    }
    // 6 steps of 2 micro-batches of 4 (the default accumulation, sorted by length): resumed at a window's start.
    assertEquals(JSON.parse(await Deno.readTextFile(`${dir}/split/latest/trainer_state.json`)).examples_seen, 48);
  });
});

Deno.test("a NaN stops the run with the step named; the last good checkpoint stays", async () => {
  await withTempDir(async (dir) => {
    const run = `${dir}/nan`;
    await train({ ...MICRO_TRAIN, runs_dir: dir, run_name: "nan", stop_at: 3 }, MICRO_OVERRIDES, quiet);
    const good = (await readSafetensors(`${run}/latest/model.safetensors`)).tensors.get("MP.proj.weight")!.data;
    // Resume with an absurd learning rate: step 4's update makes the weights ~1e37, step 5's loss overflows.
    const error = await train({ resume: run, lr_mp: 1e38 }, {}, quiet).then(() => undefined, (e) => e);
    assert(error instanceof NonFiniteError, `${error}`);
    assertMatch(error.message, /^step 5: loss (NaN|Infinity), gradient norm \S+ is not finite/);
    assert(error.message.includes(`the last good checkpoint, ${run}/latest, is untouched`), error.message);
    assertEquals(JSON.parse(await Deno.readTextFile(`${run}/latest/trainer_state.json`)).step, 3);
    assertEquals((await readSafetensors(`${run}/latest/model.safetensors`)).tensors.get("MP.proj.weight")!.data, good);
  });
});

// ---- Options ----

Deno.test("parseTrainArgs: typed --key=value for train and model settings; unknown keys list the valid ones", () => {
  const { train, model } = parseTrainArgs([
    "--lr_mp=1e-3",
    "--batch_size",
    "8",
    "--lm_n_blocks=2",
    "--lm_tie_weights=false",
  ]);
  assertEquals(train, { lr_mp: 1e-3, batch_size: 8 });
  assertEquals(model, { lm_n_blocks: 2, lm_tie_weights: false });
  assertThrows(() => parseTrainArgs(["--lr=1"]), Error, "Training options: --preset --lr_mp --lr_backbones");
  assertThrows(() => parseTrainArgs(["--lr=1"]), Error, "--vit_hidden_dim");
  assertThrows(() => parseTrainArgs(["--lr_mp=fast"]), Error, "--lr_mp=fast: expected a number");
  assertThrows(() => parseTrainArgs(["--batch_size=2.5"]), Error, "--batch_size=2.5: expected an integer");
  assertThrows(() => parseTrainArgs(["--vit_cls_flag=yes"]), Error, "expected true or false");
  assertEquals(parseTrainArgs(["--prompt_loss=options"]).train, { prompt_loss: "options" });
  assertThrows(() => parseTrainArgs(["--lr_vision_backbone=-2"]), Error, "expected a learning rate ≥ 0, or -1");
  // The ViT's own rate is for a pretrained ViT: the run's first stage, or SigLIP's weights; from nothing, the decoder's.
  const settings = (train: Partial<TrainConfig>) => ({ ...DEFAULT_TRAIN_CONFIG, lr_backbones: 1e-3, ...train });
  const tiny = PRESETS.tiny;
  assertEquals(visionLearningRate(settings({ lr_vision_backbone: 1e-4 }), tiny), 1e-4);
  assertEquals(visionLearningRate(settings({ lr_vision_backbone: 0 }), tiny), 0, "frozen");
  assertEquals(visionLearningRate(settings({ lr_vision_backbone: -1 }), tiny), 1e-3);
  assertEquals(visionLearningRate(settings({ lr_vision_backbone: 1e-4, vision_pretrain_steps: 0 }), tiny), 1e-3);
  assertEquals(visionLearningRate(settings({ lr_vision_backbone: 1e-4, data: "a.jsonl" }), tiny), 1e-3);
  assertEquals(
    visionLearningRate(settings({ lr_vision_backbone: 1e-4, data: "a.jsonl" }), PRESETS["nanovlm-222m"]),
    1e-4,
  );
  assertThrows(
    () => parseTrainArgs(["--prompt_loss=some"]),
    Error,
    "--prompt_loss=some: expected one of none, options, all",
  );
  assertThrows(() => modelConfig("huge"), Error, 'unknown preset "huge": use one of nanovlm-222m, nanovlm-450m, tiny');
  assertThrows(() => modelConfig("tiny", { mp_image_token_length: 3 }), Error, "mp_image_token_length is 3");
});

Deno.test("the tiny preset fits the shapes tokenizer and its longest sample", async () => {
  const tokenizer = await loadTokenizer(SHAPES_TOKENIZER);
  const tiny = PRESETS.tiny;
  assertEquals([tiny.lm_base_vocab_size, tiny.lm_vocab_size], [tokenizer.baseVocabSize, tokenizer.vocabSize]);
  let dropped = 0;
  for (const batch of shapesBatches({ split: "train", seed: 0, batchSize: 64, tokenizer, config: tiny, count: 2000 })) {
    dropped += batch.dropped;
  }
  assertEquals(dropped, 0);
  assert(configFromJSON({ ...tiny }).lm_max_length === tiny.lm_max_length);
});

Deno.test("lossCurveSvg draws the training line and one dot per eval", () => {
  const svg = lossCurveSvg([{ step: 1, loss: 3 }, { step: 2, loss: 2 }, { step: 2, val_loss: 2.5 }], "run");
  assert(svg.startsWith("<svg") && svg.includes("run"));
  assertEquals(svg.match(/<polyline points="([^"]*)"/)![1].split(" ").length, 2);
  assertEquals(svg.match(/<circle/g)?.length, 1);
});
