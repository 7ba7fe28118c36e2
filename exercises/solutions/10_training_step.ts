// Solution to exercise 10 (one training step), written as a student might: gradients by
// name, the global norm from every gradient's sum of squares, then AdamW.
import * as tf from "@tensorflow/tfjs";
import type { VisionLanguageModel } from "../../nanovlm.ts";
import type { AdamW } from "../../lib/optimizer.ts";

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
  const { value, grads: byVariable } = tf.variableGrads(
    () => model.forward(batch.inputIds, batch.images, batch.attentionMask, batch.labels).loss!,
    optimizer.variables,
  );
  const grads = new Map<string, tf.Tensor>();
  optimizer.variables.forEach((v, i) => grads.set(optimizer.trainable[i], byVariable[v.name]));

  // One norm over every element of every gradient; tidy frees the squares and partial sums.
  const normTensor = tf.tidy(() => tf.addN([...grads.values()].map((g) => g.square().sum())).sqrt());
  const gradNorm = (await normTensor.data())[0];
  normTensor.dispose();
  if (gradNorm > maxGradNorm) {
    const scale = maxGradNorm / (gradNorm + 1e-6);
    for (const [name, g] of grads) {
      grads.set(name, g.mul(scale));
      g.dispose();
    }
  }

  optimizer.step(grads, lrs);
  const loss = (await value.data())[0];
  tf.dispose([value, ...grads.values()]);
  return { loss, gradNorm };
}
