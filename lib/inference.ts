// lib/inference.ts — what asking a trained model needs: find a checkpoint, load it with its tokenizer, and answer
// one question with streamed text and timings. generate.ts, lib/eval.ts and the notebooks share it.

import * as tf from "@tensorflow/tfjs";
import { type ChatTokenizer, checkTokenizerFitsConfig, encodePrompt, loadTokenizer } from "../data.ts";
import type { GenerateOptions, VisionLanguageModel } from "../nanovlm.ts";
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

// ---- Answering one question ----------------------------------------------------------------

/** An answer with its timings. */
export interface Answer {
  text: string;
  /** Generated ids, up to and including the first EOS. */
  ids: number[];
  promptTokens: number;
  /** From the call to the first token chosen (includes the image encoder and the prefill). */
  timeToFirstTokenMs: number;
  /** Tokens after the first, per second of decoding. */
  tokensPerSecond: number;
}

/**
 * Generate the answer to one question about `images` (each [3, S, S] float32, already
 * preprocessed), calling `onText` with each new piece of text as it is decoded. A
 * prompt that does not fit the context is an Error giving its length and the limit;
 * maxNewTokens defaults to what is left of the context (at most 64).
 */
export async function answerQuestion(
  model: VisionLanguageModel,
  tokenizer: ChatTokenizer,
  images: Float32Array[],
  question: string,
  options: GenerateOptions & { onText?: (piece: string) => void } = {},
): Promise<Answer> {
  const cfg = model.cfg, S = cfg.vit_img_size;
  const prompt = encodePrompt(tokenizer, question, images.length, cfg.mp_image_token_length, cfg.lm_max_length);
  const room = cfg.lm_max_length - prompt.inputIds.length;
  if (room < 1) {
    throw new Error(
      `the prompt is ${prompt.inputIds.length} tokens long, which leaves no room to answer within the limit of ` +
        `${cfg.lm_max_length} (lm_max_length)`,
    );
  }
  const maxNewTokens = options.maxNewTokens ?? Math.min(64, room);

  const ids: number[] = [];
  let text = "", firstTokenAt = 0, finished = false;
  const started = performance.now();
  const inputIds = tf.tensor2d(prompt.inputIds, [1, prompt.inputIds.length], "int32");
  const pixels = images.length ? tf.tensor4d(concat(images), [images.length, 3, S, S]) : undefined;
  try {
    const out = await model.generate(inputIds, pixels, undefined, {
      ...options,
      maxNewTokens,
      onToken: (next, step) => {
        if (step === 0) firstTokenAt = performance.now();
        if (finished) return;
        ids.push(next[0]);
        finished = next[0] === model.eosTokenId;
        // Decode everything so far and emit only the new suffix: a token's text can depend on its neighbours.
        const now = tokenizer.decode(ids, { skipSpecialTokens: true });
        if (now.length > text.length) options.onText?.(now.slice(text.length));
        text = now;
      },
    });
    out.dispose();
  } finally {
    tf.dispose([inputIds, pixels]);
  }
  const decodeSeconds = (performance.now() - firstTokenAt) / 1000;
  return {
    text: text.trim(),
    ids,
    promptTokens: prompt.inputIds.length,
    timeToFirstTokenMs: firstTokenAt - started,
    tokensPerSecond: ids.length > 1 ? (ids.length - 1) / decodeSeconds : 0,
  };
}

function concat(arrays: Float32Array[]): Float32Array {
  const out = new Float32Array(arrays.reduce((n, a) => n + a.length, 0));
  arrays.reduce((offset, a) => (out.set(a, offset), offset + a.length), 0);
  return out;
}
