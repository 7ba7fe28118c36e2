// lib/independent_render.ts draws the scene it is given: for many shapes-world scenes on every named background, the
// shapes have their colours at their centres, the rest is background, each shape's colour stays in its quadrant and
// covers about the shape's geometric area, and on black the shapes cover the pixels data.ts's renderScene gives them.
// Then the eval side: questions about independently drawn scenes are the training renderer's questions, and the
// command line's new flags are checked before anything loads.

import {
  COLOR_RGB,
  colorDistance,
  COLORS,
  makeShapesExample,
  MIN_BACKGROUND_DISTANCE,
  QUADRANTS,
  renderScene,
  resizeBilinearPIL,
  type Rgb,
  type ShapeObject,
  SPLITS,
} from "../data.ts";
import { INDEPENDENT_BACKGROUNDS, renderIndependent } from "../lib/independent_render.ts";
import { independentQuestions, main as evalMain } from "../lib/eval.ts";
import { shapesQuestions } from "../lib/scoring.ts";
import { savePretrained } from "../lib/checkpoint.ts";
import { VisionLanguageModel } from "../nanovlm.ts";
import { initBackend } from "../backend/runtime.ts";
import { assert, assertEquals, assertRejects } from "./assert.ts";
import { MICRO } from "./helpers.ts";

const SIZE = 128;
// Scenes from every split (test-novel holds the pairs the others never show).
const SCENES = SPLITS.flatMap((split) => Array.from({ length: 10 }, (_, i) => makeShapesExample(split, 0, i, 32)));

/** Geometric area of a shape, in pixels at SIZE: the shapes' definitions in data.ts. */
function expectedArea(o: ShapeObject): number {
  const r = o.radius * SIZE;
  if (o.shape === "circle") return Math.PI * r * r;
  if (o.shape === "square") return (1.6 * r) ** 2;
  return 0.5 * (2.2 * r) * (1.8 * r); // base 2·1.1·r, height r + 0.8·r
}

/** Index into QUADRANTS of the quadrant holding pixel (px, py). */
const quadrantOf = (px: number, py: number) => (py >= SIZE / 2 ? 2 : 0) + (px >= SIZE / 2 ? 1 : 0);

const pixelAt = (rgb: Uint8Array, px: number, py: number): Rgb => {
  const i = (py * SIZE + px) * 3;
  return [rgb[i], rgb[i + 1], rgb[i + 2]];
};
const maxChannelDifference = (a: Rgb, b: Rgb) => Math.max(...a.map((v, c) => Math.abs(v - b[c])));

/**
 * How much of pixel `p` a shape of colour `shape` covers on `background`, read off the blend p = b + α·(c − b), and
 * how far `p` lies from that blend line (0 for an exact blend of the two colours).
 */
function coverage(p: Rgb, background: Rgb, shape: Rgb): { alpha: number; offLine: number } {
  const d = shape.map((v, c) => v - background[c]), q = p.map((v, c) => v - background[c]);
  const alpha = (q[0] * d[0] + q[1] * d[1] + q[2] * d[2]) / (d[0] ** 2 + d[1] ** 2 + d[2] ** 2);
  return { alpha, offLine: Math.hypot(...q.map((v, c) => v - alpha * d[c])) };
}

/** Whether pixel (px, py) lies more than 2 pixels outside the bounding box of every shape. */
function wellOutside(objects: readonly ShapeObject[], px: number, py: number): boolean {
  return objects.every((o) => {
    const cx = o.x * SIZE, cy = o.y * SIZE, r = o.radius * SIZE;
    return px + 1 < cx - 1.1 * r - 2 || px > cx + 1.1 * r + 2 || py + 1 < cy - r - 2 || py > cy + r + 2;
  });
}

/**
 * Per shape of the scene: the pixels' summed coverage (its drawn area) and the pixels at least half covered (its
 * mask), after asserting that every pixel is background or a blend of the background and the colour of the shape in
 * its quadrant — so a shape's colour never leaves its quadrant.
 */
function measureShapes(rgb: Uint8Array, objects: readonly ShapeObject[], background: Rgb, what: string) {
  const inQuadrant = QUADRANTS.map((q) => objects.find((o) => o.quadrant === q));
  const area = new Map<ShapeObject, number>(objects.map((o) => [o, 0]));
  const mask = new Map<ShapeObject, Set<number>>(objects.map((o) => [o, new Set()]));
  for (let py = 0; py < SIZE; py++) {
    for (let px = 0; px < SIZE; px++) {
      const p = pixelAt(rgb, px, py), where = `${what}, pixel (${px}, ${py}) = ${p}`;
      if (wellOutside(objects, px, py)) assert(maxChannelDifference(p, background) <= 1, `${where}: not background`);
      const o = inQuadrant[quadrantOf(px, py)];
      if (!o) {
        assert(maxChannelDifference(p, background) <= 1, `${where}: colour in a quadrant without a shape`);
        continue;
      }
      const { alpha, offLine } = coverage(p, background, COLOR_RGB[o.color]);
      assert(offLine <= 4 && alpha >= -0.02 && alpha <= 1.02, `${where}: not a blend of background and ${o.color}`);
      area.set(o, area.get(o)! + alpha);
      if (alpha >= 0.5) mask.get(o)!.add(py * SIZE + px);
    }
  }
  return { area, mask };
}

Deno.test("the named backgrounds include white and black and stay as far from the shape colours as training's do", () => {
  assertEquals(INDEPENDENT_BACKGROUNDS.white, [255, 255, 255]);
  assertEquals(INDEPENDENT_BACKGROUNDS.black, [0, 0, 0]);
  assert(Object.keys(INDEPENDENT_BACKGROUNDS).length >= 4, "white, black and at least two coloured backgrounds");
  for (const [name, background] of Object.entries(INDEPENDENT_BACKGROUNDS)) {
    for (const color of COLORS) {
      const distance = colorDistance(background, COLOR_RGB[color]);
      assert(distance >= MIN_BACKGROUND_DISTANCE, `${name} is only ${distance.toFixed(0)} from ${color}`);
    }
  }
});

Deno.test("the independent renderer draws each shape's colour at its centre, in its quadrant, with its area", async () => {
  for (const [name, background] of Object.entries(INDEPENDENT_BACKGROUNDS)) {
    for (const { split, index, objects } of SCENES) {
      const what = `${split} scene ${index} on ${name}`;
      const rgb = await renderIndependent(objects, SIZE, background);
      assertEquals(rgb.length, SIZE * SIZE * 3);
      for (const o of objects) {
        // The centre lies at least 4 pixels inside every shape at this size (a small triangle's sides are 0.52·r from
        // it): no edge blending there.
        const centre = pixelAt(rgb, Math.floor(o.x * SIZE), Math.floor(o.y * SIZE));
        assert(maxChannelDifference(centre, COLOR_RGB[o.color]) <= 2, `${what}: centre of the ${o.color} ${o.shape}`);
      }
      const { area } = measureShapes(rgb, objects, background, what);
      for (const o of objects) {
        // resvg's antialiasing places an edge to about a quarter pixel: up to ±3% of a small square at 128 px.
        const error = Math.abs(area.get(o)! / expectedArea(o) - 1);
        assert(error <= 0.04, `${what}: the ${o.shape}'s area is off by ${(100 * error).toFixed(1)}%`);
      }
    }
  }
});

Deno.test("on black, the independent renderer's shape masks match renderScene's (IoU ≥ 0.8 at 128 px)", async () => {
  for (const { split, index, objects } of SCENES) {
    const what = `${split} scene ${index}`;
    const { mask } = measureShapes(await renderIndependent(objects, SIZE, [0, 0, 0]), objects, [0, 0, 0], what);
    const training = renderScene(objects, SIZE); // the plain style: black background, hard edges
    for (const o of objects) {
      const trainingMask = new Set<number>();
      for (let i = 0; i < SIZE * SIZE; i++) {
        const inQuadrant = QUADRANTS[quadrantOf(i % SIZE, Math.floor(i / SIZE))] === o.quadrant;
        if (inQuadrant && (training[i * 3] || training[i * 3 + 1] || training[i * 3 + 2])) trainingMask.add(i);
      }
      const ours = mask.get(o)!;
      const intersection = [...ours].filter((i) => trainingMask.has(i)).length;
      const iou = intersection / (ours.size + trainingMask.size - intersection);
      assert(iou >= 0.8, `${what}: IoU ${iou.toFixed(3)} for the ${o.color} ${o.shape}`);
    }
  }
});

Deno.test("eval questions drawn by the independent renderer are the normal questions, on 4× pictures resized", async () => {
  const size = 32, drawnSize = 4 * size, background = INDEPENDENT_BACKGROUNDS.beige;
  for (const split of ["test", "test-novel"] as const) {
    const normal = shapesQuestions(split, 5, size);
    const drawn = await independentQuestions(split, 5, size, { background });
    const text = (items: typeof normal) =>
      items.map(({ question, answer, choices, kind }) => ({ question, answer, choices, kind }));
    assertEquals(text(drawn), text(normal));
    // Each scene is drawn at 4·size and shrunk by the image processor a user's picture goes through.
    const scene = makeShapesExample(split, 0, 0, size);
    const picture = await renderIndependent(scene.objects, drawnSize, background);
    const expected = resizeBilinearPIL(picture, drawnSize, drawnSize, size);
    const image = drawn[0].images[0];
    assert(typeof image !== "string");
    assertEquals([image.width, image.height], [size, size]);
    assertEquals(image.rgb, expected);
  }
});

Deno.test("eval questions in the plain style are the same questions about the first world's pictures", () => {
  const normal = shapesQuestions("test", 5, 32), plain = shapesQuestions("test", 5, 32, { plain: true });
  assertEquals(plain.map((item) => item.question), normal.map((item) => item.question));
  const scene = makeShapesExample("test", 0, 0, 32);
  const image = plain[0].images[0];
  assert(typeof image !== "string");
  assertEquals(image.rgb, renderScene(scene.objects, 32)); // black, hard edges, exact colours
});

Deno.test("eval's --renderer and --background: bad values are named before anything loads", async () => {
  await assertRejects(
    () => evalMain(["--renderer=independent", "--background=purple"]),
    Error,
    `unknown background "purple": use one of ${Object.keys(INDEPENDENT_BACKGROUNDS).join(", ")}`,
  );
  await assertRejects(() => evalMain(["--renderer=pencil"]), Error, `unknown renderer "pencil"`);
  await assertRejects(() => evalMain(["--background=white"]), Error, "--background needs --renderer=independent");
  await assertRejects(
    () => evalMain(["--renderer=plain", "--data=q.jsonl"]),
    Error,
    "--renderer=plain draws a --split",
  );
  await assertRejects(
    () => evalMain(["--renderer=independent", "--data=questions.jsonl"]),
    Error,
    "--renderer=independent draws a --split's scenes",
  );
});

Deno.test("eval --renderer=independent: one report per background, then all together; --out names the background", async () => {
  const dir = await Deno.makeTempDir({ prefix: "nanovlm-independent-eval-" });
  try {
    await initBackend("wasm", { quiet: true });
    const model = new VisionLanguageModel(MICRO, { seed: 1 }); // untrained: only the bookkeeping is checked
    await savePretrained(model, `${dir}/model`);
    model.dispose();
    const common = [`--checkpoint=${dir}/model`, "--split=test", "--examples=2", "--backend=wasm"];
    const questions = shapesQuestions("test", 2, MICRO.vit_img_size).length;
    const names = Object.keys(INDEPENDENT_BACKGROUNDS);

    const all = await evalMain([...common, "--renderer=independent", `--out=${dir}/out.jsonl`]);
    assertEquals(all.total, names.length * questions);
    const lines = (await Deno.readTextFile(`${dir}/out.jsonl`)).trim().split("\n").map((l) => JSON.parse(l));
    assertEquals(lines.map((l) => l.background), names.flatMap((name) => Array(questions).fill(name)));

    const one = await evalMain([...common, "--renderer", "independent", "--background", "plum"]);
    assertEquals(one.total, questions);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
