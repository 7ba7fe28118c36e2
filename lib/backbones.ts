// backbones.ts — start nanovlm.ts from pretrained Hugging Face backbones.
//
// nanoVLM's point is to glue a pretrained vision encoder (SigLIP) to a pretrained
// language model (SmolLM2) and train only a little. Their checkpoints store the same
// tensors as nanovlm.ts, in the same PyTorch layouts, under other names; this file is
// the name maps and the translation of their config.json files, nothing else. The
// download from the Hub lives in hub.ts; the generic loader is `loadWeights` in nanovlm.ts.
//
// Three differences from our names are worth knowing: SigLIP keeps q, k and v separate
// (we fuse them into one qkv_proj, rows in q|k|v order), its position embedding is
// [Np, Dv] (ours [1, Np, Dv]), and SmolLM2's embedding lacks the row of our added
// `<|image|>` token, which keeps its random initialisation.

import { join } from "node:path";
import { checkCached, type HubOptions, hubSnapshot } from "./hub.ts";
import { readSafetensors } from "./safetensors.ts";
import { VisionLanguageModel, type VLMConfig } from "../nanovlm.ts";
import type { SafetensorsFile } from "./safetensors.ts";
import { loadWeights, type NameMapping } from "./state_dict.ts";

/** A pretrained backbone: its Hugging Face config.json (parsed) and its weights. */
export interface Backbone {
  config: Record<string, unknown>;
  weights: SafetensorsFile;
}

/**
 * A model built around pretrained backbones: the config takes the backbones' shapes (as
 * the reference's from_pretrained does), the ViT and decoder weights are loaded, the
 * projector starts random.
 */
export function modelFromBackbones(
  cfg: VLMConfig,
  backbones: { vision?: Backbone; language?: Backbone },
  options: { seed?: number } = {},
): VisionLanguageModel {
  const { vision, language } = backbones;
  const model = new VisionLanguageModel(configWithBackbones(cfg, vision?.config, language?.config), options);
  try {
    if (vision) loadWeights(model, siglipNameMap(model.cfg), vision.weights, cfg.vit_model_type, false);
    if (language) loadWeights(model, smolLM2NameMap(model.cfg), language.weights, cfg.lm_model_type, false);
  } catch (e) {
    model.dispose();
    throw e;
  }
  return model;
}

/** google/siglip(2)-base-patch16-* names → ours. The rest of the file (text tower, pooling head) is ignored. */
export function siglipNameMap(cfg: VLMConfig): NameMapping[] {
  const [ours, hf] = ["vision_encoder", "vision_model"];
  const map: NameMapping[] = [
    { ours: `${ours}.patch_embedding.position_embedding`, theirs: [`${hf}.embeddings.position_embedding.weight`] },
  ];
  for (const kind of ["weight", "bias"]) {
    map.push(
      { ours: `${ours}.patch_embedding.conv.${kind}`, theirs: [`${hf}.embeddings.patch_embedding.${kind}`] },
      { ours: `${ours}.layer_norm.${kind}`, theirs: [`${hf}.post_layernorm.${kind}`] },
    );
    for (let i = 0; i < cfg.vit_n_blocks; i++) {
      const [a, b] = [`${ours}.blocks.${i}`, `${hf}.encoder.layers.${i}`];
      const pairs = [["ln1", "layer_norm1"], ["ln2", "layer_norm2"], ["mlp.fc1", "mlp.fc1"], ["mlp.fc2", "mlp.fc2"]];
      pairs.push(["attn.out_proj", "self_attn.out_proj"]);
      for (const [x, y] of pairs) map.push({ ours: `${a}.${x}.${kind}`, theirs: [`${b}.${y}.${kind}`] });
      map.push({
        ours: `${a}.attn.qkv_proj.${kind}`,
        theirs: ["q", "k", "v"].map((x) => `${b}.self_attn.${x}_proj.${kind}`),
      });
    }
  }
  return map;
}

/** HuggingFaceTB/SmolLM2 (Llama) names → ours. Its lm_head is the tied embedding, so no head is read. */
export function smolLM2NameMap(cfg: VLMConfig): NameMapping[] {
  const map: NameMapping[] = [
    { ours: "decoder.token_embedding.weight", theirs: ["model.embed_tokens.weight"] }, // + rows for added tokens
    { ours: "decoder.norm.weight", theirs: ["model.norm.weight"] },
  ];
  const pairs = [
    ["attn.q_proj", "self_attn.q_proj"],
    ["attn.k_proj", "self_attn.k_proj"],
    ["attn.v_proj", "self_attn.v_proj"],
    ["attn.out_proj", "self_attn.o_proj"],
    ["mlp.gate_proj", "mlp.gate_proj"],
    ["mlp.up_proj", "mlp.up_proj"],
    ["mlp.down_proj", "mlp.down_proj"],
    ["norm1", "input_layernorm"],
    ["norm2", "post_attention_layernorm"],
  ];
  for (let i = 0; i < cfg.lm_n_blocks; i++) {
    for (const [x, y] of pairs) {
      map.push({ ours: `decoder.blocks.${i}.${x}.weight`, theirs: [`model.layers.${i}.${y}.weight`] });
    }
  }
  return map;
}

/**
 * The config with the backbones' shapes, read from their Hugging Face config.json as the
 * reference does (SigLIP's may nest them under `vision_config`; omitted fields take
 * SiglipVisionConfig's defaults). mp_image_token_length follows from the image size.
 */
export function configWithBackbones(
  cfg: VLMConfig,
  vision?: Record<string, unknown>,
  language?: Record<string, unknown>,
): VLMConfig {
  const out: Record<string, unknown> = { ...cfg };
  const copy = (from: Record<string, unknown>, fields: [keyof VLMConfig, string, number?][]) => {
    for (const [ours, theirs, fallback] of fields) out[ours] = from[theirs] ?? fallback;
  };
  if (vision) {
    copy((vision.vision_config ?? vision) as Record<string, unknown>, [
      ["vit_hidden_dim", "hidden_size", 768],
      ["vit_inter_dim", "intermediate_size", 3072],
      ["vit_n_blocks", "num_hidden_layers", 12],
      ["vit_n_heads", "num_attention_heads", 12],
      ["vit_img_size", "image_size", 224],
      ["vit_patch_size", "patch_size", 16],
      ["vit_ln_eps", "layer_norm_eps", 1e-6],
      ["vit_dropout", "attention_dropout", 0],
    ]);
    const { vit_img_size: S, vit_patch_size: P, mp_pixel_shuffle_factor: s } = out as VLMConfig;
    out.mp_image_token_length = (S / P / s) ** 2;
  }
  if (language) {
    copy(language, [
      ["lm_hidden_dim", "hidden_size"],
      ["lm_inter_dim", "intermediate_size"],
      ["lm_rms_eps", "rms_norm_eps"],
      ["lm_re_base", "rope_theta"],
      ["lm_max_position_embeddings", "max_position_embeddings"],
      ["lm_n_heads", "num_attention_heads"],
      ["lm_n_kv_heads", "num_key_value_heads"],
      ["lm_dropout", "attention_dropout", 0],
      ["lm_n_blocks", "num_hidden_layers"],
    ]);
    if ((language.vocab_size as number) > cfg.lm_vocab_size) {
      throw new Error(
        `the language backbone has ${language.vocab_size} tokens but lm_vocab_size is ${cfg.lm_vocab_size}`,
      );
    }
  }
  return out as VLMConfig;
}

// ---- Downloading backbones ------------------------------------------------------------------

/** A Hugging Face model repo's config.json (parsed) and model.safetensors, downloaded or cached. */
export async function loadBackbone(repoId: string, options: HubOptions = {}): Promise<Backbone> {
  const dir = await hubSnapshot(repoId, ["config.json", "model.safetensors"], { ...options, repoType: "model" });
  return {
    config: JSON.parse(await Deno.readTextFile(join(dir, "config.json"))),
    weights: await readSafetensors(join(dir, "model.safetensors")),
  };
}

/**
 * The pretrained backbones a config names (`vit_model_type`, `lm_model_type`, e.g.
 * google/siglip-base-patch16-224 and HuggingFaceTB/SmolLM2-135M), ready for
 * `modelFromBackbones(cfg, backbones)` (backbones.ts). A type of "none" is skipped. In
 * offline mode every missing file of both repos is listed at once.
 */
export async function loadBackbones(
  cfg: Pick<VLMConfig, "vit_model_type" | "lm_model_type">,
  options: HubOptions = {},
): Promise<{ vision?: Backbone; language?: Backbone }> {
  const repos = [cfg.vit_model_type, cfg.lm_model_type].filter((r) => r && r !== "none");
  await checkCached(repos.map((repoId) => ({ repoId, files: ["config.json", "model.safetensors"] })), options);
  const load = (repo: string) => repo && repo !== "none" ? loadBackbone(repo, options) : undefined;
  return { vision: await load(cfg.vit_model_type), language: await load(cfg.lm_model_type) };
}
