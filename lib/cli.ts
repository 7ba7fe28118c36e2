// lib/cli.ts — one flag style for every script: nanoVLM's snake_case (--max_new_tokens), with --max-new-tokens
// accepted too; counts checked the same way everywhere.

/** The arguments with each `--flag-name` spelled `--flag_name` (values are left alone). */
export function snakeCaseFlags(args: string[]): string[] {
  return args.map((arg) =>
    arg.replace(/^--([a-z0-9]+(?:-[a-z0-9]+)+)(?==|$)/, (_, name) => `--${name.replaceAll("-", "_")}`)
  );
}

/** `--name raw` as a count: a whole number of at least `least`, else an Error naming the flag, then `usage`. */
export function wholeNumber(name: string, raw: string | undefined, least: 0 | 1, usage: string): number {
  const n = Number(raw);
  if (!Number.isInteger(n) || n < least) {
    throw new Error(`--${name} ${raw}: expected a ${least === 1 ? "positive " : ""}whole number\n${usage}`);
  }
  return n;
}

/**
 * Run a script's `main` with this process's arguments: an Error becomes one `error: …` line and exit code 1, and a
 * number that `main` returns is the exit code.
 */
export async function runMain(main: (args: string[]) => Promise<unknown>): Promise<void> {
  try {
    const result = await main(Deno.args);
    if (typeof result === "number") Deno.exit(result);
  } catch (e) {
    console.error(`error: ${(e as Error).message}`);
    Deno.exit(1);
  }
}
