// notebooks/plots.ts — the pictures the notebooks show, as plain data: SVG and HTML
// strings, PNG bytes.
//
// What this is: the drawing helpers several notebooks share (line plots, bar charts,
// heatmaps alone or over an image, a patch grid, labelled grids, image grids, tables),
// and `png` / `svg` / `html` / `markdown`, which wrap a picture so that
// `await Deno.jupyter.display(...)` shows it.
//
// What this is not: model code. Nothing here imports tfjs or nanovlm.ts; every function
// takes plain numbers, so each notebook cell shows where its numbers come from.

import { encodePng } from "../data.ts";

// ---- Media bundles for Deno.jupyter.display -------------------------------------------

/** A Jupyter media bundle: MIME type → content (images as base64). */
export type MediaBundle = Record<string, string>;

/**
 * The symbol Deno's kernel looks for on an object to display it (`Deno.jupyter.$display`
 * is this symbol). Using it through `Symbol.for` keeps this module importable outside a
 * kernel, where `Deno.jupyter` does not exist.
 */
export const JUPYTER_DISPLAY: unique symbol = Symbol.for("Jupyter.display");

/** Something `Deno.jupyter.display` (or a cell's last expression) shows as its media bundle. */
export interface Displayable {
  [JUPYTER_DISPLAY](): MediaBundle;
}

function displayable(bundle: MediaBundle): Displayable {
  return { [JUPYTER_DISPLAY]: () => bundle };
}

/** Bytes → base64, in chunks (spreading a whole image into String.fromCharCode overflows the stack). */
export function base64(bytes: Uint8Array): string {
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(text);
}

/** PNG bytes, shown as an image: `await Deno.jupyter.display(png(bytes))`. */
export function png(bytes: Uint8Array): Displayable {
  return displayable({ "image/png": base64(bytes) });
}

/** An SVG document (e.g. from linePlot), shown as an image. */
export function svg(text: string): Displayable {
  return displayable({ "image/svg+xml": text });
}

/** An HTML fragment (e.g. from table or imageGrid). */
export function html(text: string): Displayable {
  return displayable({ "text/html": text });
}

/** Markdown text. */
export function markdown(text: string): Displayable {
  return displayable({ "text/markdown": text });
}

/** An `<img>` tag holding PNG bytes, for HTML fragments; `width` in CSS pixels (default: the image's own). */
export function imgTag(bytes: Uint8Array, width?: number, border = false): string {
  return `<img src="data:image/png;base64,${base64(bytes)}"${width ? ` width="${width}"` : ""} ` +
    `style="image-rendering:pixelated${border ? ";border:1px solid #ccc" : ""}">`;
}

/** One sentence saying where the notebook's tensors live, for the top of every notebook. */
export function describeBackend(backend: string): string {
  const where: Record<string, string> = {
    webgpu: "**WebGPU**: the tensors live on the GPU",
    wasm: "**WASM** (WebAssembly, one CPU thread): no hardware GPU was found",
    cpu: "the plain JavaScript **CPU** backend (slow: WebGPU and WASM both failed to start)",
  };
  return `This notebook runs on ${where[backend] ?? `**${backend}**`}. ` +
    "Set `NANOVLM_BACKEND=webgpu|wasm|cpu` before starting Jupyter to choose.";
}

// ---- Small pieces ----------------------------------------------------------------------

/** Escape text for HTML and SVG. */
export function escapeHtml(text: string): string {
  return text.replaceAll("&", "&amp;").replaceAll("<", "&lt;").replaceAll(">", "&gt;").replaceAll('"', "&quot;");
}

/** A number for an axis or a cell: integers in full, others with 3 significant digits. */
export function formatNumber(x: number): string {
  if (!Number.isFinite(x)) return x > 0 ? "∞" : x < 0 ? "−∞" : "NaN";
  if (Number.isInteger(x) && Math.abs(x) < 1e9) return String(x);
  const a = Math.abs(x);
  if (a >= 1e4 || a < 1e-3) return x.toExponential(1);
  return String(Number(x.toPrecision(3)));
}

/** Ten distinguishable colours (Tableau 10), for categories: `categoryColor(i)`. */
export const CATEGORY_COLORS: readonly string[] = [
  "#4e79a7",
  "#f28e2b",
  "#e15759",
  "#76b7b2",
  "#59a14f",
  "#edc948",
  "#b07aa1",
  "#ff9da7",
  "#9c755f",
  "#bab0ac",
];

/** The colour of category `i` (wraps around after ten). */
export function categoryColor(i: number): string {
  return CATEGORY_COLORS[((i % CATEGORY_COLORS.length) + CATEGORY_COLORS.length) % CATEGORY_COLORS.length];
}

// Viridis at 9 stops: dark blue (low) → green → yellow (high); readable in grey too.
const VIRIDIS: readonly [number, number, number][] = [
  [68, 1, 84],
  [71, 44, 122],
  [59, 81, 139],
  [44, 113, 142],
  [33, 144, 141],
  [39, 173, 129],
  [92, 200, 99],
  [170, 220, 50],
  [253, 231, 37],
];

/** Viridis colour of t ∈ [0, 1] (clamped) as "rgb(r,g,b)". */
export function viridis(t: number): string {
  const x = Math.min(1, Math.max(0, Number.isFinite(t) ? t : 0)) * (VIRIDIS.length - 1);
  const i = Math.min(VIRIDIS.length - 2, Math.floor(x)), f = x - i;
  const c = VIRIDIS[i].map((v, k) => Math.round(v + f * (VIRIDIS[i + 1][k] - v)));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

// Diverging blue (negative) → white (0) → red (positive), for signed values such as weights.
function diverging(t: number): string {
  const x = Math.min(1, Math.max(-1, t));
  const [r, g, b] = x < 0 ? [59, 76, 192] : [180, 4, 38];
  const mix = (c: number) => Math.round(255 + Math.abs(x) * (c - 255));
  return `rgb(${mix(r)},${mix(g)},${mix(b)})`;
}

/** "Nice" tick values covering [lo, hi]: steps of 1, 2 or 5 × 10ⁿ, about `count` of them. */
export function niceTicks(lo: number, hi: number, count = 5): number[] {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / count, magnitude = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * magnitude).find((s) => s >= raw)!;
  const ticks: number[] = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) ticks.push(Number(v.toPrecision(12)));
  return ticks;
}

const FONT = 'font-family="sans-serif"';

function svgDocument(width: number, height: number, body: string): string {
  return `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" ` +
    `viewBox="0 0 ${width} ${height}" ${FONT} font-size="12">` +
    `<rect width="${width}" height="${height}" fill="white"/>${body}</svg>`;
}

function text(x: number, y: number, content: string, attrs = ""): string {
  return `<text x="${x.toFixed(1)}" y="${y.toFixed(1)}" ${attrs}>${escapeHtml(content)}</text>`;
}

// ---- Images ----------------------------------------------------------------------------

/** Nearest-neighbour enlargement of an RGB image (3 bytes per pixel, row-major), so small images stay crisp. */
export function upscale(rgb: Uint8Array, width: number, height: number, factor: number): Uint8Array {
  const W = width * factor, out = new Uint8Array(W * height * factor * 3);
  for (let y = 0; y < height * factor; y++) {
    for (let x = 0; x < W; x++) {
      const from = (Math.floor(y / factor) * width + Math.floor(x / factor)) * 3, to = (y * W + x) * 3;
      out[to] = rgb[from];
      out[to + 1] = rgb[from + 1];
      out[to + 2] = rgb[from + 2];
    }
  }
  return out;
}

/** PNG bytes of a square RGB image, enlarged `scale` times (nearest neighbour). */
export async function imagePng(rgb: Uint8Array, size: number, scale = 1): Promise<Uint8Array> {
  return await encodePng(scale === 1 ? rgb : upscale(rgb, size, size, scale), size * scale);
}

/**
 * A [3, P, P] channel-first float image (values in [0, 1], as a patch or a model input
 * holds them) → RGB bytes [P, P, 3].
 */
export function chwToRgb(chw: ArrayLike<number>, size: number): Uint8Array {
  const plane = size * size, rgb = new Uint8Array(plane * 3);
  for (let i = 0; i < plane; i++) {
    for (let c = 0; c < 3; c++) rgb[i * 3 + c] = Math.round(255 * Math.min(1, Math.max(0, chw[c * plane + i])));
  }
  return rgb;
}

function imageElement(pngBytes: Uint8Array, x: number, y: number, size: number): string {
  return `<image x="${x}" y="${y}" width="${size}" height="${size}" style="image-rendering:pixelated" ` +
    `href="data:image/png;base64,${base64(pngBytes)}"/>`;
}

/**
 * An image with its G×G patch grid drawn over it, each patch labelled with its index
 * (row-major, the order patchify gives). `pngBytes` is drawn `size` pixels wide.
 */
export function patchGrid(
  pngBytes: Uint8Array,
  size: number,
  G: number,
  { title = "", labels = true, highlight = [] as number[], color = "#ff00aa" } = {},
): string {
  const top = title ? 22 : 4, cell = size / G;
  const width = Math.max(size + 8, title.length * 7 + 8); // bold 12 px text: about 7 px a character
  let body = title ? text(4, 15, title, 'font-weight="bold"') : "";
  body += imageElement(pngBytes, 4, top, size);
  for (const i of highlight) {
    const [r, c] = [Math.floor(i / G), i % G];
    body += `<rect x="${4 + c * cell}" y="${top + r * cell}" width="${cell}" height="${cell}" ` +
      `fill="${color}" fill-opacity="0.25" stroke="${color}" stroke-width="3"/>`;
  }
  for (let k = 0; k <= G; k++) {
    const at = k * cell;
    body += `<line x1="${4 + at}" y1="${top}" x2="${4 + at}" y2="${top + size}" stroke="${color}" stroke-width="1.5"/>`;
    body += `<line x1="4" y1="${top + at}" x2="${4 + size}" y2="${top + at}" stroke="${color}" stroke-width="1.5"/>`;
  }
  if (labels) {
    const fontSize = Math.max(8, Math.min(14, cell / 3));
    for (let i = 0; i < G * G; i++) {
      const [r, c] = [Math.floor(i / G), i % G];
      body += text(
        4 + c * cell + 3,
        top + r * cell + fontSize + 1,
        String(i),
        `font-size="${fontSize}" fill="${color}"`,
      );
    }
  }
  return svgDocument(width, top + size + 4, body);
}

/**
 * A G×G grid of values (e.g. one query's attention over the patches) drawn over an image:
 * each patch tinted by viridis, opacity growing with the value. `highlight` outlines
 * one patch (the query). Values are scaled from `min` (default 0: no tint) to `max`
 * (default: their maximum).
 */
export function heatmapOverImage(
  pngBytes: Uint8Array,
  size: number,
  values: ArrayLike<number>,
  options: { title?: string; highlight?: number; min?: number; max?: number; opacity?: number } = {},
): string {
  const { title = "", highlight = -1, min = 0, opacity = 0.6 } = options;
  const G = Math.round(Math.sqrt(values.length)), cell = size / G, top = title ? 20 : 2;
  const max = options.max ?? Math.max(...Array.from(values));
  let body = title ? text(2, 14, title, 'font-size="12"') : "";
  body += imageElement(pngBytes, 2, top, size);
  for (let i = 0; i < values.length; i++) {
    const t = max > min ? Math.max(0, (values[i] - min) / (max - min)) : 0;
    const [r, c] = [Math.floor(i / G), i % G];
    body += `<rect x="${2 + c * cell}" y="${top + r * cell}" width="${cell}" height="${cell}" ` +
      `fill="${viridis(t)}" fill-opacity="${(opacity * Math.sqrt(Math.max(0, t))).toFixed(3)}"/>`;
  }
  if (highlight >= 0) {
    const [r, c] = [Math.floor(highlight / G), highlight % G];
    body += `<rect x="${2 + c * cell}" y="${top + r * cell}" width="${cell}" height="${cell}" ` +
      `fill="none" stroke="#ff00aa" stroke-width="3"/>`;
  }
  return svgDocument(Math.max(size + 4, title.length * 6.5 + 4), top + size + 2, body);
}

/** An item of an image grid: PNG bytes or an SVG string, with an optional caption (plain text, newlines kept). */
export interface GridItem {
  image: Uint8Array | string;
  caption?: string;
}

/**
 * Images in rows of `columns`, each `width` pixels wide, captions below, a thin grey
 * border around each PNG (so white images stay visible): an HTML fragment.
 */
export function imageGrid(items: GridItem[], { columns = 4, width = 160, title = "", border = true } = {}): string {
  const cells = items.map(({ image, caption }) => {
    const picture = typeof image === "string" ? image : imgTag(image, width, border);
    const below = caption
      ? `<div style="font-size:12px;white-space:pre-wrap;max-width:${width}px">${escapeHtml(caption)}</div>`
      : "";
    return `<div style="display:flex;flex-direction:column;gap:4px">${picture}${below}</div>`;
  });
  const heading = title ? `<div style="font-weight:bold;margin-bottom:6px">${escapeHtml(title)}</div>` : "";
  return `<div>${heading}<div style="display:grid;grid-template-columns:repeat(${columns}, max-content);` +
    `gap:12px;align-items:start">${cells.join("")}</div></div>`;
}

/** SVG or HTML pieces next to each other, top-aligned: an HTML fragment. */
export function sideBySide(parts: string[], gap = 24): string {
  return `<div style="display:flex;flex-wrap:wrap;gap:${gap}px;align-items:flex-start">` +
    parts.map((p) => `<div>${p}</div>`).join("") + "</div>";
}

// ---- Tables ----------------------------------------------------------------------------

/** A table cell: text (escaped), a number (formatted), or `{ html }` shown as it is. */
export type Cell = string | number | { html: string; title?: string };

/** An HTML table. `highlight(rowIndex)` may return a background colour for a row. */
export function table(
  header: string[],
  rows: Cell[][],
  { caption = "", highlight = (_row: number): string | undefined => undefined, monospace = false } = {},
): string {
  const cell = (c: Cell, tag: string) => {
    const content = typeof c === "number" ? formatNumber(c) : typeof c === "string" ? escapeHtml(c) : c.html;
    const title = typeof c === "object" && c.title ? ` title="${escapeHtml(c.title)}"` : "";
    return `<${tag}${title} style="padding:2px 8px;border:1px solid #ddd;text-align:left">${content}</${tag}>`;
  };
  const head = `<tr style="background:#f3f3f3">${header.map((h) => cell(h, "th")).join("")}</tr>`;
  const body = rows.map((row, i) => {
    const background = highlight(i);
    return `<tr${background ? ` style="background:${background}"` : ""}>${row.map((c) => cell(c, "td")).join("")}</tr>`;
  });
  const font = monospace ? "font-family:monospace;" : "";
  return `<table style="border-collapse:collapse;${font}font-size:13px">` +
    (caption ? `<caption style="text-align:left;font-weight:bold">${escapeHtml(caption)}</caption>` : "") +
    head + body.join("") + "</table>";
}

// ---- Plots -----------------------------------------------------------------------------

/** One line of a line plot: y values (x = 0, 1, …) or explicit [x, y] points. */
export interface Series {
  name: string;
  values?: ArrayLike<number>;
  points?: [number, number][];
  color?: string;
  dashed?: boolean;
  /** Draw a dot on every point (for sparse series such as a validation loss). */
  dots?: boolean;
}

/** Options of linePlot. */
export interface LinePlotOptions {
  title?: string;
  xLabel?: string;
  yLabel?: string;
  width?: number;
  height?: number;
  /** Fix the x range (e.g. the planned number of steps, so a live plot does not rescale). */
  xMax?: number;
  yMin?: number;
  yMax?: number;
}

/** Lines on shared axes, with a legend: an SVG document. Non-finite points are skipped. */
export function linePlot(series: Series[], options: LinePlotOptions = {}): string {
  const { title = "", xLabel = "", yLabel = "", width = 560, height = 300 } = options;
  const lines = series.map((s, i) => ({
    ...s,
    color: s.color ?? categoryColor(i),
    points: (s.points ?? Array.from(s.values ?? [], (y, x) => [x, y] as [number, number]))
      .filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y)),
  }));
  const all = lines.flatMap((l) => l.points);
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  const x0 = Math.min(0, ...xs), x1 = options.xMax ?? Math.max(1, ...xs);
  let y0 = options.yMin ?? Math.min(...ys, Infinity), y1 = options.yMax ?? Math.max(...ys, -Infinity);
  if (!Number.isFinite(y0) || !Number.isFinite(y1)) [y0, y1] = [0, 1];
  if (y1 - y0 < 1e-12) [y0, y1] = [y0 - 1, y1 + 1];
  const pad = (y1 - y0) * 0.05;
  if (options.yMin === undefined) y0 -= pad;
  if (options.yMax === undefined) y1 += pad;

  const left = 56, right = 16, top = title ? 28 : 12, bottom = xLabel ? 42 : 26;
  // Legend entries flow left to right and wrap (about 7.5 px per character of 12 px text).
  const legend: { x: number; row: number }[] = [];
  let legendX = left, legendRow = 0;
  for (const l of lines) {
    const entryWidth = 34 + 7.5 * l.name.length;
    if (legendX + entryWidth > width - right && legendX > left) [legendX, legendRow] = [left, legendRow + 1];
    legend.push({ x: legendX, row: legendRow });
    legendX += entryWidth;
  }
  const legendHeight = lines.length > 1 ? 18 * (legendRow + 1) : 0;
  const plotW = width - left - right, plotH = height - top - bottom - legendHeight;
  const X = (x: number) => left + ((x - x0) / (x1 - x0 || 1)) * plotW;
  const Y = (y: number) => top + plotH - ((y - y0) / (y1 - y0)) * plotH;

  let body = title ? text(width / 2, 18, title, 'text-anchor="middle" font-weight="bold" font-size="13"') : "";
  for (const t of niceTicks(y0, y1)) {
    body += `<line x1="${left}" x2="${left + plotW}" y1="${Y(t)}" y2="${Y(t)}" stroke="#e5e5e5"/>`;
    body += text(left - 6, Y(t) + 4, formatNumber(t), 'text-anchor="end" fill="#555"');
  }
  for (const t of niceTicks(x0, x1)) {
    body += `<line x1="${X(t)}" x2="${X(t)}" y1="${top}" y2="${top + plotH}" stroke="#f0f0f0"/>`;
    body += text(X(t), top + plotH + 16, formatNumber(t), 'text-anchor="middle" fill="#555"');
  }
  body += `<rect x="${left}" y="${top}" width="${plotW}" height="${plotH}" fill="none" stroke="#999"/>`;
  if (xLabel) body += text(left + plotW / 2, top + plotH + 34, xLabel, 'text-anchor="middle"');
  if (yLabel) {
    body += text(14, top + plotH / 2, yLabel, `text-anchor="middle" transform="rotate(-90 14 ${top + plotH / 2})"`);
  }
  for (const l of lines) {
    const path = l.points.map(([x, y], i) => `${i ? "L" : "M"}${X(x).toFixed(1)},${Y(y).toFixed(1)}`).join("");
    if (path) {
      body += `<path d="${path}" fill="none" stroke="${l.color}" stroke-width="2"` +
        `${l.dashed ? ' stroke-dasharray="6 4"' : ""}/>`;
    }
    if (l.dots) {
      for (const [x, y] of l.points) body += `<circle cx="${X(x)}" cy="${Y(y)}" r="3.5" fill="${l.color}"/>`;
    }
  }
  if (legendHeight) {
    lines.forEach((l, i) => {
      const { x, row } = legend[i], y = height - legendHeight + 18 * row + 12;
      body += `<line x1="${x}" x2="${x + 18}" y1="${y - 4}" y2="${y - 4}" stroke="${l.color}" stroke-width="3"` +
        `${l.dashed ? ' stroke-dasharray="6 4"' : ""}/>`;
      body += text(x + 22, y, l.name);
    });
  }
  return svgDocument(width, height, body);
}

/** One bar of a bar chart. */
export interface Bar {
  label: string;
  value: number;
  color?: string;
}

/** Horizontal bars with their labels on the left and values on the right: an SVG document. */
export function barChart(
  bars: Bar[],
  { title = "", width = 360, barHeight = 18, max = undefined as number | undefined, labelWidth = 110 } = {},
): string {
  const top = title ? 26 : 6, valueWidth = 52, plotW = width - labelWidth - valueWidth - 8;
  const top1 = max ?? Math.max(1e-12, ...bars.map((b) => b.value));
  let body = title ? text(4, 16, title, 'font-weight="bold" font-size="13"') : "";
  bars.forEach((b, i) => {
    const y = top + i * (barHeight + 4), w = Math.max(0, (b.value / top1) * plotW);
    body += text(labelWidth - 6, y + barHeight - 5, b.label, 'text-anchor="end" font-family="monospace"');
    body += `<rect x="${labelWidth}" y="${y}" width="${w.toFixed(1)}" height="${barHeight}" ` +
      `fill="${b.color ?? CATEGORY_COLORS[0]}"/>`;
    body += text(labelWidth + w + 4, y + barHeight - 5, formatNumber(b.value), 'fill="#333"');
  });
  return svgDocument(width, top + bars.length * (barHeight + 4) + 4, body);
}

/** Options of heatmap. */
export interface HeatmapOptions {
  title?: string;
  rowLabels?: string[];
  colLabels?: string[];
  /** Pixels per cell (its height, and its width unless `cellWidth` is given). */
  cell?: number;
  /** Pixels per cell horizontally, for wide matrices. */
  cellWidth?: number;
  /** The colour range; default: the finite values' minimum and maximum. */
  min?: number;
  max?: number;
  /** Blue–white–red around 0 instead of viridis (for signed values such as weights). */
  signed?: boolean;
  /** Write each value in its cell. */
  showValues?: boolean;
  /** Values at or below this are drawn as masked (dark, crossed), like −∞ (default: −1e30). */
  maskedBelow?: number;
}

/**
 * A matrix as coloured cells, with a colour bar: an SVG document. −∞ (and anything at
 * or below `maskedBelow`, such as float32's most negative value used for padding) is
 * drawn as a dark crossed cell: "masked".
 */
export function heatmap(matrix: ArrayLike<number>[], options: HeatmapOptions = {}): string {
  const { title = "", rowLabels, colLabels, showValues = false, signed = false, maskedBelow = -1e30 } = options;
  const rows = matrix.length, cols = rows ? matrix[0].length : 0;
  const cell = options.cell ?? Math.max(4, Math.min(28, Math.floor(360 / Math.max(rows, cols, 1))));
  const cellW = options.cellWidth ?? cell;
  const masked = (v: number) => v <= maskedBelow || v === -Infinity;
  const finite = matrix.flatMap((r) => Array.from(r)).filter((v) => Number.isFinite(v) && !masked(v));
  let lo = options.min ?? Math.min(...finite, Infinity), hi = options.max ?? Math.max(...finite, -Infinity);
  if (!Number.isFinite(lo) || !Number.isFinite(hi)) [lo, hi] = [0, 1];
  if (signed) hi = Math.max(Math.abs(lo), Math.abs(hi)), lo = -hi;
  const colour = (v: number) => signed ? diverging(hi > 0 ? v / hi : 0) : viridis(hi > lo ? (v - lo) / (hi - lo) : 0.5);

  const labelFont = Math.min(11, Math.max(7, Math.min(cell, cellW) - 2));
  const left = rowLabels ? 8 + Math.max(...rowLabels.map((l) => l.length)) * labelFont * 0.62 : 4;
  const top = (title ? 24 : 4) + (colLabels ? 8 + Math.max(...colLabels.map((l) => l.length)) * labelFont * 0.62 : 0);
  let body = title ? text(4, 16, title, 'font-weight="bold" font-size="13"') : "";
  for (let r = 0; r < rows; r++) {
    for (let c = 0; c < cols; c++) {
      const v = matrix[r][c], x = left + c * cellW, y = top + r * cell;
      if (masked(v)) {
        body += `<rect x="${x}" y="${y}" width="${cellW}" height="${cell}" fill="#333"/>`;
        if (cell >= 8 && cellW >= 8) {
          body += `<path d="M${x + 2},${y + 2}L${x + cellW - 2},${y + cell - 2}" stroke="#777" stroke-width="1"/>`;
        }
      } else body += `<rect x="${x}" y="${y}" width="${cellW}" height="${cell}" fill="${colour(v)}"/>`;
      if (showValues && cell >= 20 && cellW >= 20 && !masked(v)) {
        const t = signed ? 0 : hi > lo ? (v - lo) / (hi - lo) : 0.5;
        const ink = t > 0.6 ? "#000" : signed ? "#000" : "#fff";
        body += text(
          x + cell / 2,
          y + cell / 2 + 3,
          formatNumber(v),
          `text-anchor="middle" font-size="9" fill="${ink}"`,
        );
      }
    }
  }
  rowLabels?.forEach((l, r) => {
    body += text(left - 4, top + r * cell + cell / 2 + labelFont / 3, l, `text-anchor="end" font-size="${labelFont}"`);
  });
  colLabels?.forEach((l, c) => {
    const x = left + c * cellW + cellW / 2 + labelFont / 3, y = top - 4;
    body += text(x, y, l, `font-size="${labelFont}" transform="rotate(-90 ${x} ${y})"`);
  });
  // Colour bar.
  const barX = left + cols * cellW + 14, barH = Math.max(60, rows * cell);
  for (let k = 0; k < 32; k++) {
    const v = hi - ((k + 0.5) / 32) * (hi - lo);
    body += `<rect x="${barX}" y="${top + (k * barH) / 32}" width="10" height="${barH / 32 + 0.5}" fill="${
      colour(v)
    }"/>`;
  }
  body += text(barX + 14, top + 9, formatNumber(hi), 'font-size="10"');
  body += text(barX + 14, top + barH, formatNumber(lo), 'font-size="10"');
  const hasMask = matrix.some((r) => Array.from(r).some(masked));
  if (hasMask) {
    body += `<rect x="${barX}" y="${top + barH + 8}" width="10" height="10" fill="#333"/>`;
    body += text(barX + 14, top + barH + 17, "masked", 'font-size="10"');
  }
  const width = Math.max(barX + 14 + 48, title.length * 7.5 + 8),
    height = Math.max(top + rows * cell, top + barH + (hasMask ? 22 : 0)) + 6;
  return svgDocument(width, height, body);
}

/** A cell of a labelled grid: its text and fill colour. */
export interface GridCell {
  label: string;
  color?: string;
}

/**
 * Boxes in rows and columns, each with a label (e.g. which patch a pixel-shuffled token
 * holds): an SVG document. `cellWidth` fits longer labels.
 */
export function labelledGrid(
  cells: GridCell[][],
  options: { title?: string; cell?: number; cellWidth?: number; rowLabels?: string[] } = {},
): string {
  const { title = "", cell = 40, cellWidth = cell, rowLabels } = options;
  const top = title ? 26 : 4, left = rowLabels ? 12 + Math.max(...rowLabels.map((l) => l.length)) * 7 : 4;
  let body = title ? text(4, 16, title, 'font-weight="bold" font-size="13"') : "";
  cells.forEach((row, r) => {
    if (rowLabels) body += text(left - 6, top + r * cell + cell / 2 + 4, rowLabels[r], 'text-anchor="end"');
    row.forEach((c, k) => {
      const x = left + k * cellWidth, y = top + r * cell;
      body += `<rect x="${x}" y="${y}" width="${cellWidth}" height="${cell}" fill="${c.color ?? "#fff"}" ` +
        `stroke="#333" stroke-width="1"/>`;
      body += text(x + cellWidth / 2, y + cell / 2 + 4, c.label, 'text-anchor="middle" font-size="12"');
    });
  });
  const width = Math.max(left + Math.max(0, ...cells.map((r) => r.length)) * cellWidth + 6, title.length * 7.5 + 8);
  return svgDocument(width, top + cells.length * cell + 6, body);
}

/**
 * Rotation angles as points on unit circles, one panel per frequency: the point of
 * position p sits at angle angles[p] (radians), labelled with p. Shows how RoPE turns
 * a pair of coordinates a little further at every position.
 */
export function rotationCircles(
  panels: { title: string; angles: ArrayLike<number> }[],
  { radius = 60, labelEvery = 1 } = {},
): string {
  const size = 2 * radius + 36, top = 22;
  let body = "";
  panels.forEach((panel, i) => {
    const cx = i * size + size / 2, cy = top + size / 2;
    body += text(cx, 14, panel.title, 'text-anchor="middle" font-size="11"');
    body += `<circle cx="${cx}" cy="${cy}" r="${radius}" fill="none" stroke="#bbb"/>`;
    body += `<line x1="${cx}" y1="${cy}" x2="${cx + radius}" y2="${cy}" stroke="#bbb"/>`;
    const n = panel.angles.length;
    for (let p = 0; p < n; p++) {
      const a = panel.angles[p], x = cx + radius * Math.cos(a), y = cy - radius * Math.sin(a);
      body += `<circle cx="${x.toFixed(1)}" cy="${y.toFixed(1)}" r="4" fill="${viridis(n > 1 ? p / (n - 1) : 0)}"/>`;
      if (p % labelEvery === 0) {
        const lx = cx + (radius + 12) * Math.cos(a), ly = cy - (radius + 12) * Math.sin(a) + 4;
        body += text(lx, ly, String(p), 'text-anchor="middle" font-size="9" fill="#333"');
      }
    }
  });
  return svgDocument(panels.length * size, top + size + 4, body);
}

// ---- Token sequences -------------------------------------------------------------------

/** A token shown in a strip: its text, a background colour, and a tooltip. */
export interface TokenBox {
  text: string;
  color?: string;
  title?: string;
}

/**
 * A token sequence as a row of boxes (newlines shown as ↵, spaces as ·), wrapping like
 * text: an HTML fragment. `label` goes in front, e.g. a row's name.
 */
export function tokenStrip(tokens: TokenBox[], label = ""): string {
  const box = (t: TokenBox) => {
    const shown = escapeHtml(t.text.replaceAll("\n", "↵").replaceAll(" ", "·"));
    const title = t.title ? ` title="${escapeHtml(t.title)}"` : "";
    return `<span${title} style="display:inline-block;margin:1px;padding:1px 4px;border:1px solid #999;` +
      `border-radius:3px;font-family:monospace;font-size:12px;background:${t.color ?? "#fff"}">${shown}</span>`;
  };
  const head = label
    ? `<span style="display:inline-block;min-width:70px;font-size:12px">${escapeHtml(label)}</span>`
    : "";
  return `<div style="line-height:1.9">${head}${tokens.map(box).join("")}</div>`;
}
