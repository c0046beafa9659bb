"""Peak memory of logprob recomputation (forward + backward): chunked (stages.common.policy_update.logprobs.response_logprobs)
vs full logits then log_softmax (full_logits_logprobs), 4 responses x 2,048 tokens, vocabulary 151,936.

The model is a Qwen3-VL with the real vocabulary size and a small hidden size (random init, random token
ids, no tokenizer). Each variant runs in a fresh subprocess; its peak is ru_maxrss after the step minus
ru_maxrss before it (model and batch already built), so the number is what the step itself added.

    python benchmarks/logprob_memory.py [--responses 4 --tokens 2048 --chunk 512]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = Path(__file__).resolve().parent / "results"
VOCAB = 151936
PROMPT_TOKENS = 16


def build(args):
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.manual_seed(0)
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                head_dim=16, vocab_size=VOCAB, max_position_embeddings=8192,
                rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [4, 2, 2],
                                 "mrope_interleaved": True})
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=8, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=64, deepstack_visual_indexes=[0])
    cfg = Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False,
                        image_token_id=VOCAB - 1, video_token_id=VOCAB - 2, vision_start_token_id=VOCAB - 3,
                        vision_end_token_id=VOCAB - 4)
    cfg._attn_implementation = "sdpa"
    model = Qwen3VLForConditionalGeneration(cfg).float().train()
    g = torch.Generator().manual_seed(1)
    B, T = args.responses, args.tokens
    input_ids = torch.randint(0, VOCAB - 8, (B, PROMPT_TOKENS + T), generator=g)
    batch = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                 mm_token_type_ids=torch.zeros_like(input_ids), response_ids=input_ids[:, PROMPT_TOKENS:].clone(),
                 response_mask=torch.ones(B, T, dtype=torch.bool),
                 prompt_lengths=torch.full((B,), PROMPT_TOKENS, dtype=torch.long),
                 suppress_token_ids=torch.tensor([VOCAB - 1, VOCAB - 2, VOCAB - 3, VOCAB - 4]))
    return model, batch


def child(args) -> None:
    """One variant: build, then one forward+backward; print JSON with the ru_maxrss delta."""
    cap = int(args.cap_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    import torch

    torch.set_num_threads(1)
    from stages.common.policy_update.logprobs import full_logits_logprobs, response_logprobs

    model, batch = build(args)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    try:
        if args.variant == "chunked":
            logp, _ = response_logprobs(model, batch, chunk_size=args.chunk)
        else:
            logp = full_logits_logprobs(model, batch)
    except (MemoryError, RuntimeError) as e:
        if "memory" not in str(e).lower() and not isinstance(e, MemoryError):
            raise
        print(json.dumps({"variant": args.variant, "exceeded_cap_gib": args.cap_gib, "rss_before_mib": before / 1024}))
        return
    try:
        logp.sum().backward()
    except (MemoryError, RuntimeError) as e:
        if "memory" not in str(e).lower() and not isinstance(e, MemoryError):
            raise
        print(json.dumps({"variant": args.variant, "exceeded_cap_gib": args.cap_gib, "rss_before_mib": before / 1024}))
        return
    elapsed = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.save({"logp": logp.detach(), "lm_head_grad": model.lm_head.weight.grad[:2048].clone()}, args.save)
    print(json.dumps({"variant": args.variant, "peak_delta_mib": (after - before) / 1024, "rss_before_mib": before / 1024,
                      "seconds": elapsed}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--responses", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--variant", default=None, choices=["chunked", "full"])
    ap.add_argument("--save", default=None)
    ap.add_argument("--cap-gib", type=float, default=16.0,
                    help="address-space cap per variant, so the full variant fails cleanly on a shared machine")
    ap.add_argument("--out", default=str(RESULTS / "logprob_memory.json"))
    args = ap.parse_args()
    if args.variant:
        return child(args)

    import torch

    results, saved = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in ("chunked", "full"):
            save = os.path.join(tmp, f"{variant}.pt")
            cmd = [sys.executable, __file__, "--variant", variant, "--save", save, "--responses", str(args.responses),
                   "--tokens", str(args.tokens), "--chunk", str(args.chunk)]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode != 0:
                raise SystemExit(f"{variant} failed (rc {proc.returncode}):\n{proc.stderr[-2000:]}")
            results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(results[variant], flush=True)
            if os.path.exists(save):
                saved[variant] = torch.load(save)
    values_compared = "full" in saved
    if not values_compared:  # the full variant blew the cap: the ratio is an upper bound
        results["full"]["peak_delta_mib"] = args.cap_gib * 1024 - results["full"]["rss_before_mib"]
        results["full"]["note"] = "exceeded the cap; peak_delta_mib is a lower bound (cap - rss before)"
        saved["full"] = saved["chunked"]
    max_logp_diff = float((saved["chunked"]["logp"] - saved["full"]["logp"]).abs().max())
    max_grad_diff = float((saved["chunked"]["lm_head_grad"] - saved["full"]["lm_head_grad"]).abs().max())
    assert max_logp_diff < 1e-4 and max_grad_diff < 1e-3, (max_logp_diff, max_grad_diff)
    ratio = results["chunked"]["peak_delta_mib"] / results["full"]["peak_delta_mib"]
    logits_mib = args.responses * args.tokens * VOCAB * 4 / 2**20
    out = {
        "benchmark": "logprob_memory",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": {"responses": args.responses, "response_tokens": args.tokens, "prompt_tokens": PROMPT_TOKENS,
                   "vocab_size": VOCAB, "hidden_size": 64, "chunk_size": args.chunk, "dtype": "float32",
                   "step": "forward + backward of sum(logp)"},
        "method": "each variant in a fresh subprocess; ru_maxrss after the step minus ru_maxrss before it",
        "one_full_logits_tensor_mib": logits_mib,
        "chunked": results["chunked"], "full": results["full"],
        "chunked_over_full_peak": ratio,
        "values_compared": values_compared, "max_abs_logp_diff": max_logp_diff, "max_abs_lm_head_grad_diff": max_grad_diff,
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "cpu_count": os.cpu_count()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({k: out[k] for k in ("chunked_over_full_peak", "max_abs_logp_diff", "max_abs_lm_head_grad_diff")}))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
