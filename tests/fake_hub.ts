// A stand-in for the Hugging Face Hub on 127.0.0.1, for offline tests of hub.ts and
// datasets.ts. It answers the requests the real Hub answers, with the real Hub's URL
// layout and headers (as huggingface_hub and @huggingface/hub expect them):
//   HEAD/GET /{repo}/resolve/{rev}/{file}, /datasets/{repo}/resolve/...: small files
//     directly (ETag = git blob id), LFS files (*.safetensors, *.parquet) by a 302 to a
//     second server, the "storage", with X-Linked-Etag = sha256 and X-Linked-Size;
//     X-Repo-Commit on both; 401 RepoNotFound / 404 EntryNotFound / 404 RevisionNotFound.
//   GET /api/{models|datasets}/{repo}/tree/{rev}/{folder}: JSON listing, paginated by Link.
//   POST /api/repos/create, /api/models/{repo}/preupload/{rev},
//     /{repo}.git/info/lfs/objects/batch (basic transfer, PUT to the storage),
//     /api/models/{repo}/commit/{rev} (NDJSON): uploads become new commits.
// Every request is recorded (method, server, path, Range, whether a token came along) and
// faults can be injected: break a download off after N bytes, serve corrupt bytes.
// Also: the fixture's backbones as Hub repos, and helpers that write small files in The Cauldron's parquet layout.

import { parquetWriteBuffer } from "hyparquet-writer";
import { createHash } from "node:crypto";
import { encodePng } from "../data.ts";
import { FIXTURE_DIR } from "./helpers.ts";

/** One request as the fake Hub saw it. */
export interface SeenRequest {
  server: "hub" | "storage";
  method: string;
  path: string;
  range: string | null;
  authorization: string | null;
}

interface Repo {
  type: "model" | "dataset";
  id: string;
  commit: string;
  files: Map<string, Uint8Array>;
  history: { commit: string; title: string; files: string[] }[];
}

const sha256 = (bytes: Uint8Array) => createHash("sha256").update(bytes).digest("hex");
const gitBlobId = (bytes: Uint8Array) =>
  createHash("sha1").update(`blob ${bytes.length}\0`).update(bytes).digest("hex");
const isLfs = (path: string) => /\.(safetensors|parquet|bin)$/.test(path);
const json = (body: unknown, status = 200, headers: Record<string, string> = {}) =>
  new Response(JSON.stringify(body), { status, headers: { "Content-Type": "application/json", ...headers } });

/** The fake Hub: `url` is its endpoint (use as HF_ENDPOINT); close it when done. */
export class FakeHub {
  readonly requests: SeenRequest[] = [];
  /** Next GET of these files' bytes (repo path) stops after this many bytes, once. */
  readonly breakAfter = new Map<string, number>();
  /** These files' bytes are served altered: "size" = one byte short, "hash" = one byte flipped. */
  readonly corrupt = new Map<string, "size" | "hash">();
  /** Entries per page of the tree API. */
  pageSize = 100;
  /** The token that write calls must carry. */
  writeToken = "hf_test_write_token";
  /** Blobs received by LFS uploads, by sha256. */
  readonly uploads = new Map<string, Uint8Array>();
  private readonly repos = new Map<string, Repo>();
  private readonly blobs = new Map<string, { bytes: Uint8Array; path: string }>();
  private commitCounter = 0;
  private hub!: Deno.HttpServer<Deno.NetAddr>;
  private storage!: Deno.HttpServer<Deno.NetAddr>;

  get url(): string {
    return `http://127.0.0.1:${this.hub.addr.port}`;
  }

  get storageUrl(): string {
    return `http://127.0.0.1:${this.storage.addr.port}`;
  }

  static async start(): Promise<FakeHub> {
    const hub = new FakeHub();
    const options = { hostname: "127.0.0.1", port: 0, onListen() {} };
    hub.hub = Deno.serve(options, (req) => hub.handleHub(req));
    hub.storage = Deno.serve(options, (req) => hub.handleStorage(req));
    await Promise.resolve();
    return hub;
  }

  async close(): Promise<void> {
    await Promise.all([this.hub.shutdown(), this.storage.shutdown()]);
  }

  /** Add (or replace) a repo with these files, as one new commit; returns the commit hash. */
  addRepo(type: "model" | "dataset", id: string, files: Record<string, Uint8Array | string>): string {
    const repo: Repo = { type, id, commit: "", files: new Map(), history: [] };
    this.repos.set(`${type}:${id}`, repo);
    const encoded = Object.entries(files).map(([p, c]) => [p, typeof c === "string" ? new TextEncoder().encode(c) : c]);
    return this.commit(repo, "initial commit", new Map(encoded as [string, Uint8Array][]));
  }

  /** A repo's files and commits (for assertions about uploads). */
  repo(type: "model" | "dataset", id: string): Repo | undefined {
    return this.repos.get(`${type}:${id}`);
  }

  private commit(repo: Repo, title: string, changes: Map<string, Uint8Array>): string {
    for (const [path, bytes] of changes) {
      repo.files.set(path, bytes);
      this.blobs.set(sha256(bytes), { bytes, path });
    }
    repo.commit = createHash("sha1").update(`${repo.id} ${++this.commitCounter}`).digest("hex");
    repo.history.push({ commit: repo.commit, title, files: [...changes.keys()] });
    return repo.commit;
  }

  private record(req: Request, server: "hub" | "storage"): URL {
    const url = new URL(req.url);
    this.requests.push({
      server,
      method: req.method,
      path: decodeURIComponent(url.pathname) + url.search,
      range: req.headers.get("Range"),
      authorization: req.headers.get("Authorization"),
    });
    return url;
  }

  private async handleHub(req: Request): Promise<Response> {
    const url = this.record(req, "hub");
    const path = url.pathname;
    let m: RegExpMatchArray | null;
    if ((m = path.match(/^\/(datasets\/)?([^/]+\/[^/]+)\/resolve\/([^/]+)\/(.+)$/))) {
      const type = m[1] ? "dataset" : "model";
      return this.resolve(req, type, m[2], decodeURIComponent(m[3]), decodeURIComponent(m[4]));
    }
    if ((m = path.match(/^\/api\/(models|datasets)\/([^/]+\/[^/]+)\/tree\/([^/]+)\/?(.*)$/))) {
      return this.tree(url, m[1] === "datasets" ? "dataset" : "model", m[2], decodeURIComponent(m[4]));
    }
    if (req.method !== "POST") return json({ error: "not found" }, 404);
    if (req.headers.get("Authorization") !== `Bearer ${this.writeToken}`) {
      return json({ error: "Invalid credentials in Authorization header" }, 401);
    }
    if (path === "/api/repos/create") {
      const body = await req.json();
      const id = `${body.organization}/${body.name}`;
      if (this.repos.has(`${body.type ?? "model"}:${id}`)) {
        return json({ error: "You already created this model repo", url: `${this.url}/${id}` }, 409);
      }
      this.addRepo(body.type ?? "model", id, {
        ".gitattributes": "*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
      });
      return json({ url: `${this.url}/${id}`, name: id });
    }
    if ((m = path.match(/^\/api\/models\/([^/]+\/[^/]+)\/preupload\/main$/))) {
      const body = await req.json();
      const files = body.files.map((f: { path: string }) => ({
        path: f.path,
        uploadMode: isLfs(f.path) ? "lfs" : "regular",
        shouldIgnore: false,
      }));
      return json({ files, commitOid: this.repo("model", m[1])?.commit });
    }
    if ((m = path.match(/^\/([^/]+\/[^/]+)\.git\/info\/lfs\/objects\/batch$/))) {
      const body = await req.json();
      const objects = body.objects.map((o: { oid: string; size: number }) => ({
        oid: o.oid,
        size: o.size,
        authenticated: true,
        actions: { upload: { href: `${this.storageUrl}/upload/${o.oid}` } },
      }));
      return json({ transfer: "basic", objects }, 200, { "Content-Type": "application/vnd.git-lfs+json" });
    }
    if ((m = path.match(/^\/api\/models\/([^/]+\/[^/]+)\/commit\/main$/))) {
      const repo = this.repo("model", m[1]);
      if (!repo) return json({ error: "Repository not found" }, 404, { "X-Error-Code": "RepoNotFound" });
      const lines = (await req.text()).split("\n").filter(Boolean).map((l) => JSON.parse(l));
      const changes = new Map<string, Uint8Array>();
      let title = "";
      for (const { key, value } of lines) {
        if (key === "header") title = value.summary;
        else if (key === "file") changes.set(value.path, Uint8Array.from(atob(value.content), (c) => c.charCodeAt(0)));
        else if (key === "lfsFile") {
          const bytes = this.uploads.get(value.oid);
          if (!bytes) return json({ error: `LFS object ${value.oid} was never uploaded` }, 400);
          changes.set(value.path, bytes);
        }
      }
      const commit = this.commit(repo, title, changes);
      return json({ success: true, commitOid: commit, commitUrl: `${this.url}/${repo.id}/commit/${commit}` });
    }
    return json({ error: "not found" }, 404);
  }

  private resolve(req: Request, type: "model" | "dataset", id: string, revision: string, file: string): Response {
    const repo = this.repo(type, id);
    if (!repo) {
      return new Response("Repository not found", {
        status: 401,
        headers: { "X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found" },
      });
    }
    if (revision !== "main" && revision !== repo.commit) {
      return new Response("Revision not found", {
        status: 404,
        headers: { "X-Error-Code": "RevisionNotFound", "X-Error-Message": `Invalid rev id: ${revision}` },
      });
    }
    const bytes = repo.files.get(file);
    if (!bytes) {
      return new Response("Entry not found", {
        status: 404,
        headers: {
          "X-Error-Code": "EntryNotFound",
          "X-Error-Message": "Entry not found",
          "X-Repo-Commit": repo.commit,
        },
      });
    }
    if (isLfs(file)) {
      return new Response(null, {
        status: 302,
        headers: {
          Location: `${this.storageUrl}/lfs/${sha256(bytes)}`,
          "X-Repo-Commit": repo.commit,
          "X-Linked-Etag": `"${sha256(bytes)}"`,
          "X-Linked-Size": String(bytes.length),
          ETag: `"${gitBlobId(new TextEncoder().encode(`oid sha256:${sha256(bytes)}`))}"`,
        },
      });
    }
    return this.serveBytes(req, file, bytes, { "X-Repo-Commit": repo.commit, ETag: `"${gitBlobId(bytes)}"` });
  }

  private tree(url: URL, type: "model" | "dataset", id: string, folder: string): Response {
    const repo = this.repo(type, id);
    if (!repo) return json({ error: "Repository not found" }, 404, { "X-Error-Code": "RepoNotFound" });
    const prefix = folder ? `${folder.replace(/\/$/, "")}/` : "";
    const entries = [...repo.files.entries()]
      .filter(([p]) => p.startsWith(prefix) && !p.slice(prefix.length).includes("/"))
      .map(([p, bytes]) => ({
        type: "file",
        path: p,
        size: bytes.length,
        oid: gitBlobId(bytes),
        ...(isLfs(p) ? { lfs: { oid: sha256(bytes), size: bytes.length, pointerSize: 134 } } : {}),
      }));
    if (!entries.length) return json({ error: `${folder} does not exist` }, 404, { "X-Error-Code": "EntryNotFound" });
    const start = Number(url.searchParams.get("cursor") ?? 0);
    const page = entries.slice(start, start + this.pageSize);
    const next = start + this.pageSize < entries.length
      ? { Link: `<${url.origin}${url.pathname}?cursor=${start + this.pageSize}>; rel="next"` }
      : undefined;
    return json(page, 200, next);
  }

  private async handleStorage(req: Request): Promise<Response> {
    const url = this.record(req, "storage");
    let m: RegExpMatchArray | null;
    if ((m = url.pathname.match(/^\/lfs\/([0-9a-f]{64})$/))) {
      const blob = this.blobs.get(m[1]);
      if (!blob) return new Response("no such object", { status: 404 });
      return this.serveBytes(req, blob.path, blob.bytes, { ETag: `"${m[1]}"` });
    }
    if ((m = url.pathname.match(/^\/upload\/([0-9a-f]{64})$/)) && req.method === "PUT") {
      const bytes = new Uint8Array(await req.arrayBuffer());
      if (sha256(bytes) !== m[1]) return new Response("sha256 mismatch", { status: 400 });
      this.uploads.set(m[1], bytes);
      return new Response(null, { status: 200 });
    }
    return new Response("not found", { status: 404 });
  }

  /** Bytes with Range support, faults applied. */
  private serveBytes(req: Request, file: string, bytes: Uint8Array, headers: Record<string, string>): Response {
    const fault = this.corrupt.get(file);
    if (fault === "size") bytes = bytes.slice(0, -1);
    if (fault === "hash") (bytes = bytes.slice())[bytes.length >> 1] ^= 0xff;
    let start = 0, end = bytes.length;
    const range = req.headers.get("Range")?.match(/^bytes=(\d+)-(\d*)$/);
    if (range) {
      start = Number(range[1]);
      end = range[2] ? Math.min(Number(range[2]) + 1, bytes.length) : bytes.length;
      if (start >= bytes.length) return new Response(null, { status: 416 });
      headers = { ...headers, "Content-Range": `bytes ${start}-${end - 1}/${bytes.length}` };
    }
    const body = bytes.slice(start, end);
    const status = range ? 206 : 200;
    headers = { ...headers, "Content-Length": String(body.length), "Accept-Ranges": "bytes" };
    if (req.method === "HEAD") return new Response(null, { status, headers });
    const cut = this.breakAfter.get(file);
    if (cut !== undefined && cut < body.length) {
      this.breakAfter.delete(file);
      let sent = false; // first pull: the bytes before the cut; second pull: the connection breaks
      const stream = new ReadableStream({
        pull(controller) {
          if (sent) controller.close(); // short of Content-Length: the client sees the connection drop
          else controller.enqueue(body.slice(0, cut));
          sent = true;
        },
      });
      return new Response(stream, { status, headers });
    }
    return new Response(body, { status, headers });
  }
}

/** nanovlm-222m's backbones on the Hub; the fake Hub serves the nanovlm-tiny-a fixture's small stand-ins as them. */
export const SIGLIP_REPO = "google/siglip-base-patch16-224";
export const SMOLLM_REPO = "HuggingFaceTB/SmolLM2-135M";

/**
 * Add SIGLIP_REPO and SMOLLM_REPO to `hub`: the fixture's Hugging Face-format SigLIP and SmolLM2 files, and with
 * SmolLM2 a SmolLM2-style tokenizer: the shapes tokenizer without `<|image|>` (SmolLM2's has none either; it is
 * appended at load), its vocabulary padded with `<unused_i>` tokens up to `vocabSize` (default: left as it is).
 */
export async function addBackboneRepos(hub: FakeHub, { vocabSize = 0 } = {}): Promise<void> {
  const read = (name: string) => Deno.readFileSync(`${FIXTURE_DIR}/${name}`);
  hub.addRepo("model", SIGLIP_REPO, {
    "config.json": read("hf_vit_config.json"),
    "model.safetensors": read("hf_vit.safetensors"),
  });
  const dir = new URL("../tokenizers/shapes/", import.meta.url).pathname;
  const tokenizer = JSON.parse(await Deno.readTextFile(`${dir}/tokenizer.json`));
  tokenizer.added_tokens = tokenizer.added_tokens.filter((t: { content: string }) => t.content !== "<|image|>");
  const vocab = tokenizer.model.vocab as Record<string, number>;
  for (let id = Object.keys(vocab).length; id < vocabSize; id++) vocab[`<unused_${id}>`] = id;
  hub.addRepo("model", SMOLLM_REPO, {
    "config.json": read("hf_lm_config.json"),
    "model.safetensors": read("hf_lm.safetensors"),
    "tokenizer.json": JSON.stringify(tokenizer),
    "tokenizer_config.json": await Deno.readTextFile(`${dir}/tokenizer_config.json`),
  });
}

/** A temporary HF_HOME-style folder for one test, removed by the returned function. */
export async function tempCache(): Promise<{ dir: string; cleanup: () => Promise<void> }> {
  const dir = await Deno.makeTempDir({ prefix: "nanovlm-hub-test-" });
  return { dir, cleanup: () => Deno.remove(dir, { recursive: true }) };
}

/** A PNG of deterministic noise (noise does not compress, so the files have a known heft). */
export async function noisePng(seed: number, size = 48): Promise<Uint8Array> {
  let state = seed * 2654435761 >>> 0;
  const rgb = Uint8Array.from({ length: size * size * 3 }, () => {
    state = (Math.imul(state, 1664525) + 1013904223) >>> 0;
    return state >>> 24;
  });
  return await encodePng(rgb, size);
}

/** The Cauldron's parquet schema: images list<struct<bytes, path>>, texts list<struct<user, assistant, source>>. */
export function cauldronParquet(
  rows: { images: Uint8Array[]; texts: { user: string; assistant: string }[] }[],
  rowGroupSize: number,
): Uint8Array {
  const list = (name: string, fields: { name: string; type: "BYTE_ARRAY"; converted_type?: "UTF8" }[]) => [
    { name, repetition_type: "OPTIONAL" as const, converted_type: "LIST" as const, num_children: 1 },
    { name: "list", repetition_type: "REPEATED" as const, num_children: 1 },
    { name: "element", repetition_type: "OPTIONAL" as const, num_children: fields.length },
    ...fields.map((f) => ({ ...f, repetition_type: "OPTIONAL" as const })),
  ];
  const buffer = parquetWriteBuffer({
    columnData: [
      { name: "images", data: rows.map((r) => r.images.map((bytes) => ({ bytes, path: null }))) },
      { name: "texts", data: rows.map((r) => r.texts.map((t) => ({ ...t, source: "test" }))) },
    ],
    schema: [
      { name: "root", num_children: 2 },
      ...list("images", [{ name: "bytes", type: "BYTE_ARRAY" }, {
        name: "path",
        type: "BYTE_ARRAY",
        converted_type: "UTF8",
      }]),
      ...list(
        "texts",
        ["user", "assistant", "source"].map((name) => ({
          name,
          type: "BYTE_ARRAY" as const,
          converted_type: "UTF8" as const,
        })),
      ),
    ],
    rowGroupSize,
  });
  return new Uint8Array(buffer);
}
