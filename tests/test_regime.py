"""The paper's regime, scaled down to two CPU ranks (torchrun, gloo; marked dist): the paths that only trigger at
scale, through the real code, compared with one process where the maths says they must agree.

tests/dist_worker.py `regime` runs, in one process per rank:
  disc  two discriminator steps of the align objective under a row budget of 200 tokens: several scoring
        chunks per rank and unequal counts over ranks (5 and 2), backpropagated by ScoreResult.backward;
  ppo   two clipped policy updates with 16-token lm_head chunks (several per micro-batch, unequal over
        ranks), process 1 left with no group at all (DAPO's dynamic sampling can do that; it joins with a
        zero-weight filler row) and process 0 holding a text-only group next to image groups (under
        DeepSpeed the text-only micro-batches run the vision tower on a blank image with weight 0).
The align CLI then runs under ZeRO-2 with several scoring chunks per rank in the warmup and the game.

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
@pytest.mark.parametrize("backend", ["ddp", "fsdp2", "zero2", "zero3"])
def test_regime_two_ranks_equal_one_process(regime_single, backend, tmp_path):
    _run(_torchrun() + [str(WORKER), "regime", str(tmp_path)], ROOT, _env(PRISM_BACKEND=backend, **REGIME))
    ours, ref = _stats(tmp_path / "disc"), _stats(regime_single / "disc")
    assert ours["backend"] == backend and ours["world"] == 2
    chunks = ours["stats"][0]["chunks"]
    assert min(chunks) > 1 and chunks[0] != chunks[1]          # several chunks per rank, unequal counts
    for key, rtol in (("loss", 1e-5), ("grad_norm", 1e-4)):
        torch.testing.assert_close(torch.tensor([s[key] for s in ours["stats"]]),
                                   torch.tensor([s[key] for s in ref["stats"]]), rtol=rtol, atol=1e-6, msg=key)
    assert _max_weight_diff(tmp_path / "disc" / "weights.safetensors",
                            regime_single / "disc" / "weights.safetensors") < 1e-4

    ours, ref = _stats(tmp_path / "ppo"), _stats(regime_single / "ppo")
    torch.testing.assert_close(torch.tensor([s["update/grad_norm"] for s in ours["stats"]]),
                               torch.tensor([s["update/grad_norm"] for s in ref["stats"]]), rtol=1e-4, atol=0)
    assert _max_weight_diff(tmp_path / "ppo" / "weights.safetensors",
                            regime_single / "ppo" / "weights.safetensors") < 1e-4


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
