"""Ask the teacher for every problem, up to `attempts` samples each, through the cache.

Remote teachers run on a thread pool (`concurrency` requests in flight, a token-bucket `rpm` limit,
retries in resilience.py); local teachers answer attempt by attempt in batches. Either way each
problem ends as one Outcome, returned in source order whatever the completion order, and every
completed call is in the cache before its answer is used, so a killed run resumes for free.

A teacher outage (retries exhausted) or a fatal error stops the run: in-flight calls finish into the
cache, nothing new starts, and a PrismError says what failed and how to resume.
"""

from __future__ import annotations

import hashlib
import threading
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from stages.common.contract.errors import PrismError
from stages.common.contract.samples import Sample
from stages.common.data.chat import question_text
from stages.common.protocol import SYSTEM_PROMPT
from stages.curate import pricing
from stages.curate.cache import JsonlCache, cache_key
from stages.curate.gate import RETRY_REASONS, Verdict, judge
from stages.curate.resilience import (
    Fatal,
    RateLimiter,
    RetriesExhausted,
    RetryPolicy,
    Stopped,
    Transient,
    call_with_retry,
)
from stages.curate.teacher_api import Reply, TeacherRequest

# this many 400s before the first good answer means the requests are wrong, not the samples
BAD_REQUEST_LIMIT = 8


@dataclass
class Outcome:
    index: int
    verdict: Verdict
    attempts: int
    reasons: list[str] = field(default_factory=list)      # one per attempt
    correct: list[bool] = field(default_factory=list)     # per answered attempt with a checkable answer
    usage: dict = field(default_factory=dict)             # summed over attempts
    detail: str = ""

    @property
    def kept(self) -> bool:
        return self.verdict.ok


class Tally:
    """Live counts shared by the workers (progress bar, manifest)."""

    def __init__(self, model: str, prices: dict | None):
        self.lock = threading.Lock()
        self.model = model
        self.prices = prices
        self.kept = self.rejected = 0
        self.calls = 0          # teacher calls answered in this run
        self.cached = 0         # answers replayed from the cache
        self.retries: dict[str, int] = {}
        self.finishes: dict[str, int] = {}
        self.usage_new: dict = {}
        self.usage_all: dict = {}

    def answered(self, reply: Reply, fresh: bool) -> None:
        with self.lock:
            if fresh:
                self.calls += 1
                pricing.add_usage(self.usage_new, reply.usage or {})
            else:
                self.cached += 1
            pricing.add_usage(self.usage_all, reply.usage or {})
            self.finishes[reply.finish] = self.finishes.get(reply.finish, 0) + 1

    def retried(self, failure: Transient, wait: float) -> None:
        with self.lock:
            self.retries[failure.reason] = self.retries.get(failure.reason, 0) + 1

    def finished(self, outcome: Outcome) -> None:
        with self.lock:
            if outcome.kept:
                self.kept += 1
            else:
                self.rejected += 1

    def status(self) -> str:
        with self.lock:
            cost = pricing.cost(self.usage_all, self.model, self.prices)
            retries = sum(self.retries.values())
            tokens = self.usage_all.get("total_tokens", 0)
        return (f"kept {self.kept} · rejected {self.rejected} · calls {self.calls} · cached {self.cached} · "
                f"retries {retries} · {tokens:,} tok · ~${cost:.2f}")


def image_hashes(images: list[bytes]) -> list[str]:
    return [hashlib.sha256(b).hexdigest() for b in images]


class Collector:
    def __init__(self, teacher, cache: JsonlCache | None, *, attempts: int, gate: str, seed: int,
                 concurrency: int = 16, rpm: float = 0, policy: RetryPolicy | None = None, tally: Tally,
                 system_prompt: str | None = None):
        self.teacher = teacher
        self.cache = cache if getattr(teacher, "cacheable", True) else None
        self.attempts = attempts
        self.gate = gate
        self.seed = seed
        self.concurrency = concurrency
        self.limiter = RateLimiter(rpm)
        self.policy = policy or RetryPolicy()
        self.tally = tally
        self.system = SYSTEM_PROMPT if system_prompt is None else system_prompt
        self.stop = threading.Event()
        self.bad_requests = 0
        self.good_answers = 0
        self.lock = threading.Lock()

    # ------------------------------------------------------------------ one call
    def request(self, sample: Sample, attempt: int) -> tuple[TeacherRequest, str]:
        req = TeacherRequest(system=self.system, question=question_text(sample), images=list(sample.images),
                             attempt=attempt, seed=self.seed * 1009 + attempt, sample=sample)
        key = cache_key(teacher=self.teacher.kind, model=self.teacher.model, system=req.system,
                        question=req.question, images=image_hashes(req.images), sampling=self.teacher.sampling,
                        attempt=attempt, seed=req.seed)
        return req, key

    def cached(self, key: str) -> Reply | None:
        if self.cache is None:
            return None
        value = self.cache.get(key)
        return Reply.from_json(value) if value is not None else None

    def record(self, key: str, reply: Reply) -> None:
        # a 400 is not cached: it may be our bug, fixed before the resume
        if self.cache is not None and reply.finish != "bad_request":
            self.cache.put(key, reply.to_json())
        with self.lock:
            if reply.finish == "bad_request":
                self.bad_requests += 1
            elif reply.finish == "stop":
                self.good_answers += 1
            if self.bad_requests >= BAD_REQUEST_LIMIT and self.good_answers == 0:
                raise Fatal("http_400", f"the first {self.bad_requests} requests were all rejected as invalid "
                                        f"({reply.detail})")

    def call_remote(self, sample: Sample, attempt: int) -> Reply:
        req, key = self.request(sample, attempt)
        reply = self.cached(key)
        if reply is not None:
            self.tally.answered(reply, fresh=False)
            return reply
        reply = call_with_retry(lambda: self.teacher.call(req), self.policy, self.limiter,
                                on_retry=self.tally.retried, stop=self.stop)
        self.record(key, reply)
        self.tally.answered(reply, fresh=True)
        return reply

    # ------------------------------------------------------------------ one problem
    def new_outcome(self, index: int) -> Outcome:
        return Outcome(index=index, verdict=Verdict(False, "not_asked"), attempts=0)

    def absorb(self, outcome: Outcome, reply: Reply, sample: Sample) -> bool:
        """Judge one attempt's reply into the outcome; True when the problem is finished."""
        verdict = judge(reply, sample, self.gate)
        outcome.attempts += 1
        outcome.reasons.append(verdict.reason)
        if verdict.correct is not None:
            outcome.correct.append(verdict.correct)
        pricing.add_usage(outcome.usage, reply.usage or {})
        outcome.verdict = verdict
        if reply.detail:
            outcome.detail = reply.detail
        return verdict.ok or verdict.reason not in RETRY_REASONS

    def solve(self, index: int, sample: Sample) -> Outcome:
        outcome = self.new_outcome(index)
        try:
            for attempt in range(self.attempts):
                if self.stop.is_set():
                    raise Stopped()
                if self.absorb(outcome, self.call_remote(sample, attempt), sample):
                    break
        except (Fatal, RetriesExhausted):
            self.stop.set()  # here, not in the main thread: this worker's next task must not start a call
            raise
        return outcome

    # ------------------------------------------------------------------ all problems
    def run(self, samples: list[Sample], progress=None) -> list[Outcome]:
        if getattr(self.teacher, "concurrent", False):
            return self.run_threaded(samples, progress)
        return self.run_batched(samples, progress)

    def _advance(self, progress, outcome: Outcome) -> None:
        self.tally.finished(outcome)
        if progress is not None:
            progress.advance(1, status=self.tally.status())

    def run_threaded(self, samples: list[Sample], progress=None) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(samples)
        failure: BaseException | None = None
        pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="teacher")
        try:
            # a bounded window of submitted problems keeps memory flat on 100K-problem runs
            it = iter(enumerate(samples))
            pending = set()
            window = self.concurrency * 4
            exhausted = False
            while pending or not exhausted:
                while not exhausted and len(pending) < window and failure is None:
                    nxt = next(it, None)
                    if nxt is None:
                        exhausted = True
                        break
                    pending.add(pool.submit(self.solve, *nxt))
                if failure is not None:
                    exhausted = True
                if not pending:
                    break
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    try:
                        outcome = fut.result()
                    except Stopped:
                        continue
                    except (Fatal, RetriesExhausted) as e:
                        if failure is None:
                            failure = e
                            self.stop.set()
                        continue
                    except BaseException as e:
                        if failure is None:
                            failure = e
                            self.stop.set()
                        continue
                    outcomes[outcome.index] = outcome
                    self._advance(progress, outcome)
        except KeyboardInterrupt:
            self.stop.set()
            raise
        finally:
            if failure is not None:
                self.stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
        if isinstance(failure, (Fatal, RetriesExhausted, PrismError)):
            raise teacher_failure(self.teacher, failure, sum(o is not None for o in outcomes), len(samples))
        if failure is not None:
            raise failure  # a bug: let the CLI report it as one
        return outcomes  # type: ignore[return-value]

    def run_batched(self, samples: list[Sample], progress=None, chunk: int = 256) -> list[Outcome]:
        outcomes = [self.new_outcome(i) for i in range(len(samples))]
        pending = list(range(len(samples)))
        for attempt in range(self.attempts):
            if not pending:
                break
            still: list[int] = []
            for start in range(0, len(pending), chunk):
                part = pending[start:start + chunk]
                reqs = [self.request(samples[i], attempt) for i in part]
                replies: list[Reply | None] = [self.cached(key) for _, key in reqs]
                for r in replies:
                    if r is not None:
                        self.tally.answered(r, fresh=False)
                todo = [j for j, r in enumerate(replies) if r is None]
                if todo:
                    fresh = self.teacher.call_batch([reqs[j][0] for j in todo])
                    for j, reply in zip(todo, fresh):
                        self.record(reqs[j][1], reply)
                        self.tally.answered(reply, fresh=True)
                        replies[j] = reply
                for i, reply in zip(part, replies):
                    if self.absorb(outcomes[i], reply, samples[i]) or attempt == self.attempts - 1:
                        self._advance(progress, outcomes[i])
                    else:
                        still.append(i)
            pending = still
        return outcomes


def teacher_failure(teacher, failure: BaseException, done: int, total: int) -> PrismError:
    where = f"after {done}/{total} problems"
    hint = "every answer so far is cached: re-run with the same options and --resume"
    if isinstance(failure, RetriesExhausted):
        return PrismError(f"teacher {teacher.name} unavailable {where}: {failure.last} "
                          f"(gave up after {failure.tries} tries)", hint=hint)
    if isinstance(failure, Fatal):
        extra = " (is the API key valid?)" if failure.reason in ("http_401", "http_403") else ""
        return PrismError(f"teacher {teacher.name} refused the request {where}: {failure}{extra}", hint=hint)
    if isinstance(failure, PrismError):
        return failure
    return PrismError(f"teacher {teacher.name} failed {where}: {type(failure).__name__}: "
                      f"{str(failure).splitlines()[0] if str(failure) else ''}", hint=hint)
