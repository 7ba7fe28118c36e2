// bench.ts — how fast and how big: `deno task bench`.
//
// One table per run. For a model config (a preset, or one of the comparison configs
// below), a backend and some batch sizes, each row measures:
//   - the training step: forward + backward + AdamW, the trainer's own `trainStep` (lib/train_step.ts;
//     ms, samples/s), in train.ts's low-memory mode where it would use it (nanovlm-222m on wasm),
//     and with as many threads as train.ts would use (--threads: helper threads of parallel.ts
//     share the rows of a batch large enough to split),
//   - a forward pass with the loss, and forward + backward without the optimizer (ms),
//   - generation with the KV cache: time to first token (prefill, ViT included) and decode tokens/s,
//   - memory: the peak bytes of live tensors during a step (tf.profile), the backend's own
//     high-water mark (wasm heap or WebGPU buffer pool) and the process's peak RSS,
//   - kernels: how many one step runs (reshapes aside), to multiply by the kernel probe;
// plus two probes of the backend: matMul GFLOP/s, and the µs one small kernel costs. Each
// row is also appended as one JSON line to bench-results.jsonl (--out), so commits and
// machines can be compared.
// BENCHMARKS.md keeps measured tables and the commands that made them.
//
//   deno task bench                                    # cpu-5m at batch 1, 8, 32 on the best backend
//   deno task bench --preset nanovlm-222m --backend webgpu --batch 1,8,32
//   deno task bench --preset tiny --batch 2 --steps 1 --warmup 1 --new_tokens 4   # smoke run
//
// What this is not: a test (tests/ assert behaviour; speed lives here), or `deno task
// memory` (memory.ts finds the largest batch that fits, one process per batch size).
//
// Inputs are random token ids and images of the right shapes: speed does not depend on
// the values. Shapes as in nanovlm.ts: B batch, T tokens, L image tokens per image.

import * as tf from "@tensorflow/tfjs";
import { parseArgs } from "node:util";
import type { Batch } from "../data.ts";
import { parameterSpecs, PRESETS, seededRandom, VisionLanguageModel, type VLMConfig } from "../nanovlm.ts";
import { type BackendName, initBackend, wasmHeapBytes } from "../backend/runtime.ts";
import { shareBlasThreads, wasmMatMulEngine, webgpuBindingLimit } from "../backend/kernels.ts";
import { AdamW, adamWOnHost, paramGroups } from "../lib/optimizer.ts";
import { batchTensors, lowMemoryTraining, minRowsFor, trainingThreads, trainStep } from "../lib/train_step.ts";
import { GradientHelper } from "../backend/parallel.ts";
import { useActivationCheckpointing } from "../backend/low_memory.ts";
import { snakeCaseFlags, wholeNumber } from "../lib/cli.ts";

// ---- What to measure ------------------------------------------------------------------

/** A model shape to benchmark: its config, sequence length T and default batch sizes. */
export interface BenchConfig {
  cfg: VLMConfig;
  seq: number;
  batches: number[];
  about: string;
}

/** Benchmark configs by name: every preset, plus the CPU comparison config of BENCHMARKS.md. */
export const BENCH_CONFIGS: Readonly<Record<string, BenchConfig>> = {
  // The issue's PyTorch comparison: ViT 4 × 192 (3 heads, 64 px, patch 8), pixel shuffle 2,
  // LM 4 × 256 (4 heads / 2 KV, SwiGLU 768), vocabulary 512: 5,304,896 parameters.
  "cpu-5m": {
    cfg: {
      ...PRESETS.tiny,
      vit_hidden_dim: 192,
      vit_inter_dim: 768,
      vit_patch_size: 8,
      vit_img_size: 64,
      vit_n_heads: 3,
      vit_n_blocks: 4,
      lm_hidden_dim: 256,
      lm_inter_dim: 768,
      lm_n_heads: 4,
      lm_n_kv_heads: 2,
      lm_n_blocks: 4,
      lm_base_vocab_size: 511,
      lm_vocab_size: 512,
      lm_max_length: 128,
      mp_image_token_length: 16,
    },
    seq: 96,
    batches: [1, 8, 32],
    about: "5.3M-parameter VLM from the PyTorch comparison (16 image + 80 text tokens)",
  },
  tiny: { cfg: PRESETS.tiny, seq: 48, batches: [1, 32], about: "the tiny preset (shapes world)" },
  "nanovlm-222m": {
    cfg: PRESETS["nanovlm-222m"],
    seq: 128,
    batches: [1],
    about: "SigLIP-B/16-224 + SmolLM2-135M, random weights (49 image + 79 text tokens)",
  },
  "nanovlm-450m": {
    cfg: PRESETS["nanovlm-450m"],
    seq: 128,
    batches: [1],
    about: "SigLIP2-B/16-256 + SmolLM2-360M, random weights (64 image + 64 text tokens)",
  },
};

/** What a row can measure; `--only` picks some. */
export const MEASUREMENTS = ["train", "fwd-bwd", "forward", "generate"] as const;
export type Measurement = typeof MEASUREMENTS[number];

/** Options of {@link benchmark}. */
export interface BenchOptions {
  config: string; // a BENCH_CONFIGS name
  backend?: BackendName; // undefined: initBackend's automatic choice
  batches?: number[]; // default: the config's
  seq?: number; // T of the training batches; default: the config's
  steps?: number; // timed repetitions of each measurement (median reported)
  warmup?: number; // untimed repetitions first (shader compilation, heap growth)
  newTokens?: number; // tokens generated per prompt (clipped to the context)
  only?: Measurement[]; // default: all of MEASUREMENTS
  lowMemory?: string; // train.ts's --low_memory: "auto" (default), "on" or "off"
  threads?: number; // threads of the training step (train.ts's --threads): 0 (default) automatic, as train.ts
  profile?: boolean; // print the slowest kernels of one training step
  log?: (line: string) => void;
}

/** One row of the table, and one JSON line. Times in ms; null where not measured (see `note`). */
export interface BenchRow {
  date: string;
  commit: string;
  machine: string;
  deno: string;
  tfjs: string;
  backend: string;
  device: string; // wasm: what runs matMul; webgpu: the adapter
  config: string;
  params: number;
  batch: number;
  seq: number;
  step_ms: number | null;
  samples_per_s: number | null;
  forward_ms: number | null;
  fwd_bwd_ms: number | null;
  ttft_ms: number | null;
  decode_tok_s: number | null; // all B rows together
  new_tokens: number;
  peak_tensor_mib: number | null; // live tensors at their peak during one step (shared buffers counted twice)
  backend_mib: number | null; // wasm heap or WebGPU buffer pool high-water mark
  rss_mib: number; // the process's peak resident memory so far
  matmul_gflops: number;
  kernel_us: number; // the kernel probe: µs per small kernel
  kernels: number; // kernels but reshapes in one training step (or fwd + bwd, or forward: the heaviest measured)
  load: number; // 1-minute load average when the row finished (other processes on the machine)
  low_memory: boolean; // activation checkpointing (lib/train_step.ts's lowMemoryTraining)
  threads: number; // threads that computed the training step's gradient (1: no helper, or a batch too small to split)
  note: string;
}

// ---- Measurements -----------------------------------------------------------------------

/**
 * A batch of random tokens and images in the layout the collator makes: each sample is
 * L image tokens then T - L text tokens, no padding, a loss on every text token but the last.
 */
export function syntheticBatch(cfg: VLMConfig, batchSize: number, seq: number, seed = 0): Batch {
  const L = cfg.mp_image_token_length, S = cfg.vit_img_size, V = cfg.lm_base_vocab_size;
  if (seq <= L) throw new Error(`seq ${seq} leaves no text after the ${L} image tokens`);
  const random = seededRandom(seed);
  const inputIds = new Int32Array(batchSize * seq), labels = new Int32Array(batchSize * seq).fill(-100);
  for (let b = 0; b < batchSize; b++) {
    for (let t = 0; t < seq; t++) {
      inputIds[b * seq + t] = t < L ? cfg.lm_base_vocab_size : Math.floor(random() * V); // <|image|> id = base vocab
      if (t >= L && t < seq - 1) labels[b * seq + t] = Math.floor(random() * V);
    }
  }
  return {
    inputIds,
    labels,
    attentionMask: new Int32Array(batchSize * seq).fill(1),
    batchSize,
    length: seq,
    images: Float32Array.from({ length: batchSize * 3 * S * S }, () => 2 * random() - 1),
    imageCount: batchSize,
    imageCounts: new Array(batchSize).fill(1),
    imageSize: S,
    dropped: 0,
  };
}

/**
 * With helper threads running (parallel.ts), the training step warms up for this long as well as `--warmup` steps: a
 * step shared with a helper takes about 20 steps to settle, a step on one thread about 2. cpu-5m at batch 8 on 2
 * cores, one process each (2026-11-24, 40 steps, median of steps 3-7 / 10-19 / 25-39): with a helper 334 / 255 / 210
 * and 312 / 256 / 236 ms; on one thread 337 / 342 / 328. A training run takes thousands of steps, so the settled time
 * is the one to report.
 */
const HELPER_WARMUP_MS = 5000;

/** Run `fn` `warmup` times and for at least `warmupMs`, then `steps` times; the median of the timed runs in ms. */
export async function medianMs(fn: () => Promise<void>, steps: number, warmup: number, warmupMs = 0): Promise<number> {
  const start = performance.now();
  for (let i = 0; i < warmup || performance.now() - start < warmupMs; i++) await fn();
  const times: number[] = [];
  for (let i = 0; i < steps; i++) {
    const start = performance.now();
    await fn();
    times.push(performance.now() - start);
  }
  return median(times);
}

/** The middle value (the lower of the two middle ones for an even count). */
function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor((sorted.length - 1) / 2)];
}

/**
 * The backend's matMul speed in GFLOP/s (2n³ per [n, n]·[n, n] product): n doubles from
 * 256 up to `maxSize` while one product takes under 0.1 s (a software GPU would take
 * minutes at 2048), then products are repeated for about `seconds`. The result is read
 * once at the end, so queued GPU work is counted whole.
 */
export async function matMulGflops(maxSize: number, seconds = 0.5): Promise<{ size: number; gflops: number }> {
  const timed = async (n: number, reps: number) => {
    const [a, b] = [tf.randomNormal([n, n]), tf.randomNormal([n, n])];
    const warm = tf.tidy(() => tf.matMul(a, b).slice([0, 0], [1, 1]));
    await warm.data(); // warm-up: shader compilation, allocations
    warm.dispose();
    const start = performance.now();
    for (let i = 0; i < reps - 1; i++) tf.matMul(a, b).dispose();
    const last = tf.tidy(() => tf.matMul(a, b).slice([0, 0], [1, 1]));
    await last.data();
    tf.dispose([a, b, last]);
    return (performance.now() - start) / reps;
  };
  let n = 256, ms = await timed(n, 1);
  while (2 * n <= maxSize && ms < 100) ms = await timed(n *= 2, 1);
  ms = await timed(n, Math.max(1, Math.round((seconds * 1000) / ms)));
  return { size: n, gflops: (2 * n ** 3) / (ms * 1e6) };
}

/**
 * What one small kernel costs, in µs: `count` chained adds of 4,096 floats, read once at the end. The arithmetic is
 * negligible (and the tensor too large for tfjs-webgpu to run it on the CPU instead), so this is the per-kernel price
 * of tfjs and the backend: on a GPU, a training step cannot take less than its kernel count times this, whatever the
 * batch size.
 */
export async function kernelCostUs(count = 1000): Promise<number> {
  const increment = tf.fill([4096], 1e-3);
  const chain = async (n: number) => {
    const start = performance.now();
    let sum = tf.zeros([4096]);
    for (let i = 0; i < n; i++) {
      const next = tf.add(sum, increment);
      sum.dispose();
      sum = next;
    }
    await sum.data();
    sum.dispose();
    return performance.now() - start;
  };
  await chain(50); // warm-up: shader compilation, buffer pools
  const ms = await chain(count);
  increment.dispose();
  return (1000 * ms) / count;
}

/** Peak resident memory of this process in MiB (Linux's VmHWM), else the current RSS. */
export function peakRssMiB(): number {
  try {
    const match = Deno.readTextFileSync("/proc/self/status").match(/^VmHWM:\s+(\d+) kB/m);
    if (match) return Number(match[1]) / 1024;
  } catch {
    // not Linux
  }
  return Deno.memoryUsage().rss / 2 ** 20;
}

/** The backend's own memory high-water mark in MiB: the wasm heap, or WebGPU's buffer pool. */
export function backendMiB(): number | null {
  const heap = wasmHeapBytes();
  if (heap !== null) return heap / 2 ** 20;
  const gpu = (tf.memory() as { numBytesAllocatedInGPU?: number }).numBytesAllocatedInGPU;
  return gpu === undefined ? null : gpu / 2 ** 20;
}

/** The machine in one line: CPU model, cores and memory. */
export function machineDescription(): string {
  let cpu = Deno.build.arch as string;
  try {
    cpu = Deno.readTextFileSync("/proc/cpuinfo").match(/^model name\s*:\s*(.+)$/m)?.[1] ?? cpu;
  } catch {
    // not Linux
  }
  const gib = Math.round(Deno.systemMemoryInfo().total / 2 ** 30);
  return `${cpu}, ${navigator.hardwareConcurrency} cores, ${gib} GiB RAM, ${Deno.build.os}`;
}

/** The git commit being measured ("abc1234+" when files differ from it); NANOVLM_COMMIT overrides. */
function commitId(): string {
  const given = Deno.env.get("NANOVLM_COMMIT");
  if (given) return given;
  const git = (...args: string[]) => {
    const out = new Deno.Command("git", { args, stdout: "piped", stderr: "null" }).outputSync();
    return out.success ? new TextDecoder().decode(out.stdout).trim() : null;
  };
  try {
    const head = git("rev-parse", "--short", "HEAD");
    if (head === null) return "unknown";
    return head + (git("status", "--porcelain", "--untracked-files=no") ? "+" : "");
  } catch {
    return "unknown"; // no git here (an offline GPU machine)
  }
}

/**
 * For WebGPU: the parameters and the largest activations of a config that would not fit
 * one storage binding (`limit` bytes). tfjs-webgpu binds each tensor whole, and kernels.ts
 * turns an oversized one into an error when it is allocated; this says so before a run.
 */
export function tensorsOverBindingLimit(cfg: VLMConfig, batch: number, seq: number, limit: number): string[] {
  const Np = (cfg.vit_img_size / cfg.vit_patch_size) ** 2;
  const big = [
    ...parameterSpecs(cfg),
    // model.loss makes logits only for positions with a target: syntheticBatch's T − 1 − L text tokens per sample.
    {
      name: "training logits [B·(T−1−L), V]",
      shape: [batch * (seq - 1 - cfg.mp_image_token_length), cfg.lm_vocab_size],
    },
    { name: "ViT MLP activations [B·Np, vit_inter_dim]", shape: [batch * Np, cfg.vit_inter_dim] },
    { name: "ViT attention scores [B, H, Np, Np]", shape: [batch, cfg.vit_n_heads, Np, Np] },
  ];
  return big.filter(({ shape }) => 4 * tf.util.sizeFromShape(shape) > limit)
    .map(({ name, shape }) => `${name} [${shape}] = ${(4 * tf.util.sizeFromShape(shape) / 2 ** 20).toFixed(0)} MiB`);
}

// ---- The benchmark ---------------------------------------------------------------------

/** Measure every batch size of a config on one backend; returns the rows (also printed via `log`). */
export async function benchmark(options: BenchOptions): Promise<BenchRow[]> {
  const log = options.log ?? console.log;
  const bench = BENCH_CONFIGS[options.config];
  if (!bench) {
    throw new Error(`unknown config "${options.config}": use one of ${Object.keys(BENCH_CONFIGS).join(", ")}`);
  }
  const { cfg } = bench;
  const seq = options.seq ?? bench.seq, batches = options.batches ?? bench.batches;
  const steps = options.steps ?? 5, warmup = options.warmup ?? 2;
  if (seq > cfg.lm_max_length) throw new Error(`--seq ${seq} exceeds the context (lm_max_length ${cfg.lm_max_length})`);

  const backend = await initBackend(options.backend, { quiet: options.log !== undefined });
  // As train.ts does: on wasm, a model whose weights, gradients and AdamW moments would fill half of the 4 GiB heap
  // (nanovlm-222m) trains with every block checkpointed; the training step runs on as many threads as train.ts would
  // use, each with its share of OpenBLAS's.
  const lowMemory = lowMemoryTraining(options.lowMemory ?? "auto", backend, cfg);
  const threads = trainingThreads(options.threads ?? 0, backend, lowMemory);
  shareBlasThreads(threads);
  const machine = machineDescription(), commit = commitId();
  log(`machine: ${machine} | Deno ${Deno.version.deno} | tfjs ${tf.version.tfjs} | commit ${commit}`);
  const device = backend === "wasm"
    ? `matMul: ${wasmMatMulEngine()}`
    : backend === "webgpu"
    ? await adapterDescription()
    : "js";
  const { size, gflops } = await matMulGflops(backend === "webgpu" ? 4096 : 1024);
  log(`matMul probe: [${size}, ${size}]·[${size}, ${size}] at ${gflops.toFixed(1)} GFLOP/s on ${backend}`);
  const kernelUs = await kernelCostUs();
  log(`kernel probe: ${kernelUs.toFixed(1)} µs per small kernel (1,000 chained adds of 4,096 floats)`);

  const model = new VisionLanguageModel(cfg, { seed: 0 });
  if (lowMemory) useActivationCheckpointing(model);
  const params = model.parameterCount();
  log(
    `config ${options.config}: ${bench.about} | ${params.toLocaleString("en-US")} parameters | T ${seq}` +
      (lowMemory ? " | low memory: blocks checkpointed" : ""),
  );
  const limit = webgpuBindingLimit();
  if (limit !== null) {
    const over = tensorsOverBindingLimit(cfg, Math.max(...batches), seq, limit);
    if (over.length) {
      log(`too large for one WebGPU binding (${limit / 2 ** 20} MiB), these will fail: ${over.join("; ")}`);
    }
  }
  const only = new Set(options.only ?? MEASUREMENTS);
  const train = only.has("train");
  // AdamW's moments only when a training step runs: on WebGPU they take memory that forward + backward needs.
  const optimizer = train
    ? new AdamW(model.params, paramGroups(model, 1e-4, 1e-4), { momentsOnHost: adamWOnHost(backend) })
    : null;
  const variables = [...model.params.values()];
  // The training step's helper threads, as train.ts starts them.
  const helpers = optimizer ? await GradientHelper.startUpTo(threads - 1, cfg, optimizer.trainable, log) : [];
  if (helpers.length) {
    log(
      `training step on up to ${helpers.length + 1} threads (parallel.ts): a batch's rows are shared when each part ` +
        `gets ${minRowsFor(model)} or more (MIN_PART_WORK)`,
    );
  }

  const rows: BenchRow[] = [];
  try {
    for (const B of batches) {
      const notes: string[] = [];
      const batch = syntheticBatch(cfg, B, seq, B);
      const t = batchTensors(batch);
      const forward = async () => {
        const loss = model.loss(t.inputIds, t.images, t.attentionMask, t.labels);
        await loss.data();
        loss.dispose();
      };
      const forwardBackward = async () => {
        const { value, grads } = tf.variableGrads(
          () => model.loss(t.inputIds, t.images, t.attentionMask, t.labels),
          variables,
        );
        await value.data();
        tf.dispose([value, ...Object.values(grads)]);
      };
      let stepThreads = 1; // as many as computed the last step: a batch too small to split stays on one
      const step = async () => {
        stepThreads = (await trainStep(model, [batch], optimizer!, { lrs: [1e-4, 1e-4], helpers })).threads;
      };
      const measure = (what: Measurement, fn: () => Promise<void>) =>
        only.has(what) ? medianMs(fn, steps, warmup) : Promise.resolve(null);

      const forwardMs = await measure("forward", forward);
      const fwdBwdMs = await measure("fwd-bwd", forwardBackward);
      const stepMs = train ? await medianMs(step, steps, warmup, helpers.length ? HELPER_WARMUP_MS : 0) : null;
      const generation = only.has("generate")
        ? await measureGeneration(model, B, options.newTokens ?? 32, notes, steps, warmup)
        : { ttft_ms: null, decode_tok_s: null, new_tokens: 0 };
      const heaviest = train ? step : only.has("fwd-bwd") ? forwardBackward : forward;
      const profile = await tf.profile(heaviest);
      if (options.profile && B === batches[0]) printSlowestKernels(profile, log);
      tf.dispose(Object.values(t));

      rows.push({
        date: new Date().toISOString(),
        commit,
        machine,
        deno: Deno.version.deno,
        tfjs: tf.version.tfjs,
        backend,
        device,
        config: options.config,
        params,
        batch: B,
        seq,
        step_ms: stepMs,
        samples_per_s: stepMs === null ? null : (1000 * B) / stepMs,
        forward_ms: forwardMs,
        fwd_bwd_ms: fwdBwdMs,
        ...generation,
        peak_tensor_mib: profile.peakBytes / 2 ** 20,
        backend_mib: backendMiB(),
        rss_mib: peakRssMiB(),
        matmul_gflops: gflops,
        kernel_us: kernelUs,
        kernels: profile.kernels.filter((k) => k.name !== "Reshape").length, // a reshape moves no data
        load: Deno.loadavg()[0],
        low_memory: lowMemory,
        threads: stepThreads,
        note: notes.join("; "),
      });
    }
  } finally {
    helpers.forEach((helper) => helper.close());
    optimizer?.dispose();
    model.dispose();
  }
  log("");
  log(formatTable(rows));
  return rows;
}

/**
 * Greedy generation of `newTokens` tokens for B prompts (L image tokens + 16 text tokens
 * each, with images): `warmup` whole generations, then the median of `steps` for each
 * figure, as for the training step: a process's first generations run slower while the
 * JIT warms up (cpu-5m, a scratch timing: 9.9, 6.2, then 3.2 ms a token in three early
 * ones, 1.3-2.2 later). EOS is disabled so every prompt runs to the end. Time to first
 * token is prefill (ViT, projector, prompt) plus one read.
 */
async function measureGeneration(
  model: VisionLanguageModel,
  B: number,
  wanted: number,
  notes: string[],
  steps: number,
  warmup: number,
): Promise<{ ttft_ms: number; decode_tok_s: number | null; new_tokens: number }> {
  const cfg = model.cfg, T = cfg.mp_image_token_length + 16;
  const newTokens = Math.max(1, Math.min(wanted, cfg.lm_max_length - T));
  if (newTokens < wanted) notes.push(`${newTokens} new tokens (the context is ${cfg.lm_max_length})`);
  const prompt = syntheticBatch(cfg, B, T, 7);
  const t = batchTensors(prompt);
  const run = async () => {
    const start = performance.now();
    let first = 0, last = 0;
    const ids = await model.generate(t.inputIds, t.images, t.attentionMask, {
      maxNewTokens: newTokens,
      greedy: true,
      eosTokenId: -1,
      onToken: (_, step) => {
        last = performance.now();
        if (step === 0) first = last;
      },
    });
    ids.dispose();
    return { ttft: first - start, decode: newTokens > 1 ? (B * (newTokens - 1) * 1000) / (last - first) : null };
  };
  for (let i = 0; i < warmup; i++) await run();
  const runs = [];
  for (let i = 0; i < steps; i++) runs.push(await run());
  tf.dispose(Object.values(t));
  const decode = runs[0].decode === null ? null : median(runs.map((r) => r.decode!));
  return { ttft_ms: median(runs.map((r) => r.ttft)), decode_tok_s: decode, new_tokens: newTokens };
}

/** The WebGPU adapter as initBackend chose it (tfjs keeps only its vendor): name, vendor, binding limit. */
async function adapterDescription(): Promise<string> {
  const adapter = await navigator.gpu?.requestAdapter({ powerPreference: "high-performance" });
  if (!adapter) return "WebGPU adapter";
  const { description, device, vendor } = adapter.info;
  const mib = Math.round(adapter.limits.maxStorageBufferBindingSize / 2 ** 20);
  return `${description || device || "unnamed"} (vendor ${vendor || "?"}), maxStorageBufferBindingSize ${mib} MiB`;
}

function printSlowestKernels(profile: Awaited<ReturnType<typeof tf.profile>>, log: (line: string) => void): void {
  const byKernel = new Map<string, { ms: number; calls: number }>();
  for (const kernel of profile.kernels) {
    const entry = byKernel.get(kernel.name) ?? { ms: 0, calls: 0 };
    entry.ms += kernel.kernelTimeMs as number;
    entry.calls++;
    byKernel.set(kernel.name, entry);
  }
  const total = [...byKernel.values()].reduce((sum, k) => sum + k.ms, 0);
  log(`slowest kernels of one training step (tf.profile, ${total.toFixed(0)} ms of kernel time in all):`);
  for (const [name, { ms, calls }] of [...byKernel].sort((a, b) => b[1].ms - a[1].ms).slice(0, 15)) {
    log(`  ${name.padEnd(22)} ${ms.toFixed(1).padStart(8)} ms ${String(calls).padStart(5)} calls`);
  }
}

/** A measured number for a table: thousands separated, `digits` decimals, "—" when not measured. */
export function formatNumber(x: number | null | undefined, digits = 0): string {
  return x == null ? "—" : x.toLocaleString("en-US", { maximumFractionDigits: digits, minimumFractionDigits: digits });
}

/** A markdown table: the header, a `---` row, then the rows (an empty cell prints as `| |`). memory.ts uses it too. */
export function markdownTable(header: string[], rows: string[][]): string {
  const line = (cells: string[]) => `|${cells.map((cell) => cell ? ` ${cell} ` : " ").join("|")}|`;
  return [header, header.map(() => "---"), ...rows].map(line).join("\n");
}

/** The rows as a markdown table. */
export function formatTable(rows: BenchRow[]): string {
  const number = formatNumber;
  const header = [
    "config",
    "backend",
    "threads",
    "B",
    "T",
    "train step ms",
    "samples/s",
    "fwd ms",
    "fwd+bwd ms",
    "TTFT ms",
    "decode tok/s",
    "peak tensors MiB",
    "heap/GPU MiB",
    "peak RSS MiB",
  ];
  const lines = rows.map((r) => [
    r.config,
    r.backend,
    String(r.threads),
    String(r.batch),
    String(r.seq),
    number(r.step_ms),
    number(r.samples_per_s, 1),
    number(r.forward_ms),
    number(r.fwd_bwd_ms),
    number(r.ttft_ms),
    number(r.decode_tok_s, 1),
    number(r.peak_tensor_mib),
    number(r.backend_mib),
    number(r.rss_mib),
  ]);
  const notes = rows.filter((r) => r.note).map((r) => `- B=${r.batch}: ${r.note}`);
  // The floor the kernel probe sets: each kernel of a step costs at least that much, however small its work.
  const kernels = rows.map((r) =>
    `B=${r.batch} ${number(r.kernels)} (at least ${number((r.kernels * r.kernel_us) / 1000)} ms)`
  );
  const floor = `kernels in one step on this thread (reshapes aside), times the kernel probe: ${kernels.join(", ")}`;
  return [markdownTable(header, lines), "", floor, ...notes].join("\n");
}

// ---- Command line ----------------------------------------------------------------------

/** The flags `deno task bench` and `deno task memory` share. */
export const BENCH_OPTIONS = {
  preset: { type: "string", default: "cpu-5m" },
  backend: { type: "string" },
  seq: { type: "string" },
  low_memory: { type: "string", default: "auto" },
  help: { type: "boolean", default: false },
} as const;

const USAGE = `deno task bench [--preset NAME] [--backend webgpu|wasm|cpu] [--batch 1,8,32] [--seq T]
  [--steps N] [--warmup N] [--new_tokens N] [--only train,fwd-bwd,forward,generate] [--out FILE]
  [--low_memory auto|on|off] [--threads N] [--profile]
presets: ${Object.keys(BENCH_CONFIGS).join(", ")}`;

if (import.meta.main) {
  const { values } = parseArgs({
    args: snakeCaseFlags(Deno.args),
    options: {
      ...BENCH_OPTIONS,
      batch: { type: "string" },
      steps: { type: "string", default: "5" },
      warmup: { type: "string", default: "2" },
      new_tokens: { type: "string", default: "32" },
      out: { type: "string", default: "bench-results.jsonl" },
      only: { type: "string" },
      threads: { type: "string", default: "0" },
      profile: { type: "boolean", default: false },
    },
  });
  if (values.help) {
    console.log(USAGE);
    Deno.exit(0);
  }
  const count = (name: string, raw: string | undefined) => wholeNumber(name, raw, 0, USAGE);
  const rows = await benchmark({
    config: values.preset!,
    backend: values.backend as BackendName | undefined,
    batches: values.batch?.split(",").map((b) => count("batch", b)),
    seq: values.seq === undefined ? undefined : count("seq", values.seq),
    steps: Math.max(1, count("steps", values.steps)),
    warmup: count("warmup", values.warmup),
    newTokens: count("new_tokens", values.new_tokens),
    only: values.only?.split(",").map((m) => {
      if (!(MEASUREMENTS as readonly string[]).includes(m)) throw new Error(`--only ${m}\n${USAGE}`);
      return m as Measurement;
    }),
    lowMemory: values.low_memory,
    threads: count("threads", values.threads),
    profile: values.profile,
  });
  if (values.out) {
    await Deno.writeTextFile(values.out, rows.map((r) => JSON.stringify(r) + "\n").join(""), { append: true });
    console.log(`\n${rows.length} row${rows.length === 1 ? "" : "s"} appended to ${values.out}`);
  }
  Deno.exit(0); // a WebGPU device can keep the event loop alive
}
