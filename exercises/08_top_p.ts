// Exercise 08 · Top-p (nucleus) sampling filter                       about 20 minutes
//
// When generate() samples instead of taking the most likely token, it first throws away
// the unlikely tail of the distribution (Holtzman et al. 2019, arXiv:1904.09751): keep
// the smallest set of most likely tokens whose probabilities add up to top_p, and
// sample only among those. Plain JavaScript, no tensors: the logits of one sequence.
//
// nanoVLM's exact rule (it differs from Hugging Face's, on purpose here — the check
// compares with nanoVLM's):
//   1. softmax the logits into probabilities;
//   2. sort tokens from most to least likely and add up their probabilities;
//   3. remove every token whose cumulative probability *including itself* is > topP —
//      so the token that crosses topP is removed too (Hugging Face keeps it);
//   4. but always keep the most likely token, even if it alone is above topP.
// Removed tokens become −Infinity (probability 0 after the next softmax); kept tokens
// keep their logit unchanged. topP = 1 means no filtering.
//
// Shapes (V vocabulary):
//   logits  Float32Array of V numbers (do not modify it: the caller still needs it)
//   topP    a number in (0, 1]
//   →       a new Float32Array of V numbers
//
// JavaScript that helps: Float32Array.from(logits) to copy, Math.exp (subtract the
// largest logit first so exp cannot overflow), indices sorted with
// Array.from(logits.keys()).sort((a, b) => logits[b] - logits[a]).
//
// Check:        deno task exercise top_p
// Afterwards:   compare with `topKTopPFilter` and `softmax` in nanovlm.ts ("Sampling").

// deno-lint-ignore-file no-unused-vars -- the parameters stay unused until you write the body
import { TodoError } from "./todo.ts";

/** nanoVLM's top-p filter: a copy of logits with the unlikely tail set to −Infinity. */
export function topPFilter(logits: Float32Array, topP: number): Float32Array {
  throw new TodoError("topPFilter: remove (−Infinity) every token whose cumulative probability passes topP");
}
