// lib/inference.ts — what asking a trained model needs from disk: find a checkpoint, and load it with its tokenizer.
// generate.ts, lib/eval.ts and the notebooks share it; answering (`answerQuestion`) is lib/scoring.ts's.

import { type ChatTokenizer, checkTokenizerFitsConfig, loadTokenizer } from "../data.ts";
import type { VisionLanguageModel } from "../nanovlm.ts";
import { fromPretrained } from "./checkpoint.ts";
import { fileExists, pathExistsSync } from "./files.ts";

// ---- Finding a checkpoint and its tokenizer ---------------------------------------------

const PROJECT_DIR = new URL("..", import.meta.url).pathname.replace(/\/$/, "");

/**
 * The checkpoint of the most recent run under `runsDir`: for each run its `best/` (else
 * `latest/`), and of those the one written last. Throws when there is none, saying how
 * to make one.
 */
export async function findLatestCheckpoint(runsDir = "runs"): Promise<string> {
  let newest: { dir: string; time: number } | undefined;
  let entries: Deno.DirEntry[] = [];
  try {
    entries = await Array.fromAsync(Deno.readDir(runsDir));
  } catch {
    // no runs folder: reported below
  }
  for (const run of entries.filter((e) => e.isDirectory)) {
    for (const name of ["best", "latest"]) {
      const dir = `${runsDir}/${run.name}/${name}`;
      if (!await fileExists(`${dir}/model.safetensors`) || !await fileExists(`${dir}/config.json`)) continue;
      const time = (await Deno.stat(`${dir}/model.safetensors`)).mtime?.getTime() ?? 0;
      if (!newest || time > newest.time) newest = { dir, time };
      break; // best/ is preferred within a run
    }
  }
  if (!newest) throw new Error(`no checkpoint found under ${runsDir}/: train one with \`deno task train\``);
  return newest.dir;
}

/** The trained checkpoint that comes with the project (its model card is the folder's README.md). */
export const COMMITTED_CHECKPOINT = `${PROJECT_DIR}/checkpoints/shapes-tiny`;

/**
 * The checkpoint to ask: the one the user named, else their latest run's, else the committed one. Without a name it
 * comes with a line saying which (generate and eval print it).
 */
export async function checkpointToAsk(named?: string, runsDir = "runs"): Promise<{ dir: string; note?: string }> {
  if (named !== undefined) return { dir: named };
  try {
    const dir = await findLatestCheckpoint(runsDir);
    return { dir, note: `checkpoint: ${dir} (the latest run under ${runsDir}/)` };
  } catch {
    return {
      dir: COMMITTED_CHECKPOINT,
      note: `checkpoint: checkpoints/shapes-tiny, the trained model that comes with the project ` +
        `(no run of your own under ${runsDir}/ yet: \`deno task train\` makes one)`,
    };
  }
}

/**
 * Where a config's `lm_tokenizer` lives: an absolute path as is, else relative to the current folder if it exists
 * there, else relative to this project (so "tokenizers/shapes" works from anywhere), else beside the running script
 * (a bundle made by tools/pack-gpu.sh carries tokenizers/ beside it).
 */
export function resolveTokenizerPath(name: string): string {
  if (name.startsWith("/")) return name;
  const beside = new URL(".", Deno.mainModule).pathname;
  const candidates = [name, `${PROJECT_DIR}/${name}`, `${beside}${name}`];
  return candidates.find(pathExistsSync) ?? candidates[1];
}

/**
 * Load a checkpoint folder (config.json + model.safetensors, nanoVLM's format) and the
 * tokenizer its config names; the model's EOS becomes the tokenizer's. A folder without
 * its files gets an Error naming the missing one.
 */
export async function loadForInference(dir: string): Promise<{ model: VisionLanguageModel; tokenizer: ChatTokenizer }> {
  const model = await fromPretrained(dir);
  try {
    const tokenizer = await loadTokenizer(resolveTokenizerPath(model.cfg.lm_tokenizer));
    checkTokenizerFitsConfig(tokenizer, model.cfg);
    model.eosTokenId = tokenizer.eosTokenId;
    return { model, tokenizer };
  } catch (e) {
    model.dispose();
    throw e;
  }
}
