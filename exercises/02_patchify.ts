// Exercise 02 · Patchify                                              about 20 minutes
//
// A vision transformer reads an image as a sequence of patches (ViT, arXiv:2010.11929).
// The reference does this with a convolution whose kernel and stride are both P; we do
// the same thing as "cut into patches, then one matMul", because tfjs' WASM backend has
// no gradient for a convolution's filter. Your job is the cutting.
//
// Cut each image into non-overlapping P×P patches and flatten each patch into a vector:
//   - patches in row-major order: patch (row gy, column gx) is patch number gy·G + gx;
//   - inside a patch, the values in (channel, row, column) order — the order of
//     PyTorch's conv weight [Dv, 3, P, P], so pretrained SigLIP weights fit:
//       feature c·P·P + py·P + px  =  images[n, c, gy·P + py, gx·P + px]
//
// Shapes (legend of nanovlm.ts: N images, S image side, P patch side, G = S/P patches
// per side, Np = G·G patches per image):
//   images  [N, 3, S, S]  (channels first, like PyTorch)
//   →       [N, Np, 3·P·P]
//
// tfjs that helps: reshape and transpose. Split each image axis into (patch index, pixel
// in patch): [N, 3, G, P, G, P]; then transpose so the axes come in the order you need
// them, and reshape to the output. (Or, slower but fine: slice each patch and tf.stack.)
//
// Check:        deno task exercise patchify
// Afterwards:   compare with `patchify` in nanovlm.ts ("Vision encoder").

// deno-lint-ignore-file no-unused-vars -- the parameters stay unused until you write the body
import * as tf from "@tensorflow/tfjs";
import { TodoError } from "./todo.ts";

/** Non-overlapping P×P patches, row-major, each flattened in (channel, row, col) order. [N,3,S,S] → [N, Np, 3·P·P] */
export function patchify(images: tf.Tensor, P: number): tf.Tensor {
  throw new TodoError("patchify: cut [N, 3, S, S] images into [N, (S/P)², 3·P·P] patch vectors");
}
