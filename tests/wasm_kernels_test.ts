// The wasm data-movement kernels of runtime.ts (Cast, Slice, SplitV, Concat, Transpose,
// Sum, GatherV2, Tile) against the cpu backend: every case a VLM step hits, the edge cases
// (size-1 and empty axes, negative axes, keepDims, int32 and bool), and the errors; and
// the gradients of Sum and Mean that runtime.ts registers (a broadcast, nothing from the host).

import * as tf from "@tensorflow/tfjs";
import * as assert from "node:assert/strict";
import { initBackend } from "../backend/runtime.ts";
import { seededRandom } from "../nanovlm.ts";

const random = seededRandom(11);
const values = (shape: number[]) => Float32Array.from({ length: tf.util.sizeFromShape(shape) }, () => 2 * random() - 1);

/** Run `build` on wasm and on cpu and compare every output (shape, dtype, values to 1e-5). */
async function sameOnWasmAndCpu(what: string, build: () => tf.Tensor | tf.Tensor[]): Promise<void> {
  const run = async (backend: "wasm" | "cpu") => {
    await initBackend(backend, { quiet: true });
    const outs = tf.tidy(() => [build()].flat());
    const read = await Promise.all(outs.map(async (t) => ({ shape: t.shape, dtype: t.dtype, data: await t.data() })));
    tf.dispose(outs);
    return read;
  };
  const [wasm, cpu] = [await run("wasm"), await run("cpu")];
  assert.equal(wasm.length, cpu.length, what);
  wasm.forEach((w, i) => {
    assert.deepEqual([w.shape, w.dtype], [cpu[i].shape, cpu[i].dtype], what);
    w.data.forEach((v, j) =>
      assert.ok(Math.abs(v - cpu[i].data[j]) <= 1e-5, `${what}[${i}][${j}]: ${v} vs ${cpu[i].data[j]}`)
    );
  });
}

Deno.test("wasm Slice and SplitV = cpu: RoPE halves, q|k|v thirds, leading and middle axes, int32, empty", async () => {
  const x4 = values([2, 3, 5, 8]), x3 = values([2, 4, 9]);
  await sameOnWasmAndCpu("split last axis", () => tf.split(tf.tensor(x4, [2, 3, 5, 8]), 2, -1));
  await sameOnWasmAndCpu("split sizes", () => tf.split(tf.tensor(x3, [2, 4, 9]), [2, 3, 4], 2));
  await sameOnWasmAndCpu("split middle axis", () => tf.split(tf.tensor(x4, [2, 3, 5, 8]), 3, 1));
  await sameOnWasmAndCpu("slice 4-D", () => tf.slice(tf.tensor(x4, [2, 3, 5, 8]), [1, 0, 2, 3], [1, 2, 3, -1]));
  await sameOnWasmAndCpu("slice 1-D", () => tf.slice(tf.tensor1d(x3), [7], [20]));
  await sameOnWasmAndCpu("slice 5-D", () => tf.slice(tf.tensor(x4, [2, 3, 5, 2, 4]), [0, 1, 1, 0, 1], [2, 2, 3, 2, 2]));
  await sameOnWasmAndCpu(
    "slice int32",
    () => tf.slice(tf.tensor2d([1, 2, 3, 4, 5, 6], [2, 3], "int32"), [0, 1], [2, 2]),
  );
  await sameOnWasmAndCpu("slice bool", () => tf.slice(tf.tensor2d([1, 0, 1, 1, 0, 0], [2, 3], "bool"), [1, 0], [1, 3]));
  await sameOnWasmAndCpu("slice empty", () => tf.slice(tf.tensor(x3, [2, 4, 9]), [0, 1, 0], [2, 0, 9]));
});

Deno.test("wasm Concat = cpu: last axis (RoPE), first and middle axes, three parts, int32", async () => {
  const a = values([2, 3, 4]), b = values([2, 3, 4]), c = values([2, 3, 70]);
  await sameOnWasmAndCpu("concat last", () => tf.concat([tf.tensor(a, [2, 3, 4]), tf.tensor(b, [2, 3, 4])], -1));
  await sameOnWasmAndCpu("concat long rows", () => tf.concat([tf.tensor(a, [2, 3, 4]), tf.tensor(c, [2, 3, 70])], 2));
  await sameOnWasmAndCpu("concat first", () => tf.concat([tf.tensor(a, [2, 3, 4]), tf.tensor(b, [2, 3, 4])], 0));
  await sameOnWasmAndCpu(
    "concat middle, three parts",
    () => tf.concat([tf.tensor(a, [2, 3, 4]), tf.tensor(b, [2, 3, 4]), tf.tensor(a, [2, 3, 4])], 1),
  );
  await sameOnWasmAndCpu("concat int32", () => tf.concat([tf.tensor1d([1, 2], "int32"), tf.tensor1d([3], "int32")]));
});

Deno.test("wasm Transpose of rank 5 and 6 = cpu: patchify, pixel shuffle, last axis moved, size-1 axes", async () => {
  const x6 = values([2, 3, 2, 4, 2, 4]);
  await sameOnWasmAndCpu("patchify", () => tf.transpose(tf.tensor(x6, [2, 3, 2, 4, 2, 4]), [0, 2, 4, 1, 3, 5]));
  await sameOnWasmAndCpu("pixel shuffle", () => tf.transpose(tf.tensor(x6, [2, 3, 2, 4, 2, 4]), [0, 1, 3, 2, 4, 5]));
  await sameOnWasmAndCpu("last axis moves", () => tf.transpose(tf.tensor(x6, [2, 3, 2, 4, 2, 4]), [5, 0, 4, 1, 3, 2]));
  await sameOnWasmAndCpu(
    "size-1 axes",
    () => tf.transpose(tf.tensor(x6.slice(0, 24), [1, 3, 1, 8, 1]), [4, 3, 2, 1, 0]),
  );
  await sameOnWasmAndCpu(
    "int32",
    () =>
      tf.transpose(tf.tensor(Int32Array.from({ length: 32 }, (_, i) => i), [2, 2, 2, 2, 2], "int32"), [4, 2, 0, 1, 3]),
  );
});

Deno.test("wasm Sum = cpu: leading axes (bias gradients), keepDims, negative, inner and all axes", async () => {
  const x = values([4, 6, 5]);
  const t = () => tf.tensor(x, [4, 6, 5]);
  await sameOnWasmAndCpu("axis 0", () => tf.sum(t(), 0));
  await sameOnWasmAndCpu("axes 0, 1", () => tf.sum(t(), [1, 0]));
  await sameOnWasmAndCpu("keepDims", () => tf.sum(t(), [0, 1], true));
  await sameOnWasmAndCpu("negative axis", () => tf.sum(t(), -1));
  await sameOnWasmAndCpu("middle axis", () => tf.sum(t(), 1));
  await sameOnWasmAndCpu("all", () => tf.sum(t()));
  await sameOnWasmAndCpu("int32 stays stock", () => tf.sum(tf.tensor2d([1, 2, 3, 4], [2, 2], "int32"), 0));
});

Deno.test("wasm GatherV2 and Cast = cpu; an index out of range is an error", async () => {
  const table = values([7, 5]);
  await sameOnWasmAndCpu(
    "rows",
    () => tf.gather(tf.tensor2d(table, [7, 5]), tf.tensor2d([[6, 0, 3], [3, 3, 1]], [2, 3], "int32")),
  );
  await sameOnWasmAndCpu("1-D", () => tf.gather(tf.tensor1d(table), tf.tensor1d([34, 0, 17], "int32")));
  await sameOnWasmAndCpu(
    "axis 1 stays stock",
    () => tf.gather(tf.tensor2d(table, [7, 5]), tf.tensor1d([4, 0], "int32"), 1),
  );
  await sameOnWasmAndCpu("cast same dtype", () => tf.cast(tf.tensor1d(table), "float32"));
  await sameOnWasmAndCpu("cast to int32", () => tf.cast(tf.tensor1d([1.7, -2.2, 3]), "int32"));
  await initBackend("wasm", { quiet: true });
  assert.throws(
    () => tf.tidy(() => tf.gather(tf.tensor2d(table, [7, 5]), tf.tensor1d([7], "int32"))),
    /not in \[0, 6\]/,
  );
  // A same-dtype cast shares its input's buffer, which must outlive the input.
  const source = tf.tensor1d([1, 2, 3]), cast = tf.cast(source, "float32");
  source.dispose();
  assert.deepEqual(Array.from(await cast.data()), [1, 2, 3]);
  cast.dispose();
});

Deno.test("wasm Transpose that moves only size-1 axes = cpu, and shares its input's buffer", async () => {
  const x = values([3, 1, 4]);
  await sameOnWasmAndCpu("identity perm", () => tf.transpose(tf.tensor2d(x, [3, 4]), [0, 1]));
  await sameOnWasmAndCpu("size-1 axis moved", () => tf.transpose(tf.tensor3d(x, [3, 1, 4]), [1, 0, 2]));
  await initBackend("wasm", { quiet: true });
  const source = tf.tensor3d(x, [3, 1, 4]);
  const before = tf.engine().backend.numDataIds();
  const moved = tf.transpose(source, [0, 2, 1]);
  assert.equal(tf.engine().backend.numDataIds(), before, "no new buffer");
  source.dispose();
  assert.deepEqual(Array.from(await moved.data()), Array.from(x));
  moved.dispose();
});

Deno.test("wasm Tile = cpu: broadcast rows and columns, repeats on several axes, int32 and bool, empty", async () => {
  const cases: [number[], number[]][] = [
    [[4, 6, 1], [1, 1, 9]], // a mean's gradient: one value per row, spread along the row
    [[1, 5], [7, 1]], // a bias's gradient shape, repeated down the rows
    [[3], [4]],
    [[2, 3], [3, 5]],
    [[2, 1, 3, 1], [1, 5, 2, 7]],
    [[2, 2], [1, 1]],
    [[0, 3], [2, 2]],
  ];
  for (const [shape, reps] of cases) {
    const x = values(shape);
    await sameOnWasmAndCpu(`tile [${shape}] × [${reps}]`, () => tf.tile(tf.tensor(x, shape), reps));
    await sameOnWasmAndCpu(`tile int32 [${shape}]`, () => tf.tile(tf.tensor(x, shape).mul(9).cast("int32"), reps));
    await sameOnWasmAndCpu(`tile bool [${shape}]`, () => tf.tile(tf.tensor(x, shape).greater(0), reps));
  }
  await sameOnWasmAndCpu("broadcastTo a scalar", () => tf.broadcastTo(tf.scalar(1.5), [2, 3]));
});

Deno.test("Sum and Mean gradients: dy spread over the reduced axes (÷ count), no tensor made on the host", async () => {
  const shape = [4, 6, 5], x = values(shape), strides = [...tf.util.computeStrides(shape), 1];
  const cases: [number | number[], boolean][] = [[-1, true], [[0, 1], false], [1, false], [[0, 1, 2], false]];
  for (const backend of ["wasm", "cpu"] as const) {
    await initBackend(backend, { quiet: true });
    for (const [axis, keepDims] of cases) {
      const axes = tf.util.parseAxisParam(axis, shape);
      const count = axes.reduce((n, d) => n * shape[d], 1);
      const keptShape = shape.map((n, d) => axes.includes(d) ? 1 : n);
      const keptStrides = [...tf.util.computeStrides(keptShape), 1];
      const dyValues = values(keptShape);
      const input = tf.tensor(x, shape);
      const dy = tf.tensor(dyValues, keepDims ? keptShape : shape.filter((_, d) => !axes.includes(d)));
      // tfjs' own gradients fill a ones tensor of x's shape on the host: record the size of each tensor written from
      // host values. (Only wasm can tell: its kernels write their outputs without values, cpu's with them.)
      const writes: number[] = [];
      const impl = tf.backend(), write = impl.write.bind(impl);
      impl.write = (data, dataShape, dtype) => {
        if (data) writes.push(tf.util.sizeFromShape(dataShape));
        return write(data, dataShape, dtype);
      };
      const grads = [tf.sum, tf.mean].map((reduce) => tf.grad((t: tf.Tensor) => reduce(t, axis, keepDims))(input, dy));
      impl.write = write;
      const what = `${backend}, axis ${axis}, keepDims ${keepDims}`;
      if (backend === "wasm") {
        assert.ok(writes.every((size) => size <= 1), `${what}: tensors of ${writes} values made on the host`);
      }

      // Element i of x gets the dy of the slot it was reduced into: its index with the reduced axes at 0.
      const slot = (i: number) => {
        let at = 0;
        for (let d = 0; d < shape.length; d++) {
          if (!axes.includes(d)) at += (Math.floor(i / strides[d]) % shape[d]) * keptStrides[d];
        }
        return at;
      };
      const [dSum, dMean] = grads.map((g) => g.dataSync());
      for (let i = 0; i < x.length; i++) {
        assert.equal(dSum[i], dyValues[slot(i)], `${what}: d sum [${i}]`);
        assert.equal(dMean[i], Math.fround(dyValues[slot(i)] / count), `${what}: d mean [${i}]`);
      }
      tf.dispose([input, dy, ...grads]);
    }
  }
});
