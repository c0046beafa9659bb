"""The memory plan: published shapes counted on the meta device, each backend's sharding on hand-made
shapes, the --dry-run table and verdict, and (slow) the plan against a measured training step."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stages.align import plan as align_plan
from stages.common.contract.checkpoint import resolve
from stages.common.contract.errors import UsageError
from stages.common.plan import memory as mp
from stages.common.plan import report as plan_report

ROOT = Path(__file__).resolve().parents[1]
GB = 10 ** 9


def test_published_4b_shape_counts():
    shape = plan_report.policy_shape(resolve("qwen3vl-4b-shape"))
    assert round(shape.params / 1e9, 3) == 4.438
    assert round(shape.vision_params / 1e9, 3) == 0.415
    assert shape.vocab * shape.hidden == 388_956_160            # tied embeddings, 0.389B
    assert (shape.hidden, shape.layers, shape.intermediate, shape.q_width, shape.kv_width) == (2560, 36, 9728,
                                                                                               4096, 1024)
    # a known hub id plans offline from the same published config
    assert plan_report.policy_shape(resolve("Qwen/Qwen3-VL-4B-Instruct")).params == shape.params


def test_upcycled_2b_discriminator_counts():
    disc = plan_report.discriminator_shape(resolve("qwen3vl-2b-shape"), upcycle=True, dense=False, num_experts=4,
                                           top_k=2, aux_loss_coef=0.01)
    assert round(disc.params / 1e9, 2) == 5.30
    assert (disc.experts, disc.top_k, disc.has_lm_head) == (4, 2, False)
    dense = plan_report.policy_shape(resolve("qwen3vl-2b-shape"))
    assert round(dense.params / 1e9, 2) == 2.13 and disc.params > 2 * dense.params


SHAPE = mp.ModelShape(name="hand", params=8 * GB // 8, vision_params=GB // 8, hidden=1000, layers=10,
                      intermediate=3000, q_width=1000, kv_width=500, vocab=10_000, largest_layer_params=10_000_000)


def test_each_backend_shards_what_it_should():
    p = SHAPE.params
    ddp = mp.training_state(SHAPE, "ddp", 8, 2)
    assert ddp == {"weights": 2 * p, "grads": 2 * p, "master": 0, "optimizer": 4 * p, "buffers": 2 * p, "cpu": 0}
    z2 = mp.training_state(SHAPE, "zero2", 8, 2)
    assert (z2["weights"], z2["grads"], z2["master"], z2["optimizer"]) == (2 * p, p // 2, p // 2, p)
    z3 = mp.training_state(SHAPE, "zero3", 8, 2)
    assert z3["weights"] == p // 4 and z3["buffers"] == 2 * 10_000_000 * 2 + 2 * mp.DEEPSPEED_BUCKET_ELEMENTS * 2
    fsdp = mp.training_state(SHAPE, "fsdp2", 8, 2)
    assert fsdp["weights"] == p // 2 and fsdp["master"] == 0 and fsdp["optimizer"] == p
    off = mp.training_state(SHAPE, "offload", 8, 2)
    assert off["weights"] == off["optimizer"] == 0 and off["cpu"] == p * 2 // 8 + p * 16 // 8
    frozen_vision = mp.training_state(SHAPE, "zero2", 8, 2, freeze_vision=True)
    assert frozen_vision["optimizer"] == (p - SHAPE.vision_params) * 8 // 8
    assert mp.frozen_state(SHAPE, "zero2", 8, 2) == 2 * p
    assert mp.frozen_state(SHAPE, "zero3", 8, 2) == 2 * p // 8 + 2 * 10_000_000 * 2
    with pytest.raises(ValueError):
        mp.training_state(SHAPE, "zero4", 8, 2)


def test_activations_are_linear_in_tokens_and_checkpointing_saves():
    for ckpt in (False, True):
        a1 = mp.activation_bytes(SHAPE, 1000, 2, ckpt)
        a2 = mp.activation_bytes(SHAPE, 2000, 2, ckpt)
        assert a2 == 2 * a1
    assert mp.activation_bytes(SHAPE, 1000, 2, True) < mp.activation_bytes(SHAPE, 1000, 2, False) / 3
    per_token = mp.layer_activation_bytes_per_token(SHAPE, 4)
    assert per_token == 24 * 1000 + 20 * 1000 + 16 * 500 + 16 * 3000       # fp32: 4 (6H + 5Hq + 4Hkv + 4I)


def test_parse_size():
    assert mp.parse_size("80GiB") == 80 * 2 ** 30
    assert mp.parse_size("80 GB") == 80 * 10 ** 9
    assert mp.parse_size("141") == 141 * 2 ** 30
    for bad in ("lots", "-1GiB", "80XB", "0"):
        with pytest.raises(ValueError):
            mp.parse_size(bad)


def test_plan_phases_and_verdict():
    plan = mp.training_plan("rl", policy=SHAPE, backend="zero2", world=8, width=2, gpu_bytes=80 * 2 ** 30,
                            micro_batch_tokens=16384, checkpointing=True,
                            rollout={"engine": "vllm", "fraction": 0.4, "sleep": True})
    rollout, update = plan.phases
    assert "policy grads" not in rollout.parts and "policy grads" in update.parts
    assert rollout.parts["vLLM pool (0.4 x usable memory)"] == int(0.4 * 80 * 2 ** 30)
    assert [k for k in update.parts if k.startswith("vLLM")] == ["vLLM asleep"]   # slept through the update
    awake = mp.training_plan("rl", policy=SHAPE, backend="zero2", world=8, width=2, gpu_bytes=80 * 2 ** 30,
                             micro_batch_tokens=16384, checkpointing=True,
                             rollout={"engine": "vllm", "fraction": 0.4, "sleep": False})
    assert awake.phases[1].total - update.total == int(0.4 * 80 * 2 ** 30) - mp.VLLM_ASLEEP_BYTES
    assert plan.fits and plan.verdict().startswith("fits")
    tight = mp.training_plan("sft", policy=SHAPE, backend="ddp", world=8, width=2, gpu_bytes=2 ** 30,
                             micro_batch_tokens=1024, checkpointing=False)
    assert not tight.fits and "DOES NOT FIT" in tight.verdict()


def test_every_term_of_a_zero2_rl_plan_by_hand():
    """SHAPE (1e9 parameters, vocab 10,000 x hidden 1,000, tied) under ZeRO-2 on 8 GPUs of 80 GiB, bf16,
    vLLM 0.4: each phase's parts, computed by hand."""
    import dataclasses

    tied = dataclasses.replace(SHAPE, tied_embeddings=True)
    gpu = 80 * 2 ** 30
    plan = mp.training_plan("rl", policy=tied, backend="zero2", world=8, width=2, gpu_bytes=gpu,
                            micro_batch_tokens=16384, checkpointing=True, entropy=True, logits_chunk=512,
                            rollout={"engine": "vllm", "fraction": 0.4, "sleep": True, "empty_cache": True})
    rollout, update = plan.phases
    context, asleep, pool = int(1.2 * 2 ** 30), int(1.0 * 2 ** 30), int(0.4 * gpu)
    states = {"policy weights": 2 * 10 ** 9, "policy fp32 master": 5 * 10 ** 8, "policy Adam m, v": 10 ** 9,
              "policy comm/gather buffers": 2 * 10 ** 9}
    assert rollout.parts == {"CUDA context + NCCL": context, **states, "vLLM pool (0.4 x usable memory)": pool}
    assert update.parts == {
        "CUDA context + NCCL": context, "vLLM asleep": asleep, **states,
        "policy grads": 5 * 10 ** 8,                                  # fp32 shard: 4 bytes x 1e9 / 8
        "policy bf16 grad shard": 25 * 10 ** 7,                       # 2 bytes x 1e9 / 8
        "policy activations": mp.activation_bytes(tied, 16384, 2, True),
        "logits chunk": 2 * 512 * 10_000 * (2 + 8),
        "entropy buffers (logits chunk)": 2 * 512 * 10_000 * 4,       # softmax and p * z, fp32
        "tied embedding grads (embedding + lm_head)": 2 * 10_000 * 1000 * 2}
    assert plan.peak is rollout and rollout.total == context + 55 * 10 ** 8 + pool


def test_without_empty_cache_the_rollout_holds_the_largest_reserve():
    """vLLM takes its pool from the driver on wake: PyTorch's cached reserve of the update stays in the way
    unless the cache is emptied first."""
    kw = dict(policy=SHAPE, backend="zero2", world=8, width=2, gpu_bytes=80 * 2 ** 30, micro_batch_tokens=16384,
              checkpointing=True, entropy=True)
    emptied = mp.training_plan("rl", rollout={"engine": "vllm", "fraction": 0.4, "empty_cache": True}, **kw)
    kept = mp.training_plan("rl", rollout={"engine": "vllm", "fraction": 0.4, "empty_cache": False}, **kw)
    update = emptied.phases[1].total
    reserve = update - mp.CUDA_CONTEXT_BYTES - mp.VLLM_ASLEEP_BYTES     # what PyTorch allocated in the update
    assert kept.phases[0].total == mp.CUDA_CONTEXT_BYTES + reserve + int(0.4 * 80 * 2 ** 30)
    assert kept.phases[0].total - emptied.phases[0].total == reserve - (
        sum(v for k, v in emptied.phases[0].parts.items() if k.startswith("policy")))
    assert any("empty_cache" in note for note in kept.notes)


def test_the_align_plan_has_a_warmup_phase_without_policy_grads():
    disc = dataclasses_replace(SHAPE, name="disc", experts=4, top_k=2, has_lm_head=False)
    plan = mp.training_plan("align", policy=SHAPE, backend="zero2", world=8, width=2, gpu_bytes=80 * 2 ** 30,
                            micro_batch_tokens=16384, checkpointing=True, entropy=True, discriminator=disc,
                            disc_tokens=40_000, disc_row_tokens=8192, warmup_pair_tokens=14_336,
                            rollout={"engine": "vllm", "fraction": 0.4})
    assert [p.name for p in plan.phases] == ["warmup", "rollout", "scoring", "update"]
    warmup, _, scoring, _ = plan.phases
    assert "policy grads" not in warmup.parts and "discriminator grads" in warmup.parts
    assert warmup.parts["scoring mask (one chunk)"] == 8192 * 8192 * 2           # the pair is chunked too
    assert warmup.parts["discriminator activations (one chunk)"] == mp.activation_bytes(disc, 8192, 2, True)
    assert scoring.total - warmup.total == 5 * 10 ** 8 + 25 * 10 ** 7            # the policy's grad shards


def test_the_issue_figures_for_the_4b_on_8_gpus():
    """Issue #28's terms at 4B / ZeRO-2 / 8 GPUs: bf16 grad shard +1.03 GiB, tied embedding grads +1.45 GiB,
    the entropy's buffers +0.58 GiB (512-token chunk); model states as DeepSpeed's estimator (17.57 GiB, which
    counts no communication bucket) plus our two buckets (1.86 GiB)."""
    shape = plan_report.policy_shape(resolve("qwen3vl-4b-shape"))
    assert shape.tied_embeddings
    state = mp.training_state(shape, "zero2", 8, 2)
    assert round(state["grads_low"] / mp.GIB, 2) == 1.03
    assert round(mp.tied_embedding_grad_bytes(shape, 2) / mp.GIB, 2) == 1.45
    assert round(mp.entropy_buffers_bytes(shape.vocab, 512) / mp.GIB, 2) == 0.58
    no_buckets = sum(v for k, v in state.items() if k not in ("buffers", "cpu"))
    assert round(no_buckets / mp.GIB, 2) == 17.57 and round(state["buffers"] / mp.GIB, 2) == 1.86


def dataclasses_replace(shape, **changes):
    import dataclasses

    return dataclasses.replace(shape, **changes)


def _prism(*args, env_extra=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", COLUMNS="250", PRISM_NO_PROGRESS="1")
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "prism_cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_dry_run_prints_the_plan_offline_for_a_published_shape():
    proc = _prism("sft", "--ckpt", "qwen3vl-4b-shape", "--data", "synth:train:64", "--batch-size", "16",
                  "--micro-batch-size", "2", "--backend", "zero2", "--world-size", "8", "--gpu-memory", "80GiB",
                  "--set", "max_length=4096", "--set", "gradient_checkpointing=true", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "4.438B parameters" in out and "memory per GPU (zero2 x 8)" in out
    assert "policy Adam m, v" in out and "policy activations" in out and "fits: peak" in out


def test_dry_run_rejects_a_bad_gpu_memory_and_a_shape_refuses_to_train(tmp_path):
    proc = _prism("sft", "--ckpt", "tiny", "--gpu-memory", "lots", "--dry-run")
    assert proc.returncode == 2 and "gpu_memory" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = _prism("sft", "--ckpt", "tiny", "--set", "backend=zero4", "--dry-run")
    assert proc.returncode == 2 and "zero4" in proc.stderr
    proc = _prism("sft", "--ckpt", "qwen3vl-2b-shape", "--data", "synth:train:64", "--batch-size", "8",
                  "--max-steps", "1", "--out", str(tmp_path / "o"))
    assert proc.returncode == 1 and "shape with no weights" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True])
def test_plan_matches_a_measured_cpu_step(checkpointing, tmp_path):
    """Qwen3-VL-2B width (hidden 2048, MLP 6144, 16/8 heads), 2 layers, vocabulary 4096, fp32 on the CPU:
    the planned state and step peak are within 15% of the measured resident memory."""
    out = tmp_path / "check.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "memory_plan_check.py"), "--layers", "2", "--tokens", "512",
           "--out", str(out)] + (["--checkpointing"] if checkpointing else [])
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ratio = json.loads(out.read_text())["ratio"]
    for key in ("state", "update_peak", "step_delta"):
        assert 0.85 <= ratio[key] <= 1.15, (key, ratio)


@pytest.mark.slow
def test_plan_matches_a_measured_cpu_step_of_the_moe_discriminator_shape(tmp_path):
    """The 2B width upcycled to 4 experts top-2, one layer: state and step peak within 15%. (The step's own
    memory above the state is under-planned by ~18% here: docs/memory-plan.md.)"""
    out = tmp_path / "check.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "memory_plan_check.py"), "--layers", "1", "--tokens", "512",
           "--moe", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ratio = json.loads(out.read_text())["ratio"]
    for key in ("state", "update_peak"):
        assert 0.85 <= ratio[key] <= 1.15, (key, ratio)


def test_auto_backend_is_what_the_launch_would_detect_at_the_planned_world_size(monkeypatch):
    for key in ("PRISM_BACKEND", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert plan_report.backend_of("auto", 1) == "none" and plan_report.backend_of("auto", 8) == "ddp"
    monkeypatch.setenv("PRISM_BACKEND", "zero3")                    # the launch honours it first
    assert plan_report.backend_of("auto", 8) == "zero3" and plan_report.backend_of("fsdp2", 8) == "fsdp2"
    monkeypatch.setenv("PRISM_BACKEND", "zero4")
    with pytest.raises(UsageError, match="PRISM_BACKEND='zero4' is not a backend"):
        plan_report.backend_of("auto", 8)
    monkeypatch.delenv("PRISM_BACKEND")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    assert plan_report.backend_of("auto", 8) == "zero2"


def test_the_align_plan_follows_the_launch_s_group_split():
    """4 prompts x 16 rollouts on 8 GPUs: each rank holds one prompt and 8 rollouts (the hf engine's KV cache),
    whole groups on 4 GPUs."""
    from stages.align.config import AlignConfig

    disc = dataclasses_replace(SHAPE, name="disc", experts=4, top_k=2, has_lm_head=False)
    for world, prompts, rollouts in ((8, 1, 8), (4, 1, 16), (2, 2, 16)):
        cfg = AlignConfig(engine="hf", backend="zero2", world_size=world, prompts_per_step=4, rollouts_per_prompt=16,
                          max_new_tokens=6144)
        rollout = next(p for p in align_plan.memory_plan(cfg, SHAPE, disc, True).phases if p.name == "rollout")
        assert rollout.parts["hf engine KV cache"] == mp.kv_cache_bytes(SHAPE, prompts * (2048 + rollouts * 6144), 2)


def test_disc_checkpointing_auto_follows_the_plan_and_picks_the_layout():
    """--disc-grad-checkpointing auto is on only where a phase the discriminator's activations peak in (warmup,
    scoring) does not fit without it; --disc-layout auto is prefix unless checkpointed (the prefix layout reads
    the prompt's KV cache, which checkpointing drops), and an explicit prefix turns auto checkpointing off."""
    from stages.align.config import AlignConfig

    disc = dataclasses_replace(SHAPE, name="disc", experts=4, top_k=2, has_lm_head=False)
    cfg = AlignConfig(engine="hf", backend="zero2", world_size=8, prompts_per_step=4, rollouts_per_prompt=16,
                      max_new_tokens=6144)
    without = align_plan.memory_plan(cfg, SHAPE, disc, True, disc_checkpointing=False)
    need = max(p.total for p in without.phases if p.name in align_plan.DISC_PHASES)
    tight = align_plan.memory_plan(cfg, SHAPE, disc, True, disc_checkpointing=False, gpu_bytes=need - 1)
    roomy = align_plan.memory_plan(cfg, SHAPE, disc, True, disc_checkpointing=False, gpu_bytes=need)
    assert align_plan.memory_plan(cfg, SHAPE, disc, True).phases != without.phases   # the setting reaches the plan
    assert align_plan.resolve_disc_settings("auto", "auto", tight) == (True, "shared")
    assert align_plan.resolve_disc_settings("auto", "auto", roomy) == (False, "prefix")
    assert align_plan.resolve_disc_settings("auto", "prefix", tight) == (False, "prefix")
    assert align_plan.resolve_disc_settings("auto", "separate", roomy) == (False, "separate")
    assert align_plan.resolve_disc_settings("on", "auto", None) == (True, "shared")
    assert align_plan.resolve_disc_settings("off", "auto", None) == (False, "prefix")


def test_disc_settings_are_checked_when_the_config_is():
    from stages.align.config import AlignConfig

    base = dict(ckpt="tiny", data=["synth:8"])
    with pytest.raises(UsageError, match="prefix cannot run with --disc-grad-checkpointing on"):
        AlignConfig(**base, disc_layout="prefix", disc_gradient_checkpointing="on").validate()
    with pytest.raises(UsageError, match="unknown disc_gradient_checkpointing"):
        AlignConfig(**base, disc_gradient_checkpointing="sometimes").validate()
    with pytest.raises(UsageError, match="unknown disc_layout"):
        AlignConfig(**base, disc_layout="packed").validate()
    yaml_bool = AlignConfig(**base, disc_gradient_checkpointing=False)   # YAML reads an unquoted off as False
    yaml_bool.validate()
    assert yaml_bool.disc_gradient_checkpointing == "off"


def test_the_dry_run_says_auto_only_where_auto_chose():
    from stages.align.config import AlignConfig
    from stages.align.run import disc_settings_row

    asked = AlignConfig(ckpt="tiny", data=["synth:8"])
    resolved = dataclasses.replace(asked, disc_layout="prefix", disc_gradient_checkpointing="off")
    assert disc_settings_row(resolved, asked) == ("scoring layout prefix (auto: prefix unless checkpointed), "
                                                  "gradient checkpointing off (auto: only where the plan needs it)")
    explicit = dataclasses.replace(asked, disc_layout="shared", disc_gradient_checkpointing="on")
    assert disc_settings_row(explicit, explicit) == "scoring layout shared, gradient checkpointing on"
