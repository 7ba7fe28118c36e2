#!/usr/bin/env bash
# Pack what an offline GPU machine needs to run nanovlm.ts into one archive (about 45 MB, under 64 MiB):
#
#   deno.xz              this machine's Deno binary, xz -9 (96 MB → 30 MB; linux x86-64, glibc ≥ 2.27)
#   bench.js memory.js train.js generate.js eval.js parallel_worker.js
#                        `deno bundle` of each entry point (and of the helper thread that bench and train start on
#                        wasm): our code, tfjs and its WebGPU/WASM backends in one file
#   *.wasm               tfjs' WASM backend (the CPU fallback), found beside the bundles
#   bin/x64-linux.node   imagescript's image codecs, which data.ts loads (the bundler cannot inline them)
#   tokenizers/          the shapes tokenizer (train/generate/eval with the tiny preset)
#   lib/libvulkan.so.1   the Vulkan loader, used only when the machine has none
#   nvidia_icd.json      a Vulkan ICD file for the NVIDIA driver, used only when the machine has none
#   run.sh, README.txt, COMMIT
#
# Usage: tools/pack-gpu.sh [--no-deno] [OUT_DIR]     (default OUT_DIR: .carry, which git ignores)
#   --no-deno   skip the 1-2 minute xz of the Deno binary (tests; or when the GPU machine has Deno 2.9.6)
# On the GPU machine: tar xf nanovlm-gpu.tar && cd nanovlm-gpu && ./run.sh bench --backend webgpu --preset tiny
set -euo pipefail
trap 'echo "pack-gpu.sh: line $LINENO failed: $BASH_COMMAND" >&2' ERR
cd "$(dirname "$0")/.."

with_deno=1
if [ "${1:-}" = "--no-deno" ]; then with_deno=0; shift; fi
out="${1:-.carry}"
pack="$out/nanovlm-gpu"
rm -rf "$pack" "$out/nanovlm-gpu.tar"
mkdir -p "$pack/bin" "$pack/lib"

# deno bundle cannot inline Node-API addons (imagescript's codecs), so they stay `require`s. The prelude gives the
# bundle what an npm package has on disk: `require`, `__dirname` and `__filename` (tfjs' WASM backend looks for its
# .wasm files in __dirname).
prelude='import { createRequire as nanovlmRequire } from "node:module";
globalThis.require ??= nanovlmRequire(import.meta.url);
globalThis.__filename ??= new URL(import.meta.url).pathname;
globalThis.__dirname ??= new URL(".", import.meta.url).pathname;'
for source in tools/bench.ts tools/memory.ts train.ts generate.ts lib/eval.ts backend/parallel_worker.ts; do
  entry="$(basename "$source" .ts)"
  deno bundle --quiet --platform deno --minify --external '*.node' -o "$pack/$entry.body.js" "$source"
  { printf '%s\n' "$prelude"; cat "$pack/$entry.body.js"; } > "$pack/$entry.js"
  rm "$pack/$entry.body.js"
done

# Files that live in npm packages: ask Deno where its cache put them.
package_dir() {
  deno eval "import { createRequire } from 'node:module'; import { dirname } from 'node:path';
    console.log(dirname(createRequire('$PWD/').resolve('$1')))"
}
wasm_dir="$(package_dir @tensorflow/tfjs-backend-wasm)"
cp "$wasm_dir"/tfjs-backend-wasm.wasm "$wasm_dir"/tfjs-backend-wasm-simd.wasm "$pack/"
codecs="$(package_dir imagescript)/codecs/node/bin/x64-linux.node"
cp "$codecs" "$pack/bin/"
cp -r tokenizers "$pack/"
# awk and grep read ldconfig's whole listing (no `exit`, no `grep -q`): its ~64 KB fill a pipe, so a reader that
# stops early kills ldconfig with SIGPIPE, and pipefail turns that into a silent failure of this script.
loader="$(ldconfig -p 2>/dev/null | awk '/libvulkan\.so\.1 .*x86-64/ && !found { print $NF; found = 1 }' || true)"
if [ -n "$loader" ]; then cp -L "$loader" "$pack/lib/libvulkan.so.1"; fi
cat > "$pack/nvidia_icd.json" <<'EOF'
{ "file_format_version": "1.0.0", "ICD": { "library_path": "libGLX_nvidia.so.0", "api_version": "1.3.0" } }
EOF
commit="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then commit="$commit+"; fi
echo "$commit" > "$pack/COMMIT"

cat > "$pack/run.sh" <<'EOF'
#!/usr/bin/env bash
# ./run.sh bench|memory|train|generate|eval [flags]: run an entry point of nanovlm.ts from this folder, offline.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
deno="$here/deno"
if [ ! -x "$deno" ]; then
  if [ -f "$here/deno.xz" ]; then xz -dc "$here/deno.xz" > "$deno" && chmod +x "$deno"; else deno="$(command -v deno)"; fi
fi
export DENO_DIR="${DENO_DIR:-$here/.deno}" NANOVLM_COMMIT="${NANOVLM_COMMIT:-$(cat "$here/COMMIT")}"
# The Vulkan loader wants a private runtime dir; without one it prints harmless warnings.
if [ -z "${XDG_RUNTIME_DIR:-}" ]; then export XDG_RUNTIME_DIR="$here/.xdg"; mkdir -p -m 700 "$XDG_RUNTIME_DIR"; fi
# Deno reaches the GPU through the Vulkan loader and the driver's ICD file; supply either if the machine lacks it.
if ! ldconfig -p 2>/dev/null | grep 'libvulkan\.so\.1 ' >/dev/null; then export LD_LIBRARY_PATH="$here/lib:${LD_LIBRARY_PATH:-}"; fi
if [ -z "${VK_ICD_FILENAMES:-}" ] && ! ls /usr/share/vulkan/icd.d/nvidia* /etc/vulkan/icd.d/nvidia* >/dev/null 2>&1 &&
  ldconfig -p 2>/dev/null | grep libGLX_nvidia.so.0 >/dev/null; then
  export VK_ICD_FILENAMES="$here/nvidia_icd.json"
fi
command="${1:?usage: ./run.sh bench|memory|train|generate|eval [flags]}"
shift
exec "$deno" run -A --no-remote --no-npm "$here/$command.js" "$@"
EOF
chmod +x "$pack/run.sh"

cat > "$pack/README.txt" <<'EOF'
nanovlm.ts for an offline GPU machine (linux x86-64). Everything runs from this folder; nothing is downloaded.

  ./run.sh bench --preset tiny --backend webgpu --batch 1 --steps 1    # 1. the GPU works: adapter, limits, GFLOP/s
  ./run.sh bench --preset nanovlm-222m --backend webgpu --batch 1,8,32 # 2. the numbers for BENCHMARKS.md
  ./run.sh memory --preset nanovlm-222m --backend webgpu               # 3. peak memory by batch size
  ./run.sh train --preset=tiny --backend=webgpu                        # train the tiny preset on the shapes world

bench appends its rows to bench-results.jsonl: bring that file back. If `--backend webgpu` finds no adapter:
  - the NVIDIA driver's Vulkan ICD must exist: /usr/share/vulkan/icd.d/nvidia_icd.json, or run.sh points
    VK_ICD_FILENAMES at nvidia_icd.json here (it needs libGLX_nvidia.so.0 from the driver);
  - `DENO_WEBGPU_BACKEND=gl ./run.sh ...` tries OpenGL instead of Vulkan;
  - `--backend wasm` always works (on the CPU).
EOF

if [ "$with_deno" = 1 ]; then
  xz -9 -T0 -c "$(readlink -f "$(command -v deno)")" > "$pack/deno.xz"
fi
tar -C "$out" -cf "$out/nanovlm-gpu.tar" nanovlm-gpu
du -sh "$out/nanovlm-gpu.tar" | sed 's/\t/  /'
