// The native BLAS behind the wasm backend's matMul (runtime.ts): the same products as the
// cpu backend in every layout, including the shapes only BLAS sees (one-row products go
// to sgemv, an empty inner dimension), and the fallback to wasm's own matMul when no
// library is there or NANOVLM_BLAS=off says so. CI installs libopenblas0-pthread; on a
// machine without it these tests check the fallback instead, and the one that needs
// OpenBLAS is reported as ignored (under CI=true it fails).

import * as tf from "@tensorflow/tfjs";
import * as assert from "node:assert/strict";
import { initBackend, SMALL_GEMV_ELEMENTS } from "../backend/runtime.ts";
import { wasmMatMulEngine } from "../backend/kernels.ts";
import { seededRandom } from "../nanovlm.ts";
import { OPENBLAS, testNeeding } from "./helpers.ts";

const REPO_ROOT = new URL("..", import.meta.url).pathname;

// What the wasm backend's matMul runs on in this process: OpenBLAS, or wasm's XNNPACK and why not.
await initBackend("wasm", { quiet: true });
const engine = wasmMatMulEngine();
const openblasInUse = {
  ...OPENBLAS,
  available: engine.startsWith("BLAS libopenblas"),
  missing: `no OpenBLAS (matMul: ${engine})`,
};

function openBlasInstalled(): boolean {
  try {
    Deno.dlopen("libopenblas.so.0", {}).close();
    return true;
  } catch {
    return false;
  }
}

/** Run `deno <args>` at the repository root with extra environment; exit status and all output. */
async function deno(
  args: string[],
  env: Record<string, string>,
): Promise<{ ok: boolean; code: number; output: string }> {
  const { success, code, stdout, stderr } = await new Deno.Command(Deno.execPath(), {
    args,
    cwd: REPO_ROOT,
    env,
    stdout: "piped",
    stderr: "piped",
  }).output();
  return { ok: success, code, output: new TextDecoder().decode(stdout) + new TextDecoder().decode(stderr) };
}

Deno.test("wasm matMul says what it runs on: OpenBLAS where installed, else wasm's XNNPACK", async () => {
  await initBackend("wasm", { quiet: true });
  if (Deno.build.os === "linux" && openBlasInstalled() && Deno.env.get("NANOVLM_BLAS") === undefined) {
    // The kernels it names are those OpenBLAS reports to a caller of its own.
    const openblas = Deno.dlopen("libopenblas.so.0", { openblas_get_corename: { parameters: [], result: "pointer" } });
    const core = Deno.UnsafePointerView.getCString(openblas.symbols.openblas_get_corename()!);
    openblas.close();
    assert.match(core, /^\w+$/);
    assert.equal(
      wasmMatMulEngine().replace(/\d+ threads?$/, "N threads"),
      `BLAS libopenblas.so.0 (${core} kernels), N threads`,
    );
  } else {
    assert.match(wasmMatMulEngine(), /^wasm XNNPACK \(.+\)$/);
  }
});

Deno.test("wasm matMul with BLAS = cpu, one-row (sgemv) and empty products included", async () => {
  const random = seededRandom(3);
  const values = (n: number) => Float32Array.from({ length: n }, () => 2 * random() - 1);
  // [batch of a, batch of b, m, k, n]
  const cases: [number[], number[], number, number, number][] = [
    [[], [], 1, 7, 5], // a decoding step's logits: one row
    [[3], [3], 1, 4, 6],
    [[2], [], 1, 8, 3],
    [[], [], 4, 0, 3], // an empty sum is zero
    [[2, 1], [1, 3], 3, 5, 2],
  ];
  for (const [batchA, batchB, m, k, n] of cases) {
    for (const transposeA of [false, true]) {
      for (const transposeB of [false, true]) {
        const shapeA = [...batchA, ...(transposeA ? [k, m] : [m, k])];
        const shapeB = [...batchB, ...(transposeB ? [n, k] : [k, n])];
        const a = values(tf.util.sizeFromShape(shapeA)), b = values(tf.util.sizeFromShape(shapeB));
        const batch = tf.broadcast_util.assertAndGetBroadcastShape(batchA, batchB);
        const product = async (backend: "wasm" | "cpu") => {
          await initBackend(backend, { quiet: true });
          // The stock cpu kernel broadcasts only a batch of 1, so give it explicitly broadcast inputs.
          const out = tf.tidy(() =>
            tf.matMul(
              tf.broadcastTo(tf.tensor(a, shapeA), [...batch, ...shapeA.slice(-2)]),
              tf.broadcastTo(tf.tensor(b, shapeB), [...batch, ...shapeB.slice(-2)]),
              transposeA,
              transposeB,
            )
          );
          const result = { shape: out.shape, data: await out.data() };
          out.dispose();
          return result;
        };
        const onWasm = await product("wasm"), onCpu = await product("cpu");
        const what = `[${shapeA}]·[${shapeB}] tA=${transposeA} tB=${transposeB}`;
        assert.deepEqual(onWasm.shape, onCpu.shape, what);
        onWasm.data.forEach((x, i) =>
          assert.ok(Math.abs(x - onCpu.data[i]) <= 1e-5, `${what}: ${x} vs ${onCpu.data[i]}`)
        );
      }
    }
  }
});

testNeeding(openblasInUse, {
  name: "one-row products (decoding) on OpenBLAS = cpu, small and large; the thread count is left as it was",
  fn: async () => {
    await initBackend("wasm", { quiet: true });
    // The library runtime.ts opened (the same copy in this process): two threads, whatever the cores.
    const openblas = Deno.dlopen("libopenblas.so.0", {
      openblas_get_num_threads: { parameters: [], result: "i32" },
      openblas_set_num_threads: { parameters: ["i32"], result: "void" },
    });
    const random = seededRandom(5), before = openblas.symbols.openblas_get_num_threads();
    try {
      openblas.symbols.openblas_set_num_threads(2);
      // One on one thread, one on both (an 8 MiB threshold: 256 × 768 under it, 1,500 × 1,500 over it).
      for (const [k, n] of [[256, 768], [1500, 1500]]) {
        assert.equal(k * n < SMALL_GEMV_ELEMENTS, k === 256);
        const x = Float32Array.from({ length: k }, () => 2 * random() - 1);
        const w = Float32Array.from({ length: k * n }, () => 2 * random() - 1);
        const product = async (backend: "wasm" | "cpu") => {
          await initBackend(backend, { quiet: true });
          const y = tf.tidy(() => tf.matMul(tf.tensor2d(x, [1, k]), tf.tensor2d(w, [k, n])));
          const values = await y.data();
          y.dispose();
          return values;
        };
        const onWasm = await product("wasm"), onCpu = await product("cpu");
        onWasm.forEach((v, i) =>
          assert.ok(Math.abs(v - onCpu[i]) <= 1e-4, `[1, ${k}]·[${k}, ${n}] ${i}: ${v} vs ${onCpu[i]}`)
        );
        assert.equal(openblas.symbols.openblas_get_num_threads(), 2, `threads after [1, ${k}]·[${k}, ${n}]`);
      }
    } finally {
      openblas.symbols.openblas_set_num_threads(before);
      await initBackend("wasm", { quiet: true });
      openblas.close();
    }
  },
});

Deno.test("NANOVLM_BLAS=off and a missing library fall back to wasm's own matMul, which still passes the matMul tests", async () => {
  const code = `import { initBackend } from "./backend/runtime.ts"; await initBackend("wasm");`;
  const off = await deno(["eval", code], { NANOVLM_BLAS: "off", NANOVLM_BACKEND: "" });
  assert.ok(off.ok, off.output);
  assert.match(off.output, /matMul: wasm XNNPACK \(NANOVLM_BLAS=off\)/);
  const missing = await deno(["eval", code], { NANOVLM_BLAS: "/nonexistent/libblas.so" });
  assert.ok(missing.ok, missing.output);
  assert.match(missing.output, /matMul: wasm XNNPACK \(no BLAS library found/);

  // runtime_test.ts's BatchMatMul tests, on the fallback path.
  const tests = await deno(["test", "-A", "--filter", "BatchMatMul", "tests/runtime_test.ts"], {
    NANOVLM_BLAS: "off",
    NO_COLOR: "1",
  });
  assert.match(tests.output, /ok \| 2 passed \| 0 failed/);
  // `deno test` has been seen to abort in native teardown (exit 134, a glibc heap-corruption message) after printing
  // its summary, as .ci/run notes; such a run counts when that summary says both tests passed.
  assert.ok(tests.ok || tests.code === 134, tests.output);
});
