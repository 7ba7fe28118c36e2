"""The PyTorch side of BENCHMARKS.md's CPU comparison: the same model shapes as bench.ts,
timed the same way, so both can run side by side on one machine.

A compact re-statement of nanoVLM's architecture (8374ce1: models/vision_transformer.py,
modality_projector.py, language_model.py, vision_language_model.py): ViT
(conv patch embedding, pre-LayerNorm blocks, fused qkv, tanh-GELU), pixel-shuffle
projector, Llama decoder (RMSNorm, RoPE, grouped-query attention by repeat_interleave,
SwiGLU, tied head), cross-entropy with -100, AdamW. PyTorch 1.13 (Debian's python3-torch)
has no scaled_dot_product_attention, so attention is written out as nanoVLM's fallback does.
Random weights and tokens: speed does not depend on values.

    LD_LIBRARY_PATH=/usr/lib/x86_64-linux-gnu/openblas-openmp \
        /usr/bin/python3 tools/bench_torch.py --preset cpu-5m --batch 8,32 --threads 2
    LD_LIBRARY_PATH=/usr/lib/x86_64-linux-gnu/openblas-openmp \
        /usr/bin/python3 tools/bench_torch.py --preset nanovlm-222m --batch 1 --threads 2
"""

import argparse
import math
import resource
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

PRESETS = {  # the fields bench.ts's BENCH_CONFIGS use, and T
    "cpu-5m": dict(vit_dim=192, vit_inter=768, patch=8, img=64, vit_heads=3, vit_blocks=4, shuffle=2,
                   dim=256, inter=768, heads=4, kv_heads=2, blocks=4, vocab=512, seq=96),
    "nanovlm-222m": dict(vit_dim=768, vit_inter=3072, patch=16, img=224, vit_heads=12, vit_blocks=12, shuffle=2,
                         dim=576, inter=1536, heads=9, kv_heads=3, blocks=30, vocab=49153, seq=128),
}


class ViTBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        d = c["vit_dim"]
        self.heads = c["vit_heads"]
        self.ln1, self.ln2 = nn.LayerNorm(d, eps=1e-6), nn.LayerNorm(d, eps=1e-6)
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, c["vit_inter"]), nn.Linear(c["vit_inter"], d)

    def forward(self, x):
        B, N, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(D // self.heads)
        x = x + self.out((att.softmax(-1) @ v).transpose(1, 2).reshape(B, N, D))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x)), approximate="tanh"))


class RMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * self.weight


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class LMBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        d, self.h, self.kv = c["dim"], c["heads"], c["kv_heads"]
        hd = d // self.h
        self.norm1, self.norm2 = RMSNorm(d), RMSNorm(d)
        self.q, self.k = nn.Linear(d, d, bias=False), nn.Linear(d, self.kv * hd, bias=False)
        self.v, self.o = nn.Linear(d, self.kv * hd, bias=False), nn.Linear(d, d, bias=False)
        self.gate, self.up = nn.Linear(d, c["inter"], bias=False), nn.Linear(d, c["inter"], bias=False)
        self.down = nn.Linear(c["inter"], d, bias=False)

    def forward(self, x, cos, sin, cache=None):
        B, T, D = x.shape
        hd = D // self.h
        h = self.norm1(x)
        q = self.q(h).view(B, T, self.h, hd).transpose(1, 2)
        k = self.k(h).view(B, T, self.kv, hd).transpose(1, 2)
        v = self.v(h).view(B, T, self.kv, hd).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
        new_cache = (k, v)
        k, v = k.repeat_interleave(self.h // self.kv, 1), v.repeat_interleave(self.h // self.kv, 1)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(hd)
        if T > 1:
            att = att.masked_fill(torch.ones(T, k.shape[2], dtype=torch.bool).triu(1 + k.shape[2] - T), float("-inf"))
        x = x + self.o((att.softmax(-1) @ v).transpose(1, 2).reshape(B, T, D))
        h = self.norm2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h)), new_cache


class VLM(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        n = (c["img"] // c["patch"]) ** 2
        self.patch = nn.Conv2d(3, c["vit_dim"], c["patch"], c["patch"])
        self.pos = nn.Parameter(torch.rand(1, n, c["vit_dim"]))
        self.vit = nn.ModuleList(ViTBlock(c) for _ in range(c["vit_blocks"]))
        self.vit_ln = nn.LayerNorm(c["vit_dim"], eps=1e-6)
        self.proj = nn.Linear(c["vit_dim"] * c["shuffle"] ** 2, c["dim"], bias=False)
        self.embed = nn.Embedding(c["vocab"], c["dim"])
        self.blocks = nn.ModuleList(LMBlock(c) for _ in range(c["blocks"]))
        self.norm = RMSNorm(c["dim"])
        hd = c["dim"] // c["heads"]
        self.register_buffer("inv_freq", 1.0 / (100000 ** (torch.arange(0, hd, 2).float() / hd)))

    def image_tokens(self, images):
        x = self.patch(images).flatten(2).transpose(1, 2) + self.pos
        for block in self.vit:
            x = block(x)
        x = self.vit_ln(x)
        B, N, D = x.shape
        s, g = self.c["shuffle"], int(math.isqrt(N))
        x = x.reshape(B, g // s, s, g // s, s, D).permute(0, 1, 3, 2, 4, 5).reshape(B, N // s**2, s * s * D)
        return self.proj(x)

    def decode(self, x, start=0, cache=None):
        pos = torch.arange(start, start + x.shape[1]).float()
        freqs = torch.outer(pos, self.inv_freq)
        emb = torch.cat([freqs, freqs], -1)
        cos, sin = emb.cos(), emb.sin()
        caches = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, cos, sin, None if cache is None else cache[i])
            caches.append(kv)
        return self.norm(x), caches

    def forward(self, ids, images, targets):
        x = self.embed(ids).clone()
        L = self.c["img"] // self.c["patch"] // self.c["shuffle"]
        x[:, : L * L] = self.image_tokens(images)  # the image slots are the first L² tokens, as in bench.ts
        h, _ = self.decode(x)
        logits = h @ self.embed.weight.T
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


def median_ms(fn, steps, warmup):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="cpu-5m", choices=PRESETS)
    parser.add_argument("--batch", default="8")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--no-train", action="store_true", help="forward + backward only (no AdamW step)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    c = PRESETS[args.preset]
    model = VLM(c)
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    L = (c["img"] // c["patch"] // c["shuffle"]) ** 2
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads | {args.preset}: {params:,} parameters, T {c['seq']}")
    print("| config | B | T | train step ms | samples/s | fwd ms | fwd+bwd ms | TTFT ms | decode tok/s | peak RSS MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for B in (int(b) for b in args.batch.split(",")):
        ids = torch.randint(0, c["vocab"] - 1, (B, c["seq"]))
        targets = torch.randint(0, c["vocab"] - 1, (B, c["seq"]))
        targets[:, :L] = -100
        targets[:, -1] = -100
        images = torch.rand(B, 3, c["img"], c["img"]) * 2 - 1

        def forward():
            with torch.no_grad():
                model(ids, images, targets).item()

        def forward_backward():
            optimizer.zero_grad(set_to_none=True)
            model(ids, images, targets).backward()

        def step():
            forward_backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()

        fwd = median_ms(forward, args.steps, args.warmup)
        fwd_bwd = median_ms(forward_backward, args.steps, args.warmup)
        train = None if args.no_train else median_ms(step, args.steps, args.warmup)
        ttft, tps = generate(model, c, B, L, args.new_tokens, args.steps, args.warmup)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        cells = [args.preset, B, c["seq"], "—" if train is None else f"{train:,.0f}",
                 "—" if train is None else f"{1000 * B / train:.1f}", f"{fwd:,.0f}", f"{fwd_bwd:,.0f}",
                 f"{ttft:,.0f}", f"{tps:.1f}", f"{rss:,.0f}"]
        print("| " + " | ".join(str(x) for x in cells) + " |")


@torch.no_grad()
def generate(model, c, B, L, new_tokens, steps, warmup):
    """Greedy decoding with a KV cache after a prompt of L image tokens + 16 text tokens, as bench.ts:
    `warmup` whole generations, then the median of `steps` for time to first token and for tokens/s."""
    ids = torch.randint(0, c["vocab"] - 1, (B, L + 16))
    images = torch.rand(B, 3, c["img"], c["img"]) * 2 - 1

    def run(n):
        start = time.perf_counter()
        x = model.embed(ids).clone()
        x[:, :L] = model.image_tokens(images)
        h, cache = model.decode(x)
        times = []
        for step in range(n):
            nxt = (h[:, -1] @ model.embed.weight.T).argmax(-1)
            times.append(time.perf_counter())
            if step == n - 1:
                break
            h, cache = model.decode(model.embed(nxt[:, None]), ids.shape[1] + step, cache)
        return (times[0] - start) * 1000, B * (n - 1) / (times[-1] - times[0])

    for _ in range(warmup):
        run(new_tokens)
    runs = [run(new_tokens) for _ in range(steps)]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


if __name__ == "__main__":
    main()
