// web/composer.ts — compose a scene of the shapes world by hand: click to place a shape, drag to move it, shift-click
// to remove it. The scene is drawn by data.ts's renderScene, so the model sees exactly the pixels of the world it was
// trained on (in the plain style: hard edges, exact colours, no noise, on the chosen background).

/// <reference lib="dom" />

import {
  COLORS,
  plainStyle,
  QUADRANTS,
  RADIUS,
  renderScene,
  type Rgb,
  type ShapeObject,
  SHAPES,
  type Size,
  SIZES,
} from "../data.ts";
import { drawEnlarged } from "./inside.ts";

/** A placed shape's radius: the middle of its size class's range in the shapes world. */
const middleRadius = (size: Size) => (RADIUS[size][0] + RADIUS[size][1]) / 2;

/** The form controls of the composer. */
export interface ComposerControls {
  canvas: HTMLCanvasElement;
  shape: HTMLSelectElement;
  color: HTMLSelectElement;
  size: HTMLSelectElement;
  background: HTMLSelectElement;
  clear: HTMLButtonElement;
}

/** A scene being composed; `onChange` hears of every edit. */
export class Composer {
  objects: ShapeObject[] = [];
  private readonly controls: ComposerControls;
  private dragged: ShapeObject | undefined;

  constructor(controls: ComposerControls, private readonly onChange: () => void) {
    this.controls = controls;
    const fill = (select: HTMLSelectElement, names: readonly string[]) =>
      select.replaceChildren(...names.map((name) => new Option(name, name)));
    fill(controls.shape, SHAPES);
    fill(controls.color, COLORS);
    fill(controls.size, SIZES);
    controls.canvas.addEventListener("pointerdown", (event) => this.press(event));
    controls.canvas.addEventListener("pointermove", (event) => this.drag(event));
    controls.canvas.addEventListener("pointerup", () => this.dragged = undefined);
    controls.background.addEventListener("change", () => this.onChange());
    controls.clear.addEventListener("click", () => {
      this.objects = [];
      this.onChange();
    });
  }

  /** The scene at S×S, RGB bytes (and shown, enlarged, on the composer's canvas). */
  render(S: number): Uint8Array {
    const background = this.controls.background.value.split(",").map(Number) as unknown as Rgb;
    const rgb = renderScene(this.objects, S, { ...plainStyle(this.objects), background });
    drawEnlarged(this.controls.canvas, rgb, S);
    return rgb;
  }

  /** Where a pointer event is, as fractions of the image side. */
  private position(event: PointerEvent): { x: number; y: number } {
    const box = this.controls.canvas.getBoundingClientRect();
    return { x: (event.clientX - box.left) / box.width, y: (event.clientY - box.top) / box.height };
  }

  private press(event: PointerEvent): void {
    const { x, y } = this.position(event);
    const hit = this.objects.findLast((o) => Math.hypot(o.x - x, o.y - y) <= o.radius);
    if (hit && event.shiftKey) this.objects = this.objects.filter((o) => o !== hit);
    else if (hit) this.dragged = hit;
    else {
      const size = this.controls.size.value as Size;
      this.objects.push(placed(
        {
          shape: this.controls.shape.value as ShapeObject["shape"],
          color: this.controls.color.value as ShapeObject["color"],
          size,
          quadrant: QUADRANTS[0],
          x,
          y,
          radius: middleRadius(size),
        },
        x,
        y,
      ));
    }
    this.onChange();
  }

  private drag(event: PointerEvent): void {
    if (!this.dragged) return;
    const { x, y } = this.position(event);
    Object.assign(this.dragged, placed(this.dragged, x, y));
    this.onChange();
  }
}

/** The object moved to (x, y), kept inside the image, with the quadrant its centre is in (questions name it). */
function placed(object: ShapeObject, x: number, y: number): ShapeObject {
  const clamp = (v: number) => Math.min(1 - object.radius, Math.max(object.radius, v));
  const [cx, cy] = [clamp(x), clamp(y)];
  return { ...object, x: cx, y: cy, quadrant: QUADRANTS[(cy < 0.5 ? 0 : 2) + (cx < 0.5 ? 0 : 1)] };
}
