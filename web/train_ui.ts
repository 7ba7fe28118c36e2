// web/train_ui.ts — the Train tab: start the worker (web/train_worker.ts), pause and resume it, draw its loss curve,
// log its steps as train.ts prints them, and hand its checkpoint to the user (download) or to the Ask tab.

/// <reference lib="dom" />

import { DEFAULT_TRAIN_CONFIG } from "../lib/train_config.ts";
import type { BrowserBackend } from "./backend.ts";
import { guarded, showError } from "./errors.ts";
import type { FromWorker, ToWorker } from "./train_worker.ts";

const element = <T extends HTMLElement>(id: string) => document.getElementById(id) as T;

/** The Train tab. `useModel` gives a checkpoint (config.json text, model.safetensors bytes) to the Ask tab. */
export class TrainTab {
  private worker: Worker | undefined;
  private paused = false;
  private losses: number[] = [];
  /** Steps/s over the steps after the first (which pays for compiling kernels), as train.ts's ETA. */
  private timedSteps = { count: 0, ms: 0 };

  constructor(
    private readonly backend: BrowserBackend | undefined,
    private readonly useModel: (config: string, safetensors: Uint8Array, source: string) => void,
  ) {
    element<HTMLInputElement>("train-steps").value = String(DEFAULT_TRAIN_CONFIG.max_training_steps);
    element<HTMLInputElement>("train-batch").value = String(DEFAULT_TRAIN_CONFIG.batch_size);
    element("train-start").addEventListener("click", guarded(() => this.start()));
    element("train-pause").addEventListener("click", guarded(() => this.togglePause()));
    element("train-download").addEventListener(
      "click",
      guarded(() => this.send({ type: "checkpoint", purpose: "download" })),
    );
    element("train-use").addEventListener("click", guarded(() => this.send({ type: "checkpoint", purpose: "use" })));
  }

  private send(message: ToWorker): void {
    this.worker!.postMessage(message);
  }

  private start(): void {
    const steps = Number(element<HTMLInputElement>("train-steps").value);
    const batchSize = Number(element<HTMLInputElement>("train-batch").value);
    for (const [name, value] of [["steps", steps], ["batch size", batchSize]] as const) {
      if (!(Number.isInteger(value) && value >= 1)) throw new Error(`${name} must be a whole number ≥ 1, got ${value}`);
    }
    this.worker?.terminate();
    this.losses = [];
    this.timedSteps = { count: 0, ms: 0 };
    this.paused = false;
    element("train-log").textContent = "";
    element("val-accuracy").textContent = "–";
    this.status("starting the worker…", "starting");
    this.worker = new Worker("train_worker.js", { type: "module" });
    this.worker.onmessage = (event: MessageEvent<FromWorker>) => this.hear(event.data);
    this.worker.onerror = (event) => {
      event.preventDefault();
      showError(`the training worker failed: ${event.message}`);
    };
    this.send({ type: "start", backend: this.backend, steps, batchSize });
    element<HTMLButtonElement>("train-pause").disabled = false;
    element<HTMLButtonElement>("train-pause").textContent = "Pause";
  }

  private togglePause(): void {
    this.paused = !this.paused;
    this.send({ type: this.paused ? "pause" : "resume" });
    element("train-pause").textContent = this.paused ? "Resume" : "Pause";
    if (this.paused) this.status(`paused at step ${this.losses.length}`, "paused");
  }

  private hear(message: FromWorker): void {
    if (message.type === "error") {
      showError(`training: ${message.message}`);
      this.status("stopped by an error", "failed");
    } else if (message.type === "started") {
      const { config } = message;
      this.log(`backend: ${message.backend}`);
      this.log(`model: preset ${config.preset} | ${message.parameters.toLocaleString("en-US")} parameters`);
      this.log(`train config: ${JSON.stringify(config)}`);
      this.status(`training on ${message.backend}`, "training");
    } else if (message.type === "step") this.stepDone(message);
    else if (message.type === "eval") {
      const accuracy = `${(100 * message.valAccuracy).toFixed(1)}%`;
      element("val-accuracy").textContent = `${accuracy} at step ${message.step} (${message.questions} val questions)`;
      this.log(`eval step ${message.step} | val accuracy ${accuracy} | ${message.seconds.toFixed(1)} s`);
    } else if (message.type === "done") {
      this.status(`done: ${message.steps} steps`, "done");
      element<HTMLButtonElement>("train-pause").disabled = true;
    } else if (message.type === "checkpoint") this.receiveCheckpoint(message);
  }

  private stepDone({ step, steps, loss, lrs, gradNorm, ms }: Extract<FromWorker, { type: "step" }>): void {
    this.losses.push(loss);
    if (step > 1) this.timedSteps = { count: this.timedSteps.count + 1, ms: this.timedSteps.ms + ms };
    const perSecond = this.timedSteps.count ? 1000 * this.timedSteps.count / this.timedSteps.ms : 1000 / ms;
    const lrText = lrs.map((lr) => lr.toExponential(1)).join("/");
    this.log(
      `step ${step}/${steps} | loss ${loss.toFixed(3)} | lr ${lrText} | grad ${gradNorm.toFixed(2)} | ${
        ms.toFixed(0)
      } ms`,
    );
    if (!this.paused) this.status(`step ${step}/${steps} | ${perSecond.toFixed(2)} steps/s`, "training");
    element<HTMLButtonElement>("train-download").disabled = false;
    element<HTMLButtonElement>("train-use").disabled = false;
    drawLossCurve(element("loss-curve"), this.losses);
  }

  private receiveCheckpoint(message: Extract<FromWorker, { type: "checkpoint" }>): void {
    if (message.purpose === "use") {
      this.useModel(message.config, message.safetensors, `the model trained in this tab (step ${message.step})`);
      document.querySelector<HTMLButtonElement>(".tab[data-tab=ask]")!.click();
      return;
    }
    // Two downloads, named as nanoVLM names the files of a checkpoint folder.
    download(new Blob([message.config], { type: "application/json" }), "config.json");
    download(new Blob([message.safetensors as BlobPart], { type: "application/octet-stream" }), "model.safetensors");
  }

  private status(text: string, state: string): void {
    const status = element("train-status");
    status.textContent = text;
    status.dataset.state = state;
  }

  private log(line: string): void {
    const log = element("train-log");
    log.textContent += line + "\n";
    log.scrollTop = log.scrollHeight;
  }
}

/** Save a blob as a file, the way a link with `download` does. */
function download(blob: Blob, name: string): void {
  const link = Object.assign(document.createElement("a"), { href: URL.createObjectURL(blob), download: name });
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 60_000);
}

/** The loss by step as an SVG line, with its axes' ranges written at the corners. */
function drawLossCurve(svg: Element, losses: number[]): void {
  const [width, height, margin] = [640, 240, 36];
  const top = Math.max(...losses), bottom = Math.min(0, ...losses);
  const x = (i: number) => margin + (i / Math.max(1, losses.length - 1)) * (width - 2 * margin);
  const y = (loss: number) => height - margin - ((loss - bottom) / (top - bottom || 1)) * (height - 2 * margin);
  const points = losses.map((loss, i) => `${x(i).toFixed(1)},${y(loss).toFixed(1)}`).join(" ");
  svg.innerHTML = `
    <line x1="${margin}" y1="${height - margin}" x2="${width - margin}" y2="${height - margin}" stroke="#888"/>
    <line x1="${margin}" y1="${margin}" x2="${margin}" y2="${height - margin}" stroke="#888"/>
    <polyline points="${points}" fill="none" stroke="#c33" stroke-width="2"/>
    <text x="4" y="${margin}" font-size="12">${top.toFixed(2)}</text>
    <text x="4" y="${height - margin}" font-size="12">${bottom.toFixed(2)}</text>
    <text x="${width - margin}" y="${height - 8}" font-size="12" text-anchor="end">step ${losses.length}</text>
    <text x="${width / 2}" y="16" font-size="13" text-anchor="middle">training loss</text>`;
}
