// Solution to exercise 03 (pixel shuffle), written as a student might: for every output
// token, gather the s×s block of patch vectors by index and lay them side by side.
import * as tf from "@tensorflow/tfjs";

/** Space-to-depth: each s×s block of patches becomes one token. [N, Np, Dv] → [N, Np/s², s²·Dv] */
export function pixelShuffle(x: tf.Tensor, s: number): tf.Tensor {
  const [N, Np, Dv] = x.shape;
  const G = Math.sqrt(Np), O = G / s; // the patch grid is G×G, the token grid O×O
  const tokens: tf.Tensor[] = [];
  for (let oy = 0; oy < O; oy++) {
    for (let ox = 0; ox < O; ox++) {
      const block: number[] = []; // patch numbers of this block, row by row
      for (let sy = 0; sy < s; sy++) {
        for (let sx = 0; sx < s; sx++) block.push((oy * s + sy) * G + (ox * s + sx));
      }
      const vectors = tf.gather(x, tf.tensor1d(block, "int32"), 1); // [N, s², Dv]
      tokens.push(vectors.reshape([N, s * s * Dv]));
    }
  }
  return tf.stack(tokens, 1); // [N, L, s²·Dv]
}
