/**
 * train.ts with real data, pretrained backbones and --push_to_hub, offline: a fake Hub on
 * 127.0.0.1 (tests/fake_hub.ts) serves the nanovlm-tiny-a SigLIP/SmolLM2 fixtures as
 * google/siglip-base-patch16-224 and HuggingFaceTB/SmolLM2-135M, a SmolLM2-like tokenizer,
 * and a Cauldron subset; the runs are a couple of steps of tiny models.
 * Run: deno test -A tests/train_hub_test.ts
 */
import { join } from "node:path";
import { train } from "../train.ts";
import type { TrainConfig } from "../lib/train_config.ts";
import { CAULDRON_REPO } from "../lib/datasets.ts";
import { readSafetensors } from "../lib/safetensors.ts";
import { assert, assertEquals, assertMatch, assertRejects } from "./assert.ts";
import {
  addBackboneRepos,
  cauldronParquet,
  FakeHub,
  noisePng,
  SIGLIP_REPO,
  SMOLLM_REPO,
  tempCache,
} from "./fake_hub.ts";
import { captureWarnings, withEnv } from "./helpers.ts";

const QA = [
  { user: "What color is the circle?", assistant: "red" },
  { user: "How many shapes are there?", assistant: "two" },
  { user: "Is there a blue square?", assistant: "no" },
];
const SMALL_RUN: Partial<TrainConfig> = {
  backend: "wasm",
  batch_size: 2,
  gradient_accumulation_steps: 1,
  max_training_steps: 2,
  eval_interval: 2,
  val_samples: 2,
  test_examples: 0,
  shuffle_buffer: 4,
};

/**
 * A fake Hub with the backbones, the tokenizer (grown to the fixture LM's 299-token vocabulary: SmolLM2 has 49152) and
 * a Cauldron subset; HF_* pointing at it while `fn` runs.
 */
async function withHubEnv(fn: (hub: FakeHub, dir: string) => Promise<void>): Promise<void> {
  const hub = await FakeHub.start();
  const cache = await tempCache();
  try {
    await addBackboneRepos(hub, { vocabSize: 299 });
    const rows = await Promise.all(
      Array.from({ length: 6 }, async (_, i) => ({ images: [await noisePng(i)], texts: [QA[i % 3]] })),
    );
    hub.addRepo("dataset", CAULDRON_REPO, { "vqav2/train-00000-of-00001.parquet": cauldronParquet(rows, 3) });
    const vars = { HF_ENDPOINT: hub.url, HF_HOME: cache.dir, HF_TOKEN: hub.writeToken, HF_HUB_OFFLINE: undefined };
    await withEnv(vars, () => fn(hub, cache.dir));
  } finally {
    await hub.close();
    await cache.cleanup();
  }
}

Deno.test("train: backbones and tokenizer from the Hub, a JSONL file with a corrupt image, --push_to_hub", async () => {
  await withHubEnv(async (hub, dir) => {
    // Five conversations: two held out for val, three to train on, one of them with a corrupt image.
    const data = join(dir, "data");
    await Deno.mkdir(data);
    for (let i = 0; i < 5; i++) await Deno.writeFile(join(data, `${i}.png`), await noisePng(i));
    await Deno.writeTextFile(join(data, "3.png"), "this is not a PNG");
    const lines = [0, 1, 2, 3, 4].map((i) => JSON.stringify({ images: [`${i}.png`], conversation: [QA[i % 3]] }));
    await Deno.writeTextFile(join(data, "train.jsonl"), lines.join("\n") + "\n");

    const log: string[] = [];
    const backbones = {
      vit_model_type: SIGLIP_REPO,
      lm_model_type: SMOLLM_REPO,
      lm_tokenizer: SMOLLM_REPO,
      vlm_load_backbone_weights: true,
      lm_base_vocab_size: 299,
      lm_vocab_size: 300,
    };
    const run = { ...SMALL_RUN, runs_dir: join(dir, "runs"), run_name: "jsonl", data: join(data, "train.jsonl") };
    const { result: summary, warnings } = await captureWarnings(() =>
      train({ ...run, push_to_hub: "me/shapes-vlm" }, backbones, { log: (l) => log.push(l) })
    );
    assertEquals(summary.steps, 2);
    assert(Number.isFinite(summary.finalLoss), `final loss ${summary.finalLoss}`);
    assert(log.includes(`backbones: ${SIGLIP_REPO} + ${SMOLLM_REPO} (pretrained, from the Hugging Face Hub cache)`));
    assert(log.includes(`data: ${join(data, "train.jsonl")}`), log.join("\n"));
    // The shapes came from the backbones' config.json files (the tiny preset's ViT is 96 wide, the fixture's 64).
    const cfg = JSON.parse(await Deno.readTextFile(join(dir, "runs", "jsonl", "config.json")));
    assertEquals([cfg.vit_hidden_dim, cfg.lm_hidden_dim, cfg.lm_vocab_size], [64, 64, 300]);
    // The corrupt image is skipped (in every epoch that reaches it), with a warning; training went on.
    assert(warnings.length >= 1 && warnings.every((w) => /skipping .*train\.jsonl:4: cannot decode image/.test(w)));
    assertMatch(
      log.find((l) => l.startsWith("eval step 2"))!,
      /data: \d+ rows, [1-9]\d* skipped \([1-9]\d* bad images\)/,
    );

    // Pushed: the best checkpoint's files and a model card saying how it was trained.
    const repo = hub.repo("model", "me/shapes-vlm")!;
    const best = await Deno.readFile(join(dir, "runs", "jsonl", "best", "model.safetensors"));
    assertEquals(repo.files.get("model.safetensors"), best);
    const card = new TextDecoder().decode(repo.files.get("README.md"));
    assertMatch(card, /- Initialised from: google\/siglip-base-patch16-224 \+ HuggingFaceTB\/SmolLM2-135M/);
    assertMatch(card, /- Optimizer steps: 2\n- Batch size: 2\n/);
    assert(log.includes(`pushed ${join(dir, "runs", "jsonl")}/best to ${hub.url}/me/shapes-vlm`));
  });
});

Deno.test("train --data cauldron:vqav2 streams the subset from the Hub; --push_to_hub without a token fails first", async () => {
  await withHubEnv(async (hub, dir) => {
    const log: string[] = [];
    const run = { ...SMALL_RUN, runs_dir: join(dir, "runs"), run_name: "cauldron", data: "cauldron:vqav2" };
    const summary = await train(run, {}, { log: (l) => log.push(l) });
    assertEquals(summary.steps, 2);
    assert(log.includes("data: HuggingFaceM4/the_cauldron vqav2 (1 shards, 0.00 GB)"), log.join("\n"));
    assert(
      log.includes(
        "vision pretraining skipped: it names the shapes world's quadrants, and this run trains on cauldron:vqav2",
      ),
    );
    const reads = hub.requests.filter((r) => r.server === "storage");
    assert(reads.length > 0 && reads.every((r) => r.range !== null), "every read of the shard is a range request");
    const weights = await readSafetensors(join(dir, "runs", "cauldron", "latest", "model.safetensors"));
    assert(weights.tensors.has("MP.proj.weight"));

    // Settings only the shapes world reads are errors with --data, not silently ignored; nothing is made.
    await assertRejects(
      () => train({ ...run, run_name: "prompt-loss", prompt_loss: "options" }, {}, { log: () => {} }),
      Error,
      "--prompt_loss=options: only the built-in shapes world reads this; drop it to train on --data=cauldron:vqav2",
    );
    await assertRejects(
      () => train({ ...run, run_name: "weights", caption_weight: 3, plain_scenes: true }, {}, { log: () => {} }),
      Error,
      "--caption_weight=3 --plain_scenes=true: only the built-in shapes world reads this",
    );
    await assertRejects(() => Deno.stat(join(dir, "runs", "weights")), Deno.errors.NotFound);
    Deno.env.delete("HF_TOKEN");
    const before = hub.requests.length;
    await assertRejects(
      () => train({ ...run, run_name: "no-token", push_to_hub: "me/x" }, {}, { log: () => {} }),
      Error,
      "--push_to_hub me/x needs a token with write access: set HF_TOKEN",
    );
    assertEquals(hub.requests.length, before);
    await assertRejects(() => Deno.stat(join(dir, "runs", "no-token")), Deno.errors.NotFound);
  });
});
