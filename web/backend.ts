// web/backend.ts — pick and start the tfjs backend of a browser page or worker: WebGPU when the browser offers an
// adapter, else WebAssembly. The browser's counterpart of backend/runtime.ts's initBackend, which reads Deno's
// environment and loads OpenBLAS through FFI, neither of which a page has; the kernel fixes both register come from
// backend/kernels.ts.

/// <reference lib="dom" />

import * as tf from "@tensorflow/tfjs";
import "@tensorflow/tfjs-backend-webgpu"; // registers the "webgpu" backend with tfjs
import { getThreadsCount, setWasmPaths } from "@tensorflow/tfjs-backend-wasm";
import { fixStartedWebGPUBackend, isSoftwareAdapter, registerKernelFixes } from "../backend/kernels.ts";

/** The backends a page can run on. */
export const BROWSER_BACKENDS = ["webgpu", "wasm"] as const;
/** A backend a page can run on. */
export type BrowserBackend = typeof BROWSER_BACKENDS[number];

/** Which backend started, and how: shown on the page. */
export interface BackendInfo {
  name: BrowserBackend;
  /** One line for the page: the adapter for WebGPU, the threads for wasm. */
  description: string;
}

/** The backend a page's `?backend=webgpu|wasm` asks for, if any; anything else is an Error that lists both. */
export function requestedBackend(search: string): BrowserBackend | undefined {
  const value = new URLSearchParams(search).get("backend");
  if (value === null || value === "") return undefined;
  if (!(BROWSER_BACKENDS as readonly string[]).includes(value)) {
    throw new Error(`?backend=${value}: use one of ${BROWSER_BACKENDS.join(", ")}`);
  }
  return value as BrowserBackend;
}

/**
 * Start `requested`, or the best available: WebGPU when `navigator.gpu` gives a hardware adapter, else wasm (a software
 * adapter, such as headless Chromium's SwiftShader, is slower than wasm: asked for by name, it is used). Asking for
 * WebGPU where there is none is an Error that says so, never a silent fall back.
 */
export async function startBackend(requested?: BrowserBackend): Promise<BackendInfo> {
  const gpu = (navigator as Navigator & { gpu?: GPU }).gpu;
  const adapter = requested === "wasm" ? null : await gpu?.requestAdapter().catch(() => null) ?? null;
  if (requested === "webgpu" && !adapter) {
    throw new Error("WebGPU was asked for (?backend=webgpu), but this browser offers no WebGPU adapter");
  }
  const usable = adapter && (requested === "webgpu" || !isSoftwareAdapter(adapter));
  const name: BrowserBackend = usable ? "webgpu" : "wasm";
  // The wasm binaries are served beside the page (web/serve.ts copies them to wasm/); the path is relative to the
  // script that loads them, the page or the worker, both at the site's root.
  if (name === "wasm") setWasmPaths("wasm/");
  registerKernelFixes(name);
  // setBackend reports a failed start by returning false (after a console warning), not by throwing.
  if (!await tf.setBackend(name)) throw new Error(`the tfjs "${name}" backend failed to start in this browser`);
  await tf.ready();
  if (name === "webgpu") {
    fixStartedWebGPUBackend();
    const { vendor, architecture, description } = adapter!.info;
    return { name, description: `WebGPU (${[vendor, architecture, description].filter(Boolean).join(" ")})` };
  }
  // tfjs picks its multi-threaded wasm build by itself when the page is cross-origin isolated (web/serve.ts sends
  // the COOP and COEP headers that make it so); without isolation there is no SharedArrayBuffer and one thread.
  const threads = getThreadsCount();
  const why = crossOriginIsolated ? "" : " (the page is not cross-origin isolated)";
  const skipped = adapter && !usable ? `; the WebGPU adapter is software (${adapter.info.architecture}), slower` : "";
  return { name, description: `WebAssembly, ${threads} thread${threads === 1 ? "" : "s"}${why}${skipped}` };
}
