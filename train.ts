// train.ts — train a small VLM on one machine: `deno task train`.
//
// What this is: nanoVLM's training loop (its train.py at 8374ce1) for the built-in shapes
// world: AdamW with two parameter groups (projector vs backbones), the reference's warmup +
// cosine schedule, gradient accumulation, clipping at 1.0, a val loss and a val accuracy
// every `eval_interval` steps, checkpoints in nanoVLM's format that survive a crash, and
// `--resume` that continues a run exactly where it stopped. With no arguments it trains the
// `tiny` preset from scratch in minutes on a laptop CPU.
//
// Real data and pretrained backbones come from lib/datasets.ts and lib/hub.ts: `--data
// cauldron:vqav2` (or a .jsonl / .parquet path) streams conversations instead of the shapes
// world, a preset with `vlm_load_backbone_weights` (nanovlm-222m) starts from SigLIP and
// SmolLM2 downloaded from the Hub, and `--push_to_hub owner/repo` shares the result.
//
// What this is not: the reference's data mix (45 Cauldron subsets, packing), mixed
// precision, multi-GPU, or lmms-eval. The model is nanovlm.ts, the data data.ts, the
// answer scoring lib/eval.ts; this file only wires them into a loop. The loop's machinery is
// in lib/, where exercises, notebooks and benchmarks import it too: the settings
// (train_config.ts), the run's batches (train_data.ts), lrSchedule and AdamW
// (optimizer.ts), trainStep (train_step.ts), checkpoints and metrics (train_state.ts).

import {
  checkChoiceSettings,
  checkSettingsForData,
  DEFAULT_TRAIN_CONFIG,
  modelConfig,
  parseTrainArgs,
  resumedTrainConfig,
  type TrainConfig,
  visionLearningRate,
} from "./lib/train_config.ts";
import { type Batch, type ChatTokenizer, checkTokenizerFitsConfig } from "./data.ts";
import { datasetTrainingData, type DataSource, openDataset } from "./lib/datasets.ts";
import { shapesTrainingData } from "./lib/train_data.ts";
import { pretrainRunVision } from "./lib/vision_pretrain.ts";
import { VisionLanguageModel, type VLMConfig } from "./nanovlm.ts";
import { configFromJSON } from "./lib/state_dict.ts";
import { loadBackbones, modelFromBackbones } from "./lib/backbones.ts";
import { hubToken, hubTokenizer, pushRunToHub } from "./lib/hub.ts";
import { resolveTokenizerPath } from "./lib/inference.ts";
import { AdamW, adamWOnHost, lrSchedule, paramGroups } from "./lib/optimizer.ts";
import {
  lowMemoryTraining,
  NonFiniteError,
  shareSpacedWordEmbeddings,
  type StepResult,
  trainingThreads,
  trainStep,
} from "./lib/train_step.ts";
import {
  appendMetrics,
  formatDuration,
  loadCheckpoint,
  lossCurveSvg,
  meanLoss,
  type MetricsRecord,
  metricsUpTo,
  saveCheckpoint,
  type SplitAccuracy,
  testAccuracy,
  type TrainerState,
} from "./lib/train_state.ts";
import { evaluate } from "./lib/scoring.ts";
import { fileExists, isDirectory, writeFileAtomic } from "./lib/files.ts";
import { runMain } from "./lib/cli.ts";
import { GradientHelper } from "./backend/parallel.ts";
import { type BackendName, initBackend } from "./backend/runtime.ts";
import { shareBlasThreads, wasmMatMulEngine } from "./backend/kernels.ts";
import { useActivationCheckpointing } from "./backend/low_memory.ts";

/** What a finished (or stopped) run reports. */
export interface TrainSummary {
  runDir: string;
  steps: number;
  seconds: number;
  finalLoss: number;
  valLoss: number | null;
  valAccuracy: number | null;
  /** Accuracy on test and test-novel (all question kinds), when test_examples > 0 and the run finished. */
  test?: Record<string, SplitAccuracy>;
}

/** A new run's folder name: the preset and the local date and time. */
function runName(preset: string): string {
  const d = new Date(), p = (n: number) => String(n).padStart(2, "0");
  const date = `${d.getFullYear()}${p(d.getMonth() + 1)}${p(d.getDate())}`;
  return `${preset}-${date}-${p(d.getHours())}${p(d.getMinutes())}${p(d.getSeconds())}`;
}

/**
 * Train (or resume) a run. `trainOverrides` are applied to the defaults (a new run) or
 * to the run's saved train_config.json (with `resume`); `modelOverrides` to the preset
 * (new runs only). Prints through `log` (default console.log). Throws NonFiniteError
 * when the loss or gradient norm stops being finite; the last good checkpoint stays.
 */
export async function train(
  trainOverrides: Partial<TrainConfig> = {},
  modelOverrides: Partial<VLMConfig> = {},
  { log = console.log }: { log?: (line: string) => void } = {},
): Promise<TrainSummary> {
  // Settings: defaults + overrides, or the resumed run's settings + overrides.
  let config: TrainConfig = { ...DEFAULT_TRAIN_CONFIG, ...trainOverrides };
  let runDir: string;
  if (config.resume) {
    runDir = config.resume;
    if (Object.keys(modelOverrides).length) {
      throw new Error(`a resumed run keeps its model; drop ${Object.keys(modelOverrides).map((k) => `--${k}`)}`);
    }
    config = await resumedTrainConfig(runDir, trainOverrides);
  } else {
    runDir = `${config.runs_dir}/${config.run_name || runName(config.preset)}`;
    if (await isDirectory(`${runDir}/latest`) || await fileExists(`${runDir}/train_config.json`)) {
      throw new Error(`${runDir} already holds a run: continue it with --resume=${runDir} or pick another --run_name`);
    }
  }
  if (config.push_to_hub && !hubToken()) {
    throw new Error(`--push_to_hub ${config.push_to_hub} needs a token with write access: set HF_TOKEN`);
  }
  checkSettingsForData(config);
  checkChoiceSettings(config);
  // Open the dataset first, so a wrong --data fails before any model is built.
  const source = config.data === "shapes" ? undefined : await openDataset(config.data);
  // initBackend prints its own detailed line; a caller with its own `log` gets just the name.
  const backend = await initBackend((config.backend || undefined) as BackendName | undefined, {
    quiet: log !== console.log,
  });
  if (log !== console.log) log(`backend: ${backend}`);

  // Model, optimizer and where the loop is. A model too big for the wasm heap trains in low-memory mode.
  const runConfig = config.resume
    ? configFromJSON(JSON.parse(await Deno.readTextFile(`${runDir}/config.json`)))
    : modelConfig(config.preset, modelOverrides);
  const lowMemory = lowMemoryTraining(config.low_memory, backend, runConfig);
  // Peak learning rates of the optimizer's groups: projector, decoder (and ViT, unless it has its own), ViT.
  const lrVision = visionLearningRate(config, runConfig);
  const peakLrs = [config.lr_mp, config.lr_backbones, lrVision] as const;
  let model: VisionLanguageModel, optimizer: AdamW;
  let state: TrainerState = { step: 0, examples_seen: 0, best_val_loss: null, elapsed_seconds: 0 };
  if (config.resume) {
    ({ model, optimizer, state } = await loadCheckpoint(`${runDir}/latest`, ...peakLrs, {
      beta2: config.adam_beta2,
      momentsOnHost: adamWOnHost(backend),
    }));
    log(`resuming ${runDir} at step ${state.step} (${state.examples_seen} examples seen)`);
  } else {
    const cfg = runConfig;
    if (cfg.vlm_load_backbone_weights) {
      // The reference's start: pretrained SigLIP and SmolLM2 (downloaded once into the Hub cache), projector random.
      log(`backbones: ${cfg.vit_model_type} + ${cfg.lm_model_type} (pretrained, from the Hugging Face Hub cache)`);
      model = modelFromBackbones(cfg, await loadBackbones(cfg), { seed: config.seed });
    } else model = new VisionLanguageModel(cfg, { seed: config.seed });
    optimizer = new AdamW(model.params, paramGroups(model, ...peakLrs), {
      beta2: config.adam_beta2,
      momentsOnHost: adamWOnHost(backend),
    });
  }
  if (lowMemory) useActivationCheckpointing(model);
  const cfg = model.cfg;
  // A tokenizer folder of this project (tokenizers/shapes), or a Hub repo such as HuggingFaceTB/SmolLM2-135M.
  const localTokenizer = resolveTokenizerPath(cfg.lm_tokenizer);
  const foundLocally = await isDirectory(localTokenizer) || await fileExists(localTokenizer);
  const tokenizer = await hubTokenizer(foundLocally ? localTokenizer : cfg.lm_tokenizer);
  checkTokenizerFitsConfig(tokenizer, cfg);
  model.eosTokenId = tokenizer.eosTokenId;
  if (!config.resume && !cfg.vlm_load_backbone_weights && config.share_spaced_words) {
    log(`${shareSpacedWordEmbeddings(model, tokenizer)} words start with the embedding of their spaced spelling`);
  }

  const helpers: GradientHelper[] = [];
  try {
    const threads = trainingThreads(config.threads, backend, lowMemory);
    shareBlasThreads(threads);
    helpers.push(...await GradientHelper.startUpTo(threads - 1, cfg, optimizer.trainable, log));
    await Deno.mkdir(runDir, { recursive: true });
    await writeFileAtomic(`${runDir}/config.json`, JSON.stringify(cfg, null, 4) + "\n");
    await writeFileAtomic(`${runDir}/train_config.json`, JSON.stringify(config, null, 2) + "\n");
    // Steps logged after the checkpoint we resume from happened in a timeline that is gone.
    const metrics = await metricsUpTo(`${runDir}/metrics.jsonl`, state.step);

    const overridden = Object.entries(modelOverrides).map(([k, v]) => `${k}=${JSON.stringify(v)}`);
    log(`run: ${runDir}`);
    log(`train config: ${JSON.stringify(config)}`);
    log(
      `model: preset ${config.preset}${overridden.length ? ` with ${overridden.join(", ")}` : ""} | ` +
        `${model.parameterCount().toLocaleString("en-US")} parameters | image ${cfg.vit_img_size}px, ` +
        `${cfg.mp_image_token_length} image tokens | context ${cfg.lm_max_length} | vocabulary ${cfg.lm_vocab_size}`,
    );
    const groups = optimizer.groups.map((g) => `${g.name} lr ${g.maxLr} (${g.params.length} tensors)`).join(", ");
    const frozen = [
      ...(lrVision > 0 ? [] : ["vision encoder"]),
      ...(config.lr_backbones > 0 ? [] : ["decoder"]),
    ];
    log(`optimizer: AdamW, ${groups}${frozen.length ? `, ${frozen.join(" and ")} frozen` : ""}`);
    if (lowMemory) log("low memory: every block checkpointed (--low_memory=off to stop)");
    if (helpers.length) {
      log(
        `threads: ${helpers.length + 1}, each computing part of every step's gradient (parallel.ts; --threads=1: one)` +
          ` | matMul on each: ${wasmMatMulEngine()}`,
      );
    }

    if (source) log(`data: ${source.name}`);
    // --vision_pretrain_steps: the ViT first learns what is in each quadrant, as SigLIP was pretrained for nanoVLM.
    if (!config.resume) await pretrainRunVision(model, config, log, helpers);
    const summary = await trainLoop(model, optimizer, state, tokenizer, config, runDir, metrics, log, helpers, source);
    if (config.push_to_hub && summary.steps === config.max_training_steps) {
      const bestValLoss = summary.valLoss === null ? undefined : state.best_val_loss;
      const duration = formatDuration(summary.seconds);
      await pushRunToHub(runDir, config, cfg, { ...summary, duration, bestValLoss, data: source?.name, backend }, log);
    }
    return summary;
  } finally {
    helpers.forEach((helper) => helper.close());
    optimizer.dispose();
    model.dispose();
  }
}

/** The loop proper: steps, logs, evals, checkpoints; then the summary. */
async function trainLoop(
  model: VisionLanguageModel,
  optimizer: AdamW,
  state: TrainerState,
  tokenizer: ChatTokenizer,
  config: TrainConfig,
  runDir: string,
  metrics: MetricsRecord[],
  log: (line: string) => void,
  helpers: GradientHelper[],
  source?: DataSource,
): Promise<TrainSummary> {
  const maxSteps = config.max_training_steps;
  const samplesPerStep = config.batch_size * config.gradient_accumulation_steps;
  const lastStep = config.stop_at > 0 ? Math.min(config.stop_at, maxSteps) : maxSteps;
  // Data: the training stream from where the run stands, and the fixed val sets.
  const data = source
    ? await datasetTrainingData(source, config, model.cfg, tokenizer, state.examples_seen)
    : shapesTrainingData(config, model.cfg, tokenizer, state.examples_seen);
  const { valBatches, valQuestions, stats } = data;
  const record = (r: MetricsRecord) => appendMetrics(`${runDir}/metrics.jsonl`, metrics, r);

  let lastLoss = NaN, valLoss: number | null = null, valAccuracy: number | null = null;
  let sessionSteps = 0, sessionMs = 0;
  // A step's micro-batches are made during the step before: a promise callback runs at trainStep's first await,
  // after this thread's own part, so rendering and collating (about 5 ms a step in the shapes world) hide behind the
  // helpers' part (or the GPU's work) instead of adding to every step. On one WASM thread nothing is gained.
  const nextMicroBatches = async () => {
    const micro: Batch[] = [];
    for (let i = 0; i < config.gradient_accumulation_steps; i++) micro.push((await data.batches.next()).value as Batch);
    return micro;
  };
  let upcoming = nextMicroBatches();
  while (state.step < lastStep) {
    const micro = await upcoming;
    upcoming = state.step + 1 < lastStep ? Promise.resolve().then(nextMicroBatches) : Promise.resolve([]);
    upcoming.catch(() => {}); // a failure surfaces at the next step's await, not as an unhandled rejection
    const lrs = optimizer.groups.map((g) => lrSchedule(state.step, g.maxLr, maxSteps));
    const started = performance.now();
    let result: StepResult;
    try {
      result = await trainStep(model, micro, optimizer, {
        lrs,
        maxGradNorm: config.max_grad_norm,
        answerFloor: config.answer_floor,
        helpers,
      });
    } catch (e) {
      if (!(e instanceof NonFiniteError)) throw e;
      const kept = await isDirectory(`${runDir}/latest`)
        ? `the last good checkpoint, ${runDir}/latest, is untouched`
        : "no checkpoint was written yet";
      throw new NonFiniteError(
        `step ${state.step + 1}: ${e.message} is not finite, so training stopped without applying this update; ` +
          `${kept}. Try a lower --lr_mp / --lr_backbones or --max_grad_norm.`,
      );
    }
    const ms = performance.now() - started;
    state.step++;
    // A dataset counts the conversations it used; the shapes stream counts places (batch_size per batch).
    state.examples_seen += source ? micro.reduce((n, b) => n + b.batchSize, 0) : samplesPerStep;
    state.elapsed_seconds += ms / 1000;
    lastLoss = result.loss;
    // The first step of a session pays for kernel compilation and warm-up: keep it out of the ETA.
    if (sessionSteps++ > 0) sessionMs += ms;
    const perStep = sessionSteps > 1 ? sessionMs / (sessionSteps - 1) : ms;
    const lrText = lrs.map((lr) => lr.toExponential(1)).join("/");
    log(
      `step ${state.step}/${maxSteps} | loss ${result.loss.toFixed(3)} | lr ${lrText} | ` +
        `grad ${result.gradNorm.toFixed(2)} | ${ms.toFixed(0)} ms | ${(samplesPerStep / (ms / 1000)).toFixed(1)} ` +
        `samples/s | ETA ${formatDuration(((lastStep - state.step) * perStep) / 1000)}`,
    );
    await record({ step: state.step, loss: result.loss, lr: lrs, grad_norm: result.gradNorm, ms: Math.round(ms) });

    const stopping = state.step === lastStep;
    if (state.step % config.eval_interval === 0 || stopping) {
      const evalStart = performance.now();
      valLoss = await meanLoss(model, valBatches);
      if (valQuestions.length) {
        valAccuracy = (await evaluate(model, tokenizer, valQuestions, { batchSize: 64 })).accuracy;
      }
      const improved = state.best_val_loss === null || valLoss < state.best_val_loss;
      if (improved) {
        state.best_val_loss = valLoss;
        await saveCheckpoint(`${runDir}/best`, model);
      }
      await saveCheckpoint(`${runDir}/latest`, model, { optimizer, state });
      await record({ step: state.step, val_loss: valLoss, val_accuracy: valAccuracy ?? undefined });
      await writeFileAtomic(`${runDir}/loss.svg`, lossCurveSvg(metrics, `${runDir}: loss`));
      log(
        `eval step ${state.step} | val loss ${valLoss.toFixed(3)}${improved ? " (best, saved)" : ""} | ` +
          (valAccuracy === null
            ? `data: ${stats.rows} rows, ${stats.skippedRows} skipped (${stats.corruptImages} bad images) | `
            : `val accuracy ${(100 * valAccuracy).toFixed(1)}% (${valQuestions.length} questions) | `) +
          `${((performance.now() - evalStart) / 1000).toFixed(1)} s`,
      );
    }
  }

  const summary: TrainSummary = {
    runDir,
    steps: state.step,
    seconds: state.elapsed_seconds,
    finalLoss: lastLoss,
    valLoss,
    valAccuracy,
  };
  if (state.step < maxSteps) {
    log(`stopped at step ${state.step} of ${maxSteps}; continue with: deno task train --resume=${runDir}`);
    return summary;
  }
  log(
    `done: ${state.step} steps in ${formatDuration(state.elapsed_seconds)} of training | final loss ` +
      `${lastLoss.toFixed(3)} | best val loss ${state.best_val_loss?.toFixed(3)} | checkpoints ${runDir}/best, latest`,
  );
  if (config.test_examples > 0 && !source) {
    summary.test = await testAccuracy(runDir, tokenizer, config.test_examples, log);
  }
  log(`try it: deno task generate --checkpoint=${runDir}/best --prompt="Describe the image."`);
  return summary;
}

// ---- main ------------------------------------------------------------------------------------

/** The command line: `--key=value` for any setting of TrainConfig or VLMConfig (lib/train_config.ts). */
async function main(args: string[]): Promise<TrainSummary> {
  const { train: trainOverrides, model: modelOverrides } = parseTrainArgs(args);
  return await train(trainOverrides, modelOverrides);
}

if (import.meta.main) await runMain(main);
