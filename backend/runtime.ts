/**
 * backend/runtime.ts: the backends under nanovlm.ts, and what makes them fast. The model never needs this file to be
 * understood; it changes how fast the same maths runs, never what it computes.
 *
 * - Backend selection: WebGPU on a real GPU, otherwise single-threaded wasm, otherwise the pure-JS cpu backend.
 * - Optionally, a native BLAS (OpenBLAS, Apple Accelerate) behind the wasm backend's matMul, through Deno's FFI: 4× the
 *   speed of wasm's own (BENCHMARKS.md). Without one installed, everything still runs, on wasm's XNNPACK.
 * - The kernels themselves are in backend/kernels.ts, which a browser loads too; this file is Deno's side.
 *
 * It is deliberately not a model, a data loader or a tokenizer, and it knows no weight names.
 */
import * as tf from "@tensorflow/tfjs";
import { type BackendWasm, getThreadsCount, setWasmPaths } from "@tensorflow/tfjs-backend-wasm";
import "@tensorflow/tfjs-backend-webgpu";
import { createRequire } from "node:module";
import { dirname } from "node:path";
import {
  fixStartedWebGPUBackend,
  type Gemm,
  isSoftwareAdapter,
  type NativeBlas,
  registerKernelFixes,
  wasmMatMulEngine,
} from "./kernels.ts";

// ---- Backend selection ----

/** The tfjs backends nanovlm.ts runs on, fastest first. */
export type BackendName = "webgpu" | "wasm" | "cpu";
const BACKENDS: readonly BackendName[] = ["webgpu", "wasm", "cpu"];

// Software rasterisers that expose WebGPU: correct but slower than wasm, so automatic mode skips them.
const NO_ADAPTER_HELP = "WebGPU was requested but navigator.gpu offers no adapter. Deno reaches the GPU through " +
  "Vulkan (or GL): for a real NVIDIA GPU install the NVIDIA driver and libvulkan1; for a software adapter " +
  "(slow, for testing) run `apt-get install mesa-vulkan-drivers` on Debian/Ubuntu. Or choose another backend: " +
  "NANOVLM_BACKEND=wasm.";

/**
 * Choose and initialise a tfjs backend, print one line saying which (for WebGPU also the adapter and its buffer
 * limits), and return its name.
 *
 * The choice is `requested`, else the `NANOVLM_BACKEND` environment variable, else automatic: "webgpu" only when
 * navigator.gpu offers a hardware adapter (a software one such as llvmpipe is slower than wasm), else "wasm",
 * else "cpu" if wasm fails to start. An explicit "webgpu" accepts a software adapter, and throws an Error saying
 * what to install when there is none. On wasm it registers {@link registerWasmKernelFixes}. Safe to call again.
 */
export async function initBackend(requested?: BackendName, options: { quiet?: boolean } = {}): Promise<BackendName> {
  const explicit = requested ?? (Deno.env.get("NANOVLM_BACKEND") || undefined); // an empty variable counts as unset
  if (explicit !== undefined && !BACKENDS.includes(explicit as BackendName)) {
    const source = requested === undefined ? " (from NANOVLM_BACKEND)" : "";
    throw new Error(`unknown backend "${explicit}"${source}: expected one of ${BACKENDS.join(", ")}`);
  }
  silenceTfjsNodeBanner();
  const adapter = explicit === undefined || explicit === "webgpu" ? await requestWebGPUAdapter() : null;
  const starts = (name: BackendName) => activate(name).then(() => true, () => false);

  let chosen: BackendName;
  let why = ""; // automatic mode says why it chose what it chose
  if (explicit === "webgpu") {
    if (adapter === null) {
      const restricted = Deno.env.get("DENO_WEBGPU_BACKEND");
      throw new Error(
        NO_ADAPTER_HELP + (restricted ? ` (DENO_WEBGPU_BACKEND=${restricted} limits what Deno tries.)` : ""),
      );
    }
    await activate("webgpu");
    chosen = "webgpu";
  } else if (explicit !== undefined) {
    chosen = explicit as BackendName;
    await activate(chosen);
  } else {
    const hardware = adapter !== null && !isSoftwareAdapter(adapter);
    if (hardware && await starts("webgpu")) chosen = "webgpu";
    else if (await starts("wasm")) chosen = "wasm";
    else {
      await activate("cpu");
      chosen = "cpu";
    }
    why = adapter === null
      ? "no WebGPU adapter"
      : hardware
      ? (chosen === "webgpu" ? "hardware WebGPU adapter" : "WebGPU failed to start")
      : `WebGPU adapter "${adapterName(adapter)}" is software, slower than wasm`;
    why = `automatic: ${why}${chosen === "cpu" ? ", and wasm failed to start" : ""}`;
  }

  let facts = "pure JavaScript (slow: tests and tiny shapes)";
  if (chosen === "webgpu") facts = describeAdapter(adapter!);
  if (chosen === "wasm") {
    const simd = await tf.env().getAsync("WASM_HAS_SIMD_SUPPORT") ? "simd" : "no simd";
    facts = `${simd}, ${getThreadsCount()} thread${getThreadsCount() === 1 ? "" : "s"}, kernel fixes registered` +
      ` | matMul: ${wasmMatMulEngine()}`;
  }
  if (!options.quiet) console.log([`backend: ${chosen}`, facts, why].filter((part) => part !== "").join(" | "));
  return chosen;
}

/** Bytes of the wasm heap (its high-water mark: it never shrinks), or null when the backend is not wasm. */
export function wasmHeapBytes(): number | null {
  if (tf.getBackend() !== "wasm") return null;
  // HEAPU8 is emscripten's view of the whole heap; tfjs' type for the module leaves it out.
  return ((tf.backend() as BackendWasm).wasm as unknown as { HEAPU8: Uint8Array }).HEAPU8.length;
}

async function activate(name: BackendName): Promise<void> {
  if (name === "wasm") pointWasmAtItsBinaries();
  registerKernelFixes(name, name === "wasm" ? nativeBlas() : undefined);
  // setBackend reports a failed initialisation by returning false (after a console warning), not by throwing.
  if (!await tf.setBackend(name)) throw new Error(`the tfjs "${name}" backend failed to initialise`);
  await tf.ready();
  if (name === "webgpu") fixStartedWebGPUBackend();
}

let wasmPathsSet = false;
function pointWasmAtItsBinaries(): void {
  if (wasmPathsSet) return;
  wasmPathsSet = true;
  // The .wasm files sit beside the package's main script in its dist/ folder. tfjs' node build finds them by
  // itself, but saying so explicitly keeps working when the script is run from another folder. Inside a
  // `deno bundle` output there is no package to resolve; tfjs then looks beside its own script.
  try {
    setWasmPaths(dirname(createRequire(import.meta.url).resolve("@tensorflow/tfjs-backend-wasm")) + "/");
  } catch {
    // Keep tfjs' default location.
  }
}

// tfjs-backend-cpu greets Node users on its first tensor with "Hi, looks like you are running TensorFlow.js in
// Node.js ... install tfjs-node", advice that cannot be followed under Deno. The switches that would hide it are
// too broad (IS_NODE=false changes how wasm loads; PROD mode hides every tfjs warning), so clear the backend's own
// first-use flag. If a future tfjs renames the field this does nothing, and the banner returns.
function silenceTfjsNodeBanner(): void {
  const cpu = tf.findBackend("cpu") as { firstUse?: boolean } | null;
  if (cpu !== null && "firstUse" in cpu) cpu.firstUse = false;
}

/** The WebGPU adapter initBackend uses (high-performance), or null when navigator.gpu offers none here. */
export async function requestWebGPUAdapter(): Promise<GPUAdapter | null> {
  await quietVulkanLoader();
  try {
    return await navigator.gpu?.requestAdapter({ powerPreference: "high-performance" }) ?? null;
  } catch {
    return null;
  }
}

// With XDG_RUNTIME_DIR unset (containers, CI), Linux's Vulkan loader prints "error: XDG_RUNTIME_DIR is invalid"
// twice. It is harmless but alarming, so point the variable at a private folder: one per user, reused by every run,
// so no process leaves a folder behind. Any failure here just leaves the noise.
async function quietVulkanLoader(): Promise<void> {
  if (Deno.build.os !== "linux" || Deno.env.get("XDG_RUNTIME_DIR")) return;
  const dir = `${Deno.env.get("TMPDIR") ?? "/tmp"}/nanovlm-xdg-${Deno.uid()}`;
  try {
    await Deno.mkdir(dir, { recursive: true, mode: 0o700 });
    const { uid, mode } = await Deno.stat(dir);
    if (uid === Deno.uid() && (mode! & 0o777) === 0o700) Deno.env.set("XDG_RUNTIME_DIR", dir); // as the loader requires
  } catch {
    // Keep the noise.
  }
}

function adapterName({ info }: GPUAdapter): string {
  return info.description || info.device || "unnamed";
}

function describeAdapter(adapter: GPUAdapter): string {
  const { info, limits } = adapter;
  const mib = (bytes: number) => `${Math.round(bytes / 2 ** 20)} MiB`;
  // tfjs-webgpu puts every tensor in one storage binding: the largest tensor must fit maxStorageBufferBindingSize.
  return `adapter "${adapterName(adapter)}" vendor ${info.vendor || "?"}` +
    ` | maxStorageBufferBindingSize ${mib(limits.maxStorageBufferBindingSize)}` +
    ` | maxBufferSize ${mib(limits.maxBufferSize)}${isSoftwareAdapter(adapter) ? " (software)" : ""}`;
}

// ---- Native BLAS behind the wasm matMul (optional) ----
//
// Single-threaded wasm SIMD reaches about 22 GFLOP/s on this project's machine; OpenBLAS reaches 80+ on one core of
// the same CPU (AVX2 and FMA, which wasm cannot express) and can use every core. Deno's FFI hands it pointers into the
// wasm heap, so the product is written in place: nothing is copied, and transpose flags cost nothing.

/**
 * Matrix-vector products (one row: each matMul of a decoding step) of fewer elements than this, 8 MiB of float32, run
 * on one OpenBLAS thread: a second thread costs more to wake and wait for than it saves on a product of microseconds.
 * Greedy decoding at batch 1 on 2 cores (scratch timings, 2026-11-24): cpu-5m 1.8-1.9 → 1.3-1.5 ms a token, the 450M
 * 82-84 → 65 ms (its 960 × 2,560 products stay on both: on one, 72-74 ms), the 222M 36-40 → 35-36 ms. The output
 * heads of both (28M and 47M elements) use every thread.
 */
export const SMALL_GEMV_ELEMENTS = 2 ** 21;

const BLAS_LIBRARIES: Partial<Record<typeof Deno.build.os, string[]>> = {
  linux: ["libopenblas.so.0", "libopenblas.so"], // Debian/Ubuntu: apt-get install libopenblas0-pthread
  darwin: ["/System/Library/Frameworks/Accelerate.framework/Accelerate", "libopenblas.dylib"],
  windows: ["libopenblas.dll"],
};

// CBLAS enums: row-major storage, and "no transpose" / "transpose". FFI types of the C arguments.
const ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112;
const I32 = "i32", F32 = "f32", PTR = "buffer";

let loadedBlas: NativeBlas | undefined;
/** The BLAS behind the wasm matMul, opened once per process (FFI: {@link loadBlas}). */
function nativeBlas(): NativeBlas {
  return loadedBlas ??= loadBlas();
}

/**
 * Open a BLAS library with FFI: `NANOVLM_BLAS` names one (a path), or is "off"; unset tries OpenBLAS, then Apple's
 * Accelerate. Any failure (no library, no --allow-ffi) leaves wasm's own matMul, and says why.
 */
function loadBlas(): NativeBlas {
  const setting = Deno.env.get("NANOVLM_BLAS") ?? "";
  if (setting === "off") return { name: "wasm XNNPACK (NANOVLM_BLAS=off)" };
  if (Deno.permissions.querySync({ name: "ffi" }).state !== "granted") {
    return { name: "wasm XNNPACK (no --allow-ffi for a native BLAS)" };
  }
  for (const path of setting ? [setting] : BLAS_LIBRARIES[Deno.build.os] ?? []) {
    let lib;
    try {
      // cblas_sgemm(order, transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc), and sgemv alike.
      lib = Deno.dlopen(path, {
        cblas_sgemm: {
          parameters: [I32, I32, I32, I32, I32, I32, F32, PTR, I32, PTR, I32, F32, PTR, I32],
          result: "void",
        },
        cblas_sgemv: { parameters: [I32, I32, I32, I32, F32, PTR, I32, PTR, I32, F32, PTR, I32], result: "void" },
        openblas_get_num_threads: { parameters: [], result: "i32", optional: true },
        openblas_set_num_threads: { parameters: [I32], result: "void", optional: true },
        openblas_get_corename: { parameters: [], result: "pointer", optional: true },
      });
    } catch {
      continue;
    }
    const { cblas_sgemm: sgemm, cblas_sgemv: sgemv } = lib.symbols;
    const { openblas_get_num_threads: getThreads, openblas_set_num_threads: setThreads } = lib.symbols;
    const threads = getThreads && setThreads ? { get: getThreads, set: setThreads } : undefined;
    // A user's OPENBLAS_NUM_THREADS is theirs to keep: shareBlasThreads (kernels.ts) then leaves the count alone.
    const userSet = Deno.env.get("OPENBLAS_NUM_THREADS") !== undefined;
    const gemm: Gemm = (transA, transB, m, n, k, a, b, c) => {
      if (m === 1) {
        // One row (every product of a decoding step): a matrix-vector product streams B once, 2-3× faster than
        // sgemm. A small one runs on one OpenBLAS thread (SMALL_GEMV_ELEMENTS), then the count is put back.
        const [rows, cols] = transB ? [n, k] : [k, n]; // B as stored
        const count = n * k < SMALL_GEMV_ELEMENTS ? threads?.get() ?? 1 : 1;
        if (count > 1) threads?.set(1);
        sgemv(ROW_MAJOR, transB ? NO_TRANS : TRANS, rows, cols, 1, b, cols, a, 1, 0, c, 1);
        if (count > 1) threads?.set(count);
      } else {
        const [lda, ldb] = [transA ? m : k, transB ? k : n]; // row lengths of A and B as stored
        sgemm(ROW_MAJOR, transA ? TRANS : NO_TRANS, transB ? TRANS : NO_TRANS, m, n, k, 1, a, lda, b, ldb, 0, c, n);
      }
    };
    // Which of its kernels OpenBLAS picked for this CPU (or OPENBLAS_CORETYPE forced): "Haswell" kernels use AVX2,
    // "SkylakeX" AVX-512, at about half and full speed on a CPU with AVX-512. Benchmark tables name it.
    const core = lib.symbols.openblas_get_corename?.();
    const kernels = core ? ` (${Deno.UnsafePointerView.getCString(core)} kernels)` : "";
    const shared = threads && (userSet ? { get: threads.get, set: () => {} } : threads);
    return { gemm, name: `BLAS ${path.split("/").pop()}${kernels}`, threads: shared };
  }
  const hint = Deno.build.os === "linux" ? ": apt-get install libopenblas0-pthread for a 4× faster matMul" : "";
  return { name: `wasm XNNPACK (no BLAS library found${hint})` };
}
