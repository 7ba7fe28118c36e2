/**
 * backend/kernels.ts: what makes tfjs fast for nanovlm.ts, on any platform: Deno or a browser tab. The model never
 * needs this file to be understood; it changes how fast the same maths runs, never what it computes.
 *
 * - Kernels registered with tfjs for its wasm backend, without which training on wasm is 10× slower or impossible
 *   (a transposed or batched `BatchMatMul` leaves XNNPACK's fast path; `UnsortedSegmentSum`, the gradient of
 *   `tf.gather`, is missing; `Tanh` is five times slower than `Sigmoid`), and a native BLAS behind its matMul when the
 *   platform provides one.
 * - Fixes for tfjs-webgpu (more than 7 inputs to AddN, tensors over the binding limit, token ids read on the host).
 * - `SimdAdamW`, AdamW's update as a WebAssembly SIMD kernel on the wasm heap, with the moments outside it; on WebGPU,
 *   AdamW's update and the gradient norm's sum of squares as WGSL programs (`webgpuAdamWStep`, `webgpuSumOfSquares`).
 *
 * Nothing here uses Deno's APIs, so the browser page (web/) loads it as it is. backend/runtime.ts adds what only Deno
 * can do: choosing the backend from the environment, and OpenBLAS through FFI.
 */
import * as tf from "@tensorflow/tfjs";
import type { BackendWasm } from "@tensorflow/tfjs-backend-wasm";
import { webgpu_util, type WebGPUBackend } from "@tensorflow/tfjs-backend-webgpu";

type TensorInfo = tf.TensorInfo;
type KernelArgs = Parameters<tf.KernelFunc>[0];

// ---- Around a backend's start ----

/**
 * What a backend needs registered before `tf.setBackend(name)`: the gradients every backend shares and, for wasm, its
 * kernel fixes (with `nativeBlas` behind matMul when there is one). Idempotent.
 */
export function registerKernelFixes(name: string, nativeBlas?: NativeBlas): void {
  registerBroadcastGradients();
  if (name === "wasm") registerWasmKernelFixes(nativeBlas);
}

// Software rasterisers that expose WebGPU (Mesa's llvmpipe under Deno, SwiftShader in Chromium): correct but slower
// than wasm, so an automatic choice skips them.
const SOFTWARE_ADAPTER = /llvmpipe|lavapipe|softpipe|swiftshader/i;

/** Whether a WebGPU adapter is a software one (see SOFTWARE_ADAPTER). */
export function isSoftwareAdapter(adapter: GPUAdapter): boolean {
  const { info } = adapter;
  const names = `${info.description} ${info.device} ${info.vendor} ${info.architecture}`;
  return info.isFallbackAdapter || SOFTWARE_ADAPTER.test(names);
}

/** What the WebGPU backend needs once it has started (tf.setBackend("webgpu") resolved). Idempotent. */
export function fixStartedWebGPUBackend(): void {
  registerWebGPUKernelFixes();
  guardWebGPUBindingSize();
  keepHostIds();
}

// ---- Gradients and WebGPU fixes ----

/**
 * The gradients of Sum and Mean as a broadcast of dy. tfjs' own multiply dy by `tf.ones(x.shape)`, which it fills in
 * JavaScript and uploads on every call: one [B, T, D] array per norm and softmax, about 20 ms of a cpu-5m training
 * step (BENCHMARKS.md), and an upload per step on WebGPU. `tf.broadcastTo` (the Tile kernel) gives the same values
 * with nothing made on the host. Gradients are global in tfjs, so this serves every backend. Idempotent.
 */
export function registerBroadcastGradients(): void {
  // dy has x's shape without the reduced axes; put them back as size 1, then repeat dy along them.
  const reduced = (x: tf.Tensor, axis: number | number[]) => tf.util.parseAxisParam(axis, x.shape);
  const spread = (dy: tf.Tensor, x: tf.Tensor, axes: number[]) =>
    tf.broadcastTo(dy.reshape(x.shape.map((n, d) => axes.includes(d) ? 1 : n)), x.shape);
  tf.registerGradient({
    kernelName: "Sum",
    inputsToSave: ["x"],
    gradFunc: (dy, [x], attrs) => {
      const axes = reduced(x, (attrs as unknown as { axis: number | number[] }).axis);
      return { x: () => spread(dy as tf.Tensor, x, axes) };
    },
  });
  tf.registerGradient({
    kernelName: "Mean",
    inputsToSave: ["x"],
    gradFunc: (dy, [x], attrs) => {
      const axes = reduced(x, (attrs as unknown as { axis: number | number[] }).axis);
      const count = axes.reduce((n, d) => n * x.shape[d], 1);
      return { x: () => spread(tf.div(dy as tf.Tensor, count), x, axes) }; // dy / n on the small tensor, then spread
    },
  });
}

let webgpuFixesRegistered = false;

/**
 * tfjs-webgpu's AddN binds every input to one shader, and the device allows 8 storage buffers per shader
 * (WebGPU's default, which tfjs keeps): with more than 7 inputs it silently returns the sum of the first 7.
 * `tf.addN` over all gradients (a global norm) is exactly that case, so sum at most 7 at a time. Idempotent.
 */
export function registerWebGPUKernelFixes(): void {
  if (webgpuFixesRegistered) return;
  webgpuFixesRegistered = true;
  const stock = tf.getKernel("AddN", "webgpu");
  if (stock === undefined) return; // this tfjs has no webgpu backend
  const maxInputs = 7;
  const addN = (args: KernelArgs): TensorInfo => {
    const inputs = args.inputs as unknown as TensorInfo[];
    if (inputs.length <= maxInputs) return stock.kernelFunc(args) as TensorInfo;
    const partials: TensorInfo[] = [];
    for (let i = 0; i < inputs.length; i += maxInputs) {
      partials.push(addN({ ...args, inputs: inputs.slice(i, i + maxInputs) as unknown as tf.NamedTensorInfoMap }));
    }
    const sum = addN({ ...args, inputs: partials as unknown as tf.NamedTensorInfoMap });
    for (const partial of partials) (args.backend as tf.KernelBackend).disposeData(partial.dataId);
    return sum;
  };
  tf.unregisterKernel("AddN", "webgpu");
  tf.registerKernel({ ...stock, kernelFunc: addN });
}

/** The WebGPU device's limit on one storage binding, in bytes (the largest tensor it can compute with), or null. */
export function webgpuBindingLimit(): number | null {
  if (tf.getBackend() !== "webgpu") return null;
  return (tf.backend() as unknown as { device: GPUDevice }).device.limits.maxStorageBufferBindingSize;
}

interface WebGPUBufferManager {
  acquireBuffer(size: number, usage: number, ...rest: unknown[]): GPUBuffer;
  guarded?: boolean;
}

// tfjs-webgpu binds each tensor's whole buffer as one storage binding. A tensor larger than the device's
// maxStorageBufferBindingSize is not refused: its kernels silently compute zeros (seen on llvmpipe with 144 MiB).
// So allocating such a buffer becomes an error that says what to do.
function guardWebGPUBindingSize(): void {
  const manager = (tf.backend() as unknown as { bufferManager: WebGPUBufferManager }).bufferManager;
  if (manager.guarded) return;
  manager.guarded = true;
  const limit = webgpuBindingLimit()!, acquire = manager.acquireBuffer.bind(manager);
  const mib = (bytes: number) => `${(bytes / 2 ** 20).toFixed(1)} MiB`;
  manager.acquireBuffer = (size, usage, ...rest) => {
    if ((usage & GPUBufferUsage.STORAGE) && size > limit) {
      throw new Error(
        `a ${mib(size)} tensor exceeds this WebGPU device's maxStorageBufferBindingSize (${mib(limit)}): ` +
          `tfjs-webgpu would compute zeros with it. Use a smaller batch or sequence (the logits are B·T·V floats), ` +
          `a GPU with a larger limit (NVIDIA's is usually 2-4 GiB), or NANOVLM_BACKEND=wasm.`,
      );
    }
    return acquire(size, usage, ...rest);
  };
}

interface WebGPUTensorData {
  dtype: tf.DataType;
  values: unknown;
}

// nanovlm.ts reads token ids on the host (`dataSync`) to find the image slots. tfjs-webgpu drops a tensor's host copy
// when it uploads it, and under Deno it cannot read a GPU buffer synchronously, so a second forward pass on the same
// ids would fail. int32 tensors (ids, targets: small, and tensors never change) keep their host copy instead.
function keepHostIds(): void {
  const backend = tf.backend() as unknown as {
    uploadToGPU(dataId: object): void;
    tensorMap: { get(dataId: object): WebGPUTensorData };
    hostIdsKept?: boolean;
  };
  if (backend.hostIdsKept) return;
  backend.hostIdsKept = true;
  const upload = backend.uploadToGPU.bind(backend);
  backend.uploadToGPU = (dataId) => {
    const data = backend.tensorMap.get(dataId);
    const values = data.dtype === "int32" ? data.values : null;
    upload(dataId);
    if (values) data.values = values;
  };
}

// ---- wasm kernel fixes ----

let wasmFixesRegistered = false;

/**
 * Replace or add three kernels of the "wasm" backend (cpu and webgpu are untouched). Idempotent.
 *
 * 1. BatchMatMul: stock wasm reaches XNNPACK (about 22 GFLOP/s here) only for a plain 2-D product; with a transpose
 *    flag or a batch it runs a naive loop at 1-2 GFLOP/s. Every matMul inside a gradient has a transpose flag, so
 *    training was 10× slower. This version transposes explicitly and calls the stock kernel once per 2-D slice.
 * 2. Identity: stock wasm copies the buffer; the engine clones every tensor it saves for backprop through
 *    Identity, so sharing the buffer (as the cpu backend does) saves a copy per saved tensor.
 * 3. UnsortedSegmentSum: missing on wasm, and it is the gradient of `tf.gather` (embedding lookups).
 *
 * With `nativeBlas` (Deno loads OpenBLAS through FFI: runtime.ts), BatchMatMul calls its sgemm on the wasm heap instead.
 * Seven data-movement kernels (Cast, Slice, SplitV, Concat, Transpose, GatherV2, Tile) and Sum get faster versions
 * for the cases a VLM step hits ({@link registerWasmDataMovement}).
 */
export function registerWasmKernelFixes(nativeBlas: NativeBlas = { name: "wasm XNNPACK" }): void {
  if (wasmFixesRegistered) return;
  wasmFixesRegistered = true;
  const stock = (name: string) => {
    const config = tf.getKernel(name, "wasm");
    if (config === undefined) throw new Error(`tfjs-backend-wasm has no ${name} kernel to build on`);
    return config;
  };
  const stockMatMul = stock("BatchMatMul");
  const stockTranspose = stock("Transpose").kernelFunc;
  tf.unregisterKernel("BatchMatMul", "wasm");
  tf.unregisterKernel("Identity", "wasm");
  // setupFunc binds the C++ entry point that the stock kernel function calls, so keep it.
  const wasmMatMul = fastBatchMatMul(stockMatMul.kernelFunc, stockTranspose);
  blas = nativeBlas;
  const matMul = blas.gemm ? blasBatchMatMul(blas.gemm, wasmMatMul) : wasmMatMul;
  tf.registerKernel({ ...stockMatMul, kernelFunc: matMul });
  tf.registerKernel({ kernelName: "Identity", backendName: "wasm", kernelFunc: sharedIdentity });
  tf.registerKernel({ kernelName: "UnsortedSegmentSum", backendName: "wasm", kernelFunc: unsortedSegmentSum });
  tf.unregisterKernel("Tanh", "wasm");
  tf.registerKernel({
    kernelName: "Tanh",
    backendName: "wasm",
    kernelFunc: tanhBySigmoid(stock("Sigmoid").kernelFunc),
  });
  registerWasmDataMovement();
}

/**
 * tanh(x) = 2σ(2x) − 1. Stock wasm's tanh is about five times slower than its sigmoid (28 against 6 ms for 1M floats),
 * and GELU (nanovlm.ts `geluTanh`) runs one over every ViT MLP activation. Values agree to float32 rounding.
 */
function tanhBySigmoid(stockSigmoid: tf.KernelFunc): tf.KernelFunc {
  return ({ inputs, backend }) => {
    const wasm = backend as BackendWasm, x = inputs.x!;
    const doubled = wasm.makeOutput(x.shape, "float32");
    const source = wasm.typedArrayFromHeap(x) as Float32Array, target = wasm.typedArrayFromHeap(doubled);
    for (let i = 0; i < source.length; i++) target[i] = 2 * source[i];
    const out = stockSigmoid({ inputs: { x: doubled }, backend, attrs: {} }) as TensorInfo;
    wasm.disposeData(doubled.dataId);
    const values = wasm.typedArrayFromHeap(out) as Float32Array; // a view after the last malloc
    for (let i = 0; i < values.length; i++) values[i] = 2 * values[i] - 1;
    return out;
  };
}

function fastBatchMatMul(stockMatMul: tf.KernelFunc, stockTranspose: tf.KernelFunc): tf.KernelFunc {
  const plain = { transposeA: false, transposeB: false };
  const multiply = (args: KernelArgs, a: TensorInfo, b: TensorInfo) =>
    stockMatMul({ backend: args.backend, inputs: { a, b }, attrs: plain }) as TensorInfo;

  return (args) => {
    const backend = args.backend as BackendWasm;
    const { transposeA, transposeB } = args.attrs as unknown as { transposeA: boolean; transposeB: boolean };
    let { a, b } = args.inputs as { a: TensorInfo; b: TensorInfo };
    if (a.dtype !== "float32" || b.dtype !== "float32") return stockMatMul(args); // it throws the usual error
    const temporaries: TensorInfo[] = [];
    const swapLastTwo = (x: TensorInfo) => {
      const perm = x.shape.map((_, i) => i);
      perm.splice(-2, 2, perm.length - 1, perm.length - 2);
      const swapped = stockTranspose({ backend, inputs: { x }, attrs: { perm } }) as TensorInfo;
      temporaries.push(swapped);
      return swapped;
    };
    try {
      // A few rows against a big transposed matrix (a decoding step's logits, h·Eᵀ with E the [V, D] embedding):
      // transposing E would copy all of it at every token, so compute (E·hᵀ)ᵀ, transposing only the small parts.
      const rows = tf.util.sizeFromShape(a.shape.slice(0, -1)), [vocab, width] = b.shape;
      if (transposeB && !transposeA && b.shape.length === 2 && rows * (width + vocab) < vocab * width) {
        const product = multiply(args, b, swapLastTwo({ ...a, shape: [rows, width] })); // (vocab, rows)
        temporaries.push(product);
        const out = stockTranspose({ backend, inputs: { x: product }, attrs: { perm: [1, 0] } }) as TensorInfo;
        return { ...out, shape: [...a.shape.slice(0, -1), vocab] };
      }
      // Transposing costs one pass over memory; the naive transposed product costs far more.
      if (transposeA) a = swapLastTwo(a); // a: (...batchA, m, k)
      if (transposeB) b = swapLastTwo(b); // b: (...batchB, k, n)
      const [m, k] = a.shape.slice(-2), [kb, n] = b.shape.slice(-2);
      tf.util.assert(k === kb, () => `matMul: inner sizes ${k} and ${kb} differ (shapes ${a.shape} and ${b.shape})`);
      const batchShapeA = a.shape.slice(0, -2), batchShapeB = b.shape.slice(0, -2);
      const batchShape = tf.broadcast_util.assertAndGetBroadcastShape(batchShapeA, batchShapeB);
      const outShape = [...batchShape, m, n];
      const batchA = tf.util.sizeFromShape(batchShapeA), batchB = tf.util.sizeFromShape(batchShapeB);
      if (k === 0) { // an empty sum: XNNPACK would leave the output uninitialised
        const zeros = backend.makeOutput(outShape, "float32");
        backend.typedArrayFromHeap(zeros).fill(0);
        return zeros;
      }

      // One matrix on the right (x·W, or dW's dyᵀ·x once transposed): fold a's batch into its rows, one product.
      if (batchB === 1) {
        const rows = { ...a, shape: [batchA * m, k] }; // (batchA·m, k): same buffer, new shape
        const product = multiply(args, rows, { ...b, shape: [k, n] });
        return { ...product, shape: outShape };
      }
      // Otherwise one 2-D product per output slice, each pair of operands picked by broadcasting.
      const out = backend.makeOutput(outShape, "float32");
      const indexA = broadcastSource(batchShape, batchShapeA), indexB = broadcastSource(batchShape, batchShapeB);
      for (let i = 0; i < indexA.length; i++) {
        const sliceA = batchA === 1 ? { ...a, shape: [m, k] } : copySlice(backend, a, indexA[i], [m, k]);
        const sliceB = copySlice(backend, b, indexB[i], [k, n]);
        const product = multiply(args, sliceA, sliceB); // (m, n)
        backend.typedArrayFromHeap(out).set(backend.typedArrayFromHeap(product), i * m * n);
        backend.disposeData(product.dataId);
        backend.disposeData(sliceB.dataId);
        if (sliceA.dataId !== a.dataId) backend.disposeData(sliceA.dataId);
      }
      return out;
    } finally {
      for (const t of temporaries) backend.disposeData(t.dataId);
    }
  };
}

/** For each flat index into the broadcast batch `outShape`, the flat index into the batch `inShape` it reads. */
function broadcastSource(outShape: number[], inShape: number[]): number[] {
  const padded = [...Array(outShape.length - inShape.length).fill(1), ...inShape];
  const sources: number[] = [];
  for (let flat = 0; flat < tf.util.sizeFromShape(outShape); flat++) {
    let rest = flat, source = 0, stride = 1;
    for (let d = outShape.length - 1; d >= 0; d--) {
      if (padded[d] !== 1) source += (rest % outShape[d]) * stride;
      rest = Math.floor(rest / outShape[d]);
      stride *= padded[d];
    }
    sources.push(source);
  }
  return sources;
}

/** Copy matrix number `index` of `src` into a new 2-D tensor of `shape` on the wasm heap. */
function copySlice(backend: BackendWasm, src: TensorInfo, index: number, shape: number[]): TensorInfo {
  const slice = backend.makeOutput(shape, src.dtype);
  const size = shape[0] * shape[1];
  // Heap views are taken after makeOutput: a malloc may grow the heap, which detaches views made before it.
  backend.typedArrayFromHeap(slice).set(backend.typedArrayFromHeap(src).subarray(index * size, (index + 1) * size));
  return slice;
}

// ---- A native BLAS behind the wasm matMul (when the platform has one) ----

/** C = op(A)·op(B) for row-major float32 matrices, op = transpose when the flag is set. A (m, k), B (k, n), C (m, n). */
export type Gemm = (
  transA: boolean,
  transB: boolean,
  m: number,
  n: number,
  k: number,
  a: Float32Array,
  b: Float32Array,
  c: Float32Array,
) => void;

/**
 * A BLAS the platform provides for the wasm heap's matMul: its gemm, a name for logs, and its thread count (OpenBLAS).
 * Deno opens one through FFI (runtime.ts); a browser has none, and wasm's own XNNPACK computes.
 */
export interface NativeBlas {
  gemm?: Gemm;
  name: string;
  threads?: { get: () => number; set: (n: number) => void };
}
let blas: NativeBlas = { name: "not registered yet" };

/** What the wasm backend's matMul runs on: a BLAS library and its thread count, or wasm's own XNNPACK and why. */
export function wasmMatMulEngine(): string {
  if (!blas.threads) return blas.name;
  const n = blas.threads.get();
  return `${blas.name}, ${n} thread${n === 1 ? "" : "s"}`;
}

/**
 * Give each of `callers` threads that call matMul at once (the helpers of parallel.ts) its share of the cores:
 * OpenBLAS runs each product on 1 thread when there are several callers, else on every core. The setting is the
 * process's: call it from the main thread while no helper computes (train.ts and bench.ts once they know how many
 * threads will train, trainStep each step). It does nothing without OpenBLAS, or when the user set its thread count
 * (runtime.ts then hands over a `threads` whose `set` keeps it).
 */
export function shareBlasThreads(callers: number): void {
  blas.threads?.set(Math.max(1, Math.floor(navigator.hardwareConcurrency / callers)));
}

/** BatchMatMul on the wasm heap with a BLAS gemm: one call per output matrix, or one in all for x·W. */
function blasBatchMatMul(gemm: Gemm, fallback: tf.KernelFunc): tf.KernelFunc {
  return (args) => {
    const backend = args.backend as BackendWasm;
    const { transposeA, transposeB } = args.attrs as unknown as { transposeA: boolean; transposeB: boolean };
    const { a, b } = args.inputs as { a: TensorInfo; b: TensorInfo };
    if (a.dtype !== "float32" || b.dtype !== "float32") return fallback(args); // it throws the usual error
    const [m, k] = transposeA ? a.shape.slice(-2).reverse() : a.shape.slice(-2); // a: (...batchA, m, k) after op
    const [kb, n] = transposeB ? b.shape.slice(-2).reverse() : b.shape.slice(-2); // b: (...batchB, k, n) after op
    tf.util.assert(k === kb, () => `matMul: inner sizes ${k} and ${kb} differ (shapes ${a.shape} and ${b.shape})`);
    const batchShapeA = a.shape.slice(0, -2), batchShapeB = b.shape.slice(0, -2);
    const batchShape = tf.broadcast_util.assertAndGetBroadcastShape(batchShapeA, batchShapeB);
    const out = backend.makeOutput([...batchShape, m, n], "float32");
    // Views are taken after makeOutput: a malloc may grow the heap, which detaches views made before it.
    const [A, B, C] = [a, b, out].map((t) => backend.typedArrayFromHeap(t) as Float32Array);
    if (C.length === 0) return out;
    if (k === 0) {
      C.fill(0); // an empty sum; BLAS would reject the leading dimension of 0
      return out;
    }
    if (tf.util.sizeFromShape(batchShapeB) === 1 && !transposeA) {
      gemm(false, transposeB, C.length / n, n, k, A, B, C); // x·W: a's batch folds into its rows
      return out;
    }
    const indexA = broadcastSource(batchShape, batchShapeA), indexB = broadcastSource(batchShape, batchShapeB);
    const slice = (x: Float32Array, index: number, size: number) => x.subarray(index * size, (index + 1) * size);
    for (let i = 0; i < indexA.length; i++) {
      gemm(transposeA, transposeB, m, n, k, slice(A, indexA[i], m * k), slice(B, indexB[i], k * n), slice(C, i, m * n));
    }
    return out;
  };
}

function sharedIdentity({ inputs, backend }: KernelArgs): TensorInfo {
  const { x } = inputs as { x: TensorInfo };
  (backend as BackendWasm).incRef(x.dataId); // tensors are immutable, so two of them may share one buffer
  return { dataId: x.dataId, shape: x.shape, dtype: x.dtype };
}

function unsortedSegmentSum({ inputs, backend, attrs }: KernelArgs): TensorInfo {
  const wasm = backend as BackendWasm;
  const { x, segmentIds } = inputs as { x: TensorInfo; segmentIds: TensorInfo };
  const { numSegments } = attrs as unknown as { numSegments: number };
  const rows = tf.util.sizeFromShape(segmentIds.shape);
  const rowSize = tf.util.sizeFromShape(x.shape) / rows;
  const out = wasm.makeOutput([numSegments, ...x.shape.slice(segmentIds.shape.length)], x.dtype);
  const values = wasm.typedArrayFromHeap(x), ids = wasm.typedArrayFromHeap(segmentIds);
  const sums = wasm.typedArrayFromHeap(out).fill(0); // malloc'd memory is not zeroed
  for (let row = 0; row < rows; row++) {
    const id = ids[row];
    if (id < 0 || id >= numSegments) continue; // dropped, as the cpu backend and TensorFlow do
    for (let j = 0; j < rowSize; j++) sums[id * rowSize + j] += values[row * rowSize + j];
  }
  return out;
}

// ---- wasm data movement ----
//
// After the matMul fixes, a 5.3M-parameter training step still spent about 15% of its kernel time moving data,
// measured per kernel (BENCHMARKS.md): stock Slice copies its whole input out of the heap before slicing it (SplitV
// into two halves copied it twice), Concat and Slice allocate a typed-array view per row even for rows of 32 floats,
// 5-D/6-D transposes (patchify, pixel shuffle) run 60× slower than 4-D ones, Sum over leading axes (every bias
// gradient) transposes first, GatherV2 copies element by element, and Cast to the same dtype (the gradient of every
// multiply) copies, as does a transpose that moves nothing (in nanovlm-222m's embedding gradient: 113 MB), and Tile
// (the gradient of every sum and mean: registerBroadcastGradients) computes an index per element. Each
// replacement below handles the float32/int32 cases a VLM step hits and hands anything else to the stock kernel.

type Values = Float32Array | Int32Array | Uint8Array;

/** Copy n values; short runs in a loop, because a subarray view per run costs more than the copy. */
function copyRun(src: Values, from: number, dst: Values, to: number, n: number): void {
  if (n < 64) { for (let j = 0; j < n; j++) dst[to + j] = src[from + j]; }
  else dst.set(src.subarray(from, from + n), to);
}

/**
 * Evenly spaced rows copied inside the wasm heap by WebAssembly's bulk `memory.copy`: `rows` runs of `bytes` bytes, the
 * k-th from src + k·srcStride to dst + k·dstStride (byte offsets). rotate_half splits every query and key row of 64
 * floats into two halves and joins them back (a Slice and a Concat each way, and again in the gradient): a JS loop
 * moves a float in about 0.7 ns, memory.copy a run of 32 in about 8 (scratch timing: 4,096 rows of 32 floats, 91 µs
 * in a loop, 34 µs here).
 */
export const COPY_ROWS_WAT = `(module
  (import "rows" "tensors" (memory 0))
  (func (export "copy")
    (param $src i32) (param $dst i32) (param $rows i32) (param $bytes i32) (param $srcStride i32) (param $dstStride i32)
    (block $done
      (loop $next
        (br_if $done (i32.eqz (local.get $rows)))
        (memory.copy (local.get $dst) (local.get $src) (local.get $bytes))
        (local.set $src (i32.add (local.get $src) (local.get $srcStride)))
        (local.set $dst (i32.add (local.get $dst) (local.get $dstStride)))
        (local.set $rows (i32.sub (local.get $rows) (i32.const 1)))
        (br $next)))))`;

/** COPY_ROWS_WAT assembled (tests/runtime_test.ts checks that the two agree, as for ADAMW_WASM). */
export const COPY_ROWS_WASM =
  "AGFzbQEAAAABCgFgBn9/f39/fwACEQEEcm93cwd0ZW5zb3JzAgAAAwIBAAcIAQRjb3B5AAAKMAEuAAJAA0AgAkUNASABIAAgA/wKAAAgACAEaiEAIAEgBWohASACQQFrIQIMAAsLCw==";

type RowCopy = (src: number, dst: number, rows: number, bytes: number, srcStride: number, dstStride: number) => void;
let rowCopy: { memory: WebAssembly.Memory; copy: RowCopy } | undefined;

/**
 * The wasm backend's heap as a memory our own modules (COPY_ROWS_WAT, ADAMW_WAT) can import, or null: tfjs' threaded
 * build (a browser page that is cross-origin isolated) neither exports its memory nor could give it to them, since it
 * is shared between threads and they declare an unshared one.
 */
export function wasmHeap(backend: unknown): WebAssembly.Memory | null {
  const memory = (backend as { wasm: { asm?: { memory?: WebAssembly.Memory } } }).wasm.asm?.memory;
  if (!memory || (typeof SharedArrayBuffer !== "undefined" && memory.buffer instanceof SharedArrayBuffer)) return null;
  return memory;
}

/** The row copier over this backend's heap, or null where there is none to import (see {@link wasmHeap}). */
function rowCopier(backend: unknown): RowCopy | null {
  const memory = wasmHeap(backend);
  if (!memory) return null;
  if (rowCopy?.memory !== memory) {
    const module = new WebAssembly.Module(Uint8Array.from(atob(COPY_ROWS_WASM), (ch) => ch.charCodeAt(0)));
    const copy = new WebAssembly.Instance(module, { rows: { tensors: memory } }).exports.copy as RowCopy;
    rowCopy = { memory, copy };
  }
  return rowCopy.copy;
}

/** Where a tensor's values start in the wasm heap, in bytes. */
const heapOffset = (backend: unknown, t: TensorInfo) => (backend as BackendWasm).dataIdMap.get(t.dataId)!.memoryOffset;

/** Register the replacements; each falls back to the stock kernel (passed in) outside the cases it handles. */
function registerWasmDataMovement(): void {
  const replace = (name: string, kernel: (args: KernelArgs, stock: tf.KernelFunc) => TensorInfo | TensorInfo[]) => {
    const config = tf.getKernel(name, "wasm")!;
    tf.unregisterKernel(name, "wasm");
    tf.registerKernel({ ...config, kernelFunc: (args) => kernel(args, config.kernelFunc) });
  };
  replace("Cast", castSameDtype);
  replace("Slice", (args, stock) => sliceInPlace(args) ?? stock(args));
  replace("SplitV", (args, stock) => splitInPlace(args) ?? stock(args));
  replace("Concat", (args, stock) => concatRows(args) ?? stock(args));
  replace("Transpose", (args, stock) => transposeFast(args) ?? stock(args));
  replace("Sum", (args, stock) => sumLeadingAxes(args) ?? stock(args));
  replace("GatherV2", (args, stock) => gatherRows(args) ?? stock(args));
  replace("Tile", (args, stock) => tileByCopies(args) ?? stock(args));
}

const heap = (backend: unknown, t: TensorInfo) => (backend as BackendWasm).typedArrayFromHeap(t) as Values;
const makeOutput = (backend: unknown, shape: number[], dtype: tf.DataType) =>
  (backend as BackendWasm).makeOutput(shape, dtype);
const numeric = (...ts: TensorInfo[]) => ts.every((t) => t.dtype !== "string" && t.dtype !== "complex64");

/** A cast to the tensor's own dtype shares the buffer, as Identity does. */
function castSameDtype(args: KernelArgs, stock: tf.KernelFunc): TensorInfo {
  const { x } = args.inputs as { x: TensorInfo };
  if (x.dtype !== (args.attrs as unknown as { dtype: string }).dtype) return stock(args) as TensorInfo;
  return sharedIdentity(args);
}

/** Slice read in place; rows of the last axis copied one run at a time. */
function sliceInPlace({ inputs, attrs, backend }: KernelArgs): TensorInfo | null {
  const { x } = inputs as { x: TensorInfo };
  if (!numeric(x)) return null;
  const requested = attrs as unknown as { begin: number[]; size: number[] };
  const [begin, size] = tf.slice_util.parseSliceParams(x as tf.Tensor, requested.begin, requested.size);
  const out = makeOutput(backend, size, x.dtype);
  const total = tf.util.sizeFromShape(size);
  if (total === 0) return out;
  const src = heap(backend, x), dst = heap(backend, out); // views after makeOutput (a malloc may grow the heap)
  const rank = size.length, run = size[rank - 1], strides = tf.util.computeStrides(x.shape);
  // Whole leading axes (a split along the last one, as rotate_half's): evenly spaced rows, one memory.copy call.
  const copier = rowCopier(backend), width = x.shape[rank - 1], bytes = src.BYTES_PER_ELEMENT;
  if (copier && size.slice(0, -1).every((n, d) => n === x.shape[d])) {
    const from = heapOffset(backend, x) + begin[rank - 1] * bytes;
    copier(from, heapOffset(backend, out), total / run, run * bytes, width * bytes, run * bytes);
    return out;
  }
  const index = new Array(rank - 1).fill(0); // position among the rows, an odometer over the leading axes
  for (let row = 0; row < total / run; row++) {
    let from = begin[rank - 1];
    for (let d = 0; d < rank - 1; d++) from += (begin[d] + index[d]) * strides[d];
    copyRun(src, from, dst, row * run, run);
    for (let d = rank - 2; d >= 0 && ++index[d] === size[d]; d--) index[d] = 0;
  }
  return out;
}

/** SplitV as one in-place slice per piece (the stock version copies the whole input for each). */
function splitInPlace(args: KernelArgs): TensorInfo[] | null {
  const { x } = args.inputs as { x: TensorInfo };
  if (!numeric(x)) return null;
  const { numOrSizeSplits, axis } = args.attrs as unknown as { numOrSizeSplits: number | number[]; axis: number };
  const along = tf.util.parseAxisParam(axis, x.shape)[0];
  const begin = x.shape.map(() => 0);
  return tf.backend_util.prepareSplitSize(x as tf.Tensor, numOrSizeSplits, along).map((length) => {
    const size = x.shape.map((n, d) => d === along ? length : n);
    const piece = sliceInPlace({ ...args, attrs: { begin: [...begin], size } as unknown as tf.NamedAttrMap })!;
    begin[along] += length;
    return piece;
  });
}

/** Concat: for each row before the axis, each input's part of it in turn. */
function concatRows({ inputs, attrs, backend }: KernelArgs): TensorInfo | null {
  const parts = inputs as unknown as TensorInfo[];
  if (parts.length < 2 || !numeric(...parts) || parts.some((t) => t.dtype !== parts[0].dtype)) return null;
  const axis = tf.util.parseAxisParam((attrs as unknown as { axis: number }).axis, parts[0].shape)[0];
  const out = makeOutput(backend, tf.backend_util.computeOutShape(parts.map((t) => t.shape), axis), parts[0].dtype);
  const dst = heap(backend, out);
  const rows = tf.util.sizeFromShape(parts[0].shape.slice(0, axis));
  const widths = parts.map((t) => tf.util.sizeFromShape(t.shape.slice(axis)));
  const rowWidth = widths.reduce((a, b) => a + b, 0);
  const copier = rowCopier(backend), bytes = dst.BYTES_PER_ELEMENT;
  let column = 0;
  parts.forEach((part, i) => {
    if (copier) {
      const to = heapOffset(backend, out) + column * bytes;
      copier(heapOffset(backend, part), to, rows, widths[i] * bytes, widths[i] * bytes, rowWidth * bytes);
    } else {
      const src = heap(backend, part);
      for (let row = 0; row < rows; row++) copyRun(src, row * widths[i], dst, row * rowWidth + column, widths[i]);
    }
    column += widths[i];
  });
  return out;
}

/**
 * Transposes that only move size-1 axes share the buffer (stock wasm copies them: the gradient of the 113 MB
 * embedding lookup goes through one). Those of rank 5 and 6 (stock wasm handles ≤ 4 well) walk the output and
 * read the input with strides.
 */
function transposeFast(args: KernelArgs): TensorInfo | null {
  const { x } = args.inputs as { x: TensorInfo };
  const { perm } = args.attrs as unknown as { perm: number[] };
  const moved = perm.filter((p) => x.shape[p] !== 1); // the order of the axes that hold data
  if (moved.every((p, i) => i === 0 || p > moved[i - 1])) {
    return { ...sharedIdentity(args), shape: perm.map((p) => x.shape[p]) };
  }
  const { backend } = args;
  if (x.shape.length < 5 || !numeric(x)) return null;
  const outShape = perm.map((p) => x.shape[p]);
  const out = makeOutput(backend, outShape, x.dtype);
  const total = tf.util.sizeFromShape(outShape);
  if (total === 0) return out;
  const src = heap(backend, x), dst = heap(backend, out);
  const inStrides = [...tf.util.computeStrides(x.shape), 1];
  const step = perm.map((p) => inStrides[p]); // how far the input moves per step along each output axis
  const rank = perm.length, run = outShape[rank - 1], runStep = step[rank - 1];
  const index = new Array(rank - 1).fill(0);
  for (let row = 0; row < total / run; row++) {
    let from = 0;
    for (let d = 0; d < rank - 1; d++) from += index[d] * step[d];
    if (runStep === 1) copyRun(src, from, dst, row * run, run); // the last axis stays last (patchify, shuffle)
    else for (let j = 0; j < run; j++) dst[row * run + j] = src[from + j * runStep];
    for (let d = rank - 2; d >= 0 && ++index[d] === outShape[d]; d--) index[d] = 0;
  }
  return out;
}

/** Sum over leading axes (a bias or norm-weight gradient: [B, T, D] → [D]) as column sums, in float64. */
function sumLeadingAxes({ inputs, attrs, backend }: KernelArgs): TensorInfo | null {
  const { x } = inputs as { x: TensorInfo };
  const { axis, keepDims } = attrs as unknown as { axis: number | number[]; keepDims: boolean };
  const axes = tf.util.parseAxisParam(axis, x.shape).sort((a, b) => a - b);
  if (x.dtype !== "float32" || axes.length === x.shape.length || axes.some((a, i) => a !== i)) return null;
  const kept = x.shape.slice(axes.length);
  const out = makeOutput(backend, keepDims ? [...axes.map(() => 1), ...kept] : kept, "float32");
  const src = heap(backend, x), dst = heap(backend, out);
  const columns = tf.util.sizeFromShape(kept), sums = new Float64Array(columns);
  for (let start = 0; start < src.length; start += columns) {
    for (let j = 0; j < columns; j++) sums[j] += src[start + j];
  }
  dst.set(sums);
  return out;
}

/** GatherV2 along axis 0 (embedding lookups, image-token fusion): whole rows at a time. */
function gatherRows({ inputs, attrs, backend }: KernelArgs): TensorInfo | null {
  const { x, indices } = inputs as { x: TensorInfo; indices: TensorInfo };
  const { axis, batchDims } = attrs as unknown as { axis: number; batchDims: number };
  if (!numeric(x) || batchDims !== 0 || tf.util.parseAxisParam(axis, x.shape)[0] !== 0) return null;
  const out = makeOutput(backend, [...indices.shape, ...x.shape.slice(1)], x.dtype);
  const src = heap(backend, x), dst = heap(backend, out), ids = heap(backend, indices);
  const rowSize = tf.util.sizeFromShape(x.shape.slice(1)), rows = x.shape[0];
  for (let i = 0; i < ids.length; i++) {
    const id = ids[i];
    if (!(id >= 0 && id < rows)) throw new Error(`GatherV2: the index value ${id} is not in [0, ${rows - 1}]`);
    copyRun(src, id * rowSize, dst, i * rowSize, rowSize);
  }
  return out;
}

/**
 * Tile (broadcastTo, and so the gradient of every sum and mean: see {@link registerBroadcastGradients}) by whole
 * blocks: each axis writes its first copy, then doubles it with copyWithin. Stock wasm computes an index per element
 * (about 50 ns: 10 ms for a [8, 96, 256] broadcast).
 */
function tileByCopies({ inputs, attrs, backend }: KernelArgs): TensorInfo | null {
  const { x } = inputs as { x: TensorInfo };
  const { reps } = attrs as unknown as { reps: number[] };
  if (!numeric(x) || x.shape.length === 0) return null;
  const outShape = x.shape.map((n, d) => n * reps[d]);
  const out = makeOutput(backend, outShape, x.dtype);
  if (tf.util.sizeFromShape(outShape) === 0) return out;
  const src = heap(backend, x), dst = heap(backend, out);
  const inBlock = [...tf.util.computeStrides(x.shape), 1], outBlock = [...tf.util.computeStrides(outShape), 1];
  // Writes x's block at (axis, from) to dst at `to`: its rows one after another, then the copies along `axis`.
  const tile = (axis: number, from: number, to: number) => {
    const n = x.shape[axis], copy = n * outBlock[axis]; // one copy of the axis, as written in the output
    const last = axis === x.shape.length - 1;
    if (last && n === 1) return void dst.fill(src[from], to, to + reps[axis]); // a broadcast row, written in one go
    if (last) copyRun(src, from, dst, to, n);
    else for (let i = 0; i < n; i++) tile(axis + 1, from + i * inBlock[axis], to + i * outBlock[axis]);
    for (let done = 1; done < reps[axis]; done *= 2) { // 1, 2, 4, ... copies written: double them
      dst.copyWithin(to + done * copy, to, to + Math.min(done, reps[axis] - done) * copy);
    }
  };
  tile(0, 0, 0);
  return out;
}

// ---- AdamW's update as a WebAssembly SIMD kernel ----

/**
 * AdamW's update of one parameter, in WebAssembly text: four float32 lanes at a time, then the last n mod 4 one by
 * one. A JS loop does this arithmetic in float64, one element at a time, and its square root and division made it
 * compute-bound (3.8 ns an element: 0.85 s a step for the 222M); four lanes of float32 reach the speed of memory
 * (1 ns). It reads and writes two memories: the tensors (tfjs' wasm heap itself, or a staging copy on the cpu
 * backend) and the moments, which stay outside that 4 GiB heap. Pointers are byte offsets, n counts elements.
 *
 *   g  = grad · gradScale                        (gradient clipping's coefficient)
 *   m ← beta1·m + keep1·g,  v ← beta2·v + keep2·g²   (keep = 1 − beta; in place)
 *   w  = p·decay − stepSize·m / (√v · invBc2Sqrt + eps)   (decay = 1 − lr·weightDecay, stepSize = lr / bc1)
 */
export const ADAMW_WAT = `(module
  (import "adamw" "tensors" (memory $tensors 1))
  (import "adamw" "moments" (memory $moments 1))
  (func (export "step")
    (param $w i32) (param $p i32) (param $g i32) (param $m i32) (param $v i32) (param $n i32)
    (param $gradScale f32) (param $beta1 f32) (param $keep1 f32) (param $beta2 f32) (param $keep2 f32)
    (param $decay f32) (param $stepSize f32) (param $invBc2Sqrt f32) (param $eps f32)
    (local $i i32) (local $bytes4 i32) (local $bytes i32)
    (local $g4 v128) (local $m4 v128) (local $v4 v128) (local $g1 f32) (local $m1 f32) (local $v1 f32)
    (local.set $bytes (i32.shl (local.get $n) (i32.const 2)))
    (local.set $bytes4 (i32.and (local.get $bytes) (i32.const -16)))
    (block $done4 (loop $four
      (br_if $done4 (i32.ge_u (local.get $i) (local.get $bytes4)))
      (local.set $g4 (f32x4.mul (v128.load $tensors (i32.add (local.get $g) (local.get $i)))
                                (f32x4.splat (local.get $gradScale))))
      (local.set $m4 (f32x4.add (f32x4.mul (v128.load $moments (i32.add (local.get $m) (local.get $i)))
                                           (f32x4.splat (local.get $beta1)))
                                (f32x4.mul (local.get $g4) (f32x4.splat (local.get $keep1)))))
      (local.set $v4 (f32x4.add (f32x4.mul (v128.load $moments (i32.add (local.get $v) (local.get $i)))
                                           (f32x4.splat (local.get $beta2)))
                                (f32x4.mul (f32x4.mul (local.get $g4) (local.get $g4)) (f32x4.splat (local.get $keep2)))))
      (v128.store $moments (i32.add (local.get $m) (local.get $i)) (local.get $m4))
      (v128.store $moments (i32.add (local.get $v) (local.get $i)) (local.get $v4))
      (v128.store $tensors (i32.add (local.get $w) (local.get $i))
        (f32x4.sub
          (f32x4.mul (v128.load $tensors (i32.add (local.get $p) (local.get $i))) (f32x4.splat (local.get $decay)))
          (f32x4.div (f32x4.mul (local.get $m4) (f32x4.splat (local.get $stepSize)))
                     (f32x4.add (f32x4.mul (f32x4.sqrt (local.get $v4)) (f32x4.splat (local.get $invBc2Sqrt)))
                                (f32x4.splat (local.get $eps))))))
      (local.set $i (i32.add (local.get $i) (i32.const 16)))
      (br $four)))
    (block $done (loop $one
      (br_if $done (i32.ge_u (local.get $i) (local.get $bytes)))
      (local.set $g1 (f32.mul (f32.load $tensors (i32.add (local.get $g) (local.get $i))) (local.get $gradScale)))
      (local.set $m1 (f32.add (f32.mul (f32.load $moments (i32.add (local.get $m) (local.get $i))) (local.get $beta1))
                              (f32.mul (local.get $g1) (local.get $keep1))))
      (local.set $v1 (f32.add (f32.mul (f32.load $moments (i32.add (local.get $v) (local.get $i))) (local.get $beta2))
                              (f32.mul (f32.mul (local.get $g1) (local.get $g1)) (local.get $keep2))))
      (f32.store $moments (i32.add (local.get $m) (local.get $i)) (local.get $m1))
      (f32.store $moments (i32.add (local.get $v) (local.get $i)) (local.get $v1))
      (f32.store $tensors (i32.add (local.get $w) (local.get $i))
        (f32.sub (f32.mul (f32.load $tensors (i32.add (local.get $p) (local.get $i))) (local.get $decay))
                 (f32.div (f32.mul (local.get $m1) (local.get $stepSize))
                          (f32.add (f32.mul (f32.sqrt (local.get $v1)) (local.get $invBc2Sqrt)) (local.get $eps)))))
      (local.set $i (i32.add (local.get $i) (i32.const 4)))
      (br $one)))))`;

/**
 * ADAMW_WAT assembled (wat2wasm with multi-memory, no names), base64: the bytes the kernel runs. Kept here rather
 * than assembled at run time so that nothing but tfjs loads at startup; tests/runtime_test.ts assembles ADAMW_WAT with
 * npm:wabt and fails, printing the new bytes, whenever the two differ.
 */
export const ADAMW_WASM = [
  "AGFzbQEAAAABEwFgD39/f39/f319fX19fX19fQACIwIFYWRhbXcHdGVuc29ycwIAAQVhZGFtdwdtb21lbnRzAgABAwIBAAcIAQRzdGVwAAAK3gIB",
  "2wIDA38DewN9IAVBAnQhESARQXBxIRACQANAIA8gEE8NASACIA9q/QAEACAG/RP95gEhEiADIA9q/QBEAQAgB/0T/eYBIBIgCP0T/eYB/eQBIRMg",
  "BCAPav0ARAEAIAn9E/3mASASIBL95gEgCv0T/eYB/eQBIRQgAyAPaiAT/QtEAQAgBCAPaiAU/QtEAQAgACAPaiABIA9q/QAEACAL/RP95gEgEyAM",
  "/RP95gEgFP3jASAN/RP95gEgDv0T/eQB/ecB/eUB/QsEACAPQRBqIQ8MAAsLAkADQCAPIBFPDQEgAiAPaioCACAGlCEVIAMgD2oqQgEAIAeUIBUg",
  "CJSSIRYgBCAPaipCAQAgCZQgFSAVlCAKlJIhFyADIA9qIBY4QgEAIAQgD2ogFzhCAQAgACAPaiABIA9qKgIAIAuUIBYgDJQgF5EgDZQgDpKVkzgC",
  "ACAPQQRqIQ8MAAsLCw==",
].join("");

/** AdamW's constants for one step of one parameter group (see ADAMW_WAT). */
export interface AdamWStepConstants {
  gradScale: number;
  beta1: number;
  beta2: number;
  decay: number;
  stepSize: number;
  invBc2Sqrt: number;
  eps: number;
}

let adamWModule: WebAssembly.Module | undefined;

/**
 * AdamW's moments for a set of parameters, in one WebAssembly memory sized once (so views of it stay valid), and the
 * SIMD kernel that updates a parameter with them (ADAMW_WAT). On wasm the kernel reads the weight and the gradient
 * on tfjs' heap and writes the new weight there, with no copies; on the cpu backend (tests), and where the heap cannot
 * be imported (a browser's threaded build: {@link wasmHeap}), through a staging memory.
 * m and v of a parameter start at 16-byte boundaries, zero.
 */
export class SimdAdamW {
  private readonly moments: WebAssembly.Memory;
  private readonly offsets = new Map<string, { m: number; v: number; n: number }>();
  private staging?: WebAssembly.Memory; // the cpu backend's copies of weight, gradient and new weight
  private kernel?: { tensors: WebAssembly.Memory; step: (...args: number[]) => void };

  /** sizes: the element count of each parameter, by name. */
  constructor(sizes: Map<string, number>) {
    let bytes = 0;
    for (const [name, n] of sizes) {
      const padded = Math.ceil(n / 4) * 16;
      this.offsets.set(name, { m: bytes, v: bytes + padded, n });
      bytes += 2 * padded;
    }
    const pages = Math.max(1, Math.ceil(bytes / 65536));
    if (pages > 65536) {
      throw new Error(
        `AdamW: the moments of this model (${(bytes / 2 ** 30).toFixed(1)} GiB) do not fit one WebAssembly memory ` +
          `(4 GiB at most): train a model this large on the WebGPU backend, where they stay on the GPU`,
      );
    }
    this.moments = new WebAssembly.Memory({ initial: pages });
  }

  /** Views of a parameter's m and v (valid as long as this object: its memory never grows). */
  state(name: string): { m: Float32Array; v: Float32Array } {
    const { m, v, n } = this.offsets.get(name)!;
    return { m: new Float32Array(this.moments.buffer, m, n), v: new Float32Array(this.moments.buffer, v, n) };
  }

  /** One AdamW step of parameter `name`: updates its moments and returns the new weight as a new tensor. */
  step(name: string, p: tf.Tensor, g: tf.Tensor, c: AdamWStepConstants): tf.Tensor {
    const { m, v, n } = this.offsets.get(name)!;
    if (p.size !== n || g.size !== n || p.dtype !== "float32" || g.dtype !== "float32") {
      throw new Error(`AdamW: ${name} needs float32 weight and gradient of ${n} values`);
    }
    const { gradScale, beta1, beta2, decay, stepSize, invBc2Sqrt, eps } = c; // in ADAMW_WAT's parameter order:
    const constants = [gradScale, beta1, 1 - beta1, beta2, 1 - beta2, decay, stepSize, invBc2Sqrt, eps];
    const tensors = tf.getBackend() === "wasm" ? wasmHeap(tf.backend()) : null;
    if (tensors) {
      const backend = tf.backend() as BackendWasm, out = backend.makeOutput(p.shape, "float32");
      this.kernelFor(tensors)(
        heapOffset(backend, out),
        heapOffset(backend, p),
        heapOffset(backend, g),
        m,
        v,
        n,
        ...constants,
      );
      return tf.engine().makeTensorFromTensorInfo(out);
    }
    // Other backends, and a heap that cannot be imported: weight at 0, gradient at 4n, new weight at 8n bytes of the
    // staging memory.
    const pages = Math.ceil((12 * n) / 65536);
    if (!this.staging) this.staging = new WebAssembly.Memory({ initial: pages });
    else if (this.staging.buffer.byteLength < 12 * n) this.staging.grow(pages - this.staging.buffer.byteLength / 65536);
    const staged = new Float32Array(this.staging.buffer, 0, 3 * n);
    staged.set(p.dataSync() as Float32Array, 0);
    staged.set(g.dataSync() as Float32Array, n);
    this.kernelFor(this.staging)(8 * n, 0, 4 * n, m, v, n, ...constants);
    return tf.tensor(staged.slice(2 * n), p.shape, "float32");
  }

  /** The kernel instantiated over `tensors` (one instance per memory it has been given, the latest kept). */
  private kernelFor(tensors: WebAssembly.Memory): (...args: number[]) => void {
    if (this.kernel?.tensors !== tensors) {
      adamWModule ??= new WebAssembly.Module(Uint8Array.from(atob(ADAMW_WASM), (ch) => ch.charCodeAt(0)));
      const instance = new WebAssembly.Instance(adamWModule, { adamw: { tensors, moments: this.moments } });
      this.kernel = { tensors, step: instance.exports.step as (...args: number[]) => void };
    }
    return this.kernel.step;
  }
}

// ---- AdamW's update as WebGPU programs ----

/**
 * The WGSL of AdamW's three passes over one parameter (the arithmetic of ADAMW_WAT): the two moments, then the new
 * weight from them. Composed from tfjs ops the same update is about fifteen kernels per parameter, each a dispatch
 * with its own bind group and uniform buffer; these are three.
 */
const ADAMW_WGSL = {
  // m ← beta1·m + keep1·g, with g = grad · gradScale
  m: {
    inputs: ["G", "M"],
    uniforms: "beta : f32, keep : f32, gradScale : f32,",
    body: "let g = G[i] * uniforms.gradScale; return uniforms.beta * M[i] + uniforms.keep * g;",
  },
  // v ← beta2·v + keep2·g²
  v: {
    inputs: ["G", "V"],
    uniforms: "beta : f32, keep : f32, gradScale : f32,",
    body: "let g = G[i] * uniforms.gradScale; return uniforms.beta * V[i] + uniforms.keep * g * g;",
  },
  // w = p·decay − stepSize·m / (√v · invBc2Sqrt + eps), from the new m and v
  w: {
    inputs: ["P", "M", "V"],
    uniforms: "decay : f32, stepSize : f32, invBc2Sqrt : f32, eps : f32,",
    body:
      "return P[i] * uniforms.decay - uniforms.stepSize * M[i] / (sqrt(V[i]) * uniforms.invBc2Sqrt + uniforms.eps);",
  },
} as const;

/**
 * One of ADAMW_WGSL's passes as a tfjs WebGPU program (what `backend.runWebGPUProgram` takes: tfjs declares each
 * input as a storage array named after it, the uniforms, and `setOutputAtIndex`) over n elements, inputs flat.
 */
class AdamWProgram {
  readonly variableNames: string[];
  readonly uniforms: string;
  readonly outputShape: number[];
  readonly shaderKey: string;
  readonly workgroupSize: [number, number, number] = [128, 1, 1];
  readonly dispatchLayout: { x: number[] };
  readonly dispatch: [number, number, number];
  readonly size = true; // uniforms.size: the element count
  private readonly body: string;

  constructor(pass: keyof typeof ADAMW_WGSL, n: number) {
    const { inputs, uniforms, body } = ADAMW_WGSL[pass];
    [this.variableNames, this.uniforms, this.body] = [[...inputs], uniforms, body];
    this.outputShape = [n];
    this.shaderKey = `nanovlm_adamw_${pass}`; // one compiled pipeline per pass, whatever n
    this.dispatchLayout = webgpu_util.flatDispatchLayout(this.outputShape);
    this.dispatch = webgpu_util.computeDispatch(this.dispatchLayout, this.outputShape, this.workgroupSize);
  }

  getUserCode(): string {
    return `fn adamwValue(i : i32) -> f32 { ${this.body} }
      fn main(index : i32) { if (index < uniforms.size) { setOutputAtIndex(index, adamwValue(index)); } }`;
  }
}

/**
 * Σ x² of a whole tensor on WebGPU in one dispatch, for the gradient norm: one workgroup of 256 threads, each summing
 * the squares of every 256th element, then a tree over the 256 partial sums in workgroup memory. tfjs' own
 * `x.square().sum()` is two dispatches and writes x² out in between (for the 222M's 47M-float embedding gradient,
 * 188 MB written and read again). Its Sum is also one workgroup per output, so this loses nothing in parallelism.
 */
class SumOfSquaresProgram {
  readonly variableNames = ["x"];
  readonly uniforms = "length : i32,";
  readonly outputShape = [1];
  readonly shaderKey = "nanovlm_sum_of_squares";
  readonly workgroupSize: [number, number, number] = [256, 1, 1];
  readonly dispatchLayout = webgpu_util.flatDispatchLayout([1]);
  readonly dispatch: [number, number, number] = [1, 1, 1];

  getUserCode(): string {
    return `var<workgroup> partial : array<f32, 256>;
      fn main(index : i32) {
        var sum = 0.0;
        for (var k = i32(localId.x); k < uniforms.length; k = k + 256) {
          let value = x[k];
          sum = sum + value * value;
        }
        partial[localId.x] = sum;
        workgroupBarrier();
        for (var stride = 128u; stride > 0u; stride = stride / 2u) {
          if (localId.x < stride) { partial[localId.x] = partial[localId.x] + partial[localId.x + stride]; }
          workgroupBarrier();
        }
        if (localId.x == 0u) { setOutputAtIndex(0, partial[0]); }
      }`;
  }
}

let webgpuProgramsRegistered = false;

/**
 * The WebGPU programs above as tfjs kernels of the "webgpu" backend, so that they run like tfjs' own: counted by
 * `tf.profile` (and so by `deno task bench`'s kernel count), their tensors tracked by the engine. Idempotent.
 */
function registerWebGPUPrograms(): void {
  if (webgpuProgramsRegistered) return;
  webgpuProgramsRegistered = true;
  // Uniforms as entries of one float each: an entry of three floats would be packed as a vec3 (16-byte aligned).
  const floats = (values: number[]) => values.map((value) => ({ type: "float32", data: [value] }));
  tf.registerKernel({
    kernelName: "NanovlmAdamW",
    backendName: "webgpu",
    kernelFunc: ({ inputs, backend, attrs }) => {
      const { pass, uniforms } = attrs as unknown as { pass: keyof typeof ADAMW_WGSL; uniforms: number[] };
      const named = inputs as Record<string, TensorInfo>;
      const ordered = ADAMW_WGSL[pass].inputs.map((name) => named[name]); // all flat, [n]
      const program = new AdamWProgram(pass, ordered[0].shape[0]);
      return (backend as WebGPUBackend).runWebGPUProgram(program, ordered, "float32", floats(uniforms));
    },
  });
  tf.registerKernel({
    kernelName: "NanovlmSumOfSquares",
    backendName: "webgpu",
    kernelFunc: ({ inputs, backend }) => {
      const { x } = inputs as { x: TensorInfo };
      const length = [{ type: "int32", data: [tf.util.sizeFromShape(x.shape)] }];
      return (backend as WebGPUBackend).runWebGPUProgram(new SumOfSquaresProgram(), [x], "float32", length);
    },
  });
}

/** Σ g² of one tensor on WebGPU, as a scalar, in one dispatch ({@link SumOfSquaresProgram}). */
export function webgpuSumOfSquares(g: tf.Tensor): tf.Scalar {
  registerWebGPUPrograms();
  return tf.tidy(() => (tf.engine().runKernel("NanovlmSumOfSquares", { x: g }) as tf.Tensor).reshape([]));
}

/**
 * One AdamW step of one parameter on WebGPU: new m, v and weight, as new tensors (the old ones are the caller's).
 * p, g, m, v of one shape; the constants as for SimdAdamW.
 */
export function webgpuAdamWStep(
  p: tf.Tensor,
  g: tf.Tensor,
  m: tf.Tensor,
  v: tf.Tensor,
  c: AdamWStepConstants,
): { p: tf.Tensor; m: tf.Tensor; v: tf.Tensor } {
  registerWebGPUPrograms();
  const n = p.size;
  const run = (pass: keyof typeof ADAMW_WGSL, inputs: Record<string, tf.Tensor>, uniforms: number[]) => {
    const flat = Object.fromEntries(Object.entries(inputs).map(([name, t]) => [name, t.reshape([n])]));
    return tf.engine().runKernel("NanovlmAdamW", flat, { pass, uniforms } as unknown as tf.NamedAttrMap) as tf.Tensor;
  };
  return tf.tidy(() => {
    const m1 = run("m", { G: g, M: m }, [c.beta1, 1 - c.beta1, c.gradScale]);
    const v1 = run("v", { G: g, V: v }, [c.beta2, 1 - c.beta2, c.gradScale]);
    const p1 = run("w", { P: p, M: m1, V: v1 }, [c.decay, c.stepSize, c.invBc2Sqrt, c.eps]);
    return { p: p1.reshape(p.shape), m: m1.reshape(p.shape), v: v1.reshape(p.shape) };
  });
}
