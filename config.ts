// config.ts — the model's configuration: every field of nanoVLM's VLMConfig (models/config.py) with its defaults, the
// named presets, the checks a config must pass, and the list of parameters a config implies. nanovlm.ts builds the
// model from these; lib/checkpoint.ts reads and writes them.

// ---- Configuration and presets ----------------------------------------------------------

/** SmolLM2's ChatML chat template (the reference's `lm_chat_template`). */
export const CHATML_TEMPLATE =
  "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

// Every field of the reference's VLMConfig (models/config.py), in its order, with its defaults at 8374ce1.
const defaults = {
  vit_hidden_dim: 768, // Dv
  vit_inter_dim: 3072, // ViT MLP width
  vit_patch_size: 16, // P: the patch embedding's kernel and stride
  vit_img_size: 256, // S: images are resized to S×S
  vit_n_heads: 12,
  vit_dropout: 0.0, // kept for config compatibility; must be 0 here
  vit_n_blocks: 12,
  vit_ln_eps: 1e-6,
  vit_cls_flag: false, // the CLS path gives one pooled vector the projector cannot use; must be false
  vit_model_type: "google/siglip2-base-patch16-256", // Hugging Face repo of the vision backbone
  lm_hidden_dim: 576, // D
  lm_inter_dim: 1536, // SwiGLU width F
  lm_rms_eps: 1e-5,
  lm_re_base: 100000, // RoPE base θ
  lm_max_position_embeddings: 8192, // RoPE's "original max": dynamic scaling beyond it
  lm_base_vocab_size: 49152, // the tokenizer's vocabulary; `<|image|>` gets this id
  extra_token_amount: 1, // added special tokens (the image token)
  lm_vocab_size: 49153, // lm_base_vocab_size + extra_token_amount
  lm_n_heads: 9, // H
  lm_n_kv_heads: 3, // KV
  lm_dropout: 0.0, // must be 0 here
  lm_n_blocks: 30,
  lm_attn_scaling: 1.0, // multiplies RoPE cos and sin
  lm_max_length: 1024, // the context: longest sequence for training and generation
  lm_use_tokens: false, // the reference's LM-only mode; the VLM always feeds embeddings
  lm_tie_weights: true, // the output head reuses the token embedding
  lm_model_type: "HuggingFaceTB/SmolLM2-360M-Instruct", // Hugging Face repo of the language backbone
  lm_tokenizer: "HuggingFaceTB/SmolLM2-360M-Instruct",
  lm_chat_template: CHATML_TEMPLATE,
  mp_pixel_shuffle_factor: 2, // s
  mp_image_token_length: 64, // L = (S/P/s)²
  vlm_extra_tokens: { image_token: "<|image|>" } as Record<string, string>,
  vlm_load_backbone_weights: true,
  vlm_checkpoint_path: "checkpoints",
  hf_repo_name: "nanoVLM",
  // Ours, not the reference's: feed the ViT (x − 0.5) / 0.5 as SigLIP's processor does, instead of [0, 1]. Off for
  // nanoVLM's checkpoints; config.json carries it only when on, so nanoVLM's loader reads the rest unchanged.
  vit_img_normalize: false,
};

/** The model's configuration: every field of the reference's `VLMConfig`, same names. */
export type VLMConfig = typeof defaults;

/** The reference's defaults at 8374ce1. */
export const DEFAULT_CONFIG: Readonly<VLMConfig> = Object.freeze(defaults);

/** Named configurations. `tiny` is ours: a model that learns the built-in shapes world on a laptop CPU. */
export const PRESETS: Readonly<Record<string, Readonly<VLMConfig>>> = Object.freeze({
  // The README's model: SigLIP-B/16-224 + SmolLM2-135M, 49 image tokens, 222,082,176 parameters.
  "nanovlm-222m": Object.freeze({
    ...DEFAULT_CONFIG,
    vit_model_type: "google/siglip-base-patch16-224",
    vit_img_size: 224,
    mp_image_token_length: 49,
    lm_model_type: "HuggingFaceTB/SmolLM2-135M",
    lm_tokenizer: "HuggingFaceTB/SmolLM2-135M",
  }),
  // What the 8374ce1 defaults become once the backbones' configs are read: 450,614,400 parameters.
  "nanovlm-450m": Object.freeze({
    ...DEFAULT_CONFIG,
    lm_hidden_dim: 960,
    lm_inter_dim: 2560,
    lm_n_heads: 15,
    lm_n_kv_heads: 5,
    lm_n_blocks: 32,
  }),
  tiny: Object.freeze({
    ...DEFAULT_CONFIG,
    vit_hidden_dim: 96,
    vit_inter_dim: 384,
    vit_patch_size: 16,
    vit_img_size: 64,
    vit_n_heads: 4,
    vit_n_blocks: 2,
    vit_model_type: "none",
    lm_hidden_dim: 128,
    lm_inter_dim: 384,
    lm_n_heads: 4,
    lm_n_kv_heads: 4, // one key/value head per query head: grouped in pairs, this decoder learned its look-ups later
    lm_n_blocks: 3,
    lm_base_vocab_size: 88,
    lm_vocab_size: 89,
    lm_max_length: 96,
    lm_model_type: "none",
    lm_tokenizer: "tokenizers/shapes",
    mp_image_token_length: 4,
    vlm_load_backbone_weights: false,
    hf_repo_name: "nanoVLM-tiny",
    vit_img_normalize: true, // backgrounds of every colour: centred inputs (docs/training-the-shapes-world.md)
  }),
});

/** Check that a config describes a model this file can build; the error names the field and the fix. */
export function validateConfig(cfg: VLMConfig): void {
  const { vit_img_size: S, vit_patch_size: P, mp_pixel_shuffle_factor: s, lm_hidden_dim: D, lm_n_heads: H } = cfg;
  const G = S / P, L = (G / s) ** 2;
  const rules: [boolean, string][] = [
    [S % P === 0, `vit_img_size ${S} is not a multiple of vit_patch_size ${P}`],
    [G % s === 0, `the ${G}×${G} patch grid is not divisible by mp_pixel_shuffle_factor ${s}`],
    [cfg.mp_image_token_length === L, `mp_image_token_length is ${cfg.mp_image_token_length}, (S/P/s)² is ${L}`],
    [cfg.vit_hidden_dim % cfg.vit_n_heads === 0, "vit_hidden_dim must be a multiple of vit_n_heads"],
    [D % H === 0 && (D / H) % 2 === 0, "lm_hidden_dim / lm_n_heads must be a whole, even head size (RoPE)"],
    [H % cfg.lm_n_kv_heads === 0, "lm_n_heads must be a multiple of lm_n_kv_heads"],
    [cfg.lm_vocab_size > cfg.lm_base_vocab_size, "lm_vocab_size leaves no row for <|image|> (id lm_base_vocab_size)"],
    [!cfg.vit_cls_flag, "vit_cls_flag=true gives a pooled vector the projector cannot use"],
    [cfg.vit_dropout === 0 && cfg.lm_dropout === 0, "dropout is not implemented; set it to 0"],
  ];
  for (const [ok, problem] of rules) if (!ok) throw new Error(`invalid config: ${problem}`);
}

// ---- Parameters -----------------------------------------------------------------------
//
// Parameters live in one Map keyed by the reference's state-dict names, so a reader can look any of them up in the
// PyTorch code. Two layouts differ from PyTorch: a Linear weight is stored [in, out] so `x · W` is one plain 2-D matMul,
// and the patch-embedding conv weight [Dv, 3, P, P] is stored flattened as [3·P·P, Dv] because we patchify + matMul
// instead of convolving. lib/checkpoint.ts converts to PyTorch's layouts when it reads and writes files.

/** How a parameter is stored in PyTorch relative to ours: transposed (linear), a flattened conv, or the same. */
export type Layout = "linear" | "conv" | "plain";
type Init = "normal" | "zeros" | "ones" | "uniform";
/** One parameter: its nanoVLM name, our shape, PyTorch's layout, and how the reference initialises it. */
export type ParamSpec = { name: string; shape: number[]; layout: Layout; init: Init };

/** Every parameter of the model: name, our shape, how PyTorch lays it out, and how the reference initialises it. */
export function parameterSpecs(cfg: VLMConfig): ParamSpec[] {
  const Dv = cfg.vit_hidden_dim, D = cfg.lm_hidden_dim, P = cfg.vit_patch_size;
  const Np = (cfg.vit_img_size / P) ** 2;
  const kvWidth = (D / cfg.lm_n_heads) * cfg.lm_n_kv_heads;
  const specs: ParamSpec[] = [];
  const add = (name: string, shape: number[], layout: Layout, init: Init) => specs.push({ name, shape, layout, init });
  const linear = (name: string, nIn: number, nOut: number, bias: boolean) => {
    add(`${name}.weight`, [nIn, nOut], "linear", "normal");
    if (bias) add(`${name}.bias`, [nOut], "plain", "zeros");
  };
  const norm = (name: string, width: number, bias: boolean) => {
    add(`${name}.weight`, [width], "plain", "ones");
    if (bias) add(`${name}.bias`, [width], "plain", "zeros");
  };

  add("vision_encoder.patch_embedding.position_embedding", [1, Np, Dv], "plain", "uniform");
  add("vision_encoder.patch_embedding.conv.weight", [3 * P * P, Dv], "conv", "normal");
  add("vision_encoder.patch_embedding.conv.bias", [Dv], "plain", "zeros");
  for (let i = 0; i < cfg.vit_n_blocks; i++) {
    const b = `vision_encoder.blocks.${i}`;
    norm(`${b}.ln1`, Dv, true);
    linear(`${b}.attn.qkv_proj`, Dv, 3 * Dv, true);
    linear(`${b}.attn.out_proj`, Dv, Dv, true);
    norm(`${b}.ln2`, Dv, true);
    linear(`${b}.mlp.fc1`, Dv, cfg.vit_inter_dim, true);
    linear(`${b}.mlp.fc2`, cfg.vit_inter_dim, Dv, true);
  }
  norm("vision_encoder.layer_norm", Dv, true);

  add("decoder.token_embedding.weight", [cfg.lm_vocab_size, D], "plain", "normal");
  for (let i = 0; i < cfg.lm_n_blocks; i++) {
    const b = `decoder.blocks.${i}`;
    linear(`${b}.mlp.gate_proj`, D, cfg.lm_inter_dim, false);
    linear(`${b}.mlp.up_proj`, D, cfg.lm_inter_dim, false);
    linear(`${b}.mlp.down_proj`, cfg.lm_inter_dim, D, false);
    linear(`${b}.attn.q_proj`, D, D, false);
    linear(`${b}.attn.k_proj`, D, kvWidth, false);
    linear(`${b}.attn.v_proj`, D, kvWidth, false);
    linear(`${b}.attn.out_proj`, D, D, false);
    norm(`${b}.norm1`, D, false);
    norm(`${b}.norm2`, D, false);
  }
  norm("decoder.norm", D, false);
  // A tied head is the token embedding itself; an untied one is a separate [V, D] matrix.
  if (!cfg.lm_tie_weights) add("decoder.head.weight", [cfg.lm_vocab_size, D], "plain", "normal");

  linear("MP.proj", cfg.mp_pixel_shuffle_factor ** 2 * Dv, D, false);
  return specs;
}
