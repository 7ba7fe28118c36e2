// Write tokenizers/shapes/ (tokenizer.json, tokenizer_config.json) from data.ts's buildShapesTokenizerJson(): run it
// after changing the shapes world's vocabulary. tests/data_test.ts fails while the committed files are stale.
//   deno run -A tools/shapes_tokenizer.ts
import {
  buildShapesTokenizerConfig,
  buildShapesTokenizerJson,
  IMAGE_TOKEN,
  shapesTokenizerFiles,
  tokenizerFromJson,
} from "../data.ts";

if (import.meta.main) {
  const dir = new URL("../tokenizers/shapes/", import.meta.url);
  await Deno.mkdir(dir, { recursive: true });
  for (const [name, text] of Object.entries(shapesTokenizerFiles())) {
    await Deno.writeTextFile(new URL(name, dir), text);
    console.log(`wrote tokenizers/shapes/${name}`);
  }
  const tokenizer = tokenizerFromJson(buildShapesTokenizerJson(), buildShapesTokenizerConfig());
  console.log(`vocabulary: ${tokenizer.baseVocabSize} tokens + ${IMAGE_TOKEN} = ${tokenizer.vocabSize}`);
}
