// Solution to exercise 05 (RoPE), written as a student might: the angle table in a
// plain JavaScript loop (float64), the rotation with split and concat.
import * as tf from "@tensorflow/tfjs";

/** cos and sin tables [T, hd] for the given positions, the hd/2 angles repeated twice. */
export function rotaryTables(positions: number[], hd: number, base: number): { cos: tf.Tensor; sin: tf.Tensor } {
  const T = positions.length;
  const cos = new Float32Array(T * hd), sin = new Float32Array(T * hd);
  for (let t = 0; t < T; t++) {
    for (let i = 0; i < hd / 2; i++) {
      const angle = positions[t] / base ** ((2 * i) / hd);
      // pair i lives at i and i + hd/2: the same angle in both halves
      cos[t * hd + i] = cos[t * hd + i + hd / 2] = Math.cos(angle);
      sin[t * hd + i] = sin[t * hd + i + hd / 2] = Math.sin(angle);
    }
  }
  return { cos: tf.tensor2d(cos, [T, hd]), sin: tf.tensor2d(sin, [T, hd]) };
}

/** Rotate each (x_i, x_{i+hd/2}) pair: x·cos + rotate_half(x)·sin. x [B, H, T, hd], cos/sin [T, hd] */
export function applyRotary(x: tf.Tensor, cos: tf.Tensor, sin: tf.Tensor): tf.Tensor {
  const [x1, x2] = tf.split(x, 2, -1); // each [B, H, T, hd/2]
  const rotated = tf.concat([x2.neg(), x1], -1); // rotate_half(x)
  return x.mul(cos).add(rotated.mul(sin));
}
