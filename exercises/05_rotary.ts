// Exercise 05 · Rotary position embeddings (RoPE)                     about 30 minutes
//
// Attention by itself does not know where a token is. Llama-style decoders rotate every
// query and key vector by an angle that grows with the token's position (RoFormer,
// arXiv:2104.09864): then q·k depends only on the distance between the two tokens.
// A head vector of size hd is seen as hd/2 pairs; pair i turns at its own frequency
//
//   inv_freq[i] = 1 / base^(2i / hd)            i = 0 … hd/2 − 1   (base = lm_re_base)
//   angle[t, i] = positions[t] · inv_freq[i]
//
// Two parts, both checked:
//
// (a) rotaryTables: cos and sin of the angles, as tables [T, hd] in Hugging Face Llama's
//     "rotate half" layout: the hd/2 angles, then the same hd/2 angles again,
//       cos[t] = [cos(angle[t, 0]), …, cos(angle[t, hd/2 − 1]), cos(angle[t, 0]), …, cos(angle[t, hd/2 − 1])]
//     and the same for sin.
//
// (b) applyRotary: pair i is (x_i, x_{i + hd/2}) — the two halves of the vector, not
//     neighbours — rotated by its angle. With x1 = the first half, x2 = the second half:
//       rotate_half(x) = concat(−x2, x1)
//       out            = x · cos + rotate_half(x) · sin
//     so out_i = x_i·cos − x_{i+hd/2}·sin and out_{i+hd/2} = x_{i+hd/2}·cos + x_i·sin.
//
// Shapes (legend of nanovlm.ts: B batch, T tokens, H heads, hd head size):
//   positions  T numbers (e.g. [7, 8, 9] for three tokens after a 7-token prompt)
//   cos, sin   [T, hd]
//   x          [B, H, T, hd]   queries or keys; the tables broadcast over B and H
//   →          [B, H, T, hd]
//
// tfjs that helps: tf.range, tf.pow, tf.tensor2d (or compute the angles in a JS loop),
// tf.cos, tf.sin, tf.concat(tensors, axis), tf.split(x, 2, -1), .neg().
//
// Check:        deno task exercise rotary
// Afterwards:   compare with `rotaryEmbedding` and `applyRotary` in nanovlm.ts
//               ("Language model"); the real one also rescales for very long contexts.

// deno-lint-ignore-file no-unused-vars -- the parameters stay unused until you write the bodies
import * as tf from "@tensorflow/tfjs";
import { TodoError } from "./todo.ts";

/** cos and sin tables [T, hd] for the given positions, the hd/2 angles repeated twice. */
export function rotaryTables(positions: number[], hd: number, base: number): { cos: tf.Tensor; sin: tf.Tensor } {
  throw new TodoError(
    "rotaryTables: angle[t, i] = positions[t] / base^(2i/hd); return cos and sin of [angles, angles]",
  );
}

/** Rotate each (x_i, x_{i+hd/2}) pair: x·cos + rotate_half(x)·sin. x [B, H, T, hd], cos/sin [T, hd] */
export function applyRotary(x: tf.Tensor, cos: tf.Tensor, sin: tf.Tensor): tf.Tensor {
  throw new TodoError("applyRotary: return x·cos + concat(−x2, x1)·sin, where x1, x2 are the halves of x");
}
