"""One piece of training on fixed inputs, run alone or by torchrun under any backend (PRISM_BACKEND), for
tests/test_distributed.py: `python tests/dist_worker.py ppo OUT_DIR`.

ppo: two clipped policy updates (stages.common.ppo) of the tiny model on hand-made rollouts: 4 groups of 2
responses of unequal lengths, one group text-only. Process r of w takes groups r, r + w, ...; with a
small token budget the processes run different numbers of micro-batches (the long groups are on
process 0, the text-only group on process 1), which is what the global micro-batch plan must absorb.
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


def ppo(out: Path) -> None:
    from safetensors.torch import save_file

    from stages.common import synth, tiny, training
    from stages.common.chat import rollout_prompt
    from stages.common.data import Sample
    from stages.common.models import load_policy, load_processor
    from stages.common.ppo import PPOSettings, ppo_update
    from stages.common.rollout.base import Completion

    runtime = training.make_runtime()
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
    rows = [i for i, g in enumerate(group_of) if g in mine]
    settings = PPOSettings(micro_batch_tokens=int(os.environ.get("PPO_TOKENS", "160")), clip_high=0.28,
                           mini_batches=1, shared_prefix=os.environ.get("PPO_SHARED_PREFIX", "1") == "1")
    stats = []
    for _ in range(2):
        stats.append(ppo_update(settings, accelerator, policy, processor, [prompts[g] for g in mine],
                                [completions[i] for i in rows], [mine.index(group_of[i]) for i in rows],
                                advantages[rows]))
    weights = policy.full_state_dict()
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "stats.json").write_text(json.dumps({"stats": stats, "backend": runtime.backend.name,
                                                    "world": world}))
        save_file({k: v.float().contiguous() for k, v in weights.items()}, str(out / "weights.safetensors"))
    accelerator.wait_for_everyone()
    # Tear the process group down as the stages do: a rank that exits with it alive can abort in a C++
    # destructor ("terminate called without an active exception", SIGABRT; seen once under ZeRO-3).
    accelerator.end_training()


if __name__ == "__main__":
    {"ppo": ppo}[sys.argv[1]](Path(sys.argv[2]))
