// Solution to exercise 08 (nanoVLM's top-p filter), written as a student might.

/** nanoVLM's top-p filter: a copy of logits with the unlikely tail set to −Infinity. */
export function topPFilter(logits: Float32Array, topP: number): Float32Array {
  const out = Float32Array.from(logits);
  if (topP >= 1) return out;
  const order = Array.from(logits.keys()).sort((a, b) => logits[b] - logits[a]); // most likely first
  const max = logits[order[0]];
  const weights = order.map((i) => Math.exp(logits[i] - max));
  const total = weights.reduce((a, b) => a + b, 0);
  let cumulative = 0;
  for (let rank = 0; rank < order.length; rank++) {
    cumulative += weights[rank] / total; // including this token
    if (rank > 0 && cumulative > topP) out[order[rank]] = -Infinity;
  }
  return out;
}
