// lib/files.ts — small file helpers shared by the scripts and libraries.

/** Whether `path` exists and is a file. */
export async function fileExists(path: string): Promise<boolean> {
  return await Deno.stat(path).then((s) => s.isFile, () => false);
}

/** Whether `path` exists and is a folder. */
export async function isDirectory(path: string): Promise<boolean> {
  return await Deno.stat(path).then((s) => s.isDirectory, () => false);
}

/** Whether `path` exists (a file or a folder), synchronously: for looking up paths, not in a loop. */
export function pathExistsSync(path: string): boolean {
  try {
    Deno.statSync(path);
    return true;
  } catch {
    return false;
  }
}

/**
 * Write `content` to `path` atomically: write `${path}.tmp-<random>` in the same folder, then rename it over the
 * target. A rename within one filesystem is atomic, so readers see the old file or the new one, never half of one.
 */
export async function writeFileAtomic(path: string, content: Uint8Array | string): Promise<void> {
  const temporary = `${path}.tmp-${crypto.randomUUID().slice(0, 8)}`;
  try {
    if (typeof content === "string") await Deno.writeTextFile(temporary, content);
    else await Deno.writeFile(temporary, content);
    await Deno.rename(temporary, path);
  } catch (e) {
    await Deno.remove(temporary).catch(() => {});
    throw e;
  }
}
