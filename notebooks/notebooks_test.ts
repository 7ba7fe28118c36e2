// Tests of the notebooks folder without Jupyter: the committed notebooks are clean (no
// outputs, the Deno kernel, reading order), every notebook's code type-checks against
// the project's modules, and plots.ts draws what it says. Executing the notebooks needs
// jupyter-nbconvert and takes minutes: that is `deno task notebooks` (CI runs it).
//
// Run: deno test -A notebooks/notebooks_test.ts

import { Image } from "imagescript";
import { assert, assertEquals, assertMatch } from "../tests/assert.ts";
import {
  barChart,
  base64,
  chwToRgb,
  describeBackend,
  escapeHtml,
  formatNumber,
  heatmap,
  heatmapOverImage,
  html,
  imageGrid,
  imagePng,
  JUPYTER_DISPLAY,
  labelledGrid,
  linePlot,
  niceTicks,
  patchGrid,
  png,
  rotationCircles,
  svg,
  table,
  tokenStrip,
  upscale,
} from "./plots.ts";
import { PRESETS } from "../nanovlm.ts";
import { cleanNotebook, listNotebooks, notebookJson } from "./run.ts";

const HERE = new URL(".", import.meta.url);
const ROOT = new URL("..", HERE);

interface Cell {
  cell_type: "code" | "markdown" | "raw";
  source: string | string[];
  outputs?: unknown[];
  execution_count?: number | null;
}
interface Notebook {
  cells: Cell[];
  metadata: { kernelspec?: { name: string; language: string } };
  nbformat: number;
}

const text = (cell: Cell) => (Array.isArray(cell.source) ? cell.source.join("") : cell.source);
const readNotebook = async (name: string): Promise<Notebook> =>
  JSON.parse(await Deno.readTextFile(new URL(name, HERE)));

// ---- The committed notebooks ------------------------------------------------------------

Deno.test("notebooks are numbered in reading order, from 01-setup", async () => {
  const names = await listNotebooks();
  assertEquals(names[0], "01-setup.ipynb");
  const numbers = names.map((name) => {
    assertMatch(name, /^\d\d-[a-z0-9-]+\.ipynb$/);
    return Number(name.slice(0, 2));
  });
  numbers.slice(1).forEach((n, i) => assert(n > numbers[i], `${names[i + 1]} must come after ${names[i]}`));
});

Deno.test("notebooks are committed clean: Deno kernel, no outputs, no execution counts", async () => {
  for (const name of await listNotebooks()) {
    const nb = await readNotebook(name);
    assertEquals(nb.nbformat, 4, `${name}: nbformat`);
    assertEquals(nb.metadata.kernelspec?.name, "deno", `${name}: the kernel must be Deno's`);
    for (const [i, cell] of nb.cells.entries()) {
      if (cell.cell_type !== "code") continue;
      assertEquals(cell.outputs, [], `${name} cell ${i}: clear the outputs before committing`);
      assertEquals(cell.execution_count, null, `${name} cell ${i}: clear the execution count before committing`);
    }
  }
});

Deno.test("notebooks are formatted: deno fmt --check agrees, every cell ends with a newline", async () => {
  const names = await listNotebooks();
  for (const name of names) {
    for (const [i, cell] of (await readNotebook(name)).cells.entries()) {
      assert(text(cell).endsWith("\n"), `${name} cell ${i}: end it with a newline (deno task notebooks --clean)`);
    }
  }
  const output = await new Deno.Command(Deno.execPath(), {
    args: ["fmt", "--check", ...names],
    cwd: HERE,
    stdout: "piped",
    stderr: "piped",
  }).output();
  assert(output.success, `run deno task notebooks --clean:\n${new TextDecoder().decode(output.stderr)}`);
});

Deno.test("cleanNotebook clears outputs and ends every cell with a newline", () => {
  const nb = {
    cells: [
      { cell_type: "code", source: ["const a = 1;\n", "a"], outputs: [{ output_type: "stream" }], execution_count: 3 },
      { cell_type: "markdown", source: "# Title\ntext" },
    ],
    metadata: { b: 1, a: 2 },
  };
  const cleaned = cleanNotebook(nb);
  assertEquals(cleaned.cells[0], {
    cell_type: "code",
    source: ["const a = 1;\n", "a\n"],
    outputs: [],
    execution_count: null,
  });
  assertEquals(cleaned.cells[1].source, ["# Title\n", "text\n"]);
  assertEquals(nb.cells[0].outputs?.length, 1); // the input is not modified
  assertMatch(notebookJson(cleaned), /^{\n "cells": \[/);
  assert(
    notebookJson(cleaned).indexOf('"a": 2') < notebookJson(cleaned).indexOf('"b": 1'),
    "keys sorted, as Jupyter writes",
  );
});

Deno.test("every notebook picks its backend and says which, and imports only project modules", async () => {
  const projectFile = /from\s+"(\.\.?\/[^"]+)"/g;
  for (const name of await listNotebooks()) {
    const nb = await readNotebook(name);
    const code = nb.cells.filter((c) => c.cell_type === "code").map(text);
    assert(code.length > 0, `${name} has no code`);
    assertMatch(code[0], /await initBackend\(/);
    assertMatch(code[0], /describeBackend\(backend\)/);
    for (const source of code) {
      assert(!/^\s*import\s.*from\s+"(npm|jsr|https?):/m.test(source), `${name}: import through deno.json, not a URL`);
      for (const [, path] of source.matchAll(projectFile)) {
        await Deno.stat(new URL(path, HERE)); // throws if the module does not exist
      }
    }
  }
});

Deno.test("the tiny preset still has the numbers the notebooks' text walks through", () => {
  // The markdown explains the tiny model with concrete numbers (a 64×64 image, 16×16 patches, a 4×4 grid, 4 image
  // tokens, head size 24 and 32, …). If the preset changes, update the notebooks' text and these numbers together.
  const t = PRESETS.tiny;
  assertEquals(
    [t.vit_img_size, t.vit_patch_size, t.vit_hidden_dim, t.vit_n_heads, t.vit_n_blocks, t.mp_pixel_shuffle_factor],
    [64, 16, 96, 4, 2, 2],
  );
  assertEquals(
    [t.mp_image_token_length, t.lm_hidden_dim, t.lm_n_heads, t.lm_n_kv_heads, t.lm_vocab_size, t.lm_max_length],
    [4, 128, 4, 4, 89, 96],
  );
  assertEquals(t.lm_re_base, 100000);
});

Deno.test("the repository's kernelspec starts Deno's Jupyter kernel", async () => {
  const spec = JSON.parse(await Deno.readTextFile(new URL("kernels/deno/kernel.json", HERE)));
  assertEquals(spec.argv, ["deno", "jupyter", "--kernel", "--conn", "{connection_file}"]);
  assertEquals(spec.language, "typescript");
});

Deno.test("every notebook's code type-checks against the project's modules", async () => {
  // Each notebook's code cells, in order, form one module (cells never redeclare a name),
  // written to a temporary folder with its relative imports made absolute.
  const dir = await Deno.makeTempDir({ prefix: "nb-check-" });
  try {
    const files: string[] = [];
    for (const name of await listNotebooks()) {
      const nb = await readNotebook(name);
      const code = nb.cells.filter((c) => c.cell_type === "code").map(text).join("\n\n")
        .replace(/(from\s+")(\.\.?\/[^"]+)"/g, (_, from, path) => `${from}${new URL(path, HERE).href}"`);
      const file = `${dir}/${name.replace(".ipynb", ".ts")}`;
      await Deno.writeTextFile(file, code + "\nexport {};\n");
      files.push(file);
    }
    const output = await new Deno.Command(Deno.execPath(), {
      args: ["check", "--quiet", `--config=${new URL("deno.json", ROOT).pathname}`, ...files],
      stdout: "piped",
      stderr: "piped",
    }).output();
    const errors = new TextDecoder().decode(output.stderr);
    assert(output.success, `type errors in the notebooks:\n${errors}`);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

// ---- plots.ts ----------------------------------------------------------------------------

Deno.test("png/svg/html wrap content in the bundle Deno.jupyter.display shows", async () => {
  const bytes = await imagePng(new Uint8Array(2 * 2 * 3).fill(200), 2);
  const bundle = png(bytes)[JUPYTER_DISPLAY]();
  assertEquals(Object.keys(bundle), ["image/png"]);
  assertEquals(Uint8Array.from(atob(bundle["image/png"]), (c) => c.charCodeAt(0)), bytes);
  assertEquals(svg("<svg/>")[JUPYTER_DISPLAY](), { "image/svg+xml": "<svg/>" });
  assertEquals(html("<b>x</b>")[JUPYTER_DISPLAY](), { "text/html": "<b>x</b>" });
  assertEquals(JUPYTER_DISPLAY, Symbol.for("Jupyter.display")); // what Deno's kernel looks for
});

Deno.test("base64 of large buffers equals btoa, in chunks", () => {
  const bytes = Uint8Array.from({ length: 100_000 }, (_, i) => (i * 31) % 256);
  assertEquals(atob(base64(bytes)).length, bytes.length);
  assertEquals(base64(bytes.subarray(0, 3)), btoa(String.fromCharCode(...bytes.subarray(0, 3))));
});

Deno.test("upscale repeats each pixel factor×factor times; the PNG decodes to the same pixels", async () => {
  const rgb = Uint8Array.from([255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9]); // 2×2: red, green / blue, grey
  const big = upscale(rgb, 2, 2, 3);
  assertEquals(big.length, 6 * 6 * 3);
  const at = (x: number, y: number) => Array.from(big.subarray((y * 6 + x) * 3, (y * 6 + x) * 3 + 3));
  const [red, green, blue, grey] = [[255, 0, 0], [0, 255, 0], [0, 0, 255], [9, 9, 9]];
  assertEquals([at(0, 0), at(2, 2), at(3, 0), at(0, 3), at(5, 5)], [red, red, green, blue, grey]);
  const decoded = await Image.decode(await imagePng(rgb, 2, 3)) as Image;
  assertEquals([decoded.width, decoded.height], [6, 6]);
  assertEquals(Array.from(decoded.bitmap.subarray(0, 3)), [255, 0, 0]);
});

Deno.test("chwToRgb turns channel planes into interleaved bytes, clamped to [0, 1]", () => {
  const chw = Float32Array.from([1, 0, 0, 0.5, /* G */ 0, 1, 0, -1, /* B */ 0, 0, 1, 2]); // a 2×2 image, R plane first
  assertEquals(Array.from(chwToRgb(chw, 2)), [255, 0, 0, 0, 255, 0, 0, 0, 255, 128, 0, 255]);
});

Deno.test("numbers and ticks read well", () => {
  assertEquals([formatNumber(1024), formatNumber(49153), formatNumber(0.123456), formatNumber(2e-7)], [
    "1024",
    "49153",
    "0.123",
    "2.0e-7",
  ]);
  assertEquals([formatNumber(-Infinity), formatNumber(NaN)], ["−∞", "NaN"]);
  assertEquals(niceTicks(0, 1), [0, 0.2, 0.4, 0.6, 0.8, 1]);
  assertEquals(niceTicks(0, 300, 3), [0, 100, 200, 300]);
  assertEquals(niceTicks(-3.2, 0.9), [-3, -2, -1, 0]);
});

Deno.test("tables escape text and keep HTML cells", () => {
  const out = table(["a<b"], [["<|image|>"], [{ html: "<b>bold</b>" }], [0.5]]);
  assert(out.includes("a&lt;b") && out.includes("&lt;|image|&gt;") && out.includes("<b>bold</b>"));
  assert(out.includes(">0.5<"));
  assertEquals(escapeHtml(`"&"`), "&quot;&amp;&quot;");
});

Deno.test("line plots draw one path per series, with a legend, skipping non-finite points", () => {
  const out = linePlot([{ name: "train", values: [3, 2, NaN, 1] }, { name: "val", points: [[0, 3], [3, 1.5]] }], {
    title: "loss",
    xMax: 10,
  });
  assertEquals(out.match(/<path /g)?.length, 2);
  assert(out.includes(">train<") && out.includes(">val<") && out.includes(">loss<"));
  assert(!out.includes("NaN"));
  assertMatch(out, /^<svg xmlns="http:\/\/www.w3.org\/2000\/svg"/);
});

Deno.test("heatmaps draw masked cells for −∞ and float32's minimum, and keep the scale finite", () => {
  const out = heatmap([[0, -Infinity], [-3.4028234663852886e38, 1]], { rowLabels: ["a", "b"], colLabels: ["x", "y"] });
  assertEquals(out.match(/fill="#333"/g)?.length, 1 + 2); // 2 masked cells + the legend swatch
  assert(out.includes(">masked<"));
  assert(!out.includes("NaN") && !out.includes("Infinity"));
});

Deno.test("pictures over images embed the PNG and mark the cells they are asked to", async () => {
  const bytes = await imagePng(new Uint8Array(4 * 4 * 3).fill(255), 4);
  const grid = patchGrid(bytes, 64, 2, { title: "grid", highlight: [3] });
  assert(grid.includes(`base64,${base64(bytes)}`));
  assertEquals(grid.match(/<line /g)?.length, 2 * 3); // 3 vertical + 3 horizontal lines for a 2×2 grid
  for (const label of ["0", "1", "2", "3"]) assert(grid.includes(`>${label}</text>`));
  const heat = heatmapOverImage(bytes, 64, [0, 0.5, 1, 0], { highlight: 2 });
  assertEquals(heat.match(/fill-opacity="0.000"/g)?.length, 2); // zero attention: no tint
  assert(heat.includes('stroke="#ff00aa"'));
});

Deno.test("grids, bars, circles and token strips hold one element per item", async () => {
  const bytes = await imagePng(new Uint8Array(3).fill(0), 1);
  assertEquals(imageGrid([{ image: bytes, caption: "a & b" }, { image: "<svg></svg>" }]).match(/<img /g)?.length, 1);
  assert(imageGrid([{ image: bytes, caption: "a & b" }]).includes("a &amp; b"));
  assertEquals(labelledGrid([[{ label: "p0" }, { label: "p1" }]]).match(/<rect x/g)?.length, 2);
  assert(barChart([{ label: "red", value: 0.7 }, { label: "blue", value: 0.2 }]).includes(">0.7<"));
  assertEquals(rotationCircles([{ title: "pair 0", angles: [0, 1, 2] }]).match(/r="4"/g)?.length, 3);
  const strip = tokenStrip([{ text: "<|im_start|>" }, { text: "\n" }, { text: " a" }]);
  assert(strip.includes("&lt;|im_start|&gt;") && strip.includes("↵") && strip.includes("·a"));
});

Deno.test("describeBackend names the backend", () => {
  assertMatch(describeBackend("wasm"), /WASM/);
  assertMatch(describeBackend("webgpu"), /WebGPU/);
  assertMatch(describeBackend("cpu"), /CPU/);
});
