// Exercise 07 · One decoding step with a KV cache                     about 30 minutes
//
// Generating text means running the decoder once per new token. Recomputing the whole
// sequence every time would cost T² work; instead every block keeps the keys and values
// it has already computed (the KV cache, already rotated by RoPE), and each step feeds
// only the newest token. This is the loop inside `VisionLanguageModel.generate`.
//
// Write one step: the batch's newest tokens in, next-token logits and the grown cache out.
//   1. Embed: rows of p.get("decoder.token_embedding.weight") [V, D] for tokenIds → [B, 1, D].
//   2. RoPE tables for the new token's position. The cache already holds `position`
//      tokens (positions 0 … position−1), so the new one sits at `position`:
//      rotaryEmbedding(cfg, [position]).
//   3. Every block i in order: decoderBlock(p, cfg, i, x, rope, bias, cache[i]) returns
//      { out, cache } — it appends the new key and value to cache[i]. Which bias? A
//      causal mask hides *later* tokens, and a single new token has none: pass undefined.
//   4. The final RMSNorm, p.get("decoder.norm.weight") with cfg.lm_rms_eps, then the
//      output head lmHead(p, cfg, hidden) on the [B, D] hidden states → logits [B, V].
//   5. Memory: tfjs frees intermediate tensors only inside tf.tidy (or with dispose).
//      generate() calls this once per token, so wrap the body in
//      tf.tidy(() => { …; return { logits, cache }; }) — the check counts tensors.
//      Do not dispose the cache you were given: the caller does.
// Do not call `decoder` itself: that is the function you are rebuilding.
//
// Shapes (legend of nanovlm.ts: B batch, D decoder width, V vocabulary, KV key/value
// heads, hd head size, Tk cached tokens):
//   tokenIds  B numbers (one new token per sequence)
//   cache     one { k, v } per block, each [B, KV, Tk, hd] with Tk = position
//   →         { logits [B, V], cache: one { k, v } per block, each [B, KV, Tk + 1, hd] }
//
// From nanovlm.ts: rotaryEmbedding, decoderBlock, rmsNorm, lmHead. From tfjs: tf.tidy,
// tf.gather(table, indices), tf.tensor2d(values, shape, "int32"), reshape.
//
// Check:        deno task exercise kv_cache_step
// Afterwards:   compare with `decoder` and the decode loop of `generate` in nanovlm.ts.

// deno-lint-ignore-file no-unused-vars -- the parameters stay unused until you write the body
import * as tf from "@tensorflow/tfjs";
import {
  decoderBlock,
  type KVCache,
  lmHead,
  type Params,
  rmsNorm,
  rotaryEmbedding,
  type VLMConfig,
} from "../nanovlm.ts";
import { TodoError } from "./todo.ts";

/** One decode step: logits [B, V] for the token after tokenIds, and every block's cache grown by one. */
export function decodeStep(
  p: Params,
  cfg: VLMConfig,
  tokenIds: number[],
  cache: KVCache[],
  position: number,
): { logits: tf.Tensor; cache: KVCache[] } {
  throw new TodoError("decodeStep: embed the new tokens, run every block with its cache at `position`, norm, head");
}
