// Solution to exercise 09 (warmup + cosine learning-rate schedule), written as a student might.

/** nanoVLM's get_lr: linear warmup over 3% of the steps, then a cosine down to 10% of maxLr. */
export function lrSchedule(step: number, maxLr: number, maxSteps: number): number {
  const minLr = maxLr / 10;
  const warmup = maxSteps * 0.03; // not rounded
  if (step < warmup) return maxLr * (step + 1) / warmup; // step 0 already gets 1/warmup of maxLr
  if (step >= maxSteps) return minLr;
  const progress = (step - warmup) / (maxSteps - warmup); // 0 → 1 across the decay
  const cosine = (1 + Math.cos(Math.PI * progress)) / 2; // 1 → 0
  return minLr + cosine * (maxLr - minLr);
}
