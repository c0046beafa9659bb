"""The reward table and `prism rl --reward module:function`: a user's verifier is found, checked before any
output is written, and really used to score rollouts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stages.common.contract.errors import PrismError, UsageError
from stages.common.contract.samples import Sample
from stages.common.protocol import format_response
from stages.common.rewards import compute_score
from stages.common.rewards.table import REWARDS, load_reward, probe
from tests.test_cli import invoke, one_error_line

REPO = Path(__file__).resolve().parents[1]

USER_REWARDS = '''
import os

def always_one(response, sample):
    with open(os.environ["CALLS_FILE"], "a") as f:   # proof the run called this function
        f.write(sample.id + "\\n")
    return 1.0

def as_dict(response, sample):
    return {"score": 0.5, "acc": 1.0 if sample.answer in response else 0.0}

def says_yes(response, sample):
    return "yes"

def raises(response, sample):
    raise KeyError("meta")

def one_argument(response):
    return 1.0

not_a_function = 3
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "user_rewards.py").write_text(USER_REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("CALLS_FILE", str(tmp_path / "calls.txt"))
    sys.modules.pop("user_rewards", None)
    yield "user_rewards"
    sys.modules.pop("user_rewards", None)


SAMPLE = Sample(id="s1", images=[], question="2+2?", answer="4")


def test_protocol_reward_is_compute_score():
    assert "protocol" in REWARDS
    reward = load_reward("protocol", acc_weight=0.7, format_weight=0.3)
    for text in (format_response("c", "t", "4"), format_response("c", "t", "5"), "4", ""):
        expected = compute_score(text, "4", None, acc_weight=0.7, format_weight=0.3)
        got = reward(text, SAMPLE)
        assert {k: got[k] for k in ("score", "acc", "format")} == {k: expected[k] for k in ("score", "acc", "format")}


def test_user_reward_results_are_normalised(user_module):
    good = format_response("c", "t", "4")
    assert load_reward(f"{user_module}:as_dict")(good, SAMPLE) == {"score": 0.5, "acc": 1.0, "format": 1.0}
    # a number is the score and the acc; format says whether the response follows the protocol
    assert load_reward(f"{user_module}:always_one")("no tags", SAMPLE) == {"score": 1.0, "acc": 1.0, "format": 0.0}


@pytest.mark.parametrize("spec, needle", [
    ("user_rewards:", "is not module:function"),
    ("user rewards:x", "is not module:function"),
    ("no_such_module_xyz:fn", "no module 'no_such_module_xyz'"),
    ("user_rewards:missing", "has no 'missing'"),
    ("user_rewards:not_a_function", "not a function"),
    ("user_rewards:one_argument", "cannot be called as fn(response, sample)"),
    ("nonsense", "registered rewards are protocol"),
])
def test_bad_reward_specs_are_usage_errors(user_module, spec, needle):
    with pytest.raises(UsageError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        load_reward(spec)


def test_wrong_return_and_raising_rewards_fail_at_the_probe(user_module):
    with pytest.raises(UsageError, match=r"returned the reward 'yes' \(str\)"):
        probe(load_reward(f"{user_module}:says_yes"), SAMPLE)
    with pytest.raises(UsageError, match="raised KeyError"):
        probe(load_reward(f"{user_module}:raises"), SAMPLE)
    with pytest.raises(PrismError, match="raised KeyError on sample 's1'"):   # mid-run: stops, never a silent 0
        load_reward(f"{user_module}:raises")("x", SAMPLE)


@pytest.mark.parametrize("fn, needle", [("missing", "has no 'missing'"), ("says_yes", "returned the reward 'yes'"),
                                        ("raises", "raised KeyError")])
def test_cli_refuses_a_bad_reward_before_touching_the_output(user_module, tmp_path, fn, needle):
    out = tmp_path / "out"
    result = invoke("rl", "--ckpt", "tiny", "--data", "synth:train:4", "--algo", "grpo", "--steps", "1",
                    "--prompts-per-step", "2", "--rollouts-per-prompt", "2", "--reward", f"{user_module}:{fn}",
                    "--out", out)
    one_error_line(result, 2, needle)
    assert not out.exists()


def test_rl_scores_with_the_users_reward(tmp_path):
    """A real `prism rl` run in a subprocess, the verifier imported from PYTHONPATH: a reward that is always 1.0
    gives reward/mean 1.0 (grpo: no overlong shaping), and it was called once per rollout."""
    (tmp_path / "user_rewards.py").write_text(USER_REWARDS)
    out, calls = tmp_path / "rl", tmp_path / "calls.txt"
    env = dict(os.environ, PRISM_NO_PROGRESS="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", CALLS_FILE=str(calls),
               PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "prism_cli", "rl", "--ckpt", "tiny", "--data", "synth:train:8", "--algo", "grpo",
           "--steps", "2", "--prompts-per-step", "2", "--rollouts-per-prompt", "2", "--max-new-tokens", "8",
           "--reward", "user_rewards:always_one", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["reward/mean"] for r in records] == [1.0, 1.0]
    called = calls.read_text().splitlines()
    assert len(called) == 1 + 2 * 2 * 2   # the probe, then 2 steps x 2 prompts x 2 rollouts
    manifest = json.loads((out / "prism.json").read_text())
    assert manifest["summary"]["reward"] == "user_rewards:always_one"
    assert manifest["config"]["reward"] == "user_rewards:always_one"
