// memory.ts — peak memory of training by batch size: `deno task memory` (nanoVLM's
// eval/measure_vram.py).
//
// For a config and a backend, each batch size runs in a process of its own: build the
// model, take `--iterations` training steps (lib/train_step.ts's trainStep: forward +
// backward + AdamW; in low-memory mode as train.ts decides it: blocks checkpointed, AdamW
// moments in JS memory) on random batches of T tokens, and report the peak: live tensors
// (tf.profile), the backend's own high-water mark (the wasm heap, which never shrinks, or
// WebGPU's buffer pool) and the process's peak RSS. Batch sizes double until one does not
// fit: the wasm heap hits its 4 GiB cap, the GPU runs out of memory, a tensor exceeds one
// WebGPU binding, or the peak passes --budget_mib. That batch's process fails alone, so the
// table ends cleanly with the reason.
//
//   deno task memory                                             # cpu-5m, batch 1, 2, 4, …, 512
//   deno task memory --preset nanovlm-222m --backend webgpu      # the reference's table, on a GPU
//   deno task memory --preset nanovlm-222m --low_memory off --mode fwd-bwd   # wasm, plain backprop
//   deno task memory --preset tiny --batches 1,2 --iterations 1  # smoke run

import * as tf from "@tensorflow/tfjs";
import { parseArgs } from "node:util";
import {
  backendMiB,
  BENCH_CONFIGS,
  BENCH_OPTIONS,
  formatNumber,
  machineDescription,
  markdownTable,
  peakRssMiB,
  syntheticBatch,
} from "./bench.ts";
import { VisionLanguageModel } from "../nanovlm.ts";
import { type BackendName, initBackend } from "../backend/runtime.ts";
import { AdamW, adamWOnHost, paramGroups } from "../lib/optimizer.ts";
import { batchTensors, lowMemoryTraining, trainStep } from "../lib/train_step.ts";
import { useActivationCheckpointing } from "../backend/low_memory.ts";
import { snakeCaseFlags, wholeNumber } from "../lib/cli.ts";

/** What each batch size runs: a training step, forward + backward only, or a forward pass with the loss. */
export type MemoryMode = "train" | "fwd-bwd" | "forward";

/** One batch size's result, as the child process reports it (one JSON line). */
export interface MemoryResult {
  batch: number;
  fits: boolean;
  weights_mib?: number; // tensors alive after building the model (and AdamW's zeroed moments, on WebGPU)
  peak_tensor_mib?: number;
  backend_mib?: number | null;
  rss_mib?: number;
  step_ms?: number;
  error?: string; // why it does not fit
}

const MIB = 2 ** 20;

/** In this process: build the model and measure `iterations` steps at one batch size. */
export async function measureOnce(
  config: string,
  backend: BackendName | undefined,
  batch: number,
  { seq, iterations = 2, mode = "train", lowMemory = "auto" }: {
    seq?: number;
    iterations?: number;
    mode?: MemoryMode;
    lowMemory?: string; // train.ts's --low_memory: auto | on | off
  } = {},
): Promise<MemoryResult> {
  const bench = BENCH_CONFIGS[config];
  if (!bench) throw new Error(`unknown config "${config}": use one of ${Object.keys(BENCH_CONFIGS).join(", ")}`);
  await initBackend(backend, { quiet: true });
  // On WebGPU an allocation that does not fit is reported to an error scope, not thrown.
  const device = tf.getBackend() === "webgpu" ? (tf.backend() as unknown as { device: GPUDevice }).device : null;
  device?.pushErrorScope("out-of-memory");
  const model = new VisionLanguageModel(bench.cfg, { seed: 0 });
  const low = lowMemoryTraining(lowMemory, tf.getBackend(), bench.cfg); // as train.ts decides
  if (low) useActivationCheckpointing(model);
  const optimizer = mode === "train"
    ? new AdamW(model.params, paramGroups(model, 1e-4, 1e-4), { momentsOnHost: adamWOnHost(tf.getBackend()) })
    : null;
  const weights = tf.memory().numBytes / MIB;
  const data = syntheticBatch(bench.cfg, batch, seq ?? bench.seq, batch);
  const t = batchTensors(data);
  const variables = [...model.params.values()];
  const step = async () => {
    if (optimizer) await trainStep(model, [data], optimizer, { lrs: [1e-4, 1e-4] });
    else if (mode === "fwd-bwd") {
      const { value, grads } = tf.variableGrads(
        () => model.loss(t.inputIds, t.images, t.attentionMask, t.labels),
        variables,
      );
      await value.data();
      tf.dispose([value, ...Object.values(grads)]);
    } else {
      const loss = model.loss(t.inputIds, t.images, t.attentionMask, t.labels);
      await loss.data();
      loss.dispose();
    }
  };
  let peak = 0, ms = 0;
  for (let i = 0; i < iterations; i++) {
    const start = performance.now();
    const profile = await tf.profile(step);
    ms = performance.now() - start;
    peak = Math.max(peak, profile.peakBytes / MIB);
  }
  const gpuError = await device?.popErrorScope();
  tf.dispose(Object.values(t));
  optimizer?.dispose();
  model.dispose();
  if (gpuError) return { batch, fits: false, error: `WebGPU: ${gpuError.message}` };
  return {
    batch,
    fits: true,
    weights_mib: weights,
    peak_tensor_mib: peak,
    backend_mib: backendMiB(),
    rss_mib: peakRssMiB(),
    step_ms: ms,
  };
}

/** Run one batch size in a child process (so a wasm abort or a GPU out-of-memory kills only it). */
async function measureInChild(args: string[], batch: number): Promise<MemoryResult> {
  const script = new URL(import.meta.url).pathname;
  const { success, stdout, stderr } = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", script, ...args, "--child", "--batches", String(batch)],
    env: { NO_COLOR: "1" },
    stdout: "piped",
    stderr: "piped",
  }).output();
  const lines = new TextDecoder().decode(stdout).trim().split("\n");
  const last = lines[lines.length - 1];
  if (success && last.startsWith("{")) return JSON.parse(last);
  // The last error line, e.g. "error: Uncaught RuntimeError: Aborted()" when the 4 GiB wasm heap is full.
  const errors = new TextDecoder().decode(stderr).split("\n").filter((line) => /^error|Error/.test(line.trim()));
  const why = errors.at(-1)?.replace(/^error: (Uncaught )?(\(in promise\) )?/, "").slice(0, 200);
  const heapFull = why && /Aborted\(\)|memory access out of bounds|Out of memory/i.test(why);
  const error = why ? why + (heapFull ? " (the wasm heap is full: its cap is 4 GiB)" : "") : "the process failed";
  return { batch, fits: false, error };
}

/** Over the budget: the backend's high-water mark (wasm heap, GPU pool) or else the process RSS passes it. */
function overBudget(r: MemoryResult, budgetMiB: number | undefined): boolean {
  return budgetMiB !== undefined && r.fits && (r.backend_mib ?? r.rss_mib!) > budgetMiB;
}

/** The results as a markdown table, the first batch that does not fit last. */
export function formatMemoryTable(results: MemoryResult[], budgetMiB?: number): string {
  const n = formatNumber;
  const rows = results.map((r) => {
    const over = overBudget(r, budgetMiB) ? `over the ${budgetMiB} MiB budget` : "";
    const verdict = r.fits && !over ? "fits" : `**does not fit**: ${over || r.error}`;
    return [String(r.batch), n(r.peak_tensor_mib), n(r.backend_mib), n(r.rss_mib), n(r.step_ms), verdict];
  });
  return markdownTable(["batch", "peak tensors MiB", "heap/GPU MiB", "peak RSS MiB", "step ms", ""], rows);
}

const USAGE = `deno task memory [--preset NAME] [--backend webgpu|wasm|cpu] [--batches 1,2,4] [--max_batch 512]
  [--seq T] [--iterations N] [--mode train|fwd-bwd|forward] [--low_memory auto|on|off] [--budget_mib N]
presets: ${Object.keys(BENCH_CONFIGS).join(", ")}`;

if (import.meta.main) {
  const { values } = parseArgs({
    args: snakeCaseFlags(Deno.args),
    options: {
      ...BENCH_OPTIONS,
      batches: { type: "string" },
      max_batch: { type: "string", default: "512" },
      iterations: { type: "string", default: "2" },
      mode: { type: "string", default: "train" },
      budget_mib: { type: "string" },
      child: { type: "boolean", default: false },
    },
  });
  if (values.help) {
    console.log(USAGE);
    Deno.exit(0);
  }
  const whole = (name: string, raw: string) => wholeNumber(name, raw, 1, USAGE);
  if (!["train", "fwd-bwd", "forward"].includes(values.mode!)) throw new Error(`--mode ${values.mode}\n${USAGE}`);
  const mode = values.mode as MemoryMode, iterations = whole("iterations", values.iterations!);
  const seq = values.seq === undefined ? undefined : whole("seq", values.seq);
  const backend = values.backend as BackendName | undefined;

  if (values.child) {
    const result = await measureOnce(values.preset!, backend, whole("batches", values.batches!), {
      seq,
      iterations,
      mode,
      lowMemory: values.low_memory,
    });
    console.log(JSON.stringify(result));
    Deno.exit(0); // a WebGPU device can keep the event loop alive
  }

  const bench = BENCH_CONFIGS[values.preset!];
  if (!bench) throw new Error(`unknown preset "${values.preset}"\n${USAGE}`);
  const batches = values.batches?.split(",").map((b) => whole("batches", b)) ??
    Array.from({ length: Math.floor(Math.log2(whole("max_batch", values.max_batch!))) + 1 }, (_, i) => 2 ** i);
  const budget = values.budget_mib === undefined ? undefined : whole("budget_mib", values.budget_mib);
  const chosen = await initBackend(backend);
  console.log(`machine: ${machineDescription()} | Deno ${Deno.version.deno} | tfjs ${tf.version.tfjs}`);
  console.log(
    `config ${values.preset}: ${bench.about} | T ${seq ?? bench.seq} | ${mode}, ${iterations} iteration(s) per batch` +
      ` size, each in its own process | --low_memory ${values.low_memory}` +
      (budget ? ` | budget ${budget} MiB` : ""),
  );
  const childArgs = [
    ...["--preset", values.preset!, "--backend", chosen, "--iterations", String(iterations), "--mode", mode],
    ...(seq === undefined ? [] : ["--seq", String(seq)]),
    "--low_memory",
    values.low_memory!,
  ];
  const results: MemoryResult[] = [];
  for (const batch of batches) {
    const result = await measureInChild(childArgs, batch);
    results.push(result);
    if (results.length === 1 && result.fits) {
      console.log(`after building the model: ${result.weights_mib!.toFixed(0)} MiB of tensors`);
    }
    console.log(
      `batch ${batch}: ${result.fits ? `peak ${result.peak_tensor_mib!.toFixed(0)} MiB of tensors` : "does not fit"}`,
    );
    if (!result.fits || overBudget(result, budget)) break;
  }
  console.log("");
  console.log(formatMemoryTable(results, budget));
  Deno.exit(0);
}
