// image_bytes.ts — is this PNG or JPEG whole? Checked before the decoder sees it.
//
// Why: image decoders are lenient on purpose, so that a browser can show most of a damaged
// picture. imagescript, which data.ts decodes with, returns a full image for a PNG whose
// end (its IEND chunk, text chunks) was cut off, and checks no CRC of the chunks it does
// not need. For a model a lenient decoder is a hazard: a broken file becomes pixels, and
// the pixels a confident answer (or, in training, a lesson) about a picture nobody drew.
// So every image is checked first, and a damaged one is an Error that says what is wrong.
//
// What is checked (the container, not the pixels: a file can be whole and still show noise):
//   PNG: the 8-byte signature; chunk by chunk, that each chunk fits in the file and its
//        CRC-32 matches; IHDR first with a valid size, bit depth and colour type; IEND
//        present and last; the IDAT data inflates to exactly as many bytes as the IHDR's
//        width, height, bits per pixel and interlacing imply (one filter byte per row).
//   JPEG: SOI (FFD8) first; marker segment by segment, that each segment's length fits in
//        the file, skipping over the compressed scan data, until the EOI marker (FFD9).
// What is not: anything but PNG and JPEG (an Error: the rest of the project reads only
// these), the colours themselves, and whatever a JPEG carries after its EOI (see below).

/** Throw `cannot decode image <source>: <reason>` unless `bytes` are a whole PNG or JPEG file. */
export async function checkImageBytes(bytes: Uint8Array, source: string): Promise<void> {
  const fail = (reason: string): never => {
    throw new Error(`cannot decode image ${source}: ${reason}`);
  };
  const startsWith = (magic: number[]) => magic.every((byte, i) => bytes[i] === byte);
  if (bytes.length === 0) fail("the file is empty");
  if (startsWith([0x89, 0x50, 0x4e, 0x47])) await checkPng(bytes, fail); // \x89 P N G
  else if (startsWith([0xff, 0xd8])) checkJpeg(bytes, fail);
  else fail("not a PNG or JPEG file");
}

type Fail = (reason: string) => never;

// ---- PNG --------------------------------------------------------------------------------------
//
// A PNG is a signature, then chunks: 4-byte length, 4-byte type, data, CRC-32 of type + data.
// The pixels are the concatenated IDAT data: one zlib stream of rows, each row a filter byte
// followed by the row's packed samples.

const PNG_SIGNATURE = [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a];

/** CRC-32 (ISO 3309, the one PNG and zlib's gzip use), one table entry per byte value. */
const CRC_TABLE = Uint32Array.from({ length: 256 }, (_, n) => {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  return c;
});

/** The CRC-32 a PNG chunk ends with, computed over its type and data. */
export function crc32(bytes: Uint8Array): number {
  let c = 0xffffffff;
  for (const byte of bytes) c = CRC_TABLE[(c ^ byte) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

/** Samples per pixel of each PNG colour type, and the bit depths the PNG spec allows for it. */
const PNG_COLOR_TYPES: Record<number, { channels: number; bitDepths: number[]; name: string }> = {
  0: { channels: 1, bitDepths: [1, 2, 4, 8, 16], name: "grey" },
  2: { channels: 3, bitDepths: [8, 16], name: "RGB" },
  3: { channels: 1, bitDepths: [1, 2, 4, 8], name: "palette" },
  4: { channels: 2, bitDepths: [8, 16], name: "grey + alpha" },
  6: { channels: 4, bitDepths: [8, 16], name: "RGBA" },
};

/** Adam7 interlacing: each pass's first column and row, and its column and row step. */
const ADAM7_PASSES = [[0, 0, 8, 8], [4, 0, 8, 8], [0, 4, 4, 8], [2, 0, 4, 4], [0, 2, 2, 4], [1, 0, 2, 2], [0, 1, 1, 2]];

/**
 * The bytes the IDAT stream inflates to: per row a filter byte and ceil(width × bits per
 * pixel / 8) bytes; an interlaced image is seven smaller images, one per Adam7 pass (a pass
 * with no pixels has no rows at all, not even filter bytes).
 */
function pngImageDataLength(width: number, height: number, bitsPerPixel: number, interlaced: boolean): number {
  const rowsLength = (w: number, h: number) => w > 0 && h > 0 ? h * (1 + Math.ceil(w * bitsPerPixel / 8)) : 0;
  if (!interlaced) return rowsLength(width, height);
  return ADAM7_PASSES.reduce(
    (sum, [x0, y0, dx, dy]) => sum + rowsLength(Math.ceil((width - x0) / dx), Math.ceil((height - y0) / dy)),
    0,
  );
}

async function checkPng(bytes: Uint8Array, fail: Fail): Promise<void> {
  if (!PNG_SIGNATURE.every((byte, i) => bytes[i] === byte)) {
    // The signature's CR LF, ^Z and LF exist to catch exactly this: a file copied as text.
    fail("PNG signature is damaged (file corrupt, perhaps transferred as text)");
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const idat: Uint8Array[] = [];
  let header: { width: number; height: number; bitsPerPixel: number; interlaced: boolean; what: string } | undefined;
  let offset = PNG_SIGNATURE.length;
  for (;;) {
    if (offset + 12 > bytes.length) fail("PNG ends before its IEND chunk (file truncated)");
    const length = view.getUint32(offset);
    const type = String.fromCharCode(...bytes.subarray(offset + 4, offset + 8));
    const end = offset + 12 + length;
    if (end > bytes.length) fail(`PNG ends inside its ${type} chunk (file truncated)`);
    const typeAndData = bytes.subarray(offset + 4, end - 4);
    if (crc32(typeAndData) !== view.getUint32(end - 4)) fail(`PNG chunk ${type} fails its CRC (file corrupt)`);
    const data = typeAndData.subarray(4);
    if (!header) {
      if (type !== "IHDR" || length !== 13) fail("PNG does not start with a 13-byte IHDR chunk (file corrupt)");
      header = readPngHeader(data, fail);
    } else if (type === "IDAT") idat.push(data);
    else if (type === "IEND") {
      if (end !== bytes.length) fail(`PNG has ${bytes.length - end} bytes after its IEND chunk (file corrupt)`);
      break;
    }
    offset = end;
  }
  if (!idat.length) fail("PNG has no IDAT chunk (no image data)");
  const { width, height, bitsPerPixel, interlaced, what } = header!;
  const expected = pngImageDataLength(width, height, bitsPerPixel, interlaced);
  const actual = await inflatedLength(idat, expected, fail);
  if (actual < expected) {
    fail(`PNG image data ends early: it inflates to ${actual} of the ${expected} bytes of a ${what} (file truncated)`);
  }
  if (actual > expected) fail(`PNG image data inflates to more than the ${expected} bytes of a ${what} (file corrupt)`);
}

function readPngHeader(data: Uint8Array, fail: Fail) {
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  const width = view.getUint32(0), height = view.getUint32(4);
  const [bitDepth, colorType, compression, filter, interlace] = data.subarray(8);
  const color = PNG_COLOR_TYPES[colorType];
  // The spec caps both sides at 2^31 - 1 so that they fit a signed 32-bit integer.
  if (width === 0 || height === 0 || width > 0x7fffffff || height > 0x7fffffff) {
    fail(`PNG header gives a size of ${width}×${height} pixels (file corrupt)`);
  }
  if (!color || !color.bitDepths.includes(bitDepth)) {
    fail(
      `PNG header gives colour type ${colorType} with bit depth ${bitDepth}, which PNG does not have (file corrupt)`,
    );
  }
  if (compression !== 0 || filter !== 0 || interlace > 1) {
    fail("PNG header names an unknown compression, filter or interlace method (file corrupt)");
  }
  const what = `${width}×${height} ${bitDepth}-bit ${color.name}${interlace ? " interlaced" : ""} image`;
  return { width, height, bitsPerPixel: color.channels * bitDepth, interlaced: interlace === 1, what };
}

/**
 * How many bytes the zlib stream split over `parts` inflates to. The bytes are counted, not
 * kept, and counting stops past `limit`, so a stream that inflates to far more than the
 * header allows (a "zip bomb") is not expanded in full. node:zlib's inflateSync would be
 * simpler, but in Deno one failed call leaves it failing every later one.
 */
async function inflatedLength(parts: Uint8Array[], limit: number, fail: Fail): Promise<number> {
  const compressed = new Uint8Array(parts.reduce((sum, part) => sum + part.length, 0));
  parts.reduce((offset, part) => (compressed.set(part, offset), offset + part.length), 0);
  const reader = new Blob([compressed]).stream().pipeThrough(new DecompressionStream("deflate")).getReader();
  let length = 0;
  try {
    for (let chunk = await reader.read(); !chunk.done && length <= limit; chunk = await reader.read()) {
      length += chunk.value.length;
    }
  } catch (e) {
    fail(`PNG image data is not a valid zlib stream: ${(e as Error).message} (file corrupt)`);
  }
  await reader.cancel();
  return length;
}

// ---- JPEG -------------------------------------------------------------------------------------
//
// A JPEG is a sequence of markers (0xFF then a code). Most start a segment whose 2-byte
// length (counting itself) follows; SOI, EOI, TEM and RST0-7 stand alone. After a
// start-of-scan (SOS) segment comes entropy-coded data, in which a 0xFF data byte is written
// as FF 00, so the next real marker is the first 0xFF followed by anything but 00 or a
// restart marker. A progressive JPEG has several scans; all of them come before EOI.
//
// Bytes after EOI are allowed: the Multi-Picture Format (CIPA DC-007), which cameras and
// phones use for previews, depth maps and HDR gain maps, appends its extra images there,
// and a Google "motion photo" appends a video. Decoders read the first image and stop.

const SOS = 0xda, EOI = 0xd9, TEM = 0x01;
const isRestart = (code: number) => code >= 0xd0 && code <= 0xd7;

function checkJpeg(bytes: Uint8Array, fail: Fail): void {
  const truncated = () => fail("JPEG data ends before the end-of-image marker (file truncated)");
  let offset = 2; // past SOI
  for (;;) {
    if (offset + 2 > bytes.length) truncated();
    if (bytes[offset] !== 0xff) {
      fail(`JPEG has a data byte at offset ${offset} where a marker should be (file corrupt)`);
    }
    const code = bytes[offset + 1];
    if (code === 0xff) { // fill byte: markers may be preceded by any number of 0xFF
      offset++;
      continue;
    }
    offset += 2;
    if (code === EOI) return;
    if (code === TEM || isRestart(code)) continue;
    if (offset + 2 > bytes.length) truncated();
    const length = (bytes[offset] << 8) | bytes[offset + 1];
    if (length < 2) fail(`JPEG segment FF${code.toString(16).toUpperCase()} has a length of ${length} (file corrupt)`);
    offset += length;
    if (offset > bytes.length) truncated();
    if (code === SOS) offset = endOfScan(bytes, offset) ?? truncated();
  }
}

/** Where the entropy-coded data that starts at `offset` ends (at the next marker), or undefined if the file does. */
function endOfScan(bytes: Uint8Array, offset: number): number | undefined {
  for (let i = offset; i + 1 < bytes.length; i++) {
    if (bytes[i] !== 0xff) continue;
    const next = bytes[i + 1];
    if (next !== 0x00 && next !== 0xff && !isRestart(next)) return i;
  }
  return undefined;
}
