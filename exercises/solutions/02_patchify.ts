// Solution to exercise 02 (patchify), written as a student might: slice out each patch,
// flatten it in (channel, row, col) order, stack the patches row-major. Slower than
// nanovlm.ts' reshape/transpose, and deliberately different, so the check compares two
// independent computations.
import * as tf from "@tensorflow/tfjs";

/** Non-overlapping P×P patches, row-major, each flattened in (channel, row, col) order. [N,3,S,S] → [N, Np, 3·P·P] */
export function patchify(images: tf.Tensor, P: number): tf.Tensor {
  const [N, C, S] = images.shape;
  const G = S / P;
  const patches: tf.Tensor[] = [];
  for (let gy = 0; gy < G; gy++) {
    for (let gx = 0; gx < G; gx++) {
      const patch = images.slice([0, 0, gy * P, gx * P], [N, C, P, P]); // [N, 3, P, P]
      patches.push(patch.reshape([N, C * P * P])); // (channel, row, col) order
    }
  }
  return tf.stack(patches, 1); // [N, Np, 3·P·P]
}
