// The trained checkpoint that comes with the project (checkpoints/shapes-tiny): it loads in nanoVLM's format with its
// tokenizer, and it still sees. A change to the model or the data pipeline that breaks what the checkpoint learned
// (a reordered parameter, another image processor, a tokenizer change) fails here.
//
// Run: deno test -A tests/checkpoint_shapes_test.ts

import assert from "node:assert/strict";
import { initBackend } from "../backend/runtime.ts";
import { evaluate, shapesQuestions } from "../lib/scoring.ts";
import { COMMITTED_CHECKPOINT, loadForInference } from "../lib/inference.ts";

// The checkpoint answers 192 of these 200 questions (96.0%) on the WASM backend with OpenBLAS, without it
// (NANOVLM_BLAS=off) and on the cpu backend, three orders of float summation. The floor is the project's target for it,
// 95%. A model that no longer sees falls far below it: fed its pixels un-centred (vit_img_normalize off) this one
// answers 162, given grey pictures 62.
const FLOOR = 190;

Deno.test("the committed checkpoint answers at least 190 of 200 test questions, and is at most 8 MB", async () => {
  await initBackend("wasm", { quiet: true });
  const bytes = (await Deno.stat(`${COMMITTED_CHECKPOINT}/model.safetensors`)).size;
  assert.ok(bytes <= 8 * 2 ** 20, `model.safetensors is ${bytes} bytes`);
  const { model, tokenizer } = await loadForInference(COMMITTED_CHECKPOINT);
  try {
    const items = shapesQuestions("test", 40, model.cfg.vit_img_size).slice(0, 200);
    assert.equal(items.length, 200);
    const result = await evaluate(model, tokenizer, items);
    const perKind = Object.entries(result.perKind).map(([kind, r]) => `${kind} ${r.correct}/${r.total}`).join(", ");
    assert.ok(result.correct >= FLOOR, `${result.correct}/200 right (${perKind})`);
  } finally {
    model.dispose();
  }
});
