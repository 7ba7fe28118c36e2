// web/ask.ts — the Ask tab: load a checkpoint, pick or make an image, ask a question, watch the answer stream with
// the five most likely tokens of each step, and look inside (web/inside.ts).
//
// An answer is lib/scoring.ts's `answerQuestion`, as `deno task generate --greedy` gives it: data.ts's prompt (image
// slots, chat template), greedy decoding for up to 64 new tokens within the context, the text up to the first
// end-of-sequence token with special tokens left out.

/// <reference lib="dom" />

import {
  type ChatTokenizer,
  checkTokenizerFitsConfig,
  decodeImage,
  makeShapesExample,
  resizeBilinearPIL,
  toCHWFloat,
} from "../data.ts";
import { PRESETS, softmax, type VisionLanguageModel } from "../nanovlm.ts";
import { modelFromCheckpointFiles } from "../lib/state_dict.ts";
import { answerQuestion } from "../lib/scoring.ts";
import { Composer } from "./composer.ts";
import {
  drawAttention,
  drawImageTokens,
  drawPatchGrid,
  type InsideView,
  lookInside,
  patchAt,
  showFusedSequence,
} from "./inside.ts";
import { guarded } from "./errors.ts";

/** The only tokenizer the page has; a checkpoint made for another cannot be asked here. */
const SHAPES_TOKENIZER = "tokenizers/shapes";

const element = <T extends HTMLElement>(id: string) => document.getElementById(id) as T;

/** The Ask tab's state: the model, the picture it is asked about, and what the inside views show. */
export class AskTab {
  private model: VisionLanguageModel | undefined;
  /** What the model status says while a model is loaded. */
  private asking = "";
  /** The image side the picture is kept at: the loaded model's, else the tiny preset's. */
  private S = PRESETS.tiny.vit_img_size;
  /** The picture asked about: S×S RGB bytes, and the pixels the model reads, [3, S, S] in [0, 1]. */
  private rgb: Uint8Array = new Uint8Array(0);
  private pixels: Float32Array = new Float32Array(0);
  /** The last uploaded picture at its own size (resized again if a model with another S loads). */
  private upload: { rgb: Uint8Array; width: number; height: number } | undefined;
  private view: InsideView | undefined;
  private selectedPatch = 0;
  private readonly composer: Composer;
  /** Words of the vocabulary, without their leading space, for suggestions and the vocabulary check. */
  private readonly words: string[];

  constructor(private readonly tokenizer: ChatTokenizer) {
    this.words = vocabularyWords(tokenizer);
    this.composer = new Composer({
      canvas: element("composer"),
      shape: element("compose-shape"),
      color: element("compose-color"),
      size: element("compose-size"),
      background: element("compose-background"),
      clear: element("compose-clear"),
    }, () => this.showSource());

    element("load-committed").addEventListener("click", guarded(() => this.loadCommitted()));
    element("load-files").addEventListener("click", guarded(() => this.loadChosenFiles()));
    for (const radio of document.querySelectorAll<HTMLInputElement>("input[name=image-source]")) {
      radio.addEventListener("change", guarded(() => this.showSource()));
    }
    const scene = element<HTMLInputElement>("scene-index");
    scene.addEventListener("input", guarded(() => this.showSource()));
    const step = (by: number) => () => {
      scene.value = String(Math.max(0, Number(scene.value) + by));
      this.showSource();
    };
    element("scene-previous").addEventListener("click", guarded(step(-1)));
    element("scene-next").addEventListener("click", guarded(step(1)));
    element("image-file").addEventListener("change", guarded(() => this.readUpload()));
    element("image-view").addEventListener("click", guarded((event: MouseEvent) => this.selectPatch(event)));
    const question = element<HTMLTextAreaElement>("question");
    question.addEventListener("input", () => this.suggest());
    element("ask").addEventListener("click", guarded(() => this.ask()));
    this.showSource();
  }

  // ---- The model ----------------------------------------------------------------------------

  private async loadCommitted(): Promise<void> {
    const fetchFile = async (name: string) => {
      const response = await fetch(`checkpoint/${name}`);
      if (!response.ok) throw new Error(`cannot fetch checkpoint/${name}: ${response.status} ${response.statusText}`);
      return response;
    };
    await this.load("the committed checkpoint (checkpoints/shapes-tiny)", async () => [
      await (await fetchFile("config.json")).text(),
      new Uint8Array(await (await fetchFile("model.safetensors")).arrayBuffer()),
    ]);
  }

  private async loadChosenFiles(): Promise<void> {
    const [config] = element<HTMLInputElement>("config-file").files ?? [];
    const [weights] = element<HTMLInputElement>("weights-file").files ?? [];
    if (!config || !weights) throw new Error("choose both files first: config.json and model.safetensors");
    await this.load(`${config.name} + ${weights.name}`, async () => [
      await config.text(),
      new Uint8Array(await weights.arrayBuffer()),
    ]);
  }

  /** Read a checkpoint's two files (config.json's text, model.safetensors' bytes) and ask it from now on. */
  private async load(source: string, read: () => Promise<[string, Uint8Array]>): Promise<void> {
    this.status(`loading ${source}…`);
    try {
      this.useModel(...await read(), source);
    } catch (error) {
      this.status(this.model ? this.asking : "No model loaded.", this.model ? "loaded" : "empty");
      throw error;
    }
  }

  /** Ask this checkpoint from now on (config.json's text and model.safetensors' bytes); `source` names it. */
  useModel(configText: string, safetensors: Uint8Array, source: string): void {
    const model = modelFromCheckpointFiles(configText, safetensors, source);
    try {
      if (model.cfg.lm_tokenizer !== SHAPES_TOKENIZER) {
        throw new Error(
          `${source} was trained with the tokenizer "${model.cfg.lm_tokenizer}"; this page only knows the shapes ` +
            `tokenizer (${SHAPES_TOKENIZER}), so it cannot ask this model`,
        );
      }
      checkTokenizerFitsConfig(this.tokenizer, model.cfg);
    } catch (error) {
      model.dispose();
      throw error;
    }
    this.model?.dispose();
    this.model = model;
    model.eosTokenId = this.tokenizer.eosTokenId;
    const cfg = model.cfg;
    this.S = cfg.vit_img_size;
    this.asking = `Asking ${source}: ${model.parameterCount().toLocaleString("en-US")} parameters, ` +
      `${cfg.vit_img_size}-px images in ${cfg.vit_patch_size}-px patches, ${cfg.mp_image_token_length} image tokens.`;
    this.status(this.asking, "loaded");
    element<HTMLButtonElement>("ask").disabled = false;
    this.showSource();
  }

  private status(text: string, state = "loading"): void {
    const status = element("model-status");
    status.textContent = text;
    status.dataset.state = state;
  }

  // ---- The picture ----------------------------------------------------------------------------

  private source(): string {
    return document.querySelector<HTMLInputElement>("input[name=image-source]:checked")!.value;
  }

  /** Show the chosen source's controls and picture (a test scene, the upload, or the composed scene). */
  private showSource(): void {
    const source = this.source(), S = this.S;
    for (const name of ["test", "upload", "compose"]) element(`source-${name}`).hidden = name !== source;
    if (source === "test") {
      const example = makeShapesExample("test", 0, Number(element<HTMLInputElement>("scene-index").value), S);
      this.listQuestions(example.questions.map((q) => q.question));
      this.setPicture(example.rgb);
    } else if (source === "upload") {
      const upload = this.upload;
      this.setPicture(
        upload ? resizeBilinearPIL(upload.rgb, upload.width, upload.height, S) : new Uint8Array(S * S * 3),
      );
    } else this.setPicture(this.composer.render(S));
  }

  private async readUpload(): Promise<void> {
    const [file] = element<HTMLInputElement>("image-file").files ?? [];
    if (!file) return;
    this.upload = undefined; // a file that fails to decode leaves no picture from before
    try {
      this.upload = await decodeImage(new Uint8Array(await file.arrayBuffer()), file.name);
    } finally {
      this.showSource();
    }
  }

  /** The picture to ask about: S×S RGB bytes, as the model will read them (data.ts's ToTensor). */
  private setPicture(rgb: Uint8Array): void {
    this.rgb = rgb;
    this.pixels = toCHWFloat(rgb, this.S);
    this.view = undefined;
    element("image-size").textContent = `${this.S}×${this.S} pixels`;
    this.drawPicture();
  }

  /** The patch side: the loaded model's, else the tiny preset's. */
  private get P(): number {
    return this.model?.cfg.vit_patch_size ?? PRESETS.tiny.vit_patch_size;
  }

  private drawPicture(): void {
    drawPatchGrid(element("image-view"), this.rgb, this.S, this.P, this.selectedPatch);
  }

  private listQuestions(questions: string[]): void {
    element("scene-questions").replaceChildren(...questions.map((text, i) => {
      const item = document.createElement("li"), button = document.createElement("button");
      button.type = "button";
      button.textContent = text;
      button.dataset.testid = `scene-question-${i}`;
      button.addEventListener("click", () => {
        element<HTMLTextAreaElement>("question").value = text;
        this.suggest();
      });
      item.append(button);
      return item;
    }));
  }

  private selectPatch(event: MouseEvent): void {
    this.selectedPatch = patchAt(element("image-view"), event, this.S / this.P);
    element("selected-patch").textContent = String(this.selectedPatch);
    this.drawPicture();
    if (this.view) drawAttention(element("attention-maps"), this.view, this.selectedPatch);
  }

  // ---- The question ---------------------------------------------------------------------------

  /** Words of the question that the vocabulary lacks. */
  private unknownWords(question: string): string[] {
    const known = new Set(this.words);
    return [...new Set(question.match(/[A-Za-z]+/g) ?? [])].filter((word) => !known.has(word));
  }

  /** Offer the vocabulary's words that complete the one being typed, and say at once which words it lacks. */
  private suggest(): void {
    const question = element<HTMLTextAreaElement>("question");
    const typed = question.value.slice(0, question.selectionStart).match(/[A-Za-z]*$/)![0];
    const matches = typed ? this.words.filter((w) => w.startsWith(typed) && w !== typed).slice(0, 12) : [];
    element("suggestions").replaceChildren(...matches.map((word) => {
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = word;
      button.addEventListener("click", () => {
        const at = question.selectionStart;
        question.setRangeText(word.slice(typed.length) + " ", at, at, "end");
        question.focus();
        this.suggest();
      });
      return button;
    }));
    const unknown = this.unknownWords(question.value);
    element("vocab-hint").textContent = unknown.length
      ? `Not in the vocabulary: ${unknown.join(", ")}. The model knows ${this.words.length} words.`
      : "";
  }

  // ---- Asking ---------------------------------------------------------------------------------

  private async ask(): Promise<void> {
    const model = this.model, tokenizer = this.tokenizer, answer = element("answer");
    if (!model) throw new Error("load a model first");
    const question = element<HTMLTextAreaElement>("question").value.trim();
    if (!question) throw new Error("type a question first");
    const unknown = this.unknownWords(question);
    if (unknown.length) {
      throw new Error(
        `not in the model's vocabulary: ${unknown.map((w) => `"${w}"`).join(", ")}. The shapes tokenizer knows ` +
          `only these ${this.words.length} words: ${this.words.join(" ")}`,
      );
    }
    const pixels = this.pixels, rgb = this.rgb;
    answer.dataset.state = "asking";
    answer.dataset.asks = String(Number(answer.dataset.asks ?? 0) + 1); // which ask the state is of (for tests)
    answer.textContent = "";
    const rows = element("top5").querySelector("tbody")!;
    rows.replaceChildren();
    try {
      let text = "";
      const answered = await answerQuestion(model, tokenizer, [pixels], question, {
        greedy: true,
        onLogits: (logits) => rows.append(top5Row(tokenizer, logits, rows.children.length)), // logits [1, V]
        onText: (piece) => answer.textContent = (text += piece).trim(),
      });
      const { ids, timeToFirstTokenMs, tokensPerSecond } = answered;
      element("answer-stats").textContent =
        `${ids.length} tokens | first after ${timeToFirstTokenMs.toFixed(0)} ms | ` +
        (ids.length > 1 ? `${tokensPerSecond.toFixed(1)} tokens/s after it` : "");
      answer.dataset.state = "done";
      const answerIds = ids.filter((id) => id !== model.eosTokenId);
      await this.showInside(answered.promptIds, answerIds, pixels, rgb);
    } catch (error) {
      answer.dataset.state = "failed";
      throw error;
    }
  }

  /** Fill the see-inside views for this picture, prompt and answer. */
  private async showInside(promptIds: number[], answerIds: number[], pixels: Float32Array, rgb: Uint8Array) {
    const model = this.model!, tokenizer = this.tokenizer;
    this.view = await lookInside(model, pixels, rgb);
    drawAttention(element("attention-maps"), this.view, this.selectedPatch);
    drawImageTokens(element("image-tokens"), element("image-tokens-caption"), this.view);
    let slot = 0;
    showFusedSequence(element("fused-sequence"), [
      ...promptIds.map((id) => ({
        text: tokenizer.decode([id]),
        imageToken: id === tokenizer.imageTokenId ? slot++ : undefined,
      })),
      ...answerIds.map((id) => ({ text: tokenizer.decode([id]), answer: true })),
    ]);
  }
}

/** A row of the top-5 table: the step, then the five most likely tokens with their probabilities. */
function top5Row(tokenizer: ChatTokenizer, logits: Float32Array, step: number): HTMLTableRowElement {
  const probabilities = softmax(logits);
  const best = Array.from(probabilities.keys()).sort((a, b) => probabilities[b] - probabilities[a]).slice(0, 5);
  const row = document.createElement("tr");
  const cell = (text: string) => Object.assign(document.createElement("td"), { textContent: text });
  row.append(cell(`step ${step}`));
  for (const id of best) {
    const token = JSON.stringify(tokenizer.decode([id])).slice(1, -1);
    row.append(cell(`${token} ${(100 * probabilities[id]).toFixed(1)}%`));
  }
  return row;
}

/** The vocabulary's words (letters only, leading space dropped), each once, sorted. */
function vocabularyWords(tokenizer: ChatTokenizer): string[] {
  const words = new Set<string>();
  for (let id = 0; id < tokenizer.baseVocabSize; id++) {
    const word = tokenizer.decode([id]).trim();
    if (/^[A-Za-z]+$/.test(word)) words.add(word);
  }
  return [...words].sort();
}
