// lib/train_data.ts — the batches and questions a run of train.ts learns from and is measured on, from its settings:
// the built-in shapes world (data.ts) or a real dataset (--data, datasets.ts). The val sets are fixed subsets, the
// same at every eval and in every run.

import { type Batch, type ChatTokenizer, shapesBatches } from "../data.ts";
import type { VLMConfig } from "../config.ts";
import { type DataSource, type DataStats, heldOutBatches, newDataStats, trainingBatches } from "./datasets.ts";
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

/**
 * The data of a run with `config` for a model with `cfg`, resumed after `examplesSeen` examples: with a `source`
 * (--data) its first val_samples conversations are the val set and the rest streams, shuffled; else the shapes world's
 * train split with the run's question mix, and its val split.
 */
export async function trainingData(
  config: TrainConfig,
  cfg: VLMConfig,
  tokenizer: ChatTokenizer,
  examplesSeen: number,
  source?: DataSource,
): Promise<TrainingData> {
  const stats = newDataStats(), streamOptions = { tokenizer, config: cfg, batchSize: config.batch_size, stats };
  const batches = source
    ? trainingBatches(source, {
      ...streamOptions,
      holdout: config.val_samples,
      shuffle: config.shuffle_buffer,
      seed: config.seed,
      skip: examplesSeen,
    })
    : shapesBatches({
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
      plainScenes: config.plain_scenes,
      start: examplesSeen,
    });
  // Fixed val subsets, the same at every eval and in every run (seed 0).
  const valBatches = source
    ? await heldOutBatches(source, config.val_samples, { ...streamOptions, stats: undefined })
    : [
      ...shapesBatches({
        split: "val",
        seed: 0,
        batchSize: config.batch_size,
        tokenizer,
        config: cfg,
        count: config.val_samples,
      }),
    ];
  // Val accuracy asks shapes-world questions: only for the shapes world.
  const valQuestions = source
    ? []
    : shapesQuestions("val", Math.ceil(config.val_questions / 4), cfg.vit_img_size).slice(0, config.val_questions);
  return { batches, valBatches, valQuestions, stats };
}
