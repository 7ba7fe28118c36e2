// Exercise 10 · One training step                                     about 40 minutes
//
// Everything comes together: forward pass, loss, backward pass, gradient clipping and one
// AdamW update — what `deno task train` repeats a few thousand times.
//
//   1. Loss and gradients. tf.variableGrads(f, variables) runs f (which must return a
//      scalar tensor) while recording, then returns { value, grads }: the scalar, and the
//      gradient of every variable keyed by the variable's tfjs name (variable.name, e.g.
//      "nanovlm3/MP.proj.weight" — not the nanoVLM name). Here f is
//        () => model.forward(batch.inputIds, batch.images, batch.attentionMask, batch.labels).loss!
//      and the variables are optimizer.variables: the trainable tf.Variables, in the same
//      order as their nanoVLM names in optimizer.trainable.
//   2. Clip by the global norm (torch.nn.utils.clip_grad_norm_), which tames the rare huge
//      gradient that would otherwise wreck the weights in one step:
//        norm = sqrt( Σ over all gradients of Σ g² )      one number for the whole model
//        if norm > maxGradNorm: every g ← g · maxGradNorm / (norm + 1e-6)
//   3. Update. optimizer.step(grads, lrs) takes a Map from nanoVLM name to gradient and one
//      learning rate per parameter group (the projector learns faster than the backbones).
//   4. Free what you made. The gradients and the loss tensor are yours to dispose: a step
//      that leaks its gradients runs out of memory after a few hundred steps (the check
//      counts tensors).
//   5. Return the loss as a number (await value.data()) and the norm *before* clipping,
//      as torch's clip_grad_norm_ does: that is the number worth logging.
//
// Shapes (legend of nanovlm.ts: B batch, T tokens, N images, S image side):
//   batch.inputIds       int32 [B, T] with <|image|> slots
//   batch.images         float32 [N, 3, S, S], or undefined
//   batch.attentionMask  [B, T], 1 = token, 0 = left padding
//   batch.labels         int32 [B, T], −100 where no loss is taken
//   lrs                  one number per optimizer.groups entry, in that order
//   →                    { loss: number, gradNorm: number }
//
// tfjs that helps: tf.variableGrads, tf.addN, .square().sum(), .sqrt(), .mul(number),
// await t.data(), tf.dispose(tensorsOrArrayOrMap.values()).
//
// Check:        deno task exercise training_step
// Afterwards:   compare with `gradientNorm` and `clipCoefficient` in lib/optimizer.ts ("Gradient
//               clipping") and `trainStep` in lib/train_step.ts ("One optimizer step").

// deno-lint-ignore-file no-unused-vars require-await -- unused until you write the body
import * as tf from "@tensorflow/tfjs";
import type { VisionLanguageModel } from "../nanovlm.ts";
import type { AdamW } from "../lib/optimizer.ts";
import { TodoError } from "./todo.ts";

/** The model's input tensors for one batch. */
export interface BatchTensors {
  inputIds: tf.Tensor;
  images?: tf.Tensor;
  attentionMask: tf.Tensor;
  labels: tf.Tensor;
}

/** Forward, backward, clip the global gradient norm to maxGradNorm, one AdamW step. Returns the loss and the pre-clip norm. */
export async function trainingStep(
  model: VisionLanguageModel,
  batch: BatchTensors,
  optimizer: AdamW,
  lrs: number[],
  maxGradNorm: number,
): Promise<{ loss: number; gradNorm: number }> {
  throw new TodoError(
    "trainingStep: tf.variableGrads → global-norm clip → optimizer.step → dispose → { loss, gradNorm }",
  );
}
