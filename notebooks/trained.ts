// notebooks/trained.ts — the models the notebooks use.
//
// Notebooks 3 and 8 look inside a trained model: the checkpoint that comes with the project
// (checkpoints/shapes-tiny, made by `deno task train`; its model card is the folder's
// README.md), loaded in nanoVLM's format with its tokenizer. Notebook 7 is the lesson on
// training: it trains the `tiny` preset with RECIPE for about a minute, step by step with a
// live loss plot, and saves it to CHECKPOINT. A minute of training is far from the
// committed checkpoint's ten, so notebook 7's model mostly guesses; that is the point it
// makes.

import type { VisionLanguageModel } from "../nanovlm.ts";
import type { ChatTokenizer } from "../data.ts";
import { COMMITTED_CHECKPOINT, loadForInference } from "../lib/inference.ts";

/** Where notebook 7 saves its model (nanoVLM's format: config.json + model.safetensors). */
export const CHECKPOINT: string = new URL("../runs/notebooks/tiny", import.meta.url).pathname;

/** The shapes tokenizer the tiny preset is built for. */
export const TOKENIZER_DIR: string = new URL("../tokenizers/shapes", import.meta.url).pathname;

/** How notebook 7 trains: about a minute on a 2-core CPU. `deno task train` trains for ten. */
export const RECIPE = Object.freeze({
  preset: "tiny",
  steps: 300, // optimizer steps
  batchSize: 8, // samples per step
  lr: 3e-3, // peak learning rate, for the projector and the backbones alike
  maxGradNorm: 1.0,
  seed: 0, // model init and data order
});

/** The committed trained checkpoint with its tokenizer; `source` says where it came from. */
export async function trainedModel(): Promise<
  { model: VisionLanguageModel; tokenizer: ChatTokenizer; source: string }
> {
  const { model, tokenizer } = await loadForInference(COMMITTED_CHECKPOINT);
  return { model, tokenizer, source: "checkpoints/shapes-tiny (trained by `deno task train`; see its README.md)" };
}
