// web/serve.ts — the browser page: `deno task web` serves it on http://127.0.0.1:8000, and
// `deno task web --build DIR` writes the same files to DIR for any static web server.
//
// The page is this project's own modules, bundled for the browser by `deno bundle`: web/app.ts (the page) and
// web/train_worker.ts (training in a Web Worker) import nanovlm.ts, data.ts and lib/ as they are. Two things make that
// possible, and this file checks both on every build:
//   - the modules the page imports use no Deno API and no node: module (file access, FFI and the command lines live in
//     other files), so a bundle that mentions either is refused, naming what it found;
//   - data.ts decodes images with the `imagescript` package, whose build is Node's; in the browser that import is
//     mapped to web/browser_image.ts, which decodes with the browser's own decoders.
// Beside the two bundles go the page's HTML and CSS, tfjs' WebAssembly binaries (wasm/) and a checkpoint (checkpoint/:
// by default the committed one, checkpoints/shapes-tiny).
//
// The server serves exactly those files from memory: a request is looked up by name, so nothing else on disk can be
// reached. It sends Cross-Origin-Opener-Policy and Cross-Origin-Embedder-Policy, which make the page cross-origin
// isolated: only then may it use SharedArrayBuffer, which tfjs' wasm backend needs to run on several threads.

import { parseArgs } from "node:util";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { COMMITTED_CHECKPOINT } from "../lib/inference.ts";
import { runMain, snakeCaseFlags, wholeNumber } from "../lib/cli.ts";
import { fileExists } from "../lib/files.ts";

const WEB_DIR = new URL(".", import.meta.url).pathname;
const PROJECT_DIR = new URL("..", import.meta.url).pathname;

/** The page's static files, copied as they are. */
const PAGE_FILES = ["index.html", "style.css"];
/** The entry points bundled for the browser: source in web/ → the script the page loads. */
const BUNDLES: Record<string, string> = { "app.ts": "app.js", "train_worker.ts": "train_worker.js" };
/** tfjs' wasm backend picks one of these at start-up: plain, SIMD, or SIMD with threads (cross-origin isolated). */
const WASM_BINARIES = ["tfjs-backend-wasm.wasm", "tfjs-backend-wasm-simd.wasm", "tfjs-backend-wasm-threaded-simd.wasm"];

/** What a browser bundle must not contain: it would fail to load, or reach for APIs a browser does not have. */
const DENO_ONLY = [/\bDeno\.[A-Za-z.]+/, /(from\s*|import\(\s*|require\(\s*)["']node:[a-z_/]+["']/];

// ---- Building ----------------------------------------------------------------------------------

/**
 * Every file of the page by its path on the site: the page, the two bundles (with source maps, so a browser's
 * developer tools show the TypeScript), the wasm binaries and the checkpoint's config.json and model.safetensors.
 */
export async function buildSite(
  { checkpoint = COMMITTED_CHECKPOINT, log = (_: string) => {} }: {
    checkpoint?: string;
    log?: (line: string) => void;
  } = {},
): Promise<Map<string, Uint8Array>> {
  const files = new Map<string, Uint8Array>();
  // The checkpoint first: a wrong folder fails before the bundling.
  for (const name of ["config.json", "model.safetensors"]) {
    const path = join(checkpoint, name);
    if (!await fileExists(path)) throw new Error(`${checkpoint} is not a checkpoint: ${name} is missing`);
    files.set(`checkpoint/${name}`, await Deno.readFile(path));
  }
  for (const name of PAGE_FILES) files.set(name, await Deno.readFile(join(WEB_DIR, name)));

  const work = await Deno.makeTempDir({ prefix: "nanovlm-web-" });
  try {
    const importMap = join(work, "import_map.json");
    await Deno.writeTextFile(importMap, JSON.stringify(await browserImportMap()));
    for (const [entry, script] of Object.entries(BUNDLES)) {
      log(`bundling web/${entry} → ${script}`);
      const out = join(work, script);
      await bundle(join(WEB_DIR, entry), out, importMap);
      const code = await Deno.readTextFile(out);
      const found = DENO_ONLY.map((pattern) => code.match(pattern)?.[0]).filter(Boolean);
      if (found.length) {
        throw new Error(
          `the browser bundle of web/${entry} contains Deno-only code (${found.join(", ")}): a module it imports ` +
            `uses a Deno API or a node: module. Keep file access, FFI and command lines out of the modules the page ` +
            `imports (as lib/state_dict.ts is kept apart from lib/checkpoint.ts).`,
        );
      }
      files.set(script, new TextEncoder().encode(code));
      files.set(`${script}.map`, await Deno.readFile(`${out}.map`));
    }
  } finally {
    await Deno.remove(work, { recursive: true });
  }

  const wasmDir = dirname(createRequire(import.meta.url).resolve("@tensorflow/tfjs-backend-wasm"));
  for (const name of WASM_BINARIES) files.set(`wasm/${name}`, await Deno.readFile(join(wasmDir, name)));

  return files;
}

/** deno.json's imports, with `imagescript` (Node's build) replaced by the browser's decoders. */
async function browserImportMap(): Promise<{ imports: Record<string, string> }> {
  const { imports } = JSON.parse(await Deno.readTextFile(join(PROJECT_DIR, "deno.json")));
  return { imports: { ...imports, imagescript: new URL("./browser_image.ts", import.meta.url).href } };
}

/** `deno bundle` one entry point for the browser, with a linked source map. */
async function bundle(entry: string, out: string, importMap: string): Promise<void> {
  const args = ["bundle", "--platform=browser", "--sourcemap=linked", `--import-map=${importMap}`, "-o", out, entry];
  const command = new Deno.Command(Deno.execPath(), { args, env: { NO_COLOR: "1" }, stdout: "null", stderr: "piped" });
  const { code, stderr } = await command.output();
  if (code !== 0) throw new Error(`deno bundle ${entry} failed:\n${new TextDecoder().decode(stderr)}`);
}

// ---- Serving -----------------------------------------------------------------------------------

const CONTENT_TYPES: Record<string, string> = {
  html: "text/html; charset=utf-8",
  css: "text/css; charset=utf-8",
  js: "text/javascript; charset=utf-8",
  map: "application/json",
  json: "application/json",
  wasm: "application/wasm",
  safetensors: "application/octet-stream",
};

/** The headers every response carries: cross-origin isolation (for wasm threads), and no caching of a rebuild. */
export const SITE_HEADERS: Readonly<Record<string, string>> = {
  "Cross-Origin-Opener-Policy": "same-origin",
  "Cross-Origin-Embedder-Policy": "require-corp",
  "Cache-Control": "no-cache",
};

/** Answer one request from the built files: GET or HEAD of a file's path ("/" is index.html), else 404 or 405. */
export function siteResponse(files: ReadonlyMap<string, Uint8Array>, request: Request): Response {
  if (request.method !== "GET" && request.method !== "HEAD") {
    return new Response("only GET and HEAD\n", { status: 405, headers: { ...SITE_HEADERS, Allow: "GET, HEAD" } });
  }
  const path = new URL(request.url).pathname.slice(1) || "index.html";
  const body = files.get(path);
  if (body === undefined) return new Response("not found\n", { status: 404, headers: SITE_HEADERS });
  const type = CONTENT_TYPES[path.split(".").pop()!] ?? "application/octet-stream";
  const headers = { ...SITE_HEADERS, "Content-Type": type, "Content-Length": String(body.length) };
  return new Response(request.method === "HEAD" ? null : body.slice(), { headers });
}

/** Serve the built files on `hostname`:`port` (port 0: any free one; the server's `addr` says which). */
export function serveSite(
  files: ReadonlyMap<string, Uint8Array>,
  { hostname = "127.0.0.1", port = 8000, onListen }: {
    hostname?: string;
    port?: number;
    onListen?: (address: Deno.NetAddr) => void;
  } = {},
): Deno.HttpServer<Deno.NetAddr> {
  try {
    return Deno.serve({ hostname, port, onListen: onListen ?? (() => {}) }, (request) => siteResponse(files, request));
  } catch (e) {
    if (!(e instanceof Deno.errors.AddrInUse)) throw e;
    throw new Error(`${hostname}:${port} is already in use (another server?): pick another port with --port`);
  }
}

/** Write the built files under `dir`, with a `_headers` file that static hosts such as Netlify read. */
export async function writeSite(files: ReadonlyMap<string, Uint8Array>, dir: string): Promise<void> {
  for (const [path, bytes] of files) {
    await Deno.mkdir(dirname(join(dir, path)), { recursive: true });
    await Deno.writeFile(join(dir, path), bytes);
  }
  const rules = Object.entries(SITE_HEADERS).map(([name, value]) => `  ${name}: ${value}`).join("\n");
  await Deno.writeTextFile(join(dir, "_headers"), `/*\n${rules}\n`);
}

// ---- main ----------------------------------------------------------------------------------------

const USAGE = `usage: deno task web [--port 8000] [--host 127.0.0.1] [--checkpoint DIR] [--build DIR]
Serves the browser page (Ask and Train tabs) on http://HOST:PORT; --build DIR writes it to DIR instead.
--checkpoint: the model the Ask tab starts from (default: checkpoints/shapes-tiny).`;

async function main(args: string[]): Promise<void> {
  const { values } = parseArgs({
    args: snakeCaseFlags(args),
    options: {
      port: { type: "string", default: "8000" },
      host: { type: "string", default: "127.0.0.1" },
      checkpoint: { type: "string" },
      build: { type: "string" },
      help: { type: "boolean" },
    },
  });
  if (values.help) return console.log(USAGE);
  const port = wholeNumber("port", values.port, 0, USAGE);
  if (port > 65535) throw new Error(`--port ${port}: a port is at most 65535`);
  const started = performance.now();
  const files = await buildSite({ checkpoint: values.checkpoint, log: console.log });
  const megabytes = [...files.values()].reduce((n, bytes) => n + bytes.length, 0) / 2 ** 20;
  console.log(
    `built ${files.size} files, ${megabytes.toFixed(1)} MB, in ${((performance.now() - started) / 1000).toFixed(1)} s`,
  );
  if (values.build) {
    await writeSite(files, values.build);
    console.log(
      `wrote the page to ${values.build}: serve that folder with any web server. For training on several threads the ` +
        `server must send the headers in ${values.build}/_headers (cross-origin isolation); without them the page ` +
        `trains on one.`,
    );
    return;
  }
  const server = serveSite(files, {
    hostname: values.host,
    port,
    onListen: ({ hostname, port }) => {
      console.log(`nanovlm.ts in a browser: open http://${hostname}:${port}/ (Ctrl+C stops; restart to rebuild)`);
      if (hostname !== "127.0.0.1" && hostname !== "localhost") {
        console.log(`note: --host ${hostname} lets other machines on the network open the page`);
      }
    },
  });
  await server.finished;
}

if (import.meta.main) await runMain(main);
