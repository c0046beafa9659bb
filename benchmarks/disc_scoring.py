"""Discriminator scoring per prompt group: the shared-prompt and prefix layouts vs the authors' separate layout.

One prompt group = the teacher demo + n rollouts, each scored on its caption and its think segment:
2(n + 1) segments against one prompt (the protocol system prompt, one image, a multiple-choice
question). The separate layout runs 2(n + 1) sequences, each repeating the prompt and its image; the
shared layout runs one (stages/align/scoring.py). Both are timed in the same process, interleaved rep by
rep (alternating which goes first), for inference (no grad) and for a training step's forward+backward;
medians are reported with the tokens each processed and the largest score difference.

    python benchmarks/disc_scoring.py                                  # tiny MoE discriminator, CPU, 1 thread
    python benchmarks/disc_scoring.py --model qwen3vl-2b-shape --image-size 448   # GPU, bf16, random weights

Writes benchmarks/results/disc_scoring.json (or --out). Baseline: the separate layout.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from stages.align.scoring import score_groups  # noqa: E402
from stages.common.rollout.base import RolloutPrompt  # noqa: E402

TARGET_TOKEN_RATIO = 3.0
TARGET_SPEEDUP = 2.0
WORDS = ("the a of in on to is are and with there shape shapes red green blue yellow circle circles square "
         "squares triangle left right top bottom larger smaller count total number value bar chart label "
         "first second then so therefore because step answer option each one two three four five six").split()
QUESTION = ("How many circles are in the picture, and which colour is the largest one?\n"
            "A. two, red\nB. three, blue\nC. three, green\nD. four, red")


def _system_prompt() -> str:
    try:
        from stages.common.protocol import SYSTEM_PROMPT
        return SYSTEM_PROMPT
    except ImportError:  # the protocol module is optional for this harness
        return ("Look at the image and answer the question. Reply in exactly this format and nothing else:\n"
                "<caption> bullet points describing the image style, key objects and any text </caption>\n"
                "<think> step-by-step reasoning </think>\n<answer> final answer only </answer>")


def _text_of_tokens(tokenizer, rng: random.Random, low: int, high: int, prefix: str = "") -> str:
    """Random protocol-like text whose token count lies in [low, high]."""
    target = rng.randint(low, high)
    words = prefix.split()
    while len(tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]) < target:
        words.append(rng.choice(WORDS) if rng.random() > 0.15 else str(rng.randint(0, 99)))
    ids = tokenizer(" ".join(words), add_special_tokens=False)["input_ids"][:target]
    return tokenizer.decode(ids)


def make_group(tokenizer, n: int, image_size: int, seed: int, caption_tokens=(20, 40), think_tokens=(30, 60)):
    from PIL import Image

    rng = random.Random(seed)
    pixels = (np.random.RandomState(seed).rand(image_size, image_size, 3) * 255).astype("uint8")
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}
    prompt = RolloutPrompt(messages=[{"role": "system", "content": _system_prompt()}, user],
                           images=[Image.fromarray(pixels)])
    segments = []
    for _ in range(n + 1):  # teacher demo + n rollouts
        segments.append(_text_of_tokens(tokenizer, rng, *caption_tokens, prefix="-"))
        segments.append(_text_of_tokens(tokenizer, rng, *think_tokens))
    return prompt, segments


def build_tiny(device):
    from stages.common.models.discriminator import upcycle
    from stages.common.models.loading import load_processor

    return upcycle("tiny", seed=0, value_head_std=0.1).to(device), load_processor("tiny")


# Qwen3-VL-2B-Instruct's published sizes (text + vision), upcycled to 4 experts: about 5B parameters.
QWEN3VL_2B_TEXT = dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=6144, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                       max_position_embeddings=262144, rms_norm_eps=1e-6,
                       rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                        "mrope_section": [24, 20, 20], "mrope_interleaved": True},
                       num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[],
                       router_aux_loss_coef=0.01)
QWEN3VL_2B_VISION = dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, patch_size=16,
                         spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=2048,
                         num_position_embeddings=2304, deepstack_visual_indexes=[5, 11, 17])


def qwen3vl_2b_shape_config(tokenizer):
    from transformers import Qwen3VLMoeConfig

    from stages.common.models.discriminator import CONFIG_KEY, VALUE_HEAD_GAIN

    ids = {k: tokenizer.convert_tokens_to_ids(t) for k, t in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    config = Qwen3VLMoeConfig(text_config=dict(QWEN3VL_2B_TEXT, pad_token_id=tokenizer.pad_token_id,
                                               eos_token_id=tokenizer.eos_token_id),
                              vision_config=dict(QWEN3VL_2B_VISION), tie_word_embeddings=False, **ids)
    setattr(config, CONFIG_KEY, {"variant": "moe", "text_only": False,
                                 "value_head_std": VALUE_HEAD_GAIN / QWEN3VL_2B_TEXT["hidden_size"] ** 0.5,
                                 "base": "random qwen3vl-2b shape"})
    return config


def build_qwen3vl_2b_shape(device):
    """A random-weight Qwen3-VL-2B-shaped MoE discriminator in bf16 (the tiny tokenizer, a patch-16 processor)."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor

    from stages.common.models.discriminator import Qwen3VLMoeDiscriminator
    from stages.common.models.loading import load_processor
    from stages.common.world import tiny

    tiny_processor = load_processor("tiny")
    tok = tiny_processor.tokenizer
    image = Qwen2VLImageProcessor(patch_size=16, temporal_patch_size=2, merge_size=2,
                                  size={"shortest_edge": 32 * 32, "longest_edge": 1024 * 1024},
                                  image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = Qwen3VLProcessor(image_processor=image, tokenizer=tok, video_processor=tiny_processor.video_processor,
                                 chat_template=tiny.CHAT_TEMPLATE)
    config = qwen3vl_2b_shape_config(tok)
    with torch.device(device):
        model = Qwen3VLMoeDiscriminator._from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    return model.eval(), processor


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_call(fn, device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def run(args) -> dict:
    """One measurement read in order. Long because the model is built once and each layout is timed
    and recorded in the same pass, so splitting it would only pass a dozen locals between helpers."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.model == "tiny":
        disc, processor = build_tiny(device)
    else:
        disc, processor = build_qwen3vl_2b_shape(device)
    prompt, segments = make_group(processor.tokenizer, args.n, args.image_size, args.seed)
    # "shared_rows": the shared layout split into rows of at most --max-row-tokens (each repeats the prompt),
    # which trades a few repeated prompt tokens for less masked-out attention work (T^2 per row)
    # "prefix": the prompt once into a KV cache, the segments packed into narrow rows on it (align's default
    # without discriminator checkpointing)
    layouts = ("separate", "shared", "shared_rows", "prefix")
    options = {"separate": ("separate", None), "shared": ("shared", None),
               "shared_rows": ("shared", args.max_row_tokens), "prefix": ("prefix", None)}

    def infer(layout):
        with torch.no_grad():
            return score_groups(disc, processor, [prompt], [segments], options[layout][0],
                                max_row_tokens=options[layout][1])

    def train_step(layout):
        disc.zero_grad(set_to_none=True)
        result = score_groups(disc, processor, [prompt], [segments], options[layout][0],
                              max_row_tokens=options[layout][1], output_router_logits=True)
        # chunked scores (the budget's rows) are backpropagated by re-running each chunk (ScoreResult.backward)
        result.backward(result.flat.sum() + 0.01 * result.aux_loss)
        return result

    results = {layout: infer(layout) for layout in layouts}
    max_abs_diff = {layout: float((results[layout].flat - results["separate"].flat).abs().max())
                    for layout in layouts[1:]}
    disc.train()
    for layout in layouts:  # warm up the training path too
        train_step(layout)
    disc.eval()

    times = {mode: {layout: [] for layout in layouts} for mode in ("inference", "train")}
    for rep in range(args.reps):
        order = layouts[rep % len(layouts):] + layouts[:rep % len(layouts)]  # rotate who goes first
        for layout in order:
            times["inference"][layout].append(_time_call(lambda: infer(layout), device))
        disc.train()
        for layout in order:
            times["train"][layout].append(_time_call(lambda: train_step(layout), device))
        disc.eval()
    disc.zero_grad(set_to_none=True)

    seg_tokens = [len(processor.tokenizer(s, add_special_tokens=False)["input_ids"]) for s in segments]
    figures = {}
    for mode, by_layout in times.items():
        med = {layout: statistics.median(v) for layout, v in by_layout.items()}
        figures[mode] = {f"{layout}_median_s": med[layout] for layout in layouts}
        figures[mode].update({f"{layout}_all_s": by_layout[layout] for layout in layouts})
        figures[mode]["speedup"] = med["separate"] / med["shared"]
        figures[mode]["speedup_rows"] = med["separate"] / med["shared_rows"]
        figures[mode]["speedup_prefix"] = med["separate"] / med["prefix"]
        figures[mode]["prefix_over_shared"] = med["shared"] / med["prefix"]
    sep, sha, rows = results["separate"], results["shared"], results["shared_rows"]
    token_ratio = sep.num_tokens / sha.num_tokens
    report = {
        "benchmark": "disc_scoring",
        "baseline": "separate layout (one sequence per prompt+segment, the authors' layout)",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "transformers": __import__("transformers").__version__, "device": str(device),
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                    "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()},
        "config": {"model": args.model, "dtype": str(next(disc.parameters()).dtype).replace("torch.", ""),
                   "attention": disc.config._attn_implementation,
                   "parameters": sum(p.numel() for p in disc.parameters()),
                   "n_rollouts": args.n, "segments": len(segments), "image_size": args.image_size,
                   "prompt_tokens": sha.num_tokens - sum(t + 1 for t in seg_tokens),
                   "caption_tokens": seg_tokens[0::2], "think_tokens": seg_tokens[1::2],
                   "segment_tokens_note": "each segment is scored as text + <|im_end|> (+1 token)",
                   "max_row_tokens (shared_rows)": args.max_row_tokens, "reps": args.reps, "seed": args.seed},
        "tokens": {"separate": sep.num_tokens, "separate_padded": sep.num_padded_tokens, "shared": sha.num_tokens,
                   "shared_padded": sha.num_padded_tokens, "shared_rows": rows.num_tokens,
                   "shared_rows_padded": rows.num_padded_tokens,
                   "prefix": results["prefix"].num_tokens,
                   "rows": {"separate": sep.num_rows, "shared": sha.num_rows, "shared_rows": rows.num_rows}},
        "figures": figures,
        "ratios": {"tokens": token_ratio, "padded_tokens": sep.num_padded_tokens / sha.num_padded_tokens,
                   "tokens_rows": sep.num_tokens / rows.num_tokens,
                   "inference_speedup": figures["inference"]["speedup"], "train_speedup": figures["train"]["speedup"],
                   "inference_speedup_rows": figures["inference"]["speedup_rows"],
                   "train_speedup_rows": figures["train"]["speedup_rows"],
                   "inference_prefix_over_shared": figures["inference"]["prefix_over_shared"],
                   "train_prefix_over_shared": figures["train"]["prefix_over_shared"]},
        "scores_max_abs_diff": max_abs_diff,
        "targets": {"tokens_ratio_min": TARGET_TOKEN_RATIO, "speedup_min": TARGET_SPEEDUP,
                    "tokens_met": token_ratio >= TARGET_TOKEN_RATIO,
                    "inference_speedup_met": figures["inference"]["speedup"] >= TARGET_SPEEDUP,
                    "train_speedup_met": figures["train"]["speedup"] >= TARGET_SPEEDUP,
                    "inference_speedup_rows_met": figures["inference"]["speedup_rows"] >= TARGET_SPEEDUP,
                    "train_speedup_rows_met": figures["train"]["speedup_rows"] >= TARGET_SPEEDUP},
    }
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("tiny", "qwen3vl-2b-shape"), default="tiny")
    parser.add_argument("--n", type=int, default=16, help="rollouts per prompt (plus one teacher demo)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-row-tokens", type=int, default=512, help="row budget of the shared_rows variant")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/disc_scoring.json "
                                                     "(disc_scoring_<model>.json for other models)")
    args = parser.parse_args(argv)
    report = run(args)
    name = "disc_scoring.json" if args.model == "tiny" else f"disc_scoring_{args.model}.json"
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    r = report["ratios"]
    print(f"tokens separate {report['tokens']['separate']} vs shared {report['tokens']['shared']} "
          f"({r['tokens']:.2f}x); inference {report['figures']['inference']['separate_median_s'] * 1e3:.1f} ms vs "
          f"{report['figures']['inference']['shared_median_s'] * 1e3:.1f} ms ({r['inference_speedup']:.2f}x); "
          f"train {r['train_speedup']:.2f}x; rows<={args.max_row_tokens}: tokens {r['tokens_rows']:.2f}x, inference "
          f"{r['inference_speedup_rows']:.2f}x, train {r['train_speedup_rows']:.2f}x; prefix over shared: "
          f"inference {r['inference_prefix_over_shared']:.2f}x, train {r['train_prefix_over_shared']:.2f}x; "
          f"max |diff| {max(report['scores_max_abs_diff'].values()):.2e} -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
