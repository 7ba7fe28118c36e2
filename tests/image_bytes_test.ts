// lib/image_bytes.ts: a damaged PNG or JPEG is an Error that names the file and says what is wrong, before the
// lenient decoder can turn it into pixels; a whole file decodes exactly as before. Then the same from the command
// line: generate and eval on a truncated image exit with an error that names it.
// (The training stream's side, a corrupt image skipped and counted, is in tests/datasets_test.ts.)
// Run: deno test -A tests/image_bytes_test.ts

import { Image } from "imagescript";
import { deflateSync } from "node:zlib";
import { decodeImage, encodePng, makeShapesExample } from "../data.ts";
import { checkImageBytes } from "../lib/image_bytes.ts";
import { savePretrained } from "../lib/checkpoint.ts";
import { initBackend } from "../backend/runtime.ts";
import { VisionLanguageModel } from "../nanovlm.ts";
import { assert, assertEquals, assertRejects } from "./assert.ts";
import { MICRO, pngChunk } from "./helpers.ts";

const ROOT = new URL("..", import.meta.url).pathname;
const SIZE = 64;
const scene = makeShapesExample("test", 0, 3, SIZE); // its rgb is renderScene's drawing of the scene
const PNG = await encodePng(scene.rgb, SIZE);
const JPEG = await (await Image.decode(PNG) as Image).encodeJPEG(90);

// ---- Building and taking apart PNG files ----

function concat(parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((sum, part) => sum + part.length, 0));
  parts.reduce((offset, part) => (out.set(part, offset), offset + part.length), 0);
  return out;
}

/** The signature and each chunk of a PNG, as separate byte arrays, with each chunk's type. */
function splitPng(png: Uint8Array): { signature: Uint8Array; chunks: { type: string; bytes: Uint8Array }[] } {
  const view = new DataView(png.buffer, png.byteOffset, png.byteLength);
  const chunks = [];
  for (let offset = 8; offset < png.length;) {
    const end = offset + 12 + view.getUint32(offset);
    chunks.push({
      type: String.fromCharCode(...png.subarray(offset + 4, offset + 8)),
      bytes: png.subarray(offset, end),
    });
    offset = end;
  }
  return { signature: png.subarray(0, 8), chunks };
}

/** `png` with each chunk of type `type` replaced by what `edit` makes of it (nothing: dropped). */
function editChunks(png: Uint8Array, type: string, edit: (bytes: Uint8Array) => Uint8Array | undefined): Uint8Array {
  const { signature, chunks } = splitPng(png);
  const kept = chunks.flatMap((c) => {
    if (c.type !== type) return [c.bytes];
    const edited = edit(c.bytes);
    return edited ? [edited] : [];
  });
  return concat([signature, ...kept]);
}

/** An 8-bit grey PNG of `width`×`height` whose IDAT holds `raw` (filter bytes and pixels), deflated. */
function greyPng(width: number, height: number, interlaced: boolean, raw: Uint8Array): Uint8Array {
  const header = new Uint8Array(13);
  new DataView(header.buffer).setUint32(0, width);
  new DataView(header.buffer).setUint32(4, height);
  header.set([8, 0, 0, 0, interlaced ? 1 : 0], 8); // bit depth 8, grey, deflate, adaptive filtering, Adam7 or none
  return concat([
    PNG.subarray(0, 8),
    pngChunk("IHDR", header),
    pngChunk("IDAT", deflateSync(raw)),
    pngChunk("IEND", new Uint8Array()),
  ]);
}

/** The rejection of `bytes` as image `name`: the message names the file, then says what is wrong. */
async function rejects(bytes: Uint8Array, name: string, reason: string): Promise<void> {
  await assertRejects(() => decodeImage(bytes, name), Error, `cannot decode image ${name}: ${reason}`);
}

// ---- Damaged files ----

Deno.test("a truncated or corrupt PNG is an Error naming the file and the damage", async () => {
  // The first 300 bytes: the download stopped inside the image data.
  await rejects(PNG.subarray(0, 300), "cut.png", "PNG ends inside its IDAT chunk (file truncated)");

  // One flipped bit in the image data: only the chunk's CRC knows.
  const idatStart = 8 + 25; // signature, then IHDR (12 + 13 bytes)
  const flipped = PNG.slice();
  flipped[idatStart + 20] ^= 0x01;
  await rejects(flipped, "flipped.png", "PNG chunk IDAT fails its CRC (file corrupt)");

  // The download stopped 12 bytes short: the IEND chunk is missing. imagescript alone decodes this.
  const noIend = PNG.subarray(0, PNG.length - 12);
  assert(await Image.decode(noIend) instanceof Image, "imagescript decodes a PNG without IEND");
  await rejects(noIend, "no-iend.png", "PNG ends before its IEND chunk (file truncated)");

  // After the image data come text chunks; imagescript decodes a file cut inside them, or with one of them damaged.
  const text = splitPng(PNG).chunks.find((c) => c.type === "tEXt")!.bytes;
  const textStart = text.byteOffset - PNG.byteOffset;
  const cutInText = PNG.subarray(0, textStart + 20);
  assert(await Image.decode(cutInText) instanceof Image, "imagescript decodes a PNG cut after its image data");
  await rejects(cutInText, "cut-in-text.png", "PNG ends inside its tEXt chunk (file truncated)");
  const textFlipped = PNG.slice();
  textFlipped[textStart + 12] ^= 0x01;
  assert(await Image.decode(textFlipped) instanceof Image, "imagescript skips the CRC of a text chunk");
  await rejects(textFlipped, "text-flipped.png", "PNG chunk tEXt fails its CRC (file corrupt)");

  // Half the zlib stream, in a chunk with a correct CRC: only inflating the data tells.
  const shortIdat = editChunks(
    PNG,
    "IDAT",
    (bytes) => pngChunk("IDAT", bytes.subarray(8, 8 + Math.floor((bytes.length - 12) / 2))),
  );
  await rejects(shortIdat, "short-idat.png", "PNG image data ends early: it inflates to ");
  const imageDataLength = SIZE * (1 + 4 * SIZE); // encodePng writes RGBA: per row a filter byte and 4 bytes a pixel
  const whatIsMissing = `of the ${imageDataLength} bytes of a 64×64 8-bit RGBA image (file truncated)`;
  await assertRejects(() => decodeImage(shortIdat, "short-idat.png"), Error, whatIsMissing);

  // More of the same kind.
  await rejects(concat([PNG, new Uint8Array(4)]), "padded.png", "PNG has 4 bytes after its IEND chunk (file corrupt)");
  const crDropped = concat([PNG.subarray(0, 4), PNG.subarray(5)]); // the signature's CR LF → LF, as a text-mode copy
  await rejects(crDropped, "text.png", "PNG signature is damaged");
  const noIdat = editChunks(PNG, "IDAT", () => undefined);
  await rejects(noIdat, "no-idat.png", "PNG has no IDAT chunk (no image data)");
});

Deno.test("a truncated JPEG is an Error naming the file; bytes after the end-of-image marker are allowed", async () => {
  const truncated = "JPEG data ends before the end-of-image marker (file truncated)";
  await rejects(JPEG.subarray(0, 300), "cut.jpg", truncated); // inside the header segments
  await rejects(JPEG.subarray(0, JPEG.length >> 1), "half.jpg", truncated); // inside the compressed scan
  assertEquals(Array.from(JPEG.subarray(-2)), [0xff, 0xd9]);
  await rejects(JPEG.subarray(0, JPEG.length - 2), "no-eoi.jpg", truncated);
  await rejects(JPEG.subarray(0, 2), "soi-only.jpg", truncated);

  // Multi-picture JPEGs (phones' gain maps, cameras' previews) carry more images after the first one's EOI.
  const withTrailer = concat([JPEG, JPEG]);
  assertEquals(await decodeImage(withTrailer, "two.jpg"), await decodeImage(JPEG, "one.jpg"));
});

Deno.test("anything but a PNG or JPEG is named as such, and an empty file as empty", async () => {
  const noise = Uint8Array.from({ length: 500 }, (_, i) => (i * 7919 + 13) % 251);
  await rejects(noise, "noise.bin", "not a PNG or JPEG file");
  await rejects(new TextEncoder().encode("GIF89a"), "anim.gif", "not a PNG or JPEG file");
  await rejects(new Uint8Array(), "empty.png", "the file is empty");
});

// ---- Whole files ----

Deno.test("a whole PNG or JPEG passes the check and decodes to the same pixels as imagescript alone", async () => {
  const png = await decodeImage(PNG, "scene.png");
  assertEquals(png, { rgb: scene.rgb, width: SIZE, height: SIZE }); // PNG is lossless
  const jpeg = await decodeImage(JPEG, "scene.jpg");
  const rgba = (await Image.decode(JPEG) as Image).bitmap;
  const reference = Uint8Array.from(rgba.filter((_, i) => i % 4 !== 3)); // RGBA → RGB
  assertEquals(jpeg, { rgb: reference, width: SIZE, height: SIZE });
});

Deno.test("an interlaced PNG's image data is measured pass by pass (Adam7)", async () => {
  // A 5×5 8-bit grey image. Plain: 5 rows of 1 filter byte + 5 pixels = 30 bytes. Adam7: seven passes of
  // 1×1, 1×1, 2×1, 1×2, 3×1, 2×3 and 5×2 pixels, each row with its filter byte: 2+2+3+4+4+9+12 = 36 bytes.
  await checkImageBytes(greyPng(5, 5, false, new Uint8Array(30)), "plain.png");
  const interlaced = await decodeImage(greyPng(5, 5, true, new Uint8Array(36)), "interlaced.png");
  assertEquals(interlaced, { rgb: new Uint8Array(5 * 5 * 3), width: 5, height: 5 });
  await rejects(
    greyPng(5, 5, true, new Uint8Array(30)),
    "interlaced.png",
    "PNG image data ends early: it inflates to 30 of the 36 bytes of a 5×5 8-bit grey interlaced image",
  );
  await rejects(greyPng(5, 5, false, new Uint8Array(36)), "plain.png", "PNG image data inflates to more than");
});

// ---- From the command line ----

async function run(script: string, args: string[]): Promise<{ code: number; stderr: string }> {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", `${ROOT}${script}`, ...args],
    cwd: ROOT,
    env: { NANOVLM_BACKEND: "wasm" },
  }).output();
  return { code: out.code, stderr: new TextDecoder().decode(out.stderr) };
}

Deno.test("generate and eval stop with the truncated image's name instead of answering", async () => {
  const dir = await Deno.makeTempDir({ prefix: "nanovlm-image-bytes-test-" });
  try {
    await initBackend("wasm", { quiet: true });
    const model = new VisionLanguageModel(MICRO); // untrained: the run must stop before it answers anything
    await savePretrained(model, `${dir}/ckpt`);
    model.dispose();
    const image = `${dir}/cut.png`;
    await Deno.writeFile(image, PNG.subarray(0, PNG.length - 12));
    const error = `error: cannot decode image ${image}: PNG ends before its IEND chunk (file truncated)`;

    const generate = await run("generate.ts", [`--checkpoint=${dir}/ckpt`, `--image=${image}`, "--prompt=What is it?"]);
    assertEquals(generate.code, 1, generate.stderr);
    assert(generate.stderr.includes(error), generate.stderr);

    const question = { image: "cut.png", question: "What color is the circle?", answer: "red" };
    await Deno.writeTextFile(`${dir}/questions.jsonl`, JSON.stringify(question) + "\n");
    const evaluate = await run("lib/eval.ts", [`--checkpoint=${dir}/ckpt`, `--data=${dir}/questions.jsonl`]);
    assertEquals(evaluate.code, 1, evaluate.stderr);
    assert(evaluate.stderr.includes(error), evaluate.stderr);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
