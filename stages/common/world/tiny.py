"""The embedded tiny Qwen3-VL (`--ckpt tiny`), Qwen3-VL-MoE (`--ckpt tiny-moe`) and real-interface Qwen3-VL
(`--ckpt tiny-qwen`).

Real architectures, real processor, random weights: a fresh machine with no model hub runs every stage
for real on them. Everything is built from fixed seeds (tokenizer corpus, weights), so two machines
build the same bytes; the result is cached under $PRISM_HOME/tiny (default ~/.cache/prism/tiny).

The tokenizer is a byte-level BPE trained here with Qwen2's pre-tokenizer, plus Qwen's special tokens
and the protocol tags as single tokens. The chat template follows Qwen's shape and wraps assistant
turns in {% generation %} markers, so `return_assistant_tokens_mask=True` gives the exact label mask.
A 64x64 image becomes an 8x8 grid of 8-pixel patches, merged 2x2 into 16 <|image_pad|> tokens.

`tiny-qwen` has tiny widths but every interface of a real Qwen3-VL checkpoint: the real tokenizer (Qwen2's
151,643-token BPE + Qwen3-VL's added tokens, stages.common.world.qwen_vocab), the stock Qwen3-VL chat template (no
{% generation %} markers, no default system prompt), the real processor geometry (16-pixel patches, temporal
patch 2, merge 2: a 64x64 image is 2x2 merged tokens), a 151,936-row embedding table tied to the LM head, and
Qwen3-VL's generation config eos list. Only the pixel bounds are kept small (real: 65,536..16,777,216 pixels)
so that CPU tests stay fast. It tests every place where real checkpoints differ from `tiny`: protocol tags are
several BPE pieces merged into their neighbours, and the template marks no assistant tokens.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

from stages.common.world import seeing_recipe

# Bump when anything below changes what is built: it keys the cache.
TINY_BUILD_VERSION = "1"
NAMES = ("tiny", "tiny-moe", "tiny-qwen")

SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
                  "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
PROTOCOL_TOKENS = ["<caption>", "</caption>", "<think>", "</think>", "<answer>", "</answer>"]

QWEN2_PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                           r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}{%- generation -%}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}{%- if 'text' in part -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>' -}}{%- endgeneration -%}{{- '\\n' -}}"
    "{%- else -%}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' or 'video' in part -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in part -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Sizes (about 1.6M parameters dense). H != I and H != 2I so MoE expert tensors never need a transpose.
TEXT_SIZE = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, max_position_embeddings=8192)
ROPE = {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [8, 4, 4], "mrope_interleaved": True}
VISION_SIZE = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=8, spatial_merge_size=2,
                   temporal_patch_size=2, out_hidden_size=128, num_position_embeddings=64,
                   deepstack_visual_indexes=[0])
# Image pixel bounds of the tiny processor: 32x32 .. 128x128 (larger images are downscaled).
MIN_PIXELS = 32 * 32
MAX_PIXELS = 128 * 128
VOCAB_TARGET = 2048
# tiny-qwen: real processor geometry and embedding size, small pixel bounds (64x64 .. 128x128 images).
QWEN_PATCH = 16
QWEN_MIN_PIXELS = 64 * 64
QWEN_MAX_PIXELS = 128 * 128
QWEN_CHAT_TEMPLATE_FILE = Path(__file__).with_name("qwen3_vl_chat_template.jinja")
MOE_EXPERTS = 4
MOE_TOP_K = 2

_WORDS = (
    "the a an of in on to is are and or with what how many which shape shapes object objects image picture "
    "shows there here this that these those count total number sum difference more less larger smaller "
    "largest smallest bigger biggest left right top bottom middle center above below next to between "
    "red green blue yellow purple orange black white gray grey brown pink cyan "
    "circle circles square squares triangle triangles pentagon pentagons hexagon hexagons rectangle star "
    "bar bars chart value values height label labels axis side sides corner corners area size "
    "first second third then so therefore because step steps answer final question option options choose "
    "select letter describe description caption think reasoning reason each all none both only "
    "background style plot diagram figure text key items item one two three four five six seven eight "
    "nine ten eleven twelve zero plus minus times equals equal yes no true false "
    "you are helpful assistant user system please respond format following"
).split()


def _tokenizer_corpus(rng: random.Random) -> list[str]:
    """Text the BPE learns from: protocol-shaped responses, questions, numbers, and filler words."""
    corpus = []
    for _ in range(6000):
        corpus.append(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 24))) + rng.choice([".", "?", "\n", ":"]))
    for _ in range(3000):
        n = rng.randint(0, 999)
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        corpus.append(f"<caption>\n- {rng.choice(_WORDS)} {rng.choice(_WORDS)}: {n}\n- {a} {rng.choice(_WORDS)}\n"
                      f"</caption>\n<think>\n{a} + {b} = {a + b}. {a} - {b} = {a - b}. So the answer is {n}.\n"
                      f"</think>\n<answer>{rng.choice([str(n), 'A', 'B', 'C', 'D', '(B)', '3.5', '1/2'])}</answer>")
    corpus += [str(i) for i in range(1000)] + ["A. B. C. D. (A) (B) (C) (D)"] * 20
    return corpus


def _build_tokenizer(seed: int):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import AddedToken, Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    n_added = len(SPECIAL_TOKENS) + len(PROTOCOL_TOKENS)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_TARGET - n_added, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"])
    bpe.train_from_iterator(_tokenizer_corpus(random.Random(seed)), trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = Qwen2Tokenizer(vocab=model["vocab"], merges=merges, unk_token=None, eos_token="<|im_end|>",
                         pad_token="<|endoftext|>", extra_special_tokens={})
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS], special_tokens=True)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in PROTOCOL_TOKENS])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _build_processor(tok, patch: int = 8, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS,
                     chat_template: str = CHAT_TEMPLATE):
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    image = Qwen2VLImageProcessor(patch_size=patch, temporal_patch_size=2, merge_size=2, size=size,
                                  image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    video = Qwen3VLVideoProcessor(patch_size=patch, temporal_patch_size=2, merge_size=2,
                                  size={"shortest_edge": min_pixels, "longest_edge": max_pixels * 8},
                                  image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return Qwen3VLProcessor(image_processor=image, tokenizer=tok, video_processor=video, chat_template=chat_template)


def _special_ids(tok) -> dict:
    return dict(image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
                video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
                vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
                vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"))


def _build_model(tok, moe: bool, seed: int, real_interface: bool = False):
    """real_interface: tiny-qwen's Qwen3-VL details (151,936 tied embedding rows, 16-pixel patches, eos list)."""
    import torch
    from transformers import (
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLMoeConfig,
        Qwen3VLMoeForConditionalGeneration,
    )

    vocab_size = len(tok)
    vision = dict(VISION_SIZE)
    if real_interface:
        from stages.common.world.qwen_vocab import EMBEDDING_ROWS

        vocab_size = EMBEDDING_ROWS
        vision["patch_size"] = QWEN_PATCH
    text = dict(TEXT_SIZE, vocab_size=vocab_size, rope_parameters=dict(ROPE), pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    if moe:
        text.update(moe_intermediate_size=TEXT_SIZE["intermediate_size"], num_experts=MOE_EXPERTS,
                    num_experts_per_tok=MOE_TOP_K, decoder_sparse_step=1, mlp_only_layers=[],
                    router_aux_loss_coef=0.01)
        cfg = Qwen3VLMoeConfig(text_config=text, vision_config=dict(VISION_SIZE), tie_word_embeddings=False,
                               **_special_ids(tok))
        model = Qwen3VLMoeForConditionalGeneration(cfg)
    else:
        cfg = Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=real_interface,
                            **_special_ids(tok))
        model = Qwen3VLForConditionalGeneration(cfg)
    gc = model.generation_config
    # Qwen3-VL's generation config stops on <|im_end|> and <|endoftext|>
    gc.eos_token_id = [tok.eos_token_id, tok.pad_token_id] if real_interface else tok.eos_token_id
    gc.pad_token_id = tok.pad_token_id
    gc.bos_token_id = None
    gc.do_sample = True
    gc.temperature = 1.0
    gc.top_p = 1.0
    gc.top_k = 0
    return model


def cache_root() -> Path:
    return Path(os.environ.get("PRISM_HOME") or Path.home() / ".cache" / "prism").expanduser() / "tiny"


def build_key(name: str, seed: int = 0) -> str:
    import transformers

    parts = [TINY_BUILD_VERSION, name, seed, TEXT_SIZE, VISION_SIZE, ROPE, VOCAB_TARGET, transformers.__version__]
    if name == "tiny-seeing":  # its own inputs: the pretraining recipe
        parts.append(seeing_recipe.recipe_key())
    if name == "tiny-qwen":  # its own inputs: the vocabulary file, the template, the processor geometry
        from stages.common.world import qwen_vocab
        parts += [_file_sha256(qwen_vocab.vocab_path()), _file_sha256(QWEN_CHAT_TEMPLATE_FILE), QWEN_PATCH,
                  QWEN_MIN_PIXELS, QWEN_MAX_PIXELS, qwen_vocab.ADDED_TOKENS]
    spec = json.dumps(parts, sort_keys=True)
    return hashlib.sha256(spec.encode()).hexdigest()[:12]


@functools.lru_cache(maxsize=4)
def _file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def build(name: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Build tiny (dense), tiny-moe or tiny-qwen into out_dir (save_pretrained layout)."""
    if name == "tiny-seeing":
        raise ValueError("tiny-seeing is trained by stages.common.models.seeing_base: resolve it through "
                         "stages.common.models.loading.as_spec('tiny-seeing'), which passes that builder to ensure()")
    if name not in NAMES:
        raise ValueError(f"unknown tiny model {name!r}")
    out_dir = Path(out_dir)
    if name == "tiny-qwen":
        from stages.common.world import qwen_vocab
        template = QWEN_CHAT_TEMPLATE_FILE.read_text(encoding="utf-8")
        tok = qwen_vocab.build_tokenizer(chat_template=template)
        processor = _build_processor(tok, QWEN_PATCH, QWEN_MIN_PIXELS, QWEN_MAX_PIXELS, template)
        model = _build_model(tok, moe=False, seed=seed, real_interface=True)
    else:
        tok = _build_tokenizer(seed)
        processor = _build_processor(tok)
        model = _build_model(tok, moe=(name == "tiny-moe"), seed=seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def cached_path(name: str, seed: int = 0) -> Path:
    """Where `ensure` keeps the built model (it may not be built yet)."""
    return cache_root() / f"{name}-{build_key(name, seed)}"


def is_built(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / ".complete").is_file()


def _share(root: Path) -> None:
    """The mode a new file or directory gets under the umask, on everything under root (bits only added)."""
    mask = os.umask(0o022)
    os.umask(mask)
    for p in [root, *root.rglob("*")]:
        if not p.is_symlink():
            os.chmod(p, (p.stat().st_mode & 0o7777) | ((0o777 if p.is_dir() else 0o666) & ~mask))


def ensure(name: str, seed: int = 0, builder=None) -> Path:
    """Path of the cached tiny model, building it on first use (atomically: build in a temp dir, rename).
    builder(out_dir, seed) replaces `build` for models trained on top of tiny (tiny-seeing: its trainer,
    stages.common.models.seeing_base, imports this module, so stages.common.models.loading passes it in)."""
    target = cached_path(name, seed)
    if is_built(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        if builder is None:
            build(name, tmp, seed)
        else:
            builder(tmp, seed)
        (tmp / ".complete").write_text("ok\n")
        _share(tmp)  # mkdtemp makes it 0700 and safetensors are saved 0600: a shared PRISM_HOME needs more
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race; use theirs
            if not (target / ".complete").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
