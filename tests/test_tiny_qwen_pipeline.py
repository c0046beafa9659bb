"""Every stage on tiny-qwen (the real Qwen3-VL tokenizer and stock template; tags are several BPE pieces, the
template has no generation markers and no default system prompt): curate -> sft -> align -> rl -> eval ->
export, a few steps each, plus the stage-specific pieces that differ from `tiny` on a real checkpoint.
With a 151,936-row vocabulary every step pays for the full LM head, so sequence counts are kept small."""

import json

import pytest
import torch

from stages.align.config import AlignConfig
from stages.align.run import run as align
from stages.align.scoring import END_TOKEN, encode_segment, score_groups
from stages.common.data.chat import rollout_prompt
from stages.common.models.discriminator import load_discriminator, load_discriminator_processor
from stages.common.models.loading import load_policy, load_processor
from stages.common.policy_update.logprobs import build_policy_batch, response_logprobs
from stages.common.protocol import SYSTEM_PROMPT, format_response, parse_response
from stages.common.rewards import compute_score
from stages.common.rollout import SamplingParams
from stages.common.rollout.hf import HFEngine, StopStringChecker, cut_after_stop
from stages.common.world import synth
from stages.curate.config import CurateConfig
from stages.curate.run import run as curate
from stages.eval.config import EvalConfig
from stages.eval.run import run as evaluate
from stages.export.config import ExportConfig
from stages.export.run import run as export
from stages.rl.config import RLConfig
from stages.rl.run import run as rl
from stages.sft.config import SFTConfig
from stages.sft.run import run as sft
from tests.conftest import LEARNING_SEED, run_stage
from tests.test_logprobs import engine_logprobs
from tests.test_rollout import two_prompts, with_logit_bias

SHORT = 16  # new tokens per rollout: an untrained 151,936-way policy never stops on its own


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_qwen_path):
    root = tmp_path_factory.mktemp("tiny-qwen")
    out = {}
    out["curated"] = run_stage(CurateConfig, curate, source=["synth:train:8"], teacher="oracle", select="unsolved",
                               student="tiny-qwen", k=2, student_max_new_tokens=SHORT, out=str(root / "curated"))
    out["sft"] = run_stage(SFTConfig, sft, ckpt="tiny-qwen", data=[str(out["curated"])], out=str(root / "sft"),
                           lr=3e-3, batch_size=4, micro_batch_size=4, max_steps=3, warmup=0, eval_fraction=0,
                           save_every=1000, seed=LEARNING_SEED)
    out["align"] = run_stage(AlignConfig, align, ckpt=str(out["sft"]), data=[str(out["curated"])],
                             disc_base="tiny-qwen", warmup_steps=1, warmup_prompts=4, warmup_batch=4, steps=1,
                             prompts_per_step=2, rollouts_per_prompt=2, max_new_tokens=SHORT, lr=5e-5, disc_lr=5e-5,
                             out=str(root / "align"), seed=0)
    out["rl"] = run_stage(RLConfig, rl, algo="grpo", ckpt=str(out["align"]), data=["synth:train:16"], steps=1,
                          prompts_per_step=2, rollouts_per_prompt=2, max_new_tokens=SHORT, lr=2e-5,
                          out=str(root / "rl"), seed=0)
    out["eval"] = run_stage(EvalConfig, evaluate, ckpt=[str(out["rl"])], tasks=["synth"], synth="synth:test:4",
                            max_new_tokens=SHORT, out=str(root / "eval"))
    out["export"] = run_stage(ExportConfig, export, ckpt=str(out["rl"]), out=str(root / "hf"), dtype="fp32")
    return out


def manifest(path):
    return json.loads((path / "prism.json").read_text())


@pytest.mark.learning
@pytest.mark.slow
def test_every_stage_completes_on_tiny_qwen(chain, record_learning):
    for stage in ("curated", "sft", "align", "rl", "eval"):
        assert (chain[stage] / "prism.json").is_file(), stage
    curated = manifest(chain["curated"])["summary"]
    assert curated["student_pass"]["k"] == 2 and sum(curated["student_pass"]["histogram"].values()) == 8
    sft_summary = manifest(chain["sft"])["summary"]
    record_learning("sft loss fall (first - final)", sft_summary["first_loss"] - sft_summary["final_loss"], 0.0)
    assert sft_summary["samples_refused"] == 0 and sft_summary["final_loss"] < sft_summary["first_loss"]
    assert manifest(chain["eval"])["summary"]["synth"] is not None


def test_export_keeps_the_stock_template_and_shows_the_system_prompt(chain, tiny_qwen_path):
    hf = chain["export"]
    assert (hf / "chat_template.jinja").read_text() == (tiny_qwen_path / "chat_template.jinja").read_text()
    card = (hf / "README.md").read_text()
    assert json.dumps(SYSTEM_PROMPT) in card and "SYSTEM_PROMPT}" in card
    config = json.loads((hf / "config.json").read_text())
    assert config["text_config"]["vocab_size"] == 151936 and config["tie_word_embeddings"] is True


def test_align_scores_segments_at_their_closing_token_in_both_layouts(chain):
    """Segment spans come from the text (parse_response) and are re-tokenised as `segment<|im_end|>`, so a
    tag split into pieces changes nothing; the shared-prompt layout gives the separate layout's scores."""
    disc_dir = chain["align"] / "discriminator"
    disc, processor = load_discriminator(disc_dir), load_discriminator_processor(disc_dir)
    tok = processor.tokenizer
    sample = synth.load("synth:test:1")[0]
    demo = synth.oracle_demo(sample)
    merged = parse_response(f"<caption>{demo.caption}</caption><think>{demo.think}</think><answer>B</answer>")
    assert merged.format_ok
    ids = encode_segment(tok, merged.caption)
    assert ids[-1] == tok.convert_tokens_to_ids(END_TOKEN) and tok.decode(ids[:-1]) == merged.caption
    segments = [demo.caption, demo.think, merged.caption, merged.think, "", None]
    with torch.no_grad():
        shared = score_groups(disc, processor, [rollout_prompt(sample)], [segments], "shared").flat
        separate = score_groups(disc, processor, [rollout_prompt(sample)], [segments], "separate").flat
    assert torch.allclose(shared, separate, atol=1e-4), (shared - separate).abs().max()


@pytest.fixture(scope="module")
def qwen_policy(tiny_qwen_path):
    return load_policy("tiny-qwen", train=False), load_processor("tiny-qwen")


def test_rollout_logprobs_equal_recomputation(qwen_policy):
    model, processor = qwen_policy
    model = with_logit_bias(model, {processor.tokenizer.eos_token_id: 6.0})  # rows of different lengths
    prompts, n = two_prompts(), 2
    res = HFEngine(model, processor).generate(prompts, SamplingParams(n=n, max_new_tokens=10, seed=3))
    flat = [c for group in res for c in group]
    assert all(c.finish_reason in ("stop", "length") for c in flat)
    batch = build_policy_batch(processor, prompts, [c.token_ids for c in flat],
                               [p for p in range(len(prompts)) for _ in range(n)])
    with torch.no_grad():
        logp, _ = response_logprobs(model, batch, chunk_size=7)
    expected = engine_logprobs(res, logp.shape[1])
    assert torch.allclose(logp, expected, atol=1e-4), (logp - expected).abs().max()


def test_endoftext_also_ends_a_rollout(qwen_policy):
    """Qwen3-VL's generation config lists <|endoftext|> beside <|im_end|> as eos."""
    model, processor = qwen_policy
    endoftext = processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    biased = with_logit_bias(model, {endoftext: 60.0})
    res = HFEngine(biased, processor).generate(two_prompts()[:1], SamplingParams(n=1, max_new_tokens=5, seed=0))
    assert res[0][0].token_ids == [endoftext] and res[0][0].finish_reason == "stop"


def test_stop_string_split_over_merged_pieces(qwen_policy):
    """`</answer>` is three pieces, the last merged with the newline after it (`>Ċ`): the stop string is
    found at the token that completes it, and the text is cut right after it."""
    _, processor = qwen_policy
    tok = processor.tokenizer
    text = format_response("a red circle", "1 + 1 = 2.", "B") + "\nmore text"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    checker = StopStringChecker(processor, ["</answer>"])
    hits = [bool(checker.hit(torch.tensor([ids[:k]]))[0]) for k in range(1, len(ids) + 1)]
    first = hits.index(True)
    assert tok.convert_ids_to_tokens(ids[first]) == ">Ċ" and not any(hits[:first])
    assert cut_after_stop(tok.decode(ids[:first + 1]), ["</answer>"]) == format_response("a red circle", "1 + 1 = 2.",
                                                                                         "B")


def test_eval_answer_extraction_with_merged_tags(qwen_policy):
    """Rewards read the text: the real tokenizer's decode gives back the tags whatever the pieces."""
    _, processor = qwen_policy
    tok = processor.tokenizer
    response = "<caption>two squares</caption><think>2 + 3 = 5.</think><answer>5</answer>"
    decoded = tok.decode(tok(response + "<|im_end|>", add_special_tokens=False)["input_ids"], skip_special_tokens=True)
    assert decoded == response and compute_score(decoded, "5")["score"] == 1.0


def test_lmms_plugin_prompt_carries_the_system_prompt(qwen_policy):
    """The stock template adds no system prompt: the plugin's prompt must bring the protocol's."""
    from stages.common.rollout.prompts import prompt_text
    from stages.eval.lmms_plugin import protocol_prompt

    _, processor = qwen_policy
    text = prompt_text(processor, protocol_prompt("What is shown?", []))
    assert text == (f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\nWhat is shown?<|im_end|>\n"
                    "<|im_start|>assistant\n")


@pytest.mark.learning
@pytest.mark.slow
def test_sft_loss_trend_matches_tiny(tmp_path, tiny_path, tiny_qwen_path, record_learning):
    """The same SFT (synth oracle demonstrations, seed, lr, 12 steps) on tiny and on tiny-qwen: both losses
    fall steadily and by a similar fraction (measured: 6.72 -> 2.87 on tiny, 11.93 -> 5.38 on tiny-qwen,
    whose start is ln 151,936 instead of ln 2,048). Without real label masks tiny-qwen trained on nothing."""
    ratios = {}
    for ckpt in ("tiny", "tiny-qwen"):
        out = run_stage(SFTConfig, sft, ckpt=ckpt, data=["synth:train:32"], out=str(tmp_path / ckpt), lr=3e-3,
                        batch_size=4, micro_batch_size=4, max_steps=12, warmup=0, schedule="constant",
                        eval_fraction=0, save_every=1000, seed=LEARNING_SEED)
        losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert len(losses) == 12 and manifest(out)["summary"]["samples_refused"] == 0
        record_learning(f"{ckpt}: loss rises over 12 steps", sum(b > a for a, b in zip(losses, losses[1:])), 2,
                        above=False)
        assert sum(b > a for a, b in zip(losses, losses[1:])) <= 2, (ckpt, losses)  # falls steadily
        ratios[ckpt] = losses[-1] / losses[0]
    record_learning("tiny: final / first loss", ratios["tiny"], 0.6, above=False)
    record_learning("tiny-qwen: final / first loss", ratios["tiny-qwen"], 0.6, above=False)
    record_learning("tiny - tiny-qwen loss ratio, absolute", abs(ratios["tiny"] - ratios["tiny-qwen"]), 0.15,
                    above=False)
    # Measured (issue 37, benchmarks/results/learning-spread.md: seeds 0-3 over the AVX512, AVX2, default paths):
    # final/first 0.40-0.44 on tiny and 0.43-0.45 on tiny-qwen against 0.6 (10 sd and more); their difference
    # 0.004-0.05 against 0.15 (6 sd); rises over the 12 steps 0-1 against at most 2.
    assert ratios["tiny"] < 0.6 and ratios["tiny-qwen"] < 0.6, ratios
    assert abs(ratios["tiny"] - ratios["tiny-qwen"]) < 0.15, ratios


def test_vllm_weight_names_cover_the_tied_checkpoint(qwen_policy, tiny_qwen_path):
    """With tied embeddings the checkpoint has no lm_head tensor, but vLLM holds one of its own: the names sent
    to vLLM's reload are the saved ones plus lm_head (skipping it leaves vLLM's copy stale)."""
    from safetensors import safe_open

    from stages.common.rollout import vllm as vllm_engine

    model, _ = qwen_policy
    sent = {n for n, _ in vllm_engine.weights_to_load(vllm_engine.full_parameters(model))}
    with safe_open(str(tiny_qwen_path / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    assert model.config.tie_word_embeddings and "lm_head.weight" not in saved and sent == saved | {"lm_head.weight"}
