"""The device check's steps (benchmarks/device/run.sh runs them in order, each in its own process under its
own time limit), and the results file they build up.

    python3 benchmarks/device/check.py STEP --parts DIR      # one step; its figures go to DIR/STEP.json as it goes
    python3 benchmarks/device/check.py collect --parts DIR --results DIR [--step STEP --rc N]

Steps: env (versions, what is importable), stages (gpu_check.py: sft, rl and align steps through the stage code),
cli (`prism sft|rl|align` on a random-weight checkpoint, a few steps each), rollout (the hf engine's shared-prefix
decode vs model.generate), disc_memory (discriminator scoring peak vs response length), attention (sdpa's
kernels at the policy's attention shape). `collect` merges the parts into RESULTS/gpu_check-<machine>.json and
prints one summary line.

The mode comes from $PRISM_DEVICE_MODE: gpu (the real 2B shape in bf16; the default where CUDA exists) or cpu
(shrunken shapes, fp32, one thread: the rehearsal on a machine without a GPU). docs/gpu-check.md explains the
figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

STEPS = ("env", "stages", "cli", "rollout", "disc_memory", "attention")
GIB = 1024 ** 3

# What each step runs, by mode. gpu: sized so that all steps end within about 7 minutes on one H100 (the
# stage and CLI runs are a few steps each; their figures are per step). cpu: seconds each on one thread.
SIZES = {
    "gpu": dict(cli_sft=dict(samples=24, steps=2, batch=8, max_length=4096),
                cli_rl=dict(prompts=2, n=4, new=256), cli_align=dict(prompts=1, n=4, new=256),
                rollout=["--model", "qwen3vl-2b-shape", "--prompts", "4", "--n", "8", "--max-new-tokens", "128",
                         "--reps", "2"],
                disc=dict(lengths=[1024, 2048, 4096], rollouts=2, budget=2048),
                attention=dict(lengths=[2048, 8192], reps=5)),
    "cpu": dict(cli_sft=dict(samples=8, steps=1, batch=2, max_length=1024),
                cli_rl=dict(prompts=2, n=2, new=8), cli_align=dict(prompts=1, n=2, new=8),
                rollout=["--model", "tiny", "--prompts", "2", "--n", "2", "--max-new-tokens", "8", "--reps", "1"],
                disc=dict(lengths=[16, 32, 64], rollouts=1, budget=48),
                attention=dict(lengths=[128, 256], reps=2)),
}
# Modules the device command imports; a missing one fails the env step (and so the rehearsal).
REQUIRED = ("torch", "torchvision", "transformers", "accelerate", "typer", "rich", "yaml", "safetensors",
            "tokenizers", "PIL", "numpy", "pyarrow", "math_verify")
# Known absent on the lent image; recorded, never required (each has a fallback the figures name).
OPTIONAL = ("flash_attn", "vllm", "deepspeed", "datasets", "matplotlib", "pandas", "google.genai", "gguf")


def mode() -> str:
    want = os.environ.get("PRISM_DEVICE_MODE", "")
    if want in ("gpu", "cpu"):
        return want
    if want:
        raise SystemExit(f"PRISM_DEVICE_MODE={want!r}: use gpu or cpu")
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


# ------------------------------------------------------------------------------------------------ results

def write_json(path: Path, data) -> None:
    """Whole or not at all, so a step killed at its time limit leaves its last complete figures."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


class Part:
    """One step's figures, rewritten to PARTS/<step>.json after every piece it finishes."""

    def __init__(self, parts: Path, step: str):
        self.path = parts / f"{step}.json"
        self.data = {"step": step, "mode": mode(), "status": "running", "started": time.time(), "figures": {}}
        self.save()

    def add(self, name: str, figures) -> None:
        self.data["figures"][name] = figures
        shown = figures[-1] if isinstance(figures, list) and figures else figures   # a growing list: its newest
        print(json.dumps({name: shown}, default=str), flush=True)
        self.save()

    def save(self) -> None:
        write_json(self.path, self.data)

    def done(self, status: str = "ok", **extra) -> None:
        self.data.update(status=status, seconds=round(time.time() - self.data["started"], 1), **extra)
        self.save()


def machine_name(device: str) -> str:
    """A file-name slug for the device: 'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3'; cpu mode -> 'cpu'."""
    words = re.findall(r"[a-z0-9]+", device.lower())
    words = [w for w in words if w not in ("nvidia", "tesla")]
    return "-".join(words) or "unknown"


def collect(parts: Path, results: Path, step: str | None = None, rc: int | None = None) -> dict:
    """Merge every part into results/gpu_check-<machine>.json; a step that ended with rc != 0 is marked
    failed (124: its time limit) while the figures it finished stay."""
    if step is not None and rc is not None:
        part_path = parts / f"{step}.json"
        part = json.loads(part_path.read_text()) if part_path.is_file() else {"step": step, "figures": {}}
        if rc != 0:
            part["status"] = "timed out" if rc in (124, 137) else "failed"
            part["rc"] = rc
        elif part.get("status") == "running":
            part["status"] = "failed"
            part["error"] = "exited 0 without finishing its part"
        write_json(part_path, part)
    steps = {}
    earlier = os.environ.get("PRISM_DEVICE_MERGE", "")
    if earlier:   # a rerun of some steps on a fresh machine: the first run's other steps stay
        steps.update(json.loads(Path(earlier).read_text()).get("steps", {}))
    for name in STEPS:
        path = parts / f"{name}.json"
        if path.is_file():
            steps[name] = json.loads(path.read_text())
    env = steps.get("env", {}).get("figures", {}).get("versions", {})
    device = env.get("device", "unknown")
    run_mode = next((s.get("mode") for s in steps.values() if s.get("mode")), "unknown")
    machine = "cpu" if run_mode == "cpu" else machine_name(device)
    result = {"benchmark": "device check (benchmarks/device/run.sh; docs/gpu-check.md)", "mode": run_mode,
              "machine": machine, "device": device, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "steps": steps, "summary": summary_line(run_mode, machine, steps)}
    write_json(results / f"gpu_check-{machine}.json", result)
    return result


def _fmt(x, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def summary_line(run_mode: str, machine: str, steps: dict) -> str:
    """One line naming each step's status and its headline figures (the rehearsal's last line)."""
    bits = []
    for name in STEPS:
        part = steps.get(name)
        if part is None:
            bits.append(f"{name}: not run")
            continue
        fig = part.get("figures", {})
        status = part.get("status", "?")
        head = ""
        if name == "stages":
            head = ", ".join(f"{k} {_fmt(v.get('step_s'))} s" + (f" mfu {_fmt(v['mfu'], '.2f')}" if "mfu" in v else "")
                             + f" peak/plan {_fmt(v.get('peak_gib'))}/{_fmt(v.get('plan_gib'))} GiB"
                             for k, v in fig.get("gpu_check", {}).get("stages", {}).items())
        elif name == "cli":
            head = ", ".join(f"{k} {_fmt(v.get('wall_s'), '.0f')} s peak/plan {_fmt(v.get('peak_gib'))}/"
                             f"{_fmt(v.get('plan_gib'))} GiB"
                             for k, v in fig.items() if isinstance(v, dict) and "wall_s" in v)
        elif name == "rollout":
            r = fig.get("throughput", {})
            head = (f"{_fmt(r.get('median_hf_engine_tok_per_s'), '.0f')} vs "
                    f"{_fmt(r.get('median_straightforward_tok_per_s'), '.0f')} tok/s") if r else ""
        elif name == "disc_memory":
            g = fig.get("growth_exponent", {})
            head = " ".join(f"{k} x^{_fmt(v, '.2f')}" for k, v in g.items())
        elif name == "attention":
            head = f"{len(fig.get('cases', []))} cases"
        elif name == "env":
            missing = fig.get("missing", [])
            head = f"missing {','.join(missing)}" if missing else "all imports"
        bits.append(f"{name}: {status}" + (f" ({head})" if head else ""))
    ok = sum(1 for n in STEPS if steps.get(n, {}).get("status") == "ok")
    return f"device check [{run_mode}, {machine}] {ok}/{len(STEPS)} steps ok | " + " | ".join(bits)


# ------------------------------------------------------------------------------------------------ steps

def step_env(part: Part) -> bool:
    import importlib
    import importlib.metadata as md

    missing, versions, absent = [], {"python": platform.python_version()}, {}
    for name in REQUIRED:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001  (any failure to import is the finding)
            missing.append(name)
            versions[name] = f"import failed: {type(e).__name__}: {e}"
    for dist in ("torch", "torchvision", "transformers", "accelerate", "typer", "rich", "safetensors", "tokenizers",
                 "numpy", "pillow", "pyarrow", "math-verify", "huggingface-hub"):
        try:
            versions.setdefault(dist, md.version(dist))
        except md.PackageNotFoundError:
            versions.setdefault(dist, None)
    for name in OPTIONAL:
        try:
            absent[name] = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            absent[name] = False
    import torch

    versions["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        versions.update(cuda=torch.version.cuda, capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                        gpu_memory_gib=round(props.total_memory / GIB, 1), multiprocessors=props.multi_processor_count)
    try:   # the processor stack that a stage loads (fails without torchvision) and the CLI's import
        from transformers import Qwen3VLProcessor  # noqa: F401

        import prism_cli.app  # noqa: F401
    except Exception as e:  # noqa: BLE001
        missing.append(f"prism import ({type(e).__name__}: {e})")
    part.add("versions", versions)
    part.add("optional_present", absent)
    part.add("missing", missing)
    return not missing


def step_stages(part: Part) -> bool:
    """gpu_check.py through the stage code; its own --out is this part's figure, rewritten per stage."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    out = part.path.with_name("stages.gpu_check.json")
    try:
        gpu_check.main(["--mode", mode(), "--out", str(out)])
    finally:
        if out.is_file():
            part.add("gpu_check", json.loads(out.read_text()))
    return True


def make_random_checkpoint(folder: Path) -> dict:
    """A plain HF folder holding qwen3vl-2b-shape (gpu, bf16) or its shrunken twin (cpu) with random weights
    and gpu_check's processor (tiny tokenizer, patch-16 images): what `prism --ckpt DIR` trains from."""
    import torch
    from transformers import AutoModelForImageTextToText

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    processor = gpu_check.shape_processor()
    config = gpu_check.shape_config(mode(), processor.tokenizer)
    device = torch.device("cuda" if mode() == "gpu" else "cpu")
    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=gpu_check.MODES[mode()]["dtype"])
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    params = sum(p.numel() for p in model.parameters())
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"params": params, "seconds": round(time.perf_counter() - start, 1)}


def run_prism(args: list[str], work: Path, name: str) -> dict:
    """`prism ARGS` through peak.py, its --dry-run first in the same process: wall time (the dry run
    included), exit code, peak memory, the plan's peak, the output's tail on failure."""
    peak_file, plan_file = work / f"{name}.peak.json", work / f"{name}.plan.json"
    env = dict(os.environ, PRISM_DEVICE_PEAK=str(peak_file), PRISM_DEVICE_PLAN=str(plan_file), COLUMNS="200",
               PYTHONPATH=str(ROOT))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("peak.py")), *args], env=env,
                          capture_output=True, text=True)
    out = {"wall_s": round(time.perf_counter() - start, 1), "rc": proc.returncode,
           "command": "prism " + " ".join(args)}
    if peak_file.is_file():
        peak = json.loads(peak_file.read_text())
        key = "cuda_peak_bytes" if "cuda_peak_bytes" in peak else "maxrss_bytes"
        out["peak_gib"] = round(peak[key] / GIB, 3)
        out["peak_kind"] = key
    if plan_file.is_file():
        plan = json.loads(plan_file.read_text())
        out["plan_gib"] = planned_peak_gib(plan["output"])
        if plan["rc"] or out["plan_gib"] is None:
            out["plan_error"] = plan["output"][-2000:]
    if proc.returncode:
        out["output_tail"] = (proc.stdout + proc.stderr)[-3000:]
    return out


def planned_peak_gib(text: str) -> float | None:
    """The plan's peak from `--dry-run` output ('fits: peak 12.34 GiB (update) ...')."""
    m = re.search(r"peak ([0-9.]+) GiB", text)
    return float(m.group(1)) if m else None


def stage_figures(stage: str, metrics: list[dict]) -> dict:
    """Per-step figures from a run's metrics.jsonl: sft's tokens/s; rl and align's phase times."""
    rows = [r for r in metrics if isinstance(r.get("step"), int)]
    figs = {"steps_logged": len(rows)}
    if stage == "sft":
        speeds = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
        if speeds:
            figs["median_tokens_per_s"] = round(statistics.median(speeds), 1)
    for key in sorted({k for r in rows for k in r if k.startswith("time/")}):
        figs[key.replace("/", "_") + "_s"] = round(statistics.median(r[key] for r in rows if key in r), 3)
    return figs


def step_cli(part: Part) -> bool:
    """The stages as a user runs them: `prism sft`, then `prism rl` and `prism align` from its checkpoint,
    each with its --dry-run plan beside the measured peak. A failed run (or a missing plan) fails the step."""
    import shutil

    from stages.common.contract.checkpoint import MANIFEST

    sizes = SIZES[mode()]
    work = Path(os.environ.get("PRISM_DEVICE_WORK", "/tmp/prism-device")) / "cli"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    base = work / "random-2b-shape"
    part.add("checkpoint", make_random_checkpoint(base))
    s, r, a = sizes["cli_sft"], sizes["cli_rl"], sizes["cli_align"]
    runs = {
        "sft": ["sft", "--ckpt", str(base), "--data", f"synth:train:{s['samples']}", "--max-steps", str(s["steps"]),
                "--batch-size", str(s["batch"]), "--micro-batch-size", str(s["batch"]), "--max-length",
                str(s["max_length"]), "--gradient-checkpointing", "--eval-every", "1000", "--save-every", "1000"],
        "rl": ["rl", "--ckpt", str(work / "sft"), "--algo", "grpo", "--engine", "hf", "--data", "synth:train:8",
               "--steps", "1", "--prompts-per-step", str(r["prompts"]), "--rollouts-per-prompt", str(r["n"]),
               "--max-new-tokens", str(r["new"]), "--warmup", "0", "--gradient-checkpointing"],
        "align": ["align", "--ckpt", str(work / "sft"), "--engine", "hf", "--data", "synth:train:8", "--steps", "1",
                  "--prompts-per-step", str(a["prompts"]), "--rollouts-per-prompt", str(a["n"]), "--max-new-tokens",
                  str(a["new"]), "--warmup-steps", "1", "--warmup-prompts", "2", "--warmup-batch", "2",
                  "--gradient-checkpointing"],
    }
    ok = True
    for stage, args in runs.items():
        out = work / stage
        figs = run_prism([*args, "--out", str(out)], work, stage)
        if figs.get("peak_gib") and figs.get("plan_gib"):
            figs["plan_over_measured"] = round(figs["plan_gib"] / figs["peak_gib"], 3)
        metrics = out / "metrics.jsonl"
        if metrics.is_file():
            figs.update(stage_figures(stage, [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]))
        figs["checkpoint_complete"] = (out / MANIFEST).is_file()
        part.add(stage, figs)
        if figs["rc"] or not figs["checkpoint_complete"] or figs.get("plan_gib") is None:
            ok = False
            break   # rl and align train from sft's checkpoint
    return ok


def step_rollout(part: Part) -> bool:
    """rollout_throughput.py: shared-prefix decode (hf engine) vs model.generate on the same prompts."""
    out = part.path.with_name("rollout.throughput.json")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "rollout_throughput.py"), *SIZES[mode()]["rollout"],
                           "--out", str(out)], env=env, capture_output=True, text=True)
    if proc.returncode or not out.is_file():
        part.add("error", (proc.stdout + proc.stderr)[-3000:])
        return False
    data = json.loads(out.read_text())
    part.add("throughput", {k: data[k] for k in ("config", "median_hf_engine_tok_per_s",
                                                 "median_straightforward_tok_per_s", "ratio_of_medians",
                                                 "median_tokens")})
    return True


def growth_exponent(points: list[dict]) -> float:
    """Log-log slope of the peak between the two longest lengths: ~1 linear, ~2 quadratic."""
    a, b = sorted(points, key=lambda p: p["length"])[-2:]
    return math.log(b["peak_bytes"] / a["peak_bytes"]) / math.log(b["length"] / a["length"])


def step_disc_memory(part: Part) -> bool:
    """Scoring (forward + backward) peak of the upcycled 2B-shape discriminator against response length,
    one row per group (`whole`) vs rows under the token budget (`budget`); one process, peak above the
    state before each step (max_memory_allocated on a GPU, the resident set on a CPU). Long because the
    model is built once and every (layout, length) is measured in this one process, in order."""
    import torch

    from benchmarks.memory_plan_check import Meter
    from stages.align.scoring import score_groups
    from stages.common.models.discriminator import Qwen3VLMoeDiscriminator, moe_config_from_dense

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    sizes = SIZES[mode()]["disc"]
    device = torch.device("cuda" if mode() == "gpu" else "cpu")
    processor = gpu_check.shape_processor()
    config = moe_config_from_dense(gpu_check.shape_config(mode(), processor.tokenizer))
    torch.manual_seed(0)
    with torch.device(device):
        disc = Qwen3VLMoeDiscriminator._from_config(config, dtype=gpu_check.MODES[mode()]["dtype"],
                                                    attn_implementation="sdpa")
    disc.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    disc.config.use_cache = False
    disc.train()
    prompt = gpu_check.random_prompt(processor, 64, 0)
    words = "the red circle is left of two blue squares so count them and add three then answer".split()
    meter = Meter(device)
    runs = []
    for layout in ("whole", "budget"):
        for i, length in enumerate(sizes["lengths"]):
            text = " ".join(words[k % len(words)] for k in range(2 * length))
            segments = [text] * (2 * (sizes["rollouts"] + 1))

            def step():
                disc.zero_grad(set_to_none=True)
                result = score_groups(disc, processor, [prompt], [segments], "shared", output_router_logits=True,
                                      max_segment_tokens=length,
                                      max_row_tokens=None if layout == "whole" else sizes["budget"])
                # the budget's chunks are backpropagated by re-running each one (ScoreResult.backward)
                result.backward(torch.cat(result.scores).sum() + 0.01 * result.aux_loss)
                return result

            if i == 0:
                step()                      # warm-up: kernels, allocator
            disc.zero_grad(set_to_none=True)
            base = meter.current()
            meter.reset_peak()
            start = time.perf_counter()
            try:
                result = step()
            except torch.OutOfMemoryError:
                runs.append({"layout": layout, "length": length, "error": "out of memory"})
                part.add("runs", runs)
                disc.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                continue
            if device.type == "cuda":
                torch.cuda.synchronize()
            runs.append({"layout": layout, "length": length, "peak_bytes": meter.peak() - base,
                         "peak_gib": round((meter.peak() - base) / GIB, 3), "tokens": result.num_tokens,
                         "rows": result.num_rows, "seconds": round(time.perf_counter() - start, 3)})
            part.add("runs", runs)
    part.add("growth_exponent", {layout: round(growth_exponent(pts), 2) for layout in ("whole", "budget")
                                 if len(pts := [r for r in runs if r["layout"] == layout and "peak_bytes" in r]) >= 2})
    part.add("setup", {"budget_tokens": sizes["budget"], "rollouts": sizes["rollouts"],
                       "group": "1 prompt (64x64 image) x 2 x (rollouts + teacher) segments of `length` tokens",
                       "discriminator_params": sum(p.numel() for p in disc.parameters())})
    return True


def step_attention(part: Part) -> bool:
    """sdpa at the 2B policy's attention shape (16 query heads, 8 kv heads, head_dim 128), forward + backward:
    causal without a mask (what a single unpadded row gets) vs an explicit mask (what padded batches and
    packed or budgeted rows get), each sdpa kernel tried alone. Long because a kernel that cannot take a
    case must leave its reason in the figures instead of ending the step."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sizes = SIZES[mode()]["attention"]
    device = torch.device("cuda" if mode() == "gpu" else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    heads, kv_heads, dim = (16, 8, 128) if mode() == "gpu" else (2, 1, 32)
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    if device.type != "cuda":
        backends = {"math": SDPBackend.MATH, "flash(cpu)": SDPBackend.FLASH_ATTENTION}
    cases = []
    for length in sizes["lengths"]:
        g = torch.Generator(device=device).manual_seed(length)
        q = torch.randn(1, heads, length, dim, device=device, dtype=dtype, generator=g).requires_grad_()
        k = torch.randn(1, kv_heads, length, dim, device=device, dtype=dtype, generator=g).requires_grad_()
        v = torch.randn(1, kv_heads, length, dim, device=device, dtype=dtype, generator=g).requires_grad_()
        mask = torch.ones(length, length, device=device, dtype=torch.bool).tril()
        for masked in (False, True):
            for name, backend in backends.items():
                def run():
                    with sdpa_kernel([backend]):
                        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask if masked else None,
                                                             is_causal=not masked, enable_gqa=True)
                    out.sum().backward()
                case = {"length": length, "mask": "explicit [T, T]" if masked else "none (is_causal)",
                        "kernel": name}
                try:
                    run()                                   # warm-up
                    times = []
                    for _ in range(sizes["reps"]):
                        if device.type == "cuda":
                            torch.cuda.synchronize()
                            torch.cuda.reset_peak_memory_stats()
                        start = time.perf_counter()
                        run()
                        if device.type == "cuda":
                            torch.cuda.synchronize()
                        times.append(time.perf_counter() - start)
                    seconds = statistics.median(times)
                    # causal fwd: QK^T and PV, T*T*d multiply-adds/2 each per head; bwd about 2.5 x fwd
                    flops = 3.5 * 2 * length * length * dim * heads
                    case.update(ms=round(1000 * seconds, 3), tflops=round(flops / seconds / 1e12, 1))
                    if device.type == "cuda":
                        case["peak_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 3)
                except RuntimeError as e:                   # a kernel that cannot take this case says so
                    case["unavailable"] = str(e).splitlines()[0][:200]
                q.grad = k.grad = v.grad = None
                cases.append(case)
                part.add("cases", cases)
    part.add("note", "sdpa is what runs on the lent image (no flash-attn). Without a mask sdpa can pick its "
                     "flash kernel; any explicit mask (padded batches, discriminator budget rows, packed SFT "
                     "rows) rules flash out and leaves the efficient/cudnn/math kernels, each materialising or "
                     "streaming the [T, T] mask. flash-attn 2 (attn=flash_attention_2, `prism-vlm[flash]`) "
                     "would take packed rows as varlen sequences with no mask at all: SFT's `--packing auto` "
                     "turns packing on only then, so with sdpa SFT pads length-grouped micro-batches instead.")
    return True


STEP_FUNCTIONS = {"env": step_env, "stages": step_stages, "cli": step_cli, "rollout": step_rollout,
                  "disc_memory": step_disc_memory, "attention": step_attention}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=(*STEPS, "collect"))
    ap.add_argument("--parts", required=True, help="folder of the steps' part files")
    ap.add_argument("--results", help="collect: folder of the merged results file")
    ap.add_argument("--step", dest="finished", help="collect: the step that just ended")
    ap.add_argument("--rc", type=int, help="collect: its exit code")
    args = ap.parse_args(argv)
    parts = Path(args.parts)
    if args.step == "collect":
        result = collect(parts, Path(args.results or parts), args.finished, args.rc)
        print(result["summary"], flush=True)
        return 0
    import torch

    if mode() == "cpu":
        torch.set_num_threads(1)
    part = Part(parts, args.step)
    try:
        ok = STEP_FUNCTIONS[args.step](part)
    except BaseException as e:
        import traceback

        part.done("failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-3000:])
        raise
    part.done("ok" if ok else "failed")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
