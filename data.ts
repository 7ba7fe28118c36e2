// data.ts — everything between raw data and the model's input tensors.
//
// What this is: nanoVLM's data pipeline (huggingface/nanoVLM at 8374ce1: data/processors.py,
// data/datasets.py, data/collators.py), ported so that its outputs match the reference
// token for token and pixel for pixel (tests/data_test.ts checks the nanovlm-tiny-a
// fixtures), plus the project's built-in dataset, a procedurally drawn "world of shapes".
//   1. The shapes world: scenes, questions and answers, splits (incl. `test-novel`).
//   2. Tokenizer: any Hugging Face tokenizer.json through @huggingface/tokenizers, with
//      `<|image|>` appended as the reference does; the shapes vocabulary's builder.
//   3. Chat template and labels: the reference's ChatML template, image-token expansion,
//      loss only on assistant tokens, labels shifted by one inside the data.
//   4. Collator: left padding to lm_max_length (training) or to the longest (generation).
//   5. Image processor: PNG/JPEG → RGB → Pillow's antialiased bilinear resize, bit-exact
//      → float32 CHW in [0, 1] (no mean/std normalisation, as the reference).
//   6. Training batches of the shapes world.
//
// What this is not: a dataset downloader (no Hub access here), the reference's packing
// (ConstantLengthDataset), or anything that touches tensors: every output is a plain typed
// array that the model file (nanovlm.ts) turns into tfjs tensors.
//
// Run `deno run -A tools/shapes_tokenizer.ts` to rewrite tokenizers/shapes/ from buildShapesTokenizerJson().

import { Tokenizer } from "@huggingface/tokenizers";
import { Image } from "imagescript";
import { CHATML_TEMPLATE, seededRandom } from "./nanovlm.ts";
import { checkImageBytes } from "./lib/image_bytes.ts";

export { CHATML_TEMPLATE };

// ---- Deterministic random numbers -----------------------------------------------------------
//
// Every example is drawn from its own generator, seeded by (split, seed, index), so an
// example never depends on how many were drawn before it: example 41 of a split can be
// rendered alone, in any order, at any image size, and is always the same scene.

/** FNV-1a over UTF-16 code units, then a murmur3 finaliser to spread the bits. */
function hashString(text: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < text.length; i++) {
    h ^= text.charCodeAt(i);
    h = Math.imul(h, 0x01000193);
  }
  h ^= h >>> 16;
  h = Math.imul(h, 0x85ebca6b);
  h ^= h >>> 13;
  h = Math.imul(h, 0xc2b2ae35);
  return (h ^ (h >>> 16)) >>> 0;
}

/** Scene randomness on top of runtime.ts's seeded mulberry32 generator. */
class Rng {
  /** A float in [0, 1). */
  readonly next: () => number;
  constructor(seed: number) {
    this.next = seededRandom(seed);
  }
  /** An integer in [0, n). */
  int(n: number): number {
    return Math.floor(this.next() * n);
  }
  pick<T>(items: readonly T[]): T {
    return items[this.int(items.length)];
  }
  /** An item drawn with probability proportional to its weight; equal weights draw as `pick` does. */
  weighted<T>(items: readonly T[], weights: readonly number[]): T {
    let draw = this.next() * weights.reduce((a, b) => a + b, 0), i = 0;
    while (i < items.length - 1 && draw >= weights[i]) draw -= weights[i++];
    return items[i];
  }
  /** A shuffled copy (Fisher–Yates). */
  shuffled<T>(items: readonly T[]): T[] {
    const out = items.slice();
    for (let i = out.length - 1; i > 0; i--) {
      const j = this.int(i + 1);
      [out[i], out[j]] = [out[j], out[i]];
    }
    return out;
  }
}

// ---- The shapes world: scenes ---------------------------------------------------------------
//
// A plain background split into four quadrants; 1 to 4 shapes, each in its own quadrant with
// some jitter, so shapes never overlap and "where" always has a one-phrase answer.
//
// What an answer does not depend on varies from scene to scene, so that the model has to learn
// shapes, colours, places and counts rather than one rasteriser's pixels: the background is any
// plain colour (white and black included) that the shapes stay distinguishable from; half the
// scenes have antialiased edges, the rest hard ones; sizes are jittered within their class
// ("small" and "large" stay apart); each shape's colour is tinted slightly and every pixel
// carries a little noise. A model trained on one renderer's pixels does not see other
// programs' pictures (docs/training-the-shapes-world.md).

/** The shapes, in the order they are listed everywhere. */
export const SHAPES = ["circle", "square", "triangle"] as const;
/** A shape's name. */
export type Shape = typeof SHAPES[number];

/** The colours' names. */
export const COLORS = ["red", "green", "blue", "yellow"] as const;
/** A colour's name. */
export type Color = typeof COLORS[number];

/** The RGB value each colour is drawn with, before a scene's tint and noise. */
export const COLOR_RGB: Readonly<Record<Color, readonly [number, number, number]>> = {
  red: [220, 40, 40],
  green: [40, 170, 60],
  blue: [40, 80, 220],
  yellow: [230, 200, 30],
};

/** An RGB triple, 0–255 per channel. */
export type Rgb = readonly [number, number, number];

/** A background is at least this far (Euclidean, in RGB) from every shape colour, so the shapes stay visible. */
export const MIN_BACKGROUND_DISTANCE = 120;
/** Each channel of a shape's colour moves by at most this much from COLOR_RGB in a scene. */
export const MAX_TINT = 16;
/** Each channel of each pixel moves by at most this much. */
export const MAX_PIXEL_NOISE = 6;

/** The two sizes a shape comes in. */
export const SIZES = ["small", "large"] as const;
/** A shape's size. */
export type Size = typeof SIZES[number];

/** The quadrants in reading order: captions list shapes in this order. */
export const QUADRANTS = ["top left", "top right", "bottom left", "bottom right"] as const;
/** A quadrant's name. */
export type Quadrant = typeof QUADRANTS[number];

/** The dataset's splits. `test-novel` probes compositional generalisation. */
export const SPLITS = ["train", "val", "test", "test-novel"] as const;
/** A split's name. */
export type Split = typeof SPLITS[number];

/**
 * Colour–shape pairs that never occur in `train`, `val` or `test` (neither in the images
 * nor in the text) and that are the subject of every `test-novel` question.
 */
export const NOVEL_PAIRS: readonly string[] = ["yellow triangle", "green circle"];

/** One shape of a scene. Positions are fractions of the image side, so a scene renders at any size. */
export interface ShapeObject {
  shape: Shape;
  color: Color;
  size: Size;
  quadrant: Quadrant;
  /** Centre, as a fraction of the image width (0 = left edge). */
  x: number;
  /** Centre, as a fraction of the image height (0 = top edge). */
  y: number;
  /** Half the shape's extent, as a fraction of the image side. */
  radius: number;
}

/** How a scene is drawn: everything the answers do not depend on. */
export interface SceneStyle {
  /** The plain background's colour. */
  background: Rgb;
  /** Edge pixels blend shape and background by coverage (else a pixel is the shape's when its centre is). */
  antialias: boolean;
  /** The colour each object is drawn with (its COLOR_RGB, tinted), in the order of the objects. */
  colors: Rgb[];
  /** Seeds the per-pixel noise, so the same style gives the same pixels at a given size. */
  noiseSeed: number;
}

/** The plain style: black background, hard edges, exact colours, no noise (tests and figures use it). */
export function plainStyle(objects: readonly ShapeObject[]): SceneStyle {
  return { background: [0, 0, 0], antialias: false, colors: objects.map((o) => COLOR_RGB[o.color]), noiseSeed: -1 };
}

/**
 * Radii per size class, as fractions of the image side: jittered within [min, max], and the classes stay apart
 * (0.11 < 0.155). Every shape stays inside its quadrant with a margin, whatever the jitter.
 */
export const RADIUS: Readonly<Record<Size, readonly [number, number]>> = {
  small: [0.085, 0.11],
  large: [0.155, 0.18],
};
const MARGIN = 0.02;

/** Whether the point (dx, dy) from an object's centre, in pixels, is inside a shape of radius r pixels. */
function insideShape(shape: Shape, dx: number, dy: number, r: number): boolean {
  if (shape === "circle") return dx * dx + dy * dy <= r * r;
  if (shape === "square") return Math.abs(dx) <= 0.8 * r && Math.abs(dy) <= 0.8 * r;
  // Triangles point up: apex r above the centre, base 0.8·r below, half-base 1.1·r.
  const t = (dy + r) / (1.8 * r); // 0 at the apex, 1 at the base
  return t >= 0 && t <= 1 && Math.abs(dx) <= 1.1 * r * t;
}

/**
 * Draw a scene into an RGB buffer (row-major, 3 bytes per pixel, `size`×`size`). Without
 * antialiasing a pixel belongs to a shape when its centre does; with it, a pixel's colour
 * mixes shape and background by the share of its 4×4 sub-samples inside the shape. Either
 * way the pixel under each object's centre (`floor(x·size)`, `floor(y·size)`) has the
 * object's colour, up to the pixel noise (for `size` ≥ 16). Pass `out` to reuse a buffer.
 */
export function renderScene(
  objects: readonly ShapeObject[],
  size: number,
  style: SceneStyle = plainStyle(objects),
  out: Uint8Array = new Uint8Array(size * size * 3),
): Uint8Array {
  if (out.length !== size * size * 3) {
    throw new Error(`renderScene: out has ${out.length} bytes, need ${size * size * 3}`);
  }
  const color = new Float32Array(size * size * 3);
  const [red, green, blue] = style.background;
  for (let i = 0; i < color.length; i += 3) {
    color[i] = red;
    color[i + 1] = green;
    color[i + 2] = blue;
  }
  const SUB = style.antialias ? 4 : 1; // sub-samples per pixel side
  objects.forEach((o, k) => {
    const cx = o.x * size, cy = o.y * size, r = o.radius * size, rgb = style.colors[k];
    const y0 = Math.max(0, Math.floor(cy - r)), y1 = Math.min(size - 1, Math.ceil(cy + r));
    const x0 = Math.max(0, Math.floor(cx - 1.1 * r)), x1 = Math.min(size - 1, Math.ceil(cx + 1.1 * r));
    for (let py = y0; py <= y1; py++) {
      for (let px = x0; px <= x1; px++) {
        let hits = 0;
        for (let sy = 0; sy < SUB; sy++) {
          for (let sx = 0; sx < SUB; sx++) {
            if (insideShape(o.shape, px + (sx + 0.5) / SUB - cx, py + (sy + 0.5) / SUB - cy, r)) hits++;
          }
        }
        const coverage = hits / (SUB * SUB), i = (py * size + px) * 3;
        for (let c = 0; c < 3; c++) color[i + c] += coverage * (rgb[c] - color[i + c]);
      }
    }
  });
  // Each channel rounded, plus its noise in [−MAX_PIXEL_NOISE, MAX_PIXEL_NOISE] (none in the plain style), clamped.
  // The noise is rounded as floor(x + 0.5), which is Math.round's rule; V8's Math.round is far slower on negatives.
  const noise = style.noiseSeed >= 0 ? seededRandom(style.noiseSeed) : undefined;
  for (let i = 0; i < color.length; i++) {
    const jitter = noise ? Math.floor((2 * noise() - 1) * MAX_PIXEL_NOISE + 0.5) : 0;
    out[i] = Math.min(255, Math.max(0, Math.round(color[i]) + jitter));
  }
  return out;
}

/** Euclidean distance between two RGB colours. */
export function colorDistance(a: Rgb, b: Rgb): number {
  return Math.hypot(a[0] - b[0], a[1] - b[1], a[2] - b[2]);
}

/** A scene's style: a background (black or white a fifth of the time each, else any colour far enough from the shapes'). */
function drawStyle(rng: Rng, objects: readonly ShapeObject[]): SceneStyle {
  const kind = rng.next();
  let background: Rgb;
  if (kind < 0.2) background = [0, 0, 0];
  else if (kind < 0.4) background = [255, 255, 255];
  else {
    do background = [rng.int(256), rng.int(256), rng.int(256)]; while (
      COLORS.some((c) => colorDistance(background, COLOR_RGB[c]) < MIN_BACKGROUND_DISTANCE)
    );
  }
  const tint = (v: number) => Math.min(255, Math.max(0, v + rng.int(2 * MAX_TINT + 1) - MAX_TINT));
  return {
    background,
    antialias: rng.next() < 0.5,
    colors: objects.map((o) => COLOR_RGB[o.color].map(tint) as unknown as Rgb),
    noiseSeed: rng.int(2 ** 31),
  };
}

/** Encode an RGB buffer (e.g. from renderScene) as PNG bytes, with imagescript. */
export async function encodePng(rgb: Uint8Array, width: number, height: number = width): Promise<Uint8Array> {
  const image = new Image(width, height);
  const rgba = image.bitmap;
  for (let i = 0, j = 0; i < width * height * 3; i += 3, j += 4) {
    rgba[j] = rgb[i];
    rgba[j + 1] = rgb[i + 1];
    rgba[j + 2] = rgb[i + 2];
    rgba[j + 3] = 255;
  }
  // imagescript writes a "Creation Time" text chunk, by default the current time: a fixed one keeps the bytes a
  // function of the pixels alone.
  return await image.encode(1, { creationTime: 0 });
}

// ---- The shapes world: questions ------------------------------------------------------------
//
// Each scene comes with one question of every kind that makes sense for it (a colour
// question needs a shape that occurs once, ...). Answers are single words or short
// phrases, so a small model can learn them and an exact-match score is meaningful.

/** The question kinds. */
export const QUESTION_KINDS = ["caption", "color", "shape", "count", "exists", "position", "choice"] as const;
/** A question kind. */
export type QuestionKind = typeof QUESTION_KINDS[number];

/** A question about a scene, with its answer. */
export interface ShapesQuestion {
  kind: QuestionKind;
  question: string;
  answer: string;
  /** The colour–shape pairs ("green circle") the question is about; empty for "How many shapes are there?". */
  topics: string[];
}

/** The closing line of a multiple-choice question, as MMStar prompts it. */
export const CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly.";
/** The option letters of the shapes world's multiple-choice questions: always four options. */
export const CHOICE_LETTERS = ["A", "B", "C", "D"] as const;

/** MMStar's layout: the question, one "A. …" line per option (letters from A, up to Z), then the instruction. */
export function choicePrompt(question: string, options: readonly string[]): string {
  const lines = options.map((option, i) => `${String.fromCharCode(65 + i)}. ${option}`);
  return [question, ...lines, CHOICE_INSTRUCTION].join("\n");
}

/** A multiple-choice answer that names its option, then its letter: "red (B)" (choice_names_option). */
export function choiceAnswer(option: string, letter: string): string {
  return `${option} (${letter})`;
}

/** The question and the options' texts of a prompt that `choicePrompt` wrote. */
function parseChoicePrompt(prompt: string): { question: string; options: string[] } {
  const [question, ...rest] = prompt.split("\n");
  return { question, options: rest.slice(0, -1).map((line) => line.slice(3)) }; // "A. red" → "red"; the instruction
}

/**
 * A multiple-choice question (`prompt` as `choicePrompt` wrote it, `letter` its answer) taken apart as training can
 * show it: `hinted`, its question line ends with the answer's text ("What color is the circle? red", choice_hints);
 * `sorted`, its options come in alphabetical order, so that the answer alone gives the letter (sorted_choices).
 * Returns the question line, the options in their order, and the answer's text.
 */
export function choiceParts(
  prompt: string,
  letter: string,
  { hinted = false, sorted = false }: { hinted?: boolean; sorted?: boolean } = {},
): { question: string; options: string[]; answer: string } {
  const { question, options } = parseChoicePrompt(prompt);
  const answer = options[CHOICE_LETTERS.indexOf(letter as typeof CHOICE_LETTERS[number])];
  return {
    question: hinted ? `${question} ${answer}` : question,
    options: sorted ? options.toSorted() : options,
    answer,
  };
}
const NUMBER_WORDS = ["zero", "one", "two", "three", "four"] as const;

const pairName = (color: Color, shape: Shape) => `${color} ${shape}`;
const describe = (o: ShapeObject) => `a ${o.size} ${o.color} ${o.shape} in the ${o.quadrant}`;

/** "a large red circle in the top left, a small blue square in the top right and ...". */
function caption(objects: readonly ShapeObject[]): string {
  const parts = objects.map(describe);
  const last = parts.pop()!;
  return (parts.length > 0 ? `${parts.join(", ")} and ${last}` : last) + ".";
}

/** A multiple-choice question in MMStar's layout (`choicePrompt`) with shuffled options; the answer is a letter. */
function multipleChoice(rng: Rng, base: ShapesQuestion, options: readonly string[]): ShapesQuestion {
  const order = rng.shuffled(options);
  return {
    kind: "choice",
    question: choicePrompt(base.question, order),
    answer: CHOICE_LETTERS[order.indexOf(base.answer)],
    topics: base.topics,
  };
}

/**
 * The questions of one scene. `focus` restricts them to one object (the `test-novel`
 * split asks only about its novel object); otherwise no question names a novel pair.
 */
function makeQuestions(rng: Rng, objects: readonly ShapeObject[], focus: ShapeObject | undefined): ShapesQuestion[] {
  const questions: ShapesQuestion[] = [];
  const count = (keep: (o: ShapeObject) => boolean) => objects.filter(keep).length;
  const allowedPairs = COLORS.flatMap((c) => SHAPES.map((s) => pairName(c, s))).filter((p) => !NOVEL_PAIRS.includes(p));
  const presentPairs = [...new Set(objects.map((o) => pairName(o.color, o.shape)))];
  // Candidates for "the X": objects that the question can name unambiguously.
  const uniqueShape = objects.filter((o) => count((p) => p.shape === o.shape) === 1);
  const uniqueColor = objects.filter((o) => count((p) => p.color === o.color) === 1);
  const uniquePair = objects.filter((o) => count((p) => p.color === o.color && p.shape === o.shape) === 1);
  const about = (candidates: ShapeObject[]) =>
    focus ? (candidates.includes(focus) ? focus : undefined) : candidates.length ? rng.pick(candidates) : undefined;

  questions.push({
    kind: "caption",
    question: "Describe the image.",
    answer: caption(objects),
    topics: presentPairs,
  });

  const colorOf = about(uniqueShape);
  const color: ShapesQuestion | undefined = colorOf && {
    kind: "color",
    question: `What color is the ${colorOf.shape}?`,
    answer: colorOf.color,
    topics: [pairName(colorOf.color, colorOf.shape)],
  };

  const shapeOf = about(uniqueColor);
  const shape: ShapesQuestion | undefined = shapeOf && {
    kind: "shape",
    question: `What shape is the ${shapeOf.color} object?`,
    answer: shapeOf.shape,
    topics: [pairName(shapeOf.color, shapeOf.shape)],
  };
  questions.push(...[color, shape].filter((q) => q !== undefined));

  // Counting: all shapes, shapes of one colour, or shapes of one colour and kind. A
  // test-novel scene holds exactly one novel object, so its count question is "one".
  const total: ShapesQuestion = {
    kind: "count",
    question: "How many shapes are there?",
    answer: NUMBER_WORDS[objects.length],
    topics: [],
  };
  if (focus) {
    questions.push({
      kind: "count",
      question: `How many ${focus.color} ${focus.shape}s are there?`,
      answer: "one",
      topics: [pairName(focus.color, focus.shape)],
    });
  } else {
    questions.push(total);
    if (rng.next() < 0.5) {
      const c = rng.pick(COLORS);
      questions.push({
        kind: "count",
        question: `How many ${c} shapes are there?`,
        answer: NUMBER_WORDS[count((o) => o.color === c)],
        topics: presentPairs.filter((p) => p.startsWith(c + " ")),
      });
    } else {
      // Half the time a pair that is present, so the answers are not mostly "zero".
      const pair = rng.next() < 0.5 ? rng.pick(presentPairs) : rng.pick(allowedPairs);
      const [c, s] = pair.split(" ");
      questions.push({
        kind: "count",
        question: `How many ${c} ${s}s are there?`,
        answer: NUMBER_WORDS[count((o) => o.color === c && o.shape === s)],
        topics: [pair],
      });
    }
  }

  // Existence, balanced: "yes" asks about a present pair, "no" about an absent one.
  const yes = rng.next() < 0.5;
  let asked: string;
  if (focus) {
    // The other novel pair never occurs in a test-novel scene.
    asked = yes
      ? pairName(focus.color, focus.shape)
      : NOVEL_PAIRS.find((p) => p !== pairName(focus.color, focus.shape))!;
  } else {
    asked = yes ? rng.pick(presentPairs) : rng.pick(allowedPairs.filter((p) => !presentPairs.includes(p)));
  }
  questions.push({
    kind: "exists",
    question: `Is there a ${asked}?`,
    answer: presentPairs.includes(asked) ? "yes" : "no",
    topics: [asked],
  });

  const placed = about(uniquePair);
  const position: ShapesQuestion | undefined = placed && {
    kind: "position",
    question: `Where is the ${placed.color} ${placed.shape}?`,
    answer: placed.quadrant,
    topics: [pairName(placed.color, placed.shape)],
  };
  if (position) questions.push(position);

  // Multiple choice: a colour, position or (not in test-novel) whole-scene count question
  // with its four possible answers as options.
  const bases: [ShapesQuestion | undefined, readonly string[]][] = [
    [color, COLORS],
    [position, QUADRANTS],
    [focus ? undefined : total, NUMBER_WORDS.slice(1)],
  ];
  const available = bases.filter(([q]) => q !== undefined) as [ShapesQuestion, readonly string[]][];
  if (available.length) questions.push(multipleChoice(rng, ...rng.pick(available)));
  return questions;
}

// ---- The shapes world: examples and datasets --------------------------------------------------

/** One scene of the shapes world with its questions. */
export interface ShapesExample {
  split: Split;
  seed: number;
  index: number;
  /** Image side in pixels. */
  size: number;
  objects: ShapeObject[];
  /** How it is drawn: background, edges, tints, noise. */
  style: SceneStyle;
  /** The rendered image: `size`×`size` RGB, row-major. */
  rgb: Uint8Array;
  questions: ShapesQuestion[];
}

/** Draw the objects of one scene (without rendering it). */
function drawObjects(rng: Rng, split: Split): { objects: ShapeObject[]; focus?: ShapeObject } {
  const n = 1 + rng.int(4);
  const quadrants = rng.shuffled([0, 1, 2, 3]).slice(0, n).sort((a, b) => a - b);
  const novelAt = split === "test-novel" ? rng.pick(quadrants) : -1;
  const objects: ShapeObject[] = [];
  let focus: ShapeObject | undefined;
  for (const q of quadrants) {
    let color: Color, shape: Shape;
    if (q === novelAt) {
      [color, shape] = rng.pick(NOVEL_PAIRS).split(" ") as [Color, Shape];
    } else {
      // Rejection sampling: 10 of the 12 pairs are allowed.
      do {
        color = rng.pick(COLORS);
        shape = rng.pick(SHAPES);
      } while (NOVEL_PAIRS.includes(pairName(color, shape)));
    }
    const size = rng.pick(SIZES);
    const [smallest, largest] = RADIUS[size];
    const radius = smallest + rng.next() * (largest - smallest);
    const jitter = 0.25 - 1.1 * radius - MARGIN; // the triangle's half-base is 1.1·radius
    const object: ShapeObject = {
      shape,
      color,
      size,
      quadrant: QUADRANTS[q],
      x: (q % 2) * 0.5 + 0.25 + (2 * rng.next() - 1) * jitter,
      y: Math.floor(q / 2) * 0.5 + 0.25 + (2 * rng.next() - 1) * jitter,
      radius,
    };
    objects.push(object);
    if (q === novelAt) focus = object;
  }
  return { objects, focus };
}

/**
 * Example `index` of a split: the same (split, seed, index) always gives the same scene
 * and questions, and the same pixels at a given `size`. `plain` draws the same scene in the
 * plain style (black, hard edges, exact colours, no noise) instead of its own.
 */
export function makeShapesExample(
  split: Split,
  seed: number,
  index: number,
  size: number,
  { plain = false }: { plain?: boolean } = {},
): ShapesExample {
  if (!SPLITS.includes(split)) throw new Error(`unknown split "${split}"; use one of ${SPLITS.join(", ")}`);
  if (!(Number.isInteger(size) && size >= 16)) throw new Error(`image size must be an integer ≥ 16, got ${size}`);
  const rng = new Rng(hashString(`shapes/${split}/${seed}/${index}`));
  const { objects, focus } = drawObjects(rng, split);
  const questions = makeQuestions(rng, objects, focus);
  const style = plain ? plainStyle(objects) : drawStyle(rng, objects);
  return { split, seed, index, size, objects, style, rgb: renderScene(objects, size, style), questions };
}

/** Examples `start` … `start + count − 1` of a split. */
export function shapesDataset(
  { split, seed, count, size, start = 0 }: { split: Split; seed: number; count: number; size: number; start?: number },
): ShapesExample[] {
  return Array.from({ length: count }, (_, i) => makeShapesExample(split, seed, start + i, size));
}

// ---- Tokenizer ------------------------------------------------------------------------------
//
// The reference loads SmolLM2's tokenizer and adds `<|image|>` as a new special token,
// which gets the next free id (49152 = lm_base_vocab_size). Here any tokenizer.json is
// read by @huggingface/tokenizers, and `<|image|>` is appended the same way when the file
// lacks it. EOS comes from tokenizer_config.json when there is one (SmolLM2-Instruct:
// `<|im_end|>`; base SmolLM2: `<|endoftext|>`), else `<|im_end|>`; pad = EOS, as the
// reference sets `pad_token = eos_token`.

/** The reference's image placeholder token. */
export const IMAGE_TOKEN = "<|image|>";

/** What the data pipeline and generation need from a tokenizer. */
export interface ChatTokenizer {
  /** Token ids of `text`; special tokens written in the text are matched, none are added. Throws on text outside the vocabulary. */
  encode(text: string): number[];
  /** The text of `ids`; with `skipSpecialTokens`, `<|im_end|>`, `<|image|>` etc. are left out. */
  decode(ids: ArrayLike<number>, options?: { skipSpecialTokens?: boolean }): string;
  /** The id of a token string, if it is one token. */
  tokenToId(token: string): number | undefined;
  /** Number of ids, `<|image|>` included (the model's lm_vocab_size). */
  readonly vocabSize: number;
  /** Number of ids before `<|image|>` (the model's lm_base_vocab_size). */
  readonly baseVocabSize: number;
  readonly imageToken: string;
  /** = baseVocabSize. */
  readonly imageTokenId: number;
  readonly eosToken: string;
  readonly eosTokenId: number;
  /** = eosTokenId. */
  readonly padTokenId: number;
}

type Json = Record<string, unknown>;
interface AddedTokenJson {
  id: number;
  content: string;
  special?: boolean;
}

/** Highest id in a tokenizer.json, over the model's vocabulary and the added tokens. */
function maxTokenId(tokenizerJson: Json): number {
  const model = tokenizerJson.model as { vocab?: Record<string, number> | [string, number][] };
  const vocab = model?.vocab;
  let max = -1;
  if (Array.isArray(vocab)) max = vocab.length - 1; // Unigram: [piece, score][] in id order
  else if (vocab) { for (const id of Object.values(vocab)) max = Math.max(max, id); }
  for (const t of (tokenizerJson.added_tokens ?? []) as AddedTokenJson[]) max = Math.max(max, t.id);
  return max;
}

/**
 * A ChatTokenizer from parsed tokenizer.json (and tokenizer_config.json) objects.
 * `eosToken` overrides the config's EOS.
 */
export function tokenizerFromJson(
  tokenizerJson: Json,
  tokenizerConfig: Json = {},
  { eosToken }: { eosToken?: string } = {},
): ChatTokenizer {
  const added = [...((tokenizerJson.added_tokens ?? []) as AddedTokenJson[])];
  let vocabSize = maxTokenId(tokenizerJson) + 1;
  let image = added.find((t) => t.content === IMAGE_TOKEN);
  if (!image) {
    image = { id: vocabSize, content: IMAGE_TOKEN, special: true };
    added.push({ ...image, single_word: false, lstrip: false, rstrip: false, normalized: false } as AddedTokenJson);
    vocabSize += 1;
  }
  if (image.id !== vocabSize - 1) {
    throw new Error(`${IMAGE_TOKEN} has id ${image.id}; the model expects it last (id ${vocabSize - 1})`);
  }
  // Decoding follows transformers: no "clean up" of spaces unless the config asks for it.
  const config = { clean_up_tokenization_spaces: false, ...tokenizerConfig };
  const inner = new Tokenizer({ ...tokenizerJson, added_tokens: added }, config);

  const configEos = tokenizerConfig.eos_token;
  const eos = eosToken ??
    (typeof configEos === "string" ? configEos : (configEos as { content?: string })?.content) ??
    "<|im_end|>";
  const eosId = inner.token_to_id(eos);
  if (eosId === undefined) throw new Error(`the EOS token ${eos} is not in the tokenizer's vocabulary`);

  return {
    encode(text: string): number[] {
      const { ids, tokens } = inner.encode(text, { add_special_tokens: false });
      const unknown = tokens.filter((_, i) => ids[i] === undefined);
      if (unknown.length) {
        throw new Error(`cannot encode ${JSON.stringify(text)}: not in the vocabulary: ${JSON.stringify(unknown)}`);
      }
      return ids;
    },
    decode(ids: ArrayLike<number>, { skipSpecialTokens = false } = {}): string {
      // tokenizers.js rejects an empty list; an empty generation decodes to "".
      return ids.length ? inner.decode(Array.from(ids), { skip_special_tokens: skipSpecialTokens }) : "";
    },
    tokenToId: (token: string) => inner.token_to_id(token),
    vocabSize,
    baseVocabSize: image.id,
    imageToken: IMAGE_TOKEN,
    imageTokenId: image.id,
    eosToken: eos,
    eosTokenId: eosId,
    padTokenId: eosId,
  };
}

/**
 * Load a tokenizer from a directory holding tokenizer.json (+ tokenizer_config.json), or
 * from the path of a tokenizer.json (its directory's tokenizer_config.json is used if
 * present). Works for the shapes tokenizer and a real SmolLM2 download alike.
 */
export async function loadTokenizer(path: string, options: { eosToken?: string } = {}): Promise<ChatTokenizer> {
  const isFile = path.endsWith(".json");
  const dir = isFile ? path.slice(0, Math.max(0, path.lastIndexOf("/"))) || "." : path;
  const jsonPath = isFile ? path : `${dir}/tokenizer.json`;
  const readJson = async (p: string): Promise<Json> => {
    try {
      return JSON.parse(await Deno.readTextFile(p));
    } catch (e) {
      throw new Error(`cannot read tokenizer file ${p}: ${(e as Error).message}`);
    }
  };
  const tokenizerJson = await readJson(jsonPath);
  let config: Json = {};
  const configPath = `${dir}/tokenizer_config.json`;
  try {
    await Deno.stat(configPath);
    config = await readJson(configPath);
  } catch (e) {
    if (!(e instanceof Deno.errors.NotFound)) throw e;
  }
  return tokenizerFromJson(tokenizerJson, config, options);
}

/**
 * Throw unless the tokenizer's vocabulary is the one the model config was built for. A mismatch usually means a model
 * trained with another version of its tokenizer: every id would mean another word.
 */
export function checkTokenizerFitsConfig(
  tokenizer: ChatTokenizer,
  config: { lm_base_vocab_size: number; lm_tokenizer: string },
): void {
  if (tokenizer.baseVocabSize !== config.lm_base_vocab_size) {
    throw new Error(
      `the tokenizer ${config.lm_tokenizer} has ${tokenizer.baseVocabSize} tokens before ${IMAGE_TOKEN} but the ` +
        `config's lm_base_vocab_size is ${config.lm_base_vocab_size}: the model was trained with another tokenizer. ` +
        `Point its config.json's lm_tokenizer at that one (a run made before the shapes tokenizer gained " (" and ")" ` +
        `needs tokenizers/shapes as it was then, from git), or train a new model with this one`,
    );
  }
}

// The shapes vocabulary: a word-level tokenizer whose pieces follow the split regex of the
// fixtures' toy tokenizer (a word keeps its leading space, as in GPT-2-style BPE), with
// SmolLM2's special-token ids 0, 1, 2 and `<|image|>` last. A place ("top left") is one
// piece, as BPE merges a frequent pair: answering where an object is then takes one look
// at its image token, not a second one for the column after the row.

const SPLIT_REGEX = "<\\|[a-z_]+\\|>|\\n| ?(?:top|bottom) (?:left|right)| ?[A-Za-z]+| ?[0-9]| ?[^\\sA-Za-z0-9]";
const SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/** Every text the shapes world or the chat template can produce, with a placeholder for each varying word. */
function shapesCorpus(): string[] {
  const values = [...SHAPES, ...SHAPES.map((s) => s + "s"), ...COLORS, ...SIZES, ...QUADRANTS, ...NUMBER_WORDS];
  const templates = [
    "user\nassistant\n",
    "Describe the image.",
    "a large red circle in the top left, a small blue square in the top right and a circle.",
    "What color is the circle?",
    "What shape is the red object?",
    "How many shapes are there?",
    "How many red shapes are there?",
    "How many red circles are there?",
    "Is there a red circle?",
    "yes",
    "no",
    "Where is the red circle?",
    ...CHOICE_LETTERS.map((letter) => `\n${letter}. red`),
    CHOICE_INSTRUCTION,
    ...CHOICE_LETTERS.map((letter) => choiceAnswer("red", letter)),
  ];
  // Each value both at the start of a line and after a space.
  return [...templates, ...values.flatMap((v) => [v, ` ${v}`])];
}

/**
 * The shapes tokenizer as a tokenizer.json object (WordLevel model, split pre-tokenizer,
 * Fuse decoder); `tokenizers/shapes/tokenizer.json` is this, pretty-printed.
 */
export function buildShapesTokenizerJson(): Json {
  const pattern = new RegExp(SPLIT_REGEX, "g");
  const pieces = new Set<string>();
  for (const text of shapesCorpus()) for (const [piece] of text.matchAll(pattern)) pieces.add(piece);
  const words = [...pieces].filter((p) => !SPECIAL_TOKENS.includes(p)).sort();
  const vocab: Record<string, number> = {};
  [...SPECIAL_TOKENS, ...words].forEach((piece, id) => vocab[piece] = id);
  const addedToken = (content: string, id: number) => ({
    id,
    content,
    single_word: false,
    lstrip: false,
    rstrip: false,
    normalized: false,
    special: true,
  });
  return {
    version: "1.0",
    truncation: null,
    padding: null,
    added_tokens: [
      ...SPECIAL_TOKENS.map(addedToken),
      addedToken(IMAGE_TOKEN, SPECIAL_TOKENS.length + words.length),
    ],
    normalizer: null,
    pre_tokenizer: { type: "Split", pattern: { Regex: SPLIT_REGEX }, behavior: "Isolated", invert: false },
    post_processor: null,
    decoder: { type: "Fuse" },
    model: { type: "WordLevel", vocab, unk_token: "<unk>" },
  };
}

/** The shapes tokenizer's tokenizer_config.json object: EOS = pad = `<|im_end|>`, the reference's chat template. */
export function buildShapesTokenizerConfig(): Json {
  return {
    tokenizer_class: "PreTrainedTokenizerFast",
    bos_token: null,
    eos_token: "<|im_end|>",
    pad_token: "<|im_end|>",
    unk_token: null,
    clean_up_tokenization_spaces: false,
    model_max_length: 8192,
    chat_template: CHATML_TEMPLATE,
  };
}

/** The files of tokenizers/shapes/, as written to disk. */
export function shapesTokenizerFiles(): Record<string, string> {
  return {
    "tokenizer.json": JSON.stringify(buildShapesTokenizerJson(), null, 2) + "\n",
    "tokenizer_config.json": JSON.stringify(buildShapesTokenizerConfig(), null, 2) + "\n",
  };
}

// ---- Chat template and labels ---------------------------------------------------------------

/** The model-config fields the data pipeline reads (names as in the reference's VLMConfig). */
export interface DataConfig {
  /** S: images are resized to S×S. */
  vit_img_size: number;
  /** Image tokens per image. */
  mp_image_token_length: number;
  /** Training sequences are padded to exactly this; longer ones are dropped. */
  lm_max_length: number;
  /** The tokenizer's vocabulary without `<|image|>`. */
  lm_base_vocab_size: number;
  lm_chat_template: string;
}

/** A chat message. */
export interface ChatMessage {
  role: "user" | "assistant" | "system";
  content: string;
}

/**
 * Render messages with the ChatML template: `<|im_start|>{role}\n{content}<|im_end|>\n`
 * each, then `<|im_start|>assistant\n` if `addGenerationPrompt`. Only the reference's
 * template is implemented (this is not a Jinja engine); another `template` throws.
 */
export function applyChatTemplate(
  messages: readonly ChatMessage[],
  { addGenerationPrompt = false, template = CHATML_TEMPLATE }: { addGenerationPrompt?: boolean; template?: string } =
    {},
): string {
  if (template.replaceAll("\\n", "\n") !== CHATML_TEMPLATE) {
    throw new Error("only the reference's ChatML lm_chat_template is implemented");
  }
  const text = messages.map((m) => `<|im_start|>${m.role}\n${m.content}<|im_end|>\n`).join("");
  return addGenerationPrompt ? text + "<|im_start|>assistant\n" : text;
}

/** A tokenised sample before padding: the reference VQADataset's output. */
export interface EncodedSample {
  inputIds: number[];
  /** Next-token targets: labels[t] = inputIds[t+1] where t+1 is an assistant token, else -100. */
  labels: number[];
  attentionMask: number[];
  /** The sample's images, each a [3, S, S] float32 array. */
  images: Float32Array[];
}

/** The label value that the loss ignores (PyTorch's cross-entropy default). */
export const IGNORE_INDEX = -100;

const prefixLengths = new WeakMap<ChatTokenizer, number>();

/**
 * Tokens of the template before an assistant message's content, `<|im_start|>assistant\n`
 * (the reference's `_get_prefix_len`: render a dummy assistant message and tokenise what
 * precedes its content).
 */
export function assistantPrefixLength(tokenizer: ChatTokenizer): number {
  let n = prefixLengths.get(tokenizer);
  if (n === undefined) {
    const marker = "xzyvd";
    const text = applyChatTemplate([{ role: "assistant", content: marker }]);
    n = tokenizer.encode(text.slice(0, text.indexOf(marker))).length;
    prefixLengths.set(tokenizer, n);
  }
  return n;
}

/** `count` image placeholders, the reference's `"<|image|>" * (n_images * mp_image_token_length)`. */
function imagePlaceholders(tokenizer: ChatTokenizer, imageCount: number, imageTokenLength: number): string {
  return tokenizer.imageToken.repeat(imageCount * imageTokenLength);
}

/**
 * Tokenise a conversation the way the reference VQADataset does: image placeholders
 * prepended to the first user turn, the chat template, a loss mask over each assistant
 * message's content + `<|im_end|>` + `\n`, and labels shifted by one (the model does
 * not shift). Images are attached later (see collate); this only counts them.
 */
export function encodeConversation(
  tokenizer: ChatTokenizer,
  { turns, imageCount }: { turns: readonly { user: string; assistant: string }[]; imageCount: number },
  imageTokenLength: number,
): Omit<EncodedSample, "images"> {
  if (turns.length === 0) throw new Error("a conversation needs at least one turn");
  const messages: ChatMessage[] = turns.flatMap((t) => [
    { role: "user" as const, content: t.user },
    { role: "assistant" as const, content: t.assistant },
  ]);
  messages[0].content = imagePlaceholders(tokenizer, imageCount, imageTokenLength) + messages[0].content;

  const inputIds = tokenizer.encode(applyChatTemplate(messages));
  const prefix = assistantPrefixLength(tokenizer);
  const trained = new Array<boolean>(inputIds.length).fill(false);
  let cursor = 0;
  for (const message of messages) {
    const segment = tokenizer.encode(applyChatTemplate([message])).length;
    if (message.role === "assistant") trained.fill(true, cursor + prefix, cursor + segment);
    cursor += segment;
  }
  // The reference assumes message-by-message tokenisation adds up to the whole; say so if not.
  if (cursor !== inputIds.length) {
    throw new Error(`the messages tokenise to ${cursor} tokens one by one but ${inputIds.length} together`);
  }
  const labels = inputIds.map((_, t) => (t + 1 < inputIds.length && trained[t + 1] ? inputIds[t + 1] : IGNORE_INDEX));
  return { inputIds, labels, attentionMask: inputIds.map(() => 1) };
}

/**
 * Tokenise a generation prompt: one user turn with the image placeholders, then
 * `<|im_start|>assistant\n` (generate.py and the lmms-eval wrapper do the same).
 * With `maxLength`, a prompt longer than that throws an Error giving both numbers.
 */
export function encodePrompt(
  tokenizer: ChatTokenizer,
  question: string,
  imageCount: number,
  imageTokenLength: number,
  maxLength?: number,
): { inputIds: number[]; attentionMask: number[] } {
  const content = imagePlaceholders(tokenizer, imageCount, imageTokenLength) + question;
  const inputIds = tokenizer.encode(applyChatTemplate([{ role: "user", content }], { addGenerationPrompt: true }));
  if (maxLength !== undefined && inputIds.length > maxLength) {
    throw new Error(
      `the prompt is ${inputIds.length} tokens long (${imageCount * imageTokenLength} of them image tokens), ` +
        `more than the limit of ${maxLength} (lm_max_length)`,
    );
  }
  return { inputIds, attentionMask: inputIds.map(() => 1) };
}

// ---- Collator -------------------------------------------------------------------------------
//
// Left padding everywhere: generation reads the logits of the last column, and the
// reference pads training batches on the left too (its VQACollator), so RoPE positions
// of a sample depend on its padding exactly as in the reference.

/** A padded batch, row-major [batchSize, length], images concatenated in sample order. */
export interface Batch {
  inputIds: Int32Array;
  /** -100 on padding, prompts and images. */
  labels: Int32Array;
  attentionMask: Int32Array;
  batchSize: number;
  length: number;
  /** [imageCount, 3, S, S]. */
  images: Float32Array;
  imageCount: number;
  /** Images of each sample (how `images` splits per sample). */
  imageCounts: number[];
  /** S (0 when the batch has no images). */
  imageSize: number;
  /** Samples dropped because they were longer than maxLength. */
  dropped: number;
}

/** Concatenate [3, S, S] images and check they all have the same S. */
function stackImages(perSample: readonly (readonly Float32Array[])[]): { images: Float32Array; imageSize: number } {
  const all = perSample.flat();
  const plane = all.length ? all[0].length : 0;
  const imageSize = Math.round(Math.sqrt(plane / 3));
  const images = new Float32Array(all.length * plane);
  all.forEach((image, i) => {
    if (image.length !== plane || 3 * imageSize * imageSize !== plane) {
      throw new Error(`image ${i} of the batch has ${image.length} values; expected [3, S, S] = ${plane}`);
    }
    images.set(image, i * plane);
  });
  return { images, imageSize };
}

/** Left-pad rows into [B, length] arrays. */
function leftPad(
  rows: readonly { inputIds: number[]; labels?: number[]; attentionMask: number[] }[],
  length: number,
  padTokenId: number,
): { inputIds: Int32Array; labels: Int32Array; attentionMask: Int32Array } {
  const inputIds = new Int32Array(rows.length * length).fill(padTokenId);
  const labels = new Int32Array(rows.length * length).fill(IGNORE_INDEX);
  const attentionMask = new Int32Array(rows.length * length);
  rows.forEach((row, b) => {
    const offset = b * length + length - row.inputIds.length;
    inputIds.set(row.inputIds, offset);
    if (row.labels) labels.set(row.labels, offset);
    attentionMask.set(row.attentionMask, offset);
  });
  return { inputIds, labels, attentionMask };
}

/**
 * The reference VQACollator: drop samples longer than `maxLength` (with a warning that
 * counts them, unless `quiet`), then left-pad every sample to exactly `maxLength`:
 * input ids with `padTokenId`, labels with -100, attention mask with 0.
 */
export function collate(
  samples: readonly EncodedSample[],
  { maxLength, padTokenId, quiet = false }: { maxLength: number; padTokenId: number; quiet?: boolean },
): Batch {
  const kept = samples.filter((s) => s.inputIds.length <= maxLength);
  const dropped = samples.length - kept.length;
  if (dropped && !quiet) {
    const longest = Math.max(...samples.map((s) => s.inputIds.length));
    console.warn(
      `collate: dropped ${dropped} of ${samples.length} samples longer than lm_max_length ${maxLength} ` +
        `(longest: ${longest} tokens)`,
    );
  }
  const { images, imageSize } = stackImages(kept.map((s) => s.images));
  return {
    ...leftPad(kept, maxLength, padTokenId),
    batchSize: kept.length,
    length: maxLength,
    images,
    imageCount: kept.reduce((n, s) => n + s.images.length, 0),
    imageCounts: kept.map((s) => s.images.length),
    imageSize,
    dropped,
  };
}

/**
 * Batch generation prompts: left-pad to the longest prompt (as lmms-eval's
 * `padding="longest", padding_side="left"`). With `maxLength`, a prompt longer than
 * that throws (it would not fit the context), naming the prompt, its length and the limit.
 */
export function collatePrompts(
  prompts: readonly { inputIds: number[]; attentionMask: number[]; images: Float32Array[] }[],
  { padTokenId, maxLength }: { padTokenId: number; maxLength?: number },
): Omit<Batch, "labels" | "dropped"> {
  prompts.forEach((p, i) => {
    if (maxLength !== undefined && p.inputIds.length > maxLength) {
      throw new Error(`prompt ${i} is ${p.inputIds.length} tokens long, more than the limit of ${maxLength}`);
    }
  });
  const length = Math.max(0, ...prompts.map((p) => p.inputIds.length));
  const { inputIds, attentionMask } = leftPad(prompts, length, padTokenId);
  const { images, imageSize } = stackImages(prompts.map((p) => p.images));
  return {
    inputIds,
    attentionMask,
    batchSize: prompts.length,
    length,
    images,
    imageCount: prompts.reduce((n, p) => n + p.images.length, 0),
    imageCounts: prompts.map((p) => p.images.length),
    imageSize,
  };
}

// ---- Image processor ------------------------------------------------------------------------
//
// The reference: `image.convert("RGB")`, `Resize((S, S))` (PIL bilinear, aspect ratio not
// kept), `ToTensor()` (k/255). Pillow's bilinear resize is an antialiased separable
// convolution in fixed point; resizeBilinearPIL follows Pillow's Resample.c step by step
// so the result is bit-identical, not merely close.

/** An 8-bit RGB image, row-major, 3 bytes per pixel. */
export interface RgbImage {
  rgb: Uint8Array;
  width: number;
  height: number;
}

/**
 * Decode PNG or JPEG bytes to RGB: alpha dropped (PIL's convert("RGB") does not blend),
 * grey expanded to three channels. `source` (a path or name) goes into the error message.
 */
export async function decodeImage(bytes: Uint8Array, source: string): Promise<RgbImage> {
  await checkImageBytes(bytes, source); // imagescript decodes some truncated files: see lib/image_bytes.ts
  let image: Image;
  try {
    const decoded = await Image.decode(bytes);
    if (!(decoded instanceof Image)) throw new Error("animated images are not supported");
    image = decoded;
  } catch (e) {
    throw new Error(`cannot decode image ${source}: ${(e as Error).message}`);
  }
  const { width, height, bitmap } = image;
  const rgb = new Uint8Array(width * height * 3);
  for (let i = 0, j = 0; i < rgb.length; i += 3, j += 4) {
    rgb[i] = bitmap[j];
    rgb[i + 1] = bitmap[j + 1];
    rgb[i + 2] = bitmap[j + 2];
  }
  return { rgb, width, height };
}

/** Read and decode an image file; a missing or unreadable file throws an Error naming it. */
export async function loadImage(path: string): Promise<RgbImage> {
  let bytes: Uint8Array;
  try {
    bytes = await Deno.readFile(path);
  } catch (e) {
    const why = e instanceof Deno.errors.NotFound ? "no such file" : (e as Error).message;
    throw new Error(`cannot read image ${path}: ${why}`);
  }
  return decodeImage(bytes, path);
}

// Pillow's fixed point: weights carry 22 fractional bits (32 − 8 − 2).
const PRECISION_BITS = 22;

/**
 * Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for the bilinear (triangle)
 * filter along one axis: for each output index, the first source index and the
 * fixed-point weights of its taps.
 */
function bilinearCoefficients(inSize: number, outSize: number): { first: Int32Array; weights: Int32Array[] } {
  const scale = inSize / outSize;
  const filterScale = Math.max(scale, 1); // antialiasing: widen the filter when shrinking
  const support = filterScale; // the triangle filter's support is 1
  const first = new Int32Array(outSize);
  const weights: Int32Array[] = [];
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale;
    const xmin = Math.max(0, Math.trunc(center - support + 0.5));
    const xmax = Math.min(inSize, Math.trunc(center + support + 0.5));
    const w = new Float64Array(xmax - xmin);
    let sum = 0;
    for (let x = 0; x < w.length; x++) {
      w[x] = Math.max(0, 1 - Math.abs((x + xmin - center + 0.5) * (1 / filterScale)));
      sum += w[x];
    }
    const fixed = new Int32Array(w.length);
    for (let x = 0; x < w.length; x++) {
      const k = sum !== 0 ? w[x] / sum : w[x];
      fixed[x] = Math.trunc(k < 0 ? -0.5 + k * (1 << PRECISION_BITS) : 0.5 + k * (1 << PRECISION_BITS));
    }
    first[xx] = xmin;
    weights.push(fixed);
  }
  return { first, weights };
}

/** Round a fixed-point accumulator (which already holds the +0.5) to a byte, clipping. */
function clip8(acc: number): number {
  return acc <= 0 ? 0 : acc >= 255 << PRECISION_BITS ? 255 : acc >> PRECISION_BITS;
}

/** One resampling pass along x (`horizontal`) or y of an RGB image. */
function resamplePass(
  src: Uint8Array,
  width: number,
  height: number,
  outSize: number,
  horizontal: boolean,
): Uint8Array {
  const { first, weights } = bilinearCoefficients(horizontal ? width : height, outSize);
  const outW = horizontal ? outSize : width, outH = horizontal ? height : outSize;
  const out = new Uint8Array(outW * outH * 3);
  const step = horizontal ? 3 : width * 3; // bytes between neighbouring taps
  for (let y = 0; y < outH; y++) {
    for (let x = 0; x < outW; x++) {
      const k = weights[horizontal ? x : y];
      const base = horizontal ? (y * width + first[x]) * 3 : (first[y] * width + x) * 3;
      for (let c = 0; c < 3; c++) {
        let acc = 1 << (PRECISION_BITS - 1);
        for (let t = 0; t < k.length; t++) acc += src[base + t * step + c] * k[t];
        out[(y * outW + x) * 3 + c] = clip8(acc);
      }
    }
  }
  return out;
}

/**
 * Resize RGB to `outWidth`×`outHeight` exactly as Pillow's `Image.resize(size, BILINEAR)`:
 * horizontal pass, round to uint8, vertical pass; an axis whose size does not change is
 * not resampled.
 */
export function resizeBilinearPIL(
  rgb: Uint8Array,
  width: number,
  height: number,
  outWidth: number,
  outHeight: number = outWidth,
): Uint8Array {
  if (rgb.length !== width * height * 3) throw new Error(`resize: ${rgb.length} bytes is not ${width}×${height} RGB`);
  let out = rgb, w = width;
  if (outWidth !== width) {
    out = resamplePass(out, w, height, outWidth, true);
    w = outWidth;
  }
  if (outHeight !== height) out = resamplePass(out, w, height, outHeight, false);
  return out === rgb ? rgb.slice() : out;
}

/** HWC uint8 → CHW float32 k/255, PyTorch's ToTensor (no mean/std normalisation). */
export function toCHWFloat(
  rgb: Uint8Array,
  size: number,
  out: Float32Array = new Float32Array(3 * size * size),
): Float32Array {
  const plane = size * size;
  for (let i = 0; i < plane; i++) {
    out[i] = rgb[i * 3] / 255;
    out[plane + i] = rgb[i * 3 + 1] / 255;
    out[2 * plane + i] = rgb[i * 3 + 2] / 255;
  }
  return out;
}

/**
 * The reference image processor: decode (bytes or a file path) → RGB → Pillow bilinear
 * resize to S×S → [3, S, S] float32 in [0, 1].
 */
export async function preprocessImage(
  input: Uint8Array | string,
  size: number,
  source?: string,
): Promise<Float32Array> {
  const { rgb, width, height } = typeof input === "string"
    ? await loadImage(input)
    : await decodeImage(input, source ?? "<bytes>");
  return toCHWFloat(resizeBilinearPIL(rgb, width, height, size), size);
}

// ---- Training batches of the shapes world ---------------------------------------------------

/** Options of shapesBatches. */
export interface ShapesBatchOptions {
  split: Split;
  seed: number;
  batchSize: number;
  tokenizer: ChatTokenizer;
  config: Pick<DataConfig, "vit_img_size" | "mp_image_token_length" | "lm_max_length">;
  /** Only these question kinds (default: all). */
  kinds?: readonly QuestionKind[];
  /**
   * How often a caption is drawn relative to each other kind (default 1: every kind of the scene equally). A caption
   * names every object's size, colour, shape and place: the densest lesson about the picture.
   */
  captionWeight?: number;
  /**
   * How often a multiple-choice question is drawn relative to each other kind (default 1). Its letter look-up is the
   * slowest lesson of the shapes world to form (README): more of it gives that look-up more chances.
   */
  choiceWeight?: number;
  /**
   * How often a position question ("Where is the red circle?") is drawn relative to each other kind (default 1). Its
   * left-or-right half makes the model read the column from an image token it found by content, which no caption
   * teaches: at 1 most wrong answers had the row right and the column wrong (README).
   */
  positionWeight?: number;
  /**
   * Batches sorted by length together (default 1: stream order). With k > 1 the samples of each k batches of the
   * stream are sorted by length (stably) before they are cut into batches, shortest first: short questions (21 tokens)
   * then share a batch instead of being padded to a caption or multiple-choice prompt (up to 55). The cuts even out
   * the batches' padded tokens (evenCuts), so batches of short samples hold more of them than `batchSize`, batches of
   * long ones fewer. The trainer makes the k batches the micro-batches of one step, so the step sees exactly the
   * samples it would see unsorted.
   */
  lengthBuckets?: number;
  /**
   * The share of multiple-choice samples (default 0) whose question line ends with its answer ("How many shapes are
   * there? four", then the options): a reading exercise, find the option that says "four" and answer its letter. It
   * trains the look-up by content in the text that a real multiple-choice question needs after its look-up in the image.
   */
  choiceHints?: number;
  /**
   * The share of multiple-choice samples (default 0) whose options come in alphabetical order, the answer's letter
   * following its option. Under a uniform shuffle, knowing the answer earns nothing until the whole look-up (answer →
   * its option line → that line's letter) works, and a decoder trained from scratch stays at chance (README). In
   * sorted samples the answer alone names the letter: that partial credit teaches the model to carry the answer to
   * where the letter is written, the first half of the look-up; the shuffled rest still needs the whole of it.
   */
  sortedChoices?: number;
  /**
   * Which prompt tokens are trained besides the answer (default "none": only the answer, as the reference's collator
   * does). "options": a multiple-choice sample also learns to predict its option lines ("A. red", "B. blue", ...), as a
   * language model learns any text it reads. "all": every sample learns to predict its whole question too.
   */
  promptLoss?: PromptLoss;
  /**
   * Multiple-choice samples learn, at the word of the option line that is the answer, to predict that line's letter
   * (default false): at "red" in "B. red" the target is "B" instead of the newline. The prompt the model reads is
   * unchanged; what changes is what its option positions are asked to compute. Each option's word then learns to
   * check itself against the picture and the question, as only the answer's word may predict its letter, and the
   * answer's letter becomes a look-up of the line that predicted one, instead of a look-up that pays off only once the
   * answer, its option line and that line's letter are all found (docs/training-the-shapes-world.md).
   */
  choiceVerdicts?: boolean;
  /**
   * A multiple-choice answer names its option before the letter (default false): "red (B)" instead of "B"
   * (`choiceAnswer`). The decoder then does one look-up at a time, as it writes: the answer from the picture, as for a
   * colour question, then the letter written beside that word in the options, a copy from the text.
   */
  choiceNamesOption?: boolean;
  /**
   * The newline before each option line predicts nothing (default false), under prompt loss "options" or "all", the two
   * that train the option lines. Trained, the newline after "C. green" learns to guess "D", the next line's letter, and
   * the answer's letter, a copy from beside its word, then leans towards the line below. Over four seeds it raised
   * multiple choice and lowered test-novel, so it is off (docs/training-the-shapes-world.md, "Three tries at multiple
   * choice and counting").
   */
  untrainedOptionBreaks?: boolean;
  /**
   * The share of multiple-choice samples (default 0; needs choiceNamesOption) whose answer names another option than
   * the right one, then that option's letter: "blue (C)" where the answer is "red (B)". The misnamed word predicts
   * nothing, so nothing teaches a wrong answer; the letter after it is trained, while the verdicts (choiceVerdicts)
   * still mark the right line. So the letter learns to follow the word just written, a copy from the option line that
   * says it, rather than the lines' verdicts from the picture, which are right less often
   * (docs/training-the-shapes-world.md, "Copy drills: the letter follows the word").
   */
  choiceCopyDrills?: number;
  /** Draw every scene in the plain style (black, hard edges, exact colours), as the world was before it varied. */
  plainScenes?: boolean;
  /** First example index (default 0): resume a run at `step · batchSize`. */
  start?: number;
  /** Stop after this many examples (default: never, the world is endless); the last batch may be short. */
  count?: number;
}

/**
 * Where to cut samples sorted by length (ascending) into `parts` batches so that the largest batch, counted in padded
 * tokens (rows × its longest row), is as small as it can be: the sizes of the parts, in order, each ≥ 1. Cutting in
 * equal rows instead puts every long sample in the last batch and pads the short ones beside them to its length;
 * with two threads, one per micro-batch, the step waits for that batch (README, "Every core for training").
 */
export function evenCuts(sortedLengths: readonly number[], parts: number): number[] {
  const n = sortedLengths.length;
  if (!(Number.isInteger(parts) && parts >= 1 && parts <= n)) {
    throw new Error(`cannot cut ${n} samples into ${parts} non-empty batches`);
  }
  // Greedy: each part takes rows while its padded tokens stay ≤ bound, leaving a row for every part still to come.
  const cut = (bound: number): number[] | undefined => {
    const sizes: number[] = [];
    for (let first = 0; first < n;) {
      const rowsLeftForOthers = parts - sizes.length - 1;
      let last = first;
      while (last + 1 < n - rowsLeftForOthers && (last + 2 - first) * sortedLengths[last + 1] <= bound) last++;
      if (sortedLengths[last] > bound || sizes.length === parts) return undefined;
      sizes.push(last + 1 - first);
      first = last + 1;
    }
    return sizes.length === parts ? sizes : undefined;
  };
  // The smallest bound the greedy meets (feasibility only grows with the bound): a binary search.
  let low = sortedLengths[n - 1], high = n * sortedLengths[n - 1];
  while (low < high) {
    const mid = Math.floor((low + high) / 2);
    if (cut(mid)) high = mid;
    else low = mid + 1;
  }
  return cut(low)!;
}

/** Which prompt tokens a training sample learns to predict besides its answer (ShapesBatchOptions.promptLoss). */
export const PROMPT_LOSSES = ["none", "options", "all"] as const;
export type PromptLoss = typeof PROMPT_LOSSES[number];

/** Train next-token prediction on every prompt token after the image slots (labels[t] predicts token t + 1). */
function trainPrompt(sample: Omit<EncodedSample, "images">, imageTokenId: number): void {
  const afterImages = sample.inputIds.lastIndexOf(imageTokenId);
  for (let t = afterImages; t + 1 < sample.inputIds.length && sample.labels[t] === IGNORE_INDEX; t++) {
    sample.labels[t] = sample.inputIds[t + 1];
  }
}

/**
 * Where the option lines of an encoded multiple-choice sample end: the positions of the newline after the question line,
 * then of the newline after each option line. The user turn is "<|im_start|>user", newline, images, the question line,
 * newline, one line per option, then the instruction: its second to sixth newlines bound the four option lines.
 */
function optionLineEnds(sample: Omit<EncodedSample, "images">, newline: number): number[] {
  const newlines = [...sample.inputIds.keys()].filter((t) => sample.inputIds[t] === newline);
  return newlines.slice(1, 2 + CHOICE_LETTERS.length);
}

/**
 * Train next-token prediction on the option lines of an encoded multiple-choice sample (labels are shifted: position
 * t predicts token t + 1).
 */
function trainOptionLines(sample: Omit<EncodedSample, "images">, newline: number): void {
  const ends = optionLineEnds(sample, newline);
  for (let t = ends[0]; t < ends.at(-1)!; t++) sample.labels[t] = sample.inputIds[t + 1];
}

/**
 * The answer's option line of an encoded multiple-choice sample (`answerLine`, 0-based) learns, at its word, to predict
 * its own letter instead of the newline that follows (ShapesBatchOptions.choiceVerdicts): "B. red" with "B" as the
 * target at "red". The other option lines keep their targets.
 */
function trainAnswerLineLetter(sample: Omit<EncodedSample, "images">, newline: number, answerLine: number): void {
  const ends = optionLineEnds(sample, newline);
  const [lineStart, lineEnd] = [ends[answerLine] + 1, ends[answerLine + 1]]; // "B", ".", " red", newline
  sample.labels[lineEnd - 1] = sample.inputIds[lineStart];
}

/**
 * The newlines of an encoded multiple-choice sample whose next token is an option's letter (the one after the question
 * line and after options A to C) predict nothing (ShapesBatchOptions.untrainedOptionBreaks).
 */
function untrainOptionBreaks(sample: Omit<EncodedSample, "images">, newline: number): void {
  for (const t of optionLineEnds(sample, newline).slice(0, CHOICE_LETTERS.length)) sample.labels[t] = IGNORE_INDEX;
}

/**
 * The first word of an encoded multiple-choice answer that names its option ("blue" in "blue (C)") predicts nothing
 * (ShapesBatchOptions.choiceCopyDrills): the answer's " (" is the last in the sample, and the word stands just before.
 */
function untrainAnswerWord(sample: Omit<EncodedSample, "images">, openParen: number): void {
  sample.labels[sample.inputIds.lastIndexOf(openParen) - 2] = IGNORE_INDEX;
}

/**
 * Collated batches of (image, one question → answer) samples, rendered straight into
 * float arrays (no PNG round trip). Example i gives sample i: its kind is drawn among
 * the kinds its scene has (uniformly, captions weighted by `captionWeight`, multiple
 * choice by `choiceWeight`, positions by `positionWeight`), then one question of that
 * kind, so the stream is fully determined by (split, seed) and batches can be
 * regenerated from any `start` (with length buckets: any whole batch).
 */
export function* shapesBatches(options: ShapesBatchOptions): Generator<Batch> {
  const { split, seed, batchSize, tokenizer, config, kinds = QUESTION_KINDS, captionWeight = 1, start = 0 } = options;
  const { lengthBuckets = 1, choiceHints = 0, sortedChoices = 0, choiceWeight = 1, positionWeight = 1 } = options;
  const { promptLoss = "none", choiceVerdicts = false, choiceNamesOption = false } = options;
  const { untrainedOptionBreaks = false, choiceCopyDrills = 0 } = options;
  if (!PROMPT_LOSSES.includes(promptLoss)) {
    throw new Error(`prompt loss must be one of ${PROMPT_LOSSES.join(", ")}, got ${JSON.stringify(promptLoss)}`);
  }
  const newline = tokenizer.encode("\n")[0], openParen = tokenizer.encode(" (")[0];
  const weights = { caption: captionWeight, choice: choiceWeight, position: positionWeight };
  for (const [name, weight] of Object.entries(weights)) {
    if (!(weight >= 0 && Number.isFinite(weight))) {
      throw new Error(`${name} weight must be a finite number ≥ 0, got ${weight}`);
    }
  }
  if (!(choiceHints >= 0 && choiceHints <= 1)) {
    throw new Error(`choice hints must be a share in [0, 1], got ${choiceHints}`);
  }
  if (!(sortedChoices >= 0 && sortedChoices <= 1)) {
    throw new Error(`sorted choices must be a share in [0, 1], got ${sortedChoices}`);
  }
  if (!(choiceCopyDrills >= 0 && choiceCopyDrills <= 1)) {
    throw new Error(`choice copy drills must be a share in [0, 1], got ${choiceCopyDrills}`);
  }
  if (choiceCopyDrills > 0 && !choiceNamesOption) {
    throw new Error(
      "choice copy drills need answers that name their option (choiceNamesOption): a bare letter names none",
    );
  }
  if (!(Number.isInteger(lengthBuckets) && lengthBuckets >= 1)) {
    throw new Error(`length buckets must be a whole number ≥ 1, got ${lengthBuckets}`);
  }
  if (lengthBuckets > 1 && start % batchSize !== 0) {
    throw new Error(
      `with length buckets a stream restarts at a whole batch: start ${start} is not a multiple of ${batchSize}`,
    );
  }
  const end = options.count === undefined ? Infinity : start + options.count;
  const S = config.vit_img_size;
  const weightOf = (k: QuestionKind) => (k in weights ? weights[k as keyof typeof weights] : 1);
  const sampleAt = (index: number): EncodedSample | undefined => {
    const example = makeShapesExample(split, seed, index, S, { plain: options.plainScenes });
    const pool = example.questions.filter((q) => kinds.includes(q.kind));
    if (pool.length === 0) return undefined; // e.g. only "shape" asked and no colour occurs once
    const rng = new Rng(hashString(`pick/${split}/${seed}/${index}`));
    const present = [...new Set(pool.map((q) => q.kind))];
    const kind = rng.weighted(present, present.map(weightOf));
    const picked = rng.pick(pool.filter((q) => q.kind === kind));
    let { question, answer } = picked;
    let answerLine = -1, drill = false;
    if (kind === "choice") {
      const hinted = choiceHints > 0 && rng.next() < choiceHints;
      const sorted = sortedChoices > 0 && rng.next() < sortedChoices;
      const parts = choiceParts(question, answer, { hinted, sorted });
      question = choicePrompt(parts.question, parts.options);
      answerLine = parts.options.indexOf(parts.answer);
      answer = choiceNamesOption ? choiceAnswer(parts.answer, CHOICE_LETTERS[answerLine]) : CHOICE_LETTERS[answerLine];
      drill = choiceCopyDrills > 0 && rng.next() < choiceCopyDrills;
      if (drill) {
        const named = (answerLine + 1 + rng.int(CHOICE_LETTERS.length - 1)) % CHOICE_LETTERS.length; // any other line
        answer = choiceAnswer(parts.options[named], CHOICE_LETTERS[named]);
      }
    }
    const encoded = encodeConversation(
      tokenizer,
      { turns: [{ user: question, assistant: answer }], imageCount: 1 },
      config.mp_image_token_length,
    );
    if (promptLoss === "all") trainPrompt(encoded, tokenizer.imageTokenId);
    else if (promptLoss === "options" && kind === "choice") trainOptionLines(encoded, newline);
    if (choiceVerdicts && kind === "choice") trainAnswerLineLetter(encoded, newline, answerLine);
    if (untrainedOptionBreaks && kind === "choice") untrainOptionBreaks(encoded, newline);
    if (drill) untrainAnswerWord(encoded, openParen);
    return { ...encoded, images: [toCHWFloat(example.rgb, S)] };
  };
  // A window is lengthBuckets batches of the stream, starting at a multiple of its size (without buckets: at `start`).
  const window = batchSize * lengthBuckets;
  for (let first = lengthBuckets > 1 ? start - (start % window) : start; first < end; first += window) {
    const last = Math.min(first + window, end);
    const batchStarts = Array.from({ length: Math.ceil((last - first) / batchSize) }, (_, b) => first + b * batchSize);
    const samples: EncodedSample[] = [];
    for (let index = first; index < last; index++) {
      const sample = sampleAt(index);
      if (sample) samples.push(sample);
    }
    // Sorted by length, the window is cut where its batches' padded tokens even out (evenCuts); else every batchSize.
    const sorted = lengthBuckets > 1 && samples.length >= batchStarts.length;
    if (sorted) samples.sort((a, b) => a.inputIds.length - b.inputIds.length); // stable: ties keep order
    const sizes = sorted
      ? evenCuts(samples.map((sample) => sample.inputIds.length), batchStarts.length)
      : batchStarts.map((_, b) => Math.max(0, Math.min(batchSize, samples.length - b * batchSize)));
    let from = 0;
    for (const [b, batchStart] of batchStarts.entries()) {
      const batch = samples.slice(from, from + sizes[b]);
      from += sizes[b];
      if (batchStart < start || batch.length === 0) continue; // seen before a resume, or nothing left
      yield collate(batch, { maxLength: config.lm_max_length, padTokenId: tokenizer.padTokenId });
    }
  }
}
