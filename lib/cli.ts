// lib/cli.ts — one flag style for every script: nanoVLM's snake_case (--max_new_tokens), with --max-new-tokens
// accepted too.

/** The arguments with each `--flag-name` spelled `--flag_name` (values are left alone). */
export function snakeCaseFlags(args: string[]): string[] {
  return args.map((arg) =>
    arg.replace(/^--([a-z0-9]+(?:-[a-z0-9]+)+)(?==|$)/, (_, name) => `--${name.replaceAll("-", "_")}`)
  );
}
