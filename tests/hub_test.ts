/**
 * Tests for hub.ts, offline: a fake Hub on 127.0.0.1 (tests/fake_hub.ts) serves the
 * nanovlm-tiny-a fixtures in the real Hub's URL layout. Covered: the environment
 * variables, a fresh download into the Python cache layout, resuming an interrupted
 * download, 404s, corrupt downloads, offline mode, an unreachable Hub, loading a nanoVLM
 * checkpoint with an unknown config key, backbones and a tokenizer by repo id, listing a
 * folder, and pushing a model (repo created, files committed, loadable again).
 * Run: deno test -A tests/hub_test.ts
 */
import { createHash } from "node:crypto";
import { join } from "node:path";
import { loadBackbones, modelFromBackbones } from "../lib/backbones.ts";
import {
  cachedFile,
  hfHome,
  hubCacheDir,
  hubDownload,
  hubEndpoint,
  HubNotFoundError,
  hubOffline,
  HubOfflineError,
  type HubOptions,
  hubSnapshot,
  hubToken,
  hubTokenizer,
  listCachedFiles,
  listRepoFiles,
  modelCard,
  progressBar,
  pushToHub,
} from "../lib/hub.ts";
import { fromPretrained } from "../lib/checkpoint.ts";
import { PRESETS, VisionLanguageModel } from "../nanovlm.ts";
import { initBackend } from "../backend/runtime.ts";
import { assert, assertEquals, assertMatch, assertRejects } from "./assert.ts";
import { addBackboneRepos, FakeHub, SIGLIP_REPO, SMOLLM_REPO, tempCache } from "./fake_hub.ts";
import { captureWarnings, FIXTURE_DIR, withEnv } from "./helpers.ts";

await initBackend("cpu", { quiet: true });

const read = (name: string) => Deno.readFileSync(`${FIXTURE_DIR}/${name}`);
const sha256 = (bytes: Uint8Array) => createHash("sha256").update(bytes).digest("hex");
const gitBlobId = (bytes: Uint8Array) =>
  createHash("sha1").update(`blob ${bytes.length}\0`).update(bytes).digest("hex");

const NANOVLM_REPO = "lusxvr/nanoVLM-450M";

/** The fixture checkpoint, with the key that breaks the reference's loader on lusxvr/nanoVLM-450M. */
function nanoVLMRepoFiles(): Record<string, Uint8Array | string> {
  const config = JSON.parse(new TextDecoder().decode(read("config.json")));
  return {
    "config.json": JSON.stringify({ ...config, lm_eos_token_id: 0 }, null, 4),
    "model.safetensors": read("model.safetensors"),
  };
}

/** A fake Hub with the three fixture repos and a fresh cache; `fn` gets both and the options that point at them. */
async function withHub(fn: (hub: FakeHub, options: HubOptions & { cacheDir: string }) => Promise<void>): Promise<void> {
  const hub = await FakeHub.start();
  const cache = await tempCache();
  try {
    hub.addRepo("model", NANOVLM_REPO, nanoVLMRepoFiles());
    await addBackboneRepos(hub);
    await fn(hub, { endpoint: hub.url, cacheDir: cache.dir, offline: false, token: undefined, onProgress: () => {} });
  } finally {
    await hub.close();
    await cache.cleanup();
  }
}

async function assertSameWeights(a: VisionLanguageModel, b: VisionLanguageModel): Promise<void> {
  assertEquals([...a.params.keys()].sort(), [...b.params.keys()].sort());
  for (const [name, value] of a.params) {
    const x = await value.data(), y = await b.params.get(name)!.data();
    assert(x.every((v, i) => v === y[i]), `${name} differs`);
  }
}

Deno.test("settings come from HF_HOME, XDG_CACHE_HOME, HF_HUB_CACHE, HF_ENDPOINT, HF_HUB_OFFLINE, HF_TOKEN", async () => {
  const unset = {
    HF_HOME: undefined,
    XDG_CACHE_HOME: undefined,
    HF_HUB_CACHE: undefined,
    HF_ENDPOINT: undefined,
    HF_HUB_OFFLINE: undefined,
    HF_TOKEN: undefined,
  };
  const home = await Deno.makeTempDir();
  try {
    await withEnv({ ...unset, HOME: home }, () => {
      assertEquals(hfHome(), `${home}/.cache/huggingface`);
      assertEquals(hubCacheDir(), `${home}/.cache/huggingface/hub`);
      assertEquals(hubEndpoint(), "https://huggingface.co");
      assertEquals(hubOffline(), false);
      assertEquals(hubToken(), undefined);
    });
    await withEnv({ ...unset, HOME: home, XDG_CACHE_HOME: "/xdg" }, () => assertEquals(hfHome(), "/xdg/huggingface"));
    await withEnv({ ...unset, HOME: home, XDG_CACHE_HOME: "/xdg", HF_HOME: "~/hf" }, () => {
      assertEquals(hfHome(), `${home}/hf`);
      assertEquals(hubCacheDir(), `${home}/hf/hub`);
    });
    await withEnv({ ...unset, HF_HOME: "/a", HF_HUB_CACHE: "/b/cache" }, () => assertEquals(hubCacheDir(), "/b/cache"));
    await withEnv({ ...unset, HF_ENDPOINT: "https://hf-mirror.com/" }, () => {
      assertEquals(hubEndpoint(), "https://hf-mirror.com");
    });
    for (const [value, expected] of [["1", true], ["ON", true], ["yes", true], ["0", false], ["", false]] as const) {
      await withEnv({ HF_HUB_OFFLINE: value }, () => assertEquals(hubOffline(), expected, `HF_HUB_OFFLINE=${value}`));
    }
    // The token: HF_TOKEN first, else the file `huggingface-cli login` writes.
    await Deno.writeTextFile(`${home}/token`, "hf_from_file\n");
    await withEnv({ ...unset, HF_HOME: home }, () => assertEquals(hubToken(), "hf_from_file"));
    await withEnv({ ...unset, HF_HOME: home, HF_TOKEN: "hf_from_env" }, () => assertEquals(hubToken(), "hf_from_env"));
  } finally {
    await Deno.remove(home, { recursive: true });
  }
});

Deno.test("a fresh download lands in the Python cache layout, checked, with the token kept on the Hub", async () => {
  await withHub(async (hub, options) => {
    const commit = hub.repo("model", SMOLLM_REPO)!.commit;
    const progress: number[][] = [];
    const opts = {
      ...options,
      token: "hf_secret",
      onProgress: (done: number, total: number) => progress.push([done, total]),
    };
    const path = await hubDownload(SMOLLM_REPO, "model.safetensors", opts);
    const weights = read("hf_lm.safetensors");
    const repoDir = join(options.cacheDir, "models--HuggingFaceTB--SmolLM2-135M");
    assertEquals(path, join(repoDir, "snapshots", commit, "model.safetensors"));
    assertEquals(await Deno.readFile(path), weights);
    // One copy per content: the snapshot entry is a relative symlink to the blob named by its sha256.
    assertEquals(await Deno.readLink(path), `../../blobs/${sha256(weights)}`);
    assertEquals((await Deno.readTextFile(join(repoDir, "refs", "main"))).trim(), commit);
    assertEquals(progress.at(-1), [weights.length, weights.length]);
    // Small files are stored under their git blob id.
    const config = await hubDownload(SMOLLM_REPO, "config.json", opts);
    assertEquals(await Deno.readLink(config), `../../blobs/${gitBlobId(read("hf_lm_config.json"))}`);

    // HEAD on the Hub with the token; the bytes from the storage server, without it.
    const seen = hub.requests.map((r) => `${r.server} ${r.method} ${r.path} ${r.authorization ?? "-"}`);
    assertEquals(seen, [
      `hub HEAD /${SMOLLM_REPO}/resolve/main/model.safetensors Bearer hf_secret`,
      `storage GET /lfs/${sha256(weights)} -`,
      `hub HEAD /${SMOLLM_REPO}/resolve/main/config.json Bearer hf_secret`,
      `hub GET /${SMOLLM_REPO}/resolve/main/config.json Bearer hf_secret`,
    ]);

    // Asked again: one HEAD to learn that main has not moved, no download.
    hub.requests.length = 0;
    assertEquals(await hubDownload(SMOLLM_REPO, "model.safetensors", opts), path);
    assertEquals(hub.requests.map((r) => r.method), ["HEAD"]);
    // By commit hash: no request at all.
    hub.requests.length = 0;
    assertEquals(await hubDownload(SMOLLM_REPO, "model.safetensors", { ...opts, revision: commit }), path);
    assertEquals(hub.requests.length, 0);
  });
});

Deno.test("an interrupted download resumes with an HTTP Range request", async (t) => {
  await withHub(async (hub, options) => {
    const weights = read("hf_vit.safetensors");
    await t.step("within one call: the retry asks for the rest only", async () => {
      hub.breakAfter.set("model.safetensors", 100_000);
      const { result: path, warnings } = await captureWarnings(() =>
        hubDownload(SIGLIP_REPO, "model.safetensors", options)
      );
      assertEquals(await Deno.readFile(path), weights);
      const gets = hub.requests.filter((r) => r.server === "storage");
      assertEquals(gets.map((r) => r.range), [null, "bytes=100000-"]);
      assertEquals(warnings.length, 1);
      assertMatch(warnings[0], /broke off after 100000 of 458848 bytes.*resuming/);
    });

    await t.step("across calls: the .incomplete file is kept and the next call continues it", async () => {
      const cache = await tempCache();
      try {
        const opts = { ...options, cacheDir: cache.dir, retries: 0 };
        hub.requests.length = 0;
        hub.breakAfter.set("model.safetensors", 200_000);
        await assertRejects(() => hubDownload(SIGLIP_REPO, "model.safetensors", opts), TypeError, "broke off");
        const partial = join(
          cache.dir,
          "models--google--siglip-base-patch16-224",
          "blobs",
          `${sha256(weights)}.incomplete`,
        );
        assertEquals((await Deno.stat(partial)).size, 200_000);
        const path = await hubDownload(SIGLIP_REPO, "model.safetensors", opts);
        assertEquals(await Deno.readFile(path), weights);
        assertEquals(hub.requests.filter((r) => r.server === "storage").map((r) => r.range), [null, "bytes=200000-"]);
        await assertRejects(() => Deno.stat(partial), Deno.errors.NotFound);
      } finally {
        await cache.cleanup();
      }
    });
  });
});

Deno.test("a missing repo, file or revision is an error that names them", async () => {
  await withHub(async (_hub, options) => {
    await assertRejects(
      () => hubDownload(SMOLLM_REPO, "pytorch_model.bin", options),
      HubNotFoundError,
      `cannot download pytorch_model.bin from model ${SMOLLM_REPO} (revision main): not found (HTTP 404 EntryNotFound`,
    );
    await assertRejects(
      () => hubDownload("nobody/no-such-model", "config.json", options),
      HubNotFoundError,
      "cannot download config.json from model nobody/no-such-model (revision main): repository nobody/no-such-model not found",
    );
    await assertRejects(
      () => hubDownload(SMOLLM_REPO, "config.json", { ...options, revision: "v9" }),
      HubNotFoundError,
      "RevisionNotFound",
    );
    await assertRejects(
      () => hubDownload("not a repo", "config.json", options),
      Error,
      "is not a Hugging Face repo id",
    );
    // A path-like name that is neither a folder nor a repo says both.
    await assertRejects(() => fromPretrained("checkpoints/missing-run", options), HubNotFoundError, "no local folder");
  });
});

Deno.test("a corrupt download (wrong size or hash) is detected and deleted", async () => {
  await withHub(async (hub, options) => {
    const blobs = join(options.cacheDir, "models--HuggingFaceTB--SmolLM2-135M", "blobs");
    const cases = [
      ["model.safetensors", "size", "its size is 423919 bytes, the Hub announced 423920"],
      ["model.safetensors", "hash", `its sha256 is`],
      ["config.json", "hash", "its git-sha1 is"],
    ] as const;
    for (const [file, fault, message] of cases) {
      hub.corrupt.set(file, fault);
      await assertRejects(() => hubDownload(SMOLLM_REPO, file, options), Error, message);
      const left = [...Deno.readDirSync(blobs)].map((e) => e.name);
      assertEquals(left, [], `${file} (${fault}): nothing may stay in the cache`);
      hub.corrupt.delete(file);
    }
    // Once the Hub serves the right bytes, the download succeeds.
    const path = await hubDownload(SMOLLM_REPO, "model.safetensors", options);
    assertEquals(await Deno.readFile(path), read("hf_lm.safetensors"));
  });
});

Deno.test("offline mode: the cache only, and a list of what is missing with the command to get it", async () => {
  await withHub(async (hub, options) => {
    const offline = { ...options, offline: true };
    // Nothing cached: every missing file of both backbones is named at once.
    const error = await loadBackbones({ vit_model_type: SIGLIP_REPO, lm_model_type: SMOLLM_REPO }, offline)
      .then(() => null, (e) => e);
    assert(error instanceof HubOfflineError, `expected a HubOfflineError, got ${error}`);
    assertEquals(error.missing.map((m) => `${m.repoId}/${m.filename}`), [
      `${SIGLIP_REPO}/config.json`,
      `${SIGLIP_REPO}/model.safetensors`,
      `${SMOLLM_REPO}/config.json`,
      `${SMOLLM_REPO}/model.safetensors`,
    ]);
    assertMatch(error.message, /HF_HUB_OFFLINE is set and 4 file\(s\) are not in the cache/);
    assertMatch(error.message, /deno task hub download google\/siglip-base-patch16-224 config.json model.safetensors/);
    assertEquals(hub.requests.length, 0);

    // Cached: no request at all, the same path as online.
    const online = await hubSnapshot(SMOLLM_REPO, ["config.json", "model.safetensors"], options);
    hub.requests.length = 0;
    const path = await hubDownload(SMOLLM_REPO, "model.safetensors", offline);
    assertEquals(path, join(online, "model.safetensors"));
    assertEquals(await cachedFile(SMOLLM_REPO, "model.safetensors", options), path);
    // HF_HUB_OFFLINE=1 in the environment does the same.
    await withEnv({ HF_HUB_OFFLINE: "1" }, async () => {
      const { offline: _, ...fromEnv } = options;
      assertEquals(await hubDownload(SMOLLM_REPO, "config.json", fromEnv), join(online, "config.json"));
      await assertRejects(() => hubDownload(SMOLLM_REPO, "tokenizer.json", fromEnv), HubOfflineError, "tokenizer.json");
    });
    assertEquals(hub.requests.length, 0);
    // A partly cached dataset folder lists what is there.
    assertEquals(await listCachedFiles(SMOLLM_REPO, "", options), ["config.json", "model.safetensors"]);
  });
});

Deno.test("an unreachable Hub falls back to the cache, or says what to do", async () => {
  await withHub(async (_hub, options) => {
    const path = await hubDownload(SMOLLM_REPO, "config.json", options);
    const closed = Deno.listen({ hostname: "127.0.0.1", port: 0 });
    const deadEndpoint = `http://127.0.0.1:${closed.addr.port}`;
    closed.close(); // nothing listens there any more: connections are refused
    const dead = { ...options, endpoint: deadEndpoint };
    const { result, warnings } = await captureWarnings(() => hubDownload(SMOLLM_REPO, "config.json", dead));
    assertEquals(result, path);
    assertMatch(warnings.join("\n"), /is unreachable .*using the cached HuggingFaceTB\/SmolLM2-135M\/config.json/);
    await assertRejects(() => hubDownload(SMOLLM_REPO, "tokenizer.json", dead), Error, "HF_HUB_OFFLINE=1");
  });
});

Deno.test("loadPretrained: a nanoVLM repo with an unknown config key warns and loads", async () => {
  await withHub(async (hub, options) => {
    const { result: model, warnings } = await captureWarnings(() => fromPretrained(NANOVLM_REPO, options));
    assertEquals(warnings, ['config: ignoring unknown key "lm_eos_token_id"']);
    const local = await fromPretrained(FIXTURE_DIR);
    await assertSameWeights(model, local);
    assertEquals(model.cfg, local.cfg);
    // The model class itself takes a repo id too, and goes through the same cache.
    const byRepoId = await fromPretrained(NANOVLM_REPO, options);
    await assertSameWeights(byRepoId, local);
    byRepoId.dispose();
    // A local folder is loaded as is, without the Hub.
    hub.requests.length = 0;
    const again = await fromPretrained(FIXTURE_DIR, options);
    assertEquals(hub.requests.length, 0);
    for (const m of [model, local, again]) m.dispose();
  });
});

Deno.test("loadBackbones + hubTokenizer: SigLIP and SmolLM2 by repo id, <|image|> appended", async () => {
  await withHub(async (_hub, options) => {
    const fixtureCfg = await fromPretrained(FIXTURE_DIR);
    const cfg = { ...fixtureCfg.cfg, vit_model_type: SIGLIP_REPO, lm_model_type: SMOLLM_REPO };
    const backbones = await loadBackbones(cfg, options);
    assertEquals((backbones.vision!.config.vision_config as Record<string, number>).hidden_size, 64);
    const model = modelFromBackbones(cfg, backbones);
    for (const name of ["vision_encoder.blocks.1.attn.qkv_proj.weight", "decoder.blocks.0.mlp.up_proj.weight"]) {
      const x = await model.params.get(name)!.data(), y = await fixtureCfg.params.get(name)!.data();
      assert(x.every((v, i) => v === y[i]), `${name} differs from the fixture checkpoint`);
    }
    model.dispose();
    fixtureCfg.dispose();
    // "none" skips a backbone (the tiny preset trains from scratch).
    assertEquals(await loadBackbones(PRESETS.tiny, options), { vision: undefined, language: undefined });

    const tokenizer = await hubTokenizer(SMOLLM_REPO, options);
    const shapes = await hubTokenizer(new URL("../tokenizers/shapes", import.meta.url).pathname, options);
    assertEquals(tokenizer.imageTokenId, tokenizer.baseVocabSize);
    assertEquals(tokenizer.imageTokenId, shapes.imageTokenId);
    assertEquals(
      tokenizer.encode("<|image|>What color is the circle?"),
      shapes.encode("<|image|>What color is the circle?"),
    );
  });
});

Deno.test("listRepoFiles follows the tree API's pages", async () => {
  await withHub(async (hub, options) => {
    const files: Record<string, Uint8Array> = {};
    for (let i = 0; i < 5; i++) files[`vqav2/train-0000${i}-of-00005.parquet`] = new Uint8Array(10 + i);
    files["ai2d/train-00000-of-00001.parquet"] = new Uint8Array(1);
    hub.addRepo("dataset", "HuggingFaceM4/the_cauldron", files);
    hub.pageSize = 2;
    const listed = await listRepoFiles("HuggingFaceM4/the_cauldron", "vqav2", { ...options, repoType: "dataset" });
    assertEquals(listed.map((f) => f.path), Object.keys(files).slice(0, 5));
    assertEquals(listed.map((f) => f.size), [10, 11, 12, 13, 14]);
    assertEquals(hub.requests.filter((r) => r.path.includes("/tree/")).length, 3);
    await assertRejects(
      () => listRepoFiles("HuggingFaceM4/the_cauldron", "nope", { ...options, repoType: "dataset" }),
      HubNotFoundError,
      "cannot list nope of dataset HuggingFaceM4/the_cauldron",
    );
  });
});

Deno.test("pushToHub creates the repo and commits config.json, model.safetensors and a model card", async () => {
  await withHub(async (hub, options) => {
    const model = await fromPretrained(FIXTURE_DIR);
    const pushLog: string[] = [];
    const push = { endpoint: hub.url, token: hub.writeToken, log: (line: string) => pushLog.push(line) };
    await assertRejects(
      () => pushToHub(FIXTURE_DIR, "me/tiny-vlm", { ...push, token: undefined }),
      Error,
      "set HF_TOKEN",
    );
    assertEquals(hub.requests.length, 0);

    const summary = { data: "the shapes world", steps: 600, finalLoss: 0.1234, hardware: "2-core CPU (WASM)" };
    const { url, commit } = await pushToHub(FIXTURE_DIR, "me/tiny-vlm", { ...push, trainingSummary: summary });
    assertEquals(url, `${hub.url}/me/tiny-vlm`);
    assertEquals(pushLog, [
      `hub: created ${hub.url}/me/tiny-vlm`,
      "hub: uploading config.json, model.safetensors (946.8 kB), README.md",
      `hub: pushed to ${hub.url}/me/tiny-vlm`,
    ]);
    const repo = hub.repo("model", "me/tiny-vlm")!;
    assertEquals(commit, repo.commit);
    assertEquals([...repo.files.keys()].sort(), [".gitattributes", "README.md", "config.json", "model.safetensors"]);
    // The weights went through LFS (batch + PUT to storage), the small files inline in the commit.
    const calls = hub.requests.filter((r) => r.method !== "HEAD").map((r) => `${r.server} ${r.method} ${r.path}`);
    assertEquals(calls, [
      "hub POST /api/repos/create",
      "hub POST /api/models/me/tiny-vlm/preupload/main",
      "hub POST /me/tiny-vlm.git/info/lfs/objects/batch",
      `storage PUT /upload/${sha256(repo.files.get("model.safetensors")!)}`,
      "hub POST /api/models/me/tiny-vlm/commit/main",
    ]);
    const card = new TextDecoder().decode(repo.files.get("README.md"));
    assertMatch(card, /^---\nlibrary_name: nanovlm\nlicense: mit\npipeline_tag: image-text-to-text\n/);
    assertMatch(card, /fromPretrained\("me\/tiny-vlm"\)/);
    assertMatch(card, /VisionLanguageModel\.from_pretrained\("me\/tiny-vlm"\)/);
    assertMatch(card, /- Final training loss: 0\.1234/);
    assertMatch(card, new RegExp(`${model.parameterCount().toLocaleString("en-US")} parameters`));

    // What was pushed loads back identically.
    const back = await fromPretrained("me/tiny-vlm", options);
    await assertSameWeights(back, model);
    back.dispose();

    // Pushing again into the existing repo (409 on create) makes a second commit.
    const second = await pushToHub(FIXTURE_DIR, "me/tiny-vlm", push);
    assertEquals(repo.history.length, 3);
    assertEquals(second.commit, repo.commit);
    assertMatch(new TextDecoder().decode(repo.files.get("README.md")), /No training details were recorded/);
    model.dispose();
  });
});

Deno.test("modelCard and progressBar say what a user needs to see", () => {
  const card = modelCard("me/x", PRESETS["nanovlm-222m"], 222_082_176, { init: "SigLIP + SmolLM2" });
  assertMatch(card, /222,082,176 parameters/);
  assertMatch(card, /google\/siglip-base-patch16-224/);
  assertMatch(card, /- Initialised from: SigLIP \+ SmolLM2/);

  const lines: string[] = [];
  const bar = progressBar("owner/repo/model.safetensors", 50e6, { write: (s) => lines.push(s), tty: false });
  bar(0, 50e6);
  bar(25e6, 50e6); // within 10 s of the last line: not printed in a log
  bar(50e6, 50e6);
  assertEquals(lines.length, 2);
  assertMatch(lines[0], /^owner\/repo\/model.safetensors {2}\[\.{20}\] {3}0% 0 B \/ 50\.0 MB/);
  assertMatch(lines[1], /\[#{20}\] 100% 50\.0 MB \/ 50\.0 MB {2}[\d.]+ [kMGT]?B\/s {2}in \d+s\n$/);
  const silent: string[] = [];
  progressBar("small.json", 1000, { write: (s) => silent.push(s) })(1000, 1000);
  assertEquals(silent, []);
});

Deno.test("deno task hub download: HF_ENDPOINT and HF_HOME from the environment, errors without a stack", async () => {
  await withHub(async (hub, options) => {
    const home = options.cacheDir; // an empty folder for HF_HOME
    const run = async (args: string[], env: Record<string, string>) => {
      const command = new Deno.Command(Deno.execPath(), {
        args: ["run", "-A", new URL("../lib/hub.ts", import.meta.url).pathname, ...args],
        env: { HF_ENDPOINT: hub.url, HF_HOME: home, HF_HUB_DISABLE_PROGRESS_BARS: "1", ...env },
        stdout: "piped",
        stderr: "piped",
      });
      const { code, stdout, stderr } = await command.output();
      return { code, stdout: new TextDecoder().decode(stdout), stderr: new TextDecoder().decode(stderr) };
    };
    const commit = hub.repo("model", SMOLLM_REPO)!.commit;
    const ok = await run(["download", SMOLLM_REPO, "config.json", "tokenizer.json"], {});
    assertEquals(ok.code, 0, ok.stderr);
    const snapshot = join(home, "hub", "models--HuggingFaceTB--SmolLM2-135M", "snapshots", commit);
    assertEquals(ok.stdout, `${snapshot}/config.json\n${snapshot}/tokenizer.json\n`);
    const offline = await run(["download", SMOLLM_REPO, "config.json", "model.safetensors"], { HF_HUB_OFFLINE: "1" });
    assertEquals(offline.code, 1);
    assertMatch(offline.stderr, /^error: HF_HUB_OFFLINE is set and 1 file\(s\) are not in the cache/);
    assertMatch(offline.stderr, /deno task hub download HuggingFaceTB\/SmolLM2-135M model.safetensors\n/);
    assert(!offline.stderr.includes("    at "), "no stack trace for a user error");
  });
});
