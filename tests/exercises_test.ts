// The classroom exercises: every reference solution passes its check (in-process and
// through `deno task exercise --solutions`, the command CI relies on), every unsolved
// stub fails with its TODO message and a non-zero status rather than a crash, and
// deliberately wrong answers are caught with their first wrong element and a diagnosis.

import * as tf from "@tensorflow/tfjs";
import { assert, assertEquals, assertMatch } from "./assert.ts";
import {
  checkExercise,
  type CheckResult,
  exerciseFile,
  EXERCISES,
  findExercise,
  loadExercise,
} from "../exercises/check.ts";
import {
  applyRotary,
  decoderBlock,
  type KVCache,
  linear,
  lmHead,
  type Params,
  rmsNorm,
  type Rope,
  rotaryEmbedding,
  type VisionLanguageModel,
  type VLMConfig,
} from "../nanovlm.ts";
import { initBackend } from "../backend/runtime.ts";
import type { AdamW } from "../lib/optimizer.ts";
import type { BatchTensors } from "../exercises/solutions/10_training_step.ts";
// Static imports, so `deno test` type-checks every stub and solution.
import * as stub01 from "../exercises/01_rms_norm.ts";
import * as stub02 from "../exercises/02_patchify.ts";
import * as stub03 from "../exercises/03_pixel_shuffle.ts";
import * as stub04 from "../exercises/04_image_tokens.ts";
import * as stub05 from "../exercises/05_rotary.ts";
import * as stub06 from "../exercises/06_causal_attention.ts";
import * as stub07 from "../exercises/07_kv_cache_step.ts";
import * as stub08 from "../exercises/08_top_p.ts";
import * as stub09 from "../exercises/09_lr_schedule.ts";
import * as stub10 from "../exercises/10_training_step.ts";
import * as solution01 from "../exercises/solutions/01_rms_norm.ts";
import * as solution02 from "../exercises/solutions/02_patchify.ts";
import * as solution03 from "../exercises/solutions/03_pixel_shuffle.ts";
import * as solution04 from "../exercises/solutions/04_image_tokens.ts";
import * as solution05 from "../exercises/solutions/05_rotary.ts";
import * as solution06 from "../exercises/solutions/06_causal_attention.ts";
import * as solution07 from "../exercises/solutions/07_kv_cache_step.ts";
import * as solution08 from "../exercises/solutions/08_top_p.ts";
import * as solution09 from "../exercises/solutions/09_lr_schedule.ts";
import * as solution10 from "../exercises/solutions/10_training_step.ts";

await initBackend("cpu", { quiet: true });

const STUBS = [stub01, stub02, stub03, stub04, stub05, stub06, stub07, stub08, stub09, stub10];
const SOLUTIONS = [
  solution01,
  solution02,
  solution03,
  solution04,
  solution05,
  solution06,
  solution07,
  solution08,
  solution09,
  solution10,
];
const ROOT = new URL("../", import.meta.url).pathname;

/** Run a check silently; return its result and what it printed. */
async function check(name: string, impl: object, seed = 1): Promise<CheckResult & { output: string }> {
  const lines: string[] = [];
  const result = await checkExercise(findExercise(name)!, impl as Record<string, unknown>, {
    seed,
    log: (line) => lines.push(line),
  });
  return { ...result, output: lines.join("\n") };
}

/** `deno run -A exercises/check.ts <args>` from the repository root. */
async function runCli(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", "exercises/check.ts", ...args],
    cwd: ROOT,
    stdout: "piped",
    stderr: "piped",
  }).output();
  const text = new TextDecoder();
  return { code: out.code, stdout: text.decode(out.stdout), stderr: text.decode(out.stderr) };
}

Deno.test("the exercise list matches the files: one stub and one solution each, numbered in order", async () => {
  assertEquals(EXERCISES.length, STUBS.length);
  for (const [i, ex] of EXERCISES.entries()) {
    assertEquals(ex.number, String(i + 1).padStart(2, "0"));
    assert(await loadExercise(ex, false) === STUBS[i], `${exerciseFile(ex)} is not the ${i + 1}th stub`);
    assert(await loadExercise(ex, true) === SOLUTIONS[i], `solutions/${exerciseFile(ex)} is not the ${i + 1}th`);
    for (const name of ex.functions) {
      assertEquals(typeof (STUBS[i] as Record<string, unknown>)[name], "function", `stub ${ex.name}: ${name}`);
    }
  }
  assertEquals(findExercise("1"), EXERCISES[0]);
  assertEquals(findExercise("exercises/02_patchify.ts"), EXERCISES[1]);
  assertEquals(findExercise("nope"), undefined);
});

Deno.test("every reference solution passes its check, on several random seeds, leaking no tensors", async () => {
  for (const [i, ex] of EXERCISES.entries()) {
    for (const seed of [1, 2, 3]) {
      const before = tf.memory().numTensors;
      const result = await check(ex.name, SOLUTIONS[i], seed);
      assertEquals(tf.memory().numTensors, before, `${ex.name} seed ${seed} left tensors behind`);
      assert(result.passed, `solution ${ex.name} (seed ${seed}) failed:\n${result.output}`);
      assertEquals(result.status, "pass");
      assertMatch(result.output, new RegExp(`seed ${seed} \\(repeat these inputs with --seed ${seed}\\)`));
      assertMatch(result.output, /case 1: .*→ expecting/); // the shapes are printed
    }
  }
});

Deno.test("`deno task exercise --solutions` (what CI runs) passes every exercise and exits 0", async () => {
  const { code, stdout, stderr } = await runCli("--solutions");
  assertEquals(code, 0, `exit ${code}\n${stdout}\n${stderr}`);
  for (const ex of EXERCISES) assertMatch(stdout, new RegExp(`^PASS ${ex.number} ${ex.name}$`, "m"));
  assertMatch(stdout, new RegExp(`${EXERCISES.length} of ${EXERCISES.length} passed \\(reference solutions\\)`));
});

Deno.test("each unsolved stub fails with its TODO message, not a crash", async () => {
  for (const [i, ex] of EXERCISES.entries()) {
    const result = await check(ex.name, STUBS[i]);
    const file = `exercises/${exerciseFile(ex)}`;
    assertEquals(
      result.status,
      "todo",
      `${file} should still be an unsolved stub (if you solved it in your copy, this test is expected to fail):\n` +
        result.output,
    );
    assert(!result.passed);
    assertMatch(result.message, /^not written yet: /);
    assert(result.message.includes(`Replace the \`throw new TodoError(…)\` in ${file}`), result.message);
    assert(result.message.includes(`deno task exercise ${ex.name}`), result.message);
    assertMatch(result.output, new RegExp(`^TODO ${ex.number} ${ex.name}: not written yet`, "m"));
  }
});

Deno.test("the command line on the stubs: exit 1, a TODO line per exercise, no uncaught error", async () => {
  const all = await runCli("all", "--seed", "4");
  assertEquals(all.code, 1);
  for (const ex of EXERCISES) {
    assertMatch(all.stdout, new RegExp(`^TODO ${ex.number} ${ex.name}: not written yet`, "m"));
  }
  assertMatch(all.stdout, new RegExp(`0 of ${EXERCISES.length} passed, ${EXERCISES.length} not started`));
  assert(!/error|uncaught/i.test(all.stderr), all.stderr);

  const one = await runCli("rms_norm");
  assertEquals(one.code, 1);
  assertMatch(one.stdout, /^01 rms_norm: RMSNorm \(exercises\/01_rms_norm\.ts\)$/m);
  assertMatch(one.stdout, /case 1: x \[\d, \d, \d+\] \(typical activations\), weight \[\d+\], eps 0\.00001/);
});

Deno.test("the command line: --list, unknown names, and --seed repeats a run exactly", async () => {
  const list = await runCli("--list");
  assertEquals(list.code, 0);
  for (const ex of EXERCISES) assert(list.stdout.includes(`exercises/${exerciseFile(ex)}`), list.stdout);

  const unknown = await runCli("rms_nrom");
  assertEquals(unknown.code, 2);
  assertMatch(unknown.stderr, /unknown exercise "rms_nrom"/);

  const run = (seed: string) => runCli("--solutions", "causal_attention", "--seed", seed);
  const [first, again, other] = [await run("77"), await run("77"), await run("78")];
  assertEquals(first.code, 0);
  assertEquals(again.stdout, first.stdout);
  assert(other.stdout !== first.stdout, "another seed should give other inputs");
});

// ---- Wrong answers are caught, with the first wrong element and a diagnosis ----------------

Deno.test("RMSNorm without eps is caught: first wrong element, and the mistake is named", async () => {
  const noEps = { rmsNorm: (x: tf.Tensor, w: tf.Tensor) => x.div(x.square().mean(-1, true).sqrt()).mul(w) };
  for (const seed of [1, 2, 3]) {
    const r = await check("rms_norm", noEps, seed);
    assertEquals(r.status, "wrong");
    assert(r.firstWrong !== undefined);
    assert(Math.abs(r.firstWrong.got - r.firstWrong.expected) > 1e-3);
    assertMatch(
      r.message,
      /^output \[[\d, ]+\]: first wrong element at \[[\d, ]+\]: got -?[\d.e-]+, expected -?[\d.e-]+/,
    );
    assertMatch(r.message, /classic mistake gives: RMSNorm without eps/);
    assertMatch(r.message, /hint: .*eps inside the square root/);
    assertMatch(r.output, /^FAIL 01 rms_norm: output/m);
  }
});

Deno.test("top-p with Hugging Face's shift is caught at the token that crosses top_p", async () => {
  const hfShift = {
    topPFilter(logits: Float32Array, topP: number): Float32Array {
      const out = Float32Array.from(logits);
      if (topP >= 1) return out;
      const order = Array.from(logits.keys()).sort((a, b) => logits[b] - logits[a]);
      const weights = order.map((i) => Math.exp(logits[i] - logits[order[0]]));
      const total = weights.reduce((a, b) => a + b, 0);
      let before = 0; // HF: the cumulative probability *before* this token
      for (let rank = 0; rank < order.length; rank++) {
        if (rank > 0 && before > topP) out[order[rank]] = -Infinity;
        before += weights[rank] / total;
      }
      return out;
    },
  };
  const r = await check("top_p", hfShift);
  assertEquals(r.status, "wrong");
  assertEquals(r.firstWrong?.expected, -Infinity);
  assert(Number.isFinite(r.firstWrong!.got));
  assertMatch(r.message, /token \d+: rank \d+ by probability, p [\d.]+, cumulative [\d.]+ including itself/);
  assertMatch(r.message, /Hugging Face's rule/);
});

Deno.test("other classic mistakes are recognised: patch order, pixel-shuffle reshape, causal mask, RoPE sign", async () => {
  const channelsLast = {
    patchify(images: tf.Tensor, P: number) {
      const [N, C, S] = images.shape, G = S / P;
      return images.reshape([N, C, G, P, G, P]).transpose([0, 2, 4, 3, 5, 1]).reshape([N, G * G, C * P * P]);
    },
  };
  assertMatch((await check("patchify", channelsLast)).message, /flattened channels-last/);

  const plainReshape = {
    pixelShuffle: (x: tf.Tensor, s: number) => x.reshape([x.shape[0], x.shape[1]! / (s * s), -1]),
  };
  const shuffle = await check("pixel_shuffle", plainReshape);
  assertMatch(shuffle.message, /a plain reshape/);
  assertMatch(shuffle.message, /which is input patch \d+/);

  const noMask = {
    causalSelfAttention(
      p: Params,
      prefix: string,
      cfg: VLMConfig,
      x: tf.Tensor,
      rope: Rope,
    ) {
      const [B, T] = x.shape;
      const H = cfg.lm_n_heads, KV = cfg.lm_n_kv_heads, hd = cfg.lm_hidden_dim / H;
      const w = (k: string) => p.get(`${prefix}.${k}.weight`)!;
      const heads = (t: tf.Tensor, n: number) => t.reshape([B, T, n, hd]).transpose([0, 2, 1, 3]);
      const kvHead = tf.tensor1d(Array.from({ length: H }, (_, h) => Math.floor(h / (H / KV))), "int32");
      const q = applyRotary(heads(linear(x, w("q_proj")), H), rope);
      const k = tf.gather(applyRotary(heads(linear(x, w("k_proj")), KV), rope), kvHead, 1);
      const v = tf.gather(heads(linear(x, w("v_proj")), KV), kvHead, 1);
      const out = tf.matMul(tf.softmax(tf.matMul(q, k, false, true).div(Math.sqrt(hd))), v); // no mask
      return linear(out.transpose([0, 2, 1, 3]).reshape([B, T, H * hd]), w("out_proj"));
    },
  };
  const attention = await check("causal_attention", noMask);
  assertEquals(attention.status, "wrong");
  assertMatch(attention.message, /no causal mask/);

  const wrongSign = {
    ...solution05,
    applyRotary(x: tf.Tensor, cos: tf.Tensor, sin: tf.Tensor) {
      const [x1, x2] = tf.split(x, 2, -1);
      return x.mul(cos).add(tf.concat([x2, x1.neg()], -1).mul(sin));
    },
  };
  assertMatch((await check("rotary", wrongSign)).message, /rotate_half was concat\(x2, −x1\)/);
});

Deno.test("shape errors, thrown errors and missing exports are reported, not thrown", async () => {
  const flat = await check("rms_norm", {
    rmsNorm: (x: tf.Tensor, w: tf.Tensor, eps: number) => rmsNorm(x, w, eps).reshape([-1]),
  });
  assertEquals(flat.status, "shape");
  assertMatch(flat.message, /^output has shape \[\d+\] but should have shape \[\d, \d, \d+\]/);

  const notATensor = await check("rms_norm", { rmsNorm: () => 42 });
  assertEquals(notATensor.status, "shape");
  assertMatch(notATensor.message, /should be a tensor of shape .*, got a number/);

  const throws = await check("patchify", {
    patchify: () => {
      throw new RangeError("my bug");
    },
  });
  assertEquals(throws.status, "error");
  assertMatch(throws.message, /^your patchify threw RangeError: my bug/);

  const renamed = await check("rotary", { rotaryTables: solution05.rotaryTables, rotate: solution05.applyRotary });
  assertEquals(renamed.status, "missing");
  assertMatch(renamed.message, /does not export a function applyRotary/);
});

Deno.test("image tokens built from host values are caught: no gradient would reach the ViT", async () => {
  const fromHost = {
    replaceImageTokens(ids: ArrayLike<number>, tokenEmbd: tf.Tensor, imageEmbd: tf.Tensor | undefined, id: number) {
      const [B, T, D] = tokenEmbd.shape;
      const rows = tokenEmbd.reshape([B * T, D]).arraySync() as number[][];
      const images = imageEmbd ? imageEmbd.reshape([-1, D]).arraySync() as number[][] : [];
      let next = 0;
      for (let r = 0; r < B * T; r++) if (ids[r] === id) rows[r] = images[next++];
      if (next !== images.length) throw new Error("slot count");
      return tf.tensor(rows.flat(), [B, T, D]);
    },
  };
  const r = await check("image_tokens", fromHost);
  assertEquals(r.status, "wrong");
  assertMatch(r.message, /the values are right, but no gradient flows back to imageEmbd/);
});

Deno.test("a correct KV-cache step that forgets tf.tidy is caught as a leak; a wrong position is named", async () => {
  const step = (tidy: boolean, shift: number) => ({
    decodeStep(p: Params, cfg: VLMConfig, ids: number[], cache: KVCache[], position: number) {
      const body = () => {
        const B = ids.length;
        let x: tf.Tensor = tf.gather(p.get("decoder.token_embedding.weight")!, tf.tensor2d(ids, [B, 1], "int32"));
        const rope = rotaryEmbedding(cfg, [position + shift]);
        const grown: KVCache[] = [];
        for (let i = 0; i < cfg.lm_n_blocks; i++) {
          const block = decoderBlock(p, cfg, i, x, rope, undefined, cache[i]);
          x = block.out;
          grown.push(block.cache);
        }
        const hidden = rmsNorm(x, p.get("decoder.norm.weight")!, cfg.lm_rms_eps).reshape([B, -1]);
        return { logits: lmHead(p, cfg, hidden), cache: grown };
      };
      return tidy ? tf.tidy(body) : body();
    },
  });
  const leaky = await check("kv_cache_step", step(false, 0));
  assertEquals(leaky.status, "leak");
  assertMatch(leaky.message, /the result is right, but the step left \d+ intermediate tensors alive/);
  assertMatch(leaky.message, /hint: Wrap the body in tf\.tidy/);

  const offByOne = await check("kv_cache_step", step(true, -1));
  assertEquals(offByOne.status, "wrong");
  assertMatch(offByOne.message, /the new token was rotated as position \d+\. With \d+ tokens cached/);
});

Deno.test("a schedule whose warmup starts at 0 is caught at step 0", async () => {
  const fromZero = {
    lrSchedule(step: number, maxLr: number, maxSteps: number) {
      const warmup = 0.03 * maxSteps, ratio = (step - warmup) / (maxSteps - warmup);
      if (step < warmup) return (maxLr * step) / warmup; // should be step + 1
      return step > maxSteps ? maxLr / 10 : maxLr / 10 + 0.45 * maxLr * (1 + Math.cos(Math.PI * ratio));
    },
  };
  const r = await check("lr_schedule", fromZero);
  assertEquals(r.status, "wrong");
  assertEquals(r.firstWrong?.index, [0]);
  assertEquals(r.firstWrong?.got, 0);
  assertMatch(r.message, /step 0, in the warmup/);
  assertMatch(r.message, /the warmup starts at 0/);
});

/** A training step like the solution's, with one deliberate change. */
function trainingStepWith(change: "no clipping" | "no dispose") {
  return {
    async trainingStep(model: VisionLanguageModel, batch: BatchTensors, optimizer: AdamW, lrs: number[], max: number) {
      const { value, grads: byVariable } = tf.variableGrads(
        () => model.forward(batch.inputIds, batch.images, batch.attentionMask, batch.labels).loss!,
        optimizer.variables,
      );
      const grads = new Map(optimizer.variables.map((v, i) => [optimizer.trainable[i], byVariable[v.name]]));
      const normTensor = tf.tidy(() => tf.addN([...grads.values()].map((g) => g.square().sum())).sqrt());
      const gradNorm = (await normTensor.data())[0];
      normTensor.dispose();
      if (change !== "no clipping" && gradNorm > max) {
        for (const [name, g] of grads) {
          grads.set(name, g.mul(max / (gradNorm + 1e-6)));
          g.dispose();
        }
      }
      optimizer.step(grads, lrs);
      const loss = (await value.data())[0];
      if (change !== "no dispose") tf.dispose([value, ...grads.values()]);
      return { loss, gradNorm };
    },
  };
}

Deno.test("a training step without clipping, or one that keeps its gradients, is caught", async () => {
  const unclipped = await check("training_step", trainingStepWith("no clipping"));
  assertEquals(unclipped.status, "wrong");
  assertMatch(unclipped.message, /^gradient of [\w.]+ given to optimizer\.step \[[\d, ]+\]: first wrong element at/);
  assertMatch(unclipped.message, /the gradients were not clipped/);

  const before = tf.memory().numTensors;
  const leaky = await check("training_step", trainingStepWith("no dispose"));
  assertEquals(leaky.status, "leak");
  assertMatch(leaky.message, /the step is right, but it left \d+ tensors alive/);
  assertEquals(tf.memory().numTensors, before, "the checker frees what a leaky step left behind");
});

Deno.test("stubs and solutions use the project's public modules, never a private copy of model code", async () => {
  const allowed = new Set([
    "@tensorflow/tfjs",
    "./todo.ts",
    "../nanovlm.ts",
    "../../nanovlm.ts",
    "../lib/optimizer.ts",
    "../../lib/optimizer.ts",
  ]);
  for (const ex of EXERCISES) {
    for (const path of [`exercises/${exerciseFile(ex)}`, `exercises/solutions/${exerciseFile(ex)}`]) {
      const source = await Deno.readTextFile(`${ROOT}${path}`);
      for (const [, from] of source.matchAll(/^import .* from "([^"]+)";$/gm)) {
        assert(allowed.has(from), `${path} imports ${from}`);
      }
    }
  }
});
