// generate.ts — ask a trained model about an image: `deno task generate`.
//
// What this is: nanoVLM's generate.py: load a checkpoint, preprocess the
// image(s), put mp_image_token_length `<|image|>` tokens per image in front of the
// question, apply the chat template with the generation prompt, and decode with the KV
// cache — streaming each token as it comes, then time to first token and tokens/s.
// Without --image it draws a scene of the shapes world's test split and says so.
//
// The pieces it is made of (finding a checkpoint, loading it, answering) live in lib/inference.ts.

import { parseArgs } from "node:util";
import { makeShapesExample, preprocessImage, toCHWFloat } from "./data.ts";
import { type BackendName, initBackend } from "./backend/runtime.ts";
import { checkpointToAsk, loadForInference } from "./lib/inference.ts";
import { answerQuestion } from "./lib/scoring.ts";
import { runMain, snakeCaseFlags } from "./lib/cli.ts";

// ---- main ------------------------------------------------------------------------------------

const USAGE = `usage: deno task generate [--checkpoint DIR] [--image PATH]... [--prompt TEXT]
  [--max_new_tokens N] [--greedy] [--temperature T] [--top_k K] [--top_p P] [--seed S] [--backend NAME] [--quiet]`;

/** The command line: everything goes to stdout/stderr; returns the answer (for tests). */
export async function main(args: string[]): Promise<string> {
  const { values } = parseArgs({
    args: snakeCaseFlags(args),
    options: {
      checkpoint: { type: "string" },
      image: { type: "string", multiple: true },
      prompt: { type: "string" },
      max_new_tokens: { type: "string" },
      greedy: { type: "boolean" },
      temperature: { type: "string" },
      top_k: { type: "string" },
      top_p: { type: "string" },
      seed: { type: "string" },
      backend: { type: "string" },
      quiet: { type: "boolean" },
      help: { type: "boolean" },
    },
  });
  if (values.help) {
    console.log(USAGE);
    return "";
  }
  const number = (key: keyof typeof values): number | undefined => {
    const raw = values[key] as string | undefined;
    if (raw === undefined) return undefined;
    const value = Number(raw);
    if (raw.trim() === "" || !Number.isFinite(value)) throw new Error(`--${key}=${raw}: expected a number`);
    return value;
  };
  const quiet = values.quiet ?? false;
  const note = (line: string) => quiet || console.error(line);

  await initBackend(values.backend as BackendName | undefined, { quiet: true });
  const { dir, note: which } = await checkpointToAsk(values.checkpoint);
  if (which) note(which);
  const { model, tokenizer } = await loadForInference(dir);
  try {
    const S = model.cfg.vit_img_size;
    let images: Float32Array[];
    let prompt = values.prompt;
    if (values.image?.length) {
      images = await Promise.all(values.image.map((path) => preprocessImage(path, S)));
    } else {
      const scene = makeShapesExample("test", 0, 0, S);
      images = [toCHWFloat(scene.rgb, S)];
      prompt ??= "Describe the image.";
      note(`no --image given: using scene 0 of the shapes world's test split (${scene.objects.length} shapes)`);
    }
    if (prompt === undefined) throw new Error("--prompt is required with --image");
    note(`checkpoint ${dir} | ${model.parameterCount().toLocaleString("en-US")} parameters`);
    note(`prompt: ${prompt}`);

    const encoder = new TextEncoder();
    const answer = await answerQuestion(model, tokenizer, images, prompt, {
      maxNewTokens: number("max_new_tokens"),
      greedy: values.greedy ?? false,
      temperature: number("temperature"),
      topK: number("top_k"),
      topP: number("top_p"),
      seed: number("seed"),
      onText: quiet ? undefined : (piece) => Deno.stdout.writeSync(encoder.encode(piece)),
    });
    if (quiet) console.log(answer.text);
    else {
      console.log();
      note(
        `time to first token ${answer.timeToFirstTokenMs.toFixed(0)} ms | ${answer.ids.length} tokens | ` +
          `${answer.tokensPerSecond.toFixed(1)} tokens/s | prompt ${answer.promptIds.length} tokens`,
      );
    }
    return answer.text;
  } finally {
    model.dispose();
  }
}

if (import.meta.main) await runMain(main);
