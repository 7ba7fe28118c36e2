// Solution to exercise 01 (RMSNorm), written as a student might: divide by the root
// mean square, with eps inside the square root.
import * as tf from "@tensorflow/tfjs";

/** RMSNorm over the last axis: x / sqrt(mean(x²) + eps) · weight. */
export function rmsNorm(x: tf.Tensor, weight: tf.Tensor, eps: number): tf.Tensor {
  const rms = tf.sqrt(x.square().mean(-1, true).add(eps)); // [..., 1]
  return x.div(rms).mul(weight);
}
