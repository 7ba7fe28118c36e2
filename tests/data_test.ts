// Tests of data.ts: the shapes world (determinism, answers that agree with the pixels,
// the test-novel split), the tokenizers, and the reference pipeline against the
// nanovlm-tiny-a fixtures (chat template, labels, padding, Pillow's bilinear resize).
//
// Run: deno test -A tests/data_test.ts

import assert from "node:assert/strict";
import { deflateSync } from "node:zlib";
import { Image } from "imagescript";
import {
  applyChatTemplate,
  assistantPrefixLength,
  type Batch,
  CHATML_TEMPLATE,
  type ChatTokenizer,
  checkTokenizerFitsConfig,
  CHOICE_INSTRUCTION,
  choiceAnswer,
  collate,
  collatePrompts,
  COLOR_RGB,
  colorDistance,
  COLORS,
  decodeImage,
  encodeConversation,
  encodePng,
  encodePrompt,
  evenCuts,
  IGNORE_INDEX,
  loadImage,
  loadTokenizer,
  makeShapesExample,
  MAX_PIXEL_NOISE,
  MAX_TINT,
  MIN_BACKGROUND_DISTANCE,
  NOVEL_PAIRS,
  preprocessImage,
  type PromptLoss,
  QUADRANTS,
  type QuestionKind,
  type ShapeObject,
  shapesBatches,
  type ShapesBatchOptions,
  shapesDataset,
  type ShapesExample,
  type ShapesQuestion,
  shapesTokenizerFiles,
  SPLITS,
  tokenizerFromJson,
} from "../data.ts";
import { readSafetensors } from "../lib/safetensors.ts";
import { seededRandom } from "../nanovlm.ts";
import { pngChunk } from "./helpers.ts";

const FIXTURE = new URL("./fixtures/nanovlm-tiny-a/", import.meta.url);
const fixturePath = (name: string) => new URL(name, FIXTURE).pathname;
const NUMBERS = ["zero", "one", "two", "three", "four"];

// ---- An oracle for the shapes world ----
//
// The answer to each question worked out from the objects alone (independently of
// data.ts' question code), and the objects checked against the pixels, so together an
// answer is shown to agree with the image.

function oracle(question: string, objects: readonly ShapeObject[]): string {
  const count = (keep: (o: ShapeObject) => boolean) => objects.filter(keep).length;
  const only = (keep: (o: ShapeObject) => boolean) => {
    const found = objects.filter(keep);
    assert.equal(found.length, 1, `"${question}" must name exactly one object`);
    return found[0];
  };
  let m: RegExpMatchArray | null;
  if (question === "Describe the image.") {
    const parts = objects.map((o) => `a ${o.size} ${o.color} ${o.shape} in the ${o.quadrant}`);
    return parts.length === 1 ? `${parts[0]}.` : `${parts.slice(0, -1).join(", ")} and ${parts.at(-1)}.`;
  }
  if ((m = question.match(/^What color is the (\w+)\?$/))) return only((o) => o.shape === m![1]).color;
  if ((m = question.match(/^What shape is the (\w+) object\?$/))) return only((o) => o.color === m![1]).shape;
  if (question === "How many shapes are there?") return NUMBERS[objects.length];
  if ((m = question.match(/^How many (\w+) shapes are there\?$/))) return NUMBERS[count((o) => o.color === m![1])];
  if ((m = question.match(/^How many (\w+) (\w+)s are there\?$/))) {
    return NUMBERS[count((o) => o.color === m![1] && o.shape === m![2])];
  }
  if ((m = question.match(/^Is there a (\w+) (\w+)\?$/))) {
    return count((o) => o.color === m![1] && o.shape === m![2]) ? "yes" : "no";
  }
  if ((m = question.match(/^Where is the (\w+) (\w+)\?$/))) {
    return only((o) => o.color === m![1] && o.shape === m![2]).quadrant;
  }
  throw new Error(`no oracle for "${question}"`);
}

/**
 * The pixels agree with the scene: the background is far from every shape colour; each
 * pixel that is not the background (up to the pixel noise) lies in the quadrant of an
 * object and is that object's colour, or with antialiasing a blend of it and the
 * background; each object's drawn colour is its COLOR_RGB up to the tint, nearer to it
 * than to any other colour; and the pixel at each object's centre has that colour.
 */
function checkPixels(ex: ShapesExample) {
  const { rgb, size, objects, style } = ex;
  const near = (px: number[], target: readonly number[], slack: number) =>
    px.every((v, c) => Math.abs(v - target[c]) <= slack);
  for (const color of COLORS) assert.ok(colorDistance(style.background, COLOR_RGB[color]) >= MIN_BACKGROUND_DISTANCE);
  const half = size / 2;
  for (let y = 0; y < size; y++) {
    for (let x = 0; x < size; x++) {
      const i = (y * size + x) * 3;
      const px = [rgb[i], rgb[i + 1], rgb[i + 2]];
      if (near(px, style.background, MAX_PIXEL_NOISE)) continue;
      const quadrant = QUADRANTS[(y < half ? 0 : 2) + (x < half ? 0 : 1)];
      const k = objects.findIndex((o) => o.quadrant === quadrant);
      assert.ok(k >= 0, `pixel (${x}, ${y}) is coloured but no object is in the ${quadrant}`);
      const [bg, fg] = [style.background, style.colors[k]];
      if (!style.antialias) assert.ok(near(px, fg, MAX_PIXEL_NOISE), `pixel (${x}, ${y}) ${px} is not ${fg}`);
      else {
        // Some coverage a ∈ [0, 1] (in 1/16 steps: 4×4 sub-samples) explains the pixel as bg + a·(fg − bg) + noise.
        const blends = Array.from({ length: 17 }, (_, n) => [0, 1, 2].map((c) => bg[c] + (n / 16) * (fg[c] - bg[c])));
        assert.ok(blends.some((blend) => near(px, blend, MAX_PIXEL_NOISE + 0.5)), `pixel (${x}, ${y}) ${px}`);
      }
    }
  }
  objects.forEach((o, k) => {
    const drawn = style.colors[k];
    assert.ok(near([...drawn], COLOR_RGB[o.color], MAX_TINT));
    const nearest = COLORS.reduce((a, b) =>
      colorDistance(drawn, COLOR_RGB[a]) <= colorDistance(drawn, COLOR_RGB[b]) ? a : b
    );
    assert.equal(nearest, o.color);
    const x = Math.floor(o.x * size), y = Math.floor(o.y * size), i = (y * size + x) * 3;
    assert.ok(near([rgb[i], rgb[i + 1], rgb[i + 2]], drawn, MAX_PIXEL_NOISE), `centre of the ${o.color} ${o.shape}`);
    const [quadrantX, quadrantY] = [o.x < 0.5 ? 0 : 1, o.y < 0.5 ? 0 : 1];
    assert.equal(QUADRANTS[quadrantY * 2 + quadrantX], o.quadrant);
    assert.ok(o.size === "small" ? o.radius <= 0.11 : o.radius >= 0.155, `${o.size} radius ${o.radius}`);
  });
  assert.equal(new Set(objects.map((o) => o.quadrant)).size, objects.length, "one object per quadrant");
}

/** The option a multiple-choice answer letter points at, and the base question. */
function parseChoice(q: ShapesQuestion): { base: string; options: string[]; picked: string } {
  const lines = q.question.split("\n");
  assert.equal(lines.length, 6);
  assert.equal(lines[5], CHOICE_INSTRUCTION);
  const options = lines.slice(1, 5).map((line, i) => {
    assert.ok(line.startsWith(`${"ABCD"[i]}. `), line);
    return line.slice(3);
  });
  assert.match(q.answer, /^[ABCD]$/);
  return { base: lines[0], options, picked: options["ABCD".indexOf(q.answer)] };
}

// ---- The shapes world ----

Deno.test("shapes: same (split, seed, index) gives the same bytes; another seed gives another scene", async () => {
  for (const split of SPLITS) {
    for (let index = 0; index < 20; index++) {
      const a = makeShapesExample(split, 7, index, 48), b = makeShapesExample(split, 7, index, 48);
      assert.deepEqual(a.rgb, b.rgb);
      assert.deepEqual(a.questions, b.questions);
      assert.deepEqual(a.objects, b.objects);
    }
    const differ = Array.from({ length: 20 }, (_, i) => i).filter((i) =>
      makeShapesExample(split, 7, i, 48).rgb.some((v, j) => v !== makeShapesExample(split, 8, i, 48).rgb[j])
    );
    assert.equal(differ.length, 20, `${split}: seed 8 differs from seed 7 at every index`);
  }
  // The same scene at another size; PNG bytes are deterministic too.
  assert.deepEqual(makeShapesExample("train", 1, 3, 32).objects, makeShapesExample("train", 1, 3, 64).objects);
  const ex = makeShapesExample("train", 1, 3, 32), png = await encodePng(ex.rgb, 32);
  await new Promise((resolve) => setTimeout(resolve, 1100)); // a PNG may hold a time stamp: let the clock move on
  assert.deepEqual(await encodePng(makeShapesExample("train", 1, 3, 32).rgb, 32), png);
  // Splits are different streams.
  assert.notDeepEqual(makeShapesExample("train", 1, 0, 32).objects, makeShapesExample("val", 1, 0, 32).objects);
});

Deno.test("shapes: every answer agrees with the objects, and the objects with the pixels", () => {
  const kinds = new Map<string, number>();
  for (const size of [32, 64]) {
    for (const split of SPLITS) {
      for (const ex of shapesDataset({ split, seed: 3, count: 150, size })) {
        assert.ok(ex.objects.length >= 1 && ex.objects.length <= 4);
        checkPixels(ex);
        for (const q of ex.questions) {
          kinds.set(q.kind, (kinds.get(q.kind) ?? 0) + 1);
          if (q.kind === "choice") {
            const { base, options, picked } = parseChoice(q);
            assert.equal(picked, oracle(base, ex.objects), q.question);
            assert.equal(new Set(options).size, 4);
          } else {
            assert.equal(q.answer, oracle(q.question, ex.objects), q.question);
          }
        }
        // The caption and the count are always asked.
        assert.ok(ex.questions.some((q) => q.kind === "caption"));
      }
    }
  }
  for (const kind of ["caption", "color", "shape", "count", "exists", "position", "choice"]) {
    assert.ok((kinds.get(kind) ?? 0) > 50, `kind ${kind} asked ${kinds.get(kind)} times`);
  }
});

Deno.test("shapes: what the answers do not depend on varies: background, edges, sizes within their class, tints", () => {
  const scenes = shapesDataset({ split: "train", seed: 5, count: 300, size: 32 });
  const backgrounds = scenes.map((ex) => ex.style.background.join(","));
  const share = (keep: (ex: ShapesExample) => boolean) => scenes.filter(keep).length / scenes.length;
  assert.ok(share((ex) => ex.style.background.every((v) => v === 0)) > 0.1, "black backgrounds");
  assert.ok(share((ex) => ex.style.background.every((v) => v === 255)) > 0.1, "white backgrounds");
  assert.ok(new Set(backgrounds).size > 100, `${new Set(backgrounds).size} distinct backgrounds`);
  const antialiased = share((ex) => ex.style.antialias);
  assert.ok(antialiased > 0.35 && antialiased < 0.65, `antialiased share ${antialiased}`);
  const objects = scenes.flatMap((ex) => ex.objects.map((o, k) => ({ o, drawn: ex.style.colors[k] })));
  for (const size of ["small", "large"]) {
    const radii = objects.filter(({ o }) => o.size === size).map(({ o }) => o.radius);
    assert.ok(Math.max(...radii) - Math.min(...radii) > 0.015, `${size} radii vary`);
  }
  assert.ok(
    objects.filter(({ o, drawn }) => drawn.some((v, c) => v !== COLOR_RGB[o.color][c])).length > 0.8 * objects.length,
  );
  // Pixel noise: a plain background is not one value.
  const ex = scenes[0], values = new Set(Array.from({ length: 32 }, (_, x) => ex.rgb[x * 3]));
  assert.ok(values.size > 3, "pixel noise");
});

Deno.test("shapes: yellow triangle and green circle occur only in test-novel, and every test-novel question is about one", () => {
  const isNovel = (o: ShapeObject) => NOVEL_PAIRS.includes(`${o.color} ${o.shape}`);
  for (const split of ["train", "val", "test"] as const) {
    for (const ex of shapesDataset({ split, seed: 11, count: 400, size: 32 })) {
      assert.ok(!ex.objects.some(isNovel), `${split} ${ex.index} draws a novel pair`);
      for (const q of ex.questions) {
        assert.ok(!q.topics.some((t) => NOVEL_PAIRS.includes(t)), q.question);
        for (const pair of NOVEL_PAIRS) assert.ok(!`${q.question} ${q.answer}`.includes(pair), q.question);
      }
    }
  }
  const seenPairs = new Set<string>();
  for (const ex of shapesDataset({ split: "test-novel", seed: 11, count: 400, size: 32 })) {
    assert.equal(ex.objects.filter(isNovel).length, 1);
    for (const q of ex.questions) {
      assert.ok(
        q.topics.some((t) => NOVEL_PAIRS.includes(t)),
        `test-novel question not about a novel pair: ${q.question}`,
      );
      q.topics.filter((t) => NOVEL_PAIRS.includes(t)).forEach((t) => seenPairs.add(t));
    }
  }
  assert.deepEqual([...seenPairs].sort(), [...NOVEL_PAIRS].sort());
});

Deno.test("shapes: existence answers are balanced, multiple-choice letters are spread", () => {
  for (const split of ["train", "test-novel"] as const) {
    const exists = shapesDataset({ split, seed: 5, count: 400, size: 32 })
      .flatMap((ex) => ex.questions.filter((q) => q.kind === "exists"));
    assert.equal(exists.length, 400);
    const yes = exists.filter((q) => q.answer === "yes").length / exists.length;
    assert.ok(yes > 0.42 && yes < 0.58, `${split}: ${(100 * yes).toFixed(1)} % yes`);
  }
  const letters = shapesDataset({ split: "train", seed: 5, count: 400, size: 32 })
    .flatMap((ex) => ex.questions.filter((q) => q.kind === "choice").map((q) => q.answer));
  for (const letter of "ABCD") {
    const share = letters.filter((l) => l === letter).length / letters.length;
    assert.ok(share > 0.15 && share < 0.35, `${letter}: ${(100 * share).toFixed(1)} %`);
  }
});

Deno.test("shapes: encodePng gives a PNG that decodes back to the same pixels", async () => {
  const ex = makeShapesExample("test", 2, 9, 40);
  const png = await encodePng(ex.rgb, 40);
  const back = await decodeImage(png, "scene.png");
  assert.deepEqual([back.width, back.height], [40, 40]);
  assert.deepEqual(back.rgb, ex.rgb);
});

// ---- Tokenizers ----

const SHAPES_DIR = new URL("../tokenizers/shapes/", import.meta.url).pathname;

Deno.test("tokenizer: the committed tokenizers/shapes files are what buildShapesTokenizerJson() builds", async () => {
  for (const [name, text] of Object.entries(shapesTokenizerFiles())) {
    assert.equal(
      await Deno.readTextFile(SHAPES_DIR + name),
      text,
      `${name} is stale: run deno run -A tools/shapes_tokenizer.ts`,
    );
  }
});

Deno.test("tokenizer: shapes vocabulary has SmolLM2's special ids, <|image|> last, EOS = pad = <|im_end|>", async () => {
  const tok = await loadTokenizer(SHAPES_DIR);
  assert.equal(tok.tokenToId("<|endoftext|>"), 0);
  assert.equal(tok.tokenToId("<|im_start|>"), 1);
  assert.equal(tok.tokenToId("<|im_end|>"), 2);
  assert.equal(tok.imageTokenId, tok.baseVocabSize);
  assert.equal(tok.vocabSize, tok.baseVocabSize + 1);
  assert.equal(tok.tokenToId("<|image|>"), tok.vocabSize - 1);
  assert.equal(tok.eosTokenId, 2);
  assert.equal(tok.padTokenId, 2);
  assert.equal(assistantPrefixLength(tok), 3);
  // The path of the tokenizer.json itself works too.
  assert.equal((await loadTokenizer(SHAPES_DIR + "tokenizer.json")).vocabSize, tok.vocabSize);
  console.log(`    shapes vocabulary: ${tok.baseVocabSize} + <|image|> = ${tok.vocabSize}`);
});

Deno.test("tokenizer: every question and answer of every split round-trips, with no unknown tokens", async () => {
  const tok = await loadTokenizer(SHAPES_DIR);
  let texts = 0;
  for (const split of SPLITS) {
    for (const ex of shapesDataset({ split, seed: 9, count: 300, size: 32 })) {
      for (const { question, answer } of ex.questions) {
        for (const text of [question, answer]) {
          assert.equal(tok.decode(tok.encode(text)), text); // encode throws on unknown pieces
          texts++;
        }
        const { inputIds } = encodeConversation(
          tok,
          { turns: [{ user: question, assistant: answer }], imageCount: 1 },
          4,
        );
        const full = applyChatTemplate([{ role: "user", content: "<|image|>".repeat(4) + question }, {
          role: "assistant",
          content: answer,
        }]);
        assert.equal(tok.decode(inputIds), full);
        assert.equal(tok.decode(inputIds, { skipSpecialTokens: true }), `user\n${question}\nassistant\n${answer}\n`);
      }
    }
  }
  assert.ok(texts > 5000);
  assert.throws(() => tok.encode("Is there a purple circle?"), /not in the vocabulary: \[" purple"\]/);
  assert.equal(tok.decode([]), "");
});

/** GPT-2's byte → printable character map (what ByteLevel BPE vocabularies are written in). */
function bytesToUnicode(): string[] {
  const printable = (b: number) => (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
  let next = 256;
  return Array.from({ length: 256 }, (_, b) => String.fromCharCode(printable(b) ? b : next++));
}

Deno.test("tokenizer: a SmolLM2-style byte-level BPE tokenizer.json gets <|image|> appended as the next id", async () => {
  // SmolLM2's layout: 17 special tokens at ids 0–16, then the byte alphabet and merges,
  // Digits + ByteLevel pre-tokenizer, ByteLevel decoder, no <|image|>.
  const specials = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<repo_name>",
    "<reponame>",
    "<file_sep>",
    "<filename>",
    "<gh_stars>",
    "<issue_start>",
    "<issue_comment>",
    "<issue_closed>",
    "<jupyter_start>",
    "<jupyter_text>",
    "<jupyter_code>",
    "<jupyter_output>",
    "<jupyter_script>",
    "<empty_output>",
  ];
  const vocab: Record<string, number> = {};
  const add = (piece: string) => vocab[piece] ??= Object.keys(vocab).length;
  specials.forEach(add);
  bytesToUnicode().forEach(add);
  const merges: string[] = [];
  for (const word of ["assistant", "user", "Ġcolor"]) {
    const chars = [...word.replace("Ġ", "\u0120")];
    let piece = chars[0];
    for (const c of chars.slice(1)) {
      merges.push(`${piece} ${c}`);
      piece += c;
      add(piece);
    }
  }
  const json = {
    version: "1.0",
    added_tokens: specials.map((content, id) => ({
      id,
      content,
      single_word: false,
      lstrip: false,
      rstrip: false,
      normalized: false,
      special: true,
    })),
    normalizer: null,
    pre_tokenizer: {
      type: "Sequence",
      pretokenizers: [
        { type: "Digits", individual_digits: true },
        { type: "ByteLevel", add_prefix_space: false, trim_offsets: true, use_regex: true },
      ],
    },
    post_processor: { type: "ByteLevel", add_prefix_space: true, trim_offsets: false, use_regex: true },
    decoder: { type: "ByteLevel", add_prefix_space: true, trim_offsets: true, use_regex: true },
    model: {
      type: "BPE",
      dropout: null,
      unk_token: null,
      continuing_subword_prefix: null,
      end_of_word_suffix: null,
      fuse_unk: false,
      byte_fallback: false,
      vocab,
      merges,
    },
  };
  const dir = await Deno.makeTempDir();
  try {
    await Deno.writeTextFile(`${dir}/tokenizer.json`, JSON.stringify(json));
    await Deno.writeTextFile(
      `${dir}/tokenizer_config.json`,
      JSON.stringify({ eos_token: "<|im_end|>", clean_up_tokenization_spaces: false }),
    );
    const tok = await loadTokenizer(dir);
    const base = Object.keys(vocab).length;
    assert.equal(tok.baseVocabSize, base);
    assert.equal(tok.imageTokenId, base);
    assert.equal(tok.vocabSize, base + 1);
    assert.equal(tok.eosTokenId, 2);
    assert.equal(assistantPrefixLength(tok), 3); // <|im_start|> assistant \n
    const text = "<|im_start|>user\n<|image|><|image|>What color, 42 wörlds? 🙂<|im_end|>\n";
    const ids = tok.encode(text);
    assert.deepEqual(ids.slice(0, 5), [1, vocab["user"], vocab["\u010a"], base, base]);
    assert.equal(tok.decode(ids), text);
    assert.equal(tok.decode(ids, { skipSpecialTokens: true }), "user\nWhat color, 42 wörlds? 🙂\n");
    // Without a tokenizer_config.json, EOS defaults to <|im_end|>; the base model's can be chosen.
    await Deno.remove(`${dir}/tokenizer_config.json`);
    assert.equal((await loadTokenizer(`${dir}/tokenizer.json`)).eosTokenId, 2);
    assert.equal((await loadTokenizer(dir, { eosToken: "<|endoftext|>" })).padTokenId, 0);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

// ---- The reference pipeline against the nanovlm-tiny-a fixtures ----

interface FixtureInputs {
  tokenizer: {
    split_regex: string;
    vocab: Record<string, number>;
    eos_token: string;
    chat_template: string;
    assistant_prefix_len: number;
  };
  raw_images: { file: string }[];
  train_batch: { images: string[]; texts: { user: string; assistant: string }[] }[];
  gen_batch: { images: string[]; prompt: string }[];
  gen_single: { images: string[]; prompt: string };
  decoded: { train_input_ids: string[]; gen_prompts: string[] };
}

const inputsJson: FixtureInputs = JSON.parse(await Deno.readTextFile(fixturePath("inputs.json")));
const fixtureConfig = JSON.parse(await Deno.readTextFile(fixturePath("config.json")));

/** The fixtures' toy word-level tokenizer, written as a tokenizer.json. */
function toyTokenizer() {
  const { vocab, split_regex, eos_token } = inputsJson.tokenizer;
  const specials = Object.entries(vocab).filter(([piece]) => /^<\|[a-z_]+\|>$/.test(piece));
  return tokenizerFromJson({
    added_tokens: specials.map(([content, id]) => ({
      id,
      content,
      single_word: false,
      lstrip: false,
      rstrip: false,
      normalized: false,
      special: true,
    })),
    normalizer: null,
    pre_tokenizer: { type: "Split", pattern: { Regex: split_regex }, behavior: "Isolated", invert: false },
    post_processor: null,
    decoder: { type: "Fuse" },
    model: { type: "WordLevel", vocab, unk_token: "<unk>" },
  }, { eos_token });
}

const inputs = (await readSafetensors(fixturePath("inputs.safetensors"))).tensors;
const expected = (await readSafetensors(fixturePath("expected.safetensors"))).tensors;
const S = fixtureConfig.vit_img_size as number;
const L = fixtureConfig.mp_image_token_length as number;

Deno.test("a model config built for another vocabulary is an error that names both sizes and the fix", () => {
  const tok = toyTokenizer(); // 299 tokens before <|image|>
  checkTokenizerFitsConfig(tok, { lm_base_vocab_size: 299, lm_tokenizer: "toy" });
  assert.throws(
    () => checkTokenizerFitsConfig(tok, { lm_base_vocab_size: 86, lm_tokenizer: "toy" }),
    /the tokenizer toy has 299 tokens before <\|image\|> but the config's lm_base_vocab_size is 86: the model was trained with another tokenizer\. Point its config\.json's lm_tokenizer at that one/,
  );
});

Deno.test("fixture: the toy tokenizer matches the reference's ids, prefix length and template", () => {
  const tok = toyTokenizer();
  assert.equal(tok.vocabSize, fixtureConfig.lm_vocab_size);
  assert.equal(tok.baseVocabSize, fixtureConfig.lm_base_vocab_size);
  assert.equal(tok.imageTokenId, 299);
  assert.equal(tok.padTokenId, 2);
  assert.equal(assistantPrefixLength(tok), inputsJson.tokenizer.assistant_prefix_len);
  assert.equal(fixtureConfig.lm_chat_template, CHATML_TEMPLATE);
  assert.equal(inputsJson.tokenizer.chat_template, CHATML_TEMPLATE);
  // The same template with "\n" escapes (as a Jinja source may carry it) is accepted; another is not.
  assert.equal(
    applyChatTemplate([{ role: "user", content: "x" }], { template: CHATML_TEMPLATE.replaceAll("\n", "\\n") }),
    "<|im_start|>user\nx<|im_end|>\n",
  );
  assert.throws(() => applyChatTemplate([], { template: "{{ messages }}" }), /only the reference's ChatML/);
});

Deno.test("fixture: image processor reproduces image_preprocessed.* exactly (Pillow bilinear + ToTensor)", async () => {
  for (let i = 0; i < inputsJson.raw_images.length; i++) {
    const got = await preprocessImage(fixturePath(inputsJson.raw_images[i].file), S);
    const want = expected.get(`image_preprocessed.${i}`)!;
    assert.deepEqual(want.shape, [3, S, S]);
    // The output is a flat [3, S, S] (CHW): its length is the shape's, so a short or empty output fails here.
    assert.equal(got.length, 3 * S * S, `img${i}: ${got.length} values, not 3·${S}·${S}`);
    assert.equal(got.length, want.data.length, `img${i}: length`);
    want.data.forEach((w, j) => {
      if (got[j] !== w) assert.fail(`img${i}[${j}]: ${got[j] * 255}/255, PyTorch ${w * 255}/255`);
    });
  }
});

/** Per sample, its images through the image processor. */
function loadImages(files: string[]): Promise<Float32Array[]> {
  return Promise.all(files.map((f) => preprocessImage(fixturePath(f), S)));
}

function assertIds(got: Int32Array, name: string, source = inputs) {
  const want = source.get(name)!;
  assert.deepEqual(Array.from(got), Array.from(want.data), name);
}

Deno.test("fixture: the collator rebuilds the training batch's input_ids, labels and attention_mask exactly", async () => {
  const tok = toyTokenizer();
  const samples = await Promise.all(inputsJson.train_batch.map(async (s) => ({
    ...encodeConversation(tok, { turns: s.texts, imageCount: s.images.length }, L),
    images: await loadImages(s.images),
  })));
  const batch = collate(samples, { maxLength: fixtureConfig.lm_max_length, padTokenId: tok.padTokenId });
  assert.deepEqual([batch.batchSize, batch.length], inputs.get("input_ids")!.shape);
  assertIds(batch.inputIds, "input_ids");
  assertIds(batch.labels, "labels");
  assertIds(batch.attentionMask, "attention_mask");
  assert.deepEqual(batch.imageCounts, Array.from(inputs.get("image_counts")!.data));
  assert.deepEqual(batch.images, inputs.get("images")!.data);
  for (let b = 0; b < batch.batchSize; b++) {
    const row = batch.inputIds.subarray(b * batch.length, (b + 1) * batch.length);
    assert.equal(tok.decode(row), inputsJson.decoded.train_input_ids[b]);
  }
});

Deno.test("fixture: generation prompts are left-padded to the longest (gen) or not at all (gen_single)", async () => {
  const tok = toyTokenizer();
  const prompts = await Promise.all(inputsJson.gen_batch.map(async (p) => ({
    ...encodePrompt(tok, p.prompt, p.images.length, L),
    images: await loadImages(p.images),
  })));
  const batch = collatePrompts(prompts, { padTokenId: tok.padTokenId, maxLength: fixtureConfig.lm_max_length });
  assert.deepEqual([batch.batchSize, batch.length], inputs.get("gen.input_ids")!.shape);
  assertIds(batch.inputIds, "gen.input_ids");
  assertIds(batch.attentionMask, "gen.attention_mask");
  assert.deepEqual(batch.imageCounts, Array.from(inputs.get("gen.image_counts")!.data));
  assert.deepEqual(batch.images, inputs.get("gen.images")!.data);
  for (let b = 0; b < batch.batchSize; b++) {
    assert.equal(
      tok.decode(batch.inputIds.subarray(b * batch.length, (b + 1) * batch.length)),
      inputsJson.decoded.gen_prompts[b],
    );
  }
  const single = inputsJson.gen_single;
  const { inputIds } = encodePrompt(tok, single.prompt, single.images.length, L);
  assertIds(Int32Array.from(inputIds), "gen_single.input_ids");
  assert.deepEqual(await loadImages(single.images), [inputs.get("gen_single.images")!.data]);
});

Deno.test("collator: too-long samples are dropped and counted; a too-long prompt is an error with its length and the limit", () => {
  const tok = toyTokenizer();
  const short = {
    ...encodeConversation(tok, { turns: [{ user: "What is this?", assistant: "A cat." }], imageCount: 1 }, L),
    images: [new Float32Array(3 * S * S)],
  };
  const long = {
    ...encodeConversation(tok, { turns: [{ user: "What is this?", assistant: "A cat." }], imageCount: 9 }, L),
    images: [],
  };
  const warnings: string[] = [];
  const warn = console.warn;
  console.warn = (msg: string) => warnings.push(msg);
  try {
    const batch = collate([short, long, short], { maxLength: 48, padTokenId: 2 });
    assert.equal(batch.batchSize, 2);
    assert.equal(batch.dropped, 1);
    assert.equal(batch.imageCount, 2);
    assert.equal(batch.inputIds.length, 2 * 48);
  } finally {
    console.warn = warn;
  }
  assert.equal(warnings.length, 1);
  assert.match(warnings[0], /dropped 1 of 3 samples longer than lm_max_length 48 \(longest: 53 tokens\)/);
  assert.throws(
    () => encodePrompt(tok, "What is this?", 12, L, 48),
    /the prompt is 60 tokens long \(48 of them image tokens\), more than the limit of 48/,
  );
  const prompt = { ...encodePrompt(tok, "What is this?", 12, L), images: [] };
  assert.throws(
    () => collatePrompts([prompt], { padTokenId: 2, maxLength: 48 }),
    /prompt 0 is 60 tokens long, more than the limit of 48/,
  );
});

// ---- Image decoding and errors ----

/** A minimal PNG encoder for colour types imagescript does not write (grey, grey + alpha). */
function pngBytes(width: number, height: number, colorType: number, channels: number, pixels: number[]): Uint8Array {
  const header = new Uint8Array(13);
  new DataView(header.buffer).setUint32(0, width);
  new DataView(header.buffer).setUint32(4, height);
  header.set([8, colorType, 0, 0, 0], 8);
  const raw = new Uint8Array(height * (1 + width * channels));
  for (let y = 0; y < height; y++) {
    raw.set(pixels.slice(y * width * channels, (y + 1) * width * channels), y * (1 + width * channels) + 1);
  }
  const parts = [
    new Uint8Array([137, 80, 78, 71, 13, 10, 26, 10]),
    pngChunk("IHDR", header),
    pngChunk("IDAT", deflateSync(raw)),
    pngChunk("IEND", new Uint8Array()),
  ];
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  parts.reduce((offset, p) => (out.set(p, offset), offset + p.length), 0);
  return out;
}

Deno.test("images: grey is expanded, alpha dropped (not blended), JPEG decoded", async () => {
  const grey = await decodeImage(pngBytes(2, 1, 0, 1, [0, 200]), "grey.png");
  assert.deepEqual(Array.from(grey.rgb), [0, 0, 0, 200, 200, 200]);
  const greyAlpha = await decodeImage(pngBytes(1, 1, 4, 2, [90, 0]), "grey-alpha.png");
  assert.deepEqual(Array.from(greyAlpha.rgb), [90, 90, 90]);
  const rgba = await decodeImage(pngBytes(1, 1, 6, 4, [10, 20, 30, 0]), "rgba.png");
  assert.deepEqual(Array.from(rgba.rgb), [10, 20, 30]);

  const image = new Image(16, 16).fill(Image.rgbaToColor(...COLOR_RGB.blue, 255));
  const jpeg = await decodeImage(await image.encodeJPEG(95), "blue.jpg");
  assert.deepEqual([jpeg.width, jpeg.height], [16, 16]);
  for (let i = 0; i < jpeg.rgb.length; i++) assert.ok(Math.abs(jpeg.rgb[i] - COLOR_RGB.blue[i % 3]) <= 3);
});

Deno.test("images: a missing or corrupt image file is named in the error", async () => {
  await assert.rejects(loadImage("no/such/picture.png"), /cannot read image no\/such\/picture\.png: no such file/);
  await assert.rejects(preprocessImage("no/such/picture.png", 32), /no\/such\/picture\.png/);
  const dir = await Deno.makeTempDir();
  try {
    const bad = `${dir}/broken.png`;
    const png = await Deno.readFile(fixturePath("raw_images/img0.png"));
    await Deno.writeFile(bad, png.subarray(0, 100)); // a truncated download
    await assert.rejects(loadImage(bad), new RegExp(`cannot decode image ${bad}: `));
    await Deno.writeFile(bad, new TextEncoder().encode("not an image"));
    await assert.rejects(preprocessImage(bad, 32), new RegExp(`cannot decode image ${bad}: `));
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

// ---- Training batches ----

Deno.test("shapesBatches: deterministic batches whose labels are exactly the answer + <|im_end|> + newline", async () => {
  const tok = await loadTokenizer(SHAPES_DIR);
  const config = { vit_img_size: 32, mp_image_token_length: 4, lm_max_length: 96 };
  const take = (n: number, start = 0) => {
    const it = shapesBatches({ split: "train", seed: 1, batchSize: 8, tokenizer: tok, config, start });
    return Array.from({ length: n }, () => it.next().value!);
  };
  const [a, b] = [take(3), take(3)];
  assert.deepEqual(a, b);
  assert.deepEqual(take(1, 16)[0], a[2]); // resumable from any example index

  for (const batch of a) {
    assert.equal(batch.batchSize, 8);
    assert.equal(batch.dropped, 0);
    assert.equal(batch.images.length, 8 * 3 * 32 * 32);
    for (let r = 0; r < 8; r++) {
      const row = (x: Int32Array) => Array.from(x.subarray(r * 96, (r + 1) * 96));
      const ids = row(batch.inputIds), labels = row(batch.labels);
      const trained = labels.filter((l) => l !== IGNORE_INDEX);
      const answer = tok.decode(trained);
      assert.match(answer, /^[^\n]+<\|im_end\|>\n$/);
      // labels[t] = ids[t+1] wherever set, and the image tokens are never targets.
      labels.forEach((l, t) => l !== IGNORE_INDEX && assert.equal(l, ids[t + 1]));
      assert.equal(ids.filter((id) => id === tok.imageTokenId).length, 4);
      assert.ok(!trained.includes(tok.imageTokenId));
    }
  }
  // The first image of the first batch is example 0 rendered at 32 px, as floats. Read under an
  // object's centre: the corner is background, 0 in every plane, and would pass for an empty image.
  const ex = makeShapesExample("train", 1, 0, 32);
  const first = a[0].images.subarray(0, 3 * 32 * 32);
  const centre = Math.floor(ex.objects[0].y * 32) * 32 + Math.floor(ex.objects[0].x * 32);
  assert.equal(first[centre], Math.fround(ex.rgb[3 * centre] / 255));
  assert.equal(first[32 * 32 + centre], Math.fround(ex.rgb[3 * centre + 1] / 255)); // green plane starts at S·S

  // Kind filter and a finite count.
  const onlyColor = [
    ...shapesBatches({ split: "val", seed: 1, batchSize: 4, tokenizer: tok, config, kinds: ["color"], count: 10 }),
  ];
  assert.equal(onlyColor.length, 3);
  for (const batch of onlyColor) {
    for (let r = 0; r < batch.batchSize; r++) {
      const answer = tok.decode(
        Array.from(batch.labels.subarray(r * 96, (r + 1) * 96)).filter((l) => l !== IGNORE_INDEX),
        { skipSpecialTokens: true },
      );
      assert.ok((COLORS as readonly string[]).includes(answer.trim()), answer);
    }
  }

  // Caption, choice and position weights: 1 keeps the uniform draw, 0 asks no such question, 2 about twice as many.
  type Weights = Pick<ShapesBatchOptions, "captionWeight" | "choiceWeight" | "positionWeight">;
  const asked = (isKind: (text: string) => boolean, weights: Weights) => {
    let n = 0;
    const options = {
      split: "train" as const,
      seed: 4,
      batchSize: 50,
      tokenizer: tok,
      config,
      count: 1400,
      ...weights,
    };
    for (const batch of shapesBatches(options)) {
      for (let r = 0; r < batch.batchSize; r++) {
        const text = tok.decode(Array.from(batch.inputIds.subarray(r * 96, (r + 1) * 96)), { skipSpecialTokens: true });
        if (isKind(text)) n++;
      }
    }
    return n;
  };
  const isChoice = (text: string) => text.includes(CHOICE_INSTRUCTION);
  const kindTests = [
    [(text: string) => text.includes("Describe the image."), "captionWeight"],
    [isChoice, "choiceWeight"],
    [(text: string) => text.includes("Where is") && !isChoice(text), "positionWeight"],
  ] as const;
  for (const [isKind, key] of kindTests) {
    const uniform = asked(isKind, {}), doubled = asked(isKind, { [key]: 2 });
    assert.equal(asked(isKind, { [key]: 1 }), uniform);
    assert.equal(asked(isKind, { [key]: 0 }), 0);
    assert.ok(uniform > 150 && uniform < 250, `${uniform} of 1400 for ${key} 1 (expected about 1/7)`);
    assert.ok(doubled > 1.6 * uniform && doubled < 2.1 * uniform, `${doubled} for ${key} 2 vs ${uniform}`);
  }
  assert.throws(() => asked(isChoice, { captionWeight: -1 }), /caption weight must be a finite number ≥ 0, got -1/);
  assert.throws(() => asked(isChoice, { choiceWeight: NaN }), /choice weight must be a finite number ≥ 0, got NaN/);
  assert.throws(() => asked(isChoice, { positionWeight: Infinity }), /position weight must be a finite number ≥ 0/);

  // Length buckets: a window of k batches holds the same samples as the stream's k batches, sorted by length, so
  // batches trimmed to their longest sample carry fewer pad tokens; a resume at a whole batch continues the window.
  const bucketed = (start: number, lengthBuckets = 4) =>
    shapesBatches({
      split: "train",
      seed: 5,
      batchSize: 16,
      tokenizer: tok,
      config,
      lengthBuckets,
      start,
      count: 64 - start,
    });
  const rows = (batches: Iterable<Batch>) =>
    [...batches].flatMap((batch) =>
      Array.from({ length: batch.batchSize }, (_, r) => {
        const mask = batch.attentionMask.subarray(r * 96, (r + 1) * 96);
        const ids = Array.from(batch.inputIds.subarray(r * 96, (r + 1) * 96)).filter((_, t) => mask[t] === 1);
        const pixels = batch.images.subarray(r * 3 * 32 * 32, (r + 1) * 3 * 32 * 32).reduce((sum, v) => sum + v, 0);
        return { ids, key: `${ids.join(",")}|${pixels}` };
      })
    );
  const plain = rows(bucketed(0, 1)), sorted = [...bucketed(0)];
  assert.deepEqual(rows(sorted).map((r) => r.key).sort(), plain.map((r) => r.key).sort());
  const padded = (lengths: number[][]) => lengths.reduce((n, batch) => n + batch.length * Math.max(...batch), 0);
  const lengths = (rs: { ids: number[] }[]) =>
    Array.from({ length: 4 }, (_, b) => rs.slice(16 * b, 16 * b + 16).map((r) => r.ids.length));
  const sortedLengths = sorted.map((batch) => rows([batch]).map((r) => r.ids.length));
  assert.ok(
    padded(sortedLengths) < 0.8 * padded(lengths(plain)),
    `padded tokens: ${padded(sortedLengths)} sorted vs ${padded(lengths(plain))} in stream order`,
  );
  // The four batches are the sorted samples cut in four, shortest first, where evenCuts says.
  assert.deepEqual(sortedLengths.flat(), [...sortedLengths.flat()].sort((x, y) => x - y));
  assert.deepEqual(sortedLengths.map((batch) => batch.length), evenCuts(sortedLengths.flat(), 4));
  assert.deepEqual([...bucketed(32)], sorted.slice(2));
  assert.throws(() => bucketed(8).next(), /start 8 is not a multiple of 16/);

  const t0 = performance.now();
  const it = shapesBatches({ split: "train", seed: 2, batchSize: 32, tokenizer: tok, config });
  for (let i = 0; i < 10; i++) it.next();
  console.log(`    shapesBatches: ${((performance.now() - t0) / 10).toFixed(1)} ms per batch of 32 at 32×32`);
});

/** Every row of a stream of batches as its token ids and labels, padding included. */
function batchRows(batches: Iterable<Batch>): { ids: number[]; labels: number[] }[] {
  return [...batches].flatMap((batch) =>
    Array.from({ length: batch.batchSize }, (_, r) => ({
      ids: Array.from(batch.inputIds.subarray(r * batch.length, (r + 1) * batch.length)),
      labels: Array.from(batch.labels.subarray(r * batch.length, (r + 1) * batch.length)),
    }))
  );
}

/**
 * The first 200 samples of a training stream (batches of 20, 32-px images) as rows, with `options`; seed 2 unless they
 * name another.
 */
function trainRows(tokenizer: ChatTokenizer, options: Partial<ShapesBatchOptions> = {}) {
  const config = { vit_img_size: 32, mp_image_token_length: 4, lm_max_length: 96 };
  return batchRows(
    shapesBatches({ split: "train", seed: 2, batchSize: 20, tokenizer, config, count: 200, ...options }),
  );
}

/**
 * The first 200 samples of a training stream (seed 2) decoded: the prompt, the answer, the multiple-choice options'
 * texts (none for other kinds) and what the answer means (its option's text, else the answer itself).
 */
async function decodedTrainSamples(options: Pick<ShapesBatchOptions, "choiceHints" | "sortedChoices" | "kinds">) {
  const tok = await loadTokenizer(SHAPES_DIR);
  return trainRows(tok, options).map(({ ids, labels }) => {
    const prompt = tok.decode(ids, { skipSpecialTokens: true });
    const answer = tok.decode(labels.filter((l) => l !== IGNORE_INDEX), { skipSpecialTokens: true }).trim();
    const choices = prompt.split("\n").filter((line) => /^[A-D]\. /.test(line)).map((line) => line.slice(3));
    return { prompt, answer, options: choices, meaning: choices.length ? choices["ABCD".indexOf(answer)] : answer };
  });
}

Deno.test("evenCuts: the cut of sorted lengths whose largest batch (rows × longest) is smallest", () => {
  // A window of the default run: 44 questions of 21-27 tokens, 20 captions and multiple-choice prompts of 36-55.
  const window = [...Array(26).fill(21), ...Array(18).fill(22), 27, ...Array(5).fill(36), ...Array(4).fill(45)];
  window.push(51, 51, 52, 52, 52, 52, 54, 54, 54, 55);
  // Equal halves would pad 32 × 55 = 1,760 tokens in the second batch; 44 + 20 gives 968 and 1,100.
  assert.deepEqual(evenCuts(window, 2), [44, 20]);
  // Against every possible cut, for random sorted lengths and 1 to 4 parts.
  const largest = (lengths: number[], sizes: number[]) => {
    let first = 0, worst = 0;
    for (const size of sizes) {
      worst = Math.max(worst, size * lengths[first + size - 1]);
      first += size;
    }
    return worst;
  };
  const allCuts = (n: number, parts: number): number[][] =>
    parts === 1 ? [[n]] : Array.from({ length: n - parts + 1 }, (_, i) => i + 1)
      .flatMap((size) => allCuts(n - size, parts - 1).map((rest) => [size, ...rest]));
  const random = seededRandom(7);
  for (let trial = 0; trial < 200; trial++) {
    const n = 1 + Math.floor(random() * 12), parts = 1 + Math.floor(random() * Math.min(n, 4));
    const lengths = Array.from({ length: n }, () => 1 + Math.floor(random() * 60)).sort((a, b) => a - b);
    const sizes = evenCuts(lengths, parts);
    assert.equal(sizes.length, parts);
    assert.equal(sizes.reduce((a, b) => a + b, 0), n);
    assert.ok(sizes.every((size) => size >= 1), `sizes ${sizes}`);
    const best = Math.min(...allCuts(n, parts).map((cut) => largest(lengths, cut)));
    assert.equal(largest(lengths, sizes), best, `lengths ${lengths}, ${parts} parts: ${sizes}`);
  }
  assert.throws(() => evenCuts([3, 4], 3), /cannot cut 2 samples into 3 non-empty batches/);
});

Deno.test("shapesBatches: choice hints end the question line with the answer's option; other samples stay as they were", async () => {
  const texts = (choiceHints?: number, kinds?: QuestionKind[]) => decodedTrainSamples({ choiceHints, kinds });
  // Every hinted question: "<question> <option text>", then the options, and the answer is that option's letter.
  for (const { prompt, answer } of await texts(1, ["choice"])) {
    const lines = prompt.split("\n");
    const question = lines[lines.findIndex((line) => line.startsWith("A. ")) - 1];
    const option = lines.find((line) => line.startsWith(`${answer}. `))!.slice(3);
    assert.ok(question.endsWith(`? ${option}`), `${question} / answer ${answer}. ${option}`);
  }
  // Half hinted: about half the multiple-choice prompts change, nothing else does.
  const [plain, half] = [await texts(0), await texts(0.5)];
  assert.deepEqual(await texts(), plain);
  const changed = plain.filter((sample, i) => sample.prompt !== half[i].prompt);
  const choices = plain.filter((sample) => sample.prompt.includes(CHOICE_INSTRUCTION)).length;
  assert.ok(changed.every((sample) => sample.prompt.includes(CHOICE_INSTRUCTION)));
  assert.ok(changed.length > 0.3 * choices && changed.length < 0.7 * choices, `${changed.length} of ${choices} hinted`);
  assert.deepEqual(half.map((s) => s.answer), plain.map((s) => s.answer));
  await assert.rejects(() => texts(1.5), /choice hints must be a share in \[0, 1\], got 1.5/);
});

Deno.test("shapesBatches: sorted choices put the options in alphabetical order, the letter following its option", async () => {
  const samples = (sortedChoices?: number, kinds?: QuestionKind[]) => decodedTrainSamples({ sortedChoices, kinds });
  const plain = await samples(0, ["choice"]);
  const sorted = await samples(1, ["choice"]);
  assert.equal(sorted.length, plain.length);
  for (const [i, sample] of sorted.entries()) {
    assert.deepEqual(sample.options, plain[i].options.toSorted(), sample.prompt);
    assert.equal(sample.meaning, plain[i].meaning, "the answer still names the same option");
    const lines = sample.prompt.split("\n");
    assert.equal(lines[lines.findIndex((line) => line.startsWith("D. ")) + 1], CHOICE_INSTRUCTION);
  }
  assert.ok(plain.some((sample, i) => sample.prompt !== sorted[i].prompt), "the dataset's own orders are shuffled");
  // Half sorted: only multiple-choice prompts change, about half of them; 0 is the default stream.
  const [all, half] = [await samples(0), await samples(0.5)];
  assert.deepEqual(await samples(), all);
  const changed = all.filter((sample, i) => sample.prompt !== half[i].prompt);
  const choices = all.filter((sample) => sample.options.length > 0).length;
  assert.ok(changed.every((sample) => sample.options.length > 0));
  assert.ok(
    changed.length > 0.25 * choices && changed.length < 0.6 * choices,
    `${changed.length} of ${choices} sorted`,
  );
  assert.deepEqual(half.map((s) => s.meaning), all.map((s) => s.meaning));
  await assert.rejects(() => samples(-0.1), /sorted choices must be a share in \[0, 1\], got -0.1/);
});

Deno.test("shapesBatches: prompt loss trains the option lines of multiple choice ('options') or every question ('all')", async () => {
  const tok = await loadTokenizer(SHAPES_DIR);
  const rows = (promptLoss?: PromptLoss) => trainRows(tok, { promptLoss });
  const none = rows("none");
  assert.deepEqual(rows(), none, "none is the default");
  // Trained targets, decoded in order: the text the sample learns to write.
  const targets = (labels: number[]) => tok.decode(labels.filter((l) => l !== IGNORE_INDEX));
  for (const [loss, expected] of [["options", 1], ["all", none.length]] as const) {
    const trained = rows(loss);
    let changed = 0;
    for (const [i, { ids, labels }] of trained.entries()) {
      assert.deepEqual(ids, none[i].ids, "the inputs stay the same");
      const prompt = tok.decode(ids.filter((id) => id !== tok.padTokenId), { skipSpecialTokens: true });
      const answer = targets(none[i].labels);
      for (const [t, label] of none[i].labels.entries()) {
        if (label !== IGNORE_INDEX) assert.equal(labels[t], label, "the answer keeps its targets");
      }
      // Every trained target is the next input token: this is next-token prediction.
      for (const [t, label] of labels.entries()) if (label !== IGNORE_INDEX) assert.equal(label, ids[t + 1]);
      if (targets(labels) === answer) continue;
      changed++;
      if (loss === "options") {
        const options = prompt.split("\n").filter((line) => /^[A-D]\. /.test(line));
        assert.equal(options.length, 4, `only multiple choice changes: ${prompt}`);
        assert.equal(targets(labels), options.map((line) => `${line}\n`).join("") + answer);
      } else {
        const question = prompt.slice(prompt.indexOf("\n") + 1); // after "user"
        assert.ok(targets(labels).startsWith(question.split("\n")[0]), `${targets(labels)} / ${question}`);
      }
    }
    const choices = none.filter(({ ids }) => tok.decode(ids).includes(CHOICE_INSTRUCTION)).length;
    assert.ok(choices >= 10, `${choices} multiple-choice samples`);
    assert.equal(changed, loss === "options" ? choices : expected, loss);
  }
  assert.throws(() => rows("some" as PromptLoss), /prompt loss must be one of none, options, all, got "some"/);
});

Deno.test("shapesBatches: choice verdicts train the answer's option word to predict its letter; nothing else changes", async () => {
  const tok = await loadTokenizer(SHAPES_DIR);
  const rows = (choiceVerdicts: boolean) =>
    trainRows(tok, { promptLoss: "all", choiceHints: 0.5, sortedChoices: 0.5, choiceVerdicts });
  const [plain, verdicts] = [rows(false), rows(true)];
  const newline = tok.encode("\n")[0];
  let choices = 0;
  for (const [i, { ids, labels }] of verdicts.entries()) {
    assert.deepEqual(ids, plain[i].ids, "the prompt the model reads is unchanged");
    const changed = [...labels.keys()].filter((t) => labels[t] !== plain[i].labels[t]);
    const prompt = tok.decode(ids, { skipSpecialTokens: true });
    if (!prompt.includes(CHOICE_INSTRUCTION)) {
      assert.deepEqual(changed, [], `only multiple choice changes: ${prompt}`);
      continue;
    }
    choices++;
    // One label changes: at the word of the answer's option line, which otherwise predicts its newline.
    assert.equal(changed.length, 1, prompt);
    const [t] = changed;
    assert.equal(plain[i].labels[t], newline);
    const answer = tok.decode([labels[labels.findLastIndex((l) => l !== IGNORE_INDEX) - 2]]); // then <|im_end|>, newline
    assert.match(answer, /^[A-D]$/);
    const answerLine = prompt.split("\n").find((line) => line.startsWith(`${answer}. `))!;
    assert.equal(tok.decode([ids[t - 2], ids[t - 1], ids[t]]), answerLine, "the answer's option line, at its word");
    assert.equal(tok.decode([labels[t]]), answer, "predicts the answer's letter");
  }
  assert.ok(choices >= 10, `${choices} multiple-choice samples`);
});

Deno.test("shapesBatches: with choiceNamesOption a multiple-choice answer names its option, then the same letter", async () => {
  const tok = await loadTokenizer(SHAPES_DIR);
  // Each sample as its prompt and the answer it is trained to write (the targets after the assistant's turn starts).
  const samples = (choiceNamesOption: boolean) =>
    trainRows(tok, { seed: 3, choiceNamesOption }).map(({ ids, labels }) => ({
      prompt: tok.decode(ids.filter((id) => id !== tok.padTokenId), { skipSpecialTokens: true }),
      answer: tok.decode(labels.filter((l) => l !== IGNORE_INDEX), { skipSpecialTokens: true }).trim(),
    }));
  const [letters, named] = [samples(false), samples(true)];
  let choices = 0;
  for (const [i, { prompt, answer }] of named.entries()) {
    if (!prompt.includes(CHOICE_INSTRUCTION)) {
      assert.deepEqual({ prompt, answer }, letters[i], "only multiple choice changes");
      continue;
    }
    choices++;
    const letter = letters[i].answer;
    assert.match(letter, /^[A-D]$/);
    const option = prompt.split("\n").find((line) => line.startsWith(`${letter}. `))!.slice(3);
    assert.equal(answer, `${option} (${letter})`, prompt);
    assert.equal(answer, choiceAnswer(option, letter));
    assert.ok(
      prompt.startsWith(letters[i].prompt.slice(0, letters[i].prompt.lastIndexOf("assistant"))),
      "same question",
    );
  }
  assert.ok(choices >= 10, `${choices} multiple-choice samples`);
});

Deno.test("shapesBatches: a copy drill names another option, its word untrained, then that option's letter", async () => {
  const tok = await loadTokenizer(SHAPES_DIR);
  const rows = (choiceCopyDrills: number) =>
    trainRows(tok, { seed: 3, promptLoss: "all", choiceVerdicts: true, choiceNamesOption: true, choiceCopyDrills });
  const [plain, drilled] = [rows(0), rows(0.5)];
  const assistantEnd = (ids: number[]) => ids.lastIndexOf(tok.encode("assistant")[0]) + 2; // "assistant", newline
  let choices = 0, drills = 0;
  for (const [i, { ids, labels }] of drilled.entries()) {
    const prompt = tok.decode(ids, { skipSpecialTokens: true });
    if (!prompt.includes(CHOICE_INSTRUCTION) || labels.join() === plain[i].labels.join()) {
      assert.deepEqual({ ids, labels }, plain[i], "only a drilled multiple-choice sample changes");
      choices += prompt.includes(CHOICE_INSTRUCTION) ? 1 : 0;
      continue;
    }
    choices++, drills++;
    const start = assistantEnd(ids);
    assert.deepEqual(ids.slice(0, start), plain[i].ids.slice(0, start), "the same question");
    assert.deepEqual(labels.slice(0, start - 1), plain[i].labels.slice(0, start - 1), "the same prompt targets");
    // The right answer, as the plain sample writes it, and the drill's: another option's word, then its own letter.
    const answerOf = (answerIds: number[]) => /^(.+) \(([A-D])\)$/.exec(tok.decode(answerIds).trim())!.slice(1);
    const [rightWord] = answerOf(plain[i].ids.slice(start, -2));
    const [word, letter] = answerOf(ids.slice(start, -2));
    const optionLine = prompt.split("\n").find((line) => line.startsWith(`${letter}. `));
    assert.equal(optionLine, `${letter}. ${word}`, "the letter is the named option's");
    assert.notEqual(word, rightWord, "another option than the answer");
    assert.equal(labels[start - 1], IGNORE_INDEX, "the misnamed word predicts nothing");
    assert.deepEqual(tok.decode(labels.slice(start).filter((l) => l !== IGNORE_INDEX)), ` (${letter})<|im_end|>\n`);
  }
  assert.ok(
    choices >= 10 && drills >= choices / 4 && drills <= (choices * 3) / 4,
    `${drills} drills, ${choices} choices`,
  );
  assert.throws(() => rows(1.5), Error, "choice copy drills must be a share in [0, 1], got 1.5");
  assert.throws(
    () => trainRows(tok, { choiceCopyDrills: 0.5 }),
    Error,
    "choice copy drills need answers that name their option",
  );
});

Deno.test("shapesBatches: untrained option breaks leave the newlines before the option letters without a target", async () => {
  const tok = await loadTokenizer(SHAPES_DIR);
  const rows = (untrainedOptionBreaks: boolean, promptLoss: PromptLoss) =>
    trainRows(tok, { promptLoss, choiceVerdicts: true, choiceNamesOption: true, untrainedOptionBreaks });
  // Prompt loss "none" trains no prompt token, so there is nothing to untrain.
  assert.deepEqual(rows(true, "none"), rows(false, "none"));
  const newline = tok.encode("\n")[0];
  for (const promptLoss of ["options", "all"] as const) {
    const [trained, untrained] = [rows(false, promptLoss), rows(true, promptLoss)];
    let choices = 0;
    for (const [i, { ids, labels }] of untrained.entries()) {
      assert.deepEqual(ids, trained[i].ids, "the prompt the model reads is unchanged");
      const changed = [...labels.keys()].filter((t) => labels[t] !== trained[i].labels[t]);
      if (!tok.decode(ids).includes(CHOICE_INSTRUCTION)) {
        assert.deepEqual(changed, [], "only multiple choice changes");
        continue;
      }
      choices++;
      // Four newlines, each of which was trained to predict the next line's letter, now predict nothing.
      const pairs = changed.map((t) => tok.decode([ids[t], trained[i].labels[t]]));
      assert.deepEqual(pairs, ["\nA", "\nB", "\nC", "\nD"], promptLoss);
      assert.ok(changed.every((t) => ids[t] === newline && labels[t] === IGNORE_INDEX));
    }
    assert.ok(choices >= 10, `${promptLoss}: ${choices} multiple-choice samples`);
  }
});
