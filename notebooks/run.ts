// notebooks/run.ts — execute every notebook headless with Deno's Jupyter kernel, in
// reading order, and fail if any cell fails or any notebook takes longer than its budget.
//
//   deno task notebooks                      all of them, executed copies in a temporary folder
//   deno task notebooks 03 07                the notebooks whose names start with 03 or 07
//   deno task notebooks --out=runs/executed  keep the executed copies (with their pictures) there
//   deno task notebooks --budget=120         seconds per notebook (default 120)
//   deno task notebooks --clean              make the notebooks commit-ready instead (see cleanNotebook)
//
// It runs Debian's `jupyter nbconvert --execute` (apt-get install jupyter-nbconvert
// jupyter-client) with the kernelspec committed in notebooks/kernels/deno (JUPYTER_PATH
// points here), so nothing is installed into the user's Jupyter. The committed notebooks
// are never modified: executed copies go to the output folder.

import { parseArgs } from "node:util";

const NOTEBOOKS = new URL(".", import.meta.url).pathname.replace(/\/$/, "");

/** The notebooks in reading order: `NN-name.ipynb` in this folder. */
export async function listNotebooks(dir = NOTEBOOKS): Promise<string[]> {
  const names: string[] = [];
  for await (const entry of Deno.readDir(dir)) {
    if (entry.isFile && /^\d\d-.*\.ipynb$/.test(entry.name)) names.push(entry.name);
  }
  return names.sort();
}

/** A notebook's JSON, as far as this file reads it. */
interface Notebook {
  cells: { cell_type: string; source: string | string[]; outputs?: unknown[]; execution_count?: number | null }[];
  [key: string]: unknown;
}

/**
 * A notebook made commit-ready: no outputs, no execution counts, and every cell's source
 * ending with a newline. The last is for `deno fmt`: in Deno 2.9.6 `deno fmt --check`
 * flags a cell whose source lacks the final newline, although `deno fmt` itself leaves
 * it so; with the newline both agree that the file is formatted.
 */
export function cleanNotebook(nb: Notebook): Notebook {
  const cells = nb.cells.map((cell) => {
    const lines = Array.isArray(cell.source) ? [...cell.source] : cell.source.split(/(?<=\n)/);
    if (lines.length && !lines[lines.length - 1].endsWith("\n")) lines[lines.length - 1] += "\n";
    return cell.cell_type === "code"
      ? { ...cell, source: lines, outputs: [], execution_count: null }
      : { ...cell, source: lines };
  });
  return { ...nb, cells };
}

/** JSON as Jupyter writes notebooks: keys sorted, one-space indent, a final newline. */
export function notebookJson(nb: Notebook): string {
  const sorted = (value: unknown): unknown =>
    Array.isArray(value)
      ? value.map(sorted)
      : value && typeof value === "object"
      ? Object.fromEntries(Object.keys(value).sort().map((k) => [k, sorted((value as Record<string, unknown>)[k])]))
      : value;
  return JSON.stringify(sorted(nb), null, 1) + "\n";
}

async function clean(names: string[]): Promise<void> {
  const paths = names.map((name) => `${NOTEBOOKS}/${name}`);
  const rewrite = async () => {
    for (const path of paths) {
      await Deno.writeTextFile(path, notebookJson(cleanNotebook(JSON.parse(await Deno.readTextFile(path)))));
    }
  };
  // deno fmt re-wraps markdown and drops a cell's final newline when it changes the cell, so: clean, format,
  // then put the newlines back (formatting an already formatted cell keeps them).
  await rewrite();
  const fmt = await new Deno.Command(Deno.execPath(), { args: ["fmt", "--quiet", ...paths], cwd: NOTEBOOKS }).output();
  if (!fmt.success) throw new Error("deno fmt failed on the notebooks");
  await rewrite();
  console.log(`cleaned and formatted ${names.join(", ")}`);
}

/** What one execution gave. */
interface Result {
  name: string;
  seconds: number;
  ok: boolean;
  problem: string;
}

async function execute(name: string, outDir: string, budget: number): Promise<Result> {
  const start = performance.now();
  const child = new Deno.Command("jupyter", {
    args: [
      "nbconvert",
      "--to=notebook",
      "--execute",
      `--output-dir=${outDir}`,
      `--ExecutePreprocessor.timeout=${budget}`, // per cell; the whole notebook is checked below
      "--ExecutePreprocessor.kernel_name=deno",
      name,
    ],
    cwd: NOTEBOOKS, // the kernel starts in the notebook's folder: `../nanovlm.ts` and `../deno.json` resolve
    env: { JUPYTER_PATH: [NOTEBOOKS, Deno.env.get("JUPYTER_PATH")].filter(Boolean).join(":") },
    stdout: "null",
    stderr: "piped",
  }).spawn();
  // A hung kernel must not hang CI. nbclient's per-cell timeout normally fires first; past 3× the budget we
  // interrupt nbconvert (SIGINT lets it shut its kernel down), and kill it 15 s later if it is still there.
  let killed = false;
  const interrupt = setTimeout(() => {
    killed = true;
    child.kill("SIGINT");
  }, 3 * budget * 1000);
  const kill = setTimeout(() => child.kill("SIGKILL"), 3 * budget * 1000 + 15_000);
  const stderrText = new Response(child.stderr).text();
  const status = await child.status;
  clearTimeout(interrupt);
  clearTimeout(kill);
  // An orphaned kernel could keep the pipe open: wait for the rest of stderr only briefly.
  const stderr = await Promise.race([stderrText, new Promise<string>((r) => setTimeout(() => r(""), 5000))]);
  const seconds = (performance.now() - start) / 1000;
  if (killed) return { name, seconds, ok: false, problem: `stopped after ${seconds.toFixed(0)} s (3× the budget)` };
  if (!status.success) {
    // nbclient prints the failing cell and its error after "An error occurred…"; show that part.
    const at = stderr.indexOf("An error occurred while executing the following cell");
    return { name, seconds, ok: false, problem: (at >= 0 ? stderr.slice(at) : stderr).trim().slice(-4000) };
  }
  if (seconds > budget) {
    return { name, seconds, ok: false, problem: `took ${seconds.toFixed(1)} s, over the budget of ${budget} s` };
  }
  return { name, seconds, ok: true, problem: "" };
}

async function main(args: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args,
    options: { out: { type: "string" }, budget: { type: "string", default: "120" }, clean: { type: "boolean" } },
    allowPositionals: true,
  });
  const all = await listNotebooks();
  const chosen = positionals.length ? all.filter((n) => positionals.some((p) => n.startsWith(p))) : all;
  if (chosen.length === 0) throw new Error(`no notebook matches ${positionals.join(" ")}; there are ${all.join(", ")}`);
  if (values.clean) {
    await clean(chosen);
    return 0;
  }
  const budget = Number(values.budget);
  if (!(budget > 0)) throw new Error(`--budget must be a positive number of seconds, got ${values.budget}`);
  try {
    await new Deno.Command("jupyter", { args: ["nbconvert", "--version"], stdout: "null", stderr: "null" }).output();
  } catch {
    console.error(
      "jupyter nbconvert was not found. On Debian/Ubuntu: apt-get install jupyter-nbconvert jupyter-client; " +
        "elsewhere: pip install nbconvert jupyter-client.",
    );
    return 1;
  }
  const outDir = values.out ? await Deno.realPath(await mkdirp(values.out)) : await Deno.makeTempDir({ prefix: "nb-" });

  const keep = values.out ? ` → ${outDir}` : " (--out=dir keeps the executed copies)";
  console.log(`executing ${chosen.length} notebooks with the Deno kernel (budget ${budget} s each)${keep}`);
  const results: Result[] = [];
  for (const name of chosen) {
    const result = await execute(name, outDir, budget);
    results.push(result);
    console.log(`${result.ok ? "ok  " : "FAIL"} ${name.padEnd(32)} ${result.seconds.toFixed(1).padStart(6)} s`);
    if (!result.ok) console.log(result.problem.replace(/^/gm, "     | "));
  }
  if (!values.out) await Deno.remove(outDir, { recursive: true }); // nobody asked for the executed copies
  const failed = results.filter((r) => !r.ok);
  const total = results.reduce((s, r) => s + r.seconds, 0);
  console.log(
    `${results.length - failed.length}/${results.length} notebooks ran, ${total.toFixed(0)} s in all` +
      (failed.length ? `; failed: ${failed.map((r) => r.name).join(", ")}` : ""),
  );
  return failed.length ? 1 : 0;
}

async function mkdirp(dir: string): Promise<string> {
  await Deno.mkdir(dir, { recursive: true });
  return dir;
}

if (import.meta.main) Deno.exit(await main(Deno.args));
