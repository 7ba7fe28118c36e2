// The WebGPU path: parity with the PyTorch reference on whatever adapter Deno finds (Mesa's
// llvmpipe software adapter in CI: `apt-get install mesa-vulkan-drivers`), and the guard
// against tensors larger than one storage binding. Tests run one process per file, so
// this file owns its backend. Without any adapter the GPU tests are reported as ignored
// (under CI=true they fail), and one test checks the error that says what to install.

import * as tf from "@tensorflow/tfjs";
import * as assert from "node:assert/strict";
import { fromPretrained } from "../lib/checkpoint.ts";
import { configFromJSON } from "../lib/state_dict.ts";
import { AdamW, gradientNorm } from "../lib/optimizer.ts";
import { initBackend } from "../backend/runtime.ts";
import { webgpuBindingLimit } from "../backend/kernels.ts";
import { assertClose, FIXTURE_DIR, loadFixture, testNeeding, toTensor, WEBGPU_ADAPTER } from "./helpers.ts";

const REPO_ROOT = new URL("..", import.meta.url).pathname;

const { inputs, expected } = await loadFixture();
const get = (name: string) => inputs.get(name) ?? expected.get(name)!;

/** initBackend("webgpu"), or the Error it throws when this machine has no adapter. */
async function tryWebGPU(): Promise<Error | null> {
  try {
    await initBackend("webgpu", { quiet: true });
    return null;
  } catch (e) {
    return e as Error;
  }
}
const noAdapter = await tryWebGPU();

// The WebGPU device keeps Deno's internal async work alive after a test; that is not a leak of ours.
const gpuTest = (name: string, fn: () => Promise<void>) =>
  testNeeding({ ...WEBGPU_ADAPTER, available: noAdapter === null }, {
    name,
    sanitizeOps: false,
    sanitizeResources: false,
    fn,
  });

Deno.test('webgpu: without an adapter, initBackend("webgpu") fails saying what to install', async () => {
  let message = noAdapter?.message;
  if (noAdapter) {
    assert.equal(webgpuBindingLimit(), null, "no WebGPU backend, so no limit to report");
  } else {
    // This machine has one: hide it from a child process (Linux has no DirectX 12).
    const { success, stdout, stderr } = await new Deno.Command(Deno.execPath(), {
      args: ["eval", `import { initBackend } from "./backend/runtime.ts"; await initBackend("webgpu");`],
      cwd: REPO_ROOT,
      env: { DENO_WEBGPU_BACKEND: "dx12", NO_COLOR: "1" },
      stdout: "piped",
      stderr: "piped",
    }).output();
    assert.ok(!success, "an explicit webgpu request must fail without an adapter, not fall back silently");
    message = new TextDecoder().decode(stdout) + new TextDecoder().decode(stderr);
  }
  assert.match(message!, /mesa-vulkan-drivers/);
  assert.match(message!, /NVIDIA driver and libvulkan1/);
});

gpuTest("webgpu: forward logits, loss, gradients and greedy ids match PyTorch nanoVLM", async () => {
  assert.equal(tf.getBackend(), "webgpu");
  const cfg = configFromJSON(JSON.parse(await Deno.readTextFile(`${FIXTURE_DIR}/config.json`)));
  const model = await fromPretrained(FIXTURE_DIR);
  assert.equal(model.cfg.lm_vocab_size, cfg.lm_vocab_size);
  const [inputIds, images, mask, labels] = ["input_ids", "images", "attention_mask", "labels"].map((n) =>
    toTensor(get(n))
  );
  const rowMask = get("attention_mask").data;

  const { logits, loss } = model.forward(inputIds, images, mask, labels);
  await assertClose("lm.logits on webgpu", logits, get("lm.logits"), 1e-4, rowMask);
  await assertClose("loss on webgpu", loss!.reshape([1]), get("loss"));

  const { value, grads } = tf.variableGrads(() => model.forward(inputIds, images, mask, labels).loss!);
  const norm = tf.tidy(() => tf.addN(Object.values(grads).map((g) => g.square().sum())).sqrt().reshape([1]));
  await assertClose("train.step1.grad_norm on webgpu", norm, get("train.step1.grad_norm"));

  const ids = await model.generate(
    toTensor(get("gen.input_ids")),
    toTensor(get("gen.images")),
    toTensor(get("gen.attention_mask")),
    { maxNewTokens: 8, greedy: true },
  );
  assert.deepEqual(Array.from(await ids.data()), Array.from(get("gen.greedy_ids_kv").data));
  tf.dispose([logits, loss!, value, norm, ids, inputIds, images, mask, labels, ...Object.values(grads)]);
  model.dispose();
});

gpuTest("webgpu: a tensor larger than one storage binding is an error, not zeros", async () => {
  const limit = webgpuBindingLimit()!;
  assert.ok(limit >= 2 ** 27, `WebGPU guarantees at least 128 MiB per binding, got ${limit}`);
  // Cheap at any limit (a GPU's 4 GiB too): the guard refuses the buffer before anything is allocated.
  const floats = Math.floor(limit / 4) + 1024;
  assert.throws(() => tf.tidy(() => tf.ones([floats]).mul(2)), /maxStorageBufferBindingSize/);
  // The backend still works afterwards.
  const ok = tf.tidy(() => tf.ones([1000]).mul(3).sum());
  assert.deepEqual(Array.from(await ok.data()), [3000]);
  ok.dispose();
});

gpuTest(
  "webgpu: tf.addN over more inputs than one shader can bind (a global gradient norm) sums them all",
  async () => {
    const sum = tf.tidy(() => tf.addN(Array.from({ length: 40 }, (_, i) => tf.scalar(i + 1))));
    assert.deepEqual(Array.from(await sum.data()), [820]); // stock tfjs-webgpu: 28, the first 7
    sum.dispose();
  },
);

gpuTest(
  "webgpu: AdamW's three fused passes give torch's AdamW (in float64 on the host) over 3 clipped steps",
  async () => {
    const shape = [37, 5], n = 185; // not a multiple of the workgroup size
    const wave = (i: number, scale: number, step = 0) => scale * Math.sin(1.7 * i + 0.3 * step + scale);
    const p = tf.variable(tf.tensor(Array.from({ length: n }, (_, i) => wave(i, 1)), shape), true, "p");
    const optimizer = new AdamW(new Map([["p", p]]), [{ name: "all", maxLr: 0.1, params: ["p"] }], {
      weightDecay: 0.1,
    });
    // The reference, written out: torch.optim.AdamW's update, each gradient scaled by the clip coefficient first.
    const [w, m, v] = [Array.from({ length: n }, (_, i) => wave(i, 1)), new Array(n).fill(0), new Array(n).fill(0)];
    const [beta1, beta2, eps, lr, scale] = [0.9, 0.999, 1e-8, 0.05, 0.7];
    for (let step = 1; step <= 3; step++) {
      const grads = Array.from({ length: n }, (_, i) => wave(i, 0.01, step));
      const g = tf.tensor(grads, shape), tensorsBefore = tf.memory().numTensors;
      const profile = await tf.profile(() => optimizer.step(new Map([["p", g]]), [lr], scale));
      assert.equal(tf.memory().numTensors, tensorsBefore, "the new weight and moments replace the old: no leak");
      const passes = profile.kernels.filter((k) => k.name === "NanovlmAdamW").length;
      assert.equal(passes, 3, "three passes, each a kernel tf.profile counts");
      g.dispose();
      for (let i = 0; i < n; i++) {
        const gi = grads[i] * scale;
        m[i] = beta1 * m[i] + (1 - beta1) * gi;
        v[i] = beta2 * v[i] + (1 - beta2) * gi * gi;
        const denom = Math.sqrt(v[i]) / Math.sqrt(1 - beta2 ** step) + eps;
        w[i] = w[i] * (1 - lr * 0.1) - (lr / (1 - beta1 ** step)) * m[i] / denom;
      }
    }
    const got = await p.data(), state = await optimizer.state();
    for (
      const [name, want, have] of [["weight", w, got], ["m", m, state.get("exp_avg.p")!.data], [
        "v",
        v,
        state.get("exp_avg_sq.p")!.data,
      ]] as const
    ) {
      const worst = Math.max(...want.map((x, i) => Math.abs(x - have[i]) / (Math.abs(x) + 1e-6)));
      assert.ok(worst < 1e-5, `${name}: relative error ${worst}`);
    }
    optimizer.dispose();
    p.dispose();
  },
);

gpuTest(
  "webgpu: the gradient norm's sum of squares is one counted kernel per gradient, equal to the float64 sum",
  async () => {
    // Sizes around the workgroup of 256 (1, 255, 256, 257) and one with many elements per thread.
    const sizes = [1, 255, 256, 257, 70_001];
    const values = sizes.map((n, k) =>
      Float32Array.from({ length: n }, (_, i) => (1 + (i % 7)) * Math.sin(0.37 * i + k))
    );
    const grads = new Map(values.map((v, k) => [`g${k}`, tf.tensor(v)]));
    let want = 0;
    for (const v of values) for (const x of v) want += x * x;

    const before = tf.memory().numTensors;
    const profile = await tf.profile(async () => {
      const norm = gradientNorm(grads);
      const [got] = await norm.data();
      norm.dispose();
      assert.ok(Math.abs(got - Math.sqrt(want)) / Math.sqrt(want) < 1e-6, `norm ${got}, float64 ${Math.sqrt(want)}`);
    });
    assert.equal(tf.memory().numTensors, before, "no tensor left behind");
    const counts = new Map<string, number>();
    for (const { name } of profile.kernels) counts.set(name, (counts.get(name) ?? 0) + 1);
    assert.equal(counts.get("NanovlmSumOfSquares"), sizes.length, `kernels: ${[...counts]}`);
    assert.ok(!counts.has("Square"), "no g² written out");
    tf.dispose([...grads.values()]);
  },
);
