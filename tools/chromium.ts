// tools/chromium.ts — Debian's Chromium (`apt-get install chromium`), headless, as the browser page's test
// (tests/web_test.ts) and benchmark (tools/bench_web.ts) drive it through npm:playwright-core.

import { type Browser, chromium } from "playwright-core";

export const CHROMIUM_PATH = "/usr/bin/chromium";

/**
 * Start headless Chromium for a machine without internet: no sandbox (root in a container), none of the background
 * requests a browser makes at start-up, and WebGPU on (headless Chromium offers it only when asked).
 */
export async function launchChromium(): Promise<Browser> {
  return await chromium.launch({
    executablePath: CHROMIUM_PATH,
    headless: true,
    args: [
      "--no-sandbox",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      "--no-first-run",
      "--enable-unsafe-webgpu",
    ],
  });
}
