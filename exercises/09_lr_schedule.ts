// Exercise 09 · The learning-rate schedule: warmup, then cosine       about 15 minutes
//
// nanoVLM trains with the schedule most small transformers use (its `get_lr`):
//
//   - Warmup. Over the first 3% of the steps the learning rate climbs linearly to maxLr.
//     Fresh weights give large, noisy gradients; small steps at first keep AdamW's moment
//     estimates from being thrown off. The warmup length is 0.03 · maxSteps as a float,
//     not rounded (150 for 5000 steps, 0.9 for 30). Steps count from 0, and step 0
//     already trains, so it gets one warmup step's worth, maxLr · 1 / warmup — not 0:
//     step s (for s < warmup) gets maxLr · (s + 1) / warmup.
//   - Cosine decay. From the end of the warmup to step maxSteps the rate follows half a
//     cosine wave from maxLr down to minLr = 10% of maxLr: write the ratio of the way
//     through this phase (0 at its start, 1 at maxSteps) and use cos(π · ratio), which
//     goes from 1 to −1.
//   - After maxSteps: stay at minLr.
//
// Shapes: numbers in, a number out.
//   step      the optimizer step, from 0
//   maxLr     the peak learning rate (e.g. 1e-4 for the backbones, 1e-2 for the projector)
//   maxSteps  the length of the run
//   →         the learning rate for this step
//
// JavaScript that helps: Math.cos, Math.PI.
//
// Check:        deno task exercise lr_schedule
// Afterwards:   compare with `lrSchedule` in lib/optimizer.ts ("Learning-rate schedule").

// deno-lint-ignore-file no-unused-vars -- the parameters stay unused until you write the body
import { TodoError } from "./todo.ts";

/** nanoVLM's get_lr: linear warmup over 3% of the steps, then a cosine down to 10% of maxLr. */
export function lrSchedule(step: number, maxLr: number, maxSteps: number): number {
  throw new TodoError("lrSchedule: warmup to maxLr over 0.03·maxSteps steps, then a cosine down to 0.1·maxLr");
}
