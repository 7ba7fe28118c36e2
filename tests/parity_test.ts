// Parity with the PyTorch reference: every stage of nanovlm.ts against the outputs of
// huggingface/nanoVLM (8374ce1) on the nanovlm-tiny-a fixture (tests/fixtures/…/README.md
// says what each tensor is). Floats within 1e-4, token ids identical, on the WASM and
// CPU backends (WebGPU: tests/webgpu_test.ts).

import * as tf from "@tensorflow/tfjs";
import { assertEquals } from "./assert.ts";
import {
  attentionBias,
  decoder,
  decoderBlock,
  lmHead,
  modalityProjector,
  patchEmbedding,
  pixelShuffle,
  replaceImageTokens,
  rotaryEmbedding,
  softmax,
  topKTopPFilter,
  visionEncoder,
  VisionLanguageModel,
  vitBlock,
  type VLMConfig,
} from "../nanovlm.ts";
import { fromPretrained } from "../lib/checkpoint.ts";
import { configFromJSON, stateDict } from "../lib/state_dict.ts";
import { initBackend } from "../backend/runtime.ts";
import { readSafetensors } from "../lib/safetensors.ts";
import { modelFromBackbones, smolLM2NameMap } from "../lib/backbones.ts";
import { assertClose, FIXTURE_DIR, loadFixture, maxAbsDiff, toTensor } from "./helpers.ts";

const { inputs, expected } = await loadFixture();
const get = (name: string) => {
  const t = inputs.get(name) ?? expected.get(name);
  if (!t) throw new Error(`fixture has no tensor ${name}`);
  return t;
};
const cfg: VLMConfig = configFromJSON(JSON.parse(await Deno.readTextFile(`${FIXTURE_DIR}/config.json`)));
const rowMask = get("attention_mask").data; // compare [B, T, …] tensors on real tokens only

/** Greedy decoding by recomputing the whole sequence at every step (no KV cache). */
async function greedyWithoutCache(model: VisionLanguageModel, ids: number[][], images: tf.Tensor, mask: number[][]) {
  const steps: number[][] = ids.map(() => []);
  const logitsPerStep: Float32Array[] = [];
  for (let step = 0; step < 8; step++) {
    const B = ids.length, T = ids[0].length;
    const inputIds = tf.tensor2d(ids.flat(), [B, T], "int32");
    const attention = tf.tensor2d(mask.flat(), [B, T], "int32");
    const { logits } = model.forward(inputIds, images, attention);
    const last = logits.slice([0, T - 1, 0], [B, 1, -1]);
    const values = (await last.data()) as Float32Array;
    tf.dispose([inputIds, attention, logits, last]);
    logitsPerStep.push(values);
    const V = values.length / B;
    for (let b = 0; b < B; b++) {
      const row = values.subarray(b * V, (b + 1) * V);
      const next = row.indexOf(Math.max(...row));
      steps[b].push(next);
      ids[b].push(next);
      mask[b].push(1);
    }
  }
  return { steps, logitsPerStep };
}

for (const backend of ["wasm", "cpu"] as const) {
  Deno.test(`parity on ${backend}`, async (t) => {
    await initBackend(backend, { quiet: true });
    const model = await fromPretrained(FIXTURE_DIR);
    const p = model.params as Map<string, tf.Tensor>;
    const images = toTensor(get("images"));
    const inputIds = toTensor(get("input_ids"));
    const mask = toTensor(get("attention_mask"));
    const labels = toTensor(get("labels"));

    await t.step("vision encoder", async () => {
      const patches = patchEmbedding(p, cfg, images);
      await assertClose("vit.patch_embd", patches, get("vit.patch_embd"));
      await assertClose("vit.block0", vitBlock(p, cfg, 0, patches), get("vit.block0"));
      await assertClose("vit.out", visionEncoder(p, cfg, images), get("vit.out"));
    });

    await t.step("modality projector", async () => {
      const vitOut = toTensor(get("vit.out"));
      await assertClose("mp.pixel_shuffle", pixelShuffle(vitOut, 2), get("mp.pixel_shuffle"));
      await assertClose("mp.out", modalityProjector(p, cfg, vitOut), get("mp.out"));
    });

    await t.step("embeddings and image-token fusion", async () => {
      const tokenEmbd = tf.gather(p.get("decoder.token_embedding.weight")!, inputIds);
      await assertClose("lm.token_embd", tokenEmbd, get("lm.token_embd"), 1e-4, rowMask);
      const fused = replaceImageTokens(get("input_ids").data, tokenEmbd, toTensor(get("mp.out")), model.imageTokenId);
      await assertClose("lm.fused_embd", fused, get("lm.fused_embd"), 1e-4, rowMask);
    });

    await t.step("rotary embedding, including dynamic scaling", async () => {
      const rope = rotaryEmbedding(cfg, Array.from({ length: 48 }, (_, i) => i));
      await assertClose("lm.rope_cos", rope.cos, get("lm.rope_cos"));
      await assertClose("lm.rope_sin", rope.sin, get("lm.rope_sin"));
      const probe = rotaryEmbedding(cfg, Array.from(get("rope_probe.positions").data));
      await assertClose("rope_probe.cos", probe.cos.expandDims(0), get("rope_probe.cos"));
      await assertClose("rope_probe.sin", probe.sin.expandDims(0), get("rope_probe.sin"));
    });

    await t.step("decoder block, hidden states, logits and loss", async () => {
      const fused = toTensor(get("lm.fused_embd"));
      const rope = rotaryEmbedding(cfg, Array.from({ length: 48 }, (_, i) => i));
      const block0 = decoderBlock(p, cfg, 0, fused, rope, attentionBias(mask, 48, 48)).out;
      await assertClose("lm.block0", block0, get("lm.block0"), 1e-4, rowMask);
      const { hidden } = decoder(p, cfg, fused, { attentionMask: mask });
      await assertClose("lm.hidden", hidden, get("lm.hidden"), 1e-4, rowMask);
      await assertClose("lm.logits (head)", lmHead(p, cfg, hidden), get("lm.logits"), 1e-4, rowMask);
      const { logits, loss } = model.forward(inputIds, images, mask, labels);
      await assertClose("lm.logits (forward)", logits, get("lm.logits"), 1e-4, rowMask);
      await assertClose("loss", loss!.reshape([1]), get("loss"));
    });

    await t.step("gradients of the loss", async () => {
      const { value, grads } = tf.variableGrads(() => model.forward(inputIds, images, mask, labels).loss!);
      await assertClose("train.step1.loss", value.reshape([1]), get("train.step1.loss"));
      let squares = 0;
      for (const g of Object.values(grads)) squares += (await g.square().sum().data())[0];
      await assertClose("train.step1.grad_norm", tf.tensor1d([Math.sqrt(squares)]), get("train.step1.grad_norm"));
      for (const name of JSON.parse(await Deno.readTextFile(`${FIXTURE_DIR}/inputs.json`)).train_steps.probe_params) {
        const grad = grads[model.params.get(name)!.name];
        // Linear weights are stored [in, out] here, [out, in] in PyTorch.
        const torchLayout = grad.rank === 2 && name !== "decoder.token_embedding.weight" ? grad.transpose() : grad;
        await assertClose(`grad ${name}`, torchLayout, get(`train.step1.grad.${name}`), 1e-4);
      }
      tf.dispose([value, ...Object.values(grads)]);
    });

    await t.step("greedy generation with the KV cache, padded batch", async () => {
      const ids = await model.generate(
        toTensor(get("gen.input_ids")),
        toTensor(get("gen.images")),
        toTensor(get("gen.attention_mask")),
        { maxNewTokens: 8, greedy: true },
      );
      assertEquals(Array.from(await ids.data()), Array.from(get("gen.greedy_ids_kv").data));
    });

    await t.step("greedy generation without a cache equals the reference's recomputation", async () => {
      const B = 2, T = 18;
      const rows = (data: ArrayLike<number>) => [0, 1].map((b) => Array.from(data).slice(b * T, (b + 1) * T));
      const { steps, logitsPerStep } = await greedyWithoutCache(
        model,
        rows(get("gen.input_ids").data),
        toTensor(get("gen.images")),
        rows(get("gen.attention_mask").data),
      );
      assertEquals(steps.flat(), Array.from(get("gen.greedy_ids_nokv").data));
      const V = cfg.lm_vocab_size, expectedLogits = get("gen.logits_nokv").data;
      for (let step = 0; step < 8; step++) {
        for (let b = 0; b < B; b++) {
          const want = expectedLogits.slice((b * 8 + step) * V, (b * 8 + step + 1) * V);
          const diff = maxAbsDiff(logitsPerStep[step].subarray(b * V, (b + 1) * V), want);
          if (!(diff <= 1e-4)) throw new Error(`gen.logits_nokv step ${step} row ${b}: ${diff}`);
        }
      }
    });

    await t.step("unpadded single prompt without an attention mask", async () => {
      const ids = await model.generate(
        toTensor(get("gen_single.input_ids")),
        toTensor(get("gen_single.images")),
        undefined,
        { maxNewTokens: 8, greedy: true },
      );
      assertEquals(Array.from(await ids.data()), Array.from(get("gen_single.greedy_ids_kv").data));
    });

    await t.step("EOS rewrite: every token after a row's first EOS becomes EOS", async () => {
      const ids = await model.generate(
        toTensor(get("gen.input_ids")),
        toTensor(get("gen.images")),
        toTensor(get("gen.attention_mask")),
        { maxNewTokens: 8, greedy: true, eosTokenId: get("gen.eos_override_id").data[0] },
      );
      assertEquals(Array.from(await ids.data()), Array.from(get("gen.greedy_ids_eos_override").data));
    });

    await t.step("loading the Hugging Face SigLIP and SmolLM2 files gives the same weights", async () => {
      const reference = (await readSafetensors(`${FIXTURE_DIR}/model.safetensors`)).tensors;
      const fromHF = modelFromBackbones(cfg, {
        vision: {
          config: JSON.parse(await Deno.readTextFile(`${FIXTURE_DIR}/hf_vit_config.json`)),
          weights: await readSafetensors(`${FIXTURE_DIR}/hf_vit.safetensors`),
        },
        language: {
          config: JSON.parse(await Deno.readTextFile(`${FIXTURE_DIR}/hf_lm_config.json`)),
          weights: await readSafetensors(`${FIXTURE_DIR}/hf_lm.safetensors`),
        },
      });
      assertEquals(fromHF.cfg.vit_hidden_dim, cfg.vit_hidden_dim);
      assertEquals(fromHF.cfg.lm_n_kv_heads, cfg.lm_n_kv_heads);
      const { tensors } = await stateDict(fromHF);
      let compared = 0;
      for (const [name, want] of reference) {
        if (name === "MP.proj.weight") continue; // the projector is not part of either backbone
        const got = tensors.get(name)!;
        // The embedding's <|image|> row is new (random); compare the 299 rows the file had.
        const n = name === "decoder.head.weight" ? cfg.lm_base_vocab_size * cfg.lm_hidden_dim : want.data.length;
        const diff = maxAbsDiff(got.data.subarray(0, n), want.data.subarray(0, n));
        if (diff !== 0) throw new Error(`${name}: loaded from the HF file differs by ${diff}`);
        compared++;
      }
      assertEquals(compared, reference.size - 1);
      assertEquals(smolLM2NameMap(cfg).length, 2 + 9 * cfg.lm_n_blocks);
      // With the fixture's projector, the HF-loaded model reproduces the reference's hidden states.
      fromHF.params.get("MP.proj.weight")!.assign(model.params.get("MP.proj.weight")!);
      const { logits } = fromHF.forward(inputIds, images, mask);
      const V = cfg.lm_vocab_size, base = cfg.lm_base_vocab_size;
      const ours = logits.slice([0, 0, 0], [-1, -1, base]);
      const want = get("lm.logits"), wantBase = new Float32Array(2 * 48 * base);
      for (let r = 0; r < 2 * 48; r++) wantBase.set(want.data.subarray(r * V, r * V + base), r * base);
      const diff = maxAbsDiff(await ours.data(), wantBase, rowMask);
      if (!(diff <= 1e-4)) throw new Error(`HF-loaded logits differ by ${diff}`);
      fromHF.dispose();
    });

    model.dispose();
  });
}

Deno.test("top-k / top-p filtering matches the reference's masks", () => {
  const input = get("sampling.input_logits");
  const V = input.shape[1];
  for (const [k, pTop] of [[0, 0.5], [0, 0.9], [3, 0.3], [50, 0.9], [5, 1.0]]) {
    const want = get(`sampling.filtered_k${k}_p${pTop === 1 ? "1.0" : pTop}`).data;
    for (let b = 0; b < 2; b++) {
      const got = topKTopPFilter(input.data.subarray(b * V, (b + 1) * V) as Float32Array, k, pTop);
      const ref = want.subarray(b * V, (b + 1) * V);
      for (let i = 0; i < V; i++) {
        const same = ref[i] === -Infinity ? got[i] === -Infinity : Math.abs(got[i] - ref[i]) <= 1e-4;
        if (!same) throw new Error(`top_k=${k} top_p=${pTop} row ${b} token ${i}: ${got[i]} vs ${ref[i]}`);
      }
    }
  }
  // The distribution generate() samples from with its defaults: filter, then temperature 0.5.
  const probs = get("sampling.probs_k50_p0.9_t0.5").data;
  for (let b = 0; b < 2; b++) {
    const row = topKTopPFilter(input.data.subarray(b * V, (b + 1) * V) as Float32Array, 50, 0.9);
    const diff = maxAbsDiff(softmax(row, 0.5), probs.subarray(b * V, (b + 1) * V));
    if (!(diff <= 1e-5)) throw new Error(`sampling probabilities row ${b} differ by ${diff}`);
  }
});
