// web/app.ts — the page's entry point (bundled to app.js by web/serve.ts): the error box, the backend, the tabs.
//
// The page runs the project's own modules, bundled for the browser: nanovlm.ts for the model, data.ts for the shapes
// world, its tokenizer and the image processor, lib/ for checkpoints, training and evaluation. Nothing of the model is
// copied here; web/ holds only the page around them.

/// <reference lib="dom" />

import { buildShapesTokenizerConfig, buildShapesTokenizerJson, tokenizerFromJson } from "../data.ts";
import { AskTab } from "./ask.ts";
import { requestedBackend, startBackend } from "./backend.ts";
import { catchUnhandledErrors, showError } from "./errors.ts";
import { TrainTab } from "./train_ui.ts";

/** Show one tab (ask or train) and hide the other. */
function showTab(name: string): void {
  for (const tab of document.querySelectorAll<HTMLButtonElement>(".tab")) {
    tab.setAttribute("aria-selected", String(tab.dataset.tab === name));
    document.getElementById(`${tab.dataset.tab}-tab`)!.hidden = tab.dataset.tab !== name;
  }
}

async function main(): Promise<void> {
  catchUnhandledErrors();
  for (const tab of document.querySelectorAll<HTMLButtonElement>(".tab")) {
    tab.addEventListener("click", () => showTab(tab.dataset.tab!));
  }
  const status = document.getElementById("backend-status")!;
  const requested = requestedBackend(location.search);
  const backend = await startBackend(requested);
  status.textContent = `tfjs backend: ${backend.description}.`;
  status.dataset.state = "ready";
  const tokenizer = tokenizerFromJson(buildShapesTokenizerJson(), buildShapesTokenizerConfig());
  const ask = new AskTab(tokenizer);
  // The worker starts the same backend as the page (or the one asked for with ?backend=).
  new TrainTab(requested ?? backend.name, (config, safetensors, source) => ask.useModel(config, safetensors, source));
}

main().catch(showError);
