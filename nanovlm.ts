// nanovlm.ts — a small vision-language model in one file, read top to bottom.
//
// What this is: a TypeScript port of nanoVLM (huggingface/nanoVLM at 8374ce1), the educational PyTorch VLM: a
// SigLIP-style vision transformer turns an image into patch vectors, a pixel-shuffle projector squeezes them into a few
// "image tokens" of the decoder's width, and a SmolLM2/Llama-style decoder reads the prompt with those image embeddings
// written into its `<|image|>` slots. Same maths, same parameter names and the same checkpoint format as the reference,
// checked against its outputs (tests/parity_test.ts).
//
// What this is not: the configuration and presets (config.ts), a tokenizer or data pipeline (data.ts), a training
// loop (train.ts), checkpoint files (lib/checkpoint.ts), or backend speed-ups (backend/: faster kernels registered with tfjs from outside, so that the
// maths here stays in its textbook form). No dropout: every nanoVLM preset trains without.
//
// Papers: ViT (arXiv:2010.11929), SigLIP (2303.15343), pixel shuffle as in Idefics3 (2408.12637), Llama (2302.13971):
// RMSNorm, RoPE (2104.09864), SwiGLU (2002.05202), grouped-query attention (2305.13245).
//
// Shape legend used in every comment:
//   B batch (prompts)      T tokens of a prompt    Tk keys (cached + new tokens)
//   N images of a batch   S image side (pixels)    P patch side (pixels)
//   G patches per side (S/P)   Np patches per image (G·G)   s pixel-shuffle factor
//   L image tokens per image (Np/s²)   Dv vision width   D decoder width   V vocabulary
//   H query heads   KV key/value heads   hd head size   F MLP width

import * as tf from "@tensorflow/tfjs";
import { parameterSpecs, validateConfig, type VLMConfig } from "./config.ts";

// The configuration, the presets and the parameter list live in config.ts; re-exported so one import serves.
export * from "./config.ts";

/** A model's weights by nanoVLM name (config.ts `parameterSpecs` lists names, shapes and layouts). */
export type Params = Map<string, tf.Tensor>;

// ---- Small tensor helpers ------------------------------------------------------------

/** y = x · W + b for x of any rank [..., in], W [in, out]; 2-D inside (tfjs has no broadcast-batch matMul gradient). */
export function linear(x: tf.Tensor, weight: tf.Tensor, bias?: tf.Tensor): tf.Tensor {
  const lead = x.shape.slice(0, -1);
  let y = tf.matMul(x.reshape([-1, weight.shape[0]]), weight as tf.Tensor2D); // [rows, out]
  if (bias) y = y.add(bias);
  return y.reshape([...lead, weight.shape[1]!]);
}

/** LayerNorm over the last axis with biased variance, as torch.nn.LayerNorm. */
export function layerNorm(x: tf.Tensor, weight: tf.Tensor, bias: tf.Tensor, eps: number): tf.Tensor {
  const { mean, variance } = tf.moments(x, -1, true);
  return x.sub(mean).mul(tf.rsqrt(variance.add(eps))).mul(weight).add(bias);
}

/** GELU, tanh approximation (SigLIP's gelu_pytorch_tanh): 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))). */
export function geluTanh(x: tf.Tensor): tf.Tensor {
  // On WASM, tanh runs as 2σ(2u) − 1 (backend/runtime.ts): the same function, about five times faster there.
  const u = x.add(x.mul(x).mul(x).mul(0.044715)).mul(Math.sqrt(2 / Math.PI));
  return x.mul(0.5).mul(tf.tanh(u).add(1));
}

/** RMSNorm: x / sqrt(mean(x²) + eps) · w. No mean subtraction and no bias, unlike LayerNorm. */
export function rmsNorm(x: tf.Tensor, weight: tf.Tensor, eps: number): tf.Tensor {
  return x.mul(tf.rsqrt(x.square().mean(-1, true).add(eps))).mul(weight);
}

/** Split heads: [B, T, heads·hd] → [B, heads, T, hd]. */
function splitHeads(x: tf.Tensor, heads: number): tf.Tensor4D {
  const [B, T, width] = x.shape;
  return x.reshape([B, T, heads, width / heads]).transpose([0, 2, 1, 3]);
}

/** Merge heads: [B, heads, T, hd] → [B, T, heads·hd]. */
function mergeHeads(x: tf.Tensor): tf.Tensor3D {
  const [B, heads, T, hd] = x.shape;
  return x.transpose([0, 2, 1, 3]).reshape([B, T, heads * hd]);
}

// ---- Vision encoder (SigLIP-style ViT) -----------------------------------------------

/**
 * Cut images into non-overlapping P×P patches, each flattened in (channel, row, col) order — the order of PyTorch's
 * conv weight [Dv, 3, P, P] — with patches row-major. images [N, 3, S, S] → [N, Np, 3·P·P]
 */
export function patchify(images: tf.Tensor, P: number): tf.Tensor3D {
  const [N, C, S] = images.shape;
  const G = S / P;
  return images
    .reshape([N, C, G, P, G, P]) // split both image axes into (patch index, pixel in patch)
    .transpose([0, 2, 4, 1, 3, 5]) // [N, G, G, 3, P, P]: patch grid first, then pixels
    .reshape([N, G * G, C * P * P]);
}

/** The reference's Conv2d(3, Dv, P, stride P) as patchify + matMul, plus position embedding. → [N, Np, Dv] */
export function patchEmbedding(p: Params, cfg: VLMConfig, images: tf.Tensor): tf.Tensor3D {
  const w = (k: string) => p.get(`vision_encoder.patch_embedding.${k}`)!;
  // SigLIP's normalisation, (x − 0.5) / 0.5, when the config asks for it; nanoVLM feeds ToTensor's [0, 1] as is.
  const pixels = cfg.vit_img_normalize ? images.mul(2).sub(1) : images;
  const patches = patchify(pixels, cfg.vit_patch_size); // [N, Np, 3·P·P]
  return linear(patches, w("conv.weight"), w("conv.bias")).add(w("position_embedding")) as tf.Tensor3D;
}

/**
 * What a caller may watch: each ViT block's attention weights [N, H, Np, Np] (row = the patch that looks, column = the
 * patch it looks at), valid only during the call (read them there, e.g. with arraySync). The browser page draws them.
 */
export type AttentionProbe = (block: number, weights: tf.Tensor4D) => void;

/** Bidirectional multi-head self-attention with one fused q|k|v projection. x [N, Np, Dv] → [N, Np, Dv] */
function vitAttention(
  p: Params,
  prefix: string,
  cfg: VLMConfig,
  x: tf.Tensor,
  probe?: (weights: tf.Tensor4D) => void,
): tf.Tensor {
  const w = (k: string) => p.get(`${prefix}.${k}`)!;
  const H = cfg.vit_n_heads, hd = cfg.vit_hidden_dim / H;
  const qkv = linear(x, w("qkv_proj.weight"), w("qkv_proj.bias")); // [N, Np, 3·Dv]
  const [q, k, v] = tf.split(qkv, 3, -1).map((t) => splitHeads(t, H)); // each [N, H, Np, hd]
  const scores = tf.matMul(q, k, false, true).mul(1 / Math.sqrt(hd)); // [N, H, Np, Np]
  const weights = tf.softmax(scores) as tf.Tensor4D; // [N, H, Np, Np]
  probe?.(weights);
  const out = tf.matMul(weights, v); // [N, H, Np, hd]
  return linear(mergeHeads(out), w("out_proj.weight"), w("out_proj.bias"));
}

/** One pre-LayerNorm transformer block: x + attn(ln1(x)), then + mlp(ln2(x)). x [N, Np, Dv] */
export function vitBlock(p: Params, cfg: VLMConfig, i: number, x: tf.Tensor, probe?: AttentionProbe): tf.Tensor3D {
  const b = `vision_encoder.blocks.${i}`;
  const w = (k: string) => p.get(`${b}.${k}`)!;
  const eps = cfg.vit_ln_eps;
  const watch = probe && ((weights: tf.Tensor4D) => probe(i, weights));
  x = x.add(vitAttention(p, `${b}.attn`, cfg, layerNorm(x, w("ln1.weight"), w("ln1.bias"), eps), watch));
  const h = layerNorm(x, w("ln2.weight"), w("ln2.bias"), eps);
  const hidden = geluTanh(linear(h, w("mlp.fc1.weight"), w("mlp.fc1.bias"))); // [N, Np, vit_inter_dim]
  return x.add(linear(hidden, w("mlp.fc2.weight"), w("mlp.fc2.bias"))) as tf.Tensor3D;
}

/** The whole ViT: every patch token after the final LayerNorm (no CLS, no pooling). images [N,3,S,S] → [N, Np, Dv] */
export function visionEncoder(p: Params, cfg: VLMConfig, images: tf.Tensor, probe?: AttentionProbe): tf.Tensor3D {
  let x = patchEmbedding(p, cfg, images);
  for (let i = 0; i < cfg.vit_n_blocks; i++) x = vitBlock(p, cfg, i, x, probe);
  const w = (k: string) => p.get(`vision_encoder.layer_norm.${k}`)!;
  return layerNorm(x, w("weight"), w("bias"), cfg.vit_ln_eps) as tf.Tensor3D;
}

// ---- Modality projector ---------------------------------------------------------------

/**
 * Pixel shuffle (space-to-depth): every s×s block of neighbouring patches becomes one token, its s² patch vectors
 * concatenated row-major. s² times fewer, s² times wider tokens: the decoder reads L = Np/s² image tokens, not Np.
 * x [N, Np, Dv] → [N, L, s²·Dv]
 */
export function pixelShuffle(x: tf.Tensor, s: number): tf.Tensor3D {
  const [N, Np, Dv] = x.shape;
  const G = Math.sqrt(Np), O = G / s; // O×O output tokens
  return x
    .reshape([N, O, s, O, s, Dv]) // (block row, row in block, block col, col in block)
    .transpose([0, 1, 3, 2, 4, 5]) // [N, O, O, s, s, Dv]: blocks first
    .reshape([N, O * O, s * s * Dv]);
}

/** Pixel shuffle, then one bias-free linear map to the decoder width. [N, Np, Dv] → [N, L, D] */
export function modalityProjector(p: Params, cfg: VLMConfig, x: tf.Tensor): tf.Tensor3D {
  return linear(pixelShuffle(x, cfg.mp_pixel_shuffle_factor), p.get("MP.proj.weight")!) as tf.Tensor3D;
}

// ---- Language model (SmolLM2 / Llama-style decoder) -----------------------------------

/** RoPE tables for some positions: cos and sin [T, hd], each the hd/2 frequencies twice (HF-Llama layout). */
export type Rope = { cos: tf.Tensor2D; sin: tf.Tensor2D };

/**
 * Rotary position embedding: position t turns pair i of a head vector by the angle t·θ^(−2i/hd). Beyond
 * lm_max_position_embeddings the frequencies are divided by (max position + 1) / max ("dynamic scaling"), for the
 * whole call, as nanoVLM's models/language_model.py does.
 */
export function rotaryEmbedding(cfg: VLMConfig, positions: number[]): Rope {
  const hd = cfg.lm_hidden_dim / cfg.lm_n_heads, longest = Math.max(...positions) + 1;
  const scale = longest > cfg.lm_max_position_embeddings ? longest / cfg.lm_max_position_embeddings : 1;
  return tf.tidy(() => {
    // inv_freq[i] = 1 / θ^(2i/hd), in float32 arithmetic like the reference.
    const exponents = tf.range(0, hd, 2, "float32").div(hd);
    const invFreq = tf.pow(tf.scalar(cfg.lm_re_base), exponents).reciprocal().div(scale); // [hd/2]
    const freqs = tf.tensor2d(positions, [positions.length, 1]).mul(invFreq.expandDims(0)); // [T, hd/2]
    const angles = tf.concat([freqs, freqs], -1); // [T, hd]
    const [cos, sin] = [tf.cos(angles), tf.sin(angles)].map((t) => t.mul(cfg.lm_attn_scaling) as tf.Tensor2D);
    return { cos, sin };
  });
}

/** rotate_half: the halves (x₁, x₂) of the last axis become (−x₂, x₁). x [.., hd] */
export function rotateHalf(x: tf.Tensor): tf.Tensor {
  const [x1, x2] = tf.split(x, 2, -1);
  return tf.concat([x2.neg(), x1], -1);
}

/** Rotate each (x_i, x_{i+hd/2}) pair by its position's angle. x [B, heads, T, hd], rope.cos/sin [T, hd] */
export function applyRotary(x: tf.Tensor, rope: Rope): tf.Tensor {
  return x.mul(rope.cos).add(rotateHalf(x).mul(rope.sin));
}

/**
 * What attention adds to its scores [B or 1, 1, 1, T or 1, Tk] (shaped for the grouped scores below), as
 * models/language_model.py does: a huge negative number above the diagonal (causal) when T new tokens attend to
 * exactly those T tokens, and on padded keys when an attention mask [B, Tk] is given. A single decoding step has no
 * causal mask: the new token may see everything cached. A padded query sees only hidden keys: a uniform, finite softmax
 * (garbage rows that no real token reads), never NaN.
 */
export function attentionBias(attentionMask: tf.Tensor | undefined, T: number, Tk: number): tf.Tensor | undefined {
  const causal = T === Tk && T > 1;
  if (attentionMask === undefined && !causal) return undefined;
  return tf.tidy(() => {
    let bias: tf.Tensor | undefined;
    if (causal) { // a key (column) after the query (row) is hidden: [T, T]
      const future = tf.range(0, T).expandDims(0).greater(tf.range(0, T).expandDims(1)); // column > row
      bias = tf.where(future, tf.fill([T, T], HIDDEN), tf.zeros([T, T]));
    }
    if (attentionMask !== undefined) {
      const Tm = attentionMask.shape[1]!;
      const mask = attentionMask.slice([0, Tm - Tk], [-1, Tk]).toFloat(); // the last Tk columns
      const padding = tf.scalar(1).sub(mask).mul(HIDDEN).expandDims(1); // [B, 1, Tk]
      bias = bias ? padding.add(bias) : padding; // [B, T, Tk] or [B, 1, Tk]
    }
    return bias!.reshape([-1, 1, 1, ...bias!.shape.slice(-2)]);
  });
}
// The reference uses −∞ (causal) and float32's lowest (padding); WGSL may assume finite floats, so both are half of
// float32's lowest here, which stays finite when a key is hidden twice. exp of it is 0 all the same.
const HIDDEN = -3.4028234663852886e38 / 2;

/** Cached keys and values of one decoder block, both [B, KV, Tk, hd], keys already rotated. */
export type KVCache = { k: tf.Tensor4D; v: tf.Tensor4D };

/**
 * Causal grouped-query attention. KV key/value heads serve H query heads, rep = H/KV each (query head h uses KV head
 * floor(h/rep), as torch's repeat_interleave). Instead of copying k and v rep times, the query heads of one group are
 * stacked along the token axis: q [B, H, T, hd] → [B, KV, rep·T, hd], one plain batched matMul per group.
 * x [B, T, D] → out [B, T, D] and this block's updated cache.
 */
export function decoderAttention(
  p: Params,
  prefix: string,
  cfg: VLMConfig,
  x: tf.Tensor,
  rope: Rope,
  bias: tf.Tensor | undefined,
  cache: KVCache | undefined,
): { out: tf.Tensor; cache: KVCache } {
  const w = (k: string) => p.get(`${prefix}.${k}.weight`)!;
  const [B, T] = x.shape;
  const H = cfg.lm_n_heads, KV = cfg.lm_n_kv_heads, rep = H / KV, hd = cfg.lm_hidden_dim / H;
  const q = applyRotary(splitHeads(linear(x, w("q_proj")), H), rope); // [B, H, T, hd]
  let k = applyRotary(splitHeads(linear(x, w("k_proj")), KV), rope); // [B, KV, T, hd]
  let v: tf.Tensor = splitHeads(linear(x, w("v_proj")), KV); // [B, KV, T, hd]
  if (cache) {
    k = tf.concat([cache.k, k], 2); // [B, KV, Tk, hd]
    v = tf.concat([cache.v, v], 2);
  }
  const Tk = k.shape[2]!;
  const qGrouped = q.reshape([B, KV, rep * T, hd]);
  let scores = tf.matMul(qGrouped, k, false, true).mul(1 / Math.sqrt(hd)); // [B, KV, rep·T, Tk]
  if (bias) scores = scores.reshape([B, KV, rep, T, Tk]).add(bias).reshape([B, KV, rep * T, Tk]);
  const out = tf.matMul(tf.softmax(scores), v).reshape([B, H, T, hd]); // [B, H, T, hd]
  return { out: linear(mergeHeads(out), w("out_proj")), cache: { k: k as tf.Tensor4D, v: v as tf.Tensor4D } };
}

/** One pre-RMSNorm Llama block: x + attn(norm1(x)), then x + SwiGLU(norm2(x)). x [B, T, D] */
export function decoderBlock(
  p: Params,
  cfg: VLMConfig,
  i: number,
  x: tf.Tensor,
  rope: Rope,
  bias?: tf.Tensor,
  cache?: KVCache,
): { out: tf.Tensor3D; cache: KVCache } {
  const b = `decoder.blocks.${i}`;
  const w = (k: string) => p.get(`${b}.${k}.weight`)!;
  const attn = decoderAttention(p, `${b}.attn`, cfg, rmsNorm(x, w("norm1"), cfg.lm_rms_eps), rope, bias, cache);
  x = x.add(attn.out);
  const h = rmsNorm(x, w("norm2"), cfg.lm_rms_eps);
  const gate = linear(h, w("mlp.gate_proj")); // [B, T, F]
  const silu = gate.mul(tf.sigmoid(gate));
  const mlp = linear(silu.mul(linear(h, w("mlp.up_proj"))), w("mlp.down_proj")); // SwiGLU, [B, T, D]
  return { out: x.add(mlp) as tf.Tensor3D, cache: attn.cache };
}

/** Where the decoder reads from: a padding mask, the cache of earlier tokens, and the first new token's position. */
export interface DecoderInputs {
  attentionMask?: tf.Tensor; // [B, Tk]: 1 = token, 0 = left padding (covers cached and new tokens)
  cache?: KVCache[]; // one per block, from the previous call
  startPos?: number; // position of the first of the T new tokens (0 without a cache)
  rope?: Rope; // cos/sin [T, hd] of those positions, if already made (a model keeps a table); else made here
}

/**
 * The decoder over embeddings x [B, T, D] at positions startPos … startPos+T−1 (left padding occupies real positions,
 * as in the reference). Returns the final-RMSNorm hidden states [B, T, D] and the per-block KV cache for the next call.
 */
export function decoder(
  p: Params,
  cfg: VLMConfig,
  x: tf.Tensor,
  { attentionMask, cache, startPos = 0, rope }: DecoderInputs = {},
): { hidden: tf.Tensor3D; cache: KVCache[] } {
  const T = x.shape[1]!;
  const Tk = T + (cache ? cache[0].k.shape[2]! : 0);
  rope ??= rotaryEmbedding(cfg, Array.from({ length: T }, (_, t) => startPos + t)); // cos/sin [T, hd]
  const bias = attentionBias(attentionMask, T, Tk);
  const newCache: KVCache[] = [];
  for (let i = 0; i < cfg.lm_n_blocks; i++) {
    const block = decoderBlock(p, cfg, i, x, rope, bias, cache?.[i]);
    x = block.out;
    newCache.push(block.cache);
  }
  return { hidden: rmsNorm(x, p.get("decoder.norm.weight")!, cfg.lm_rms_eps) as tf.Tensor3D, cache: newCache };
}

/** The output head: logits = hidden · Eᵀ (E the tied token embedding, or the untied head). [.., D] → [.., V] */
export function lmHead(p: Params, cfg: VLMConfig, hidden: tf.Tensor): tf.Tensor {
  const E = p.get(cfg.lm_tie_weights ? "decoder.token_embedding.weight" : "decoder.head.weight")!; // [V, D]
  const lead = hidden.shape.slice(0, -1);
  return tf.matMul(hidden.reshape([-1, cfg.lm_hidden_dim]), E as tf.Tensor2D, false, true).reshape([...lead, -1]);
}

// ---- Fusion: image embeddings into the image-token slots ------------------------------

/**
 * Write image embeddings into the `<|image|>` slots of the token embeddings. Slots are filled in row-major order
 * (sample, then position) with image rows in order (image 0 token 0, image 0 token 1, …), so images must come flattened
 * in sample order, exactly mp_image_token_length slots per image. Written as one gather from the stacked rows
 * [token rows; image rows], which has a gradient on every backend.
 * ids: the [B, T] token ids on the host; tokenEmbd [B, T, D]; imageEmbd [N, L, D] → [B, T, D]
 */
export function replaceImageTokens(
  ids: ArrayLike<number>,
  tokenEmbd: tf.Tensor,
  imageEmbd: tf.Tensor | undefined,
  imageTokenId: number,
): tf.Tensor3D {
  const [B, T, D] = tokenEmbd.shape;
  const imageRows = imageEmbd ? imageEmbd.shape[0]! * imageEmbd.shape[1]! : 0;
  const source = new Int32Array(B * T); // for each output row, the row of [tokens; images] it takes
  let slot = 0;
  for (let r = 0; r < B * T; r++) source[r] = ids[r] === imageTokenId ? B * T + slot++ : r;
  if (slot !== imageRows) {
    const L = imageEmbd?.shape[1] ?? 0;
    throw new Error(
      `the prompts have ${slot} <|image|> slots but the images give ${imageRows} image embeddings` +
        (L ? ` (${imageRows / L} images × ${L} tokens)` : " (no images)") +
        `: put exactly mp_image_token_length <|image|> tokens in the prompt for each image`,
    );
  }
  if (slot === 0) return tokenEmbd.clone() as tf.Tensor3D;
  const rows = tf.concat([tokenEmbd.reshape([B * T, D]), imageEmbd!.reshape([imageRows, D])]);
  return tf.gather(rows, tf.tensor1d(source, "int32")).reshape([B, T, D]);
}

// ---- Loss ------------------------------------------------------------------------------

/**
 * Mean cross-entropy over the positions whose target is not -100. Targets are already shifted by the data pipeline
 * (targets[t] is the token after t), as in the reference. The log-probability of each target is picked with a 1-D
 * gather from the flattened [B·T·V] log-softmax: no [B·T, V] one-hot, and a gradient on every backend.
 * logits [B, T, V], targets int32 [B, T], optional weights [B, T] (a weighted mean; the reference's is 1) → scalar
 */
export function crossEntropy(logits: tf.Tensor, targets: tf.Tensor, tokenWeights?: tf.Tensor): tf.Scalar {
  const V = logits.shape[logits.shape.length - 1]!;
  const flatTargets = targets.reshape([-1]);
  const n = flatTargets.shape[0]!;
  const keep = flatTargets.notEqual(-100); // built from labels only, never from logits
  const safeTargets = tf.where(keep, flatTargets, tf.zerosLike(flatTargets));
  const index = tf.range(0, n, 1, "int32").mul(tf.scalar(V, "int32")).add(safeTargets); // row·V + target
  const logProbs = tf.logSoftmax(logits.reshape([n, V])).reshape([-1]);
  const picked = tf.gather(logProbs, index); // [B·T]
  const weights = tokenWeights ? keep.toFloat().mul(tokenWeights.reshape([-1])) : keep.toFloat();
  return picked.mul(weights).sum().neg().div(weights.sum().maximum(1)) as tf.Scalar;
}

/**
 * The flat positions (row·T + t) whose target is not -100: the only rows whose logits the loss reads. With none, one
 * masked position, so that the loss (then 0) stays a function of the model and backprop gives zero gradients.
 */
export function trainedPositions(targets: ArrayLike<number>): Int32Array {
  const positions: number[] = [];
  for (let i = 0; i < targets.length; i++) if (targets[i] !== -100) positions.push(i);
  return Int32Array.from(positions.length ? positions : [0]);
}

// ---- Sampling ---------------------------------------------------------------------------

/**
 * The reference's top-k / top-p filter on one row of logits (models/utils.py, top_k_top_p_filtering): a copy is
 * returned, removed entries set to -Infinity. top-k keeps every logit ≥ the k-th largest (ties survive); top-p then
 * sorts what is left, and removes each token whose cumulative probability *including itself* exceeds topP — unlike
 * Hugging Face's version there is no shift, so the token that crosses topP is removed too — always keeping the most
 * likely one.
 */
export function topKTopPFilter(logits: Float32Array, topK = 0, topP = 1.0): Float32Array {
  const out = Float32Array.from(logits);
  const V = out.length;
  if (topK > 0) {
    const kth = Float32Array.from(out).sort().reverse()[Math.min(topK, V) - 1];
    for (let i = 0; i < V; i++) if (out[i] < kth) out[i] = -Infinity;
  }
  if (topP < 1.0) {
    const order = Array.from(out.keys()).sort((a, b) => out[b] - out[a]); // most likely first
    const probs = softmax(order.map((i) => out[i]));
    let cumulative = 0;
    for (let rank = 0; rank < V; rank++) {
      cumulative += probs[rank];
      if (rank > 0 && cumulative > topP) out[order[rank]] = -Infinity;
    }
  }
  return out;
}

/** A numerically stable softmax of plain numbers (float64), softened by a temperature. */
export function softmax(values: ArrayLike<number>, temperature = 1): Float64Array {
  let max = -Infinity;
  for (let i = 0; i < values.length; i++) max = Math.max(max, values[i]);
  const out = new Float64Array(values.length);
  let sum = 0;
  for (let i = 0; i < values.length; i++) sum += out[i] = Math.exp((values[i] - max) / temperature);
  for (let i = 0; i < values.length; i++) out[i] /= sum;
  return out;
}

/** A small seeded random number generator (mulberry32), so a seed makes sampling and data repeatable. */
export function seededRandom(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Greedy choice: the most likely token of each row. logits [B, V] → ids [B] */
async function argmaxRows(logits: tf.Tensor): Promise<Int32Array> {
  const best = tf.argMax(logits, -1);
  return Int32Array.from(await best.data().finally(() => best.dispose()));
}

/** Sampling: filter each row (top-k, top-p), soften by temperature, draw one token. logits [B, V] → ids [B] */
async function sampleRows(
  logits: tf.Tensor,
  { topK, topP, temperature }: { topK: number; topP: number; temperature: number },
  random: () => number,
): Promise<Int32Array> {
  const [B, V] = logits.shape as [number, number];
  const all = (await logits.data()) as Float32Array;
  const ids = new Int32Array(B);
  for (let b = 0; b < B; b++) {
    const probs = softmax(topKTopPFilter(all.subarray(b * V, (b + 1) * V), topK, topP), temperature);
    let r = random(), id = 0;
    while (id < V - 1 && (r -= probs[id]) > 0) id++;
    ids[b] = id;
  }
  return ids;
}

/** Options of `VisionLanguageModel.generate`; the defaults are the reference's. */
export interface GenerateOptions {
  maxNewTokens?: number; // 5
  greedy?: boolean; // false: sample
  temperature?: number; // 0.5, applied after filtering
  topK?: number; // 50 (0 = off)
  topP?: number; // 0.9 (1 = off)
  eosTokenId?: number; // tokens after a row's first EOS become EOS; default: the model's eosTokenId
  seed?: number; // for sampling; default: random
  /** Called after every step with the chosen ids [B], e.g. to stream text. */
  onToken?: (ids: Int32Array, step: number) => void;
  /** Called before every choice with that step's logits [B, V] (row-major), read to the host: to inspect or test. */
  onLogits?: (logits: Float32Array, step: number) => void;
}

// ---- The vision-language model ----------------------------------------------------------

let modelCount = 0; // tfjs variable names are global: each model gets its own prefix

/** nanoVLM: ViT → pixel-shuffle projector → decoder, with image embeddings in the `<|image|>` slots. */
export class VisionLanguageModel {
  readonly cfg: VLMConfig;
  /** Trainable weights by nanoVLM name, in our layout (see `parameterSpecs`). */
  readonly params: Map<string, tf.Variable>;
  /** End-of-sequence id for generate's EOS rewrite: `<|im_end|>` (2) in SmolLM2's ChatML layout. */
  eosTokenId = 2;
  /** The id of `<|image|>`: appended after the base vocabulary, as Hugging Face adds special tokens. */
  readonly imageTokenId: number;
  // RoPE for positions 0 … lm_max_length−1, made once and sliced by each call. None beyond
  // lm_max_position_embeddings, where dynamic scaling makes the table depend on the call.
  private readonly rope: Rope | undefined;

  /** A randomly initialised model, drawn as the reference's `_init_weights` (seeded). */
  constructor(cfg: VLMConfig, options: { seed?: number } = {}) {
    validateConfig(cfg);
    this.cfg = { ...cfg };
    this.imageTokenId = cfg.lm_base_vocab_size;
    const Lmax = cfg.lm_max_length;
    this.rope = Lmax <= cfg.lm_max_position_embeddings
      ? rotaryEmbedding(cfg, Array.from({ length: Lmax }, (_, t) => t))
      : undefined;
    if (this.rope) [this.rope.cos, this.rope.sin].forEach((t) => tf.keep(t)); // kept if made inside a tidy
    const id = modelCount++;
    // tfjs' randomNormal reads a seed of 0 as "no seed" (randomUniform does not): the first parameter, the position
    // embedding, is uniform and takes seed 0, so every seed makes the same model every time.
    let seed = options.seed ?? 0;
    this.params = new Map();
    for (const spec of parameterSpecs(cfg)) {
      const init = tf.tidy(() => {
        if (spec.init === "normal") return tf.randomNormal(spec.shape, 0, 0.02, "float32", seed++);
        if (spec.init === "uniform") return tf.randomUniform(spec.shape, 0, 1, "float32", seed++); // torch.rand
        return spec.init === "ones" ? tf.ones(spec.shape) : tf.zeros(spec.shape);
      });
      this.params.set(spec.name, tf.variable(init, true, `nanovlm${id}/${spec.name}`));
      init.dispose();
    }
  }

  /** Number of trainable scalars (the tied embedding counted once). */
  parameterCount(): number {
    return [...this.params.values()].reduce((n, v) => n + v.size, 0);
  }

  /** Image embeddings for the image-token slots. images [N, 3, S, S] → [N, L, D] */
  embedImages(images: tf.Tensor): tf.Tensor3D {
    checkImages(this.cfg, images);
    const patches = visionEncoder(this.params, this.cfg, images); // [N, Np, Dv]
    return modalityProjector(this.params, this.cfg, patches);
  }

  /** Token embeddings with the image embeddings written into the `<|image|>` slots. → [B, T, D] */
  embed(inputIds: tf.Tensor, images: tf.Tensor | undefined): tf.Tensor3D {
    const ids = readIds(inputIds);
    const tokenEmbd = tf.gather(this.params.get("decoder.token_embedding.weight")!, inputIds); // [B, T, D]
    const imageEmbd = images && images.shape[0]! > 0 ? this.embedImages(images) : undefined;
    return replaceImageTokens(ids, tokenEmbd, imageEmbd, this.imageTokenId);
  }

  /**
   * The training/scoring forward pass. inputIds int32 [B, T]; images float32 [N, 3, S, S] (all images of the batch,
   * sample order); attentionMask [B, T] (1 = token, 0 = left padding) or undefined; targets int32 [B, T] with -100
   * where no loss is taken. Returns logits [B, T, V] and, with targets, the mean cross-entropy. Unlike the reference
   * (which returns hidden states without targets), logits always come back.
   */
  forward(
    inputIds: tf.Tensor,
    images: tf.Tensor | undefined,
    attentionMask?: tf.Tensor,
    targets?: tf.Tensor,
  ): { logits: tf.Tensor3D; loss?: tf.Scalar } {
    return tf.tidy(() => {
      const hidden = this.hiddenStates(inputIds, images, attentionMask); // [B, T, D]
      const logits = lmHead(this.params, this.cfg, hidden) as tf.Tensor3D; // [B, T, V]
      return targets ? { logits, loss: crossEntropy(logits, targets) } : { logits };
    });
  }

  /**
   * The training loss alone: forward's cross-entropy (optionally weighted per token, tokenWeights [B, T]), with the
   * head run only on positions that have a target: at a real vocabulary the head is the largest matMul, and image
   * tokens and prompts have no target. Same value and gradients as forward(...).loss.
   */
  loss(
    inputIds: tf.Tensor,
    images: tf.Tensor | undefined,
    attentionMask: tf.Tensor | undefined,
    targets: tf.Tensor,
    tokenWeights?: tf.Tensor,
  ): tf.Scalar {
    return tf.tidy(() => {
      const hidden = this.hiddenStates(inputIds, images, attentionMask); // [B, T, D]
      const rows = tf.tensor1d(trainedPositions(readIds(targets, "targets")), "int32");
      const pick = (t: tf.Tensor) => tf.gather(t.reshape([-1, ...t.shape.slice(2)]), rows); // [B, T, ..] → [rows, ..]
      const logits = lmHead(this.params, this.cfg, pick(hidden)); // [rows, V]
      return crossEntropy(logits, pick(targets), tokenWeights && pick(tokenWeights));
    });
  }

  /** The decoder's output for the fused prompt, before the head (backend/low_memory.ts may replace it). [B, T, D] */
  hiddenStates(inputIds: tf.Tensor, images: tf.Tensor | undefined, attentionMask?: tf.Tensor): tf.Tensor3D {
    const T = inputIds.shape[1]!;
    this.checkContext(T, 0);
    const fused = this.embed(inputIds, images);
    return decoder(this.params, this.cfg, fused, { attentionMask, rope: this.ropeAt(0, T) }).hidden;
  }

  /**
   * Generate maxNewTokens tokens after each (left-padded) prompt: one prefill pass over the prompts fills the KV cache,
   * then each step feeds only the newest token. Returns the new tokens only, int32 [B, maxNewTokens]; after a row's
   * first EOS every token is EOS (the reference's post-processing). Stops early once every row has emitted EOS, which
   * changes nothing in the result.
   */
  async generate(
    inputIds: tf.Tensor,
    images: tf.Tensor | undefined,
    attentionMask?: tf.Tensor,
    options: GenerateOptions = {},
  ): Promise<tf.Tensor2D> {
    const { maxNewTokens = 5, greedy = false, temperature = 0.5, topK = 50, topP = 0.9 } = options;
    const eos = options.eosTokenId ?? this.eosTokenId;
    const random = seededRandom(options.seed ?? Math.floor(Math.random() * 2 ** 32));
    const [B, T] = inputIds.shape as [number, number];
    this.checkContext(T, maxNewTokens);

    // One decoder pass over new embeddings x [B, t, D] at positions start…: the grown cache, last logits [B, V].
    const pass = (x: tf.Tensor, attentionMask: tf.Tensor | undefined, cache: KVCache[] | undefined, start: number) => {
      const t = x.shape[1]!, rope = this.ropeAt(start, t);
      const out = decoder(this.params, this.cfg, x, { attentionMask, cache, startPos: start, rope });
      const last = out.hidden.slice([0, t - 1, 0], [B, 1, -1]).reshape([B, -1]); // [B, D]
      return { cache: out.cache, logits: lmHead(this.params, this.cfg, last) };
    };
    // Prefill: the whole prompt at once.
    let mask = attentionMask ? attentionMask.clone() : undefined;
    let { cache, logits } = tf.tidy(() => pass(this.embed(inputIds, images), mask, undefined, 0));

    const generated = new Int32Array(B * maxNewTokens).fill(eos);
    const finished = new Array<boolean>(B).fill(false);
    for (let step = 0; step < maxNewTokens; step++) {
      if (options.onLogits) options.onLogits(Float32Array.from(await logits.data()), step);
      const next = greedy ? await argmaxRows(logits) : await sampleRows(logits, { topK, topP, temperature }, random);
      for (let b = 0; b < B; b++) {
        generated[b * maxNewTokens + step] = finished[b] ? eos : next[b];
        finished[b] ||= next[b] === eos;
      }
      options.onToken?.(next, step);
      if (step === maxNewTokens - 1 || finished.every(Boolean)) break;

      // Decode: embed the new token (position T + step), extend the mask, attend to the cache.
      const previous = { cache, logits, mask };
      ({ cache, logits, mask } = tf.tidy(() => {
        const E = this.params.get("decoder.token_embedding.weight")!;
        const embedding = tf.gather(E, tf.tensor2d(next, [B, 1], "int32")); // [B, 1, D]
        const grown = mask ? tf.concat([mask, tf.ones([B, 1], mask.dtype)], 1) : undefined; // [B, T + step + 1]
        return { ...pass(embedding, grown, cache, T + step), mask: grown };
      }));
      tf.dispose([previous.logits, previous.mask, ...previous.cache.flatMap((c) => [c.k, c.v])]);
    }
    tf.dispose([logits, mask, ...cache.flatMap((c) => [c.k, c.v])]);
    return tf.tensor2d(generated, [B, maxNewTokens], "int32");
  }

  /** RoPE rows for positions start … start+T−1, sliced from the model's table (undefined: the decoder makes them). */
  private ropeAt(start: number, T: number): Rope | undefined {
    if (!this.rope) return undefined;
    return { cos: this.rope.cos.slice([start, 0], [T, -1]), sin: this.rope.sin.slice([start, 0], [T, -1]) };
  }

  /** A prompt plus the tokens to generate must fit the context (lm_max_length). */
  checkContext(promptLength: number, newTokens: number): void {
    const limit = this.cfg.lm_max_length;
    if (promptLength + newTokens > limit) {
      throw new Error(
        `the prompt has ${promptLength} tokens` + (newTokens ? ` and ${newTokens} new tokens were asked for` : "") +
          `, but the context (lm_max_length) is ${limit}: shorten the prompt or raise lm_max_length`,
      );
    }
  }

  /** Free every weight and the RoPE table. */
  dispose(): void {
    for (const v of this.params.values()) v.dispose();
    tf.dispose([this.rope?.cos, this.rope?.sin]);
  }
}

/** Images must be [N, 3, S, S] at the model's image size; the error names the shape it got. */
export function checkImages(cfg: VLMConfig, images: tf.Tensor): void {
  const S = cfg.vit_img_size;
  if (images.rank !== 4 || images.shape[1] !== 3 || images.shape[2] !== S || images.shape[3] !== S) {
    throw new Error(`images must be float32 [N, 3, ${S}, ${S}] (RGB, resized to vit_img_size); got [${images.shape}]`);
  }
}

/** Read int32 token ids (or targets: `name`) [B, T] on the host (they are small) to find the image slots. */
export function readIds(inputIds: tf.Tensor, name = "inputIds"): Int32Array {
  if (inputIds.dtype !== "int32" || inputIds.rank !== 2) {
    throw new Error(`${name} must be an int32 [B, T] tensor; got ${inputIds.dtype} [${inputIds.shape}]`);
  }
  return inputIds.dataSync() as Int32Array;
}
