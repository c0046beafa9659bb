"""An image the processor refuses (or that does not decode) at rollout time costs its own prompt, never the run
(issue 33): the prompt is rolled out as a stand-in of the same shape, never scored or trained, and counted in
the step's metrics, the manifest and the log. Under several processes every rank runs the same collectives."""

from __future__ import annotations

import base64
import io
import json
import threading

import pytest

from stages.common.contract import config
from stages.common.contract.checkpoint import load_manifest
from stages.common.contract.samples import Sample, sample_to_row
from stages.common.protocol import format_response


def _image(width: int, height: int, fmt: str = "PNG") -> bytes:
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    pixels = np.random.RandomState(0).randint(0, 255, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def _truncated_jpeg() -> bytes:
    """Half a JPEG: its header is whole (the load-time checks read headers), its pixels do not decode."""
    raw = _image(128, 128, "JPEG")
    return raw[: len(raw) // 2]


@pytest.fixture(autouse=True)
def _strict_decoding(monkeypatch):
    """lmms-eval, once imported (another test may have), sets PIL's LOAD_TRUNCATED_IMAGES for the whole
    process, which fills a truncated image's missing rows with grey instead of failing: these tests need
    PIL's default."""
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)


@pytest.fixture(scope="module")
def processor():
    from stages.common.contract import checkpoint
    from stages.common.models.loading import load_processor

    return load_processor(checkpoint.resolve("tiny"))


def _sample(sample_id: str, image: bytes) -> Sample:
    return Sample(id=sample_id, question="What colour?", answer="red", images=[image])


def test_screen_stands_in_for_what_the_processor_refuses_and_keeps_the_batch_shape(processor):
    from stages.common.data.chat import screened_rollout_prompts
    from stages.common.rollout.prompts import STAND_IN_SIZE, encode_prompts

    samples = [_sample("good", _image(32, 24)), _sample("sliver", _image(4000, 3)),
               _sample("broken", _truncated_jpeg()), _sample("good2", _image(40, 40))]
    prompts, refused = screened_rollout_prompts(samples, processor)
    assert sorted(refused) == [1, 2]
    assert "sample sliver" in refused[1] and "aspect ratio" in refused[1]
    assert "sample broken" in refused[2] and "cannot be decoded" in refused[2]
    assert len(prompts) == 4 and [len(p.images) for p in prompts] == [1, 1, 1, 1]
    assert prompts[0].images[0].size == (32, 24) and prompts[3].images[0].size == (40, 40)
    assert prompts[1].images[0].size == prompts[2].images[0].size == (STAND_IN_SIZE, STAND_IN_SIZE)
    enc = encode_prompts(processor, prompts)   # the batch the engine sees: accepted whole
    assert len(enc["image_grid_thw"]) == 4


def test_screen_leaves_an_accepted_batch_alone(processor):
    from stages.common.data.chat import rollout_prompt, screened_rollout_prompts

    samples = [_sample("a", _image(32, 24)), Sample(id="text", question="2+2?", answer="4", images=[])]
    prompts, refused = screened_rollout_prompts(samples, processor)
    assert refused == {}
    assert [p.images[0].size for p in prompts[:1]] == [rollout_prompt(samples[0]).images[0].size]
    assert prompts[1].images == []


class _Completion:
    def __init__(self, text):
        self.text, self.token_ids, self.logprobs, self.finish_reason = text, [1, 2], [-0.1, -0.1], "stop"


class _FakeEngine:
    """n completions per prompt, right and wrong in turn (so DAPO keeps the group); records its batches."""

    name = "fake"

    def __init__(self, processor):
        self.processor, self.batches = processor, []

    def sync_weights(self, model):
        pass

    def generate(self, prompts, params):
        self.batches.append(len(prompts))
        answers = [format_response("a red square", "it is red", answer) for answer in ("red", "blue")]
        return [[_Completion(answers[i % 2]) for i in range(params.n)] for _ in prompts]


class _Group:
    """Two ranks in two threads; reduce is a real all-reduce between them (a barrier, then the sum), so a
    rank that skipped or added a collective would leave the other waiting (the barrier times out)."""

    def __init__(self):
        self.barrier, self.slots = threading.Barrier(2, timeout=60), [None, None]


class _Accelerator:
    num_processes, device = 2, "cpu"

    def __init__(self, rank, group):
        self.process_index, self.group, self.collectives = rank, group, []

    def reduce(self, tensor, reduction):
        self.collectives.append(reduction)
        self.group.slots[self.process_index] = tensor.clone()
        self.group.barrier.wait()
        total = self.group.slots[0] + self.group.slots[1]
        self.group.barrier.wait()
        return total


@pytest.mark.parametrize("dynamic", [False, True])
def test_a_rank_whose_prompts_are_all_refused_runs_the_same_collectives_as_the_others(processor, dynamic):
    from stages.common.rollout.ahead import RolloutsAhead
    from stages.common.training.runtime import StepTimer
    from stages.rl.config import RLConfig
    from stages.rl.run import collect_rollouts

    cfg = config.resolve(RLConfig, flags=dict(algo="dapo" if dynamic else "grpo", ckpt="tiny", prompts_per_step=4,
                                              rollouts_per_prompt=2, max_new_tokens=4, dynamic_sampling=dynamic,
                                              max_num_gen_batches=3))
    data = {0: [_sample(f"sliver{i}", _image(4000, 3)) for i in range(4)],   # rank 0: every prompt refused
            1: [_sample(f"good{i}", _image(32, 24)) for i in range(4)]}
    group, runs, errors = _Group(), {}, []

    def rank_main(rank):
        try:
            accelerator, engine = _Accelerator(rank, group), _FakeEngine(processor)
            rollouts, _, sampling = collect_rollouts(cfg, accelerator, type("P", (), {"module": None}), engine,
                                                     RolloutsAhead(engine, None, lag=0), data[rank], 0, 0,
                                                     StepTimer())
            runs[rank] = (accelerator.collectives, engine.batches, rollouts, sampling)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
            group.barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert runs[0][0] == runs[1][0] and runs[0][1] == runs[1][1]    # same collectives, same rollout batches
    batches = 3 if dynamic else 1      # DAPO: rank 0 never fills, so both draw to max_num_gen_batches
    assert len(runs[0][1]) == batches
    refused_rank, good_rank = runs[0][2], runs[1][2]
    assert refused_rank.samples == [] and refused_rank.all_rewards == []   # nothing of a stand-in is scored or trained
    assert refused_rank.filler is not None                                  # the zero-weight row keeps the update's shape
    assert [s.id for s in good_rank.samples] == [s.id for s in good_rank.samples if s.id.startswith("good")]
    assert len(good_rank.samples) == 2 and len(good_rank.all_rewards) == 2 * 2 * batches
    for rank in (0, 1):   # the global counts, the same on every rank: rank 0 drew none, rank 1 two per batch
        assert runs[rank][3]["sampling/refused"] == 2 * batches
        assert runs[rank][3]["sampling/groups_drawn"] == 2 * batches


def test_rl_skips_a_prompt_whose_image_is_refused_mid_run_and_counts_it(tmp_path, capsys, monkeypatch):
    from stages.common.data import formats
    from stages.common.world.synth import load as synth_load
    from stages.rl.config import RLConfig
    from stages.rl.run import run

    monkeypatch.setattr(formats, "MAX_ASPECT_RATIO", 10**6)   # let the sliver past the load check, to the processor
    rows = [dict(sample_to_row(s), images=["data:image/png;base64," + base64.b64encode(s.images[0]).decode()])
            for s in synth_load("synth:train:2")]
    rows.append(dict(rows[0], id="sliver", images=["data:image/png;base64," + base64.b64encode(_image(4000, 3)).decode()]))
    rows.append(dict(rows[1], id="broken", images=["data:image/jpeg;base64," + base64.b64encode(_truncated_jpeg()).decode()]))
    data = tmp_path / "prompts.jsonl"
    data.write_text("\n".join(json.dumps(r, default=str) for r in rows) + "\n")
    out = run(config.resolve(RLConfig, flags=dict(algo="grpo", ckpt="tiny", data=[str(data)], out=str(tmp_path / "rl"),
                                                  steps=1, prompts_per_step=4, rollouts_per_prompt=2, max_new_tokens=4,
                                                  engine="hf", warmup=0, seed=0)))
    manifest = load_manifest(out)
    assert manifest["summary"]["prompts_refused"] == 2
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["sampling/refused"] == 2 and metrics[0]["sampling/groups_kept"] == 2
    err = capsys.readouterr().err
    assert "sample sliver" in err and "sample broken" in err and "skipped a prompt" in err


@pytest.mark.parametrize("world, prompts_per_step", [(1, 4), (2, 4), (4, 2)])   # (4, 2): groups split over 2 ranks
def test_align_replaces_a_refused_prompt_with_a_later_draw_the_same_on_every_process(processor, world,
                                                                                      prompts_per_step):
    from stages.align.config import AlignConfig
    from stages.align.run import next_prompts
    from stages.common.contract.samples import stream_item
    from stages.common.training.groups import group_layout

    cfg = config.resolve(AlignConfig, flags=dict(ckpt="tiny", data=["synth:train:4"],
                                                   prompts_per_step=prompts_per_step, rollouts_per_prompt=4))
    samples = [_sample(f"good{i}", _image(32, 24)) for i in range(6)] + [_sample("sliver", _image(4000, 3))]
    layout = group_layout(prompts_per_step, 4, world)
    # the first step whose draw holds the sliver
    cursor = next(c for c in range(0, 200, prompts_per_step)
                  if any(stream_item(samples, c + i, cfg.seed).id == "sliver" for i in range(prompts_per_step)))
    shares = {rank: next_prompts(samples, cursor, cfg, layout, rank, processor) for rank in range(world)}
    for rank, (batch, new_cursor, refused) in shares.items():
        assert new_cursor == cursor + prompts_per_step
        assert len(batch) == len(layout.prompt_indices(rank))           # every process keeps its share's size
        assert all(s.id.startswith("good") and p.images[0].size == (32, 24) for s, p in batch)
    total = sum(len(r) for _, _, r in shares.values())     # each holder of a refused prompt counts it
    assert total >= layout.ranks_per_group and total % layout.ranks_per_group == 0
    assert all("sample sliver" in reason for _, _, r in shares.values() for reason in r)
    if layout.ranks_per_group > 1:   # the processes of a split group hold the same replacement
        for group_start in range(0, world, layout.ranks_per_group):
            holders = range(group_start, group_start + layout.ranks_per_group)
            assert len({(tuple(s.id for s, _ in shares[r][0]), tuple(shares[r][2])) for r in holders}) == 1
    again = next_prompts(samples, cursor, cfg, layout, 0, processor)   # a resumed run draws the same
    assert [s.id for s, _ in again[0]] == [s.id for s, _ in shares[0][0]]


def test_sft_skips_a_sample_whose_image_does_not_decode_and_encodes_the_rest(processor):
    import dataclasses

    from stages.common.world.synth import load as synth_load
    from stages.common.world.synth import with_oracle_demos
    from stages.sft.run import encode_chunk

    samples = with_oracle_demos(synth_load("synth:train:3"))
    samples[1] = dataclasses.replace(samples[1], images=[_truncated_jpeg()])
    out = encode_chunk(samples, processor, None, 4096, True)
    assert not isinstance(out[0], str) and not isinstance(out[2], str)
    assert isinstance(out[1], str) and "cannot be decoded" in out[1]


class _GreedyEngine(_FakeEngine):
    """Answers "red" in the protocol (a right answer for _sample)."""

    def generate(self, prompts, params):
        self.batches.append(len(prompts))
        return [[_Completion(format_response("a red square", "it is red", "red"))] * params.n for _ in prompts]


def test_native_eval_scores_a_refused_prompt_as_unanswered_and_counts_it(processor, capsys):
    from stages.common.rollout import SamplingParams
    from stages.common.evaluation.synth import evaluate, summarize

    import dataclasses

    from stages.common.world.synth import load as synth_load

    samples = synth_load("synth:test:3")
    samples[1] = dataclasses.replace(samples[1], id="sliver", images=[_image(4000, 3)])
    samples[2] = dataclasses.replace(samples[2], id="broken", images=[_truncated_jpeg()])
    engine = _GreedyEngine(processor)
    records = evaluate(engine, samples, SamplingParams(n=1, temperature=0.0, max_new_tokens=4), batch_size=8)
    assert engine.batches == [3]                      # one batch, its shape kept
    assert records[0]["response"] != "" and [r["response"] for r in records[1:]] == ["", ""]
    assert records[1]["acc"] == records[2]["acc"] == 0.0
    assert "refused" not in records[0] and "aspect ratio" in records[1]["refused"]
    assert "cannot be decoded" in records[2]["refused"]
    result = summarize(records)
    assert result["n"] == 3 and result["extra"]["refused"] == 2
    assert "sample sliver" in capsys.readouterr().err


def test_lmms_model_answers_a_refused_image_with_nothing_and_records_it(processor):
    pytest.importorskip("lmms_eval")
    from PIL import Image

    from stages.eval.lmms_plugin import PrismLMM

    lmm = PrismLMM(rollout_engine=_GreedyEngine(processor), batch_size=8, reply="full")
    docs = {0: Image.new("RGB", (32, 24)), 1: Image.new("RGB", (4000, 3))}
    lmm.task_dict = {"t": {"test": docs}}

    class Request:
        def __init__(self, doc_id):
            self.args = ("What colour?", {"max_new_tokens": 4}, lambda doc: [doc], doc_id, "t", "test")

    replies = lmm.generate_until([Request(0), Request(1)])
    assert "red" in replies[0] and replies[1] == ""
    assert list(lmm.refused) == [("t", 1)] and "aspect ratio" in lmm.refused[("t", 1)]


def test_an_hf_teacher_answers_a_refused_image_as_a_bad_request(processor):
    from stages.curate.teacher_api import TeacherRequest
    from stages.curate.teachers import HFTeacher

    teacher = HFTeacher.__new__(HFTeacher)   # the engine is a fake: no model is loaded
    teacher.processor, teacher.engine, teacher.batch_size = processor, _GreedyEngine(processor), 8
    teacher.temperature, teacher.max_new_tokens = 0.0, 4
    samples = [_sample("good", _image(32, 24)), _sample("sliver", _image(4000, 3))]
    replies = teacher.call_batch([TeacherRequest("", s.question, s.images, 0, 0, sample=s) for s in samples])
    assert [r.finish for r in replies] == ["stop", "bad_request"]
    assert "sample sliver" in replies[1].detail and replies[1].text is None


def test_align_runs_past_refused_prompts_and_counts_them(tmp_path, capsys, monkeypatch):
    """One good prompt and two whose images fail at rollout time: every draw of a bad one is replaced by a
    later one, the warmup leaves them out, the run completes and counts them."""
    from stages.align.config import AlignConfig
    from stages.align.run import run
    from stages.common.data import formats
    from stages.common.world.synth import load as synth_load
    from stages.common.world.synth import with_oracle_demos

    monkeypatch.setattr(formats, "MAX_ASPECT_RATIO", 10**6)   # let the sliver past the load check
    good = sample_to_row(with_oracle_demos(synth_load("synth:train:1"))[0])
    encode = lambda raw: "data:image/png;base64," + base64.b64encode(raw).decode()  # noqa: E731
    rows = [dict(good, images=[encode(good["images"][0])]),
            dict(good, id="sliver", images=[encode(_image(4000, 3))]),
            dict(good, id="broken", images=[encode(_truncated_jpeg())])]
    data = tmp_path / "demos.jsonl"
    data.write_text("\n".join(json.dumps(r, default=str) for r in rows) + "\n")
    out = run(config.resolve(AlignConfig, flags=dict(
        ckpt="tiny", data=[str(data)], out=str(tmp_path / "align"), steps=1, prompts_per_step=2,
        rollouts_per_prompt=2, max_new_tokens=8, warmup_steps=1, warmup_prompts=3, warmup_batch=2, seed=0)))
    summary = load_manifest(out)["summary"]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step = [r for r in metrics if "sampling/refused" in r]
    assert len(step) == 1 and step[0]["sampling/refused"] >= 1        # 2 of the 3 are bad: a draw of 2 hits one
    assert summary["prompts_refused"] == round(step[0]["sampling/refused"])
    err = capsys.readouterr().err
    assert "align warmup: skipped a prompt" in err and "sample sliver" in err and "sample broken" in err


@pytest.mark.dist
@pytest.mark.parametrize("stage", ["rl", "align"])
def test_two_ranks_under_zero3_run_past_refused_prompts(tmp_path, stage):
    """Two processes under ZeRO-3 (sharded parameters: every forward is a collective), half the prompts with
    images that do not decode: the ranks stay in step (a rank that ran one forward less would hang the
    other), the run completes and counts what it skipped."""
    import subprocess

    from stages.common.world.synth import load as synth_load
    from stages.common.world.synth import with_oracle_demos
    from tests.test_distributed import _env, _torchrun

    rows = [dict(sample_to_row(s), images=["data:image/png;base64," + base64.b64encode(s.images[0]).decode()])
            for s in with_oracle_demos(synth_load("synth:train:4"))]
    for i in (1, 3):
        rows[i] = dict(rows[i], id=f"broken{i}",
                       images=["data:image/jpeg;base64," + base64.b64encode(_truncated_jpeg()).decode()])
    data = tmp_path / "prompts.jsonl"
    data.write_text("\n".join(json.dumps(r, default=str) for r in rows) + "\n")
    out = tmp_path / stage
    args = ["--ckpt", "tiny", "--data", str(data), "--steps", "2", "--prompts-per-step", "2", "--rollouts-per-prompt",
            "2", "--max-new-tokens", "6", "--out", str(out)]
    args = ["rl", "--algo", "grpo", *args] if stage == "rl" else ["align", *args, "--warmup-steps", "1",
                                                                  "--warmup-prompts", "4", "--warmup-batch", "2"]
    proc = subprocess.run(_torchrun() + ["-m", "prism_cli", *args], cwd=tmp_path, env=_env(PRISM_BACKEND="zero3"),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = load_manifest(out)["summary"]
    assert summary["processes"] == 2 and summary["backend"] == "zero3"
    refused = [json.loads(line)["sampling/refused"] for line in (out / "metrics.jsonl").read_text().splitlines()
               if "sampling/refused" in line]
    assert len(refused) == 2 and summary["prompts_refused"] == round(sum(refused)) >= 1
    assert "sample broken" in proc.stderr
