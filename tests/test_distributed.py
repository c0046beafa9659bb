"""Distribution: the backend layer's pieces (fast), and the conformance suite (marked dist): sft, the
clipped policy update of rl/align, and the align/rl stages with two CPU ranks (torchrun, gloo) under DDP,
FSDP2 (fully_shard) and DeepSpeed ZeRO-2/3 (deepspeed.initialize), against the single-process run at the
same global batch. Tolerances: losses 1e-5 relative, grad norms 1e-4 relative, weights 1e-4 absolute
(float32 reductions in another order; measured differences are 1e-7 to 2e-5)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stages.common.contract.errors import UsageError
from stages.common.training import distributed
from stages.common.training import runtime as training
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist_worker.py"


# ------------------------------------------------------------------------------------------ backend layer

@pytest.mark.parametrize("env,name", [
    ({}, "single"), ({"WORLD_SIZE": "2"}, "ddp"), ({"WORLD_SIZE": "2", "PRISM_BACKEND": "fsdp2"}, "fsdp2"),
    ({"WORLD_SIZE": "2", "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, "zero3"),
    ({"WORLD_SIZE": "8", "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, "fsdp2"),
])
def test_backend_comes_from_the_launch(env, name):
    assert distributed.detect_backend(env).name == name


def test_fsdp1_and_unknown_backends_are_refused_in_one_line():
    with pytest.raises(UsageError, match="FSDP version 1"):
        distributed.detect_backend({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"})
    with pytest.raises(UsageError, match="not a backend"):
        distributed.detect_backend({"PRISM_BACKEND": "zero9"})


def test_deepspeed_gets_max_grad_norm_and_never_rescales_the_loss(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"gradient_clipping": 5.0, "gradient_accumulation_steps": 8,
                                "zero_optimization": {"stage": 2, "overlap_comm": True}}))
    backend = distributed.Backend("deepspeed", 2, world=4, config_file=str(user))
    cfg = distributed.deepspeed_config(backend, max_grad_norm=1.0, mixed_precision="bf16")
    assert cfg["gradient_clipping"] == 1.0                      # prism's option, not the file's 5.0
    assert cfg["gradient_accumulation_steps"] == 1 and cfg["train_batch_size"] == 4
    assert cfg["zero_optimization"] == {"stage": 2, "overlap_comm": True} and cfg["bf16"] == {"enabled": True}


def test_decay_groups_use_the_real_shape_of_partitioned_parameters():
    """Under deepspeed.zero.Init a weight is a 1-D placeholder with ds_shape; it must still decay."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    weight = model[0].weight
    weight.data = torch.empty(0)
    weight.ds_shape = torch.Size([4, 4])
    decay, no_decay = training.build_optimizer(model, lr=1e-3, weight_decay=0.1).param_groups
    assert any(p is weight for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert not any(p is weight for p in no_decay["params"])


def test_banned_token_mask_uses_the_declared_vocabulary_when_the_weight_is_a_placeholder(tiny_path):
    from stages.common.models.loading import load_policy
    from stages.common.policy_update.logprobs import output_vocab_size

    model = load_policy(tiny_path, train=False)
    vocab = model.get_output_embeddings().weight.shape[0]
    model.get_output_embeddings().weight.data = torch.empty(0)       # what ZeRO-3 leaves between forwards
    assert output_vocab_size(model) == vocab > 0


class _OtherRankHasImages:
    """An accelerator stand-in for one process of two where the other process has images."""

    device = torch.device("cpu")

    def __init__(self):
        self.reductions = 0

    def reduce(self, tensor, reduction):
        self.reductions += 1
        return tensor + 1.0


def test_text_only_forward_runs_the_vision_tower_on_a_blank_image_when_another_rank_has_images(tiny_path):
    """DeepSpeed cannot reduce a step where the vision tower has gradients on some ranks only (it refused
    such steps before): a text-only rank now gives every vision parameter a zero gradient, values unchanged."""
    from stages.common.models.loading import load_policy

    model = load_policy(tiny_path, dtype=training.MASTER_WEIGHTS_DTYPE)
    ids = torch.randint(10, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    plain = model(input_ids=ids).logits.detach()
    ranks = _OtherRankHasImages()
    assert distributed.vision_tower_everywhere(model, distributed.Backend("deepspeed", 2, world=2), ranks) == 1
    out = model(input_ids=ids)
    assert ranks.reductions == 1
    out.logits.sum().backward()
    assert torch.equal(out.logits.detach(), plain)
    vision = {n: p.grad for n, p in model.named_parameters() if n.startswith("model.visual.")}
    assert vision and all(g is not None and not g.any() for g in vision.values())
    assert any(p.grad is not None and p.grad.any() for n, p in model.named_parameters() if "layers" in n)


def test_a_rank_with_images_joins_the_any_images_reduction_too(tiny_path):
    """Every rank must make the same collective calls: a rank with images reduces the flag as well (it once
    skipped it, so the ranks' collectives went out of step: gloo 'size 8 vs 4')."""
    from stages.common.data.chat import rollout_prompt
    from stages.common.models.loading import load_policy, load_processor
    from stages.common.world import synth

    model, processor = load_policy(tiny_path, dtype=training.MASTER_WEIGHTS_DTYPE), load_processor(tiny_path)
    prompt = rollout_prompt(synth.load("synth:train:1", seed=0)[0])
    text = processor.apply_chat_template(prompt.messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=prompt.images, return_tensors="pt")
    ranks = _OtherRankHasImages()
    distributed.vision_tower_everywhere(model, distributed.Backend("deepspeed", 2, world=2), ranks)
    model(**inputs)
    assert ranks.reductions == 1


def _accumulated_grad_norm(micro_batches: int) -> float:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    runtime = training.make_runtime("fp32")
    trained = runtime.prepare(model, lambda m: torch.optim.SGD(m.parameters(), lr=0.0),
                              lambda opt: training.build_scheduler(opt, "constant", 0, 1))
    x, y = torch.randn(8, 6, generator=torch.Generator().manual_seed(1)), torch.ones(8, 1)
    scale = training.loss_scale(runtime.accelerator) / len(x)       # sum of losses / global count
    chunks = list(zip(x.chunk(micro_batches), y.chunk(micro_batches)))
    for i, (xb, yb) in enumerate(chunks):
        with trained.accumulate(last=i == len(chunks) - 1):
            trained.backward((trained.model(xb) - yb).pow(2).sum() * scale)
    return trained.step(max_grad_norm=1e-3)


def test_grad_norm_and_clipping_mean_the_same_at_any_accumulation():
    """Was 1/k of the truth: accelerate divided the loss by its gradient_accumulation_steps again."""
    one = _accumulated_grad_norm(1)
    assert one > 0.01
    for k in (2, 4, 8):
        assert _accumulated_grad_norm(k) == pytest.approx(one, rel=1e-5)


def test_trained_models_keep_fp32_master_weights_so_small_steps_move_them(tiny_path):
    """10 AdamW steps at lr 1e-6 with bf16 compute: loaded as bf16 (before) only ~2% of the weights changed;
    fp32 master weights move essentially all of them (embeddings aside: only the rows used get a gradient)."""
    from stages.common.models.loading import load_policy

    model = load_policy(tiny_path, dtype=training.MASTER_WEIGHTS_DTYPE)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    runtime = training.make_runtime("fp32")   # one Accelerator state per test process: bf16 autocast by hand
    trained = runtime.prepare(model, lambda m: training.build_optimizer(m, 1e-6, 0.0),
                              lambda opt: training.build_scheduler(opt, "constant", 0, 10))
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(10, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(10):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = trained.model(input_ids=ids, labels=ids).loss
        trained.backward(loss)
        trained.step(max_grad_norm=None)
    moved = [(p.detach() != start[n]).float().mean().item() for n, p in model.named_parameters()
             if p.requires_grad and start[n].numel() > 1000 and "visual" not in n and "embed" not in n]
    assert min(moved) > 0.9, moved


def test_global_batches_must_divide_over_the_processes():
    from stages.align.config import AlignConfig
    from stages.align.run import check_batches
    from stages.rl.run import check_prompts_per_step

    with pytest.raises(UsageError, match="prompts_per_step 6 is not divisible by the 4 processes"):
        check_prompts_per_step(6, 4)
    check_prompts_per_step(8, 4)
    with pytest.raises(UsageError, match="warmup_batch 6"):
        check_batches(AlignConfig(prompts_per_step=4, warmup_batch=6), 4)


def test_ppo_micro_batch_plan_is_padded_to_the_global_count_with_zero_weight():
    from stages.common.policy_update.ppo import pad_plan

    assert pad_plan([[0, 1], [2]], 4) == ([[0, 1], [2], [0], [0]], [1.0, 1.0, 0.0, 0.0])
    assert pad_plan([[0]], 1) == ([[0]], [1.0])


def test_discriminator_lr_runs_the_warmup_cosine_then_the_game_constant():
    from stages.align.config import AlignConfig
    from stages.align.run import discriminator_lr

    lr = discriminator_lr(AlignConfig(warmup_steps=10, warmup_lr=1e-5, disc_lr=1e-6))
    assert lr(0) == pytest.approx(1e-5) and 0 < lr(9) < 1e-5 * 0.1
    assert lr(10) == lr(500) == 1e-6


def test_the_discriminator_objective_counts_valid_responses_and_the_models_aux_coefficient():
    from stages.align.objective import GroupScores, discriminator_objective

    tc, tt = torch.tensor([1.0]), torch.tensor([2.0])
    sc, st = torch.tensor([[0.0, 30.0]]), torch.tensor([[1.0, -30.0]])
    valid = torch.tensor([[True, False]])
    terms = discriminator_objective(GroupScores(tc, tt, sc, st, valid, torch.tensor(3.0)), score_reg=0.001,
                                    clip=10.0, aux_coef=0.01)
    bt = -torch.nn.functional.logsigmoid(torch.tensor(1.0))        # only the valid response, both segments
    l2 = 1.0 + 4.0 + 0.0 + 1.0                                      # teacher sets and the valid student scores
    assert terms.loss.item() == pytest.approx(2 * bt.item() + 0.001 * l2 + 0.01 * 3.0, rel=1e-6)
    assert terms.valid_pairs == 1 and terms.acc_caption == 1.0


def test_the_discriminator_objective_over_processes_is_the_one_process_mean():
    """Two processes (threads summing through a barrier, as the backend's all-reduce does) hold unequal numbers of
    groups and of format-valid pairs: their gradients averaged, as every backend averages them, equal the gradient
    of one process holding every group, and the floats they return are that process's. Per-process means would
    weigh the 1 valid pair of process 1 as much as the 4 of process 0."""
    import threading

    from stages.align.objective import GroupScores, discriminator_objective
    from stages.common.training.runtime import Processes

    torch.manual_seed(0)
    teacher = torch.randn(3, 2)                      # [groups, caption/think]
    student = torch.randn(3, 2, 3)                   # [groups, caption/think, responses]
    valid = torch.tensor([[True, True, False], [True, True, True], [False, True, False]])
    aux = torch.tensor(0.0)

    def objective(groups, across=None):
        t, s = teacher[groups].clone().requires_grad_(), student[groups].clone().requires_grad_()
        terms = discriminator_objective(GroupScores(t[:, 0], t[:, 1], s[:, 0], s[:, 1], valid[groups], aux),
                                        score_reg=0.05, clip=1.5, aux_coef=0.0, across=across)
        terms.loss.backward()
        return terms, t.grad, s.grad

    one, t_grad, s_grad = objective([0, 1, 2])
    barrier, posted, results = threading.Barrier(2), {}, {}

    def sums(rank, values):
        posted[rank] = values
        barrier.wait()
        total = [a + b for a, b in zip(posted[0], posted[1])]
        barrier.wait()
        return total

    def process(rank, groups):
        results[rank] = objective(groups, Processes(2, lambda values: sums(rank, values)))

    threads = [threading.Thread(target=process, args=(0, [0, 1])), threading.Thread(target=process, args=(1, [2]))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    (first, t0, s0), (second, t1, s1) = results[0], results[1]
    # the backend averages the processes' gradients
    torch.testing.assert_close(torch.cat([t0, t1]) / 2, t_grad, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(torch.cat([s0, s1]) / 2, s_grad, rtol=1e-6, atol=1e-7)
    for terms in (first, second):
        assert terms.valid_pairs == one.valid_pairs == 6
        for key in ("loss_value", "bt_caption", "bt_think", "l2", "acc_caption", "acc_think"):
            assert getattr(terms, key) == pytest.approx(getattr(one, key), rel=1e-6), key
    # what a per-process mean would have given instead: not the one-process gradient
    _, t_local, _ = objective([2])
    assert not torch.allclose(t_local / 2, t_grad[2:], rtol=1e-3)


# ------------------------------------------------------------------------------------------ conformance

def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PRISM_NO_PROGRESS="1", PYTHONPATH=str(ROOT), **extra)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "PRISM_BACKEND"):
        env.pop(key, None)
    env.update(extra)
    return env


def _run(cmd, cwd, env, ok=True):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if ok:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _torchrun(processes: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
            str(free_port())]


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _max_weight_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    wa, wb = load_file(a), load_file(b)
    assert wa.keys() == wb.keys()
    return max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)


# 59 train samples, batch 8 (micro-batch 2 x 2 ranks x 2 accumulation vs 4 x 1 x 2), 5 held out: the ranks
# have 3 and 2 eval samples, so unequal eval batch counts (2 vs 1) are padded.
SFT = ["sft", "--ckpt", "tiny", "--data", "synth:train:64", "--batch-size", "8", "--max-steps", "3", "--lr", "1e-3",
       "--set", "eval_fraction=0.08", "--set", "eval_every=2"]


@pytest.fixture(scope="module")
def sft_single(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("sft-single")
    _run([sys.executable, "-m", "prism_cli", *SFT, "--micro-batch-size", "4", "--out", "out"], cwd, _env())
    return cwd / "out"


@pytest.mark.dist
@pytest.mark.parametrize("backend", ["ddp", "fsdp2", "zero2", "zero3"])
def test_sft_two_ranks_equal_the_single_process_run(sft_single, backend, tmp_path):
    _run(_torchrun() + ["-m", "prism_cli", *SFT, "--micro-batch-size", "2", "--out", "out"], tmp_path,
         _env(PRISM_BACKEND=backend))
    out = tmp_path / "out"
    summary = json.loads((out / "prism.json").read_text())["summary"]
    assert summary["processes"] == 2 and summary["backend"] == backend
    ours, ref = _records(out), _records(sft_single)
    for key, rtol in (("loss", 1e-5), ("grad_norm", 1e-4), ("eval_loss", 1e-5)):
        a = torch.tensor([r[key] for r in ours if key in r], dtype=torch.float64)
        b = torch.tensor([r[key] for r in ref if key in r], dtype=torch.float64)
        assert len(a) == len(b) > 0, key
        torch.testing.assert_close(a, b, rtol=rtol, atol=1e-6, msg=key)
    assert _max_weight_diff(out / "model" / "model.safetensors", sft_single / "model" / "model.safetensors") < 1e-4


@pytest.fixture(scope="module")
def ppo_single(tmp_path_factory):
    refs = {}
    for text_only in ("1",):
        out = tmp_path_factory.mktemp(f"ppo-single-{text_only}")
        _run([sys.executable, str(WORKER), "ppo", str(out)], ROOT, _env(PPO_TEXT_ONLY=text_only))
        refs[text_only] = out
    return refs


@pytest.mark.dist
@pytest.mark.parametrize("backend,text_only", [("ddp", "1"), ("fsdp2", "1"), ("zero2", "1"), ("zero3", "1")])
def test_policy_update_two_ranks_equals_the_single_process_update(ppo_single, backend, text_only, tmp_path):
    """Unequal micro-batch counts per rank (token budget), and a text-only group on one rank (the vision tower
    gets no gradient there; under DeepSpeed it runs on a blank image with weight 0)."""
    _run(_torchrun() + [str(WORKER), "ppo", str(tmp_path)], ROOT,
         _env(PPO_TEXT_ONLY=text_only, PRISM_BACKEND=backend))
    ref = ppo_single[text_only]
    ours = json.loads((tmp_path / "stats.json").read_text())
    assert ours["world"] == 2 and ours["backend"] == backend
    theirs = json.loads((ref / "stats.json").read_text())
    torch.testing.assert_close(torch.tensor([s["update/grad_norm"] for s in ours["stats"]]),
                               torch.tensor([s["update/grad_norm"] for s in theirs["stats"]]), rtol=1e-4, atol=0)
    assert _max_weight_diff(tmp_path / "weights.safetensors", ref / "weights.safetensors") < 1e-4
    # every logged figure (loss, entropy, clip fractions, ...) is the step's over both processes' tokens
    for mine, one in zip(ours["stats"], theirs["stats"]):
        assert mine.keys() == one.keys()
        for key in one:
            assert mine[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key


@pytest.mark.dist
def test_align_and_rl_run_with_two_ranks_under_zero2(tmp_path):
    """The recipe's backend: align's policy and discriminator are two DeepSpeed engines; rl's replicas stay
    identical (ZeRO-2 replicates the weights)."""
    sft = tmp_path / "sft"
    _run([sys.executable, "-m", "prism_cli", "sft", "--ckpt", "tiny", "--data", "synth:train:32", "--batch-size",
          "8", "--max-steps", "2", "--set", "eval_fraction=0", "--out", str(sft)], tmp_path, _env())
    align = tmp_path / "align"
    _run(_torchrun() + ["-m", "prism_cli", "align", "--ckpt", str(sft), "--data", "synth:train:32",
                               "--steps", "2", "--prompts-per-step", "2", "--rollouts-per-prompt", "2",
                               "--max-new-tokens", "12", "--warmup-steps", "2", "--warmup-prompts", "8",
                               "--warmup-batch", "4", "--out", str(align)], tmp_path, _env(PRISM_BACKEND="zero2"))
    summary = json.loads((align / "prism.json").read_text())["summary"]
    assert summary["processes"] == 2 and summary["backend"] == "zero2" and summary["steps"] == 2
    assert (align / "discriminator" / "config.json").is_file()
    warm = [r for r in _records(align) if r.get("phase") == "warmup_done"][0]
    assert warm["warmup/pairs"] == 8                      # sampled once over the ranks, not 8 per rank
    rl = tmp_path / "rl"
    _run(_torchrun() + ["-m", "prism_cli", "rl", "--algo", "grpo", "--ckpt", str(align), "--data",
                               "synth:train:32", "--steps", "2", "--prompts-per-step", "2", "--rollouts-per-prompt",
                               "2", "--max-new-tokens", "12", "--out", str(rl)], tmp_path, _env(PRISM_BACKEND="zero2"))
    summary = json.loads((rl / "prism.json").read_text())["summary"]
    sums = summary["replica_weight_sums"]
    assert summary["backend"] == "zero2" and len(sums) == 2 and sums[0] == sums[1]
    for record in _records(rl):   # the step's counts over both processes (one group each), not process 0's
        assert record["sampling/groups_drawn"] == 2 * record["sampling/gen_batches"]


def test_hf_decode_keeps_stepping_while_another_rank_decodes_and_returns_the_same_samples(tiny_path):
    """Under sharded parameters every decode step is a collective: a rank whose rows are done keeps running
    forwards until lockstep says no rank decodes. Its own samples must not change."""
    from stages.common.data.chat import rollout_prompt
    from stages.common.models.loading import load_policy, load_processor
    from stages.common.rollout import SamplingParams, make_engine
    from stages.common.world import synth

    model, processor = load_policy(tiny_path, train=False), load_processor(tiny_path)
    prompts = [rollout_prompt(s) for s in synth.load("synth:train:2", seed=0)]
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=40, seed=3)
    engine = make_engine("hf", model, processor)
    engine.eos_ids = list(range(0, model.config.get_text_config().vocab_size, 7))   # rows stop after a few tokens
    alone = engine.generate(prompts, params)
    forwards = []
    hook = model.register_forward_pre_hook(lambda *a: forwards.append(1))
    engine.generate(prompts, params)
    own = len(forwards)
    forwards.clear()
    engine.lockstep = lambda local: True          # another rank never finishes before max_new_tokens
    stepped = engine.generate(prompts, params)
    hook.remove()
    assert own < len(forwards) == 1 + params.max_new_tokens - 1     # prefill + every decode step
    assert [[c.token_ids for c in g] for g in stepped] == [[c.token_ids for c in g] for g in alone]


def test_replicated_weights_are_copied_to_the_cpu_on_the_main_process_only():
    """ZeRO-2/DDP replicate the weights: a process other than the main one returns None without copying
    the whole model to the CPU (before: every rank made a full copy, then dropped it)."""
    class _Module(torch.nn.Linear):
        copies = 0

        def state_dict(self, *args, **kwargs):
            _Module.copies += 1
            return super().state_dict(*args, **kwargs)

    class _Worker:
        is_main_process = False

    module = _Module(2, 2)
    for backend in (distributed.Backend("deepspeed", 2, world=2), distributed.Backend("ddp", world=2)):
        trained = distributed.Trained(backend, _Worker(), module, None, None, module, "m")
        assert trained.full_state_dict() is None
    assert _Module.copies == 0
