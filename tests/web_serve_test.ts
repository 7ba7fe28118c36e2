// The browser page's build and server (web/serve.ts): what the bundles may contain, what is served and what is not.
// The page itself, in a real browser, is tests/web_test.ts.
import { assert, assertEquals, assertRejects, assertThrows } from "./assert.ts";
import { buildSite, serveSite, siteResponse, writeSite } from "../web/serve.ts";

const files = await buildSite();
const get = (path: string, method = "GET") =>
  siteResponse(files, new Request(`http://127.0.0.1:8000${path}`, { method }));

Deno.test("the build holds the page, both bundles, tfjs' wasm binaries and the committed checkpoint", async () => {
  for (
    const path of [
      "index.html",
      "style.css",
      "app.js",
      "app.js.map",
      "train_worker.js",
      "train_worker.js.map",
      "wasm/tfjs-backend-wasm.wasm",
      "wasm/tfjs-backend-wasm-simd.wasm",
      "wasm/tfjs-backend-wasm-threaded-simd.wasm",
      "checkpoint/config.json",
      "checkpoint/model.safetensors",
    ]
  ) assert(files.has(path), `${path} is missing from the build`);
  assertEquals(
    files.get("checkpoint/model.safetensors"),
    await Deno.readFile("checkpoints/shapes-tiny/model.safetensors"),
  );
  // The browser gets the project's own model code, bundled, not a copy: nanovlm.ts's functions are in app.js.
  const app = new TextDecoder().decode(files.get("app.js"));
  for (const name of ["function visionEncoder(", "function pixelShuffle(", "function replaceImageTokens("]) {
    assert(app.includes(name), `app.js lacks ${name}`);
  }
  for (const script of ["app.js", "train_worker.js"]) {
    const code = new TextDecoder().decode(files.get(script));
    assert(!/\bDeno\.[A-Za-z]/.test(code), `${script} mentions a Deno API`);
    assert(!/["']node:/.test(code), `${script} imports a node: module`);
  }
});

Deno.test("the server answers with the built files only, cross-origin isolated, never a file beside them", async () => {
  const page = get("/");
  assertEquals(page.status, 200);
  assertEquals(page.headers.get("content-type"), "text/html; charset=utf-8");
  assertEquals(page.headers.get("cross-origin-opener-policy"), "same-origin");
  assertEquals(page.headers.get("cross-origin-embedder-policy"), "require-corp");
  assertEquals(new Uint8Array(await page.arrayBuffer()), files.get("index.html"));
  assertEquals(get("/wasm/tfjs-backend-wasm-simd.wasm").headers.get("content-type"), "application/wasm");
  assertEquals(get("/app.js").headers.get("content-type"), "text/javascript; charset=utf-8");
  // Paths that would leave the site, or name project files that are not part of it.
  for (
    const path of ["/../deno.json", "/..%2fdeno.json", "/%2e%2e/deno.json", "/deno.json", "/web/serve.ts", "/wasm/"]
  ) {
    const response = get(path);
    assertEquals(response.status, 404, path);
    await response.body?.cancel();
  }
  assertEquals(get("/", "POST").status, 405);
  const head = get("/checkpoint/model.safetensors", "HEAD");
  assertEquals(head.body, null);
  assertEquals(Number(head.headers.get("content-length")), files.get("checkpoint/model.safetensors")!.length);
});

Deno.test("serveSite listens on 127.0.0.1 unless told otherwise; a port in use is named", async () => {
  const server = serveSite(files, { port: 0 });
  try {
    assertEquals(server.addr.hostname, "127.0.0.1");
    const response = await fetch(`http://127.0.0.1:${server.addr.port}/checkpoint/config.json`);
    assertEquals(JSON.parse(await response.text()).vit_img_size, 64);
    assertThrows(() => serveSite(files, { port: server.addr.port }), Error, `:${server.addr.port} is already in use`);
  } finally {
    await server.shutdown();
  }
});

Deno.test("--build writes the same files, with the headers static hosts read; a wrong checkpoint is named", async () => {
  const dir = await Deno.makeTempDir();
  await writeSite(files, dir);
  assertEquals(await Deno.readFile(`${dir}/wasm/tfjs-backend-wasm.wasm`), files.get("wasm/tfjs-backend-wasm.wasm"));
  assert((await Deno.readTextFile(`${dir}/_headers`)).includes("Cross-Origin-Embedder-Policy: require-corp"));
  await assertRejects(
    () => buildSite({ checkpoint: dir }),
    Error,
    `${dir} is not a checkpoint: config.json is missing`,
  );
});
