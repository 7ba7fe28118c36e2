// Low-memory training, what lets the 222M preset train inside the wasm heap's 4 GiB:
// activation checkpointing (backend/low_memory.ts `recomputeInBackward`, `useActivationCheckpointing`)
// gives the plain gradients on wasm and cpu, leaks nothing and changes no forward or
// generation; AdamW with its moments in JS memory (`momentsOnHost`) gives the tensor
// AdamW's weights and state; and `train` switches both on (`--low_memory`), resumes
// exactly. Run: deno test -A tests/low_memory_test.ts

import * as tf from "@tensorflow/tfjs";
import { assert, assertEquals, assertThrows } from "./assert.ts";
import type { Batch } from "../data.ts";
import { PRESETS, VisionLanguageModel, type VLMConfig } from "../nanovlm.ts";
import { initBackend } from "../backend/runtime.ts";
import { SimdAdamW } from "../backend/kernels.ts";
import { readSafetensors } from "../lib/safetensors.ts";
import { recomputeInBackward, useActivationCheckpointing } from "../backend/low_memory.ts";
import { train } from "../train.ts";
import type { TrainConfig } from "../lib/train_config.ts";
import { AdamW, paramGroups } from "../lib/optimizer.ts";
import { lowMemoryTraining, trainStep } from "../lib/train_step.ts";
import { assertNoLeak, maxAbsDiff, MICRO_OVERRIDES, SMALL } from "./helpers.ts";

await initBackend("wasm", { quiet: true });

/** 2 ViT blocks and 3 decoder blocks (GQA, left padding), 2 images of 16×16 with 4 image tokens each. */
const small: VLMConfig = { ...SMALL, vit_n_blocks: 2, lm_n_blocks: 3 };
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
  useActivationCheckpointing(model, checkpoint);
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

Deno.test("activation checkpointing changes neither the logits nor what generate picks", async () => {
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
  useActivationCheckpointing(model);
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

// ---- AdamW with its moments in JS memory ----

/** The batch above as data.ts's collator makes it (for trainStep). */
function collated(): Batch {
  const t = batch();
  const out: Batch = {
    inputIds: t.inputIds.dataSync() as Int32Array,
    labels: t.targets.dataSync() as Int32Array,
    attentionMask: t.mask.dataSync() as Int32Array,
    batchSize: 2,
    length: 10,
    images: t.images.dataSync() as Float32Array,
    imageCount: 2,
    imageCounts: [1, 1],
    imageSize: 16,
    dropped: 0,
  };
  tf.dispose(Object.values(t));
  return out;
}

/** Largest difference between two models' weights, and the parameter where it is. */
function weightDiff(a: VisionLanguageModel, b: VisionLanguageModel): { diff: number; name: string } {
  let worst = { diff: 0, name: "" };
  for (const [name, v] of a.params) {
    const diff = maxAbsDiff(v.dataSync(), b.params.get(name)!.dataSync());
    if (!(diff <= worst.diff)) worst = { diff, name };
  }
  return worst;
}

for (const backend of ["wasm", "cpu"]) {
  Deno.test(`${backend}: SimdAdamW updates 4 lanes and a tail of 3 as AdamW's formula in float64 (float32 rounding)`, async () => {
    await tf.setBackend(backend);
    const n = 7, at = (i: number, scale: number) => scale * Math.sin(i + scale);
    const [p, g] = [
      tf.tensor1d(Array.from({ length: n }, (_, i) => at(i, 1))),
      tf.tensor1d(Array.from({ length: n }, (_, i) => at(i, 0.01))),
    ];
    const adam = new SimdAdamW(new Map([["other", 5], ["p", n]]));
    const { m, v } = adam.state("p");
    m.set(Array.from({ length: n }, (_, i) => at(i, 0.001)));
    v.set(Array.from({ length: n }, (_, i) => at(i, 1e-5) ** 2));
    const [m0, v0] = [Array.from(m), Array.from(v)];
    const c = { gradScale: 0.5, beta1: 0.9, beta2: 0.999, decay: 1 - 1e-4, stepSize: 0.01, invBc2Sqrt: 3, eps: 1e-8 };
    const before = tf.memory().numTensors;
    const w = adam.step("p", p, g, c);
    assertEquals(tf.memory().numTensors, before + 1, "one new tensor, the weight");
    const [pv, gv, wv] = [await p.data(), await g.data(), await w.data()];
    for (let i = 0; i < n; i++) {
      const gi = gv[i] * c.gradScale, mi = c.beta1 * m0[i] + (1 - c.beta1) * gi;
      const vi = c.beta2 * v0[i] + (1 - c.beta2) * gi * gi;
      const wi = pv[i] * c.decay - c.stepSize * mi / (Math.sqrt(vi) * c.invBc2Sqrt + c.eps);
      const close = (got: number, want: number) => Math.abs(got - want) <= 1e-6 * Math.abs(want);
      assert(
        close(m[i], mi) && close(v[i], vi) && close(wv[i], wi),
        `element ${i}: ${[m[i], v[i], wv[i]]} vs ${[mi, vi, wi]}`,
      );
    }
    assertEquals(Array.from(adam.state("other").m), [0, 0, 0, 0, 0], "another parameter's moments untouched");
    assertEquals(Array.from(await p.data()), Array.from(pv), "the old weight is unchanged");
    assertThrows(
      () => adam.step("p", tf.zeros([8]), tf.zeros([8]), c),
      Error,
      "p needs float32 weight and gradient of 7 values",
    );
    const tooLarge = new Map([["embedding", 600_000_000]]); // 4.5 GiB of moments: refused before allocating
    assertThrows(() => new SimdAdamW(tooLarge), Error, "train a model this large on the WebGPU backend");
    tf.dispose([p, g, w]);
    await tf.setBackend("wasm");
  });

  Deno.test(`${backend}: momentsOnHost gives the tensor AdamW's weights and moments after 3 steps (to 1e-6)`, async () => {
    await tf.setBackend(backend);
    const [a, b] = [new VisionLanguageModel(small, { seed: 3 }), new VisionLanguageModel(small, { seed: 3 })];
    const onHeap = new AdamW(a.params, paramGroups(a, 1e-2, 1e-3));
    const onHost = new AdamW(b.params, paramGroups(b, 1e-2, 1e-3), { momentsOnHost: true });
    const data = collated();
    for (let step = 0; step < 3; step++) {
      const lrs = [1e-2 / (step + 1), 1e-3 / (step + 1)];
      const tensorsBefore = tf.memory().numTensors;
      // A low clipping limit, so that both apply the clip coefficient as they read the gradients.
      const { gradNorm } = await trainStep(a, [data], onHeap, { lrs, maxGradNorm: 0.05 });
      await trainStep(b, [data], onHost, { lrs, maxGradNorm: 0.05 });
      assert(gradNorm > 0.05, `step ${step} was not clipped: gradient norm ${gradNorm}`);
      if (step > 0) assertEquals(tf.memory().numTensors, tensorsBefore, "no tensor leaks");
    }
    const { diff, name } = weightDiff(a, b);
    assert(diff <= 1e-6, `weights differ by ${diff} at ${name}`);
    const [heapState, hostState] = [await onHeap.state(), await onHost.state()];
    assertEquals([...hostState.keys()].sort(), [...heapState.keys()].sort());
    for (const [key, t] of heapState) {
      assert(maxAbsDiff(hostState.get(key)!.data, t.data) <= 1e-6, `${key} differs`);
    }
    // Moments saved by one kind load into the other: one more step each stays equal.
    const [c, d] = [new AdamW(a.params, onHeap.groups), new AdamW(b.params, onHost.groups, { momentsOnHost: true })];
    c.loadState(hostState, 3);
    d.loadState(heapState, 3);
    await trainStep(a, [data], c, { lrs: [1e-3, 1e-4] });
    await trainStep(b, [data], d, { lrs: [1e-3, 1e-4] });
    assert(weightDiff(a, b).diff <= 1e-6, "after swapping the saved moments");
    for (const x of [onHeap, onHost, c, d, a, b]) x.dispose();
    await tf.setBackend("wasm");
  });
}

Deno.test("lowMemoryTraining: auto means wasm and a model whose training state would fill half the heap", () => {
  assertEquals(lowMemoryTraining("auto", "wasm", PRESETS["nanovlm-222m"]), true);
  assertEquals(lowMemoryTraining("auto", "wasm", PRESETS.tiny), false);
  assertEquals(lowMemoryTraining("auto", "webgpu", PRESETS["nanovlm-222m"]), false);
  assertEquals(lowMemoryTraining("on", "webgpu", PRESETS.tiny), true);
  assertEquals(lowMemoryTraining("off", "wasm", PRESETS["nanovlm-222m"]), false);
  assertThrows(() => lowMemoryTraining("yes", "wasm", PRESETS.tiny), Error, "expected auto, on or off");
});

Deno.test("train --low_memory=on: the same run as without, and --resume continues it exactly", async () => {
  const dir = await Deno.makeTempDir({ prefix: "nanovlm-low-memory-test-" });
  const run: Partial<TrainConfig> = {
    backend: "wasm",
    threads: 1, // as low memory uses: the same matMuls in both runs (Adam turns float noise in a ~0 gradient into lr)
    batch_size: 4,
    max_training_steps: 4,
    eval_interval: 2,
    val_samples: 4,
    val_questions: 4,
    test_examples: 0,
    runs_dir: dir,
  };
  const overrides = { ...MICRO_OVERRIDES, lm_n_blocks: 2 }; // two checkpointed decoder blocks
  try {
    const lines: string[] = [];
    const log = (line: string) => lines.push(line);
    const plain = await train({ ...run, run_name: "plain", low_memory: "off" }, overrides, { log: () => {} });
    await train({ ...run, run_name: "low", low_memory: "on", stop_at: 2 }, overrides, { log });
    const low = await train({ resume: `${dir}/low` }, {}, { log });
    assertEquals(lines.filter((l) => l.startsWith("low memory")).length, 2, lines.join("\n"));
    assert(Math.abs(low.finalLoss - plain.finalLoss) <= 1e-5, `final loss ${low.finalLoss} vs ${plain.finalLoss}`);
    const weights = async (name: string) => (await readSafetensors(`${dir}/${name}/latest/model.safetensors`)).tensors;
    const [a, b] = [await weights("plain"), await weights("low")];
    for (const [key, t] of a) assert(maxAbsDiff(b.get(key)!.data, t.data) <= 1e-5, `${key} differs`);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
