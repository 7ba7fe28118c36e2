// Exercise 01 · RMSNorm                                               about 10 minutes
//
// Every block of the language model normalises its input with RMSNorm before attention
// and before the MLP, and the decoder normalises once more before the output head
// (Zhang & Sennrich 2019, arXiv:1910.07467). Unlike LayerNorm it subtracts no mean and
// adds no bias: it rescales each token vector to a root-mean-square of 1, then
// multiplies every channel by a learned gain.
//
//   rms(x) = sqrt( mean of x² over the last axis  +  eps )
//   y      = x / rms(x) · weight
//
// Shapes (the legend of nanovlm.ts: B batch, T tokens, D decoder width):
//   x       [B, T, D]   normalise over the last axis only; any rank should work
//   weight  [D]         one gain per channel, broadcast over B and T
//   eps     a small number (lm_rms_eps = 1e-5) that keeps the division finite
//   →       [B, T, D]
//
// tfjs that helps: x.square(), x.mean(axis, keepDims), tf.sqrt or tf.rsqrt, .add, .mul, .div.
// With keepDims = true the averaged axis stays as size 1, so the result broadcasts against x.
//
// Check:        deno task exercise rms_norm
// Afterwards:   compare with `rmsNorm` in nanovlm.ts ("Small tensor helpers").

// deno-lint-ignore-file no-unused-vars -- the parameters stay unused until you write the body
import * as tf from "@tensorflow/tfjs";
import { TodoError } from "./todo.ts";

/** RMSNorm over the last axis: x / sqrt(mean(x²) + eps) · weight. */
export function rmsNorm(x: tf.Tensor, weight: tf.Tensor, eps: number): tf.Tensor {
  throw new TodoError("rmsNorm: return x / sqrt(mean(x², last axis) + eps) · weight");
}
