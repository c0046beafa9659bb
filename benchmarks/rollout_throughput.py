"""Rollout throughput: the hf engine (shared-prompt prefill + lean decode) vs the straightforward approach
(each prompt repeated n times, one left-padded batch, model.generate(do_sample=True) with the vision tokens
suppressed -- what trl does without vLLM). Side by side in one process, interleaved repetitions, medians.

    python benchmarks/rollout_throughput.py                            # tiny model, CPU, one thread
    python benchmarks/rollout_throughput.py --model qwen3vl-2b-shape   # random-weight 2B shape, bf16, GPU

Tokens are counted like /work/shared/baselines/trl/gen_bench.py: per row up to and including the first
EOS, else all max_new_tokens. Both sides sample at temperature 1 from the same model and the same prompts,
so both generate (nearly) the same number of tokens; the JSON records each side's count. Timings include
prompt preprocessing (processor) on both sides.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from stages.common.rollout import RolloutPrompt, SamplingParams  # noqa: E402
from stages.common.rollout.hf import HFEngine  # noqa: E402
from stages.common.rollout.prompts import encode_prompts, stop_token_ids, vision_token_ids  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TARGET = 3.0   # issue 34
COLORS = [(220, 30, 30), (30, 160, 60), (30, 60, 220), (230, 200, 20), (140, 40, 170), (240, 130, 20)]


def shape_image(i: int, size: int) -> Image.Image:
    img = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(img)
    for k in range(1 + i % 4):
        s = size // 5
        x, y = (7 * i + 13 * k) % (size - s), (11 * i + 5 * k) % (size - s)
        (d.ellipse if (i + k) % 2 else d.rectangle)((x, y, x + s, y + s), fill=COLORS[(i + k) % len(COLORS)])
    return img


def make_prompts(count: int, size: int) -> list[RolloutPrompt]:
    return [RolloutPrompt(messages=[{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "How many shapes are in the image?"}]}],
        images=[shape_image(i, size)]) for i in range(count)]


def tiny_model():
    from stages.common.models.loading import load_policy, load_processor
    from stages.common.world import tiny

    path = tiny.ensure("tiny")
    return load_policy(path, train=False), load_processor(path), 64


def qwen3vl_2b_shape_model():
    """Random weights in Qwen3-VL-2B's shape (config only, no download), bf16 on the GPU, with the tiny
    tokenizer and a 16-pixel-patch image processor (448x448 -> 196 image tokens)."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from stages.common.models.loading import load_processor, pick_attention
    from stages.common.world import tiny

    processor = load_processor(tiny.ensure("tiny"))
    processor.image_processor = Qwen2VLImageProcessor(
        patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
        size={"shortest_edge": 64 * 64, "longest_edge": 1024 * 1024})
    tok = processor.tokenizer
    ids = {k: tok.convert_tokens_to_ids(t) for k, t in (("image_token_id", "<|image_pad|>"),
                                                       ("video_token_id", "<|video_pad|>"),
                                                       ("vision_start_token_id", "<|vision_start|>"),
                                                       ("vision_end_token_id", "<|vision_end|>"))}
    text = dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=32768,
                rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                                 "mrope_interleaved": True},
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    vision = dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=2048, num_position_embeddings=2304,
                  deepstack_visual_indexes=[5, 11, 17])
    device = torch.device("cuda")
    cfg = Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)
    cfg._attn_implementation = pick_attention("auto", device)
    with torch.device(device):
        model = Qwen3VLForConditionalGeneration(cfg).to(torch.bfloat16).eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, processor, 448


def generated_tokens(completion_rows: torch.Tensor, eos_ids: list[int]) -> int:
    """Per row: up to and including the first EOS, else all (gen_bench.py's count)."""
    is_eos = torch.isin(completion_rows, torch.tensor(eos_ids, device=completion_rows.device))
    full = torch.full_like(is_eos[:, 0], completion_rows.shape[1], dtype=torch.long)
    return int(torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, full).sum())


def run_engine(engine, prompts, args, seed):
    params = SamplingParams(n=args.n, temperature=1.0, max_new_tokens=args.max_new_tokens, seed=seed)
    sync()
    t0 = time.perf_counter()
    results = engine.generate(prompts, params)
    sync()
    return time.perf_counter() - t0, sum(len(c.token_ids) for group in results for c in group)


def run_straightforward(model, processor, prompts, args, seed):
    repeated = [p for p in prompts for _ in range(args.n)]
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    sync()
    t0 = time.perf_counter()
    enc = {k: v.to(device) for k, v in encode_prompts(processor, repeated, padding_side="left").items()}
    with torch.no_grad():
        out = model.generate(**enc, do_sample=True, max_new_tokens=args.max_new_tokens, temperature=1.0, top_k=0,
                             top_p=1.0, suppress_tokens=vision_token_ids(processor),
                             pad_token_id=processor.tokenizer.pad_token_id,
                             eos_token_id=stop_token_ids(processor, model))
    sync()
    elapsed = time.perf_counter() - t0
    return elapsed, generated_tokens(out[:, enc["input_ids"].shape[1]:], stop_token_ids(processor, model))


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def machine_info() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    import transformers

    info["transformers"] = transformers.__version__
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny", choices=["tiny", "qwen3vl-2b-shape"])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)

    model, processor, image_size = tiny_model() if args.model == "tiny" else qwen3vl_2b_shape_model()
    prompts = make_prompts(args.prompts, image_size)
    engine = HFEngine(model, processor)
    runs = []
    for rep in range(args.reps + 1):                      # rep 0 warms both up and is not counted
        ours_s, ours_tokens = run_engine(engine, prompts, args, seed=rep)
        base_s, base_tokens = run_straightforward(model, processor, prompts, args, seed=rep)
        rec = {"rep": rep, "hf_engine_s": ours_s, "hf_engine_tokens": ours_tokens,
               "straightforward_s": base_s, "straightforward_tokens": base_tokens,
               "hf_engine_tok_per_s": ours_tokens / ours_s, "straightforward_tok_per_s": base_tokens / base_s}
        rec["ratio"] = rec["hf_engine_tok_per_s"] / rec["straightforward_tok_per_s"]
        runs.append(rec)
        print(("warm-up " if rep == 0 else "") + json.dumps({k: round(v, 3) if isinstance(v, float) else v
                                                             for k, v in rec.items()}), flush=True)
    timed = runs[1:]
    ours = statistics.median(r["hf_engine_tok_per_s"] for r in timed)
    base = statistics.median(r["straightforward_tok_per_s"] for r in timed)
    result = {
        "benchmark": "rollout_throughput",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": {"model": args.model, "prompts": args.prompts, "n": args.n, "max_new_tokens": args.max_new_tokens,
                   "temperature": 1.0, "top_k": 0, "top_p": 1.0, "image_size": image_size, "reps": args.reps,
                   "dtype": str(next(model.parameters()).dtype), "device": str(next(model.parameters()).device)},
        "baseline": "straightforward: prompts repeated n times, model.generate(do_sample=True) with the vision "
                    "tokens suppressed (trl without vLLM)",
        "token_count": "per row up to and including the first EOS, else max_new_tokens (gen_bench.py); "
                       "timings include the processor on both sides",
        "median_hf_engine_tok_per_s": ours,
        "median_straightforward_tok_per_s": base,
        "ratio_of_medians": ours / base,
        "median_ratio_per_rep": statistics.median(r["ratio"] for r in timed),
        "target": "hf engine >= 3x the straightforward approach, median per-rep ratio (issue 34)",
        "target_met": statistics.median(r["ratio"] for r in timed) >= TARGET,
        "median_tokens": {"hf_engine": statistics.median(r["hf_engine_tokens"] for r in timed),
                          "straightforward": statistics.median(r["straightforward_tokens"] for r in timed)},
        "runs": runs,
        "machine": machine_info(),
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "note": "shared, noisy machine: only the side-by-side ratio is meaningful",
    }
    out = Path(args.out) if args.out else RESULTS / f"rollout_throughput_{args.model}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k.startswith(("median", "ratio"))}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
