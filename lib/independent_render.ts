// lib/independent_render.ts — the shapes world drawn by another program: each scene is written as an SVG document
// and rasterised by resvg (a Rust SVG renderer compiled to WebAssembly, from npm).
//
// What this is for: a model trained on data.ts's images should have learned circles, squares, triangles, colours,
// places and counts, not the pixels of one rasteriser. Asking it the same questions about the same scenes drawn by
// an independent program (`deno task eval --renderer=independent`) tells the two apart: a model that learned the
// shapes scores about the same on both, one that learned renderScene's pixels does not.
//
// Why the drawing path differs from data.ts's: renderScene tests pixel centres (or 4×4 sub-samples) against the
// shape's inequalities, in our own code. Here the scene becomes a vector document (<circle>, <rect>, <polygon>) in
// units of the image side, and resvg parses it, turns each element into a path (the circle into Bézier curves) and
// fills the paths with its own antialiasing scanline rasteriser (tiny-skia, a port of Skia's). The evaluation also
// draws at 4× the model's size and shrinks the picture with the image processor a user's PNG goes through, so the
// edges the model sees come from a resampling filter, not from a coverage count. Only the geometry is shared — it
// is the scene's meaning: circle of radius r; square of half-side 0.8·r; triangle pointing up, apex r above the
// centre, base 0.8·r below it, half-base 1.1·r.

import { initWasm, Resvg } from "@resvg/resvg-wasm";
import { createRequire } from "node:module";
import { COLOR_RGB, type Rgb, type ShapeObject } from "../data.ts";

/**
 * Plain backgrounds the evaluation reports on, by name. Black and white are the extremes; the coloured ones are
 * ordinary picture backgrounds that stay at least MIN_BACKGROUND_DISTANCE (data.ts) from every shape colour, so the
 * shapes are as visible on them as on the training scenes' backgrounds.
 */
export const INDEPENDENT_BACKGROUNDS: Readonly<Record<string, Rgb>> = {
  white: [255, 255, 255],
  black: [0, 0, 0],
  slate: [150, 160, 175], // a light grey-blue
  beige: [245, 235, 210],
  plum: [70, 20, 90], // a dark one that is not black
};

const cssColor = ([red, green, blue]: Rgb) => `rgb(${red},${green},${blue})`;

/** One shape as an SVG element, in units of the image side (the coordinates of a ShapeObject). */
function shapeElement(o: ShapeObject): string {
  const { x, y, radius: r } = o;
  const fill = `fill="${cssColor(COLOR_RGB[o.color])}"`;
  if (o.shape === "circle") return `<circle cx="${x}" cy="${y}" r="${r}" ${fill}/>`;
  if (o.shape === "square") {
    return `<rect x="${x - 0.8 * r}" y="${y - 0.8 * r}" width="${1.6 * r}" height="${1.6 * r}" ${fill}/>`;
  }
  const corners = [[x, y - r], [x + 1.1 * r, y + 0.8 * r], [x - 1.1 * r, y + 0.8 * r]];
  return `<polygon points="${corners.map(([cx, cy]) => `${cx},${cy}`).join(" ")}" ${fill}/>`;
}

/**
 * A scene as an SVG document of `size`×`size` pixels: a plain `background`, then each shape in its canonical
 * colour. The viewBox is the unit square, so the shapes are written in the scene's own coordinates (fractions of
 * the image side) and the document draws the same scene at any size.
 */
export function sceneSvg(objects: readonly ShapeObject[], size: number, background: Rgb): string {
  return [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${size}" height="${size}" viewBox="0 0 1 1">`,
    `<rect width="1" height="1" fill="${cssColor(background)}"/>`,
    ...objects.map(shapeElement),
    "</svg>",
  ].join("\n");
}

// resvg's WebAssembly module can be initialised once per process. It is read from the npm package in Deno's cache
// (where `deno install` or the first run put it), so rendering works offline.
let resvgReady: Promise<void> | undefined;
function loadResvg(): Promise<void> {
  resvgReady ??= (async () => {
    const wasmPath = createRequire(import.meta.url).resolve("@resvg/resvg-wasm/index_bg.wasm");
    await initWasm(await Deno.readFile(wasmPath));
  })();
  return resvgReady;
}

/**
 * Draw a scene with resvg: `size`×`size` RGB, row-major, 3 bytes per pixel, on a plain `background`, each shape in
 * `COLOR_RGB[o.color]` with the edges antialiased as resvg draws them. Async because the WebAssembly module loads
 * on the first call.
 */
export async function renderIndependent(
  objects: readonly ShapeObject[],
  size: number,
  background: Rgb,
): Promise<Uint8Array> {
  if (!(Number.isInteger(size) && size >= 1)) throw new Error(`renderIndependent: size must be a positive integer`);
  await loadResvg();
  // No text in these documents: skipping the system font scan saves most of resvg's start-up.
  const resvg = new Resvg(sceneSvg(objects, size, background), { font: { loadSystemFonts: false } });
  const image = resvg.render();
  const rgba = image.pixels;
  // Both live in the WebAssembly heap, which JavaScript's garbage collector frees late: free them now.
  image.free();
  resvg.free();
  // The background is opaque, so every alpha is 255 and dropping it loses nothing.
  const rgb = new Uint8Array(size * size * 3);
  for (let i = 0, j = 0; i < rgb.length; i += 3, j += 4) {
    rgb[i] = rgba[j];
    rgb[i + 1] = rgba[j + 1];
    rgb[i + 2] = rgba[j + 2];
  }
  return rgb;
}
