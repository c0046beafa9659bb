"""`prism sft`: supervised fine-tuning, read top to bottom.

    resolve inputs -> open the output dir -> load policy + processor -> load and mix data -> hold out
    an eval split -> encode once -> train (packed micro-batches, manual accumulation, periodic eval and
    resumable saves) -> save model/ -> plot -> manifest
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch

from stages.common.contract import checkpoint, console, plots, tracking
from stages.common.contract.config import to_dict
from stages.common.contract.errors import PrismError, UsageError
from stages.common.contract.samples import Sample
from stages.common.data.formats import dropped_report, load_sources, source_parents
from stages.common.evaluation.held_out import Evaluator
from stages.common.evaluation.options import HELD_OUT_PANEL
from stages.common.evaluation.options import plan_row as eval_plan_row
from stages.common.models.loading import load_policy, load_processor
from stages.common.plan import report as plan_report
from stages.common.policy_update.logprobs import to_device
from stages.common.rollout import make_engine
from stages.common.training import distributed
from stages.common.training import runtime as training
from stages.sft import plan
from stages.sft.config import SFTConfig
from stages.sft.data import Encoded, encode_batch, pack, pad, rope_index_of, split_holdout, step_indices
from stages.sft.loss import summed_nll

ENCODE_BATCH = 64  # samples per processor call when encoding


def run(cfg: SFTConfig) -> Path:
    """The stage, top to bottom. Long because it is the stage's recipe read in one place: data, setup, encoding,
    resume, the loop with its evaluations, the save; each step is a named function below."""
    training.seed_everything(cfg.seed)
    policy_spec = checkpoint.require_stage(checkpoint.resolve(cfg.ckpt), checkpoint.POLICY_STAGES)
    mixture = load_mixture(cfg.data, cfg.seed)
    train_samples, eval_samples = split_holdout(mixture.samples, cfg.eval_fraction, cfg.seed)
    steps_per_epoch = len(train_samples) // cfg.batch_size
    if steps_per_epoch == 0:
        raise PrismError(f"{len(train_samples)} training samples are fewer than one batch ({cfg.batch_size})",
                         hint="lower --batch-size or add data")
    total_steps = cfg.max_steps if cfg.max_steps > 0 else max(1, int(cfg.epochs * steps_per_epoch))
    if cfg.dry_run:   # every check a launch runs, at the planned world size, then the memory plan
        return print_plan(cfg, policy_spec, mixture, len(train_samples), len(eval_samples), total_steps)

    cfg.dtype = training.training_dtype(cfg.dtype)  # what runs is what the manifest records
    checkpoint.check_output(cfg.out, "sft", to_dict(cfg), cfg.overwrite, cfg.resume)
    runtime = training.make_runtime(cfg.dtype, report_to=cfg.report_to, project_dir=cfg.out)
    accelerator = runtime.accelerator
    check_batches(cfg, accelerator.num_processes)   # before loading the model and encoding the data
    processor = load_processor(policy_spec, cfg.min_pixels, cfg.max_pixels)
    model = load_policy(policy_spec, dtype=training.MASTER_WEIGHTS_DTYPE, attn=cfg.attn, device=accelerator.device,
                        gradient_checkpointing=cfg.gradient_checkpointing, freeze_vision=cfg.freeze_vision,
                        compile_layers=cfg.compile)
    run_dir = checkpoint.open_output(cfg.out, "sft", to_dict(cfg), [("policy", policy_spec), *mixture.parents],
                                     overwrite=cfg.overwrite, resume=cfg.resume,
                                     barrier=accelerator.wait_for_everyone)

    t_encode = time.perf_counter()
    refused: dict[str, int] = {}  # reason -> samples left out (no locatable target, too long, ...)
    train_set = encode_all(train_samples, processor, model, cfg, "encoding train", refused)
    encode_s = time.perf_counter() - t_encode
    eval_set = encode_all(eval_samples, processor, model, cfg, "encoding eval", refused)

    warmup_steps = training.warmup_steps_from(cfg.warmup, total_steps)
    policy = runtime.prepare(model, lambda m: training.build_optimizer(m, cfg.lr, cfg.weight_decay),
                             lambda opt: training.build_scheduler(opt, cfg.schedule, warmup_steps, total_steps),
                             max_grad_norm=cfg.max_grad_norm, name="policy")
    tracking.start(accelerator, "sft", to_dict(cfg), cfg.report_to, cfg.out)

    start_step = 0
    if run_dir.resuming:
        state = training.load_state(accelerator, run_dir.state_dir, [policy])
        if state is not None:
            start_step = state["step"]
            console.info(f"resuming {cfg.out} at step {start_step}/{total_steps}")
        run_dir.truncate_metrics(start_step)  # killed before the first save: steps logged since are redone

    held_out = held_out_evaluation(cfg, accelerator, runtime, run_dir, policy, processor)
    train_loop(cfg, accelerator, policy, processor, train_set, eval_set, run_dir, start_step, total_steps, held_out)

    replicas = training.rank_fingerprints(accelerator, policy)
    training.save_model(accelerator, policy, processor, run_dir.model_dir)
    records = run_dir.read_metrics()
    plots.plot_curves(records, {"loss": "train loss", "eval_loss": "eval loss"}, run_dir.path / "loss.png",
                      f"SFT loss ({cfg.ckpt})")
    plots.plot_panels(records, HELD_OUT_PANEL, run_dir.path / "held_out.png", f"SFT held-out evaluation ({cfg.ckpt})")
    summary = summarize(records, train_set, total_steps)
    summary.update(processes=accelerator.num_processes, backend=runtime.backend.name, replica_weight_sums=replicas,
                   encode_s=encode_s, encode_ms_per_sample=1000 * encode_s / max(len(train_samples), 1),
                   samples_refused=sum(refused.values()), refused_reasons=refused, data_dropped=mixture.dropped,
                   **(held_out.evaluator.summary(records) if held_out else {}))
    accelerator.end_training()
    return run_dir.finalize(summary=summary, data=mixture.fingerprints, keep_state=cfg.keep_state)


# --------------------------------------------------------------------------------------------- data

class Mixture:
    def __init__(self, samples: list[Sample], fingerprints: dict, parents: list, counts: dict, dropped: dict):
        self.samples, self.fingerprints, self.parents, self.counts = samples, fingerprints, parents, counts
        self.dropped = dropped  # {spec: malformed/filtered counts}, for the manifest summary


def load_mixture(specs: list[str], seed: int) -> Mixture:
    """Load every --data source; with weights, resample them to those proportions of the total size."""
    sources = load_sources(specs, seed=seed)  # the run's seed draws synth's problems and drift
    if any(src.weight is not None for src in sources):
        total = sum(len(src.samples) for src in sources)
        weights = [src.weight if src.weight is not None else 1.0 for src in sources]
        rng = random.Random(seed)
        mixed = []
        for src, w in zip(sources, weights):
            k = int(round(total * w / sum(weights)))
            mixed.extend(src.samples * (k // len(src.samples)) + rng.sample(src.samples, k % len(src.samples)))
    else:
        mixed = [s for src in sources for s in src.samples]
    return Mixture(distinct_ids(mixed), {src.spec: src.fingerprint for src in sources}, source_parents(sources),
                   {src.spec: len(src.samples) for src in sources}, dropped_report(sources))


def distinct_ids(samples: list[Sample]) -> list[Sample]:
    """Resampled duplicates get distinct ids (the held-out split is keyed by id): id#0, id#1, ..."""
    counts: dict[str, int] = {}
    for s in samples:
        counts[s.id] = counts.get(s.id, 0) + 1
    used: dict[str, int] = {}
    out = []
    for s in samples:
        if counts[s.id] > 1:
            k = used.get(s.id, 0)
            used[s.id] = k + 1
            s = dataclasses.replace(s, id=f"{s.id}#{k}")
        out.append(s)
    return out


def encode_all(samples: list[Sample], processor, model, cfg: SFTConfig, what: str,
               refused: dict[str, int] | None = None) -> list[Encoded]:
    """Tokenise and image-process every sample once, before training (steps then only concatenate).
    Samples left out are counted by reason into `refused` (the manifest's summary reports them)."""
    rope_index = rope_index_of(model)
    encoded, skipped = [], {}
    with console.progress(what, total=len(samples)) as bar:
        for start in range(0, len(samples), ENCODE_BATCH):
            chunk = samples[start:start + ENCODE_BATCH]
            for e in encode_chunk(chunk, processor, rope_index, cfg.max_length, cfg.system_prompt):
                if isinstance(e, str):
                    skipped[e] = skipped.get(e, 0) + 1
                else:
                    encoded.append(e)
            bar.advance(len(chunk))
    for reason, n in skipped.items():
        console.warn(f"{what}: skipped {n} sample(s): {reason}")
        if refused is not None:
            refused[reason] = refused.get(reason, 0) + n
    if samples and not encoded:
        raise PrismError(f"{what}: no sample has a training target ({', '.join(skipped)})")
    return encoded


def encode_chunk(chunk: list[Sample], processor, rope_index, max_length: int, system_prompt: bool) -> list:
    """encode_batch, but a sample the processor refuses (ValueError: an image it cannot resize) is skipped
    with its reason instead of failing the whole chunk: one bad row must not cost the run."""
    try:
        return encode_batch(chunk, processor, rope_index, max_length, system_prompt)
    except ValueError as e:
        if len(chunk) == 1:
            return [f"the processor refused it ({str(e).splitlines()[0] if str(e) else type(e).__name__})"]
    return [one for sample in chunk for one in encode_chunk([sample], processor, rope_index, max_length, system_prompt)]


# --------------------------------------------------------------------------------------------- training

def micro_batches(items: list[Encoded], size: int) -> list[list[Encoded]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def use_packing(cfg: SFTConfig, model) -> bool:
    """Packing pays off with varlen attention (flash-attention-2). With sdpa or eager a packed row is
    attended densely under a block mask, L^2 over the whole row: measured 2x slower than padding
    8 samples on the tiny model, so auto pads there."""
    if cfg.packing != "auto":
        return cfg.packing == "on"
    attn = getattr(getattr(model, "module", model).config, "_attn_implementation", "")
    return attn == "flash_attention_2"


def collate(items: list[Encoded], packed: bool, pad_id: int) -> dict:
    return pack(items) if packed else pad(items, pad_id)


def check_batches(cfg: SFTConfig, world: int) -> None:
    """batch_size is global: every process runs the same number of micro-batches per step. The launch and
    --dry-run (at the planned world size) both call this."""
    if cfg.batch_size % (cfg.micro_batch_size * world):
        raise UsageError(f"batch_size {cfg.batch_size} is not divisible by micro_batch_size x processes "
                         f"({cfg.micro_batch_size} x {world})",
                         hint=f"use a multiple of {cfg.micro_batch_size * world}")


def held_out_evaluation(cfg, accelerator, runtime, run_dir, policy, processor):
    """With --eval-tasks: the evaluator (stages.common.evaluation.held_out) and an hf engine sampling from the
    policy being trained, the input evaluated as step 0; else None."""
    evaluator = Evaluator.from_config(cfg, accelerator, run_dir)
    if evaluator is None:
        return None
    engine = make_engine("hf", policy.module, processor, max_new_tokens=cfg.eval_max_new_tokens, seed=cfg.seed,
                         training=True)
    engine.lockstep = distributed.lockstep(accelerator, runtime.backend)
    evaluator.baseline(run_dir, accelerator, engine, policy, processor, cfg.report_to)
    return HeldOutRun(evaluator, lambda step: evaluator(step, accelerator, engine, policy, processor))


@dataclasses.dataclass
class HeldOutRun:
    evaluator: Evaluator
    evaluate: Callable[[int], dict]     # step -> eval/synth/* metrics


def train_loop(cfg, accelerator, policy, processor, train_set, eval_set, run_dir, start_step, total_steps,
               held_out: HeldOutRun | None = None):
    rank, world = accelerator.process_index, accelerator.num_processes   # check_batches: divisible
    pad_id = processor.tokenizer.pad_token_id
    packed = use_packing(cfg, policy.module)
    model = policy.model
    model.train()
    with console.progress("sft", total=total_steps) as bar:
        bar.advance(start_step)
        for step in range(start_step, total_steps):
            t0 = time.perf_counter()
            global_idx = step_indices(len(train_set), cfg.batch_size, cfg.seed, step)
            # length-grouped micro-batches: sorting within the step only changes the accumulation order
            mine = sorted((train_set[i] for i in global_idx[rank::world]), key=lambda e: e.n_tokens)
            n_targets = training.global_sum(accelerator, sum(e.n_targets for e in mine))
            if n_targets == 0:  # never report success for a run that trained on nothing
                raise PrismError(f"sft step {step + 1}: the batch holds no target tokens",
                                 hint="the label masks are empty; check the chat template and the data")
            scale = training.loss_scale(accelerator) / max(n_targets, 1.0)
            loss_sum, tokens, padded = 0.0, 0, 0
            micros = micro_batches(mine, cfg.micro_batch_size)
            for i, items in enumerate(micros):
                batch = to_device(collate(items, packed, pad_id), accelerator.device)
                with policy.accumulate(last=(i == len(micros) - 1)):
                    nll, _ = summed_nll(model, batch, global_chunks=training.count_sync(accelerator))
                    policy.backward(nll * scale)
                loss_sum += float(nll.detach())
                tokens += sum(e.n_tokens for e in items)
                padded += int(batch["input_ids"].numel())
            grad_norm = policy.step(cfg.max_grad_norm)
            elapsed = time.perf_counter() - t0
            loss = training.global_sum(accelerator, loss_sum) / max(n_targets, 1.0)
            tokens_all = training.global_sum(accelerator, tokens)
            record = {"step": step + 1, "loss": loss, "lr": policy.lr, "grad_norm": grad_norm,
                      "tokens": tokens_all, "tokens_per_s": tokens_all / elapsed,
                      "padding_ratio": 1.0 - tokens / max(padded, 1), "step_time": elapsed}
            last = step + 1 == total_steps
            if eval_set and ((step + 1) % cfg.eval_every == 0 or last):
                record["eval_loss"] = eval_loss(cfg, accelerator, model, eval_set, pad_id, packed)
            if held_out and ((step + 1) % cfg.eval_every == 0 or last):
                record.update(held_out.evaluate(step + 1))
            if (step + 1) % cfg.log_every == 0 or last or "eval_loss" in record or "eval/seconds" in record:
                run_dir.log_metrics(record)
                tracking.log(accelerator, cfg.report_to, record, step + 1)
            bar.advance(status=f"loss {loss:.3f}" + (f" eval {record['eval_loss']:.3f}" if "eval_loss" in record
                                                      else "") + f" {record['tokens_per_s']:.0f} tok/s")
            if (step + 1) % cfg.save_every == 0 and not last:
                training.save_state(accelerator, run_dir.state_dir, {"step": step + 1}, [policy])


@torch.no_grad()
def eval_loss(cfg, accelerator, model, eval_set, pad_id, packed) -> float:
    """Mean token loss over the eval split, each process taking every world-th sample. Every process runs
    the same number of batches (sharded backends gather parameters on each forward): one that runs out
    repeats its first batch with the loss discarded."""
    rank, world = accelerator.process_index, accelerator.num_processes
    model.eval()
    total, count = 0.0, 0
    mine = micro_batches(eval_set[rank::world], cfg.micro_batch_size)
    filler = mine[:1] or [eval_set[:1]]
    n_batches = training.global_max(accelerator, len(mine))
    for i in range(n_batches):
        items = mine[i] if i < len(mine) else filler[0]
        batch = to_device(collate(items, packed, pad_id), accelerator.device)
        nll, n = summed_nll(model, batch, global_chunks=training.count_sync(accelerator))
        if i < len(mine):
            total += float(nll)
            count += n
    model.train()
    return training.global_sum(accelerator, total) / max(training.global_sum(accelerator, count), 1.0)


# --------------------------------------------------------------------------------------------- reporting

def summarize(records: list[dict], train_set: list[Encoded], total_steps: int) -> dict:
    losses = [r["loss"] for r in records if "loss" in r]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    speeds = sorted(r["tokens_per_s"] for r in records if "tokens_per_s" in r)
    return {
        "steps": total_steps, "train_samples": len(train_set),
        "final_loss": losses[-1] if losses else None, "first_loss": losses[0] if losses else None,
        "final_eval_loss": evals[-1] if evals else None,
        "median_tokens_per_s": speeds[len(speeds) // 2] if speeds else None,
    }


def print_plan(cfg: SFTConfig, policy_spec, mixture: Mixture, n_train: int, n_eval: int, total_steps: int) -> None:
    """--dry-run: the checks a launch runs before loading anything, at the planned world size (--world-size, or
    the launch's WORLD_SIZE), then the resolved settings and the memory plan."""
    plan_report.check_output_if_set(cfg, "sft")
    check_batches(cfg, plan_report.world_of(cfg.world_size))
    shape = plan_report.policy_shape(policy_spec)
    rows = [
        ["policy", policy_spec.describe()],
        ["data", ", ".join(f"{k} ({v})" for k, v in mixture.counts.items())],
        ["train / eval samples", f"{n_train} / {n_eval}"],
        ["steps", f"{total_steps} (batch {cfg.batch_size}, micro-batch {cfg.micro_batch_size}, "
                  f"packing {cfg.packing}, max_length {cfg.max_length})"],
        ["optimizer", f"AdamW lr {cfg.lr} {cfg.schedule}, warmup {cfg.warmup}, wd {cfg.weight_decay}"],
        ["parameters", plan_report.parameter_summary(shape)],
        *[row for row in [eval_plan_row(cfg, total_steps, 0)] if row],
        ["output", cfg.out or "(--out not set)"],
    ]
    console.print_table("prism sft --dry-run", ["", "plan"], rows)
    plan_report.print_plan("prism sft", plan.memory_plan(cfg, shape))
    return None
