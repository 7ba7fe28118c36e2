// lib/hub.ts — the Hugging Face Hub: download into the Python client's cache, load tokenizers
// by repo id, and push a trained model (lib/checkpoint.ts and lib/backbones.ts load models through it).
//
// What this is: the few Hub calls nanoVLM makes (`hf_hub_download`, `create_repo`,
// `upload_folder`), written so that a reader can follow every request:
//   1. Settings from the environment, read as huggingface_hub reads them: HF_HOME,
//      HF_HUB_CACHE, HF_ENDPOINT (a mirror), HF_HUB_OFFLINE, HF_TOKEN.
//   2. The cache layout shared with Python: a file downloaded here is found by
//      transformers, and the other way round.
//   3. Download: HEAD for the commit, blob id and size, then GET with HTTP Range into a
//      `.incomplete` file (resumed after an interruption), then a size and hash check.
//   4. Tokenizers: `hubTokenizer(name)` (models: lib/checkpoint.ts `fromPretrained`, lib/backbones.ts).
//   5. Listing a folder of a repo (the Cauldron's parquet shards).
//   6. Push: create the repo, upload config.json, model.safetensors and a model card.
//
// What this is not: a complete Hub client. Uploads go through `npm:@huggingface/hub`
// (its commit API speaks LFS and Xet); downloads use plain fetch, because resuming needs
// control over every request. Sharded checkpoints (`model.safetensors.index.json`) are
// not handled: none of the backbones nanoVLM uses has one.
//
// Run `deno task hub download <repo> <file>...` to fill the cache ahead of an offline
// run, or `deno task hub push <dir> <owner/repo>`.

import { createRepo, HubApiError, uploadFiles } from "@huggingface/hub";
import { createHash } from "node:crypto";
import { dirname, join, relative } from "node:path";
import { parseArgs } from "node:util";
import { type ChatTokenizer, loadTokenizer } from "../data.ts";
import type { VLMConfig } from "../nanovlm.ts";
import { type TrainConfig, visionLearningRate } from "./train_config.ts";
import { fileExists, isDirectory } from "./files.ts";
import { runMain, snakeCaseFlags } from "./cli.ts";

// ---- 1. Settings from the environment ---------------------------------------------------

const env = (name: string): string | undefined => Deno.env.get(name) || undefined;

/** `HF_HOME`, else `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface` (as huggingface_hub). */
export function hfHome(): string {
  const home = env("HF_HOME");
  if (home) return expandHome(home);
  const xdg = env("XDG_CACHE_HOME");
  return xdg ? join(expandHome(xdg), "huggingface") : join(homeDir(), ".cache", "huggingface");
}

/** Where downloaded repos live: `HF_HUB_CACHE`, else `hfHome()/hub`. */
export function hubCacheDir(): string {
  const cache = env("HF_HUB_CACHE");
  return cache ? expandHome(cache) : join(hfHome(), "hub");
}

/** The Hub's address: `HF_ENDPOINT` (e.g. a mirror), else https://huggingface.co. */
export function hubEndpoint(): string {
  return (env("HF_ENDPOINT") ?? "https://huggingface.co").replace(/\/+$/, "");
}

/** `HF_HUB_OFFLINE=1` (or true/yes/on): never touch the network, use the cache only. */
export function hubOffline(): boolean {
  return ["1", "true", "yes", "on"].includes((env("HF_HUB_OFFLINE") ?? "").toLowerCase());
}

/** The access token: `HF_TOKEN`, else the file `huggingface-cli login` writes (`hfHome()/token`). */
export function hubToken(): string | undefined {
  const token = env("HF_TOKEN");
  if (token) return token;
  try {
    return Deno.readTextFileSync(join(hfHome(), "token")).trim() || undefined;
  } catch {
    return undefined;
  }
}

function homeDir(): string {
  const home = env("HOME") ?? env("USERPROFILE");
  if (!home) throw new Error("cannot find the home directory: set HF_HOME");
  return home;
}

function expandHome(path: string): string {
  return path === "~" || path.startsWith("~/") ? homeDir() + path.slice(1) : path;
}

/** "model" repos live at `{endpoint}/{id}`, "dataset" repos at `{endpoint}/datasets/{id}`. */
export type RepoType = "model" | "dataset";

/** Options shared by every Hub call; each defaults to the environment's setting. */
export interface HubOptions {
  /** Branch, tag or commit hash (default "main"). */
  revision?: string;
  repoType?: RepoType;
  /** Default `hubToken()`; sent only to the endpoint, never to the storage it redirects to. */
  token?: string;
  /** Default `hubEndpoint()`. */
  endpoint?: string;
  /** Default `hubCacheDir()`. */
  cacheDir?: string;
  /** Default `hubOffline()`. */
  offline?: boolean;
  /** Called as bytes arrive; default: a progress bar on stderr for files over 10 MB. */
  onProgress?: (done: number, total: number) => void;
  /** Extra attempts when a download breaks off; each resumes where the last one stopped (default 5). */
  retries?: number;
}

type Settings = Required<Omit<HubOptions, "token" | "onProgress">> & Pick<HubOptions, "token" | "onProgress">;

function settings(options: HubOptions): Settings {
  return {
    revision: options.revision ?? "main",
    repoType: options.repoType ?? "model",
    token: "token" in options ? options.token : hubToken(),
    endpoint: (options.endpoint ?? hubEndpoint()).replace(/\/+$/, ""),
    cacheDir: options.cacheDir ?? hubCacheDir(),
    offline: options.offline ?? hubOffline(),
    onProgress: options.onProgress,
    retries: options.retries ?? 5,
  };
}

// ---- 2. URLs and the cache layout -------------------------------------------------------
//
// The Python client's cache, one folder per repo:
//   {cache}/models--owner--name/
//     refs/main                      the commit hash "main" pointed to when last asked
//     blobs/<etag>                   file contents, named by their git blob id (small
//                                    files) or sha256 (LFS files): one copy per content
//     snapshots/<commit>/<filename>  a relative symlink to ../../blobs/<etag>
// Datasets use `datasets--owner--name`. Partial downloads are `blobs/<etag>.incomplete`
// and a download holds the lock `{cache}/.locks/models--owner--name/<etag>.lock`.

const REPO_ID = /^([\w.-]+\/)?[\w.-]+$/;
const COMMIT_HASH = /^[0-9a-f]{40}$/;

/** Whether `name` has the form of a Hub repo id with its owner ("owner/name"). */
export function isRepoId(name: string): boolean {
  return name.includes("/") && REPO_ID.test(name) && !name.includes("..");
}

function checkRepoId(repoId: string): void {
  if (!REPO_ID.test(repoId) || repoId.includes("..")) {
    throw new Error(`"${repoId}" is not a Hugging Face repo id: expected "owner/name" (letters, digits, - _ .)`);
  }
}

/** `{endpoint}/{repo}/resolve/{revision}/{filename}` (datasets: `{endpoint}/datasets/{repo}/resolve/...`). */
export function hubFileUrl(repoId: string, filename: string, options: HubOptions = {}): string {
  const { endpoint, revision, repoType } = settings(options);
  const prefix = repoType === "dataset" ? "datasets/" : "";
  const path = filename.split("/").map(encodeURIComponent).join("/");
  return `${endpoint}/${prefix}${repoId}/resolve/${encodeURIComponent(revision)}/${path}`;
}

/** The cache folder of a repo: `{cache}/models--owner--name` (or `datasets--…`). */
export function repoCacheDir(repoId: string, options: HubOptions = {}): string {
  checkRepoId(repoId);
  const { cacheDir, repoType } = settings(options);
  return join(cacheDir, `${repoType}s--${repoId.replaceAll("/", "--")}`);
}

/** The cached copy of a file at `revision` (a branch resolved through refs/, or a commit), if there is one. */
export async function cachedFile(repoId: string, filename: string, options: HubOptions = {}): Promise<string | null> {
  const dir = repoCacheDir(repoId, options);
  const commit = await resolveCachedRevision(dir, settings(options).revision);
  if (!commit) return null;
  const path = join(dir, "snapshots", commit, filename);
  return (await fileExists(path)) ? path : null;
}

async function resolveCachedRevision(repoDir: string, revision: string): Promise<string | null> {
  if (COMMIT_HASH.test(revision)) return revision;
  try {
    return (await Deno.readTextFile(join(repoDir, "refs", revision))).trim();
  } catch {
    return null;
  }
}

async function fileSize(path: string): Promise<number> {
  try {
    return (await Deno.stat(path)).size;
  } catch {
    return 0;
  }
}

// ---- 3. Download ----------------------------------------------------------------------

/** A file that `HF_HUB_OFFLINE=1` needed but the cache does not hold. */
export interface MissingFile {
  repoId: string;
  filename: string;
  revision: string;
  repoType: RepoType;
}

/** Thrown in offline mode when files are not cached; the message lists them and how to get them. */
export class HubOfflineError extends Error {
  constructor(readonly missing: MissingFile[], cacheDir: string) {
    const byRepo = Map.groupBy(missing, (m) => `${m.repoType} ${m.repoId} ${m.revision}`);
    const lines = [...byRepo.values()].map((files) => {
      const { repoId, repoType, revision } = files[0];
      const names = files.map((f) => f.filename);
      const flags = (repoType === "dataset" ? " --repo_type dataset" : "") +
        (revision === "main" ? "" : ` --revision ${revision}`);
      return `  ${repoId}${revision === "main" ? "" : `@${revision}`}: ${names.join(", ")}\n` +
        `    get them with: deno task hub download${flags} ${repoId} ${names.join(" ")}`;
    });
    super(
      `HF_HUB_OFFLINE is set and ${missing.length} file(s) are not in the cache ${cacheDir}:\n${lines.join("\n")}\n` +
        `Run those commands where the Hub is reachable (same HF_HOME), or unset HF_HUB_OFFLINE.`,
    );
    this.name = "HubOfflineError";
  }
}

/** The Hub has no such repo, revision or file (HTTP 404, or 401 for a repo that is missing or private). */
export class HubNotFoundError extends Error {
  override name = "HubNotFoundError";
}

/** What a HEAD request on a resolve URL tells us about a file. */
interface FileMetadata {
  commit: string; // X-Repo-Commit: the commit the revision points to
  etag: string; // X-Linked-Etag (LFS: the sha256) or ETag (small files: the git blob id)
  size: number; // X-Linked-Size or Content-Length
  location: string; // where the bytes are: the storage URL a LFS file redirects to, or the resolve URL
}

const userAgent = () => `nanovlm.ts; deno/${Deno.version.deno}`;

/**
 * fetch, following redirects by hand so that the token goes to the Hub only: LFS files
 * redirect to a storage server (S3, CloudFront, Xet) whose signed URL needs no token and
 * may reject a request that carries one. `followExternal: false` stops at a redirect to
 * another host and returns it (HEAD wants the Hub's own headers, as huggingface_hub does).
 */
async function hubFetch(
  url: string,
  init: { method?: string; headers?: Record<string, string> },
  { token, endpoint }: { token?: string; endpoint: string },
  { followExternal = true } = {},
): Promise<Response> {
  const origin = new URL(endpoint).origin;
  for (let hop = 0; hop < 10; hop++) {
    const headers: Record<string, string> = { "User-Agent": userAgent(), ...init.headers };
    if (token && new URL(url).origin === origin) headers.Authorization = `Bearer ${token}`;
    const res = await fetch(url, { method: init.method ?? "GET", headers, redirect: "manual" });
    const location = res.headers.get("Location");
    if (res.status < 300 || res.status >= 400 || !location) return res;
    const next = new URL(location, url).href;
    if (!followExternal && new URL(next).origin !== new URL(url).origin) return res;
    await res.body?.cancel();
    url = next;
  }
  throw new Error(`too many redirects from ${url}`);
}

/** Strip the weak-validator prefix and the quotes of an ETag header. */
function normalizeEtag(etag: string | null): string | null {
  return etag ? etag.replace(/^W\//, "").replaceAll('"', "") : null;
}

/** An Error for a failed Hub request that names the repo and file and says what to do. */
async function requestError(res: Response, what: string, repoId: string): Promise<Error> {
  const code = res.headers.get("X-Error-Code");
  const detail = res.headers.get("X-Error-Message") ?? (await res.text().catch(() => "")).slice(0, 200);
  await res.body?.cancel().catch(() => {});
  const status = `HTTP ${res.status}${code ? ` ${code}` : ""}${detail ? `: ${detail}` : ""}`;
  if (code === "RepoNotFound" || (res.status === 401 && code !== "GatedRepo")) {
    return new HubNotFoundError(
      `${what}: repository ${repoId} not found (${status}). Check the name; if it is private, set HF_TOKEN.`,
    );
  }
  if (res.status === 404) return new HubNotFoundError(`${what}: not found (${status})`);
  if (code === "GatedRepo" || res.status === 403) {
    return new Error(`${what}: access denied (${status}). Accept the repo's conditions on its page and set HF_TOKEN.`);
  }
  return new Error(`${what}: ${status}`);
}

async function fileMetadata(url: string, repoId: string, filename: string, s: Settings): Promise<FileMetadata> {
  // identity: the sizes must be those of the bytes on disk, not of a compressed transfer.
  const res = await hubFetch(url, { method: "HEAD", headers: { "Accept-Encoding": "identity" } }, s, {
    followExternal: false,
  });
  const what = `cannot download ${filename} from ${s.repoType} ${repoId} (revision ${s.revision})`;
  if (res.status >= 400) throw await requestError(res, what, repoId);
  const commit = res.headers.get("X-Repo-Commit");
  const etag = normalizeEtag(res.headers.get("X-Linked-Etag") ?? res.headers.get("ETag"));
  const size = Number(res.headers.get("X-Linked-Size") ?? res.headers.get("Content-Length"));
  if (!commit || !etag || !Number.isFinite(size)) {
    throw new Error(`${what}: ${url} did not answer with X-Repo-Commit, ETag and a size; is ${s.endpoint} a Hub?`);
  }
  const location = res.headers.get("Location");
  return { commit, etag, size, location: location ? new URL(location, url).href : url };
}

/**
 * Download one file of a repo into the cache (or find it there) and return its local
 * path, `{cache}/…/snapshots/<commit>/<filename>`, as `hf_hub_download` does.
 *
 * A commit-hash revision already in the cache costs no request; a branch costs one HEAD.
 * An interrupted download is resumed (automatically `retries` times, and by the next call),
 * and the result is checked against the size and hash the Hub announced. When the Hub
 * cannot be reached but the cache has the file, the cached copy is used with a warning.
 */
export async function hubDownload(repoId: string, filename: string, options: HubOptions = {}): Promise<string> {
  const s = settings(options);
  const repoDir = repoCacheDir(repoId, s);
  const missing = () =>
    new HubOfflineError([{ repoId, filename, revision: s.revision, repoType: s.repoType }], s.cacheDir);
  if (s.offline || COMMIT_HASH.test(s.revision)) {
    const cached = await cachedFile(repoId, filename, s);
    if (cached) return cached;
    if (s.offline) throw missing();
  }

  const url = hubFileUrl(repoId, filename, s);
  let meta: FileMetadata;
  try {
    meta = await fileMetadata(url, repoId, filename, s);
  } catch (e) {
    if (!(e instanceof TypeError)) throw e; // fetch throws TypeError when the network fails
    const why = e.cause instanceof Error ? `${e.message}: ${e.cause.message}` : e.message;
    const cached = await cachedFile(repoId, filename, s);
    if (cached) {
      console.warn(`hub: ${s.endpoint} is unreachable (${why}); using the cached ${repoId}/${filename}`);
      return cached;
    }
    throw new Error(
      `cannot reach ${s.endpoint} to download ${filename} from ${repoId}: ${why}. ` +
        `Check the network, point HF_ENDPOINT at a mirror, or fill the cache elsewhere and set HF_HUB_OFFLINE=1.`,
    );
  }

  const blob = join(repoDir, "blobs", meta.etag);
  const pointer = join(repoDir, "snapshots", meta.commit, filename);
  if (!(await fileExists(pointer))) {
    if (!(await fileExists(blob))) await downloadBlob(meta, blob, repoId, filename, s);
    await linkSnapshot(blob, pointer);
  }
  if (s.revision !== meta.commit) {
    await Deno.mkdir(join(repoDir, "refs"), { recursive: true });
    await Deno.writeTextFile(join(repoDir, "refs", s.revision), meta.commit);
  }
  return pointer;
}

/** Fetch the blob into `<blob>.incomplete` (resuming what is there), check it, move it into place. */
async function downloadBlob(meta: FileMetadata, blob: string, repoId: string, filename: string, s: Settings) {
  const label = `${repoId}/${filename}`;
  const lockPath = join(s.cacheDir, ".locks", relative(s.cacheDir, dirname(dirname(blob))), `${meta.etag}.lock`);
  await Deno.mkdir(dirname(lockPath), { recursive: true });
  await Deno.mkdir(dirname(blob), { recursive: true });
  // Two processes downloading the same file (two training runs starting together) take turns.
  const lock = await Deno.open(lockPath, { create: true, write: true });
  await lock.lock(true);
  try {
    if (await fileExists(blob)) return; // the other process finished it meanwhile
    const partial = `${blob}.incomplete`;
    const progress = s.onProgress ?? progressBar(label, meta.size);
    for (let attempt = 0;; attempt++) {
      try {
        await fetchInto(partial, meta, progress, s, () => `cannot download ${filename} from ${repoId}`, repoId);
        break;
      } catch (e) {
        if (!(e instanceof TypeError) || attempt >= s.retries) throw e;
        console.warn(`hub: ${label}: ${e.message}; resuming (attempt ${attempt + 2} of ${s.retries + 1})`);
        await new Promise((r) => setTimeout(r, Math.min(250 * 2 ** attempt, 10_000)));
      }
    }
    await verifyDownload(partial, meta, label);
    await Deno.rename(partial, blob);
  } finally {
    lock.close();
  }
}

/**
 * Append the missing bytes to `partial` with one ranged GET. A network failure throws a
 * TypeError (the caller retries, resuming from what arrived); an HTTP error an Error.
 */
async function fetchInto(
  partial: string,
  meta: FileMetadata,
  progress: (done: number, total: number) => void,
  auth: { token?: string; endpoint: string },
  what: () => string,
  repoId: string,
): Promise<void> {
  let have = await fileSize(partial);
  if (have > meta.size) have = 0; // a leftover of some other content: start over
  if (have === meta.size && have > 0) return; // complete; the check comes next
  const headers: Record<string, string> = { "Accept-Encoding": "identity" };
  if (have > 0) headers.Range = `bytes=${have}-`;
  const res = await hubFetch(meta.location, { headers }, auth);
  if (res.status !== 200 && res.status !== 206) throw await requestError(res, what(), repoId);
  if (res.status === 200) have = 0; // the server ignored Range and sends everything
  const file = await Deno.open(partial, { create: true, write: true, truncate: have === 0, append: have > 0 });
  const reader = res.body!.getReader();
  try {
    progress(have, meta.size);
    while (true) {
      let chunk: ReadableStreamReadResult<Uint8Array>;
      try {
        chunk = await reader.read();
      } catch (e) {
        throw new TypeError(`the download broke off after ${have} of ${meta.size} bytes (${(e as Error).message})`);
      }
      if (chunk.done) break;
      for (let written = 0; written < chunk.value.length;) written += await file.write(chunk.value.subarray(written));
      have += chunk.value.length;
      progress(have, meta.size);
    }
  } finally {
    file.close();
    reader.releaseLock();
  }
}

/**
 * The announced size must match, and so must the hash the ETag carries: an LFS file's
 * ETag is its sha256, a small file's is its git blob id, sha1("blob <size>\0" + bytes).
 * A mismatch deletes the file (it cannot be resumed into something valid).
 */
async function verifyDownload(path: string, meta: FileMetadata, label: string): Promise<void> {
  const size = await fileSize(path);
  let problem = size !== meta.size ? `its size is ${size} bytes, the Hub announced ${meta.size}` : "";
  const kind = /^[0-9a-f]{64}$/.test(meta.etag) ? "sha256" : /^[0-9a-f]{40}$/.test(meta.etag) ? "git-sha1" : "";
  if (!problem && kind) {
    const hash = createHash(kind === "sha256" ? "sha256" : "sha1");
    if (kind === "git-sha1") hash.update(`blob ${size}\0`);
    const file = await Deno.open(path);
    for await (const chunk of file.readable) hash.update(chunk); // the stream closes the file at its end
    const digest = hash.digest("hex");
    if (digest !== meta.etag) problem = `its ${kind} is ${digest}, the Hub announced ${meta.etag}`;
  }
  if (problem) {
    await Deno.remove(path);
    throw new Error(`the download of ${label} is corrupt: ${problem}. It was deleted; run again to download it anew.`);
  }
}

/** snapshots/<commit>/<file> → a relative symlink to the blob; a copy where symlinks are not allowed. */
async function linkSnapshot(blob: string, pointer: string): Promise<void> {
  await Deno.mkdir(dirname(pointer), { recursive: true });
  await Deno.remove(pointer).catch(() => {});
  try {
    await Deno.symlink(relative(dirname(pointer), blob), pointer);
  } catch {
    await Deno.copyFile(blob, pointer);
  }
}

/**
 * Download several files of a repo (all of them, or none in offline mode: the error then
 * lists everything that is missing) and return the snapshot folder that holds them.
 */
export async function hubSnapshot(repoId: string, filenames: string[], options: HubOptions = {}): Promise<string> {
  await checkCached([{ repoId, files: filenames }], options);
  let dir = "";
  for (const filename of filenames) {
    const path = await hubDownload(repoId, filename, options);
    dir = path.slice(0, path.length - filename.length - 1);
  }
  return dir;
}

/** In offline mode, throw one HubOfflineError naming every file of `wanted` that is not cached. */
export async function checkCached(wanted: { repoId: string; files: string[] }[], options: HubOptions): Promise<void> {
  const s = settings(options);
  if (!s.offline) return;
  const missing: MissingFile[] = [];
  for (const { repoId, files } of wanted) {
    for (const filename of files) {
      if (!(await cachedFile(repoId, filename, s))) {
        missing.push({ repoId, filename, revision: s.revision, repoType: s.repoType });
      }
    }
  }
  if (missing.length) throw new HubOfflineError(missing, s.cacheDir);
}

// ---- Progress bar -------------------------------------------------------------------------

function formatBytes(n: number): string {
  const units = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) n /= 1000, i++;
  return `${n.toFixed(i === 0 ? 0 : 1)} ${units[i]}`;
}

function formatSeconds(seconds: number): string {
  if (!Number.isFinite(seconds)) return "?";
  const m = Math.floor(seconds / 60), sec = Math.round(seconds % 60);
  return m ? `${m}m${String(sec).padStart(2, "0")}s` : `${sec}s`;
}

/**
 * A download progress callback that draws `label  45% 401.2 MB / 890.0 MB  12.3 MB/s  ETA 0m40s`
 * on stderr: redrawn in place on a terminal (10 times a second at most), one line every
 * 10 seconds otherwise (CI logs). Silent for files under `minBytes`, and when
 * HF_HUB_DISABLE_PROGRESS_BARS is set.
 */
export function progressBar(
  label: string,
  total: number,
  { minBytes = 10e6, write = (text: string) => Deno.stderr.writeSync(new TextEncoder().encode(text)), tty }: {
    minBytes?: number;
    write?: (text: string) => void;
    tty?: boolean;
  } = {},
): (done: number, total: number) => void {
  if (total < minBytes || env("HF_HUB_DISABLE_PROGRESS_BARS")) return () => {};
  tty ??= Deno.stderr.isTerminal();
  let start = 0, startBytes = 0, lastDraw = -Infinity, finished = false;
  return (done) => {
    const now = performance.now();
    if (!start) [start, startBytes] = [now, done]; // a resumed download's rate counts new bytes only
    const complete = done >= total;
    if (finished || (!complete && now - lastDraw < (tty ? 100 : 10_000))) return;
    lastDraw = now;
    finished = complete;
    const rate = (done - startBytes) / Math.max((now - start) / 1000, 1e-3);
    const percent = Math.floor((100 * done) / total);
    const bar = "#".repeat(Math.floor(percent / 5)).padEnd(20, ".");
    const line = `${label}  [${bar}] ${String(percent).padStart(3)}% ${formatBytes(done)} / ${formatBytes(total)}  ` +
      `${formatBytes(rate)}/s  ${
        complete ? `in ${formatSeconds((now - start) / 1000)}` : `ETA ${formatSeconds((total - done) / rate)}`
      }`;
    write(tty ? `\r${line}\x1b[K${complete ? "\n" : ""}` : `${line}\n`);
  };
}

// ---- 4. Tokenizers ------------------------------------------------------------------------

/**
 * A tokenizer by local path (a folder with tokenizer.json, or the file) or by Hub repo
 * (`cfg.lm_tokenizer`, e.g. HuggingFaceTB/SmolLM2-135M: tokenizer.json and
 * tokenizer_config.json are downloaded), with `<|image|>` appended as the reference does.
 */
export async function hubTokenizer(pathOrRepo: string, options: HubOptions = {}): Promise<ChatTokenizer> {
  if ((await isDirectory(pathOrRepo)) || (await fileExists(pathOrRepo))) return loadTokenizer(pathOrRepo);
  const files = ["tokenizer.json", "tokenizer_config.json"];
  return loadTokenizer(await hubSnapshot(pathOrRepo, files, { ...options, repoType: "model" }));
}

// ---- 5. Listing a folder of a repo ---------------------------------------------------------

/** A file in a repo, as the Hub's tree API describes it. */
export interface RepoFile {
  path: string;
  size: number;
  /** The git blob id; LFS files also carry `lfs.oid`, their sha256. */
  oid: string;
  lfs?: { oid: string; size: number };
}

/**
 * The files under `folder` of a repo (not recursive), sorted by path:
 * `GET {endpoint}/api/{models|datasets}/{repo}/tree/{revision}/{folder}`, following the
 * `Link: <…>; rel="next"` pages the Hub splits long listings into.
 */
export async function listRepoFiles(repoId: string, folder = "", options: HubOptions = {}): Promise<RepoFile[]> {
  checkRepoId(repoId);
  const s = settings(options);
  if (s.offline) throw new Error(`HF_HUB_OFFLINE is set: cannot list ${repoId}/${folder} on the Hub`);
  const path = folder.split("/").filter(Boolean).map(encodeURIComponent).join("/");
  let url: string | null = `${s.endpoint}/api/${s.repoType}s/${repoId}/tree/${encodeURIComponent(s.revision)}/${path}`;
  const files: RepoFile[] = [];
  while (url) {
    const res = await hubFetch(url, {}, s);
    if (!res.ok) throw await requestError(res, `cannot list ${folder || "/"} of ${s.repoType} ${repoId}`, repoId);
    for (const entry of await res.json() as (RepoFile & { type: string })[]) {
      if (entry.type === "file") files.push({ path: entry.path, size: entry.size, oid: entry.oid, lfs: entry.lfs });
    }
    url = res.headers.get("Link")?.match(/<([^>]+)>;\s*rel="next"/)?.[1] ?? null;
  }
  return files.sort((a, b) => a.path < b.path ? -1 : a.path > b.path ? 1 : 0);
}

/** The cached files under `folder` of a repo at `revision` (the offline counterpart of listRepoFiles). */
export async function listCachedFiles(repoId: string, folder = "", options: HubOptions = {}): Promise<string[]> {
  const s = settings(options);
  const repoDir = repoCacheDir(repoId, s);
  const commit = await resolveCachedRevision(repoDir, s.revision);
  if (!commit) return [];
  const files: string[] = [];
  try {
    for await (const entry of Deno.readDir(join(repoDir, "snapshots", commit, folder))) {
      if (entry.isFile || entry.isSymlink) files.push(folder ? `${folder}/${entry.name}` : entry.name);
    }
  } catch (e) {
    if (!(e instanceof Deno.errors.NotFound)) throw e;
  }
  return files.sort();
}

/**
 * A fetch-like reader of byte ranges of a Hub file, for streaming formats (parquet)
 * without downloading the whole file. Each call is one ranged GET of the resolve URL.
 */
export function hubRangeReader(
  repoId: string,
  filename: string,
  options: HubOptions = {},
): (start: number, end: number) => Promise<ArrayBuffer> {
  const s = settings(options);
  const url = hubFileUrl(repoId, filename, s);
  return async (start, end) => {
    const headers = { Range: `bytes=${start}-${end - 1}`, "Accept-Encoding": "identity" };
    const res = await hubFetch(url, { headers }, s);
    if (res.status !== 206 && res.status !== 200) {
      throw await requestError(res, `cannot read ${filename} of ${s.repoType} ${repoId}`, repoId);
    }
    const bytes = await res.arrayBuffer();
    return res.status === 206 ? bytes : bytes.slice(start, end); // 200: the server ignored Range
  };
}

// ---- 6. Push to the Hub -----------------------------------------------------------------------

/** What went into a model: printed in its model card. Every field is optional. */
export interface TrainingSummary {
  /** Where the weights started, e.g. "google/siglip-base-patch16-224 + HuggingFaceTB/SmolLM2-135M". */
  init?: string;
  /** The training data, e.g. "HuggingFaceM4/the_cauldron (vqav2)". */
  data?: string;
  steps?: number;
  batchSize?: number;
  learningRates?: string;
  finalLoss?: number;
  hardware?: string;
  duration?: string;
  /** Anything else, one line each. */
  notes?: string[];
}

/**
 * The README.md of a pushed model: YAML front matter as nanoVLM's model card
 * (library_name nanovlm, license mit, pipeline_tag image-text-to-text), then what it is,
 * how it was trained, and how to load it here and in PyTorch nanoVLM.
 */
export function modelCard(repoId: string, cfg: VLMConfig, parameters: number, training: TrainingSummary = {}): string {
  const trainingLines = [
    training.init && `- Initialised from: ${training.init}`,
    training.data && `- Data: ${training.data}`,
    training.steps !== undefined && `- Optimizer steps: ${training.steps.toLocaleString("en-US")}`,
    training.batchSize !== undefined && `- Batch size: ${training.batchSize}`,
    training.learningRates && `- Learning rates: ${training.learningRates}`,
    training.finalLoss !== undefined && `- Final training loss: ${training.finalLoss.toFixed(4)}`,
    training.hardware && `- Hardware: ${training.hardware}`,
    training.duration && `- Training time: ${training.duration}`,
    ...(training.notes ?? []).map((n) => `- ${n}`),
  ].filter(Boolean);
  const backbones = cfg.vit_model_type === "none"
    ? "a vision transformer and a decoder trained from scratch"
    : `the vision backbone [${cfg.vit_model_type}](https://huggingface.co/${cfg.vit_model_type}) and the language ` +
      `backbone [${cfg.lm_model_type}](https://huggingface.co/${cfg.lm_model_type})`;
  return `---
library_name: nanovlm
license: mit
pipeline_tag: image-text-to-text
tags:
  - vision-language
  - multimodal
  - research
  - nanovlm.ts
---

# ${repoId}

A small vision-language model in [nanoVLM](https://github.com/huggingface/nanoVLM)'s format, trained with
nanovlm.ts, the TypeScript/Deno port of nanoVLM. A SigLIP-style vision transformer reads the
${cfg.vit_img_size}×${cfg.vit_img_size} image, a pixel-shuffle projector turns its patches into
${cfg.mp_image_token_length} image tokens, and a SmolLM2/Llama-style decoder reads the prompt with those embeddings
in its \`<|image|>\` slots. It has ${parameters.toLocaleString("en-US")} parameters and is built on ${backbones}.

## Training

${trainingLines.length ? trainingLines.join("\n") : "No training details were recorded."}

## Usage

With nanovlm.ts (Deno):

\`\`\`ts
const model = await fromPretrained("${repoId}");
\`\`\`

With PyTorch [nanoVLM](https://github.com/huggingface/nanoVLM) (its config.json has exactly the fields of nanoVLM's
\`VLMConfig\`):

\`\`\`python
from models.vision_language_model import VisionLanguageModel

model = VisionLanguageModel.from_pretrained("${repoId}")
\`\`\`
`;
}

/** Options of pushToHub. */
export interface PushOptions {
  /** Default `hubToken()` (HF_TOKEN); needs write access. */
  token?: string;
  private?: boolean;
  trainingSummary?: TrainingSummary;
  /** Default `hubEndpoint()`. */
  endpoint?: string;
  commitMessage?: string;
  /** Where progress lines go (default console.log). */
  log?: (line: string) => void;
}

/**
 * Share a model: create the repo `owner/name` (an existing one is fine), then upload
 * config.json, model.safetensors and a model card (README.md) in one commit. `dir` is a
 * folder that holds config.json + model.safetensors (lib/checkpoint.ts `savePretrained`).
 * Returns the repo's URL and the commit.
 */
export async function pushToHub(
  dir: string,
  repoId: string,
  options: PushOptions = {},
): Promise<{ url: string; commit?: string }> {
  checkRepoId(repoId);
  if (!repoId.includes("/")) throw new Error(`push to "owner/${repoId}", not "${repoId}": the owner is required`);
  const token = "token" in options ? options.token : hubToken();
  if (!token) {
    throw new Error(
      `pushing to ${repoId} needs a Hugging Face token with write access: create one at ` +
        `https://huggingface.co/settings/tokens and set HF_TOKEN`,
    );
  }
  if (hubOffline()) throw new Error(`HF_HUB_OFFLINE is set: cannot push to ${repoId}`);
  const endpoint = (options.endpoint ?? hubEndpoint()).replace(/\/+$/, "");
  const log = options.log ?? console.log;

  const configText = await Deno.readTextFile(join(dir, "config.json"));
  const weights = await Deno.readFile(join(dir, "model.safetensors"));
  const cfg = JSON.parse(configText) as VLMConfig;
  const parameters = countParameters(weights);
  const card = modelCard(repoId, cfg, parameters, options.trainingSummary);

  try {
    await createRepo({ repo: repoId, accessToken: token, private: options.private ?? false, hubUrl: endpoint });
    log(`hub: created ${endpoint}/${repoId}`);
  } catch (e) {
    if (!(e instanceof HubApiError && e.statusCode === 409)) throw e; // 409: it exists, upload into it
  }
  log(`hub: uploading config.json, model.safetensors (${formatBytes(weights.length)}), README.md`);
  const result = await uploadFiles({
    repo: repoId,
    accessToken: token,
    hubUrl: endpoint,
    commitTitle: options.commitMessage ?? "Upload nanoVLM using nanovlm.ts pushToHub",
    files: [
      { path: "config.json", content: new Blob([configText]) },
      { path: "model.safetensors", content: new Blob([weights]) },
      { path: "README.md", content: new Blob([card]) },
    ],
  });
  log(`hub: pushed to ${endpoint}/${repoId}`);
  return { url: `${endpoint}/${repoId}`, commit: result?.commit.oid };
}

/** Parameters in a safetensors file: every tensor but the RoPE buffer (the tied embedding is stored once). */
function countParameters(bytes: Uint8Array): number {
  const headerLength = Number(new DataView(bytes.buffer, bytes.byteOffset).getBigUint64(0, true));
  const header = JSON.parse(new TextDecoder().decode(bytes.subarray(8, 8 + headerLength)));
  let n = 0;
  for (const [name, t] of Object.entries(header as Record<string, { shape: number[] }>)) {
    if (name !== "__metadata__" && name !== "decoder.rotary_embd.inv_freq") n += t.shape.reduce((a, b) => a * b, 1);
  }
  return n;
}

/**
 * train.ts's --push_to_hub: upload a finished run's best checkpoint to `config.push_to_hub`, with a model card that
 * says how it was trained. `data` names --data's source (none: the shapes world); `bestValLoss` is left out when the
 * run had no val set.
 */
export async function pushRunToHub(
  runDir: string,
  config: TrainConfig,
  cfg: VLMConfig,
  run: {
    steps: number;
    duration: string;
    finalLoss: number;
    bestValLoss?: number | null;
    data?: string;
    backend: string;
  },
  log: (line: string) => void,
): Promise<void> {
  const lrVision = visionLearningRate(config, cfg);
  const { url } = await pushToHub(`${runDir}/best`, config.push_to_hub, {
    log,
    trainingSummary: {
      init: cfg.vlm_load_backbone_weights ? `${cfg.vit_model_type} + ${cfg.lm_model_type}` : "random (from scratch)",
      data: run.data ?? "the built-in shapes world (nanovlm.ts data.ts)",
      steps: run.steps,
      batchSize: config.batch_size * config.gradient_accumulation_steps,
      learningRates: `projector ${config.lr_mp}, backbones ${config.lr_backbones}` +
        (lrVision === config.lr_backbones ? "" : `, vision encoder ${lrVision}`) + " (warmup + cosine)",
      finalLoss: run.finalLoss,
      hardware: `nanovlm.ts on the ${run.backend} backend`,
      duration: run.duration,
      notes: run.bestValLoss === undefined ? [] : [`Best val loss: ${run.bestValLoss?.toFixed(4)}`],
    },
  });
  log(`pushed ${runDir}/best to ${url}`);
}

// ---- main: fill the cache, or push a folder ----------------------------------------------------

/** The command line: `download [--repo_type dataset] [--revision REV] <repo> <file>...` or `push [--private] <dir> <repo>`. */
async function main(args: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args: snakeCaseFlags(args),
    allowPositionals: true,
    options: {
      repo_type: { type: "string", default: "model" },
      revision: { type: "string", default: "main" },
      private: { type: "boolean", default: false },
    },
  });
  const [command, ...rest] = positionals;
  const repoType = values.repo_type as RepoType;
  if (command === "download" && rest.length >= 2 && ["model", "dataset"].includes(repoType)) {
    const [repoId, ...files] = rest;
    const dir = await hubSnapshot(repoId, files, { repoType, revision: values.revision });
    for (const file of files) console.log(join(dir, file));
  } else if (command === "push" && rest.length === 2) {
    await pushToHub(rest[0], rest[1], { private: values.private });
  } else {
    console.error(
      "usage: deno task hub download [--repo_type dataset] [--revision REV] <owner/repo> <file>...\n" +
        "       deno task hub push [--private] <folder with config.json + model.safetensors> <owner/repo>",
    );
    return 2;
  }
  return 0;
}

if (import.meta.main) await runMain(main);
