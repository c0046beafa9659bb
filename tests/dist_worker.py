"""One piece of training on fixed inputs, run alone or by torchrun under any backend (PRISM_BACKEND), for
tests/test_distributed.py: `python tests/dist_worker.py ppo OUT_DIR`.

ppo: two clipped policy updates (stages.common.policy_update.ppo) of the tiny model on hand-made rollouts: 4 groups of 2
responses of unequal lengths, one group text-only. Process r of w takes groups r, r + w, ...; with a
small token budget the processes run different numbers of micro-batches (the long groups are on
process 0, the text-only group on process 1), which is what the global micro-batch plan must absorb.
PPO_EMPTY_RANK=r: process r gets no group at all (DAPO's dynamic sampling can leave one so) and the
others share all four.
Writes OUT_DIR/stats.json (per-update statistics) and OUT_DIR/weights.safetensors (main process).
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PRISM_NO_PROGRESS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

RESPONSES = [  # (group, text): groups 0 and 2 long, 1 and 3 short
    (0, "<caption>a red square and two blue circles on a white ground</caption><think>count the circles: "
        "one, two. the square is red.</think><answer>2</answer>"),
    (0, "<caption>shapes</caption><think>there are two circles and one square, so two</think><answer>2</answer>"),
    (1, "<caption>red</caption><answer>3</answer>"),
    (1, "<think>3</think>"),
    (2, "<caption>three green triangles in a row and a yellow star at the top left corner</caption><think>"
        "three triangles</think><answer>3</answer>"),
    (2, "<caption>triangles</caption><think>count three of them one by one</think><answer>3</answer>"),
    (3, "<answer>4</answer>"),
    (3, "<caption>blue</caption>"),
]


def ppo(out: Path, runtime=None) -> None:
    from safetensors.torch import save_file

    from stages.common.contract.samples import Sample
    from stages.common.data.chat import rollout_prompt
    from stages.common.models.loading import load_policy, load_processor
    from stages.common.policy_update.ppo import PPOSettings, ppo_update
    from stages.common.rollout.base import Completion
    from stages.common.training import runtime as training
    from stages.common.world import synth, tiny

    runtime = runtime or training.make_runtime()
    accelerator = runtime.accelerator
    rank, world = accelerator.process_index, accelerator.num_processes
    path = tiny.ensure("tiny")
    processor = load_processor(path)
    policy = runtime.prepare(load_policy(path, dtype=training.MASTER_WEIGHTS_DTYPE),
                             lambda m: training.build_optimizer(m, 1e-3, 0.01),
                             lambda opt: training.build_scheduler(opt, "constant", 0, 10), max_grad_norm=1.0)
    samples = synth.load("synth:train:4", seed=0)
    if os.environ.get("PPO_TEXT_ONLY", "1") == "1":
        samples[3] = Sample(id="text-only", images=[], question="How many sides has a square?", answer="4")
    prompts = [rollout_prompt(s) for s in samples]
    gen = torch.Generator().manual_seed(0)
    completions, group_of = [], []
    for group, text in RESPONSES:
        ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
        logprobs = (-0.5 - 2.0 * torch.rand(len(ids), generator=gen)).tolist()
        completions.append(Completion(token_ids=ids, text=text, logprobs=logprobs, finish_reason="stop"))
        group_of.append(group)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, -1.5, 1.5, 0.8, -0.8])

    mine = [g for g in range(4) if g % world == rank]
    if os.environ.get("PPO_EMPTY_RANK") and world > 1:   # DAPO left one process without a group
        mine = [] if rank == int(os.environ["PPO_EMPTY_RANK"]) else list(range(4))
    rows = [i for i, g in enumerate(group_of) if g in mine]
    settings = PPOSettings(micro_batch_tokens=int(os.environ.get("PPO_TOKENS", "160")), clip_high=0.28,
                           mini_batches=1, shared_prefix=os.environ.get("PPO_SHARED_PREFIX", "1") == "1",
                           logprob_chunk_tokens=int(os.environ.get("PPO_LOGPROB_CHUNK", "512")))
    stats = []
    for _ in range(2):
        stats.append(ppo_update(settings, accelerator, policy, processor, [prompts[g] for g in mine],
                                [completions[i] for i in rows], [mine.index(group_of[i]) for i in rows],
                                advantages[rows], filler=(prompts[0], completions[0])))
    weights = policy.full_state_dict()
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "stats.json").write_text(json.dumps({"stats": stats, "backend": runtime.backend.name,
                                                    "world": world}))
        save_file({k: v.float().contiguous() for k, v in weights.items()}, str(out / "weights.safetensors"))
    accelerator.wait_for_everyone()


# disc: per group [teacher caption, teacher think, 2 student captions, 2 student thinks]; groups 0 and 2 (process
# 0 of 2) long, 1 and 3 short, so under a small row budget the processes score different numbers of chunks.
LONG = "the red square sits left of two blue circles and a green triangle on a white ground; " * 2
DISC_GROUPS = [
    [LONG, "count the circles one by one: one, two. " * 3, LONG[:80], "two circles", LONG[40:], "one, two: 2"],
    ["a square", "two", "shapes", "", "2", "three"],
    [LONG[::-1], "three triangles in a row, then a star: three. " * 3, "triangles", LONG[:60], "3", "count: 3"],
    ["stars", "4", "a star", "blue", "four", ""],
]
# Which student responses are format-valid, per group: as an early policy's are, unevenly, so the processes hold
# different numbers of counted pairs (3 on process 0, 4 on process 1) and a per-process mean would weigh them
# differently from one process's mean over all 7.
DISC_FORMAT_OK = [[True, False], [True, True], [True, True], [True, True]]


def disc(out: Path, runtime=None, layout: str = "prefix") -> None:
    """Two discriminator steps of the align objective (stages.align.objective) on DISC_GROUPS, scored in `layout`
    under the token budget DISC_ROW_TOKENS (several chunks per process, unequal counts over processes),
    backpropagated by ScoreResult.backward through the backend. Writes stats.json and weights.safetensors like
    ppo."""
    from functools import partial

    from safetensors.torch import save_file

    from stages.align.objective import GroupScores, discriminator_objective
    from stages.align.scoring import score_groups
    from stages.common.data.chat import rollout_prompt
    from stages.common.models.discriminator import aux_loss_coef, upcycle
    from stages.common.models.loading import load_processor
    from stages.common.training import runtime as training
    from stages.common.world import synth, tiny

    runtime = runtime or training.make_runtime()
    accelerator = runtime.accelerator
    rank, world = accelerator.process_index, accelerator.num_processes
    path = tiny.ensure("tiny")
    processor = load_processor(path)
    # the router aux loss is a per-process statistic (it does not split over processes); 0 keeps the maths equal
    model = upcycle(path, seed=1, value_head_std=0.1, aux_loss_coef=float(os.environ.get("DISC_AUX", "0")))
    model.train()
    trained = runtime.prepare(model, lambda m: training.build_optimizer(m, 1e-3, 0.01),
                              lambda opt: training.build_scheduler(opt, "constant", 0, 10), max_grad_norm=1.0,
                              name="discriminator")
    samples = synth.load("synth:train:4", seed=0)
    prompts = [rollout_prompt(s) for s in samples]
    mine = [g for g in range(4) if g % world == rank]
    budget = int(os.environ.get("DISC_ROW_TOKENS", "0")) or None
    stats = []
    for _ in range(2):
        result = score_groups(trained.model, processor, [prompts[g] for g in mine], [DISC_GROUPS[g] for g in mine],
                              layout, output_router_logits=True, max_row_tokens=budget,
                              global_chunks=partial(training.global_max, accelerator))
        s = torch.stack(result.scores)
        terms = discriminator_objective(
            GroupScores(s[:, 0], s[:, 1], s[:, 2:4], s[:, 4:6], torch.tensor([DISC_FORMAT_OK[g] for g in mine]),
                        result.aux_loss), score_reg=0.01, clip=10.0, aux_coef=aux_loss_coef(trained.module),
            across=training.processes(accelerator))
        result.backward(terms.loss, trained)
        chunks = len(result.replay.sizes) if result.replay is not None else 1
        stats.append({"loss": training.global_sum(accelerator, float(terms.loss.detach())) / world,
                      "grad_norm": trained.step(1.0),
                      "chunks": [int(c) for c in accelerator.gather(torch.tensor([chunks])).tolist()]})
    weights = trained.full_state_dict()
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "stats.json").write_text(json.dumps({"stats": stats, "backend": runtime.backend.name,
                                                    "world": world}))
        save_file({k: v.float().contiguous() for k, v in weights.items()}, str(out / "weights.safetensors"))
    accelerator.wait_for_everyone()


def figures(out: Path, runtime=None) -> None:
    """The figures an align and an rl step log, over hand-made values of which each process holds its share:
    align 6 groups of 2 rollouts (an equal share each, as group_layout gives), rl 7 scored rows (process r takes
    rows r, r + w, ...: unequal counts, as dynamic sampling leaves them). The main process writes figures.json;
    with several processes they must equal one process's over everything."""
    from stages.align.objective import GroupScores
    from stages.align.run import game_metrics
    from stages.common.rollout.base import Completion
    from stages.common.training import runtime as training
    from stages.rl.run import Rollouts

    runtime = runtime or training.make_runtime()
    accelerator = runtime.accelerator
    rank, world = accelerator.process_index, accelerator.num_processes
    gen = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(6, 2, generator=gen), torch.randn(6, 2, 2, generator=gen)
    format_ok = torch.tensor([[True, False], [True, True], [False, False], [True, True], [True, False], [True, True]])
    acc, score = (torch.rand(6, 2, generator=gen) > 0.5).float(), torch.rand(6, 2, generator=gen)
    advantages = torch.randn(12, generator=gen)
    groups = slice(rank * 6 // world, (rank + 1) * 6 // world)
    rows = slice(groups.start * 2, groups.stop * 2)
    scores = GroupScores(teacher[groups, 0], teacher[groups, 1], student[groups, 0], student[groups, 1],
                         format_ok[groups], None, tokens=50 * (groups.stop - groups.start))
    align = game_metrics(accelerator, scores, {"acc": acc[groups], "score": score[groups]}, advantages[rows])

    lengths, reasons = [5, 12, 3, 12, 8, 1, 12], ["stop", "length", "stop", "length", "stop", "stop", "length"]
    mine = list(range(rank, 7, world))
    rl = Rollouts(prompts=[], samples=[], completions=[Completion([1] * lengths[i], "", [0.0] * lengths[i],
                                                                  reasons[i]) for i in mine],
                  prompt_index=[], rewards=torch.zeros(0), acc=torch.zeros(0), fmt=torch.zeros(0),
                  all_rewards=[0.1 * i for i in mine], all_acc=[float(i % 2) for i in mine],
                  all_fmt=[float(i % 3 > 0) for i in mine], all_lengths=[lengths[i] for i in mine]).metrics(accelerator)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "figures.json").write_text(json.dumps({"align": align, "rl": rl, "world": world}))
    accelerator.wait_for_everyone()


def regime(out: Path) -> None:
    """disc in both scoring layouts that chunk (prefix, align's default without checkpointing; shared, with it),
    then ppo and figures, in one process (one interpreter start and one process group for all: the suite's cost
    is mostly starting torch and DeepSpeed), into OUT_DIR/disc-prefix, OUT_DIR/disc-shared, OUT_DIR/ppo and
    OUT_DIR/figures."""
    from stages.common.training import runtime as training
    runtime = training.make_runtime()
    for layout in ("prefix", "shared"):
        disc(out / f"disc-{layout}", runtime, layout)
    ppo(out / "ppo", runtime)
    figures(out / "figures", runtime)
    runtime.accelerator.end_training()


def main(mode: str, out: Path) -> None:
    from stages.common.training import runtime as training
    if mode == "regime":
        return regime(out)
    runtime = training.make_runtime()
    {"ppo": ppo, "disc": disc}[mode](out, runtime)
    # Tear the process group down as the stages do: a rank that exits with it alive can abort in a C++
    # destructor ("terminate called without an active exception", SIGABRT; seen once under ZeRO-3).
    runtime.accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
