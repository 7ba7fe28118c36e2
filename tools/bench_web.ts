// tools/bench_web.ts — the browser page's speed against Deno's on the same machine: a default training step (the tiny
// preset, `deno task train`'s settings: 2 micro-batches of 32) and greedy decoding with the committed checkpoint.
//
//   deno run -A tools/bench_web.ts [--steps 12] [--backends wasm,webgpu] [--webgpu_timeout 300]
//
// The page runs in Debian's headless Chromium (/usr/bin/chromium, driven by npm:playwright-core), served by
// web/serve.ts, and is used through its own controls: the Train tab's step lines ("step k/N | ... | 650 ms") and the
// Ask tab's answer line ("31 tokens | first after 60 ms | 75.0 tokens/s after it"). Deno's training figure comes from
// the same step lines of `deno task train`; its decoding from lib/scoring.ts's `answerQuestion` (as generate.ts), in this process. Each
// figure is a median: training over the steps after the first two (kernel compilation, warm-up), decoding over three
// asks of the caption question of test scene 0 after a first one (the page's first ask is a warm-up too).
// A software WebGPU adapter (SwiftShader here) may not finish a training step in --webgpu_timeout seconds; the table
// then says so.

import { parseArgs } from "node:util";
import type { Page } from "playwright-core";
import { launchChromium } from "./chromium.ts";
import { buildSite, serveSite } from "../web/serve.ts";
import { runMain, snakeCaseFlags, wholeNumber } from "../lib/cli.ts";
import { initBackend } from "../backend/runtime.ts";
import { COMMITTED_CHECKPOINT, loadForInference } from "../lib/inference.ts";
import { answerQuestion } from "../lib/scoring.ts";
import { makeShapesExample, toCHWFloat } from "../data.ts";

const ASKS = 3;
const WARMUP_STEPS = 2;

interface Figures {
  side: string;
  stepMs: number | null;
  stepsPerSecond: number | null;
  firstTokenMs: number;
  tokensPerSecond: number;
  note: string;
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

/** Step times (ms) from `deno task train`-style step lines, warm-up steps left out. */
function stepTimes(log: string): number[] {
  return [...log.matchAll(/^step (\d+)\/\d+ \|.*\| (\d+) ms/gm)]
    .filter((m) => Number(m[1]) > WARMUP_STEPS)
    .map((m) => Number(m[2]));
}

/** First-token ms and tokens/s from the answer line the page and generate.ts print. */
function decodeFigures(line: string): { firstTokenMs: number; tokensPerSecond: number } {
  const first = /(?:first after|time to first token) ([\d.]+) ms/.exec(line), rate = /([\d.]+) tokens\/s/.exec(line);
  if (!first || !rate) throw new Error(`no timing in "${line}"`);
  return { firstTokenMs: Number(first[1]), tokensPerSecond: Number(rate[1]) };
}

// ---- The page ----

async function askCaption(page: Page): Promise<string> {
  const asks = Number(await page.getAttribute("#answer", "data-asks") ?? 0) + 1;
  await page.fill("#scene-index", "0");
  await page.click("[data-testid=scene-question-0]");
  await page.click("#ask");
  await page.waitForSelector(`#answer[data-asks="${asks}"][data-state=done]`, { timeout: 600_000 });
  return (await page.textContent("#answer-stats"))!;
}

async function pageFigures(url: string, backend: string, steps: number, webgpuTimeout: number): Promise<Figures> {
  const browser = await launchChromium();
  try {
    const page = await browser.newPage();
    await page.goto(`${url}?backend=${backend}`);
    await page.waitForSelector("#backend-status[data-state=ready]", { timeout: 120_000 });
    const status = (await page.textContent("#backend-status"))!.replace(/^tfjs backend: /, "").replace(/\.$/, "");

    await page.click("#load-committed");
    await page.waitForSelector("#model-status[data-state=loaded]");
    const asked = [];
    for (let i = 0; i <= ASKS; i++) {
      const figures = decodeFigures(await askCaption(page));
      if (i > 0) asked.push(figures); // the first ask compiles the kernels
    }

    await page.click(".tab[data-tab=train]");
    await page.fill("#train-steps", String(steps));
    await page.click("#train-start");
    const timeout = backend === "webgpu" ? webgpuTimeout * 1000 : 600_000;
    const finished = await page.waitForSelector("#train-status[data-state=done]", { timeout }).then(
      () => true,
      () => false,
    );
    const times = stepTimes((await page.textContent("#train-log"))!);
    const stepMs = times.length ? median(times) : null;
    const note = finished ? status : `${status}; ${times.length} timed steps in ${webgpuTimeout} s`;
    return {
      side: `Chromium, ${backend}`,
      stepMs,
      stepsPerSecond: stepMs && 1000 / stepMs,
      firstTokenMs: median(asked.map((a) => a.firstTokenMs)),
      tokensPerSecond: median(asked.map((a) => a.tokensPerSecond)),
      note,
    };
  } finally {
    await browser.close();
  }
}

// ---- Deno ----

async function denoTask(args: string[]): Promise<string> {
  const { code, stdout, stderr } = await new Deno.Command(Deno.execPath(), {
    args,
    env: { NO_COLOR: "1" },
    stdout: "piped",
    stderr: "piped",
  }).output();
  const text = new TextDecoder().decode(stdout) + new TextDecoder().decode(stderr);
  if (code !== 0) throw new Error(`deno ${args.join(" ")} failed:\n${text}`);
  return text;
}

async function denoFigures(steps: number): Promise<Figures> {
  const runs = await Deno.makeTempDir();
  try {
    const log = await denoTask([
      "run",
      "-A",
      "train.ts",
      `--max_training_steps=${steps}`,
      `--runs_dir=${runs}`,
      "--test_examples=0",
    ]);
    const backendLine = log.split("\n").find((line) => line.startsWith("threads:")) ?? "";
    // Decoding in this process, warmed up as the page is by its earlier asks: answerQuestion, greedy.
    await initBackend("wasm", { quiet: true });
    const { model, tokenizer } = await loadForInference(COMMITTED_CHECKPOINT);
    const pixels = toCHWFloat(makeShapesExample("test", 0, 0, model.cfg.vit_img_size).rgb, model.cfg.vit_img_size);
    const asked = [];
    for (let i = 0; i <= ASKS; i++) {
      const answer = await answerQuestion(model, tokenizer, [pixels], "Describe the image.", { greedy: true });
      if (i > 0) asked.push({ firstTokenMs: answer.timeToFirstTokenMs, tokensPerSecond: answer.tokensPerSecond });
    }
    model.dispose();
    const stepMs = median(stepTimes(log));
    return {
      side: "Deno, wasm",
      stepMs,
      stepsPerSecond: 1000 / stepMs,
      firstTokenMs: median(asked.map((a) => a.firstTokenMs)),
      tokensPerSecond: median(asked.map((a) => a.tokensPerSecond)),
      note: backendLine,
    };
  } finally {
    await Deno.remove(runs, { recursive: true });
  }
}

// ---- main ----

const USAGE = "usage: deno run -A tools/bench_web.ts [--steps 12] [--backends wasm,webgpu] [--webgpu_timeout 300]";

async function main(args: string[]): Promise<void> {
  const { values } = parseArgs({
    args: snakeCaseFlags(args),
    options: {
      steps: { type: "string", default: "12" },
      backends: { type: "string", default: "wasm,webgpu" },
      webgpu_timeout: { type: "string", default: "300" },
    },
  });
  const steps = wholeNumber("steps", values.steps, 1, USAGE);
  const webgpuTimeout = wholeNumber("webgpu_timeout", values.webgpu_timeout, 1, USAGE);
  if (steps <= WARMUP_STEPS) throw new Error(`--steps ${steps}: give more than the ${WARMUP_STEPS} warm-up steps`);
  const server = serveSite(await buildSite(), { port: 0 });
  const url = `http://127.0.0.1:${server.addr.port}/`;
  const rows: Figures[] = [];
  try {
    // The two sides alternate: the machine's noise falls on both.
    for (const backend of values.backends.split(",")) {
      rows.push(await pageFigures(url, backend, steps, webgpuTimeout));
      console.error(`measured Chromium ${backend}`);
      if (rows.length === 1) {
        rows.push(await denoFigures(steps));
        console.error("measured Deno");
      }
    }
  } finally {
    await server.shutdown();
  }
  const fixed = (x: number | null, digits: number) => x === null ? "–" : x.toFixed(digits);
  console.log("| side | training step ms | steps/s | first token ms | decode tokens/s | backend |");
  console.log("| --- | --- | --- | --- | --- | --- |");
  for (const r of rows) {
    console.log(
      `| ${r.side} | ${fixed(r.stepMs, 0)} | ${fixed(r.stepsPerSecond, 2)} | ${fixed(r.firstTokenMs, 0)} | ` +
        `${fixed(r.tokensPerSecond, 1)} | ${r.note} |`,
    );
  }
}

if (import.meta.main) await runMain(main);
