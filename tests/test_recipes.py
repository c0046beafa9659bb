"""The recipes: paper-scale YAML dry runs (offline, tiny model in place of the hub ids), shell syntax, and
(PRISM_SLOW=1 only) the README demo end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "recipes" / "qwen3vl-4b"

# The hub cannot be reached in CI: the 4B/2B ids become the embedded tiny model and the data paths (which
# exist only on a training cluster) become synth; every other value comes from the YAML.
DRY_RUNS = {
    "curate": (["curate", "--config", f"{PAPER}/curate.yaml", "--source", "synth:64", "--student", "tiny"],
               ["gemini-3-flash", "unsolved (student tiny, k=8, pass rate <= 0.0", "verify, up to 3 attempt(s)",
                "concurrency 32"]),
    "sft": (["sft", "--config", f"{PAPER}/sft.yaml", "--ckpt", "tiny", "--data", "synth:train:256"],
            ["AdamW lr 1e-05 cosine, warmup 0.1, wd 0.0", "batch 128, micro-batch 2", "max_length 10240"]),
    "align": (["align", "--config", f"{PAPER}/align.yaml", "--ckpt", "tiny", "--disc-base", "tiny",
               "--data", "synth:64"],
              ["MoE 4 experts top-2", "1875 BT steps x 64 pairs, lr 1e-05 cosine",
               "500 steps x 4 prompts x 16 rollouts, max 6144 new tokens; alpha 0.5, format penalty 1.5",
               "policy lr 1e-06 constant, discriminator lr 1e-06, wd 0.01"]),
    "rl-grpo": (["rl", "--config", f"{PAPER}/rl-grpo.yaml", "--ckpt", "tiny", "--data", "synth:64"],
                ["grpo: clip 0.2/0.2, loss token-mean, dynamic sampling False, overlong buffer 0, KL 0.0",
                 "32 x 16 = 512 rollouts per step, 62 steps", "responses up to 8192 tokens",
                 "AdamW lr 1e-06, warmup 10"]),
    "rl-dapo": (["rl", "--config", f"{PAPER}/rl-dapo.yaml", "--ckpt", "tiny", "--data", "synth:64"],
                ["dapo: clip 0.2/0.28, loss token-mean, dynamic sampling True, overlong buffer 4096, KL 0.0",
                 "32 x 16 = 512 rollouts per step, 62 steps", "AdamW lr 1e-06, warmup 10.0, wd 0.01, clip 1.0"]),
    "rl-gspo": (["rl", "--config", f"{PAPER}/rl-gspo.yaml", "--ckpt", "tiny", "--data", "synth:64"],
                ["gspo: clip 0.0003/0.0004, loss seq-mean-token-mean", "32 x 16 = 512 rollouts per step",
                 "AdamW lr 1e-06"]),
    "eval": (["eval", "--config", f"{PAPER}/eval.yaml", "--ckpt", "tiny"],
             ["prism_mathvista_testmini", "prism_mathverse_testmini", "prism_mathvision_testmini",
              "prism_wemath_testmini", "prism_mmmu_val", "prism_mmmu_pro_standard", "prism_hallusion_bench_image"]),
}
# The same dry runs with the real hub ids, planned for the recipes' launch (ZeRO-2 on 8 x 80 GB): known
# Qwen3-VL ids plan offline from their published configs, and every stage must fit.
PLAN = ["--backend", "zero2", "--world-size", "8", "--gpu-memory", "80GiB"]
HUB_RUNS = {
    "sft": (["sft", "--config", f"{PAPER}/sft.yaml", "--data", "synth:train:256", *PLAN], "Qwen/Qwen3-VL-4B-Instruct"),
    "align": (["align", "--config", f"{PAPER}/align.yaml", "--ckpt", "Qwen/Qwen3-VL-4B-Instruct", "--data",
               "synth:64", *PLAN], "Qwen/Qwen3-VL-2B-Instruct"),
    "rl-dapo": (["rl", "--config", f"{PAPER}/rl-dapo.yaml", "--ckpt", "Qwen/Qwen3-VL-4B-Instruct", "--data",
                 "synth:64", *PLAN], "Qwen/Qwen3-VL-4B-Instruct"),
    "unknown": (["sft", "--config", f"{PAPER}/sft.yaml", "--ckpt", "someorg/not-a-known-model", "--data",
                 "synth:train:256"], "someorg/not-a-known-model"),
}


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PRISM_NO_PROGRESS="1", OMP_NUM_THREADS="1", COLUMNS="250", TOKENIZERS_PARALLELISM="false")
    env.pop("FORCE_COLOR", None)
    return env


def _prism(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prism_cli", *args, "--dry-run"], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def dry_runs(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """Every dry run at once (each is mostly interpreter start-up and imports; eval scans lmms-eval's
    task index), so the module costs about as long as the slowest one."""
    cwd = tmp_path_factory.mktemp("recipes")
    jobs = {f"dry:{k}": a for k, (a, _) in DRY_RUNS.items()} | {f"hub:{k}": a for k, (a, _) in HUB_RUNS.items()}
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = {k: pool.submit(_prism, a, cwd) for k, a in jobs.items()}
        return {k: f.result() for k, f in futures.items()}


@pytest.mark.parametrize("stage", list(DRY_RUNS))
def test_paper_config_dry_run(stage, dry_runs):
    args, expected = DRY_RUNS[stage]
    proc = dry_runs[f"dry:{stage}"]
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"prism {' '.join(args)} --dry-run failed:\n{out[-3000:]}"
    assert "Traceback" not in out
    for text in expected:
        assert text in out, f"plan of {stage} lacks {text!r}:\n{proc.stdout[-3000:]}"


@pytest.mark.parametrize("stage", [k for k in HUB_RUNS if k != "unknown"])
def test_paper_config_plan_fits_8_x_80gb_offline(stage, dry_runs):
    proc = dry_runs[f"hub:{stage}"]
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "memory per GPU (zero2 x 8)" in out and "fits: peak" in out and "DOES NOT FIT" not in out, out[-3000:]


def test_unknown_hub_id_fails_offline_in_one_line(dry_runs):
    _, hub_id = HUB_RUNS["unknown"]
    proc = dry_runs["hub:unknown"]
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and hub_id in lines[0], proc.stderr


def test_paper_yaml_keys_are_config_fields():
    """Every key of every paper YAML is a field of its stage's config (the dry runs check values too)."""
    import yaml

    from stages.align.config import AlignConfig
    from stages.common.contract.config import field_names
    from stages.curate.config import CurateConfig
    from stages.eval.config import EvalConfig
    from stages.rl.config import RLConfig
    from stages.sft.config import SFTConfig

    configs = {"curate": CurateConfig, "sft": SFTConfig, "align": AlignConfig, "rl-grpo": RLConfig,
               "rl-dapo": RLConfig, "rl-gspo": RLConfig, "eval": EvalConfig}
    assert sorted(p.stem for p in PAPER.glob("*.yaml")) == sorted(configs)
    for name, cls in configs.items():
        keys = yaml.safe_load((PAPER / f"{name}.yaml").read_text())
        unknown = set(keys) - set(field_names(cls))
        assert not unknown, f"{name}.yaml: unknown keys {unknown}"


SCRIPTS = sorted(p for p in (ROOT / "recipes").rglob("*.sh"))


@pytest.mark.parametrize("script", SCRIPTS, ids=[str(p.relative_to(ROOT)) for p in SCRIPTS])
def test_recipe_shell_syntax(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert script.read_text().splitlines()[0].startswith("#!")
    assert "set -euo pipefail" in script.read_text()


def test_recipe_scripts_exist():
    for name in ("tiny.sh", "ablation-tiny.sh", "qwen3vl-4b/run.sh"):
        assert (ROOT / "recipes" / name).is_file(), name


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.skipif(os.environ.get("PRISM_SLOW") != "1",
                    reason="the README demo takes 12-13 min on 2 cores; run it with "
                           "`PRISM_SLOW=1 python -m pytest tests/test_recipes.py -k tiny_sh`")
@pytest.mark.learning
def test_tiny_sh_end_to_end(tmp_path, record_learning):
    out = tmp_path / "tiny"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    env.pop("PRISM_NO_PROGRESS", None)
    proc = subprocess.run(["bash", str(ROOT / "recipes" / "tiny.sh")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=3600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    for stage in ("curated", "sft", "align", "rl", "hf"):
        assert (out / stage).is_dir(), stage
    synth = {}
    for name in ("tiny-seeing", "sft", "align", "rl"):
        results = json.loads((out / "eval" / f"eval-{name}" / "results.json").read_text())
        synth[name] = results["tasks"]["synth"]
    # The demo shows what it says: the seeing base perceives, and SFT on drifted demos costs perception.
    # (The demo has its own fixed seeds: benchmarks/learning_spread.py varies only the kernel path here.)
    f1 = {name: synth[name]["extra"]["caption_f1"] for name in synth}
    record_learning("tiny-seeing caption F1", f1["tiny-seeing"], 0.85)
    record_learning("caption F1 lost to SFT on drifted demos", f1["tiny-seeing"] - f1["sft"], 0.1)
    record_learning("lowest format rate", min(synth[n]["extra"]["format"] for n in synth), 0.9)
    # CI's runs of the demo on a 2-core AVX512 machine passed these bars with its best kernels and with
    # ATEN_CPU_CAPABILITY=default (2026-12-07, issue 37); the demo's figures are in the README's table.
    assert synth["tiny-seeing"]["extra"]["caption_f1"] >= 0.85, synth
    assert synth["sft"]["extra"]["caption_f1"] <= synth["tiny-seeing"]["extra"]["caption_f1"] - 0.1, synth
    assert all(synth[n]["extra"]["format"] >= 0.9 for n in synth), synth
    assert "accuracy (%)" in proc.stdout and "total" in proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.skipif(os.environ.get("PRISM_SLOW") != "1",
                    reason="a micro run of the ablation takes ~3 min on 2 cores; run it with "
                           "`PRISM_SLOW=1 python -m pytest tests/test_recipes.py -k ablation`")
def test_ablation_tiny_sh_micro_run(tmp_path):
    """The ablation's glue at toy size (docs/miniature.md's rows), two seeds, the chains side by side: every row
    of every seed is evaluated on the test slice from TEST_FIRST, the table has seed intervals and the design's
    paired comparisons with win/loss counts, the game's evidence is read from each align run, and the plot is
    drawn. The seeds train on different problems (the run's seed reaches synth)."""
    results = tmp_path / "results"
    env = dict(os.environ, OUT=str(tmp_path / "abl"), RESULTS=str(results), PYTHON=sys.executable, SEEDS="0 1",
               JOBS="2", EVAL_N="6", TEST_FIRST="1500", SFT_N="16", TEACHER_N="16", SFT_STEPS="3", ALIGN_STEPS="1",
               RL_STEPS="1", WARMUP_STEPS="1", WARMUP_PROMPTS="16")
    proc = subprocess.run(["bash", str(ROOT / "recipes" / "ablation-tiny.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    data = json.loads((results / "ablation-tiny.json").read_text())
    assert (data["eval_n"], data["test_first"]) == (6, 1500)
    rows = data["rows"]
    assert set(rows) == {"base", "sft", "sft-prism", "sft-teacher", "sft-prism-dapo", "sft-dapo-2x", "mix", "mix-prism",
                         "mix-teacher", "mix-dapo", "mix-prism-dapo", "mix-dapo-2x"}
    assert list(rows["base"]) == ["-"] and all(set(v) == {"0", "1"} for r, v in rows.items() if r != "base")
    assert all(x["n"] == 6 and len(x["acc_bits"]) == 6 for v in rows.values() for x in v.values())
    assert set(data["games"]) == {"sft-prism", "mix-prism"}
    assert [(c["id"], c["row"], c["ref"]) for c in data["comparisons"]] == [
        ("P1", "mix-prism", "mix-teacher"), ("P2", "mix-prism-dapo", "mix-dapo-2x"), ("P3", "mix-prism", "mix"),
        ("P4", "mix-prism-dapo", "mix-dapo"), ("P5", "sft-prism", "sft-teacher"), ("P6", "sft-prism-dapo", "sft-dapo-2x"),
        ("P7", "mix", "sft")]
    assert all(c["acc"]["seeds"] == 2 and c["acc"]["problems"] == 6 for c in data["comparisons"])
    md = (results / "ablation-tiny.md").read_text()
    assert "| SFT on the mix (public + teacher demos) | " in md and " ± " in md and "| P1 (primary) |" in md
    assert (results / "ablation-tiny.png").stat().st_size > 10_000
    abl = tmp_path / "abl"
    steps = {json.loads((abl / f"seed{s}" / name / "prism.json").read_text())["config"]["steps"]
             for s in "01" for name in ("mix-dapo-2x", "sft-dapo-2x")}
    assert steps == {2}                                   # as many policy steps as align (1) + RL (1)
    manifests = [json.loads((abl / f"seed{s}" / "sft" / "prism.json").read_text()) for s in "01"]
    assert manifests[0]["data"] != manifests[1]["data"]   # other problems and drift per seed


def test_tiny_sh_prints_the_comparison_table_once():
    """The eval step of several checkpoints prints the comparison; the recipe must not print it again."""
    commands = [line.strip() for line in (ROOT / "recipes" / "tiny.sh").read_text().splitlines()
                if line.strip() and not line.strip().startswith(("#", "echo", "printf"))]
    assert not [c for c in commands if "eval --compare" in c], "the comparison table is printed twice"
    assert any(c.startswith("step eval") and c.count("--ckpt") >= 2 for c in commands)
