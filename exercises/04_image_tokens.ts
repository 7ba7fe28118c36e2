// Exercise 04 · Writing image embeddings into the <|image|> slots    about 25 minutes
//
// This is where vision meets language. The prompt holds placeholder tokens <|image|>,
// mp_image_token_length (L) of them per image. The decoder embeds every token id as
// usual, then the rows at the placeholder positions are replaced by the image
// embeddings from the projector. Everything after this point is a plain language model.
//
// The order is fixed by the reference (PyTorch's boolean-mask assignment
// `embd[ids == image_token_id] = image_embd.view(-1, D)`): walk the slots in row-major
// order — sample 0 position 0, 1, …, then sample 1 — and give them the image rows in
// order: image 0 token 0, image 0 token 1, …, image 1 token 0, … A sample may hold
// zero, one or several images; images come flattened in sample order.
//
// Shapes (legend of nanovlm.ts: B batch, T tokens, D decoder width, N images,
// L image tokens per image):
//   ids          B·T token ids on the host (a plain array, row-major)
//   tokenEmbd    [B, T, D]   the token embeddings
//   imageEmbd    [N, L, D]   the projected images, or undefined when there are none
//   imageTokenId the id of <|image|>
//   →            [B, T, D]   tokenEmbd with the image rows written into the slots
//
// Two more requirements, both checked:
//   - If the number of slots is not N·L, throw an Error that says so (PyTorch raises too).
//   - Gradients must flow back into imageEmbd: that is how the projector and the ViT
//     learn. So build the output with tensor ops (slice, concat, stack, gather, …) from
//     the tensors themselves — never from numbers read out of them with data()/dataSync().
//
// tfjs that helps: reshape both inputs to rows ([B·T, D] and [N·L, D]), then either
// tf.gather rows of their concatenation with an index you compute in a JS loop, or
// slice rows one by one and tf.stack them.
//
// Check:        deno task exercise image_tokens
// Afterwards:   compare with `replaceImageTokens` in nanovlm.ts ("Fusion").

// deno-lint-ignore-file no-unused-vars -- the parameters stay unused until you write the body
import * as tf from "@tensorflow/tfjs";
import { TodoError } from "./todo.ts";

/** tokenEmbd with the rows of imageEmbd written, in order, into the slots where ids === imageTokenId. → [B, T, D] */
export function replaceImageTokens(
  ids: ArrayLike<number>,
  tokenEmbd: tf.Tensor,
  imageEmbd: tf.Tensor | undefined,
  imageTokenId: number,
): tf.Tensor {
  throw new TodoError("replaceImageTokens: fill the <|image|> slots (row-major) with the image rows, in order");
}
