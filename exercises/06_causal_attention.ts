// Exercise 06 · Causal grouped-query attention                        about 45 minutes
//
// The heart of the decoder. Each token looks at itself and the tokens before it, never
// after (causal), and SmolLM2 saves memory with grouped-query attention (GQA,
// arXiv:2305.13245): H query heads share KV key/value heads, rep = H / KV query heads
// per key/value head. Query head h uses key/value head floor(h / rep) — heads 0 … rep−1
// use KV head 0, the next rep use KV head 1, … (PyTorch's repeat_interleave; not h % KV).
//
// Write the whole attention layer of one decoder block:
//   1. Project: q = x·Wq, k = x·Wk, v = x·Wv (no biases). The weights are in `p`:
//        p.get(`${prefix}.q_proj.weight`)  [D, H·hd]
//        p.get(`${prefix}.k_proj.weight`)  [D, KV·hd]
//        p.get(`${prefix}.v_proj.weight`)  [D, KV·hd]
//        p.get(`${prefix}.out_proj.weight`) [H·hd, D]
//      stored [in, out], so `linear(x, w)` from nanovlm.ts computes x·w for any rank.
//   2. Split heads: [B, T, H·hd] → [B, T, H, hd] → [B, H, T, hd] (same for k, v with KV).
//   3. Rotate q and k (not v) with `applyRotary(q, rope)` from nanovlm.ts.
//   4. Scores: for each query head h, q_h · k_{floor(h/rep)}ᵀ / √hd    → [B, H, T, T]
//   5. Causal mask: score[…, i, j] = −Infinity where key j comes after query i (j > i).
//   6. Softmax over the keys (last axis), times v_{floor(h/rep)}         → [B, H, T, hd]
//   7. Merge heads: → [B, T, H, hd] → [B, T, H·hd], then out = linear(…, out_proj weight).
//
// Shapes (legend of nanovlm.ts: B batch, T tokens, D decoder width, H query heads,
// KV key/value heads, hd head size = D / H):
//   x          [B, T, D]
//   rope       { cos, sin } each [T, hd], for positions 0 … T−1
//   cfg        cfg.lm_n_heads = H, cfg.lm_n_kv_heads = KV, cfg.lm_hidden_dim = D
//   →          [B, T, D]
//
// tfjs that helps: reshape, transpose, tf.matMul(a, b, transposeA, transposeB) (batched
// over leading axes of equal size), tf.softmax, tf.gather(k, headIndex, 1) to pick
// the key/value head of every query head, tf.linalg.bandPart(tf.ones([T, T]), -1, 0)
// (ones on and below the diagonal), tf.where(cond, a, b), tf.fill.
//
// Check:        deno task exercise causal_attention
// Afterwards:   compare with `decoderAttention` and `attentionBias` in nanovlm.ts
//               ("Language model"): it avoids copying k and v by stacking each group's
//               query heads along the token axis.

// deno-lint-ignore-file no-unused-vars -- the parameters stay unused until you write the body
import * as tf from "@tensorflow/tfjs";
import { applyRotary, linear, type Params, type Rope, type VLMConfig } from "../nanovlm.ts";
import { TodoError } from "./todo.ts";

/** One block's causal grouped-query self-attention, no KV cache. x [B, T, D] → [B, T, D] */
export function causalSelfAttention(
  p: Params,
  prefix: string,
  cfg: VLMConfig,
  x: tf.Tensor,
  rope: Rope,
): tf.Tensor {
  throw new TodoError("causalSelfAttention: project, split heads, rotate q and k, masked softmax(q·kᵀ/√hd)·v, merge");
}
