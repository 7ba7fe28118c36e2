// backend/low_memory.ts — activation checkpointing: train a model whose activations do not fit in memory.
//
// Backprop normally keeps every activation of the forward pass until the backward pass reads it. Checkpointed, a
// transformer block keeps only its input; the backward pass runs the block again to get the rest (Chen et al. 2016,
// arXiv:1604.06174). One extra forward pass buys the memory: it is what lets the 222M preset train inside the WASM
// backend's 4 GiB heap. `useActivationCheckpointing(model)` installs this on a model from outside: nanovlm.ts keeps
// the plain forward pass, and this file runs the same stage functions with each block wrapped.

import * as tf from "@tensorflow/tfjs";
import {
  attentionBias,
  checkImages,
  decoderBlock,
  layerNorm,
  modalityProjector,
  type Params,
  patchEmbedding,
  readIds,
  replaceImageTokens,
  rmsNorm,
  rotaryEmbedding,
  VisionLanguageModel,
  vitBlock,
} from "../nanovlm.ts";

/** Make `model`'s forward pass and loss checkpoint every ViT and decoder block (same values and gradients), or not. */
export function useActivationCheckpointing(model: VisionLanguageModel, on = true): void {
  if (on) model.hiddenStates = (ids, images, mask) => checkpointedHiddenStates(model, ids, images, mask);
  else delete (model as { hiddenStates?: unknown }).hiddenStates; // the class's own, plain forward pass again
}

/** `model.hiddenStates` with every block checkpointed: the fused prompt through the decoder. → [B, T, D] */
export function checkpointedHiddenStates(
  model: VisionLanguageModel,
  inputIds: tf.Tensor,
  images: tf.Tensor | undefined,
  attentionMask?: tf.Tensor,
): tf.Tensor3D {
  const p = model.params as Params, cfg = model.cfg;
  const ids = readIds(inputIds), [B, T] = inputIds.shape as [number, number];
  model.checkContext(T, 0);

  // Vision encoder and projector: images [N, 3, S, S] → image embeddings [N, L, D].
  let imageEmbd: tf.Tensor | undefined;
  if (images && images.shape[0]! > 0) {
    checkImages(cfg, images);
    let x: tf.Tensor = patchEmbedding(p, cfg, images);
    for (let i = 0; i < cfg.vit_n_blocks; i++) {
      x = checkpointed(p, `vision_encoder.blocks.${i}`, [x], (w, [x]) => vitBlock(w, cfg, i, x));
    }
    const w = (k: string) => p.get(`vision_encoder.layer_norm.${k}`)!;
    imageEmbd = modalityProjector(p, cfg, layerNorm(x, w("weight"), w("bias"), cfg.vit_ln_eps));
  }
  const tokenEmbd = tf.gather(p.get("decoder.token_embedding.weight")!, inputIds); // [B, T, D]
  let x: tf.Tensor = replaceImageTokens(ids, tokenEmbd, imageEmbd, model.imageTokenId);

  // Decoder: a checkpointed block may read no tensor but its inputs, so RoPE and the mask go in too.
  const rope = rotaryEmbedding(cfg, Array.from({ length: T }, (_, t) => t));
  const bias = attentionBias(attentionMask, T, T);
  for (let i = 0; i < cfg.lm_n_blocks; i++) {
    const inputs = [x, rope.cos, rope.sin, ...(bias ? [bias] : [])];
    x = checkpointed(
      p,
      `decoder.blocks.${i}`,
      inputs,
      (w, [x, cos, sin, bias]) =>
        decoderBlock(w, cfg, i, x, { cos: cos as tf.Tensor2D, sin: sin as tf.Tensor2D }, bias).out,
    );
  }
  return rmsNorm(x, p.get("decoder.norm.weight")!, cfg.lm_rms_eps).reshape([B, T, -1]) as tf.Tensor3D;
}

/** Block `prefix` as one checkpointed operation: its inputs `xs` and every weight under `prefix` go in explicitly. */
function checkpointed(
  p: Params,
  prefix: string,
  xs: tf.Tensor[],
  block: (weights: Params, xs: tf.Tensor[]) => tf.Tensor,
): tf.Tensor {
  const names = [...p.keys()].filter((name) => name.startsWith(`${prefix}.`)), n = xs.length;
  const run = (...ts: tf.Tensor[]) => block(new Map(names.map((name, j) => [name, ts[n + j]])), ts.slice(0, n));
  return recomputeInBackward(run, [...xs, ...names.map((name) => p.get(name)!)]);
}

/**
 * `f(...inputs)`, computed so that backpropagation keeps only `inputs` instead of every activation inside `f`: the
 * backward pass runs `f` again under a tape of its own and differentiates that (activation checkpointing, Chen et al.
 * 2016, arXiv:1604.06174). One extra forward buys the memory: per transformer block, only its input stays alive until
 * the backward pass, which is what lets the 222M preset train inside the wasm backend's 4 GiB heap.
 * The gradients are exactly the plain ones (the same kernels on the same values); without a tape it is just `f`.
 *
 * `f` must be a pure function of `inputs`, and every input must reach its result: each tensor it reads — weights,
 * RoPE tables, masks — has to be one of `inputs`, both to get a gradient (a weight read from the closure would get
 * none: tfjs records `f` as one operation) and because a captured tensor may be disposed before backward runs.
 */
export function recomputeInBackward<T extends tf.Tensor>(f: (...inputs: tf.Tensor[]) => T, inputs: tf.Tensor[]): T {
  const run = tf.customGrad((...args: (tf.Tensor | tf.GradSaveFunc)[]) => {
    const xs = args.slice(0, -1) as tf.Tensor[], save = args.at(-1) as tf.GradSaveFunc;
    save(xs); // kept (as shared views) until backward; tfjs runs f in a tidy, off the tape, so nothing else is
    return {
      value: f(...xs),
      gradFunc: (dy: T, saved: tf.Tensor[]) => {
        // tf.grads starts a tape of its own and clears the engine's active tape when it ends, which would crash the
        // outer backward pass that is calling us: put the outer tape back.
        const engine = tf.engine().state, outerTape = engine.activeTape;
        try {
          return tf.grads((...ys: tf.Tensor[]) => f(...ys))(saved, dy);
        } finally {
          engine.activeTape = outerTape;
        }
      },
    };
  });
  return run(...inputs);
}
