// Solution to exercise 06 (causal grouped-query attention), written as a student might:
// copy each key/value head to the query heads that use it (a gather on the head axis),
// then ordinary causal multi-head attention. nanovlm.ts avoids the copies instead.
import * as tf from "@tensorflow/tfjs";
import { applyRotary, linear, type Params, type Rope, type VLMConfig } from "../../nanovlm.ts";

/** One block's causal grouped-query self-attention, no KV cache. x [B, T, D] → [B, T, D] */
export function causalSelfAttention(
  p: Params,
  prefix: string,
  cfg: VLMConfig,
  x: tf.Tensor,
  rope: Rope,
): tf.Tensor {
  const [B, T] = x.shape;
  const H = cfg.lm_n_heads, KV = cfg.lm_n_kv_heads, hd = cfg.lm_hidden_dim / H, rep = H / KV;
  const heads = (t: tf.Tensor, n: number) => t.reshape([B, T, n, hd]).transpose([0, 2, 1, 3]); // [B, n, T, hd]
  const q = applyRotary(heads(linear(x, p.get(`${prefix}.q_proj.weight`)!), H), rope);
  const k = applyRotary(heads(linear(x, p.get(`${prefix}.k_proj.weight`)!), KV), rope);
  const v = heads(linear(x, p.get(`${prefix}.v_proj.weight`)!), KV);

  // Query head h reads key/value head floor(h / rep): [0, 0, 1, 1] for H = 4, KV = 2.
  const kvHead = tf.tensor1d(Array.from({ length: H }, (_, h) => Math.floor(h / rep)), "int32");
  const kH = tf.gather(k, kvHead, 1), vH = tf.gather(v, kvHead, 1); // [B, H, T, hd]

  const scores = tf.matMul(q, kH, false, true).div(Math.sqrt(hd)); // [B, H, T, T]
  const visible = tf.linalg.bandPart(tf.ones([T, T]), -1, 0).cast("bool"); // key j ≤ query i
  const masked = tf.where(visible, scores, tf.fill(scores.shape, -Infinity));
  const out = tf.matMul(tf.softmax(masked, -1), vH); // [B, H, T, hd]
  const merged = out.transpose([0, 2, 1, 3]).reshape([B, T, H * hd]); // [B, T, D]
  return linear(merged, p.get(`${prefix}.out_proj.weight`)!);
}
