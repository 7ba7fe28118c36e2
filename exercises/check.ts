// exercises/check.ts: automatic feedback for the classroom exercises.
//
//   deno task exercise rms_norm          check exercises/01_rms_norm.ts (also: 01, 1, 01_rms_norm)
//   deno task exercise all               check every exercise, with a summary
//   deno task exercise --solutions       check the reference solutions in exercises/solutions/ (CI does)
//   deno task exercise --list            the exercises in the suggested order
//   deno task exercise rms_norm --seed 7 repeat a run's random inputs
//
// Every check builds fresh random inputs (a new seed each run, printed), prints their
// shapes, runs the student's function and the project's own implementation (nanovlm.ts,
// lib/optimizer.ts, lib/train_step.ts) on them, and compares element by element. PASS when everything agrees within
// a small tolerance; otherwise FAIL with the first wrong element (index, got, expected),
// a hint for the exercise, and — when the answer equals a classic mistake computed on
// the same inputs — which mistake it is. The expected values always come from the
// project's code, never from a copy, so the exercises follow the model as it changes.
//
// It runs on tfjs' plain JavaScript "cpu" backend: exact, deterministic and fast enough
// for the small shapes used here. Nothing a student writes can crash it: an unsolved
// stub, a wrong shape, a thrown error or a module that fails to load are all reported.

import * as tf from "@tensorflow/tfjs";
import { parseArgs } from "node:util";
import {
  applyRotary,
  attentionBias,
  decoder,
  decoderAttention,
  decoderBlock,
  type KVCache,
  linear,
  lmHead,
  parameterSpecs,
  type Params,
  patchify,
  pixelShuffle,
  PRESETS,
  replaceImageTokens,
  rmsNorm,
  type Rope,
  rotaryEmbedding,
  seededRandom,
  softmax,
  topKTopPFilter,
  VisionLanguageModel,
  type VLMConfig,
} from "../nanovlm.ts";
import { initBackend } from "../backend/runtime.ts";
import { AdamW, lrSchedule, paramGroups } from "../lib/optimizer.ts";
import { batchTensors, trainStep } from "../lib/train_step.ts";
import type { Batch } from "../data.ts";
import { TodoError } from "./todo.ts";

// ---- Results -------------------------------------------------------------------------

/** How a check ended. Everything but "pass" is a failure. */
export type Status =
  | "pass"
  | "todo" // the stub still throws TodoError
  | "missing" // the module does not export the function (or could not be loaded)
  | "shape" // the result has the wrong type or shape
  | "wrong" // wrong values (or a missing error, or a missing gradient)
  | "leak" // right values, but tensors left behind
  | "error"; // the student's code threw

/** The first element where the student's result and the project's disagree. */
export interface WrongElement {
  index: number[];
  got: number;
  expected: number;
}

/** The outcome of one exercise's check. */
export interface CheckResult {
  exercise: string;
  status: Status;
  passed: boolean;
  /** The explanation printed after FAIL / TODO (empty on PASS). */
  message: string;
  firstWrong?: WrongElement;
  seed: number;
}

/** A failed expectation; the runner turns it into a CheckResult. */
class CheckFailure extends Error {
  constructor(
    readonly status: Exclude<Status, "pass" | "todo" | "error">,
    message: string,
    readonly options: { firstWrong?: WrongElement; hint?: string } = {},
  ) {
    super(message);
  }
}

/** An error thrown inside the student's function (as opposed to a bug in this checker). */
class StudentError extends Error {
  constructor(readonly functionName: string, readonly error: unknown) {
    super(String(error));
  }
}

// ---- The exercises' shared toolbox ----------------------------------------------------

/** A value compared element by element: a tensor's or an array's data and shape. */
type Values = { shape: number[]; data: ArrayLike<number> };

/** A classic wrong answer, computed on the same inputs, and what to say when it matches. */
interface Mistake {
  message: string;
  value: () => tf.Tensor | Values | number;
}

interface CompareOptions {
  atol?: number; // default 1e-5
  rtol?: number; // default 1e-4
  mistakes?: Mistake[];
  /** The hint for this comparison, instead of the exercise's general one. */
  hint?: string;
  /** Explain an index in the exercise's own terms ("patch 3, channel 1 …"). */
  explain?: (index: number[]) => string;
  /** Print nothing on success (the caller sums many comparisons up in one line). */
  quiet?: boolean;
}

const shapeText = (shape: readonly number[]) => `[${shape.join(", ")}]`;
/** " [2, 3]" after a label, nothing for a plain number. */
const sized = (shape: readonly number[]) => (shape.length ? ` ${shapeText(shape)}` : "");
const numberText = (x: number) => (Number.isFinite(x) ? String(Number(x.toPrecision(6))) : String(x));

/** The data and shape of a tensor or array, or undefined for anything else. */
async function valuesOf(x: unknown): Promise<Values | undefined> {
  if (x instanceof tf.Tensor) {
    if (x.isDisposed) return undefined;
    return { shape: x.shape, data: await x.data() as ArrayLike<number> };
  }
  if (typeof x === "number") return { shape: [], data: [x] };
  if (x instanceof Float32Array || x instanceof Float64Array || Array.isArray(x)) {
    return { shape: [x.length], data: x as ArrayLike<number> };
  }
  if (typeof x === "object" && x !== null && "shape" in x && "data" in x) return x as Values;
  return undefined;
}

function describe(x: unknown): string {
  if (x instanceof tf.Tensor) return x.isDisposed ? "a disposed tensor" : `a ${x.dtype} tensor ${shapeText(x.shape)}`;
  if (x === undefined || x === null) return String(x);
  if (Array.isArray(x)) return `an array of length ${x.length}`;
  return `a ${typeof x === "object" ? x.constructor?.name ?? "object" : typeof x}`;
}

/** Row-major flat index → multi-dimensional index. */
function unravel(flat: number, shape: number[]): number[] {
  const index = new Array<number>(shape.length);
  for (let axis = shape.length - 1; axis >= 0; axis--) {
    index[axis] = flat % shape[axis];
    flat = Math.floor(flat / shape[axis]);
  }
  return index;
}

const close = (got: number, expected: number, atol: number, rtol: number) =>
  got === expected || Math.abs(got - expected) <= atol + rtol * Math.abs(expected); // NaN is never close

/** Whether two value sets agree everywhere. */
function allClose(a: Values, b: Values, atol: number, rtol: number): boolean {
  if (shapeText(a.shape) !== shapeText(b.shape)) return false;
  for (let i = 0; i < a.data.length; i++) if (!close(a.data[i], b.data[i], atol, rtol)) return false;
  return true;
}

/**
 * What one exercise's check uses: seeded random inputs, the student's functions, logging
 * and the comparison that produces the feedback.
 */
class Check {
  private readonly random: () => number;
  private caseCount = 0;
  /** Run when the check ends, pass or fail (tf.Variables outlive the check's tensor scope). */
  readonly cleanups: (() => void)[] = [];

  constructor(
    readonly seed: number,
    private readonly impl: Record<string, unknown>,
    private readonly exercise: Exercise,
    readonly log: (line: string) => void,
  ) {
    this.random = seededRandom(seed);
  }

  /** A random integer in [lo, hi]. */
  int(lo: number, hi: number): number {
    return lo + Math.floor(this.random() * (hi - lo + 1));
  }

  pick<T>(choices: readonly T[]): T {
    return choices[this.int(0, choices.length - 1)];
  }

  /** A float32 tensor of normal samples, seeded from this check's seed. */
  normal(shape: number[], mean = 0, std = 1): tf.Tensor {
    return tf.randomNormal(shape, mean, std, "float32", this.int(0, 2 ** 31 - 1));
  }

  uniform(shape: number[], lo = 0, hi = 1): tf.Tensor {
    return tf.randomUniform(shape, lo, hi, "float32", this.int(0, 2 ** 31 - 1));
  }

  /** Announce the next case and its inputs. */
  startCase(description: string): void {
    this.log(`  case ${++this.caseCount}: ${description}`);
  }

  /** Call the student's function; its errors become StudentErrors (TodoError passes through). */
  call(name: string, ...args: unknown[]): unknown {
    const fn = this.impl[name] as (...args: unknown[]) => unknown;
    try {
      return fn(...args);
    } catch (e) {
      if (e instanceof TodoError) throw e;
      throw new StudentError(name, e);
    }
  }

  /** The same for a function that may return a Promise. */
  async callAsync(name: string, ...args: unknown[]): Promise<unknown> {
    try {
      return await this.call(name, ...args);
    } catch (e) {
      if (e instanceof TodoError || e instanceof StudentError) throw e;
      throw new StudentError(name, e);
    }
  }

  /**
   * Compare the student's result with the expected one: type, shape, then every element
   * (|got − expected| ≤ atol + rtol·|expected|; infinities must match exactly).
   */
  /** Returns the largest finite |difference| when everything agrees; throws a CheckFailure otherwise. */
  async expectClose(
    label: string,
    got: unknown,
    expected: tf.Tensor | Values | number,
    options: CompareOptions = {},
  ): Promise<number> {
    const { atol = 1e-5, rtol = 1e-4, hint } = options;
    const want = (await valuesOf(expected))!;
    // A tensor must come back as a tensor and a number as a number; arrays may be any array of numbers.
    const sameKind = expected instanceof tf.Tensor
      ? got instanceof tf.Tensor
      : typeof expected !== "number" || typeof got === "number";
    const have = sameKind ? await valuesOf(got) : undefined;
    if (have === undefined) {
      const kind = expected instanceof tf.Tensor
        ? `a tensor of shape ${shapeText(want.shape)}`
        : typeof expected === "number"
        ? "a number"
        : `${want.data.length} numbers`;
      throw new CheckFailure("shape", `${label} should be ${kind}, got ${describe(got)}`, { hint });
    }
    if (shapeText(have.shape) !== shapeText(want.shape)) {
      throw new CheckFailure(
        "shape",
        `${label} has shape ${shapeText(have.shape)} but should have shape ${shapeText(want.shape)}`,
        { hint },
      );
    }
    let first = -1, wrong = 0, worst = 0;
    for (let i = 0; i < want.data.length; i++) {
      if (close(have.data[i], want.data[i], atol, rtol)) continue;
      if (first < 0) first = i;
      wrong++;
      const d = Math.abs(have.data[i] - want.data[i]);
      if (!(d <= worst)) worst = d; // NaN or Infinity counts as the worst
    }
    if (first < 0) {
      let maxDiff = 0;
      for (let i = 0; i < want.data.length; i++) {
        const d = Math.abs(have.data[i] - want.data[i]);
        if (Number.isFinite(d)) maxDiff = Math.max(maxDiff, d);
      }
      if (!options.quiet) {
        this.log(`    ✓ ${label}${sized(want.shape)} matches (max |difference| ${maxDiff.toExponential(1)})`);
      }
      return maxDiff;
    }
    const index = unravel(first, want.shape);
    const where = options.explain ? ` (${options.explain(index)})` : "";
    const firstWrong = { index, got: have.data[first], expected: want.data[first] };
    const at = ` at ${shapeText(index)}${where}`;
    let message = `${label}${sized(want.shape)}: ${want.shape.length ? `first wrong element${at}: ` : ""}` +
      `got ${numberText(firstWrong.got)}, expected ${numberText(firstWrong.expected)} (${this.exercise.reference})`;
    if (want.data.length > 1) {
      message += `\n  ${wrong} of ${want.data.length} elements are wrong; the largest |difference| is ${
        numberText(worst)
      }`;
    }
    for (const mistake of options.mistakes ?? []) {
      const value = await valuesOf(mistake.value());
      if (value && allClose(have, value, atol, rtol)) {
        message += `\n  Your result is exactly what this classic mistake gives: ${mistake.message}`;
        break;
      }
    }
    throw new CheckFailure("wrong", message, { firstWrong, hint });
  }

  /** Fail with a message (for checks that are not element comparisons). */
  fail(status: "wrong" | "shape" | "leak", message: string, hint?: string): never {
    throw new CheckFailure(status, message, { hint });
  }
}

// ---- What an exercise is, and helpers several checks share ----------------------------

/** One classroom exercise: the stub the student edits and how it is checked. */
export interface Exercise {
  number: string; // "01": the suggested order
  name: string; // "rms_norm": what `deno task exercise` takes
  title: string;
  /** The functions the student writes, exported from the stub. */
  functions: string[];
  /** What the result is compared with, e.g. "rmsNorm in nanovlm.ts". */
  reference: string;
  minutes: number;
  /** Printed on a wrong answer unless the failed comparison has its own. */
  hint: string;
  run(c: Check): Promise<void>;
}

/** The file a student edits: exercises/01_rms_norm.ts. */
export const exerciseFile = (ex: Exercise): string => `${ex.number}_${ex.name}.ts`;

/** A config for the decoder-only checks: tiny preset, other shapes as given. */
function decoderConfig(H: number, KV: number, hd: number, blocks: number, vocab = 48): VLMConfig {
  return {
    ...PRESETS.tiny,
    lm_hidden_dim: H * hd,
    lm_n_heads: H,
    lm_n_kv_heads: KV,
    lm_inter_dim: 2 * H * hd,
    lm_n_blocks: blocks,
    lm_base_vocab_size: vocab - 1,
    lm_vocab_size: vocab,
  };
}

/**
 * Random decoder weights by nanoVLM name, with scales that keep activations near 1 (the
 * model's own init, std 0.02, makes every attention map almost uniform, which would let
 * some mistakes pass): linear weights std 1/√in, norm gains around 1, embeddings std 1.
 */
function randomDecoderParams(cfg: VLMConfig, c: Check): Params {
  const p: Params = new Map();
  for (const spec of parameterSpecs(cfg)) {
    if (!spec.name.startsWith("decoder.")) continue;
    if (spec.layout === "linear") p.set(spec.name, c.normal(spec.shape, 0, 1 / Math.sqrt(spec.shape[0])));
    else if (spec.init === "ones") p.set(spec.name, c.normal(spec.shape, 1, 0.2));
    else p.set(spec.name, c.normal(spec.shape));
  }
  return p;
}

// ---- 01 rms_norm ----------------------------------------------------------------------

const rmsNormExercise: Exercise = {
  number: "01",
  name: "rms_norm",
  title: "RMSNorm",
  functions: ["rmsNorm"],
  reference: "rmsNorm in nanovlm.ts",
  minutes: 10,
  hint: "Average x² over the last axis only (x.square().mean(-1, true) keeps that axis so it broadcasts), " +
    "add eps inside the square root, divide x by it, then multiply by weight.",
  async run(c: Check) {
    const cases = [
      { what: "typical activations", rank: 3, scale: 1 },
      { what: "tiny activations, where eps matters; rank 2", rank: 2, scale: 1e-3 },
    ];
    for (const { what, rank, scale } of cases) {
      const D = c.pick([8, 12, 16]);
      const shape = rank === 3 ? [c.int(1, 3), c.int(2, 6), D] : [c.int(2, 6), D];
      const x = c.normal(shape, 0.3 * scale, scale), weight = c.normal([D], 1, 0.3), eps = 1e-5;
      c.startCase(`x ${shapeText(shape)} (${what}), weight [${D}], eps ${eps} → expecting ${shapeText(shape)}`);
      const expected = rmsNorm(x, weight, eps);
      const got = c.call("rmsNorm", x, weight, eps);
      const meanSquare = () => x.square().mean(-1, true);
      await c.expectClose("output", got, expected, {
        mistakes: [
          {
            message: "RMSNorm without eps. Add eps inside the square root: sqrt(mean(x²) + eps).",
            value: () => x.div(meanSquare().sqrt()).mul(weight),
          },
          {
            message: "eps added outside the square root, x / (sqrt(mean(x²)) + eps). It goes inside.",
            value: () => x.div(meanSquare().sqrt().add(eps)).mul(weight),
          },
          {
            message: "the mean is subtracted first: that is LayerNorm. RMSNorm does not center x.",
            value: () => {
              const centered = x.sub(x.mean(-1, true));
              return centered.div(centered.square().mean(-1, true).add(eps).sqrt()).mul(weight);
            },
          },
          {
            message: "weight is never applied. Multiply by the learned gain at the end.",
            value: () => x.div(meanSquare().add(eps).sqrt()),
          },
          {
            message: "the mean runs over every element, not over the last axis: use mean(-1, true).",
            value: () => x.div(x.square().mean().add(eps).sqrt()).mul(weight),
          },
        ],
      });
    }
  },
};

// ---- 02 patchify ----------------------------------------------------------------------

const patchifyExercise: Exercise = {
  number: "02",
  name: "patchify",
  title: "Patchify",
  functions: ["patchify"],
  reference: "patchify in nanovlm.ts",
  minutes: 20,
  hint: "Name the axes: reshaping to [N, 3, G, P, G, P] gives (n, c, gy, py, gx, px). The output wants (n, gy, gx) " +
    "to pick the patch and (c, py, px) inside it: transpose into that order, then reshape to [N, G·G, 3·P·P].",
  async run(c: Check) {
    for (let i = 0; i < 2; i++) {
      const N = c.int(1, 3), P = c.pick([2, 3, 4]), G = c.pick([2, 3, 4]), S = G * P;
      const images = c.uniform([N, 3, S, S]);
      c.startCase(`images ${shapeText([N, 3, S, S])}, P = ${P} → expecting ${shapeText([N, G * G, 3 * P * P])}`);
      const got = c.call("patchify", images, P);
      const axes = () => images.reshape([N, 3, G, P, G, P]); // (n, c, gy, py, gx, px)
      await c.expectClose("patches", got, patchify(images, P), {
        explain: ([n, patch, f]) => {
          const [ch, py, px] = [Math.floor(f / (P * P)), Math.floor(f / P) % P, f % P];
          return `image ${n}, patch ${patch} = grid row ${Math.floor(patch / G)}, column ${patch % G}; ` +
            `feature ${f} = channel ${ch}, row ${py}, column ${px} inside the patch`;
        },
        mistakes: [
          {
            message: "each patch is flattened channels-last, (row, col, channel). The conv weight is " +
              "[Dv, 3, P, P], so the order is (channel, row, col).",
            value: () => axes().transpose([0, 2, 4, 3, 5, 1]).reshape([N, G * G, 3 * P * P]),
          },
          {
            message: "the patches are numbered column by column. Number them row-major: patch gy·G + gx.",
            value: () => axes().transpose([0, 4, 2, 1, 3, 5]).reshape([N, G * G, 3 * P * P]),
          },
          {
            message: "a plain reshape. It does not cut square patches: each 'patch' is a run of consecutive " +
              "pixels. Split the image axes, transpose, then reshape.",
            value: () => images.reshape([N, G * G, 3 * P * P]),
          },
        ],
      });
    }
  },
};

// ---- 03 pixel_shuffle -----------------------------------------------------------------

const pixelShuffleExercise: Exercise = {
  number: "03",
  name: "pixel_shuffle",
  title: "Pixel shuffle",
  functions: ["pixelShuffle"],
  reference: "pixelShuffle in nanovlm.ts",
  minutes: 20,
  hint: "Name the axes: reshaping to [N, G/s, s, G/s, s, Dv] gives (n, oy, sy, ox, sx, d). The output wants " +
    "(n, oy, ox) to pick the token and (sy, sx, d) inside it: transpose into that order, then reshape.",
  async run(c: Check) {
    for (const s of [2, c.pick([2, 3])]) {
      const N = c.int(1, 2), O = c.int(1, 3), G = O * s, Dv = c.int(2, 5);
      const x = c.normal([N, G * G, Dv]);
      c.startCase(
        `x ${shapeText([N, G * G, Dv])} (a ${G}×${G} patch grid), s = ${s} → expecting ` +
          shapeText([N, O * O, s * s * Dv]),
      );
      const got = c.call("pixelShuffle", x, s);
      const axes = () => x.reshape([N, O, s, O, s, Dv]); // (n, oy, sy, ox, sx, d)
      await c.expectClose("tokens", got, pixelShuffle(x, s), {
        explain: ([n, token, f]) => {
          const [oy, ox, sy, sx, d] = [
            Math.floor(token / O),
            token % O,
            Math.floor(f / Dv / s),
            (f / Dv | 0) % s,
            f % Dv,
          ];
          return `image ${n}, token ${token} = block row ${oy}, column ${ox}; feature ${f} = channel ${d} of ` +
            `the block's patch at row ${sy}, column ${sx}, which is input patch ${(oy * s + sy) * G + ox * s + sx}`;
        },
        mistakes: [
          {
            message: "a plain reshape. It joins s² patches that are consecutive in the sequence (a strip of " +
              "one row of the image), not an s×s square.",
            value: () => x.reshape([N, O * O, s * s * Dv]),
          },
          {
            message: "inside a block the patches are concatenated column by column. Go row by row: " +
              "patch (sy, sx) of the block comes at position sy·s + sx.",
            value: () => axes().transpose([0, 1, 3, 4, 2, 5]).reshape([N, O * O, s * s * Dv]),
          },
          {
            message: "the output tokens are numbered column by column. Number them row-major: oy·(G/s) + ox.",
            value: () => axes().transpose([0, 3, 1, 2, 4, 5]).reshape([N, O * O, s * s * Dv]),
          },
        ],
      });
    }
  },
};

// ---- 04 image_tokens ------------------------------------------------------------------

/** The image-token fill in another order, to recognise two classic mistakes. */
function fillInOrder(
  ids: number[],
  [B, T, D]: number[],
  tokenEmbd: tf.Tensor,
  imageEmbd: tf.Tensor,
  imageId: number,
  order: "restart-per-sample" | "column-major",
): tf.Tensor {
  const source = Array.from({ length: B * T }, (_, r) => r); // row of [tokens; images] for each output row
  let slot = 0;
  const walk = order === "column-major"
    ? Array.from({ length: B * T }, (_, i) => (i % B) * T + Math.floor(i / B))
    : source.slice();
  for (const r of walk) {
    if (order === "restart-per-sample" && r % T === 0) slot = 0;
    if (ids[r] === imageId) source[r] = B * T + slot++;
  }
  const rows = tf.concat([tokenEmbd.reshape([B * T, D]), imageEmbd.reshape([-1, D])]);
  return tf.gather(rows, tf.tensor1d(source, "int32")).reshape([B, T, D]);
}

const imageTokensExercise: Exercise = {
  number: "04",
  name: "image_tokens",
  title: "Image embeddings into the <|image|> slots",
  functions: ["replaceImageTokens"],
  reference: "replaceImageTokens in nanovlm.ts",
  minutes: 25,
  hint: "Walk the B·T positions in row-major order (sample by sample) with ONE counter over the image rows — it " +
    "does not restart for a new sample. A slot takes the next image row; any other position keeps its token row.",
  async run(c: Check) {
    const V = 20, IMG = V - 1; // <|image|> is the last id
    const L = c.int(2, 3), D = c.int(3, 6);
    const layouts: { what: string; imagesPerSample: number[] }[] = [
      { what: "random layout", imagesPerSample: Array.from({ length: c.int(1, 3) }, () => c.int(0, 2)) },
      { what: "no image in sample 0, one in sample 1, two in sample 2", imagesPerSample: [0, 1, 2] },
      { what: "text only, imageEmbd undefined", imagesPerSample: [0, 0] },
    ];
    if (!layouts[0].imagesPerSample.some((n) => n > 0)) layouts[0].imagesPerSample[0] = 1;
    let gradientCase: { ids: number[]; tokenEmbd: tf.Tensor; imageEmbd: tf.Tensor } | undefined;
    for (const { what, imagesPerSample } of layouts) {
      // Each sample: some text, its images' slots at random places, more text; left-padded with id 0.
      const rows = imagesPerSample.map((n) => {
        const row: number[] = [];
        for (let i = 0; i < n; i++) {
          row.push(...Array.from({ length: c.int(1, 2) }, () => c.int(1, V - 2)), ...Array(L).fill(IMG));
        }
        row.push(...Array.from({ length: c.int(1, 3) }, () => c.int(1, V - 2)));
        return row;
      });
      const B = rows.length, T = Math.max(...rows.map((r) => r.length));
      const ids = rows.flatMap((r) => [...Array(T - r.length).fill(0), ...r]);
      const N = imagesPerSample.reduce((a, b) => a + b, 0);
      const tokenEmbd = c.normal([B, T, D]);
      const imageEmbd = N > 0 ? c.normal([N, L, D]) : undefined;
      c.startCase(
        `${what}: ids [${B}·${T}] with ${N * L} slots (images per sample: ${imagesPerSample.join(", ")}), ` +
          `tokenEmbd ${shapeText([B, T, D])}, imageEmbd ${imageEmbd ? shapeText([N, L, D]) : "undefined"} → ` +
          `expecting ${shapeText([B, T, D])}`,
      );
      const got = c.call("replaceImageTokens", ids, tokenEmbd, imageEmbd, IMG);
      await c.expectClose("fused embeddings", got, replaceImageTokens(ids, tokenEmbd, imageEmbd, IMG), {
        explain: ([b, t]) =>
          ids[b * T + t] === IMG ? `sample ${b}, position ${t}: an <|image|> slot` : `sample ${b}, position ${t}: text`,
        mistakes: imageEmbd
          ? [
            {
              message: "the image rows restart at image 0 for every sample. Use one counter for the whole batch.",
              value: () => fillInOrder(ids, [B, T, D], tokenEmbd, imageEmbd, IMG, "restart-per-sample"),
            },
            {
              message: "the slots are filled position by position across the batch (column-major). Fill them " +
                "sample by sample: all of sample 0's slots first.",
              value: () => fillInOrder(ids, [B, T, D], tokenEmbd, imageEmbd, IMG, "column-major"),
            },
          ]
          : [],
      });
      if (imageEmbd && !gradientCase) gradientCase = { ids, tokenEmbd, imageEmbd };
    }

    const { ids, tokenEmbd, imageEmbd } = gradientCase!;
    c.startCase("gradients: training needs d(loss)/d(imageEmbd) to reach the projector and the ViT");
    const r = c.normal(tokenEmbd.shape);
    for (const [name, x] of [["imageEmbd", imageEmbd], ["tokenEmbd", tokenEmbd]] as const) {
      const score = (t: tf.Tensor, i: tf.Tensor) =>
        (c.call("replaceImageTokens", ids, t, i, IMG) as tf.Tensor).mul(r).sum();
      let grad: tf.Tensor;
      try {
        grad = tf.grad((v: tf.Tensor) => name === "imageEmbd" ? score(tokenEmbd, v) : score(v, imageEmbd))(x);
      } catch (e) {
        if (e instanceof TodoError || e instanceof StudentError) throw e;
        c.fail(
          "wrong",
          `the values are right, but no gradient flows back to ${name} (tfjs: ${(e as Error).message})`,
          "Build the output from the input tensors with tensor ops (slice, concat, stack, gather, where), never " +
            "from numbers read out of them with data()/dataSync(): those numbers have no gradient.",
        );
      }
      const expected = tf.grad((v: tf.Tensor) =>
        (name === "imageEmbd" ? replaceImageTokens(ids, tokenEmbd, v, IMG) : replaceImageTokens(ids, v, imageEmbd, IMG))
          .mul(r).sum()
      )(x);
      await c.expectClose(`gradient w.r.t. ${name}`, grad, expected, {
        hint: "Each slot must use its image row exactly once, and every text position its own token row.",
      });
    }

    c.startCase(`a mismatch: ${2 * L - 1} slots but 2 images × ${L} tokens must throw an Error`);
    const shortIds = [...Array(2 * L - 1).fill(IMG), 1];
    let threw: unknown;
    try {
      c.call("replaceImageTokens", shortIds, c.normal([1, 2 * L, D]), c.normal([2, L, D]), IMG);
    } catch (e) {
      if (e instanceof TodoError) throw e;
      threw = e instanceof StudentError ? e.error : e;
    }
    if (threw === undefined) {
      c.fail(
        "wrong",
        `with ${2 * L - 1} <|image|> slots but ${2 * L} image rows your function returned instead of throwing`,
        "Count the slots first; if the count differs from imageEmbd's N·L rows, throw an Error saying both numbers.",
      );
    }
    c.log(`    ✓ threw: ${threw instanceof Error ? threw.message : String(threw)}`);
  },
};

// ---- 05 rotary ------------------------------------------------------------------------

const rotaryExercise: Exercise = {
  number: "05",
  name: "rotary",
  title: "Rotary position embeddings",
  functions: ["rotaryTables", "applyRotary"],
  reference: "rotaryEmbedding / applyRotary in nanovlm.ts",
  minutes: 30,
  hint: "",
  async run(c: Check) {
    const tablesHint = "inv_freq[i] = 1 / base^(2i/hd) for i < hd/2; the angles are positions × inv_freq (an outer " +
      "product [T, hd/2]); each table is concat([angles, angles], -1): the two halves, not interleaved.";
    const applyHint = "rotate_half(x) = concat(−x2, x1): the first half becomes −x2, not x2. Pair i is " +
      "(x_i, x_{i+hd/2}), the two halves of the vector, not neighbours.";
    // Angles are computed in float32 by nanovlm.ts; a float64 answer differs by up to ~1e-5 at these positions.
    const tolerance = { atol: 5e-5, rtol: 1e-4 };
    for (let i = 0; i < 2; i++) {
      const hd = c.pick([4, 6, 8, 16]), base = c.pick([10000, 100000]), start = c.int(0, 40), T = c.int(1, 6);
      const positions = Array.from({ length: T }, (_, t) => start + t);
      const cfg = { ...decoderConfig(1, 1, hd, 1), lm_re_base: base };
      c.startCase(
        `tables: positions [${positions.join(", ")}], hd ${hd}, base ${base} → expecting cos, sin ` +
          shapeText([T, hd]),
      );
      const expected = rotaryEmbedding(cfg, positions);
      const got = c.call("rotaryTables", positions, hd, base) as { cos?: unknown; sin?: unknown } | undefined;
      if (typeof got !== "object" || got === null || !("cos" in got) || !("sin" in got)) {
        c.fail("shape", `rotaryTables should return { cos, sin }, got ${describe(got)}`, tablesHint);
      }
      const angles = (exponent: (i: number) => number, at: number[], interleave: boolean) => {
        const half = Array.from({ length: hd / 2 }, (_, i) => 1 / base ** exponent(i));
        const rows = at.map((p) => {
          const row = half.map((f) => p * f);
          return interleave ? row.flatMap((a) => [a, a]) : [...row, ...row];
        });
        return tf.tensor2d(rows.flat(), [T, hd]);
      };
      for (const part of ["cos", "sin"] as const) {
        const f = part === "cos" ? tf.cos : tf.sin;
        await c.expectClose(`${part} table`, got[part], expected[part], {
          ...tolerance,
          hint: tablesHint,
          explain: ([t, j]) => `position ${positions[t]}, column ${j} = frequency ${j % (hd / 2)}`,
          mistakes: [
            {
              message: "the angles are interleaved, [a0, a0, a1, a1, …]. The rotate-half layout repeats the whole " +
                "half: [a0, a1, …, a0, a1, …].",
              value: () => f(angles((i) => (2 * i) / hd, positions, true)),
            },
            {
              message: "inv_freq = 1 / base^(i/hd). The exponent is 2i/hd (i counts pairs, 2i dimensions).",
              value: () => f(angles((i) => i / hd, positions, false)),
            },
            {
              message: "the positions were taken as 0 … T−1. Use the positions you are given: in a decode step " +
                "the new token sits after the cached ones.",
              value: () => f(angles((i) => (2 * i) / hd, positions.map((_, t) => t), false)),
            },
          ],
        });
      }
    }

    const B = c.int(1, 2), H = c.int(1, 3), T = c.int(1, 5), hd = c.pick([4, 8]);
    const positions = Array.from({ length: T }, (_, t) => c.int(0, 30) + t);
    const rope = rotaryEmbedding(decoderConfig(1, 1, hd, 1), positions), { cos, sin } = rope;
    const x = c.normal([B, H, T, hd]);
    c.startCase(
      `rotation: x ${shapeText([B, H, T, hd])}, cos and sin ${shapeText([T, hd])} (from nanovlm.ts) → ` +
        `expecting ${shapeText([B, H, T, hd])}`,
    );
    const got = c.call("applyRotary", x, cos, sin);
    const [x1, x2] = tf.split(x, 2, -1);
    await c.expectClose("rotated x", got, applyRotary(x, rope), {
      hint: applyHint,
      explain: ([b, h, t, j]) =>
        `batch ${b}, head ${h}, token ${t}, dimension ${j} (the ${j < hd / 2 ? "first" : "second"} half)`,
      mistakes: [
        {
          message: "rotate_half was concat(x2, −x1): the rotation goes the wrong way. It is concat(−x2, x1).",
          value: () => x.mul(cos).add(tf.concat([x2, x1.neg()], -1).mul(sin)),
        },
        {
          message: "you rotated neighbouring pairs (x0, x1), (x2, x3), … (the layout of Meta's original Llama " +
            "code). Hugging Face Llama and nanoVLM pair x_i with x_{i+hd/2}.",
          value: () => {
            const pairs = x.reshape([B, H, T, hd / 2, 2]);
            const [even, odd] = tf.unstack(pairs, -1); // [B, H, T, hd/2]
            const c2 = cos.slice([0, 0], [T, hd / 2]), s2 = sin.slice([0, 0], [T, hd / 2]);
            const rotated = [even.mul(c2).sub(odd.mul(s2)), odd.mul(c2).add(even.mul(s2))];
            return tf.stack(rotated, -1).reshape([B, H, T, hd]);
          },
        },
        {
          message: "only x·cos: the rotate_half(x)·sin term is missing.",
          value: () => x.mul(cos),
        },
      ],
    });
  },
};

// ---- 06 causal_attention --------------------------------------------------------------

/** Attention with deliberate deviations, to recognise the classic mistakes of exercise 06. */
function attentionVariant(
  p: Params,
  prefix: string,
  cfg: VLMConfig,
  x: tf.Tensor,
  rope: Rope,
  change: { noMask?: boolean; tileHeads?: boolean; noScale?: boolean; keysNotRotated?: boolean; softmaxAxis?: number },
): tf.Tensor {
  const [B, T] = x.shape;
  const H = cfg.lm_n_heads, KV = cfg.lm_n_kv_heads, hd = cfg.lm_hidden_dim / H;
  const w = (k: string) => p.get(`${prefix}.${k}.weight`)!;
  const heads = (t: tf.Tensor, n: number) => t.reshape([B, T, n, hd]).transpose([0, 2, 1, 3]);
  const q = applyRotary(heads(linear(x, w("q_proj")), H), rope);
  let k = heads(linear(x, w("k_proj")), KV);
  if (!change.keysNotRotated) k = applyRotary(k, rope);
  const v = heads(linear(x, w("v_proj")), KV);
  const kvHead = Array.from({ length: H }, (_, h) => change.tileHeads ? h % KV : Math.floor(h / (H / KV)));
  const index = tf.tensor1d(kvHead, "int32");
  let scores = tf.matMul(q, tf.gather(k, index, 1), false, true).mul(change.noScale ? 1 : 1 / Math.sqrt(hd));
  if (!change.noMask) scores = scores.add(attentionBias(undefined, T, T)!.reshape([1, 1, T, T]));
  const out = tf.matMul(tf.softmax(scores, change.softmaxAxis ?? -1), tf.gather(v, index, 1));
  return linear(out.transpose([0, 2, 1, 3]).reshape([B, T, H * hd]), w("out_proj"));
}

const causalAttentionExercise: Exercise = {
  number: "06",
  name: "causal_attention",
  title: "Causal grouped-query attention",
  functions: ["causalSelfAttention"],
  reference: "decoderAttention in nanovlm.ts",
  minutes: 45,
  hint: "Check each step's shape: q [B, H, T, hd], k and v [B, KV, T, hd]; query head h reads key/value head " +
    "floor(h / (H/KV)); scores [B, H, T, T] divided by √hd, −Infinity where key j > query i, softmax over the last " +
    "axis, times v, heads merged back to [B, T, H·hd], then out_proj.",
  async run(c: Check) {
    const heads = [c.pick([[4, 2], [6, 2], [6, 3], [8, 2]]), [4, 1], [4, 4]];
    const names = ["grouped-query", "multi-query: one key/value head", "plain multi-head: KV = H"];
    for (const [i, [H, KV]] of heads.entries()) {
      const hd = c.pick([4, 8]), B = c.int(1, 2), T = c.int(3, 7), D = H * hd;
      const cfg = decoderConfig(H, KV, hd, 1);
      const p = randomDecoderParams(cfg, c), prefix = "decoder.blocks.0.attn";
      const x = c.normal([B, T, D]);
      const rope = rotaryEmbedding(cfg, Array.from({ length: T }, (_, t) => t));
      c.startCase(
        `${names[i]}: x ${shapeText([B, T, D])}, H ${H}, KV ${KV}, hd ${hd}; weights q ` +
          `${shapeText([D, D])}, k and v ${shapeText([D, KV * hd])}, out ${shapeText([D, D])} → expecting ` +
          shapeText([B, T, D]),
      );
      const expected = decoderAttention(p, prefix, cfg, x, rope, attentionBias(undefined, T, T), undefined).out;
      const got = c.call("causalSelfAttention", p, prefix, cfg, x, rope);
      const variant = (change: Parameters<typeof attentionVariant>[5]) => () =>
        attentionVariant(p, prefix, cfg, x, rope, change);
      await c.expectClose("attention output", got, expected, {
        explain: ([b, t, d]) => `batch ${b}, token ${t}, channel ${d}` + (t === 0 ? " (token 0 sees only itself)" : ""),
        mistakes: [
          {
            message: "no causal mask, so every token also reads the tokens after it. Before the softmax set the " +
              "scores to −Infinity where key j > query i.",
            value: variant({ noMask: true }),
          },
          {
            message: "query head h used key/value head h % KV (tf.tile's order). It should be floor(h / (H/KV)): " +
              "neighbouring query heads share a key/value head, like PyTorch's repeat_interleave.",
            value: variant({ tileHeads: true }),
          },
          {
            message: "the scores are not divided by √hd.",
            value: variant({ noScale: true }),
          },
          {
            message: "the keys were not rotated. RoPE rotates both q and k (never v).",
            value: variant({ keysNotRotated: true }),
          },
          {
            message: "the softmax runs over the queries (axis −2). It normalises each query's scores over the keys " +
              "(the last axis).",
            value: variant({ softmaxAxis: -2 }),
          },
        ],
      });
    }
  },
};

// ---- 07 kv_cache_step -----------------------------------------------------------------

const kvCacheStepExercise: Exercise = {
  number: "07",
  name: "kv_cache_step",
  title: "One decoding step with a KV cache",
  functions: ["decodeStep"],
  reference: "decoder + lmHead in nanovlm.ts",
  minutes: 30,
  hint: "The new token's position is the number of tokens already cached (the `position` argument). Pass each " +
    "block its own cache[i] and keep the cache it returns; no attention bias for a single new token; final " +
    "RMSNorm before lmHead.",
  async run(c: Check) {
    const [H, KV] = c.pick([[4, 2], [4, 1], [6, 3]]), hd = 8, blocks = 2, V = 48;
    const cfg = decoderConfig(H, KV, hd, blocks, V), D = H * hd;
    const p = randomDecoderParams(cfg, c), E = p.get("decoder.token_embedding.weight")!;
    const B = c.int(1, 3), T0 = c.int(2, 6);
    const prompt = tf.tensor2d(Array.from({ length: B * T0 }, () => c.int(0, V - 1)), [B, T0], "int32");
    const promptEmbd = tf.gather(E, prompt); // [B, T0, D]
    const { cache } = decoder(p, cfg, promptEmbd); // the prefill: cache[i].k [B, KV, T0, hd]
    const next = Array.from({ length: B }, () => c.int(0, V - 1));
    const nextEmbd = tf.gather(E, tf.tensor2d(next, [B, 1], "int32")); // [B, 1, D]
    const stepAt = (position: number) => {
      const out = decoder(p, cfg, nextEmbd, { cache, startPos: position });
      return { logits: lmHead(p, cfg, out.hidden.reshape([B, D])), cache: out.cache };
    };
    const expected = stepAt(T0);

    // Why a cache is allowed at all: the step gives what recomputing the whole sequence gives.
    const full = decoder(p, cfg, tf.concat([promptEmbd, nextEmbd], 1)).hidden.slice([0, T0, 0], [B, 1, D]);
    const recompute = (await tf.max(tf.abs(lmHead(p, cfg, full.reshape([B, D])).sub(expected.logits))).data())[0];
    c.startCase(
      `${blocks} blocks, H ${H}, KV ${KV}, hd ${hd}, V ${V}; a prompt of ${T0} tokens is cached ` +
        `(cache[i].k and .v ${shapeText([B, KV, T0, hd])}); tokenIds [${next.join(", ")}], position ${T0} → ` +
        `expecting logits ${shapeText([B, V])}, cache ${shapeText([B, KV, T0 + 1, hd])}`,
    );
    c.log(
      `    (the project's cached step equals a full recompute of all ${T0 + 1} tokens: ` +
        `max |difference| ${recompute.toExponential(1)})`,
    );

    const given = new Set<tf.Tensor>(cache.flatMap((kv) => [kv.k, kv.v]));
    const before = tf.memory().numTensors;
    const got = c.call("decodeStep", p, cfg, next, cache, T0) as { logits?: unknown; cache?: unknown } | undefined;
    const created = tf.memory().numTensors - before;
    if (typeof got !== "object" || got === null || !("logits" in got) || !("cache" in got)) {
      c.fail("shape", `decodeStep should return { logits, cache }, got ${describe(got)}`);
    }
    await c.expectClose("logits", got.logits, expected.logits, {
      explain: ([b, v]) => `sequence ${b}, token id ${v}`,
      mistakes: [
        ...[0, T0 - 1, T0 + 1].map((position) => ({
          message: `the new token was rotated as position ${position}. With ${T0} tokens cached (positions 0 … ` +
            `${T0 - 1}) it sits at position ${T0}, the \`position\` argument.`,
          value: () => stepAt(position).logits,
        })),
        {
          message: "the final RMSNorm (decoder.norm.weight) is missing before lmHead.",
          value: () => {
            const rope = rotaryEmbedding(cfg, [T0]);
            let x: tf.Tensor = nextEmbd;
            for (let i = 0; i < blocks; i++) x = decoderBlock(p, cfg, i, x, rope, undefined, cache[i]).out;
            return lmHead(p, cfg, x.reshape([B, D]));
          },
        },
      ],
    });
    const grown = got.cache as KVCache[];
    if (!Array.isArray(grown) || grown.length !== blocks) {
      c.fail(
        "shape",
        `the returned cache should be an array of ${blocks} { k, v } (one per block), got ` +
          describe(grown),
      );
    }
    for (let i = 0; i < blocks; i++) {
      for (const part of ["k", "v"] as const) {
        await c.expectClose(`cache[${i}].${part}`, grown[i]?.[part], expected.cache[i][part], {
          hint: "Keep the cache each decoderBlock returns: the old keys/values with the new token's appended.",
        });
      }
    }

    const returned = new Set(
      [got.logits, ...grown.flatMap((kv) => [kv.k, kv.v])].filter((t) => !given.has(t as tf.Tensor)),
    );
    const leaked = created - returned.size;
    if (leaked > 0) {
      c.fail(
        "leak",
        `the result is right, but the step left ${leaked} intermediate tensors alive. generate() runs it once per ` +
          `token: 100 tokens would leak ${100 * leaked} tensors.`,
        "Wrap the body in tf.tidy(() => { …; return { logits, cache }; }): tidy frees every tensor made inside it " +
          "except the ones returned.",
      );
    }
    if (leaked < 0) {
      c.fail(
        "leak",
        `the step disposed ${-leaked} tensors it did not create (the cache it was given?).`,
        "Leave the given cache alone: the caller disposes it once it has the new one.",
      );
    }
    c.log(`    ✓ no tensors leaked (the step created exactly the ${returned.size} tensors it returned)`);
  },
};

// ---- 08 top_p -------------------------------------------------------------------------

/** Top-p with Hugging Face's shift, or without always keeping the best token: classic mistakes. */
function topPVariant(logits: Float32Array, topP: number, change: "hf-shift" | "drop-first"): Float32Array {
  const out = Float32Array.from(logits);
  const order = Array.from(logits.keys()).sort((a, b) => logits[b] - logits[a]);
  const probs = softmax(order.map((i) => logits[i]));
  let cumulative = 0;
  for (let rank = 0; rank < order.length; rank++) {
    const before = cumulative;
    cumulative += probs[rank];
    const remove = change === "hf-shift" ? rank > 0 && before > topP : cumulative > topP;
    if (remove) out[order[rank]] = -Infinity;
  }
  return out;
}

const topPExercise: Exercise = {
  number: "08",
  name: "top_p",
  title: "Top-p (nucleus) filtering",
  functions: ["topPFilter"],
  reference: "topKTopPFilter(logits, 0, topP) in nanovlm.ts",
  minutes: 20,
  hint: "Sort most likely first; add each token's own probability before comparing (cumulative including itself " +
    "> topP → −Infinity); never remove the most likely token; return kept logits unchanged; topP = 1 changes nothing.",
  async run(c: Check) {
    for (const topP of [c.int(30, 95) / 100, 0.5, 0.05, 1]) {
      const V = c.int(6, 40);
      const logits = Float32Array.from(await c.normal([V], 0, 2).data());
      const original = Float32Array.from(logits);
      c.startCase(`logits: Float32Array of ${V}, topP ${topP} → expecting a new Float32Array of ${V}`);
      const expected = topKTopPFilter(logits, 0, topP);
      const got = c.call("topPFilter", logits, topP);
      if (logits.some((x, i) => x !== original[i])) {
        c.fail("wrong", "topPFilter changed the logits it was given.", "Work on a copy: Float32Array.from(logits).");
      }
      const order = Array.from(logits.keys()).sort((a, b) => logits[b] - logits[a]);
      const probs = softmax(order.map((i) => logits[i]));
      const cumulative = probs.map(((sum) => (p: number) => (sum += p))(0));
      await c.expectClose("filtered logits", got, { shape: [V], data: expected }, {
        atol: 1e-6,
        rtol: 0,
        explain: ([i]) => {
          const rank = order.indexOf(i);
          return `token ${i}: rank ${rank} by probability, p ${probs[rank].toFixed(3)}, cumulative ` +
            `${cumulative[rank].toFixed(3)} including itself`;
        },
        mistakes: [
          {
            message: "Hugging Face's rule, which keeps the token that crosses topP (it compares the cumulative " +
              "probability *before* the token). nanoVLM counts the token itself, so that token is removed.",
            value: () => ({ shape: [V], data: topPVariant(logits, topP, "hf-shift") }),
          },
          {
            message: "the most likely token was removed too. Always keep it, even when its probability alone " +
              "is above topP: otherwise nothing is left to sample.",
            value: () => ({ shape: [V], data: topPVariant(logits, topP, "drop-first") }),
          },
        ],
      });
    }
  },
};

// ---- 09 lr_schedule -------------------------------------------------------------------

const lrScheduleExercise: Exercise = {
  number: "09",
  name: "lr_schedule",
  title: "Learning-rate schedule: warmup + cosine",
  functions: ["lrSchedule"],
  reference: "lrSchedule in lib/optimizer.ts",
  minutes: 15,
  hint: "Check the phases at their edges: step 0 gets maxLr/warmup (not 0); the rate reaches maxLr as the warmup " +
    "ends; it is exactly 0.1·maxLr at step maxSteps and stays there. The warmup length 0.03·maxSteps is not rounded.",
  async run(c: Check) {
    for (const maxSteps of [c.int(40, 400), c.pick([30, 100, 5000])]) {
      const maxLr = c.pick([1e-4, 3e-4, 2e-3, 1e-2]), warmup = 0.03 * maxSteps, minLr = 0.1 * maxLr;
      const steps = Array.from({ length: maxSteps + 4 }, (_, s) => s);
      c.startCase(
        `maxSteps ${maxSteps} (warmup ${Number(warmup.toFixed(2))} steps), maxLr ${maxLr}: steps 0 … ` +
          `${maxSteps + 3} → expecting ${steps.length} learning rates`,
      );
      const got = new Float64Array(steps.length);
      for (const s of steps) {
        const lr = c.call("lrSchedule", s, maxLr, maxSteps);
        if (typeof lr !== "number") c.fail("shape", `lrSchedule(${s}, ${maxLr}, ${maxSteps}) returned ${describe(lr)}`);
        got[s] = lr;
      }
      const schedule = (f: (s: number) => number) => ({ shape: [steps.length], data: steps.map(f) });
      const cosine = (s: number, from: number, floor: number) =>
        s > maxSteps ? floor : floor + 0.5 * (1 + Math.cos(Math.PI * (s - from) / (maxSteps - from))) * (maxLr - floor);
      await c.expectClose(
        "learning rates",
        { shape: [steps.length], data: got },
        schedule((s) => lrSchedule(s, maxLr, maxSteps)),
        {
          atol: 0,
          rtol: 1e-6,
          explain: ([s]) =>
            s < warmup
              ? `step ${s}, in the warmup`
              : s > maxSteps
              ? `step ${s}, after maxSteps`
              : `step ${s}, ratio ${((s - warmup) / (maxSteps - warmup)).toFixed(3)} through the cosine decay`,
          mistakes: [
            {
              message: "the warmup starts at 0: maxLr·step/warmup. Steps count from 0 and step 0 trains too, so it " +
                "gets maxLr·(step + 1)/warmup.",
              value: () => schedule((s) => s < warmup ? maxLr * s / warmup : cosine(s, warmup, minLr)),
            },
            ...[Math.round, Math.floor, Math.ceil].map((round) => ({
              message: `the warmup length was rounded (${round.name}(0.03·maxSteps)). nanoVLM keeps the float.`,
              value: () => {
                const w = round(warmup);
                return schedule((s) => s < w ? maxLr * (s + 1) / w : cosine(s, w, minLr));
              },
            })),
            {
              message: "the cosine decays to 0. It stops at minLr = 0.1·maxLr.",
              value: () => schedule((s) => s < warmup ? maxLr * (s + 1) / warmup : cosine(s, warmup, 0)),
            },
            {
              message: "the cosine runs over the whole run, cos(π·step/maxSteps). It starts where the warmup ends: " +
                "ratio = (step − warmup)/(maxSteps − warmup).",
              value: () => schedule((s) => s < warmup ? maxLr * (s + 1) / warmup : cosine(s, 0, minLr)),
            },
            {
              message: "a linear decay. The decay follows half a cosine: minLr + ½(1 + cos(π·ratio))(maxLr − minLr).",
              value: () =>
                schedule((s) =>
                  s < warmup
                    ? maxLr * (s + 1) / warmup
                    : s > maxSteps
                    ? minLr
                    : maxLr - (maxLr - minLr) * (s - warmup) / (maxSteps - warmup)
                ),
            },
          ],
        },
      );
    }
  },
};

// ---- 10 training_step -----------------------------------------------------------------

/** A small VLM for the training-step check: 16×16 images, 4 image tokens, vocabulary 40 (<|image|> = 39). */
function smallVlmConfig(): VLMConfig {
  return {
    ...decoderConfig(4, 2, 8, 1, 40),
    vit_hidden_dim: 16,
    vit_inter_dim: 32,
    vit_img_size: 16,
    vit_patch_size: 4,
    vit_n_heads: 2,
    vit_n_blocks: 1,
    lm_max_length: 32,
    mp_image_token_length: 4,
  };
}

/** A collated batch as data.ts makes them: 2 samples, left-padded, images in sample order, loss on the answers. */
async function randomBatch(c: Check, cfg: VLMConfig): Promise<Batch> {
  const L = cfg.mp_image_token_length, IMG = cfg.lm_base_vocab_size, S = cfg.vit_img_size;
  const imageCounts = [1, c.int(0, 1)];
  const rows = imageCounts.map((n) => [
    ...Array(n * L).fill(IMG),
    ...Array.from({ length: c.int(2, 5) }, () => c.int(3, IMG - 1)), // the question
    ...Array.from({ length: c.int(1, 3) }, () => c.int(3, IMG - 1)), // the answer
  ]);
  const T = Math.max(...rows.map((r) => r.length)) + 1;
  rows[1].unshift(...Array(T - rows[1].length).fill(3)); // sample 1 fills the width: no all-padding column
  const inputIds = new Int32Array(2 * T), labels = new Int32Array(2 * T).fill(-100), mask = new Int32Array(2 * T);
  rows.forEach((row, b) => {
    const pad = T - row.length;
    row.forEach((id, t) => {
      inputIds[b * T + pad + t] = id;
      mask[b * T + pad + t] = 1;
    });
    for (let t = T - 3; t < T - 1; t++) labels[b * T + t] = inputIds[b * T + t + 1]; // the last tokens are the answer
  });
  const imageCount = imageCounts[0] + imageCounts[1];
  const images = Float32Array.from(await c.uniform([imageCount * 3 * S * S]).data());
  return {
    inputIds,
    labels,
    attentionMask: mask,
    batchSize: 2,
    length: T,
    images,
    imageCount,
    imageCounts,
    imageSize: S,
    dropped: 0,
  };
}

/**
 * AdamW that keeps a copy of the gradients (as applied: times `gradScale`, which trainStep uses to clip) and learning
 * rates it is given, so the check can compare them.
 */
class RecordingAdamW extends AdamW {
  grads?: Map<string, Values>;
  lrs?: number[];

  override step(grads: Map<string, tf.Tensor>, lrs: number[], gradScale = 1): void {
    // dataSync: step is synchronous, and the checks run on the cpu backend.
    this.grads = new Map(
      [...grads].map(([name, g]) => [name, { shape: g.shape, data: g.dataSync().map((x) => x * gradScale) }]),
    );
    this.lrs = [...lrs];
    super.step(grads, lrs, gradScale);
  }
}

const trainingStepExercise: Exercise = {
  number: "10",
  name: "training_step",
  title: "One training step",
  functions: ["trainingStep"],
  reference: "trainStep in lib/train_step.ts",
  minutes: 40,
  hint: "tf.variableGrads(() => model.forward(…).loss!, optimizer.variables) gives grads keyed by variable.name; " +
    "optimizer.step wants them keyed by the nanoVLM names, optimizer.trainable[i] for optimizer.variables[i]. " +
    "Clip with one global norm over all gradients; return the norm before clipping.",
  async run(c: Check) {
    const cfg = smallVlmConfig();
    const cases = [
      { what: "a norm above maxGradNorm: clipping scales every gradient", maxGradNorm: 0.01 },
      { what: "a norm below maxGradNorm: nothing to clip", maxGradNorm: 1e3 },
    ];
    for (const { what, maxGradNorm } of cases) {
      const seed = c.int(0, 2 ** 20);
      const models = [0, 1].map(() => new VisionLanguageModel(cfg, { seed }));
      const [ref, student] = models.map((m) => new RecordingAdamW(m.params, paramGroups(m, 1e-2, 1e-3)));
      c.cleanups.push(() => {
        models.forEach((m) => m.dispose());
        ref.dispose();
        student.dispose();
      });
      const batch = await randomBatch(c, cfg);
      const step = c.int(0, 99);
      const lrs = ref.groups.map((g) => lrSchedule(step, g.maxLr, 100));
      c.startCase(
        `${what}: a ${models[0].parameterCount()}-parameter VLM, inputIds [2, ${batch.length}], images ` +
          `[${batch.imageCount}, 3, 16, 16], maxGradNorm ${maxGradNorm}, lrs [${
            lrs.map((lr) => lr.toExponential(2))
          }]` +
          ` (projector, backbones) → expecting { loss, gradNorm } and updated weights`,
      );
      const expected = await trainStep(models[0], [batch], ref, { lrs, maxGradNorm });
      if ((expected.gradNorm > maxGradNorm) !== maxGradNorm < 1) {
        throw new Error(
          `this case needs a gradient norm on the other side of ${maxGradNorm}, got ${expected.gradNorm}`,
        );
      }
      const tensors = batchTensors(batch);
      const before = tf.memory().numTensors;
      const got = await c.callAsync("trainingStep", models[1], tensors, student, lrs, maxGradNorm) as
        | { loss?: unknown; gradNorm?: unknown }
        | undefined;
      const created = tf.memory().numTensors - before;
      if (typeof got !== "object" || got === null || typeof got.loss !== "number" || typeof got.gradNorm !== "number") {
        c.fail("shape", `trainingStep should resolve to { loss: number, gradNorm: number }, got ${describe(got)}`);
      }
      const { gradNorm } = expected, scale = gradNorm > maxGradNorm ? maxGradNorm / (gradNorm + 1e-6) : 1;
      await c.expectClose("loss", got.loss, expected.loss, {
        hint: "The loss is model.forward(inputIds, images, attentionMask, labels).loss, read with await value.data().",
      });
      await c.expectClose("gradNorm", got.gradNorm, gradNorm, {
        hint: "The norm is sqrt of the sum of g² over every element of every gradient, measured before clipping.",
        mistakes: [{
          message: "the norm after clipping. Return the one measured before.",
          value: () => Math.min(gradNorm, maxGradNorm),
        }],
      });
      if (!student.grads) {
        c.fail("wrong", "optimizer.step was never called.", "Finish with optimizer.step(grads, lrs).");
      }
      const names = [...ref.grads!.keys()], given = [...student.grads.keys()];
      if (given.length !== names.length || given.some((name) => !ref.grads!.has(name))) {
        c.fail(
          "wrong",
          `optimizer.step got gradients for ${given.length} names (e.g. "${given[0]}"), it needs one for each of ` +
            `the ${names.length} trainable parameters, by nanoVLM name (e.g. "${names[0]}")`,
        );
      }
      await c.expectClose("lrs given to optimizer.step", student.lrs, { shape: [lrs.length], data: lrs }, {
        atol: 0,
        rtol: 1e-12,
        hint: "Pass lrs through unchanged: one per optimizer group, in optimizer.groups order.",
      });
      let gradDiff = 0;
      for (const name of names) {
        const want = ref.grads!.get(name)!;
        const times = (k: number) => () => ({ shape: want.shape, data: Float32Array.from(want.data, (x) => x * k) });
        const raw = times(1 / scale)().data;
        let tensorNorm = 0;
        for (const x of raw) tensorNorm += x * x;
        tensorNorm = Math.sqrt(tensorNorm);
        gradDiff = Math.max(
          gradDiff,
          await c.expectClose(`gradient of ${name} given to optimizer.step`, student.grads.get(name), want, {
            quiet: true,
            atol: 1e-7,
            rtol: 1e-4,
            mistakes: [
              {
                message: "the gradients were not clipped. Scale all of them by maxGradNorm / (norm + 1e-6).",
                value: times(1 / scale),
              },
              {
                message:
                  "each gradient was clipped by its own norm. clip_grad_norm_ uses one norm over all gradients " +
                  "together, so their directions relative to each other are kept.",
                value: () => ({
                  shape: want.shape,
                  data: raw.map((x) => x * Math.min(1, maxGradNorm / (tensorNorm + 1e-6))),
                }),
              },
              {
                message: "the gradients were scaled although the norm is below maxGradNorm. Clip only when norm > " +
                  "maxGradNorm: clipping never makes a gradient bigger.",
                value: times(maxGradNorm / (gradNorm + 1e-6)),
              },
            ],
          }),
        );
      }
      c.log(
        `    ✓ all ${names.length} gradients given to optimizer.step match (max |difference| ${
          gradDiff.toExponential(1)
        })`,
      );
      let weightDiff = 0;
      for (const name of names) {
        const weights = await c.expectClose(
          `${name} after the step`,
          models[1].params.get(name),
          models[0].params.get(name)!,
          {
            quiet: true,
            hint: "With the right gradients and lrs, optimizer.step(grads, lrs) does the update: call it once.",
          },
        );
        weightDiff = Math.max(weightDiff, weights);
      }
      c.log(`    ✓ all ${names.length} weights match after the step (max |difference| ${weightDiff.toExponential(1)})`);
      if (created !== 0) {
        c.fail(
          "leak",
          created > 0
            ? `the step is right, but it left ${created} tensors alive. Training runs thousands of steps: the ` +
              `memory would run out.`
            : `the step disposed ${-created} tensors it did not create (the batch? the weights?).`,
          "Dispose every gradient (the clipped ones and any you replaced) and the loss tensor once you have read it.",
        );
      }
      c.log(`    ✓ no tensors leaked`);
    }
  },
};

// ---- All exercises, in order ---------------------------------------------------------

/** Every exercise, in the suggested order. */
export const EXERCISES: readonly Exercise[] = [
  rmsNormExercise,
  patchifyExercise,
  pixelShuffleExercise,
  imageTokensExercise,
  rotaryExercise,
  causalAttentionExercise,
  kvCacheStepExercise,
  topPExercise,
  lrScheduleExercise,
  trainingStepExercise,
];

// ---- Running a check ---------------------------------------------------------------------

/** Where a stack trace enters the student's file, e.g. "exercises/01_rms_norm.ts:31:9". */
function locationIn(error: unknown, file: string): string | undefined {
  const stack = error instanceof Error ? error.stack ?? "" : "";
  const match = stack.match(new RegExp(`(exercises/(?:solutions/)?${file.replace(".", "\\.")}:\\d+:\\d+)`));
  return match?.[1];
}

/**
 * Check one exercise against an implementation (the student's module, a solution, or any
 * object holding the functions). Logs as it goes and never throws.
 */
export async function checkExercise(
  ex: Exercise,
  impl: Record<string, unknown>,
  options: { seed?: number; log?: (line: string) => void; fileLabel?: string } = {},
): Promise<CheckResult> {
  const seed = options.seed ?? Math.floor(Math.random() * 1_000_000);
  const log = options.log ?? console.log;
  const file = options.fileLabel ?? `exercises/${exerciseFile(ex)}`;
  log(`${ex.number} ${ex.name}: ${ex.title} (${file})`);
  log(`  seed ${seed} (repeat these inputs with --seed ${seed})`);
  const result = (status: Status, message = "", firstWrong?: WrongElement): CheckResult => {
    const verdict = status === "pass" ? "PASS" : status === "todo" ? "TODO" : "FAIL";
    log(`${verdict} ${ex.number} ${ex.name}${message ? `: ${message}` : ""}`);
    return { exercise: ex.name, status, passed: status === "pass", message, firstWrong, seed };
  };

  const check = new Check(seed, impl, ex, log);
  tf.engine().startScope(); // every tensor made during the check is freed at the end
  try {
    const absent = ex.functions.filter((name) => typeof impl[name] !== "function");
    if (absent.length) {
      return result(
        "missing",
        `${file} does not export ${absent.map((name) => `a function ${name}`).join(" and ")}. Keep the ` +
          `stub's \`export function\` line${absent.length > 1 ? "s" : ""} and name${absent.length > 1 ? "s" : ""}.`,
      );
    }
    await ex.run(check);
    return result("pass");
  } catch (e) {
    if (e instanceof TodoError) {
      return result(
        "todo",
        `not written yet: ${e.message}\n  Replace the \`throw new TodoError(…)\` in ${file} with your code, then ` +
          `run \`deno task exercise ${ex.name}\` again.`,
      );
    }
    if (e instanceof CheckFailure) {
      const hint = e.options.hint ?? ex.hint;
      return result(e.status, e.message + (hint ? `\n  hint: ${hint}` : ""), e.options.firstWrong);
    }
    if (e instanceof StudentError) {
      const inner = e.error instanceof Error ? `${e.error.name}: ${e.error.message}` : String(e.error);
      const at = locationIn(e.error, exerciseFile(ex));
      return result(
        "error",
        `your ${e.functionName} threw ${inner}${at ? `\n  at ${at}` : ""}` + (ex.hint ? `\n  hint: ${ex.hint}` : ""),
      );
    }
    return result("error", `the check itself failed, which is a bug in exercises/check.ts: ${(e as Error).stack ?? e}`);
  } finally {
    for (const cleanup of check.cleanups) cleanup();
    tf.engine().endScope();
  }
}

/** Import the student's stub or the reference solution of an exercise. */
export function loadExercise(ex: Exercise, solution: boolean): Promise<Record<string, unknown>> {
  return import(new URL(`./${solution ? "solutions/" : ""}${exerciseFile(ex)}`, import.meta.url).href);
}

/** Load and check one exercise; a module that fails to load is reported, not thrown. */
export async function runExercise(
  ex: Exercise,
  options: { solution?: boolean; seed?: number; log?: (line: string) => void } = {},
): Promise<CheckResult> {
  const fileLabel = `exercises/${options.solution ? "solutions/" : ""}${exerciseFile(ex)}`;
  let impl: Record<string, unknown>;
  try {
    impl = await loadExercise(ex, options.solution ?? false);
  } catch (e) {
    const log = options.log ?? console.log;
    const message = `could not load ${fileLabel}: ${(e as Error).message ?? e}`;
    log(`FAIL ${ex.number} ${ex.name}: ${message}`);
    return { exercise: ex.name, status: "missing", passed: false, message, seed: options.seed ?? 0 };
  }
  return checkExercise(ex, impl, { ...options, fileLabel });
}

/** An exercise by name ("rms_norm"), number ("01", "1"), file name or path; undefined if none. */
export function findExercise(query: string): Exercise | undefined {
  const q = query.replace(/^.*\//, "").replace(/\.ts$/, "");
  return EXERCISES.find((ex) =>
    q === ex.name || q === ex.number || q === String(Number(ex.number)) || q === `${ex.number}_${ex.name}`
  );
}

// ---- Command line --------------------------------------------------------------------------

const USAGE = `usage: deno task exercise <name>...      check your exercises (e.g. rms_norm, 01, or all)
       deno task exercise --solutions       check the reference solutions (all, or the names given)
       deno task exercise --list            list the exercises
options: --seed N   repeat the random inputs of an earlier run`;

function listing(): string {
  const rows = EXERCISES.map((ex) =>
    `  ${ex.number}  ${ex.name.padEnd(18)} ${ex.title.padEnd(44)} ~${ex.minutes} min   exercises/${exerciseFile(ex)}`
  );
  return ["Exercises, in the suggested order (teachers: exercises/README.md):", ...rows].join("\n");
}

/** The command line: returns the exit status (0 all passed, 1 something failed, 2 bad usage). */
export async function main(args: string[]): Promise<number> {
  let parsed;
  try {
    parsed = parseArgs({
      args,
      options: {
        solutions: { type: "boolean" },
        list: { type: "boolean" },
        seed: { type: "string" },
        help: { type: "boolean", short: "h" },
      },
      allowPositionals: true,
    });
  } catch (e) {
    console.error(`${(e as Error).message}\n${USAGE}`);
    return 2;
  }
  const { values, positionals } = parsed;
  if (values.help || values.list || (positionals.length === 0 && !values.solutions)) {
    console.log(values.list ? listing() : `${USAGE}\n\n${listing()}`);
    return 0;
  }
  const seed = values.seed === undefined ? undefined : Number(values.seed);
  if (seed !== undefined && !Number.isInteger(seed)) {
    console.error(`--seed must be an integer, got "${values.seed}"`);
    return 2;
  }
  const chosen: Exercise[] = [];
  for (const name of positionals.length && !positionals.includes("all") ? positionals : EXERCISES.map((e) => e.name)) {
    const ex = findExercise(name);
    if (!ex) {
      console.error(`unknown exercise "${name}"\n${listing()}`);
      return 2;
    }
    chosen.push(ex);
  }

  await initBackend("cpu", { quiet: true });
  const results: CheckResult[] = [];
  for (const ex of chosen) {
    if (results.length) console.log("");
    results.push(await runExercise(ex, { solution: values.solutions, seed }));
  }
  if (results.length > 1) {
    const count = (s: (r: CheckResult) => boolean) => results.filter(s).length;
    console.log(
      `\n${count((r) => r.passed)} of ${results.length} passed` +
        (values.solutions ? " (reference solutions)" : `, ${count((r) => r.status === "todo")} not started`) +
        (count((r) => !r.passed)
          ? `; failing: ${results.filter((r) => !r.passed).map((r) => r.exercise).join(", ")}`
          : ""),
    );
  }
  return results.every((r) => r.passed) ? 0 : 1;
}

if (import.meta.main) Deno.exit(await main(Deno.args));
