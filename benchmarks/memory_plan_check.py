"""Check stages.common.plan.memory against a measured training step (CPU or one GPU).

Builds a Qwen3-VL of a published shape (stages.common.models.shapes) with its real width but fewer layers (and
optionally a smaller vocabulary), trains it for two steps of `--micro-batches` micro-batches of
`--tokens` tokens each (AdamW as prism builds it, chunked logprobs as the stages use them), and compares:
  state   weights + Adam states, measured after a step with grads released
  update  the peak of a step (weights, Adam, grads, activations, logits chunk)
with the plan for backend "none" (one process). Prints one JSON object.

Memory on CPU: resident set size (/proc/self/status VmRSS), peak VmHWM reset through /proc/self/clear_refs;
glibc's mmap threshold is pinned (MALLOC_MMAP_THRESHOLD_) so freed tensors return to the OS. On GPU:
torch.cuda.memory_allocated / max_memory_allocated.

    python benchmarks/memory_plan_check.py --layers 2 --vocab 4096 --tokens 1024 [--checkpointing]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path

if "MALLOC_MMAP_THRESHOLD_" not in os.environ and __name__ == "__main__":
    # Re-exec with a fixed mmap threshold: without it glibc raises the threshold after the first large free and
    # later tensors land on the heap, where freeing them does not lower the resident set.
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
    os.execv(sys.executable, [sys.executable, *sys.argv])

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


class Meter:
    def __init__(self, device: torch.device):
        self.device = device

    def current(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.memory_allocated(self.device)
        gc.collect()
        return _status("VmRSS")

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        return _status("VmHWM")


def build(args, device, dtype):
    from transformers import AutoModelForImageTextToText

    from stages.common.models.shapes import shape_config

    overrides = {"num_hidden_layers": args.layers, "vision": {"depth": args.vision_layers,
                                                              "deepstack_visual_indexes": []}}
    if args.vocab:
        overrides["vocab_size"] = args.vocab
    if getattr(args, "small", False):
        overrides.update(hidden_size=64, intermediate_size=96, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=32, rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                                                       "mrope_section": [8, 4, 4], "mrope_interleaved": True})
        overrides["vision"].update(hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)
    config = shape_config(args.shape, **overrides)
    if getattr(args, "moe", False):   # the discriminator's shape: every MLP upcycled to 4 experts, top-2
        from stages.common.models.discriminator import moe_config_from_dense

        config = moe_config_from_dense(config, 4, 2)
    vocab = config.text_config.vocab_size
    for i, key in enumerate(("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")):
        setattr(config, key, vocab - 1 - i)   # keep the special ids inside a reduced vocabulary
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation="sdpa")
    if not args.train_vision:   # no image in the batches: an unused tower would get neither grads nor Adam states
        for p in model.model.visual.parameters():
            p.requires_grad_(False)
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    return model, vocab


def warm_up(args, device, dtype) -> None:
    from stages.common.training.runtime import build_optimizer

    small = argparse.Namespace(**{**vars(args), "layers": 1, "vocab": 512, "checkpointing": args.checkpointing,
                                  "small": True})
    model, vocab = build(small, device, dtype)
    optimizer = build_optimizer(model, lr=1e-5)
    ids = torch.randint(0, vocab - 8, (1, 64), device=device)
    out = model(input_ids=ids, mm_token_type_ids=torch.zeros_like(ids), output_hidden_states=True,
                logits_to_keep=1, use_cache=False)
    out.hidden_states[-1].float().sum().backward()
    optimizer.step()
    del model, optimizer, out


def run(args) -> dict:
    from stages.common.plan import memory as memory_plan
    from stages.common.policy_update.logprobs import chunked_token_logprobs
    from stages.common.training.runtime import build_optimizer

    torch.set_num_threads(args.threads)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    width = torch.finfo(dtype).bits // 8
    meter = Meter(device)
    warm_up(args, device, dtype)   # libraries and kernels load on first use: keep them out of the baseline
    base = meter.current()
    model, vocab = build(args, device, dtype)
    optimizer = build_optimizer(model, lr=1e-5, weight_decay=0.01)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, vocab - 8, (1, args.tokens + 1), generator=gen).to(device)
               for _ in range(args.micro_batches)]

    def step():
        optimizer.zero_grad(set_to_none=True)
        for ids in batches:
            out = model(input_ids=ids[:, :-1], mm_token_type_ids=torch.zeros_like(ids[:, :-1]),
                        output_hidden_states=True, logits_to_keep=1, use_cache=False)
            hidden = out.hidden_states[-1][0]
            logp, _ = chunked_token_logprobs(model.get_output_embeddings(), hidden, ids[0, 1:], temperature=1.0,
                                             banned=None, chunk_size=args.chunk)
            (-logp.float().mean()).backward()
            del out, hidden, logp
        optimizer.step()

    step()
    optimizer.zero_grad(set_to_none=True)
    state = meter.current() - base
    meter.reset_peak()
    step()
    update_peak = meter.peak() - base

    shape = memory_plan.shape_of(model, args.shape)
    plan = memory_plan.training_plan("check", policy=shape, backend="none", world=1, width=width,
                                     gpu_bytes=1 << 50, micro_batch_tokens=args.tokens,
                                     checkpointing=args.checkpointing, logits_chunk=args.chunk,
                                     freeze_vision=not args.train_vision)
    update = plan.phases[-1]
    planned_state = update.parts["policy weights"] + update.parts["policy Adam m, v"]
    # The meter sees tensors above the process's baseline: the CUDA context and NCCL's buffers are outside it
    # (and absent on a CPU), so the plan's peak is compared without them.
    planned_peak = update.total - update.parts.get(memory_plan.CONTEXT_PART, 0)
    return {
        "shape": args.shape + (" moe" if args.moe else ""), "layers": args.layers, "vocab": vocab, "params": shape.params, "tokens": args.tokens,
        "micro_batches": args.micro_batches, "chunk": args.chunk, "checkpointing": args.checkpointing, "dtype": args.dtype,
        "device": str(device), "torch": torch.__version__,
        "measured": {"state": state, "update_peak": update_peak},
        "planned": {"state": planned_state, "update_peak": planned_peak, "parts": update.parts},
        # the step's own memory (grads, activations, logits chunk) above the resident state
        "ratio": {"state": planned_state / state, "update_peak": planned_peak / update_peak,
                  "step_delta": (planned_peak - planned_state) / (update_peak - state)},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="qwen3vl-2b-shape")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vision-layers", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=4096, help="0: the shape's own (151,936)")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--micro-batches", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--moe", action="store_true", help="upcycle the shape to 4 experts top-2 (the discriminator)")
    ap.add_argument("--train-vision", action="store_true", help="keep the vision tower trainable (it sees no image)")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    text = json.dumps(run(args), indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
