// lib/state_dict.ts — nanoVLM's checkpoint format as data: config.json's text and model.safetensors' bytes.
//
// A checkpoint written here loads in PyTorch nanoVLM's own `VisionLanguageModel.from_pretrained` with the same logits,
// and one written there loads here (models/vision_language_model.py, save_pretrained / from_pretrained). Our
// parameters use nanoVLM's names; two layouts differ (config.ts, "Parameters"), so every read and write goes through
// `toTorchLayout` / `fromTorchLayout`. Foreign files (pretrained SigLIP and SmolLM2) are read through a name map, one
// table from their keys to ours (lib/backbones.ts); nanoVLM's own map is the identity but for the tied embedding.
// Nothing here reads or writes files, so the browser page uses it as it is; lib/checkpoint.ts puts the two files in a
// folder (savePretrained) and reads them from a folder or the Hugging Face Hub (fromPretrained).

import * as tf from "@tensorflow/tfjs";
import { DEFAULT_CONFIG, parameterSpecs, type ParamSpec, VisionLanguageModel, type VLMConfig } from "../nanovlm.ts";
import { decodeSafetensors, encodeSafetensors, type F32Tensor, type SafetensorsFile } from "./safetensors.ts";

// ---- Layouts ------------------------------------------------------------------------------

/** The PyTorch shape of a parameter, from our shape and layout. */
function torchShape(spec: ParamSpec, cfg: VLMConfig): number[] {
  const P = cfg.vit_patch_size;
  if (spec.layout === "linear") return [spec.shape[1], spec.shape[0]]; // [out, in]
  if (spec.layout === "conv") return [spec.shape[1], 3, P, P]; // [Dv, 3, P, P]
  return spec.shape;
}

/** Our layout → PyTorch layout. Both transposes are 2-D: conv [3PP, Dv] → [Dv, 3PP] → [Dv, 3, P, P]. */
function toTorchLayout(t: tf.Tensor, spec: ParamSpec, cfg: VLMConfig): tf.Tensor {
  return spec.layout === "plain" ? t.clone() : t.transpose().reshape(torchShape(spec, cfg));
}

/** PyTorch layout → our layout (the inverse of `toTorchLayout`). */
function fromTorchLayout(t: tf.Tensor, spec: ParamSpec): tf.Tensor {
  if (spec.layout === "plain") return t.clone();
  return t.reshape([t.shape[0], -1]).transpose(); // [out, in…] → [in…, out]
}

// ---- Writing --------------------------------------------------------------------------------

/**
 * The weights as nanoVLM saves them: PyTorch layouts, the tied embedding stored once as `decoder.head.weight`
 * (recorded in `__metadata__`), plus the RoPE buffer `decoder.rotary_embd.inv_freq`.
 */
export async function stateDict(
  model: VisionLanguageModel,
): Promise<{ tensors: Map<string, F32Tensor>; metadata: Record<string, string> }> {
  const cfg = model.cfg;
  const tensors = new Map<string, F32Tensor>();
  for (const spec of parameterSpecs(cfg)) {
    const torchTensor = toTorchLayout(model.params.get(spec.name)!, spec, cfg);
    const tied = cfg.lm_tie_weights && spec.name === "decoder.token_embedding.weight";
    const data = (await torchTensor.data()) as Float32Array;
    tensors.set(tied ? "decoder.head.weight" : spec.name, { dtype: "F32", shape: torchTensor.shape, data });
    torchTensor.dispose();
  }
  const hd = cfg.lm_hidden_dim / cfg.lm_n_heads, theta = cfg.lm_re_base;
  // inv_freq = 1 / θ^(2i/hd), rounded to float32 like PyTorch
  const invFreq = Float32Array.from({ length: hd / 2 }, (_, i) => 1 / Math.fround(theta ** Math.fround(2 * i / hd)));
  tensors.set("decoder.rotary_embd.inv_freq", { dtype: "F32", shape: [hd / 2], data: invFreq });
  const metadata: Record<string, string> = cfg.lm_tie_weights
    ? { "decoder.token_embedding.weight": "decoder.head.weight" }
    : {};
  return { tensors, metadata };
}

/** The two files of nanoVLM's format, as text and bytes: for a folder (checkpoint.ts) or a browser's download. */
export async function checkpointFiles(
  model: VisionLanguageModel,
): Promise<{ config: string; safetensors: Uint8Array }> {
  const { tensors, metadata } = await stateDict(model);
  const { vit_img_normalize, ...referenceFields } = model.cfg; // nanoVLM's VLMConfig rejects a field it lacks
  const config = JSON.stringify(vit_img_normalize ? model.cfg : referenceFields, null, 4);
  return { config, safetensors: encodeSafetensors(tensors, metadata) };
}

// ---- Reading --------------------------------------------------------------------------------

/** One of our parameters and the file's tensor(s) it is made of (several: concatenated rows). */
export interface NameMapping {
  ours: string;
  theirs: string[];
}

/** nanoVLM's names are ours; a tied embedding is stored as `decoder.head.weight`, as nanoVLM saves it. */
export function nanoVLMNameMap(cfg: VLMConfig, file: SafetensorsFile): NameMapping[] {
  return parameterSpecs(cfg).map(({ name }) => {
    const storedAsHead = cfg.lm_tie_weights && name === "decoder.token_embedding.weight" && !file.tensors.has(name);
    return { ours: name, theirs: [storedAsHead ? "decoder.head.weight" : name] };
  });
}

/**
 * Copy weights into `model` through a name map: each of our parameters is one tensor of the file (PyTorch layout), or
 * several concatenated along the first axis (SigLIP's q, k, v). A missing or wrongly shaped tensor is an error naming
 * the key and both shapes; with `strict` so is a tensor the map does not use. Nothing is assigned unless all fit.
 */
export function loadWeights(
  model: VisionLanguageModel,
  map: NameMapping[],
  file: SafetensorsFile,
  source: string,
  strict: boolean,
): void {
  const cfg = model.cfg;
  const specs = new Map(parameterSpecs(cfg).map((spec) => [spec.name, spec]));
  const problems: string[] = [];
  const values = new Map<string, tf.Tensor>();
  for (const { ours, theirs } of map) {
    const spec = specs.get(ours)!, want = torchShape(spec, cfg);
    const parts = theirs.map((key) => file.tensors.get(key)!);
    const absent = theirs.filter((_, i) => !parts[i]);
    if (absent.length) {
      problems.push(`missing tensor ${absent.join(", ")}`);
      continue;
    }
    const rows = parts.reduce((n, t) => n + t.shape[0], 0);
    const shape = [rows, ...parts[0].shape.slice(1)];
    // A pretrained embedding lacks the rows of our added tokens (<|image|>): they keep their random init.
    const extendsRows = !strict && ours === "decoder.token_embedding.weight" && rows < want[0] &&
      shape[1] === want[1];
    if (!extendsRows && shape.join() !== want.join() && [1, ...shape].join() !== want.join()) {
      problems.push(`tensor ${theirs.join(" + ")} has shape [${shape}] but this config needs [${want}]`);
      continue;
    }
    values.set(
      ours,
      tf.tidy(() => {
        const joined = tf.concat(parts.map((t) => tf.tensor(t.data, t.shape, "float32")));
        const full = extendsRows ? tf.concat([joined, model.params.get(ours)!.slice([rows, 0], [-1, -1])]) : joined;
        return fromTorchLayout(full.reshape(extendsRows ? full.shape : want), spec);
      }),
    );
  }
  if (strict) {
    const used = new Set([...map.flatMap((m) => m.theirs), "decoder.rotary_embd.inv_freq"]); // RoPE: recomputed
    if (cfg.lm_tie_weights) used.add("decoder.head.weight"); // the same tensor as the embedding
    const unexpected = [...file.tensors.keys()].filter((key) => !used.has(key));
    if (unexpected.length) problems.push(`unexpected tensors ${unexpected.join(", ")}`);
  }
  if (problems.length) {
    tf.dispose([...values.values()]);
    throw new Error(`${source} does not fit this model's config:\n  ${problems.join("\n  ")}`);
  }
  for (const [name, value] of values) {
    model.params.get(name)!.assign(value);
    value.dispose();
  }
}

/**
 * A model from the two files' contents (a browser's file picker or fetch): `source` names them in errors. Bad JSON, a
 * file that is not safetensors, or weights that do not fit the config are Errors that say which.
 */
export function modelFromCheckpointFiles(
  configText: string,
  safetensors: Uint8Array,
  source: string,
): VisionLanguageModel {
  let json: Record<string, unknown>;
  try {
    json = JSON.parse(configText);
  } catch (e) {
    throw new Error(`${source}: config.json is not valid JSON (${(e as Error).message})`);
  }
  if (typeof json !== "object" || json === null || Array.isArray(json)) {
    throw new Error(`${source}: config.json should hold an object of settings`);
  }
  const cfg = configFromJSON(json);
  return modelFromWeights(
    cfg,
    decodeSafetensors(safetensors, `${source}/model.safetensors`),
    `${source}/model.safetensors`,
  );
}

/** A model of `cfg` holding the weights of a nanoVLM state dict (strict: every tensor used, every shape right). */
export function modelFromWeights(cfg: VLMConfig, file: SafetensorsFile, source: string): VisionLanguageModel {
  const model = new VisionLanguageModel(cfg);
  try {
    loadWeights(model, nanoVLMNameMap(cfg, file), file, source, true);
  } catch (e) {
    model.dispose();
    throw e;
  }
  return model;
}

/**
 * Read a config object (e.g. a parsed config.json): every known field is taken, a missing one falls back to `base`, an
 * unknown one is reported through `warn` and ignored (old checkpoints carry fields such as `lm_eos_token_id`).
 */
export function configFromJSON(
  json: Record<string, unknown>,
  base: VLMConfig = DEFAULT_CONFIG,
  warn: (msg: string) => void = console.warn,
): VLMConfig {
  const cfg: Record<string, unknown> = { ...base };
  for (const [key, value] of Object.entries(json)) {
    if (!(key in base)) warn(`config: ignoring unknown key "${key}"`);
    else if (typeof value !== typeof base[key as keyof VLMConfig]) {
      throw new Error(
        `config: "${key}" should be a ${typeof base[key as keyof VLMConfig]}, got ${JSON.stringify(value)}`,
      );
    } else cfg[key] = value;
  }
  return cfg as unknown as VLMConfig;
}
