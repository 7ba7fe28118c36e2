// lib/checkpoint.ts — nanoVLM's checkpoint on disk: a folder with config.json and model.safetensors, written by
// savePretrained and read by fromPretrained from a folder or a Hugging Face Hub repo. What the two files hold, and how
// our layouts map to PyTorch's, is lib/state_dict.ts.

import { type VisionLanguageModel } from "../nanovlm.ts";
import { readSafetensors } from "./safetensors.ts";
import { checkpointFiles, configFromJSON, modelFromWeights } from "./state_dict.ts";
import { HubNotFoundError, type HubOptions, hubSnapshot, isRepoId } from "./hub.ts";
import { fileExists, isDirectory, writeFileAtomic } from "./files.ts";

/** Write `config.json` and `model.safetensors` to `dir` in nanoVLM's format, each file atomically. */
export async function savePretrained(model: VisionLanguageModel, dir: string): Promise<void> {
  await Deno.mkdir(dir, { recursive: true });
  const { config, safetensors } = await checkpointFiles(model);
  await writeFileAtomic(`${dir}/model.safetensors`, safetensors);
  await writeFileAtomic(`${dir}/config.json`, config);
}

/**
 * Load a model saved by `savePretrained` or by PyTorch nanoVLM: `dirOrRepo` is a folder with config.json and
 * model.safetensors, or a Hugging Face repo id ("lusxvr/nanoVLM-450M") downloaded to the Hub cache (lib/hub.ts). A
 * folder that exists wins over a repo id of the same name, as in the reference.
 */
export async function fromPretrained(dirOrRepo: string, options: HubOptions = {}): Promise<VisionLanguageModel> {
  let dir = dirOrRepo;
  if (!(await isDirectory(dir)) && isRepoId(dirOrRepo)) {
    try {
      dir = await hubSnapshot(dirOrRepo, ["config.json", "model.safetensors"], { ...options, repoType: "model" });
    } catch (e) {
      if (e instanceof HubNotFoundError) e.message += ` (and there is no local folder ${dirOrRepo})`;
      throw e;
    }
  }
  for (const file of ["config.json", "model.safetensors"]) {
    if (!(await fileExists(`${dir}/${file}`))) {
      throw new Error(`${dir} is not a nanoVLM checkpoint: ${file} is missing`);
    }
  }
  const cfg = configFromJSON(JSON.parse(await Deno.readTextFile(`${dir}/config.json`)));
  return modelFromWeights(cfg, await readSafetensors(`${dir}/model.safetensors`), `${dir}/model.safetensors`);
}
