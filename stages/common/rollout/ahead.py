"""Rollouts one step ahead (`--overlap 1`): step t+1's first rollout batch is generated in a worker thread
while step t updates the policy, so a step costs about max(rollout, update) instead of their sum.

How a step runs with lag 1 (docs/overlap.md):

    step t:   take(key_t)             the batch submitted during step t-1 (sampled from theta_{t-1})
              submit(key_{t+1})       main thread: copy the trainer's weights theta_t into the snapshot, then
                                      start generating step t+1's first batch from it in the worker thread
              update                  main thread, meanwhile: theta_t -> theta_{t+1}
    step t+1: take(key_{t+1})         join the worker; its rows were drawn from theta_t: one step off-policy

The worker samples from its own snapshot copy of the policy (and its own copy of the processor: a fast
tokenizer is not safe to share between threads), so the update can change the trainer's weights in place
while it runs. The copy is refreshed in the main thread, at submit, and the worker issues no collective
(its engine's lockstep is None): every process reaches the same collectives in the same order as without
overlap. Sharded parameters (FSDP2, ZeRO-3) would need the refresh to gather them; refused for now.

lag 0 runs the same path with the submission held until take: the snapshot is refreshed from the current
weights and the batch generated right before it is needed (what tests compare bit for bit against sampling
from the live module). Without a snapshot (`--overlap 0`, the default) take syncs the stage's engine to the
live module and generates in the main thread, as before.

The caller keys each batch (the stage's step and data cursor) and passes the same key, prompts and sampling
parameters to take that it submitted: a batch taken under another key is a bug and raises, never a silent
re-draw. A take with nothing submitted (the first step, the first after a resume) generates at lag 0.
"""

from __future__ import annotations

import copy
import threading
import time
from dataclasses import dataclass, field

import torch

from stages.common.rollout.base import Completion, RolloutPrompt, SamplingParams


@dataclass
class _Job:
    key: tuple
    prompts: list[RolloutPrompt]
    params: SamplingParams
    lag: int = 0
    thread: threading.Thread | None = None
    completions: list[list[Completion]] | None = None
    error: BaseException | None = None
    seconds: float = 0.0
    ready: dict = field(default_factory=dict)   # the device event the worker waits on (cuda)


class RolloutsAhead:
    """The first rollout batch of each step, generated ahead (lag 1) or when taken (lag 0)."""

    def __init__(self, engine, module, *, lag: int, snapshot: bool | None = None):
        """engine: the stage's engine (it samples from the live module); module: the trainer's unwrapped model.
        snapshot (default: lag > 0): sample from an own copy of the policy in a worker thread."""
        if lag not in (0, 1):
            raise ValueError(f"lag is 0 or 1, not {lag}")
        if lag and snapshot is False:
            raise ValueError("generating ahead needs a snapshot of the policy")
        self.engine, self.lag = engine, lag
        self.snapshot = None
        self._pending: _Job | None = None
        self._metrics: dict = {}
        if snapshot if snapshot is not None else lag > 0:
            self.snapshot = copy.deepcopy(_unwrapped(module)).eval().requires_grad_(False)
            self.mirror = copy.copy(engine)       # the same options, its own model and processor
            self.mirror.processor = copy.deepcopy(engine.processor)
            self.mirror.lockstep = None           # the worker never joins a collective
            self.mirror.sync_weights(self.snapshot)

    @property
    def takes_submissions(self) -> bool:
        """Whether submit does anything take would not: only with a snapshot. Without one (--overlap 0) take
        generates from the live module anyway, so a stage skips choosing the next batch early (that costs a
        second prompt screening, an image-processor pass over the batch)."""
        return self.snapshot is not None

    def submit(self, key: tuple, prompts: list[RolloutPrompt], params: SamplingParams, module) -> None:
        """The next step's first batch: with lag 1 refresh the snapshot from `module` now and start generating;
        with lag 0 hold it until take."""
        if self._pending is not None:
            raise RuntimeError(f"rollout batch {self._pending.key} was submitted ahead and never taken")
        self._pending = _Job(key, prompts, params)
        if self.lag:
            self._start(self._pending, module, lag=self.lag)

    def take(self, key: tuple, prompts: list[RolloutPrompt], params: SamplingParams,
             module) -> list[list[Completion]]:
        """The completions of this batch: the one submitted under `key` (joined), or generated now from
        `module`'s current weights when nothing was submitted."""
        job, self._pending = self._pending, None
        if job is None:
            job = _Job(key, prompts, params)
        elif job.key != key or job.params != params or len(job.prompts) != len(prompts):
            raise RuntimeError(f"the rollout batch generated ahead was {job.key}, this step needs {key}")
        if job.thread is None and job.completions is None:
            self._start(job, module, lag=0)
        t0 = time.perf_counter()
        if job.thread is not None:
            job.thread.join()
        self._metrics = {"rollout/policy_lag": job.lag}
        if self.snapshot is not None:
            self._metrics.update({"time/rollout_wait": time.perf_counter() - t0, "time/rollout_ahead": job.seconds})
        if job.error is not None:
            raise job.error
        return job.completions

    def metrics(self) -> dict:
        """The last take's: rollout/policy_lag (the weights' age in steps), and with a snapshot the seconds the
        main thread waited for the batch and the seconds the worker spent generating it."""
        out, self._metrics = self._metrics, {}
        return out

    def close(self) -> None:
        """Wait for a batch still generating (none is, after a run's last step)."""
        job, self._pending = self._pending, None
        if job is not None and job.thread is not None:
            job.thread.join()

    # ---- internals

    def _start(self, job: _Job, module, lag: int) -> None:
        job.lag = lag
        if self.snapshot is None:   # the live module, in the main thread (its engine may join collectives)
            t0 = time.perf_counter()
            self.engine.sync_weights(module)
            job.completions = self.engine.generate(job.prompts, job.params)
            job.seconds = time.perf_counter() - t0
            return
        self._refresh(module)
        device = next(self.snapshot.parameters()).device
        if device.type == "cuda":   # the worker's stream waits for the refresh queued on this thread's stream
            event = torch.cuda.Event()
            event.record()
            job.ready["event"] = event
        job.thread = threading.Thread(target=self._work, args=(job, device), name="prism-rollout-ahead",
                                      daemon=True)   # a Ctrl-C never waits for a rollout nobody will take
        job.thread.start()

    @torch.no_grad()
    def _refresh(self, module) -> None:
        """Copy the trainer's current weights into the snapshot (replicated parameters: no gather)."""
        own = self.snapshot.state_dict()
        for name, tensor in _unwrapped(module).state_dict().items():
            own[name].copy_(tensor)

    def _work(self, job: _Job, device) -> None:
        """The worker: generate from the snapshot (torch's intra-op thread count is process-wide, so the same
        kernels run as in the main thread); an error is kept for take to raise."""
        t0 = time.perf_counter()
        try:
            if device.type == "cuda":
                stream = torch.cuda.Stream(device)
                stream.wait_event(job.ready["event"])
                with torch.cuda.stream(stream):
                    job.completions = self.mirror.generate(job.prompts, job.params)
            else:
                job.completions = self.mirror.generate(job.prompts, job.params)
        except BaseException as error:   # raised again in the main thread, at take
            job.error = error
        job.seconds = time.perf_counter() - t0


def _unwrapped(module):
    return getattr(module, "module", module)
