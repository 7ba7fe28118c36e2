// web/browser_image.ts — what the page loads in place of the `imagescript` package.
//
// Why it exists: data.ts decodes and encodes pictures with imagescript (`decodeImage`, `encodePng`), which is written
// for Deno and Node. A browser already has a PNG and JPEG codec, so web/serve.ts bundles the page with an import map
// that points `imagescript` here, and data.ts runs unchanged: the same checks of the bytes first (lib/image_bytes.ts),
// the same RGB out, the same errors naming the file. Only the two members data.ts uses exist, and they work in a
// Worker too (createImageBitmap and OffscreenCanvas, no DOM).
//
// One difference: a canvas keeps its pixels with alpha premultiplied, so a pixel that is not opaque comes back as its
// colour times its alpha, where imagescript (and PIL's convert("RGB")) keep the colour. Opaque pictures, which is
// what the shapes world and photos are, decode to the same bytes.

/// <reference lib="dom" />

/** An RGBA picture, as imagescript's `Image`: `bitmap` holds width·height·4 bytes, row-major. */
export class Image {
  readonly width: number;
  readonly height: number;
  readonly bitmap: Uint8ClampedArray<ArrayBuffer>;

  constructor(width: number, height: number, bitmap = new Uint8ClampedArray(width * height * 4)) {
    this.width = width;
    this.height = height;
    this.bitmap = bitmap;
  }

  /** Decode PNG or JPEG bytes with the browser's own decoder; colours exactly as stored (no colour management). */
  static async decode(bytes: Uint8Array): Promise<Image> {
    const picture = await createImageBitmap(new Blob([bytes as BlobPart]), {
      colorSpaceConversion: "none",
      premultiplyAlpha: "none",
    });
    const canvas = new OffscreenCanvas(picture.width, picture.height);
    const context = canvas.getContext("2d")!;
    context.drawImage(picture, 0, 0);
    picture.close();
    const { data } = context.getImageData(0, 0, canvas.width, canvas.height);
    return new Image(canvas.width, canvas.height, data);
  }

  /**
   * PNG bytes of the picture. imagescript's arguments (compression level, creation time) are accepted and ignored:
   * the browser's encoder writes no creation time, so the bytes depend on the pixels alone all the same.
   */
  async encode(..._imagescriptOptions: unknown[]): Promise<Uint8Array> {
    const canvas = new OffscreenCanvas(this.width, this.height);
    canvas.getContext("2d")!.putImageData(new ImageData(this.bitmap, this.width, this.height), 0, 0);
    const blob = await canvas.convertToBlob({ type: "image/png" });
    return new Uint8Array(await blob.arrayBuffer());
  }
}
