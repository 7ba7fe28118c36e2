// Solution to exercise 07 (one KV-cache decoding step), written as a student might:
// the decode loop of generate(), block by block.
import * as tf from "@tensorflow/tfjs";
import {
  decoderBlock,
  type KVCache,
  lmHead,
  type Params,
  rmsNorm,
  rotaryEmbedding,
  type VLMConfig,
} from "../../nanovlm.ts";

/** One decode step: logits [B, V] for the token after tokenIds, and every block's cache grown by one. */
export function decodeStep(
  p: Params,
  cfg: VLMConfig,
  tokenIds: number[],
  cache: KVCache[],
  position: number,
): { logits: tf.Tensor; cache: KVCache[] } {
  return tf.tidy(() => {
    const B = tokenIds.length;
    let x: tf.Tensor = tf.gather(p.get("decoder.token_embedding.weight")!, tf.tensor2d(tokenIds, [B, 1], "int32")); // [B, 1, D]
    const rope = rotaryEmbedding(cfg, [position]); // the cache holds positions 0 … position−1
    const grown: KVCache[] = [];
    for (let i = 0; i < cfg.lm_n_blocks; i++) {
      const block = decoderBlock(p, cfg, i, x, rope, undefined, cache[i]); // one new token: no causal mask
      x = block.out;
      grown.push(block.cache);
    }
    const hidden = rmsNorm(x, p.get("decoder.norm.weight")!, cfg.lm_rms_eps).reshape([B, cfg.lm_hidden_dim]);
    return { logits: lmHead(p, cfg, hidden), cache: grown }; // logits [B, V]
  });
}
