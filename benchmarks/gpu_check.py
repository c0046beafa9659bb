"""One SFT step, one RL step (hf engine rollout + clipped update) and one align step (discriminator scoring
under the token budget + its update + the policy update) on a random-weight Qwen3-VL-2B-shaped policy and its
upcycled MoE discriminator, each against the memory plan. Prints one JSON object (and writes it with --out).

  --mode gpu (default where CUDA exists): the real 2B shape in bf16 at realistic lengths (SFT 8192-token
             micro-batch, RL 2 prompts x 4 rollouts x 1024 new tokens, align 1 prompt x 8 rollouts x 2 x 512
             segment tokens), step times, MFU against --peak-tflops, peak memory (max_memory_allocated)
             against stages.common.plan.memory (backend none, one process).
  --mode cpu (CI): the same code on a shrunken shape (hidden 64, 2 layers) with tiny lengths, fp32; memory is
             the resident set, MFU is not computed.

Run through benchmarks/gpu_check.sh. Built to need only torch, transformers and accelerate (no vLLM,
DeepSpeed or flash-attn).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

MODES = {
    "gpu": dict(dtype=torch.bfloat16, sft_tokens=8192, rl_prompts=2, rl_n=4, rl_new=1024, align_n=8, segment=512,
                budget=8192, update_tokens=16384, steps=3, image=448),
    "cpu": dict(dtype=torch.float32, sft_tokens=256, rl_prompts=2, rl_n=2, rl_new=16, align_n=2, segment=24,
                budget=96, update_tokens=512, steps=1, image=64),
}
CPU_SHAPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=32,
                 rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [8, 4, 4],
                                  "mrope_interleaved": True},
                 vision={"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
                         "deepstack_visual_indexes": [0]})


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def shape_processor():
    """The tiny tokenizer and chat template with a patch-16 image processor (the 2B vision tower's patch)."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor

    from stages.common.models.loading import load_processor
    from stages.common.world import tiny

    tiny_processor = load_processor("tiny")
    image = Qwen2VLImageProcessor(patch_size=16, temporal_patch_size=2, merge_size=2,
                                  size={"shortest_edge": 32 * 32, "longest_edge": 1024 * 1024},
                                  image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return Qwen3VLProcessor(image_processor=image, tokenizer=tiny_processor.tokenizer,
                            video_processor=tiny_processor.video_processor, chat_template=tiny.CHAT_TEMPLATE)


def shape_config(mode: str, tokenizer):
    """qwen3vl-2b-shape (gpu) or its shrunken twin (cpu), its special-token ids moved to `tokenizer`'s."""
    from stages.common.models import shapes
    return shapes.with_token_ids(shapes.shape_config("qwen3vl-2b-shape", **(CPU_SHAPE if mode == "cpu" else {})),
                                 tokenizer)


def build(mode: str, device):
    """Policy, processor (the tiny tokenizer, a patch-16 image processor) and the upcycled-shape discriminator."""
    from transformers import AutoModelForImageTextToText

    from stages.common.models.discriminator import Qwen3VLMoeDiscriminator, moe_config_from_dense

    processor = shape_processor()
    config = shape_config(mode, processor.tokenizer)
    dtype = MODES[mode]["dtype"]
    torch.manual_seed(0)
    with torch.device(device):
        policy = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation="sdpa")
        disc = Qwen3VLMoeDiscriminator._from_config(moe_config_from_dense(config), dtype=dtype,
                                                    attn_implementation="sdpa")
    for model in (policy, disc):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        model.train()
    return policy, processor, disc


class Memory:
    def __init__(self, device):
        from benchmarks.memory_plan_check import Meter

        self.meter = Meter(device)
        self.base = self.meter.current()

    def start(self):
        self.meter.reset_peak()

    def peak(self) -> int:
        return self.meter.peak() - self.base


def flops_per_token(shape, tokens: int) -> float:
    """Training FLOPs per token: 6 x (active) parameters + causal attention (6 x layers x q_width x tokens)."""
    dense = shape.params - shape.vision_params
    if shape.experts:   # only top_k of the experts run per token
        expert = 3 * shape.hidden * shape.intermediate
        dense -= shape.layers * (shape.experts - shape.top_k) * expert
    return 6 * dense + 6 * shape.layers * shape.q_width * tokens


def timed(fn, device, steps: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def random_prompt(processor, size: int, seed: int, words: int = 40):
    from PIL import Image

    from stages.common.rollout.base import RolloutPrompt

    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
    question = " ".join(["count the red circles and the blue squares"] * max(1, words // 8))
    return RolloutPrompt(messages=[{"role": "user", "content": [{"type": "image"},
                                                               {"type": "text", "text": question}]}],
                         images=[Image.fromarray(pixels)])


def sft_step(cfg, policy, processor, device, optimizer):
    """One micro-batch of sft_tokens (a prompt with an image, then text), summed NLL via chunked logprobs."""
    from stages.common.policy_update.logprobs import chunked_token_logprobs

    prompt = random_prompt(processor, cfg["image"], 0)
    text = processor.apply_chat_template(prompt.messages, add_generation_prompt=True, tokenize=False)
    enc = processor(text=[text], images=prompt.images, return_tensors="pt")
    n_prompt = enc["input_ids"].shape[1]
    g = torch.Generator().manual_seed(1)
    target = torch.randint(0, len(processor.tokenizer) - 32, (1, max(1, cfg["sft_tokens"] - n_prompt)), generator=g)
    ids = torch.cat([enc["input_ids"], target], 1).to(device)
    mm = torch.cat([enc["mm_token_type_ids"], torch.zeros_like(target)], 1).to(device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        out = policy(input_ids=ids, mm_token_type_ids=mm, pixel_values=enc["pixel_values"].to(device, policy.dtype),
                     image_grid_thw=enc["image_grid_thw"].to(device), output_hidden_states=True, logits_to_keep=1,
                     use_cache=False)
        hidden = out.hidden_states[-1][0, n_prompt - 1:-1]
        logp, _ = chunked_token_logprobs(policy.get_output_embeddings(), hidden, ids[0, n_prompt:], 1.0, None, 1024)
        (-logp.float().mean()).backward()
        optimizer.step()
    return step, ids.shape[1]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("auto", "gpu", "cpu"), default="auto")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100/H200: 989)")
    ap.add_argument("--out", default="")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    """Every check in order, each recorded in the result. Long because the checks share one device and one model
    and run as a script a person reads from top to bottom on a lent GPU."""
    args = parse_args(argv)
    mode = args.mode if args.mode != "auto" else ("gpu" if torch.cuda.is_available() else "cpu")
    if mode == "gpu" and not torch.cuda.is_available():
        raise SystemExit("--mode gpu needs a CUDA device")
    cfg = MODES[mode]
    torch.set_num_threads(1 if mode == "cpu" else torch.get_num_threads())
    device = torch.device("cuda" if mode == "gpu" else "cpu")
    result = {"mode": mode, "device": torch.cuda.get_device_name(0) if mode == "gpu" else platform.processor(),
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    import transformers

    result["transformers"] = transformers.__version__
    t0 = time.perf_counter()
    from stages.common.plan import memory as mp
    from stages.common.training.runtime import build_optimizer, build_scheduler, make_runtime

    memory = Memory(device)
    policy, processor, disc = build(mode, device)
    shape, disc_shape = mp.shape_of(policy, "qwen3vl-2b-shape"), mp.shape_of(disc, "discriminator")
    result["policy_params"], result["discriminator_params"] = shape.params, disc_shape.params
    width = torch.finfo(cfg["dtype"]).bits // 8
    # the weights are built in the check's dtype; the runtime adds no autocast on top (single process)
    runtime = make_runtime("fp32")
    accelerator = runtime.accelerator
    trained = runtime.prepare(policy, lambda m: build_optimizer(m, lr=1e-6),
                              lambda opt: build_scheduler(opt, "constant", 0, 100), name="policy")
    optimizer = trained.optimizer
    stages = {}

    def record(name, seconds, tokens, planned_phase, flops_tokens=None):
        peak = memory.peak()
        entry = {"step_s": round(seconds, 4), "tokens": tokens, "peak_gib": round(peak / mp.GIB, 3),
                 "plan_gib": round(planned_phase / mp.GIB, 3), "plan_over_measured": round(planned_phase / peak, 3)}
        if mode == "gpu" and flops_tokens:
            entry["mfu"] = round(flops_tokens / seconds / (args.peak_tflops * 1e12), 4)
        stages[name] = entry
        print(json.dumps({name: entry}), flush=True)
        if args.out:   # after every stage, so a run cut short still leaves the stages it finished
            write_json(Path(args.out), dict(result, stages=stages, partial=True))

    # SFT
    step, tokens = sft_step(cfg, policy, processor, device, optimizer)
    step()                                        # first step allocates the Adam states
    memory.start()
    seconds, _ = timed(step, device, cfg["steps"])
    plan = mp.training_plan("sft", policy=shape, backend="none", world=1, width=width, gpu_bytes=1 << 50,
                            micro_batch_tokens=tokens, checkpointing=True, logits_chunk=1024,
                            image_patches=4 * (cfg["image"] // 32) ** 2)
    record("sft", seconds, tokens, plan.peak.total, tokens * flops_per_token(shape, tokens))

    # RL: hf engine rollout, then the clipped update on the rollouts
    from stages.common.policy_update.ppo import PPOSettings, ppo_update
    from stages.common.rollout import SamplingParams
    from stages.common.rollout.hf import HFEngine

    engine = HFEngine(policy, processor)
    prompts = [random_prompt(processor, cfg["image"], 10 + i) for i in range(cfg["rl_prompts"])]
    params = SamplingParams(n=cfg["rl_n"], max_new_tokens=cfg["rl_new"], seed=0)
    settings = PPOSettings(micro_batch_tokens=cfg["update_tokens"], shared_prefix=False)

    def rl_step():
        policy.eval()
        with torch.no_grad():
            groups = engine.generate(prompts, params)
        policy.train()
        completions = [c for g in groups for c in g]
        index = [p for p, g in enumerate(groups) for _ in g]
        advantages = torch.randn(len(completions))
        sync(device)
        start = time.perf_counter()
        ppo_update(settings, accelerator, trained, processor, prompts, completions, index, advantages)
        sync(device)
        return time.perf_counter() - start, sum(len(c.token_ids) for c in completions)

    memory.start()
    seconds, (update_s, generated) = timed(rl_step, device, 1)
    plan = mp.training_plan("rl", policy=shape, backend="none", world=1, width=width, gpu_bytes=1 << 50,
                            micro_batch_tokens=cfg["update_tokens"], checkpointing=True,
                            rollout={"engine": "hf", "tokens": cfg["rl_prompts"] * (256 + cfg["rl_n"] * cfg["rl_new"])})
    record("rl", seconds, generated, plan.peak.total)
    stages["rl"].update(update_s=round(update_s, 4), rollout_s=round(seconds - update_s, 4),
                        generated_tokens_per_s=round(generated / max(seconds - update_s, 1e-9), 1))

    # align: score a group (teacher + n rollouts, caption and think) under the budget, BT loss, both updates
    from stages.align.scoring import score_groups

    disc_optimizer = build_optimizer(disc, lr=1e-6)
    words = " ".join(["the circle is left of the square so the answer is two"] * (cfg["segment"] // 8))
    segments = [[words] * (2 * (cfg["align_n"] + 1))]

    def align_step():
        disc_optimizer.zero_grad(set_to_none=True)
        result = score_groups(disc, processor, prompts[:1], segments, "shared", output_router_logits=True,
                              max_segment_tokens=cfg["segment"], max_row_tokens=cfg["budget"])
        s = torch.cat(result.scores)
        n = cfg["align_n"]
        loss = -torch.nn.functional.logsigmoid(s[0] - s[2:2 + n]).mean() - torch.nn.functional.logsigmoid(
            s[1] - s[2 + n:]).mean() + 0.01 * result.aux_loss
        result.backward(loss)   # re-runs the budget's chunks with their graphs (ScoreResult.backward)
        disc_optimizer.step()
        return result.num_tokens

    align_step()
    memory.start()
    seconds, scored = timed(align_step, device, cfg["steps"])
    plan = mp.training_plan("align", policy=shape, discriminator=disc_shape, backend="none", world=1, width=width,
                            gpu_bytes=1 << 50, micro_batch_tokens=cfg["update_tokens"], checkpointing=True,
                            disc_tokens=scored, disc_row_tokens=cfg["budget"], disc_checkpointing=True)
    scoring_phase = next(p for p in plan.phases if p.name == "scoring")
    record("align_discriminator", seconds, scored, scoring_phase.total, scored * flops_per_token(disc_shape, cfg["budget"]))
    result["stages"] = stages
    result["total_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result, indent=1))
    if args.out:
        write_json(Path(args.out), result)
    return 0


def write_json(path: Path, data: dict) -> None:
    """Whole or not at all: a reader (or a kill) never meets half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


if __name__ == "__main__":
    raise SystemExit(main())
