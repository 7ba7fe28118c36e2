/**
 * Tests for datasets.ts on small files the tests write: JSONL conversations with image
 * files, Cauldron-layout parquet (hyparquet-writer) read row group by row group, a corrupt
 * image skipped with a warning and counted while batches keep coming, the shuffle buffer,
 * and `cauldron:<subset>` streamed from a fake Hub on 127.0.0.1 with range requests
 * (and from the cache in offline mode).
 * Run: deno test -A tests/datasets_test.ts
 */
import { parquetWriteBuffer } from "hyparquet-writer";
import { join } from "node:path";
import { loadTokenizer, preprocessImage } from "../data.ts";
import {
  CAULDRON_REPO,
  conversationBatches,
  type ConversationSample,
  openDataset,
  readCauldronParquet,
  readJsonlConversations,
  shuffleBuffer,
} from "../lib/datasets.ts";
import { hubDownload } from "../lib/hub.ts";
import { newDataStats } from "../lib/train_data.ts";
import { PRESETS } from "../nanovlm.ts";
import { assert, assertEquals, assertMatch, assertRejects } from "./assert.ts";
import { cauldronParquet, FakeHub, noisePng, tempCache } from "./fake_hub.ts";
import { captureWarnings } from "./helpers.ts";

const TOKENIZER_DIR = new URL("../tokenizers/shapes", import.meta.url).pathname;

/** Shapes-world questions, so the shapes tokenizer can encode them. */
const QA = [
  { user: "What color is the circle?", assistant: "red" },
  { user: "How many shapes are there?", assistant: "two" },
  { user: "Is there a blue square?", assistant: "no" },
];

/** `count` rows of one noise image and one question each; row `corruptRow` gets bytes that are no image. */
async function rows(count: number, corruptRow = -1, imageSize = 48) {
  return await Promise.all(Array.from({ length: count }, async (_, i) => ({
    images: [i === corruptRow ? new TextEncoder().encode("not an image at all") : await noisePng(i, imageSize)],
    texts: [QA[i % QA.length]],
  })));
}

async function collect<T>(items: AsyncIterable<T>): Promise<T[]> {
  const out: T[] = [];
  for await (const item of items) out.push(item);
  return out;
}

/** An AsyncBuffer over bytes that records which ranges were read. */
function countingBuffer(bytes: Uint8Array) {
  const reads: [number, number][] = [];
  return {
    reads,
    file: {
      byteLength: bytes.length,
      slice(start: number, end = bytes.length) {
        reads.push([start, end]);
        return bytes.slice(start, end).buffer;
      },
    },
  };
}

Deno.test("readJsonlConversations: images relative to the file, multi-turn, errors name file:line", async () => {
  const dir = await Deno.makeTempDir();
  try {
    await Deno.mkdir(join(dir, "img"));
    await Deno.writeFile(join(dir, "img", "a.png"), await noisePng(1));
    const lines = [
      { images: ["img/a.png"], conversation: [QA[0]] },
      {},
      { images: ["img/a.png", "/abs/b.png"], conversation: [QA[1], QA[2]] },
      { conversation: [QA[2]] }, // text only
    ].map((row) => Object.keys(row).length ? JSON.stringify(row) : "");
    await Deno.writeTextFile(join(dir, "train.jsonl"), lines.join("\n") + "\n");
    const samples = await collect(readJsonlConversations(join(dir, "train.jsonl")));
    assertEquals(samples, [
      { images: [join(dir, "img/a.png")], turns: [QA[0]], source: `${join(dir, "train.jsonl")}:1` },
      {
        images: [join(dir, "img/a.png"), "/abs/b.png"],
        turns: [QA[1], QA[2]],
        source: `${join(dir, "train.jsonl")}:3`,
      },
      { images: [], turns: [QA[2]], source: `${join(dir, "train.jsonl")}:4` },
    ]);

    await Deno.writeTextFile(join(dir, "bad.jsonl"), `${lines[0]}\n{"images": [], "conversation": [{"user": "hi"}]}\n`);
    await assertRejects(
      () => collect(readJsonlConversations(join(dir, "bad.jsonl"))),
      Error,
      `${join(dir, "bad.jsonl")}:2: "conversation" must be a non-empty list`,
    );
    await Deno.writeTextFile(join(dir, "bad.jsonl"), `{"images": [}\n`);
    await assertRejects(
      () => collect(readJsonlConversations(join(dir, "bad.jsonl"))),
      Error,
      "bad.jsonl:1: not valid JSON",
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("readCauldronParquet: image bytes stay bytes, and only the row groups asked for are read", async () => {
  // 256² noise images: row groups of about 600 kB, more than the 512 kB hyparquet reads for the footer.
  const data = await rows(9, -1, 256);
  const bytes = cauldronParquet(data, 3);
  const all = await collect(readCauldronParquet(bytes, { name: "shard.parquet" }));
  assertEquals(all.length, 9);
  all.forEach((sample, i) => {
    assertEquals(sample.images, data[i].images);
    assertEquals(sample.turns, data[i].texts);
    assertEquals(sample.source, `shard.parquet#${i}`);
  });

  // Rows 7..8 live in the last of three row groups: the earlier groups' bytes are never read.
  const { file, reads } = countingBuffer(bytes);
  const tail = await collect(readCauldronParquet(file, { rowStart: 7, rowEnd: 9 }));
  assertEquals(tail.map((s) => s.source), ["parquet#7", "parquet#8"]);
  const firstGroupEnd = bytes.length / 3; // the groups are about equally big (noise images)
  assert(reads.every(([start]) => start > firstGroupEnd), `read ranges ${JSON.stringify(reads)}`);

  // A file on disk, and a file that is not in The Cauldron's layout.
  const dir = await Deno.makeTempDir();
  try {
    await Deno.writeFile(join(dir, "s.parquet"), bytes);
    assertEquals((await collect(readCauldronParquet(join(dir, "s.parquet"), { rowEnd: 2 }))).length, 2);
    const other = new Uint8Array(
      parquetWriteBuffer({ columnData: [{ name: "caption", data: ["a"], type: "STRING" }] }),
    );
    await assertRejects(
      () => collect(readCauldronParquet(other)),
      Error,
      "expected columns images and texts, found caption",
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("conversationBatches: a corrupt image skips its row with a warning and a count; batches go on", async () => {
  const tokenizer = await loadTokenizer(TOKENIZER_DIR);
  const config = PRESETS.tiny;
  const data = await rows(7, 2);
  const stats = newDataStats();
  const { result: batches, warnings } = await captureWarnings(() =>
    collect(conversationBatches(readCauldronParquet(cauldronParquet(data, 4), { name: "s" }), {
      tokenizer,
      config,
      batchSize: 4,
      stats,
    }))
  );
  assertEquals(stats, { rows: 7, samples: 6, skippedRows: 1, corruptImages: 1, tooLong: 0 });
  assertEquals(warnings.length, 1);
  assertMatch(warnings[0], /^data: skipping s#2: cannot decode image 0 of s#2: .*\(1 rows skipped so far\)$/);
  assertEquals(batches.map((b) => b.batchSize), [4, 2]);
  // The images are the reference processor's output, in row order without row 2.
  const S = config.vit_img_size, plane = 3 * S * S;
  const expected = await preprocessImage(data[3].images[0], S);
  assertEquals(batches[0].images.subarray(2 * plane, 3 * plane), expected);
  assertEquals(batches[0].imageCounts, [1, 1, 1, 1]);
  assertEquals(batches[0].inputIds.length, 4 * config.lm_max_length);
  // Every row has image tokens and trained (assistant) labels.
  const imageTokens = Array.from(batches[1].inputIds).filter((id) => id === tokenizer.imageTokenId).length;
  assertEquals(imageTokens, 2 * config.mp_image_token_length);
  assert(Array.from(batches[1].labels).some((l) => l >= 0));

  // JSONL: a missing image file is skipped the same way, and so is a PNG cut off before its last chunk (IEND),
  // which imagescript alone would decode (lib/image_bytes.ts).
  const dir = await Deno.makeTempDir();
  try {
    const png = data[0].images[0];
    await Deno.writeFile(join(dir, "ok.png"), png);
    await Deno.writeFile(join(dir, "cut.png"), png.subarray(0, png.length - 12));
    const lines = [["ok.png"], ["missing.png"], ["ok.png"], ["cut.png"]].map((images, i) =>
      JSON.stringify({ images, conversation: [QA[i % QA.length]] })
    );
    await Deno.writeTextFile(join(dir, "d.jsonl"), lines.join("\n"));
    const jsonlStats = newDataStats();
    const { result, warnings: w } = await captureWarnings(() =>
      collect(
        conversationBatches(readJsonlConversations(join(dir, "d.jsonl")), {
          tokenizer,
          config,
          batchSize: 8,
          stats: jsonlStats,
        }),
      )
    );
    assertEquals(result.map((b) => b.batchSize), [2]);
    assertEquals([jsonlStats.skippedRows, jsonlStats.corruptImages], [2, 2]);
    assertMatch(w[0], /d\.jsonl:2: cannot read image .*missing\.png: no such file/);
    assertMatch(w[1], /d\.jsonl:4: cannot decode image .*cut\.png: PNG ends before its IEND chunk \(file truncated\)/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("shuffleBuffer: a seeded permutation that mixes within the buffer", async () => {
  async function* numbers() {
    for (let i = 0; i < 100; i++) yield i;
  }
  const a = await collect(shuffleBuffer(numbers(), 16, 1));
  assertEquals([...a].sort((x, y) => x - y), Array.from({ length: 100 }, (_, i) => i));
  assertEquals(a, await collect(shuffleBuffer(numbers(), 16, 1)));
  assert(a.join() !== (await collect(shuffleBuffer(numbers(), 16, 2))).join(), "another seed, another order");
  assert(a.filter((x, i) => x === i).length < 20, "mostly moved");
});

Deno.test("cauldron:<subset> streams shards from the Hub with range requests, or reads the cache offline", async () => {
  const hub = await FakeHub.start();
  const cache = await tempCache();
  try {
    const shard0 = await rows(12, -1, 256), shard1 = await rows(4); // shard 0: 2.4 MB in 3 row groups
    const files = {
      "vqav2/train-00000-of-00002.parquet": cauldronParquet(shard0, 4),
      "vqav2/train-00001-of-00002.parquet": cauldronParquet(shard1, 10),
      "ai2d/train-00000-of-00001.parquet": cauldronParquet(await rows(1), 10),
    };
    hub.addRepo("dataset", CAULDRON_REPO, files);
    const options = { endpoint: hub.url, cacheDir: cache.dir, offline: false, token: "hf_read" };
    const dataset = await openDataset("cauldron:vqav2", options);
    assertMatch(dataset.name, /^HuggingFaceM4\/the_cauldron vqav2 \(2 shards, 0\.\d\d GB\)$/);

    // The first conversation arrives after the footer and one row group, not the whole shard.
    hub.requests.length = 0;
    const stream = dataset.samples();
    const first = (await stream.next()).value as ConversationSample;
    assertEquals(first.images, shard0[0].images);
    assertEquals(first.source, "vqav2/train-00000-of-00002.parquet#0");
    const ranges = hub.requests.filter((r) => r.server === "storage").map((r) => r.range);
    assert(ranges.length > 0 && ranges.every((r) => r?.startsWith("bytes=")), `every read is ranged: ${ranges}`);
    const fetched = ranges.reduce((n, r) => {
      const [a, b] = r!.slice(6).split("-").map(Number);
      return n + b - a + 1;
    }, 0);
    const size = files["vqav2/train-00000-of-00002.parquet"].length;
    assert(fetched < 0.8 * size, `fetched ${fetched} of ${size} bytes for the first row`);
    // The token goes to the Hub, not to the storage the bytes come from.
    assert(hub.requests.every((r) => (r.server === "hub") === (r.authorization === "Bearer hf_read")));

    const rest = await collect(stream);
    assertEquals(rest.length, 12 + 4 - 1);
    assertEquals(rest.at(-1)!.source, "vqav2/train-00001-of-00002.parquet#3");
    assertEquals(rest.at(-1)!.turns, shard1[3].texts);

    await assertRejects(() => openDataset("cauldron:nosuchsubset", options), Error, "cannot list nosuchsubset");
    await assertRejects(() => openDataset("shapes.txt", options), Error, "expected cauldron:<subset>");

    // Offline: nothing cached is an error that says how to get shards; a cached shard is read with no request.
    const offline = { ...options, offline: true };
    await assertRejects(
      () => openDataset("cauldron:vqav2", offline),
      Error,
      "deno task hub download --repo_type dataset",
    );
    await hubDownload(CAULDRON_REPO, "vqav2/train-00001-of-00002.parquet", { ...options, repoType: "dataset" });
    hub.requests.length = 0;
    const cached = await openDataset("cauldron:vqav2", offline);
    const samples = await collect(cached.samples());
    assertEquals(samples.map((s) => s.turns), shard1.map((r) => r.texts));
    assertEquals(hub.requests.length, 0);
  } finally {
    await hub.close();
    await cache.cleanup();
  }
});

Deno.test("openDataset: a local .jsonl, a .parquet file and a folder of them", async () => {
  const dir = await Deno.makeTempDir();
  try {
    await Deno.writeFile(join(dir, "a.parquet"), cauldronParquet(await rows(2), 10));
    await Deno.writeFile(join(dir, "b.parquet"), cauldronParquet(await rows(3), 10));
    await Deno.writeTextFile(join(dir, "c.jsonl"), JSON.stringify({ conversation: [QA[0]] }) + "\n");
    const folder = await openDataset(dir);
    assertEquals((await collect(folder.samples())).map((s) => s.source), [
      "a.parquet#0",
      "a.parquet#1",
      "b.parquet#0",
      "b.parquet#1",
      "b.parquet#2",
    ]);
    // Each call starts again from the beginning (one call per epoch).
    assertEquals((await collect(folder.samples())).length, 5);
    assertEquals((await collect((await openDataset(`cauldron:${dir}/b.parquet`)).samples())).length, 3);
    assertEquals((await collect((await openDataset(join(dir, "c.jsonl"))).samples())).length, 1);
    await assertRejects(() => openDataset(join(dir, "nope.jsonl")), Error, "does not exist");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
