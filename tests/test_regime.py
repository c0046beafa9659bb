"""The paper's regime, scaled down to two and three CPU ranks (torchrun, gloo; marked dist): the paths that only
trigger at scale, through the real code, compared with one process where the maths says they must agree.

tests/dist_worker.py `regime` runs, in one process per rank:
  disc  two discriminator steps of the align objective under a row budget of 200 tokens: several scoring
        chunks per rank and unequal counts over ranks (5 and 2), format-valid pairs falling unevenly (3 and 4;
        with three ranks the groups too, 2 / 1 / 1), backpropagated by ScoreResult.backward; in both chunked
        layouts (prefix: each chunk's prompts once into a KV cache, then its packed segments; shared: one
        block-masked row per group);
  ppo   two clipped policy updates with 16-token lm_head chunks (several per micro-batch, unequal over
        ranks), process 1 left with no group at all (DAPO's dynamic sampling can do that; it joins with a
        zero-weight filler row) and process 0 holding a text-only group next to image groups (under
        DeepSpeed the text-only micro-batches run the vision tower on a blank image with weight 0).
The align CLI then runs under ZeRO-2 with several scoring chunks per rank in the warmup and the game; sft and
align are SIGKILLed after a save and resumed under each sharding backend.

Tolerances as tests/test_distributed.py: losses 1e-5 relative, grad norms 1e-4 relative, weights 1e-4
absolute (float32 reductions in another order; measured differences are in docs/distributed.md).
"""

import json
import sys
from pathlib import Path

import pytest
import torch

from tests.test_distributed import ROOT, WORKER, _env, _max_weight_diff, _run, _torchrun

REGIME = dict(DISC_ROW_TOKENS="200", PPO_LOGPROB_CHUNK="16", PPO_EMPTY_RANK="1", PPO_TEXT_ONLY="1",
              PPO_TOKENS="160")


@pytest.fixture(scope="module")
def regime_single(tmp_path_factory):
    out = tmp_path_factory.mktemp("regime-single")
    _run([sys.executable, str(WORKER), "regime", str(out)], ROOT, _env(**REGIME))
    return out


def _stats(out: Path) -> dict:
    return json.loads((out / "stats.json").read_text())


@pytest.mark.dist
@pytest.mark.parametrize("backend,processes", [("ddp", 2), ("fsdp2", 2), ("zero2", 2), ("zero3", 2),
                                               ("ddp", 3), ("fsdp2", 3)])
def test_regime_several_ranks_equal_one_process(regime_single, backend, processes, tmp_path):
    """Three processes too: 4 groups fall 2 / 1 / 1, so the processes hold unequal numbers of groups as well as of
    valid pairs, and every mean must still be the one-process mean."""
    _run(_torchrun(processes) + [str(WORKER), "regime", str(tmp_path)], ROOT, _env(PRISM_BACKEND=backend, **REGIME))
    for layout in ("prefix", "shared"):
        disc = f"disc-{layout}"
        ours, ref = _stats(tmp_path / disc), _stats(regime_single / disc)
        assert ours["backend"] == backend and ours["world"] == processes
        chunks = ours["stats"][0]["chunks"]
        assert max(chunks) > 1 and len(set(chunks)) > 1, layout      # several chunks per rank, unequal counts
        assert processes > 2 or min(chunks) > 1, layout                # (3 processes: one holds a single short group)
        for key, rtol in (("loss", 1e-5), ("grad_norm", 1e-4)):
            torch.testing.assert_close(torch.tensor([s[key] for s in ours["stats"]]),
                                       torch.tensor([s[key] for s in ref["stats"]]), rtol=rtol, atol=1e-6,
                                       msg=f"{layout} {key}")
        assert _max_weight_diff(tmp_path / disc / "weights.safetensors",
                                regime_single / disc / "weights.safetensors") < 1e-4, layout

    ours, ref = _stats(tmp_path / "ppo"), _stats(regime_single / "ppo")
    torch.testing.assert_close(torch.tensor([s["update/grad_norm"] for s in ours["stats"]]),
                               torch.tensor([s["update/grad_norm"] for s in ref["stats"]]), rtol=1e-4, atol=0)
    assert _max_weight_diff(tmp_path / "ppo" / "weights.safetensors",
                            regime_single / "ppo" / "weights.safetensors") < 1e-4

    # what the log shows is the whole step's, not the main process's share
    ours, ref = (json.loads((out / "figures" / "figures.json").read_text()) for out in (tmp_path, regime_single))
    assert ours["world"] == processes and ref["world"] == 1
    for stage in ("align", "rl"):
        assert ours[stage].keys() == ref[stage].keys()
        for key, value in ref[stage].items():
            assert ours[stage][key] == pytest.approx(value, rel=1e-6, abs=1e-7), (stage, key)


@pytest.mark.dist
def test_align_cli_runs_under_zero2_with_several_scoring_chunks_per_rank(tmp_path):
    """The issue's command: `torchrun --nproc_per_node 2 -m prism_cli align ... --set disc_row_tokens=160`
    under PRISM_BACKEND=zero2 hung (both ranks idle) or asserted ("has already been reduced")."""
    out = tmp_path / "align"
    _run(_torchrun() + ["-m", "prism_cli", "align", "--ckpt", "tiny", "--data", "synth:train:16", "--steps", "1",
                        "--prompts-per-step", "2", "--rollouts-per-prompt", "2", "--max-new-tokens", "12",
                        "--warmup-steps", "1", "--warmup-prompts", "4", "--warmup-batch", "2",
                        "--set", "disc_row_tokens=160", "--out", str(out)], tmp_path, _env(PRISM_BACKEND="zero2"))
    summary = json.loads((out / "prism.json").read_text())["summary"]
    assert summary["processes"] == 2 and summary["backend"] == "zero2" and summary["steps"] == 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    game = [r for r in records if "d/grad_norm" in r]
    warm = [r for r in records if r.get("phase") == "warmup"]
    assert game and warm and game[0]["d/grad_norm"] > 0 and warm[0]["warmup/grad_norm"] > 0
    assert game[0]["d/chunks"] > 1 and warm[0]["warmup/chunks"] > 1      # rank 0's; the budget split the groups


@pytest.mark.dist
def test_the_pipeline_runs_on_three_processes_with_a_group_split_over_all_three(tmp_path):
    """sft, align and rl chained through the CLI on 3 processes. The paper's align layout on 8 GPUs, 4 prompts x
    16 rollouts, splits each group over processes; scaled to 3: one prompt's 3 rollouts, one on each process, under
    FSDP2. Then rl with one prompt per process; the counts it logs are the step's over all three processes."""
    sft = tmp_path / "sft"
    _run(_torchrun(3) + ["-m", "prism_cli", "sft", "--ckpt", "tiny", "--data", "synth:train:24", "--batch-size", "6",
                         "--micro-batch-size", "2", "--max-steps", "2", "--set", "eval_fraction=0", "--out", str(sft)],
         tmp_path, _env(PRISM_BACKEND="zero2"))
    assert json.loads((sft / "prism.json").read_text())["summary"]["processes"] == 3
    align = tmp_path / "align"
    _run(_torchrun(3) + ["-m", "prism_cli", "align", "--ckpt", str(sft), "--data", "synth:train:16", "--steps", "2",
                         "--prompts-per-step", "1", "--rollouts-per-prompt", "3", "--max-new-tokens", "12",
                         "--warmup-steps", "1", "--warmup-prompts", "6", "--warmup-batch", "3",
                         "--out", str(align)], tmp_path, _env(PRISM_BACKEND="fsdp2"))
    summary = json.loads((align / "prism.json").read_text())["summary"]
    assert summary["processes"] == 3 and summary["backend"] == "fsdp2" and summary["steps"] == 2
    game = [json.loads(line) for line in (align / "metrics.jsonl").read_text().splitlines() if '"d/grad_norm"' in line]
    assert len(game) == 2 and all(r["d/valid_pairs"] <= 3 for r in game)
    rl = tmp_path / "rl"
    _run(_torchrun(3) + ["-m", "prism_cli", "rl", "--algo", "grpo", "--ckpt", str(align), "--data", "synth:train:16",
                         "--steps", "2", "--prompts-per-step", "3", "--rollouts-per-prompt", "2", "--max-new-tokens",
                         "12", "--out", str(rl)], tmp_path, _env(PRISM_BACKEND="ddp"))
    records = [json.loads(line) for line in (rl / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "sampling/groups_drawn" in r]
    assert len(steps) == 2 and all(r["sampling/groups_drawn"] == 3 * r["sampling/gen_batches"] for r in steps)


@pytest.mark.dist
def test_the_discriminator_warmup_on_two_ranks_equals_one_process_given_the_same_pairs(tmp_path):
    """`--warmup-pairs` fixes the pairs, so each warmup batch on two ranks is the one-process batch split in two
    (rank r takes pairs r, r + 2, ...): every logged warmup figure and the discriminator's weights must equal the
    one-process run's. A dense discriminator: the router aux loss is a per-process statistic."""
    import base64

    from stages.common.world import synth

    rows = []
    samples = synth.load("synth:train:10", seed=0)
    demos = [synth.oracle_demo(sample) for sample in samples]
    for i, sample in enumerate(samples):
        other = demos[(i + 3) % len(samples)]                      # a wrong but well-formed student
        rows.append({"prompt": sample.question,
                     "image": "data:image/png;base64," + base64.b64encode(sample.images[0]).decode(),
                     "teacher_caption": demos[i].caption, "teacher_cot": demos[i].think,
                     "student_caption": other.caption, "student_cot": other.think if i % 3 else ""})
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(row) + "\n" for row in rows))
    args = ["-m", "prism_cli", "align", "--ckpt", "tiny", "--data", "synth:train:8", "--steps", "0",
            "--warmup-steps", "3", "--warmup-batch", "4", "--warmup-pairs", str(pairs), "--set", "warmup_holdout=0.2",
            "--set", "disc_dense=true", "--set", "disc_row_tokens=200"]
    _run([sys.executable, *args, "--out", str(tmp_path / "one")], tmp_path, _env())
    _run(_torchrun() + [*args, "--out", str(tmp_path / "two")], tmp_path, _env(PRISM_BACKEND="ddp"))

    def warmup(out):
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [r for r in records if r.get("phase") in ("warmup", "warmup_done")]

    one, two = warmup(tmp_path / "one"), warmup(tmp_path / "two")
    assert len(one) == len(two) == 4 and one[0].keys() == two[0].keys()
    for mine, theirs in zip(two, one):
        for key, value in theirs.items():
            if isinstance(value, str):
                assert mine[key] == value, key
            elif key != "warmup/chunks":   # each process's own count of its scoring chunks
                assert mine[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert _max_weight_diff(tmp_path / "two" / "discriminator" / "model.safetensors",
                            tmp_path / "one" / "discriminator" / "model.safetensors") < 1e-4


# ------------------------------------------------------------------------------------------- SIGKILL + resume

# sft as in tests/test_distributed.py (2 ranks, micro-batch 2, 2 accumulation steps), long enough to be killed
# after a save and resumed: state is saved after steps 2 and 4, and the kill waits for step 3's metrics line.
RESUME_SFT = ["sft", "--ckpt", "tiny", "--data", "synth:train:64", "--batch-size", "8", "--micro-batch-size", "2",
              "--max-steps", "5", "--save-every", "2", "--lr", "1e-3", "--set", "eval_fraction=0.08"]


def _descendants(pid: int) -> list[int]:
    """Every process below pid (torchrun starts each rank in a session of its own, so killpg misses them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_torchrun_when(cmd, cwd, env, ready, timeout=600) -> None:
    """Start a 2-rank torchrun; once ready() holds, SIGKILL the launcher and every process below it at once, as
    a machine that dies takes them all."""
    import os
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline and not ready():
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before the kill point"
    finally:
        for pid in [proc.pid, *_descendants(proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(60)


def _killed_then_resumed(args: list[str], env: dict, cwd: Path, kill_at_line: int):
    """An uninterrupted 2-rank run into cwd/ref; the same run into cwd/run, SIGKILLed (launcher and ranks) once
    its metrics.jsonl holds kill_at_line lines, then `--resume`d to the end. Returns (run, ref, the resume's
    completed process)."""
    _run(_torchrun() + ["-m", "prism_cli", *args, "--out", "ref"], cwd, env)
    run = cwd / "run"

    def reached():
        try:
            return len((run / "metrics.jsonl").read_text().splitlines()) >= kill_at_line
        except FileNotFoundError:
            return False

    _kill_torchrun_when(_torchrun() + ["-m", "prism_cli", *args, "--out", "run"], cwd, env, reached)
    assert not (run / "prism.json").exists() and (run / "state").is_dir()
    resumed = _run(_torchrun() + ["-m", "prism_cli", *args, "--out", "run", "--resume"], cwd, env)
    return run, cwd / "ref", resumed


@pytest.mark.dist
@pytest.mark.parametrize("backend", ["fsdp2", "zero2", "zero3"])
def test_resume_after_sigkill_under_sharding_matches_the_uninterrupted_run(backend, tmp_path):
    """SIGKILL of the launcher and both ranks after the first save, then `--resume` under the same backend: the
    final weights and every logged loss equal an uninterrupted run's (sharded optimiser state, RNG and data cursor
    all come back)."""
    run, ref, _ = _killed_then_resumed(RESUME_SFT, _env(PRISM_BACKEND=backend), tmp_path, kill_at_line=3)
    ours, want = _records_of(run), _records_of(ref)
    assert [r["step"] for r in ours] == [r["step"] for r in want] == [1, 2, 3, 4, 5]
    for a, b in zip(ours, want):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6), (a, b)
    assert _max_weight_diff(run / "model" / "model.safetensors", ref / "model" / "model.safetensors") <= 1e-6


# align on 2 ranks, as tests/test_faults.py runs it on one: metrics hold 2 warmup lines, the warmup summary, then a
# line per game step; state is saved after steps 2 and 4, and the kill waits for step 3's line. Under the regime's
# budgets (a ~130-token prompt): several discriminator scoring rows and policy micro-batches per rank.
RESUME_ALIGN = ["align", "--ckpt", "tiny", "--data", "synth:train:64", "--steps", "5", "--prompts-per-step", "2",
                "--rollouts-per-prompt", "4", "--max-new-tokens", "16", "--warmup-steps", "2", "--warmup-prompts", "8",
                "--warmup-batch", "4", "--save-every", "2", "--lr", "1e-4", "--engine", "hf",
                "--disc-row-tokens", "160", "--set", "micro_batch_tokens=160"]


@pytest.mark.dist
@pytest.mark.parametrize("backend", ["zero2", "fsdp2", "zero3"])
def test_align_resume_after_sigkill_under_sharding_matches_the_uninterrupted_run(backend, tmp_path):
    """Two trained models, so two engines each save and restore their sharded state (zero2: the recipe's backend).
    Killed after game step 3, resumed from step 2: every logged figure and both models' final weights equal an
    uninterrupted run's under the same backend."""
    run, ref, resumed = _killed_then_resumed(RESUME_ALIGN, _env(PRISM_BACKEND=backend), tmp_path, kill_at_line=6)
    assert "resuming run at step 2/5" in resumed.stderr
    ours, want = _all_records(run), _all_records(ref)
    assert all(r["d/chunks"] > 1 for r in want if "d/chunks" in r)    # rank 0's; the budget split the groups
    assert [r.get("step") for r in ours] == [r.get("step") for r in want]
    for a, b in zip(ours, want):
        for key, value in b.items():
            if isinstance(value, float) and not key.startswith("time/") and "seconds" not in key:
                assert a[key] == pytest.approx(value, rel=1e-5, abs=1e-6, nan_ok=True), (key, a, b)
    for part in ("model", "discriminator"):
        assert _max_weight_diff(run / part / "model.safetensors", ref / part / "model.safetensors") <= 1e-6, part


def _all_records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _records_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"step"' in line]


# ------------------------------------------------------------------------------------------- two "nodes"

def _two_node_launch(args: list[str], cwd: Path, env: dict) -> None:
    """Two torchrun invocations, one process each, as two machines would start them (--nnodes 2, node ranks 0 and
    1, a static rendezvous on 127.0.0.1); both share cwd, as a multi-node run shares --out (docs/distributed.md)."""
    import subprocess

    from tests.conftest import free_port

    port = str(free_port())
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
                               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port,
                               "-m", "prism_cli", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    logs = [node.communicate(timeout=900)[0] for node in nodes]
    for rank, (node, log) in enumerate(zip(nodes, logs)):
        assert node.returncode == 0, f"node {rank}:\n{log[-3000:]}"


TWO_NODE_ARGS = {
    "sft": ["sft", "--ckpt", "tiny", "--data", "synth:train:32", "--batch-size", "8", "--micro-batch-size", "2",
            "--max-steps", "2", "--lr", "1e-3"],
    "rl": ["rl", "--algo", "dapo", "--ckpt", "tiny", "--data", "synth:train:16", "--steps", "1",
           "--prompts-per-step", "2", "--rollouts-per-prompt", "4", "--max-new-tokens", "16"],
    "align": ["align", "--ckpt", "tiny", "--data", "synth:train:16", "--steps", "1", "--prompts-per-step", "2",
              "--rollouts-per-prompt", "4", "--max-new-tokens", "16", "--warmup-steps", "1", "--warmup-prompts", "4",
              "--warmup-batch", "2"],
}


@pytest.mark.dist
@pytest.mark.parametrize("stage", ["sft", "rl", "align"])
def test_two_node_launch_on_one_machine(stage, tmp_path):
    """sft, rl and align under a 2-"node" launch (one process per node, DDP over gloo) complete, and their
    manifest says two processes ran; only the global main process wrote the shared --out."""
    _two_node_launch([*TWO_NODE_ARGS[stage], "--out", "out"], tmp_path, _env(PRISM_BACKEND="ddp"))
    summary = json.loads((tmp_path / "out" / "prism.json").read_text())["summary"]
    assert summary["processes"] == 2 and summary["backend"] == "ddp"
