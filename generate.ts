// generate.ts — ask a trained model about an image: `deno task generate`.
//
// What this is: the reference's generate.py (§15): load a checkpoint, preprocess the
// image(s), put mp_image_token_length `<|image|>` tokens per image in front of the
// question, apply the chat template with the generation prompt, and decode with the KV
// cache — streaming each token as it comes, then time to first token and tokens/s.
// Without --image it draws a scene of the shapes world's test split and says so.
//
// Reusable pieces (eval.ts and train.ts use them): findLatestCheckpoint,
// resolveTokenizerPath, loadForInference, answerQuestion.

import * as tf from "@tensorflow/tfjs";
import { parseArgs } from "node:util";
import {
  type ChatTokenizer,
  checkTokenizerFitsConfig,
  encodePrompt,
  loadTokenizer,
  makeShapesExample,
  preprocessImage,
  toCHWFloat,
} from "./data.ts";
import { type GenerateOptions, VisionLanguageModel } from "./nanovlm.ts";
import { type BackendName, initBackend } from "./runtime.ts";

// ---- Finding a checkpoint and its tokenizer ---------------------------------------------

const PROJECT_DIR = new URL(".", import.meta.url).pathname.replace(/\/$/, "");

async function isFile(path: string): Promise<boolean> {
  try {
    return (await Deno.stat(path)).isFile;
  } catch {
    return false;
  }
}

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
      if (!await isFile(`${dir}/model.safetensors`) || !await isFile(`${dir}/config.json`)) continue;
      const time = (await Deno.stat(`${dir}/model.safetensors`)).mtime?.getTime() ?? 0;
      if (!newest || time > newest.time) newest = { dir, time };
      break; // best/ is preferred within a run
    }
  }
  if (!newest) throw new Error(`no checkpoint found under ${runsDir}/: train one with \`deno task train\``);
  return newest.dir;
}

/**
 * Where a config's `lm_tokenizer` lives: an absolute path as is, else relative to the
 * current folder if it exists there, else relative to this project (so
 * "tokenizers/shapes" works from anywhere).
 */
export function resolveTokenizerPath(name: string): string {
  if (name.startsWith("/")) return name;
  try {
    Deno.statSync(name);
    return name;
  } catch {
    return `${PROJECT_DIR}/${name}`;
  }
}

/**
 * Load a checkpoint folder (config.json + model.safetensors, nanoVLM's format) and the
 * tokenizer its config names; the model's EOS becomes the tokenizer's. A folder without
 * its files gets an Error naming the missing one.
 */
export async function loadForInference(dir: string): Promise<{ model: VisionLanguageModel; tokenizer: ChatTokenizer }> {
  const model = await VisionLanguageModel.fromPretrained(dir);
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

// ---- main ------------------------------------------------------------------------------------

const USAGE = `usage: deno task generate [--checkpoint DIR] [--image PATH]... [--prompt TEXT]
  [--max-new-tokens N] [--greedy] [--temperature T] [--top-k K] [--top-p P] [--seed S] [--backend NAME] [--quiet]`;

/** The command line: everything goes to stdout/stderr; returns the answer (for tests). */
export async function main(args: string[]): Promise<string> {
  const { values } = parseArgs({
    args,
    options: {
      checkpoint: { type: "string" },
      image: { type: "string", multiple: true },
      prompt: { type: "string" },
      "max-new-tokens": { type: "string" },
      greedy: { type: "boolean" },
      temperature: { type: "string" },
      "top-k": { type: "string" },
      "top-p": { type: "string" },
      seed: { type: "string" },
      backend: { type: "string" },
      quiet: { type: "boolean" },
      help: { type: "boolean" },
    },
  });
  if (values.help) {
    console.log(USAGE);
    return "";
  }
  const number = (key: keyof typeof values): number | undefined => {
    const raw = values[key] as string | undefined;
    if (raw === undefined) return undefined;
    const value = Number(raw);
    if (raw.trim() === "" || !Number.isFinite(value)) throw new Error(`--${key}=${raw}: expected a number`);
    return value;
  };
  const quiet = values.quiet ?? false;
  const note = (line: string) => quiet || console.error(line);

  await initBackend(values.backend as BackendName | undefined, { quiet: true });
  const dir = values.checkpoint ?? await findLatestCheckpoint();
  const { model, tokenizer } = await loadForInference(dir);
  try {
    const S = model.cfg.vit_img_size;
    let images: Float32Array[];
    let prompt = values.prompt;
    if (values.image?.length) {
      images = await Promise.all(values.image.map((path) => preprocessImage(path, S)));
    } else {
      const scene = makeShapesExample("test", 0, 0, S);
      images = [toCHWFloat(scene.rgb, S)];
      prompt ??= "Describe the image.";
      note(`no --image given: using scene 0 of the shapes world's test split (${scene.objects.length} shapes)`);
    }
    if (prompt === undefined) throw new Error("--prompt is required with --image");
    note(`checkpoint ${dir} | ${model.parameterCount().toLocaleString("en-US")} parameters`);
    note(`prompt: ${prompt}`);

    const encoder = new TextEncoder();
    const answer = await answerQuestion(model, tokenizer, images, prompt, {
      maxNewTokens: number("max-new-tokens"),
      greedy: values.greedy ?? false,
      temperature: number("temperature"),
      topK: number("top-k"),
      topP: number("top-p"),
      seed: number("seed"),
      onText: quiet ? undefined : (piece) => Deno.stdout.writeSync(encoder.encode(piece)),
    });
    if (quiet) console.log(answer.text);
    else {
      console.log();
      note(
        `time to first token ${answer.timeToFirstTokenMs.toFixed(0)} ms | ${answer.ids.length} tokens | ` +
          `${answer.tokensPerSecond.toFixed(1)} tokens/s | prompt ${answer.promptTokens} tokens`,
      );
    }
    return answer.text;
  } finally {
    model.dispose();
  }
}

if (import.meta.main) {
  try {
    await main(Deno.args);
  } catch (e) {
    console.error(`error: ${(e as Error).message}`);
    Deno.exit(1);
  }
}
