// Solution to exercise 04 (image-token replacement), written as a student might: walk
// the slots in row-major order and take either the token's own row or the next image
// row, then stack. slice and stack carry gradients back to both inputs.
import * as tf from "@tensorflow/tfjs";

/** tokenEmbd with the rows of imageEmbd written, in order, into the slots where ids === imageTokenId. → [B, T, D] */
export function replaceImageTokens(
  ids: ArrayLike<number>,
  tokenEmbd: tf.Tensor,
  imageEmbd: tf.Tensor | undefined,
  imageTokenId: number,
): tf.Tensor {
  const [B, T, D] = tokenEmbd.shape;
  const tokenRows = tokenEmbd.reshape([B * T, D]);
  const imageRows = imageEmbd ? imageEmbd.reshape([-1, D]) : tf.zeros([0, D]);
  let slots = 0;
  for (let r = 0; r < B * T; r++) if (ids[r] === imageTokenId) slots++;
  if (slots !== imageRows.shape[0]) {
    throw new Error(`${slots} <|image|> slots but ${imageRows.shape[0]} image embeddings`);
  }
  const rows: tf.Tensor[] = [];
  let next = 0; // the next unused image row
  for (let r = 0; r < B * T; r++) {
    const source = ids[r] === imageTokenId ? imageRows.slice([next++, 0], [1, D]) : tokenRows.slice([r, 0], [1, D]);
    rows.push(source);
  }
  return tf.concat(rows, 0).reshape([B, T, D]);
}
