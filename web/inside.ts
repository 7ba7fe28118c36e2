// web/inside.ts — the "see inside" views of the Ask tab: the patch grid over the image, each ViT block's attention
// from a clicked patch, the image tokens the projector makes, and the fused sequence the decoder reads.
//
// Everything is computed with nanovlm.ts's own stage functions (visionEncoder with its attention probe,
// modalityProjector), on the same pixels that are asked about. Shapes as in nanovlm.ts: S image side, P patch side,
// G = S/P patches per side, Np = G·G patches, H heads, L image tokens, D decoder width.

/// <reference lib="dom" />

import * as tf from "@tensorflow/tfjs";
import { modalityProjector, visionEncoder, type VisionLanguageModel } from "../nanovlm.ts";

/** What the views draw, read from the model once per image. */
export interface InsideView {
  S: number;
  P: number;
  G: number;
  heads: number;
  /** The image, S×S RGB bytes. */
  rgb: Uint8Array;
  /** Per ViT block, its softmaxed attention [H, Np, Np] (row: the patch that looks). */
  attention: Float32Array[];
  /** The modality projector's output [L, D]: what goes into the L image slots. */
  imageTokens: Float32Array;
  L: number;
  D: number;
  /** The pixel-shuffle factor s: image token k is made of an s×s block of patches. */
  shuffle: number;
}

/** Run the ViT and the projector on one image (pixels [3, S, S] in [0, 1], rgb its bytes) and keep what they show. */
export async function lookInside(
  model: VisionLanguageModel,
  pixels: Float32Array,
  rgb: Uint8Array,
): Promise<InsideView> {
  const cfg = model.cfg, S = cfg.vit_img_size;
  const kept: tf.Tensor[] = []; // the attention of each block, then the image tokens
  tf.tidy(() => {
    const images = tf.tensor4d(pixels, [1, 3, S, S]);
    // The probe's weights [1, H, Np, Np] live only during the call: a copy is kept to read afterwards.
    const patches = visionEncoder(model.params, cfg, images, (_block, weights) => kept.push(tf.keep(weights.clone())));
    kept.push(tf.keep(modalityProjector(model.params, cfg, patches))); // [1, L, D]
  });
  const values = await Promise.all(kept.map((t) => t.data() as Promise<Float32Array>));
  const [L, D] = kept[kept.length - 1].shape.slice(1);
  tf.dispose(kept);
  return {
    S,
    P: cfg.vit_patch_size,
    G: S / cfg.vit_patch_size,
    heads: cfg.vit_n_heads,
    rgb,
    attention: values.slice(0, -1),
    imageTokens: values[values.length - 1],
    L,
    D,
    shuffle: cfg.mp_pixel_shuffle_factor,
  };
}

// ---- The image and its patch grid ----------------------------------------------------------

/** Draw S×S RGB bytes onto a canvas of that size, each pixel scaled by `brightness[pixel]` (default 1). */
function putPixels(
  canvas: HTMLCanvasElement,
  rgb: Uint8Array,
  S: number,
  brightness?: (x: number, y: number) => number,
) {
  canvas.width = canvas.height = S;
  const context = canvas.getContext("2d")!;
  const picture = context.createImageData(S, S);
  for (let y = 0; y < S; y++) {
    for (let x = 0; x < S; x++) {
      const i = y * S + x, scale = brightness ? brightness(x, y) : 1;
      for (let c = 0; c < 3; c++) picture.data[i * 4 + c] = rgb[i * 3 + c] * scale;
      picture.data[i * 4 + 3] = 255;
    }
  }
  context.putImageData(picture, 0, 0);
}

/** S×S RGB bytes drawn over the whole of a larger canvas, each pixel a square. Returns the canvas's context. */
export function drawEnlarged(canvas: HTMLCanvasElement, rgb: Uint8Array, S: number): CanvasRenderingContext2D {
  const small = document.createElement("canvas");
  putPixels(small, rgb, S);
  const context = canvas.getContext("2d")!;
  context.imageSmoothingEnabled = false;
  context.drawImage(small, 0, 0, canvas.width, canvas.height);
  return context;
}

/** The image as the model sees it, enlarged (each pixel a square), with the patch grid and `selected` outlined. */
export function drawPatchGrid(canvas: HTMLCanvasElement, rgb: Uint8Array, S: number, P: number, selected: number) {
  const context = drawEnlarged(canvas, rgb, S);
  const side = canvas.width, scale = side / S, G = S / P;
  context.strokeStyle = "rgba(255, 255, 255, 0.6)";
  context.lineWidth = 1;
  for (let k = 1; k < G; k++) {
    context.beginPath();
    context.moveTo(k * P * scale, 0);
    context.lineTo(k * P * scale, side);
    context.moveTo(0, k * P * scale);
    context.lineTo(side, k * P * scale);
    context.stroke();
  }
  context.strokeStyle = "#f00";
  context.lineWidth = 3;
  const [row, col] = [Math.floor(selected / G), selected % G];
  context.strokeRect(col * P * scale + 1.5, row * P * scale + 1.5, P * scale - 3, P * scale - 3);
}

/** The patch under a click on a canvas showing the image (patches row-major). */
export function patchAt(canvas: HTMLCanvasElement, event: MouseEvent, G: number): number {
  const box = canvas.getBoundingClientRect();
  const col = Math.min(G - 1, Math.floor(((event.clientX - box.left) / box.width) * G));
  const row = Math.min(G - 1, Math.floor(((event.clientY - box.top) / box.height) * G));
  return row * G + col;
}

// ---- Attention maps -------------------------------------------------------------------------

/**
 * One map per block and head: the image lit by how much patch `patch` attends to each patch (its row of the
 * softmax, divided by the row's largest weight so that every map uses the whole range).
 */
export function drawAttention(container: HTMLElement, view: InsideView, patch: number): void {
  const { S, P, G, heads, rgb } = view, Np = G * G;
  container.replaceChildren();
  container.style.gridTemplateColumns = `repeat(${heads}, auto)`;
  view.attention.forEach((weights, block) => {
    for (let h = 0; h < heads; h++) {
      const row = weights.subarray((h * Np + patch) * Np, (h * Np + patch + 1) * Np); // [Np]
      const largest = Math.max(...row);
      const canvas = document.createElement("canvas");
      canvas.dataset.testid = `attention-${block}-${h}`;
      putPixels(canvas, rgb, S, (x, y) => 0.15 + 0.85 * row[Math.floor(y / P) * G + Math.floor(x / P)] / largest);
      const context = canvas.getContext("2d")!;
      context.strokeStyle = "#f00";
      context.strokeRect((patch % G) * P + 0.5, Math.floor(patch / G) * P + 0.5, P - 1, P - 1);
      const figure = document.createElement("figure");
      const label = document.createElement("figcaption");
      label.textContent = `block ${block}, head ${h}`;
      figure.append(canvas, label);
      container.append(figure);
    }
  });
}

// ---- Image tokens ---------------------------------------------------------------------------

/** The projector's output as a heat map, one row per image token [L, D]: red positive, blue negative. */
export function drawImageTokens(canvas: HTMLCanvasElement, caption: HTMLElement, view: InsideView): void {
  const { L, D, imageTokens, shuffle } = view;
  canvas.width = D;
  canvas.height = L;
  const context = canvas.getContext("2d")!;
  const picture = context.createImageData(D, L);
  const largest = Math.max(...imageTokens.map(Math.abs));
  imageTokens.forEach((value, i) => {
    const strength = Math.round(255 * (1 - Math.abs(value) / largest)); // 255 at 0, 0 at the largest
    picture.data.set(value >= 0 ? [255, strength, strength, 255] : [strength, strength, 255, 255], i * 4);
  });
  context.putImageData(picture, 0, 0);
  caption.textContent = `${L} image tokens (rows) × ${D} numbers (columns), largest |value| ${largest.toFixed(2)}. ` +
    `Pixel shuffle joins each ${shuffle}×${shuffle} block of neighbouring patches (row-major) into one token, ` +
    `then one linear map takes it to the decoder's width.`;
}

// ---- The fused sequence ---------------------------------------------------------------------

/** One position of the decoder's input. */
export interface SequenceToken {
  text: string;
  /** Which image token fills this slot, for an `<|image|>` slot. */
  imageToken?: number;
  /** Generated by the model rather than given. */
  answer?: boolean;
}

/** The prompt and answer as the decoder reads them, one box per token, image slots marked. */
export function showFusedSequence(container: HTMLElement, tokens: readonly SequenceToken[]): void {
  container.replaceChildren(...tokens.map((token, position) => {
    const box = document.createElement("span");
    const image = token.imageToken !== undefined;
    box.textContent = image ? `image token ${token.imageToken}` : JSON.stringify(token.text).slice(1, -1);
    box.className = image ? "image-slot" : token.answer ? "answer-token" : "";
    box.title = `position ${position}`;
    return box;
  }));
}
