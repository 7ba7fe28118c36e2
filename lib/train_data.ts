// lib/train_data.ts — the batches and questions a run of train.ts learns from and is measured on, from its settings.
// The built-in shapes world's are here (data.ts draws them); a real dataset's (--data) are lib/datasets.ts's
// `datasetTrainingData`. The val sets are fixed subsets, the same at every eval and in every run. Nothing here touches
// files, so the browser page's training worker (web/train_worker.ts) uses it as it is.

import { type Batch, type ChatTokenizer, shapesBatches } from "../data.ts";
import type { VLMConfig } from "../config.ts";
import { type EvalItem, shapesQuestions } from "./scoring.ts";
import type { TrainConfig } from "./train_config.ts";

/** A run's data: the endless training stream, the val batches (val loss) and the val questions (val accuracy). */
export interface TrainingData {
  /** Training batches from where the run stands; `await batches.next()` for the next one. */
  batches: AsyncIterator<Batch> | Iterator<Batch>;
  /** Fixed val batches: the val split's first val_samples, or a dataset's first val_samples conversations. */
  valBatches: Batch[];
  /** Shapes-world val questions for the val accuracy; none for a dataset. */
  valQuestions: EvalItem[];
  /** What happened to a dataset's rows so far (rows read, skipped, bad images); zero for the shapes world. */
  stats: DataStats;
}

/** What happened to the rows of a stream; lib/datasets.ts's `conversationBatches` updates it as it goes. */
export interface DataStats {
  /** Rows read. */
  rows: number;
  /** Rows that went into batches. */
  samples: number;
  /** Rows skipped: an image did not decode, or the row had no text. */
  skippedRows: number;
  /** Images that did not decode (missing file, corrupt or empty bytes, unknown format). */
  corruptImages: number;
  /** Samples longer than lm_max_length, dropped by the collator. */
  tooLong: number;
}

/** A zeroed DataStats. */
export function newDataStats(): DataStats {
  return { rows: 0, samples: 0, skippedRows: 0, corruptImages: 0, tooLong: 0 };
}

/**
 * The shapes world's data for a run with `config` and a model with `cfg`, resumed after `examplesSeen` examples: the
 * train split with the run's question mix, and its val split.
 */
export function shapesTrainingData(
  config: TrainConfig,
  cfg: VLMConfig,
  tokenizer: ChatTokenizer,
  examplesSeen: number,
): TrainingData {
  const batches = shapesBatches({
    split: "train",
    seed: config.seed,
    batchSize: config.batch_size,
    tokenizer,
    config: cfg,
    captionWeight: config.caption_weight,
    choiceWeight: config.choice_weight,
    positionWeight: config.position_weight,
    lengthBuckets: config.sort_by_length ? config.gradient_accumulation_steps : 1,
    choiceHints: config.choice_hints,
    sortedChoices: config.sorted_choices,
    choiceVerdicts: config.choice_verdicts,
    choiceNamesOption: config.choice_names_option,
    promptLoss: config.prompt_loss,
    untrainedOptionBreaks: config.untrained_option_breaks,
    choiceCopyDrills: config.choice_copy_drills,
    plainScenes: config.plain_scenes,
    start: examplesSeen,
  });
  // Fixed val subsets, the same at every eval and in every run (seed 0).
  const valBatches = [
    ...shapesBatches({
      split: "val",
      seed: 0,
      batchSize: config.batch_size,
      tokenizer,
      config: cfg,
      choiceNamesOption: config.choice_names_option,
      count: config.val_samples,
    }),
  ];
  const valQuestions = shapesQuestions("val", Math.ceil(config.val_questions / 4), cfg.vit_img_size)
    .slice(0, config.val_questions);
  return { batches, valBatches, valQuestions, stats: newDataStats() };
}
