// Smoke runs of `deno task bench` and `deno task memory` on the tiny preset: they work and
// print what they promise (a table, JSON lines, a clean stop at the first batch that does
// not fit). How fast is BENCHMARKS.md's business, not a test's. Also the offline GPU pack
// (scripts/pack-gpu.sh): its bundled bench runs from an empty folder with an empty DENO_DIR.

import * as assert from "node:assert/strict";
import { type BenchRow, medianMs } from "../tools/bench.ts";
import { testNeeding, WEBGPU_ADAPTER } from "./helpers.ts";

const REPO_ROOT = new URL("..", import.meta.url).pathname;
const SMOKE = ["--preset", "tiny", "--batch", "2", "--steps", "1", "--warmup", "1", "--new-tokens", "4"];

/** Run a command at the repository root; fail the test with its output when it fails. */
async function run(command: string, args: string[], env: Record<string, string> = {}, cwd = REPO_ROOT) {
  const { success, stdout, stderr } = await new Deno.Command(command, {
    args,
    cwd,
    env: { NO_COLOR: "1", ...env },
    stdout: "piped",
    stderr: "piped",
  }).output();
  const output = new TextDecoder().decode(stdout) + new TextDecoder().decode(stderr);
  assert.ok(success, `${command} ${args.join(" ")} failed:\n${output}`);
  return output;
}

Deno.test("medianMs times `steps` runs after `warmup` ones, and warms up for at least `warmupMs` when given", async () => {
  const starts: number[] = [];
  const run = () => {
    starts.push(performance.now());
    return new Promise<void>((resolve) => setTimeout(resolve, 5));
  };
  assert.ok(await medianMs(run, 3, 2) >= 4); // setTimeout may fire a little early, never much
  assert.equal(starts.length, 5);
  starts.length = 0;
  await medianMs(run, 3, 1, 100);
  assert.ok(starts.length >= 3 + 2, `${starts.length} runs: at least 2 are needed to warm up for 100 ms`);
  const firstTimed = starts.at(-3)!;
  assert.ok(firstTimed - starts[0] >= 100, `timing began ${firstTimed - starts[0]} ms after the first run`);
});

/** The bench's rows: a markdown table on stdout and the same rows as JSON lines in `out`. */
async function checkBench(output: string, out: string, backend: string, threads: number, batch = 2): Promise<void> {
  assert.match(output, /^matMul probe: .* at [\d.]+ GFLOP\/s on /m);
  assert.match(output, /^\| config \| backend \| threads \| B \| T \| train step ms \| samples\/s \|/m);
  assert.match(output, new RegExp(`^\\| tiny \\| ${backend} \\| ${threads} \\| ${batch} \\| 48 \\| [\\d,]+ \\|`, "m"));
  const rows: BenchRow[] = (await Deno.readTextFile(out)).trim().split("\n").map((line) => JSON.parse(line));
  assert.equal(rows.length, 1);
  const [row] = rows;
  assert.equal(row.backend, backend);
  assert.equal(row.threads, threads);
  assert.match(
    row.device,
    backend === "wasm" ? /^matMul: (BLAS|wasm XNNPACK)/ : /maxStorageBufferBindingSize \d+ MiB$/,
  );
  assert.equal(row.config, "tiny");
  assert.equal(row.params, 999_648);
  for (const key of ["step_ms", "samples_per_s", "forward_ms", "fwd_bwd_ms", "ttft_ms", "decode_tok_s"] as const) {
    assert.ok(row[key]! > 0, `${key} = ${row[key]}`);
  }
  assert.ok(row.peak_tensor_mib! > 3.4, "the peak holds at least the weights (3.4 MiB)");
  assert.ok(row.rss_mib > row.peak_tensor_mib! / 2 && row.matmul_gflops > 0);
  assert.match(output, /^kernel probe: [\d.]+ µs per small kernel/m);
  assert.ok(row.kernel_us > 0 && row.kernels > 100, `kernel probe ${row.kernel_us} µs, ${row.kernels} kernels`);
  assert.match(output, new RegExp(`^kernels in one step .*: B=${batch} [\\d,]+ \\(at least [\\d,]+ ms\\)$`, "m"));
  assert.match(row.commit, /^([0-9a-f]{7,}\+?|unknown)$/);
}

Deno.test("deno task bench (smoke): a table and one JSON line per batch size, on wasm", async () => {
  const out = await Deno.makeTempFile({ suffix: ".jsonl" });
  try {
    const output = await run(Deno.execPath(), [
      "run",
      "-A",
      "tools/bench.ts",
      ...SMOKE,
      "--backend",
      "wasm",
      "--out",
      out,
    ]);
    // As train.ts: a helper thread on a machine with two cores or more, but 2 rows of the tiny preset are too little
    // work to share (MIN_PART_WORK), so one thread computed the step.
    if (navigator.hardwareConcurrency >= 2) assert.match(output, /^training step on up to 2 threads/m);
    await checkBench(output, out, "wasm", 1);
  } finally {
    await Deno.remove(out);
  }
});

// Whether the bench's own process will find an adapter: asked in a child process, as the bench runs in one.
const probe = await run(Deno.execPath(), [
  "eval",
  `import { initBackend } from "./backend/runtime.ts"; await initBackend();`,
]);
const webgpu = { ...WEBGPU_ADAPTER, available: !/no WebGPU adapter/.test(probe) };

testNeeding(webgpu, {
  name: "deno task bench (smoke) on WebGPU: the training step runs there too (software adapter in CI)",
  fn: async () => {
    const out = await Deno.makeTempFile({ suffix: ".jsonl" });
    try {
      const args = ["run", "-A", "tools/bench.ts", ...SMOKE, "--backend", "webgpu", "--out", out];
      await checkBench(await run(Deno.execPath(), args), out, "webgpu", 1);
    } finally {
      await Deno.remove(out);
    }
  },
});

Deno.test("deno task memory (smoke): peak memory by batch size, stopping at the first that does not fit", async () => {
  const args = ["run", "-A", "tools/memory.ts", "--preset", "tiny", "--backend", "wasm", "--iterations", "1"];
  const fits = await run(Deno.execPath(), [...args, "--batches", "1,2"]);
  // The weights alone: on wasm AdamW's two moments live in JS memory (lib/optimizer.ts's adamWOnHost), not in tensors.
  assert.match(fits, /^after building the model: 4 MiB of tensors$/m); // 999,648 float32 weights
  assert.match(fits, /^\| batch \| peak tensors MiB \| heap\/GPU MiB \| peak RSS MiB \| step ms \| \|$/m);
  for (const batch of [1, 2]) {
    assert.match(fits, new RegExp(`^\\| ${batch} \\| [\\d,]+ \\| [\\d,]+ \\| [\\d,]+ \\| [\\d,]+ \\| fits \\|$`, "m"));
  }

  // Doubling from 1 with a budget nothing fits: one row, the reason, and nothing after it.
  const stops = await run(Deno.execPath(), [...args, "--max-batch", "8", "--budget-mib", "1"]);
  assert.match(stops, /^\| 1 \| .* \| \*\*does not fit\*\*: over the 1 MiB budget \|$/m);
  assert.doesNotMatch(stops, /^\| 2 \|/m);
});

Deno.test("tools/pack-gpu.sh: the archive fits 64 MiB and its bundled bench runs offline from an empty folder", async () => {
  const dir = await Deno.makeTempDir();
  try {
    // A stand-in ldconfig whose listing (over 64 KiB, the Vulkan loader first) outgrows a pipe's buffer, as on a
    // machine with many libraries: the script must read it all, not die of SIGPIPE under pipefail.
    const fakeLoader = `${dir}/libvulkan-fake.so.1`;
    await Deno.writeTextFile(fakeLoader, "not a real library");
    const others = Array.from(
      { length: 1500 },
      (_, i) => `\tlibother${i}.so.1 (libc6,x86-64) => /lib/libother${i}.so.1`,
    );
    await Deno.mkdir(`${dir}/fakebin`);
    await Deno.writeTextFile(
      `${dir}/ldconfig.txt`,
      [`\tlibvulkan.so.1 (libc6,x86-64) => ${fakeLoader}`, ...others].join("\n"),
    );
    await Deno.writeTextFile(`${dir}/fakebin/ldconfig`, `#!/bin/sh\ncat ${dir}/ldconfig.txt\n`, { mode: 0o755 });
    assert.ok((await Deno.stat(`${dir}/ldconfig.txt`)).size > 64 * 1024);
    await run("bash", ["tools/pack-gpu.sh", "--no-deno", `${dir}/out`], {
      PATH: `${dir}/fakebin:${Deno.env.get("PATH")}`,
    });
    assert.equal(await Deno.readTextFile(`${dir}/out/nanovlm-gpu/lib/libvulkan.so.1`), "not a real library");
    const { size } = await Deno.stat(`${dir}/out/nanovlm-gpu.tar`);
    assert.ok(size < 64 * 2 ** 20 - 32e6, `${size} bytes leave no room for the 30 MB deno.xz`);
    const unpacked = `${dir}/unpacked`;
    await Deno.mkdir(unpacked);
    await run("tar", ["-C", unpacked, "-xf", `${dir}/out/nanovlm-gpu.tar`]);
    const folder = `${unpacked}/nanovlm-gpu`;
    // No deno.xz (--no-deno): run.sh uses the deno on PATH, with its own empty DENO_DIR and no network.
    const path = `${Deno.execPath().replace(/\/[^/]+$/, "")}:${Deno.env.get("PATH")}`;
    // The helper thread runs from its own bundle, parallel_worker.js: at batch 28 the rows are shared (14 a thread is
    // the tiny preset's MIN_PART_WORK).
    const args = ["bench", ...SMOKE.slice(0, 2), "--batch", "28", ...SMOKE.slice(4), "--backend", "wasm"];
    const output = await run(`${folder}/run.sh`, args, { PATH: path }, folder);
    const threads = Math.min(2, navigator.hardwareConcurrency);
    await checkBench(output, `${folder}/bench-results.jsonl`, "wasm", threads, 28);
    const entries = [...Deno.readDirSync(`${folder}/.deno`)].map((e) => e.name);
    assert.ok(!entries.includes("remote"), `nothing was downloaded: ${entries}`);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("kernelCostUs: a positive cost per kernel, and every tensor it made is freed", async () => {
  const { kernelCostUs } = await import("../tools/bench.ts");
  const { initBackend } = await import("../backend/runtime.ts");
  const tf = await import("@tensorflow/tfjs");
  await initBackend("wasm", { quiet: true });
  const before = tf.memory().numTensors;
  const us = await kernelCostUs(100);
  assert.ok(us > 0 && Number.isFinite(us), `${us} µs`);
  assert.equal(tf.memory().numTensors, before);
});

Deno.test("tensorsOverBindingLimit: the 222M's training logits (trained positions only) fit 128 MiB up to batch 8", async () => {
  const { BENCH_CONFIGS, tensorsOverBindingLimit } = await import("../tools/bench.ts");
  const { cfg, seq } = BENCH_CONFIGS["nanovlm-222m"];
  // 128 − 1 − 49 = 78 trained rows of 49,153 logits: 14.6 MiB a sample.
  assert.deepEqual(tensorsOverBindingLimit(cfg, 8, seq, 2 ** 27), []);
  const over = tensorsOverBindingLimit(cfg, 9, seq, 2 ** 27);
  assert.deepEqual(over, ["training logits [B·(T−1−L), V] [702,49153] = 132 MiB"]);
});

Deno.test("tools/lookup_probe.ts trains on hinted multiple choice and prints the letter's accuracy", async () => {
  const output = await run("deno", ["run", "-A", "tools/lookup_probe.ts", "--prompt_loss=options", "--steps=2"]);
  assert.match(output, /^prompt loss options \| seed 0 \| 2 steps of 64 hinted multiple-choice questions$/m);
  const last = output.match(/^step 2 \| loss ([\d.]+) \| letter right ([\d.]+)% of 256 \| \d+ s$/m);
  assert.ok(last, output);
  assert.ok(Number(last[1]) > 0 && Number(last[2]) <= 100, output);
  const { success, stderr } = await new Deno.Command("deno", {
    args: ["run", "-A", "tools/lookup_probe.ts", "--prompt_loss=some"],
    cwd: REPO_ROOT,
    env: { NO_COLOR: "1" },
    stderr: "piped",
  }).output();
  assert.equal(success, false);
  assert.match(new TextDecoder().decode(stderr), /--prompt_loss some: expected one of none, options, all/);
});

Deno.test("tools/vision_probe.ts: the committed checkpoint's image tokens hold each quadrant's contents and place", async () => {
  const output = await run("deno", [
    "run",
    "-A",
    "tools/vision_probe.ts",
    "--checkpoint=checkpoints/shapes-tiny",
    "--steps=200",
  ]);
  const read = (name: string) => Number(output.match(new RegExp(`^${name} +([\\d.]+)% \\(chance`, "m"))?.[1]);
  assert.ok(read("color") >= 95 && read("size") >= 95 && read("quadrant") >= 95, output);
  assert.ok(read("shape") > 33, output); // above chance; how far above is what the lesson is about
  // --novel scores the probes on test-novel's new objects alone. On an untrained model's tokens the shape probe falls
  // below chance there (62% on test's quadrants with these settings): trained where yellow is never a triangle and green
  // never a circle, it guesses from the colour a shape that goes with it.
  const novel = await run("deno", [
    "run",
    "-A",
    "tools/vision_probe.ts",
    "--checkpoint=random",
    "--novel",
    "--steps=200",
  ]);
  assert.match(novel, /accuracy on the new objects of 1000 test-novel scenes \(yellow triangle, green circle\)/);
  const readNovel = (name: string) => Number(novel.match(new RegExp(`^${name} +([\\d.]+)% \\(chance`, "m"))?.[1]);
  assert.ok(readNovel("shape") < 33 && readNovel("color") >= 80 && readNovel("quadrant") >= 95, novel);
  const direct = await run("deno", ["run", "-A", "tools/vision_probe.ts", "--train_vit", "--steps=2"]);
  assert.match(
    direct,
    /^step 2 \| loss [\d.]+ \| shape [\d.]+% \| color [\d.]+% \| size [\d.]+% \| quadrant [\d.]+% \| \d+ s$/m,
  );
  const { success, stderr } = await new Deno.Command("deno", {
    args: ["run", "-A", "tools/vision_probe.ts"],
    cwd: REPO_ROOT,
    env: { NO_COLOR: "1" },
    stderr: "piped",
  }).output();
  assert.equal(success, false);
  assert.match(
    new TextDecoder().decode(stderr),
    /give either --checkpoint \(a model folder, or "random"\) or --train_vit/,
  );
});
