// Exercise 03 · Pixel shuffle                                         about 20 minutes
//
// The ViT gives one vector per patch: Np = 64 vectors per image for nanoVLM-222M, too
// many tokens for a small language model. The modality projector first applies a pixel
// shuffle (space-to-depth, as in Idefics3, arXiv:2408.12637): every s×s block of
// neighbouring patches becomes one token, its s² patch vectors concatenated. s² times
// fewer tokens, each s² times wider; one linear layer then maps them to the decoder width.
//
// The patches of an image form a G×G grid (G = √Np), row-major: patch number r·G + c.
// Output token (oy, ox), numbered oy·(G/s) + ox, is the s×s block of patches whose
// rows are oy·s … oy·s + s−1 and columns ox·s … ox·s + s−1. Its vector is the
// concatenation of those patch vectors, row by row inside the block:
//   out[n, oy·(G/s) + ox, (sy·s + sx)·Dv + d]  =  x[n, (oy·s + sy)·G + (ox·s + sx), d]
//
// Shapes (legend of nanovlm.ts: N images, Np patches per image, Dv vision width,
// s shuffle factor, L = Np/s² image tokens):
//   x  [N, Np, Dv]   (Np is a square number, and √Np is divisible by s)
//   →  [N, L, s²·Dv]
//
// tfjs that helps: reshape to [N, G/s, s, G/s, s, Dv] (block row, row in block, block
// column, column in block), transpose so that both block axes come first, then reshape.
// A plain reshape to [N, L, s²·Dv] is the classic mistake: it groups patches that are
// neighbours in the sequence (same row), not neighbours in the image.
//
// Check:        deno task exercise pixel_shuffle
// Afterwards:   compare with `pixelShuffle` in nanovlm.ts ("Modality projector").

// deno-lint-ignore-file no-unused-vars -- the parameters stay unused until you write the body
import * as tf from "@tensorflow/tfjs";
import { TodoError } from "./todo.ts";

/** Space-to-depth: each s×s block of patches becomes one token. [N, Np, Dv] → [N, Np/s², s²·Dv] */
export function pixelShuffle(x: tf.Tensor, s: number): tf.Tensor {
  throw new TodoError("pixelShuffle: turn each s×s block of the patch grid into one token of width s²·Dv");
}
