// datasets.ts — real training data, streamed: conversations about images from a JSONL
// file, or from The Cauldron's parquet shards (local files, or on the Hub).
//
// What this is: the readers behind `deno task train --data ...`, each an async generator
// that yields one conversation at a time, so a dataset is never held (nor, from the Hub,
// downloaded) whole:
//   1. Samples: `ConversationSample` = images (encoded bytes or file paths) + turns.
//   2. JSONL: `{"images": ["a.png"], "conversation": [{"user": …, "assistant": …}]}` per
//      line, image paths relative to the file.
//   3. Parquet in The Cauldron's layout (`images`: list of {bytes}, `texts`: list of
//      {user, assistant}), read one row group at a time with hyparquet, from a file or
//      straight from the Hub with HTTP range requests (HuggingFaceM4/the_cauldron).
//   4. A shuffle buffer, and batches: images decoded and resized, conversations
//      tokenised and collated by data.ts. A row whose image does not decode is skipped
//      with a warning and counted; training goes on.
//   5. `openDataset(spec)`: what `--data` names (`cauldron:vqav2`, `file.jsonl`, `dir/`).
//
// What this is not: the reference's packing (ConstantLengthDataset) or its 45-subset mix;
// one subset or file at a time. The reference loads the Cauldron with `datasets`
// (download, then shuffle); streaming trades its global shuffle for a shuffle buffer.

import { asyncBufferFromFile, cachedAsyncBuffer, parquetMetadataAsync, parquetReadObjects } from "hyparquet";
import type { AsyncBuffer } from "hyparquet";
import { compressors } from "hyparquet-compressors";
import { dirname, isAbsolute, join } from "node:path";
import {
  type Batch,
  type ChatTokenizer,
  collate,
  type DataConfig,
  encodeConversation,
  type EncodedSample,
  preprocessImage,
} from "../data.ts";
import {
  cachedFile,
  hubOffline,
  type HubOptions,
  hubRangeReader,
  listCachedFiles,
  listRepoFiles,
  repoCacheDir,
} from "./hub.ts";
import { seededRandom, type VLMConfig } from "../nanovlm.ts";
import { type DataStats, newDataStats, type TrainingData } from "./train_data.ts";
import type { TrainConfig } from "./train_config.ts";

// ---- 1. Samples ---------------------------------------------------------------------------

/** One question → answer exchange. */
export interface Turn {
  user: string;
  assistant: string;
}

/** A conversation about zero or more images, before decoding and tokenising. */
export interface ConversationSample {
  /** Encoded image bytes (PNG/JPEG, from parquet) or image file paths (from JSONL). */
  images: (Uint8Array | string)[];
  turns: Turn[];
  /** Where it came from, for messages: `file.jsonl:12`, `vqav2/train-00000-of-00017.parquet#317`. */
  source: string;
}

/** A dataset that can be read from the start any number of times (once per epoch). */
export interface DataSource {
  /** What it is, for logs: "HuggingFaceM4/the_cauldron vqav2 (17 shards, 9.7 GB)". */
  name: string;
  samples(): AsyncGenerator<ConversationSample>;
}

// ---- 2. JSONL conversations -------------------------------------------------------------------

/** The lines of a text file, read as a stream. */
async function* readLines(path: string): AsyncGenerator<string> {
  const file = await Deno.open(path);
  let rest = "";
  for await (const text of file.readable.pipeThrough(new TextDecoderStream())) {
    const lines = (rest + text).split("\n");
    rest = lines.pop()!;
    yield* lines;
  }
  if (rest) yield rest;
}

/**
 * Conversations from a JSONL file, one per line:
 * `{"images": ["img/0.png"], "conversation": [{"user": "What is it?", "assistant": "A cat."}]}`.
 * Image paths are relative to the file's folder. Blank lines are skipped; a line that is
 * not such an object throws an Error naming `file:line` (fix the file rather than train
 * on a part of it). Images are only read later, when the sample is used.
 */
export async function* readJsonlConversations(path: string): AsyncGenerator<ConversationSample> {
  const dir = dirname(path);
  let lineNumber = 0;
  for await (const line of readLines(path)) {
    lineNumber++;
    if (!line.trim()) continue;
    const where = `${path}:${lineNumber}`;
    let row: { images?: unknown; conversation?: unknown };
    try {
      row = JSON.parse(line);
    } catch (e) {
      throw new Error(`${where}: not valid JSON (${(e as Error).message})`);
    }
    const images = row.images ?? [];
    if (!Array.isArray(images) || !images.every((p) => typeof p === "string")) {
      throw new Error(`${where}: "images" must be a list of image file paths`);
    }
    const turns = row.conversation;
    const isTurn = (t: unknown) => typeof (t as Turn)?.user === "string" && typeof (t as Turn)?.assistant === "string";
    if (!Array.isArray(turns) || !turns.length || !turns.every(isTurn)) {
      throw new Error(`${where}: "conversation" must be a non-empty list of {"user": "...", "assistant": "..."}`);
    }
    yield {
      images: images.map((p: string) => isAbsolute(p) ? p : join(dir, p)),
      turns: turns.map(({ user, assistant }: Turn) => ({ user, assistant })),
      source: where,
    };
  }
}

// ---- 3. Parquet in The Cauldron's layout --------------------------------------------------------

/** A parquet file: a path, its bytes, or hyparquet's AsyncBuffer (byteLength + slice(start, end)). */
export type ParquetSource = string | Uint8Array | AsyncBuffer;

const utf8 = new TextDecoder();
const text = (value: unknown): string => value instanceof Uint8Array ? utf8.decode(value) : String(value ?? "");

/**
 * Conversations from a parquet file in The Cauldron's layout: `images` a list of
 * `{bytes, path}` structs, `texts` a list of `{user, assistant, source}` structs.
 * Rows `rowStart` (inclusive) to `rowEnd` (exclusive) are read one row group at a time,
 * so only the footer and the groups that hold those rows are ever in memory (or, for a
 * file on the Hub, fetched). `utf8: false` keeps the image bytes as bytes.
 * An image without bytes is passed on as empty bytes: it fails to decode and the row is
 * skipped (and counted) like any corrupt image.
 */
export async function* readCauldronParquet(
  source: ParquetSource,
  { rowStart = 0, rowEnd = Infinity, name }: { rowStart?: number; rowEnd?: number; name?: string } = {},
): AsyncGenerator<ConversationSample> {
  name ??= typeof source === "string" ? source : "parquet";
  const file: AsyncBuffer = typeof source === "string"
    ? await asyncBufferFromFile(source)
    : source instanceof Uint8Array
    ? { byteLength: source.length, slice: (start, end) => source.slice(start, end).buffer }
    : source;
  const metadata = await parquetMetadataAsync(file);
  const columns = metadata.schema.slice(1).map((column) => column.name);
  if (!columns.includes("images") || !columns.includes("texts")) {
    throw new Error(`${name}: not in The Cauldron's layout: expected columns images and texts, found ${columns}`);
  }
  let groupStart = 0;
  for (const group of metadata.row_groups) {
    const groupEnd = groupStart + Number(group.num_rows);
    const start = Math.max(groupStart, rowStart), end = Math.min(groupEnd, rowEnd);
    if (start < end) {
      const rows = await parquetReadObjects({
        file,
        metadata,
        rowStart: start,
        rowEnd: end,
        columns: ["images", "texts"],
        utf8: false,
        compressors,
      });
      for (const [i, row] of rows.entries()) {
        const images = (row.images ?? []) as ({ bytes?: Uint8Array | null } | null)[];
        const texts = (row.texts ?? []) as ({ user?: unknown; assistant?: unknown } | null)[];
        yield {
          images: images.map((image) => image?.bytes ?? new Uint8Array(0)),
          turns: texts.filter((t) => t).map((t) => ({ user: text(t!.user), assistant: text(t!.assistant) })),
          source: `${name}#${start + i}`,
        };
      }
    }
    groupStart = groupEnd;
    if (groupStart >= rowEnd) break;
  }
}

/** The Cauldron, the reference's training data: 50 subsets of image–question–answer datasets. */
export const CAULDRON_REPO = "HuggingFaceM4/the_cauldron";

/** One parquet shard of a Hub dataset: its path in the repo, its size, and a cached copy if offline. */
export interface Shard {
  path: string;
  size: number;
  /** Set when the shard is read from the local cache (offline mode). */
  localPath?: string;
}

/**
 * The parquet shards of a subset (a folder) of a Hub dataset, sorted: listed with the
 * Hub's tree API, or, with HF_HUB_OFFLINE=1, the shards already in the cache (put there
 * with `deno task hub download --repo_type dataset HuggingFaceM4/the_cauldron vqav2/…`).
 */
export async function cauldronShards(
  subset: string,
  options: HubOptions = {},
  repoId = CAULDRON_REPO,
): Promise<Shard[]> {
  const opts: HubOptions = { ...options, repoType: "dataset" };
  if (options.offline ?? hubOffline()) {
    const paths = (await listCachedFiles(repoId, subset, opts)).filter((p) => p.endsWith(".parquet"));
    if (!paths.length) {
      throw new Error(
        `HF_HUB_OFFLINE is set and no parquet shard of ${repoId}/${subset} is in the cache ` +
          `(${repoCacheDir(repoId, opts)}). Download shards where the Hub is reachable, e.g.\n` +
          `  deno task hub download --repo_type dataset ${repoId} ${subset}/<shard>.parquet\n` +
          `(the shard names are listed at https://huggingface.co/datasets/${repoId}/tree/main/${subset}).`,
      );
    }
    return Promise.all(paths.map(async (path) => {
      const localPath = (await cachedFile(repoId, path, opts))!;
      return { path, size: (await Deno.stat(localPath)).size, localPath };
    }));
  }
  const shards = (await listRepoFiles(repoId, subset, opts)).filter((f) => f.path.endsWith(".parquet"));
  if (!shards.length) throw new Error(`${repoId}/${subset} has no parquet files`);
  return shards.map(({ path, size }) => ({ path, size }));
}

/**
 * Conversations from the shards of a Hub dataset, one shard after the other, each read
 * with HTTP range requests (footer, then one row group at a time) or from the cache.
 */
export async function* readHubShards(
  shards: Shard[],
  options: HubOptions = {},
  repoId = CAULDRON_REPO,
): AsyncGenerator<ConversationSample> {
  for (const shard of shards) {
    const file = shard.localPath ?? cachedAsyncBuffer({
      byteLength: shard.size,
      slice: hubRangeReader(repoId, shard.path, { ...options, repoType: "dataset" }),
    });
    yield* readCauldronParquet(file, { name: shard.path });
  }
}

// ---- 4. Shuffling and batches ------------------------------------------------------------------

/**
 * Approximate shuffling of a stream: keep `size` items, emit a random one of them for
 * each new item (seeded, so a run is reproducible). A stream has no global shuffle;
 * a buffer of a few thousand conversations mixes a shard's neighbouring rows well.
 */
export async function* shuffleBuffer<T>(items: AsyncIterable<T>, size: number, seed: number): AsyncGenerator<T> {
  const random = seededRandom(seed);
  const buffer: T[] = [];
  for await (const item of items) {
    if (buffer.length < size) {
      buffer.push(item);
      continue;
    }
    const i = Math.floor(random() * size);
    yield buffer[i];
    buffer[i] = item;
  }
  while (buffer.length) yield buffer.splice(Math.floor(random() * buffer.length), 1)[0];
}

/** Options of conversationBatches. */
export interface ConversationBatchOptions {
  tokenizer: ChatTokenizer;
  config: Pick<DataConfig, "vit_img_size" | "mp_image_token_length" | "lm_max_length">;
  batchSize: number;
  /** Counters to update (default: a fresh one, not visible to the caller). */
  stats?: DataStats;
}

/**
 * Training batches from a stream of conversations: each image decoded and resized as the
 * reference's processor does (data.ts `preprocessImage`), each conversation tokenised
 * with the image placeholders and assistant-only labels (`encodeConversation`), every
 * `batchSize` samples collated (left-padded to lm_max_length; longer ones dropped). A row
 * with an image that does not decode is skipped with a warning and counted in `stats`.
 */
export async function* conversationBatches(
  samples: AsyncIterable<ConversationSample>,
  { tokenizer, config, batchSize, stats = newDataStats() }: ConversationBatchOptions,
): AsyncGenerator<Batch> {
  const S = config.vit_img_size;
  let pending: EncodedSample[] = [];
  const flush = () => {
    const batch = collate(pending, { maxLength: config.lm_max_length, padTokenId: tokenizer.padTokenId });
    stats.tooLong += batch.dropped;
    pending = [];
    return batch;
  };
  for await (const sample of samples) {
    stats.rows++;
    const decoded = await Promise.allSettled(
      sample.images.map((image, i) => preprocessImage(image, S, `${i} of ${sample.source}`)),
    );
    const failures = decoded.filter((d) => d.status === "rejected").map((d) => (d as PromiseRejectedResult).reason);
    if (failures.length || !sample.turns.length) {
      stats.skippedRows++;
      stats.corruptImages += failures.length;
      const why = failures.length ? failures.map((e) => (e as Error).message).join("; ") : "no conversation";
      console.warn(`data: skipping ${sample.source}: ${why} (${stats.skippedRows} rows skipped so far)`);
      continue;
    }
    const images = decoded.map((d) => (d as PromiseFulfilledResult<Float32Array>).value);
    const encoded = encodeConversation(
      tokenizer,
      { turns: sample.turns, imageCount: images.length },
      config.mp_image_token_length,
    );
    pending.push({ ...encoded, images });
    stats.samples++;
    if (pending.length === batchSize) {
      const batch = flush();
      if (batch.batchSize) yield batch;
    }
  }
  if (pending.length) {
    const batch = flush();
    if (batch.batchSize) yield batch;
  }
}

/** Options of trainingBatches: conversationBatches' plus how the stream is cut, mixed and resumed. */
export interface TrainingStreamOptions extends ConversationBatchOptions {
  /** Conversations at the start of the source kept out of training: the val set (`heldOutBatches`). */
  holdout: number;
  /** Shuffle buffer size (0 = file order); epoch e is shuffled with seed `seed + e`. */
  shuffle: number;
  seed: number;
  /** Conversations to pass over, undecoded, before the first batch: where a resumed run left off. */
  skip?: number;
}

async function* afterFirst<T>(items: AsyncIterable<T>, count: number): AsyncGenerator<T> {
  let i = 0;
  for await (const item of items) if (i++ >= count) yield item;
}

async function* firstOf<T>(items: AsyncIterable<T>, count: number): AsyncGenerator<T> {
  if (count <= 0) return;
  let i = 0;
  for await (const item of items) {
    yield item;
    if (++i >= count) return;
  }
}

/**
 * Endless training batches from a dataset, epoch after epoch: the first `holdout`
 * conversations left out, the rest shuffled and batched (conversationBatches). Resuming
 * passes over `skip` conversations without decoding them; rows that were skipped as
 * corrupt or too long before the interruption are counted among them, so a resumed
 * stream can be off by those few rows. A dataset with nothing usable left throws
 * instead of looping forever.
 */
export async function* trainingBatches(source: DataSource, options: TrainingStreamOptions): AsyncGenerator<Batch> {
  const { holdout, shuffle, seed, skip = 0, ...batchOptions } = options;
  let toSkip = skip;
  for (let epoch = 0;; epoch++) {
    let rows = 0, batches = 0;
    const rest = afterFirst(source.samples(), holdout);
    const mixed = shuffle > 0 ? shuffleBuffer(rest, shuffle, seed + epoch) : rest;
    const resumed = (async function* () {
      for await (const row of mixed) {
        rows++;
        if (toSkip > 0) toSkip--;
        else yield row;
      }
    })();
    for await (const batch of conversationBatches(resumed, batchOptions)) {
      batches++;
      yield batch;
    }
    if (rows === 0) {
      throw new Error(
        `${source.name}: no conversations left for training after the ${holdout} held out for validation`,
      );
    }
    if (batches === 0 && toSkip === 0) throw new Error(`${source.name}: not one usable conversation in an epoch`);
  }
}

/** The val set of a dataset: batches of its first `count` conversations (the ones trainingBatches leaves out). */
export async function heldOutBatches(
  source: DataSource,
  count: number,
  options: ConversationBatchOptions,
): Promise<Batch[]> {
  const batches: Batch[] = [];
  for await (const batch of conversationBatches(firstOf(source.samples(), count), options)) batches.push(batch);
  return batches;
}

// ---- 5. From the command line ----------------------------------------------------------------

async function statOrNull(path: string): Promise<Deno.FileInfo | null> {
  try {
    return await Deno.stat(path);
  } catch {
    return null;
  }
}

/**
 * The dataset `--data` names:
 * - `cauldron:vqav2`: a subset of HuggingFaceM4/the_cauldron, streamed from the Hub
 *   (or read from the cache with HF_HUB_OFFLINE=1);
 * - `path/to/file.jsonl`: JSONL conversations with image files beside it;
 * - `path/to/shard.parquet`, or a folder of them (also as `cauldron:path`): local parquet
 *   in The Cauldron's layout.
 * Shards are listed now, so a wrong name fails before training starts.
 */
export async function openDataset(spec: string, options: HubOptions = {}): Promise<DataSource> {
  const target = spec.startsWith("cauldron:") ? spec.slice("cauldron:".length) : spec;
  const info = await statOrNull(target);
  if (info?.isFile && target.endsWith(".jsonl")) {
    return { name: target, samples: () => readJsonlConversations(target) };
  }
  if (info?.isFile && target.endsWith(".parquet")) {
    return { name: target, samples: () => readCauldronParquet(target) };
  }
  if (info?.isDirectory) {
    const files = [...Deno.readDirSync(target)].filter((e) => e.name.endsWith(".parquet")).map((e) => e.name).sort();
    if (!files.length) throw new Error(`--data ${spec}: the folder ${target} has no .parquet files`);
    return {
      name: `${target} (${files.length} parquet files)`,
      samples: async function* () {
        for (const f of files) yield* readCauldronParquet(join(target, f), { name: f });
      },
    };
  }
  if (spec.startsWith("cauldron:") && /^[\w-]+$/.test(target)) {
    const shards = await cauldronShards(target, options);
    const bytes = shards.reduce((n, s) => n + s.size, 0);
    return {
      name: `${CAULDRON_REPO} ${target} (${shards.length} shards, ${(bytes / 1e9).toFixed(2)} GB)`,
      samples: () => readHubShards(shards, options),
    };
  }
  throw new Error(
    `--data ${spec}: expected cauldron:<subset> (e.g. cauldron:vqav2), a .jsonl file, ` +
      `a .parquet file or a folder of them${info ? "" : ` (${target} does not exist)`}`,
  );
}

/**
 * A run's data from a dataset (train.ts --data): its first val_samples conversations are the val set (val loss) and the
 * rest streams, shuffled, resumed after `examplesSeen` conversations. No val questions: val accuracy asks shapes-world
 * questions. The shapes world's data is lib/train_data.ts's `shapesTrainingData`.
 */
export async function datasetTrainingData(
  source: DataSource,
  config: TrainConfig,
  cfg: VLMConfig,
  tokenizer: ChatTokenizer,
  examplesSeen: number,
): Promise<TrainingData> {
  const stats = newDataStats(), streamOptions = { tokenizer, config: cfg, batchSize: config.batch_size, stats };
  const batches = trainingBatches(source, {
    ...streamOptions,
    holdout: config.val_samples,
    shuffle: config.shuffle_buffer,
    seed: config.seed,
    skip: examplesSeen,
  });
  const valBatches = await heldOutBatches(source, config.val_samples, { ...streamOptions, stats: undefined });
  return { batches, valBatches, valQuestions: [], stats };
}
