// lib/optimizer.ts — how train.ts changes the weights: the reference's learning-rate schedule, AdamW over its two
// parameter groups, and clipping by the global gradient norm.

import * as tf from "@tensorflow/tfjs";
import type { VisionLanguageModel } from "../nanovlm.ts";
import { SimdAdamW, webgpuAdamWStep, webgpuSumOfSquares } from "../backend/kernels.ts";
import type { SafetensorsTensor } from "./safetensors.ts";

// ---- Learning-rate schedule ---------------------------------------------------------------------

/**
 * The reference's `get_lr`: linear warmup over the first 3% of the steps, then a cosine
 * from maxLr down to 10% of it at the last step (and 10% after). `step` counts from 0.
 */
export function lrSchedule(step: number, maxLr: number, maxSteps: number): number {
  const minLr = 0.1 * maxLr;
  const warmup = 0.03 * maxSteps; // a float, as in the reference: 150 for 5000 steps
  if (step < warmup) return (maxLr * (step + 1)) / warmup;
  if (step > maxSteps) return minLr;
  const ratio = (step - warmup) / (maxSteps - warmup);
  return minLr + 0.5 * (1 + Math.cos(Math.PI * ratio)) * (maxLr - minLr);
}

// ---- AdamW --------------------------------------------------------------------------------------
//
// torch.optim.AdamW with its defaults, written out so a reader sees every term. Step t
// (from 1) for each parameter p with gradient g:
//   p ← p − lr·wd·p                       decoupled weight decay, on every parameter
//   m ← β1·m + (1−β1)·g                   first moment
//   v ← β2·v + (1−β2)·g²                  second moment
//   p ← p − lr/(1−β1ᵗ) · m / (√v/√(1−β2ᵗ) + ε)   bias-corrected step
// The reference gives the projector its own, larger learning rate: freshly initialised
// layers between two (normally pretrained) backbones need to move faster.

/** A named set of parameters sharing one learning rate. */
export interface ParamGroup {
  name: string;
  /** Peak learning rate (the schedule scales it). */
  maxLr: number;
  /** nanoVLM parameter names. */
  params: string[];
}

/**
 * The reference's groups: `MP.*` at lr_mp, the vision encoder and the decoder at
 * lr_backbones. With lr_backbones = 0 the backbones are frozen: they are left out
 * entirely (no gradient, no weight decay), as the reference sets requires_grad = False.
 * Given an `lrVision` of its own, the vision encoder is a group apart at that rate (0 freezes it), as later
 * nanoVLM versions split their backbones: a pretrained encoder trained gently keeps what it learned.
 */
export function paramGroups(
  model: VisionLanguageModel,
  lrMp: number,
  lrBackbones: number,
  lrVision = lrBackbones,
): ParamGroup[] {
  const names = [...model.params.keys()];
  const groups: ParamGroup[] = [{ name: "mp", maxLr: lrMp, params: names.filter((n) => n.startsWith("MP.")) }];
  const backbones = names.filter((n) => !n.startsWith("MP."));
  if (lrVision === lrBackbones) {
    if (lrBackbones > 0) groups.push({ name: "backbones", maxLr: lrBackbones, params: backbones });
    return groups;
  }
  const isVision = (n: string) => n.startsWith("vision_encoder.");
  if (lrVision > 0) groups.push({ name: "vision", maxLr: lrVision, params: backbones.filter(isVision) });
  if (lrBackbones > 0) {
    groups.push({ name: "decoder", maxLr: lrBackbones, params: backbones.filter((n) => !isVision(n)) });
  }
  return groups;
}

/** AdamW options; the defaults are torch's. */
export interface AdamWOptions {
  beta1?: number;
  beta2?: number;
  eps?: number;
  weightDecay?: number;
  /**
   * Keep m and v outside the tensors, in a WebAssembly memory of their own, and update one parameter at a time
   * with backend/kernels.ts's SIMD kernel (`SimdAdamW`), instead of as tensors beside the weights: for the wasm backend, whose
   * heap holds at most 4 GiB (the 222M preset's moments alone are 1.8 GB; README, "Full size on a CPU"). Same results
   * to float32 rounding; wasm and cpu only (it reads the weights synchronously).
   */
  momentsOnHost?: boolean;
}

/**
 * torch.optim.AdamW over parameter groups; moments live beside the weights as tf tensors, or on the host. With tensor
 * moments a step only queues device work and reads nothing back; momentsOnHost reads every weight and gradient on the
 * host, which is the point of it (wasm and cpu only, where the host is the same memory).
 */
export class AdamW {
  readonly groups: ParamGroup[];
  readonly beta1: number;
  readonly beta2: number;
  readonly eps: number;
  readonly weightDecay: number;
  readonly momentsOnHost: boolean;
  /** Optimizer steps taken so far (t of the bias correction is stepCount + 1 during a step). */
  stepCount = 0;
  private readonly params: Map<string, tf.Variable>;
  private readonly expAvg = new Map<string, tf.Tensor>(); // m
  private readonly expAvgSq = new Map<string, tf.Tensor>(); // v
  private hostMoments: SimdAdamW | undefined; // m and v with momentsOnHost

  constructor(params: Map<string, tf.Variable>, groups: ParamGroup[], options: AdamWOptions = {}) {
    this.params = params;
    this.groups = groups;
    this.beta1 = options.beta1 ?? 0.9;
    this.beta2 = options.beta2 ?? 0.999;
    this.eps = options.eps ?? 1e-8;
    this.weightDecay = options.weightDecay ?? 0.01;
    this.momentsOnHost = options.momentsOnHost ?? false;
    for (const [name, beta] of [["beta1", this.beta1], ["beta2", this.beta2]] as const) {
      if (!(beta >= 0 && beta < 1)) throw new Error(`AdamW: ${name} must be in [0, 1), got ${beta}`);
    }
    if (this.momentsOnHost && tf.getBackend() === "webgpu") {
      throw new Error("AdamW: momentsOnHost is for the wasm and cpu backends (it reads tensors synchronously)");
    }
    for (const name of this.trainable) {
      const p = params.get(name);
      if (!p) throw new Error(`AdamW: the model has no parameter ${name}`);
      if (!this.momentsOnHost) {
        this.expAvg.set(name, tf.zerosLike(p));
        this.expAvgSq.set(name, tf.zerosLike(p));
      }
    }
    if (this.momentsOnHost) {
      this.hostMoments = new SimdAdamW(new Map(this.trainable.map((name) => [name, params.get(name)!.size])));
    }
  }

  /** Names of every parameter the optimizer updates, group by group. */
  get trainable(): string[] {
    return this.groups.flatMap((g) => g.params);
  }

  /** The trainable variables, in `trainable` order (for tf.variableGrads). */
  get variables(): tf.Variable[] {
    return this.trainable.map((name) => this.params.get(name)!);
  }

  /**
   * One update with `grads` (by parameter name) times `gradScale` (gradient clipping's coefficient, applied as each
   * gradient is read rather than in a pass of its own) and one learning rate per group (same order as `groups`).
   */
  step(grads: Map<string, tf.Tensor>, lrs: number[], gradScale = 1): void {
    if (lrs.length !== this.groups.length) throw new Error(`AdamW: ${this.groups.length} groups but ${lrs.length} lrs`);
    const t = ++this.stepCount;
    const bc1 = 1 - this.beta1 ** t, bc2Sqrt = Math.sqrt(1 - this.beta2 ** t);
    this.groups.forEach((group, i) => {
      const { beta1, beta2, eps } = this, lr = lrs[i];
      const decay = 1 - lr * this.weightDecay, stepSize = lr / bc1, invBc2Sqrt = 1 / bc2Sqrt;
      const constants = { gradScale, beta1, beta2, decay, stepSize, invBc2Sqrt, eps };
      for (const name of group.params) {
        const p = this.params.get(name)!, g = grads.get(name);
        if (!g) throw new Error(`AdamW: no gradient for ${name}`);
        if (this.hostMoments) {
          const updated = this.hostMoments.step(name, p, g, constants);
          p.assign(updated);
          updated.dispose();
          continue;
        }
        const [m, v] = [this.expAvg.get(name)!, this.expAvgSq.get(name)!];
        // On WebGPU three fused passes (backend/kernels.ts: ops would be about fifteen dispatches); elsewhere tfjs ops, which
        // round as torch.optim.AdamW does.
        const next = tf.getBackend() === "webgpu" ? webgpuAdamWStep(p, g, m, v, constants) : tf.tidy(() => {
          const scaled = gradScale === 1 ? g : g.mul(gradScale);
          const m1 = m.mul(beta1).add(scaled.mul(1 - beta1));
          const v1 = v.mul(beta2).add(scaled.square().mul(1 - beta2));
          const denom = v1.sqrt().div(bc2Sqrt).add(eps);
          return { p: p.mul(decay).sub(m1.div(denom).mul(stepSize)), m: m1, v: v1 };
        });
        p.assign(next.p);
        next.p.dispose();
        this.expAvg.set(name, next.m);
        this.expAvgSq.set(name, next.v);
        tf.dispose([m, v]);
      }
    });
  }

  /** The moments as F32 tensors named `exp_avg.<param>` / `exp_avg_sq.<param>` (torch's names; our layout). */
  async state(): Promise<Map<string, { dtype: "F32"; shape: number[]; data: Float32Array }>> {
    const out = new Map<string, { dtype: "F32"; shape: number[]; data: Float32Array }>();
    for (const name of this.hostMoments ? this.trainable : []) {
      const shape = this.params.get(name)!.shape, { m, v } = this.hostMoments!.state(name);
      out.set(`exp_avg.${name}`, { dtype: "F32", shape, data: m });
      out.set(`exp_avg_sq.${name}`, { dtype: "F32", shape, data: v });
    }
    for (const [kind, moments] of [["exp_avg", this.expAvg], ["exp_avg_sq", this.expAvgSq]] as const) {
      for (const [name, t] of moments) {
        out.set(`${kind}.${name}`, { dtype: "F32", shape: t.shape, data: (await t.data()) as Float32Array });
      }
    }
    return out;
  }

  /** Restore moments saved by `state` (every trainable parameter's, with matching shapes) and the step count. */
  loadState(tensors: Map<string, SafetensorsTensor>, stepCount: number, source = "optimizer state"): void {
    const problems: string[] = [];
    for (const kind of ["exp_avg", "exp_avg_sq"]) {
      for (const name of this.trainable) {
        const saved = tensors.get(`${kind}.${name}`), shape = this.params.get(name)!.shape;
        if (!saved) problems.push(`missing ${kind}.${name}`);
        else if (saved.shape.join() !== shape.join()) {
          problems.push(`${kind}.${name} has shape [${saved.shape}], the model needs [${shape}]`);
        }
      }
    }
    if (problems.length) {
      throw new Error(`${source} does not fit this model and optimizer:\n  ${problems.join("\n  ")}`);
    }
    for (const [kind, moments] of [["exp_avg", this.expAvg], ["exp_avg_sq", this.expAvgSq]] as const) {
      for (const name of this.trainable) {
        const saved = tensors.get(`${kind}.${name}`)!;
        if (this.hostMoments) this.hostMoments.state(name)[kind === "exp_avg" ? "m" : "v"].set(saved.data);
        else {
          moments.get(name)!.dispose();
          moments.set(name, tf.tensor(saved.data as Float32Array, saved.shape, "float32"));
        }
      }
    }
    this.stepCount = stepCount;
  }

  /** Free the moments. */
  dispose(): void {
    tf.dispose([...this.expAvg.values(), ...this.expAvgSq.values()]);
    this.expAvg.clear();
    this.expAvgSq.clear();
    this.hostMoments = undefined; // its memory goes with the last reference
  }
}

/**
 * Whether AdamW keeps its moments outside the tensors and updates each parameter with a WebAssembly SIMD kernel
 * (`momentsOnHost`): on wasm and cpu, where that kernel reads the weights and gradients in place. There it is quicker
 * than AdamW's fifteen or so tfjs kernels per parameter (a step of the tiny preset's optimizer: 1.4 against 19 ms;
 * cpu-5m: 5 against 36 ms) and keeps 8 bytes per parameter off the 4 GiB wasm heap, which the 222M needs (README,
 * "Full size on a CPU"). On WebGPU the moments stay on the GPU: reading every weight back each step would cost far
 * more.
 */
export function adamWOnHost(backend: string): boolean {
  return backend !== "webgpu";
}

// ---- Gradient clipping --------------------------------------------------------------------------
//
// torch.nn.utils.clip_grad_norm_ in two halves, so that trainStep can read the norm together with the loss in one
// GPU→CPU read: `gradientNorm` stays on the device; once the norm is read, `clipCoefficient` turns it into the factor
// that AdamW.step applies as it reads each gradient (its `gradScale`), instead of a pass that scales them in place.
// (The scale could stay on the device too, but the norm is read anyway for the log and the NaN guard, and a JS number
// lets an unclipped step skip the multiply.)

/** The L2 norm of all gradients together, as a scalar tensor (not read). grads: any shapes → [] */
export function gradientNorm(grads: Map<string, tf.Tensor>): tf.Scalar {
  // On wasm and cpu each sum of squares is the dot product g·g, a [1, n]·[n, 1] matMul: it reads g once (with BLAS on
  // every core, in SIMD partial sums), where square().sum() writes g² first and then adds it up in one float32 (for
  // the 222M's 47M-float embedding 0.5% off, and 5× slower). WebGPU's matMul is not made for a single output: there
  // one WGSL program reads g once and adds in a tree (backend/kernels.ts).
  const sumOfSquares = tf.getBackend() === "webgpu" ? webgpuSumOfSquares : (g: tf.Tensor) => {
    const row = g.reshape([1, -1]); // [1, n]
    return row.matMul(row, false, true).reshape([]); // [1, n]·[n, 1] → []
  };
  return tf.tidy(() => tf.addN([...grads.values()].map(sumOfSquares)).sqrt() as tf.Scalar);
}

/** What clipping multiplies every gradient by: maxNorm / (norm + 1e-6) when that is below 1, else 1 (maxNorm ≤ 0: 1). */
export function clipCoefficient(norm: number, maxNorm: number): number {
  const coef = maxNorm / (norm + 1e-6);
  return maxNorm <= 0 || coef >= 1 ? 1 : coef;
}
