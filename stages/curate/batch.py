"""`prism curate --batch`: the teacher requests through the Gemini Batch API, at half the standard price.

Each attempt is one round: build every request exactly as interactive mode does (Collector.request, the
GeminiTeacher's contents and config, the same cache key), take what the teacher cache already holds, shard the
rest under the size and queued-token limits, submit each shard as one job (an uploaded JSONL file, or inline
when small), poll until every job has ended, write every answer to the teacher cache, then judge them all
through the same quality gate. The problems the gate sends back for another try make the next round.

Keys are "<sample id>#<attempt>": a result is matched to its problem by key and applied only while its key is
open: once per pass, and never again after a kill, since an answer is in the cache before it is used and a
cached key is not sent or matched again. A result seen twice (a duplicated line, a re-downloaded job) counts once.

Jobs are recorded in state/batch_jobs.jsonl before they are created ("submitting", under a display name unique
to this output directory) and after (the job id, its final state, "applied"). A process killed at any point
re-attaches with --resume: a recorded job is polled, never created again; a "submitting" record is looked up by
display name in the account's job list, since the create may have reached the server before the kill.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from stages.common.contract import console
from stages.common.contract.errors import PrismError
from stages.curate import pricing
from stages.curate.cache import JsonlCache
from stages.curate.collect import Collector, Outcome, Tally, teacher_failure
from stages.curate.resilience import (
    RETRYABLE_STATUS,
    Fatal,
    RetriesExhausted,
    RetryPolicy,
    Transient,
    call_with_retry,
    transport_failure,
)
from stages.curate.teachers import Reply

JOB_LOG = "batch_jobs.jsonl"
WORK_DIR = "batch"   # under state/: the shard being uploaded, the result file being read
TERMINAL = {"SUCCEEDED", "PARTIALLY_SUCCEEDED", "FAILED", "CANCELLED", "EXPIRED"}
# Line errors that are the request's own fault (like a 400 interactively): google.rpc.Status codes
# INVALID_ARGUMENT, FAILED_PRECONDITION, OUT_OF_RANGE (and HTTP 400). Any other error earns a new batch.
_BAD_REQUEST_CODES = {3, 9, 11, 400}


def batch_key(sample_id: str, attempt: int) -> str:
    return f"{sample_id}#{attempt}"


def short_state(state) -> str:
    """JobState.JOB_STATE_RUNNING (or "BATCH_STATE_RUNNING") -> "RUNNING"."""
    text = str(getattr(state, "value", None) or state or "UNSPECIFIED")
    return text.removeprefix("JOB_STATE_").removeprefix("BATCH_STATE_")


# ------------------------------------------------------------------------------------------- requests

def rest_request(teacher, req) -> dict:
    """The generateContent body interactive mode sends for `req`, as the JSON a batch file line carries.

    google-genai's own converter (private, but the one `models.generate_content` uses) turns the
    teacher's contents and config into the REST body, so both modes ask the model the same thing."""
    from google.genai import _common, models, types

    params = types._GenerateContentParameters(model=teacher.model, contents=teacher.contents(req),
                                              config=teacher.request_config(req))
    body = models._GenerateContentParameters_to_mldev(teacher.client._api_client, params)
    body.pop("_url", None)
    body.pop("config", None)
    return _common.encode_unserializable_types(_common.convert_to_dict(body))


def inline_request(teacher, req, key: str):
    from google.genai import types

    return types.InlinedRequest(contents=teacher.contents(req), config=teacher.request_config(req),
                                metadata={"key": key})


def prompt_tokens(req) -> int:
    """Estimated prompt tokens of one request (what the queued-token limit counts)."""
    return pricing.estimate_prompt_tokens(req.system + req.question, pricing.image_sizes(req.images))


def reply_of_line(teacher, response: dict | None, error) -> Reply | None:
    """One result line -> a Reply billed at the batch price; None when the key deserves another batch."""
    if error is not None:
        get = error.get if isinstance(error, dict) else (lambda k, d=None: getattr(error, k, d))
        code = int(get("code", 0) or 0)
        if code in _BAD_REQUEST_CODES:
            return Reply(None, "bad_request", {}, teacher.scrub(f"{code}: {get('message', '') or ''}"))
        return None
    if response is None:
        return None
    if isinstance(response, dict):
        from google.genai import types

        response = types.GenerateContentResponse.model_validate(response)
    reply = teacher.reply(response)
    reply.usage = {**(reply.usage or {}), "batch": True}
    return reply


# ------------------------------------------------------------------------------------------- shards

@dataclass
class Shard:
    keys: list[str]
    lines: Path | None = None     # JSONL on disk (file input)
    size: int = 0                 # bytes of JSONL
    tokens: int = 0               # estimated prompt tokens
    extra: dict = field(default_factory=dict)


def plan_shards(keys, line_of, *, max_requests: int, max_bytes: int, max_tokens: int, work: Path):
    """Yield shards of `keys` in order, each under every limit (one oversized request still ships alone).

    `line_of(key) -> (json_line_bytes, est_tokens)`. Lines stream to a file as they are built, so memory
    stays one shard's keys whatever the run's size; a shard's file is written only when it is next."""
    shard, out = None, None
    for key in keys:
        line, tokens = line_of(key)
        if shard is not None and (len(shard.keys) >= max_requests or shard.size + len(line) > max_bytes
                                  or (max_tokens and shard.tokens + tokens > max_tokens)):
            out.close()
            yield shard
            shard = None
        if shard is None:
            work.mkdir(parents=True, exist_ok=True)
            path = work / f"shard-{uuid.uuid4().hex[:8]}.jsonl"
            shard, out = Shard(keys=[], lines=path), open(path, "wb")
        out.write(line)
        shard.keys.append(key)
        shard.size += len(line)
        shard.tokens += tokens
    if shard is not None:
        out.close()
        yield shard


# ------------------------------------------------------------------------------------------- the job log

class JobLog:
    """state/batch_jobs.jsonl: one record per job, keyed by display name, last write wins (JsonlCache)."""

    def __init__(self, path: Path):
        self.cache = JsonlCache(path)
        run = self.cache.get("_run")
        if run is None:
            run = {"tag": uuid.uuid4().hex[:10]}
            self.cache.put("_run", run)
        self.tag = run["tag"]

    def jobs(self) -> list[dict]:
        return [dict(v) for k, v in self.cache.entries.items() if k != "_run"]

    def next_display(self, attempt: int) -> str:
        return f"prism-curate-{self.tag}-a{attempt}-{len(self.cache.entries):05d}"

    def put(self, rec: dict) -> None:
        self.cache.put(rec["display"], rec)

    def close(self) -> None:
        self.cache.close()


class QueueFull(Exception):
    """The create was refused with a 429: our queued tokens are over the account tier's limit."""

    def __init__(self, retry_after: float | None, detail: str):
        super().__init__(detail)
        self.retry_after = retry_after


# ------------------------------------------------------------------------------------------- the runner

class BatchRunner:
    """Creates, re-attaches, polls and collects the jobs of one output directory."""

    def __init__(self, cfg, teacher, log: JobLog, collector: Collector, tally: Tally, work: Path, bar=None,
                 sleep=time.sleep):
        self.cfg = cfg
        self.teacher = teacher
        self.client = teacher.client
        self.log = log
        self.collector = collector
        self.tally = tally
        self.work = work
        self.bar = bar
        self.sleep = sleep
        self.policy = RetryPolicy(max_retries=cfg.max_retries, base=cfg.backoff, cap=cfg.backoff_max)
        self.states: dict[str, str] = {}     # display -> last state seen, for progress
        self.counts = {"jobs_created": 0, "jobs_reattached": 0, "create_429": 0, "line_errors": 0,
                       "duplicates_ignored": 0, "unmatched_keys": 0, "requests_sent": 0}
        self.final_states: dict[str, int] = {}
        self.answered = 0
        self.total = 0
        self.last_report = time.monotonic()

    # ---------------------------------------------------------------- the API, with retries
    def api(self, what: str, fn):
        from google.genai import errors

        def once():
            try:
                return fn()
            except errors.APIError as e:
                code = int(getattr(e, "code", 0) or 0)
                detail = self.teacher.scrub(f"{code} {getattr(e, 'status', '')}: {getattr(e, 'message', '')}")
                if code in RETRYABLE_STATUS:
                    from stages.curate.gemini import retry_after_of

                    raise Transient(f"http_{code}", detail, retry_after=retry_after_of(e)) from None
                raise Fatal(f"http_{code}", f"{what}: {detail}") from None
            except (QueueFull, Transient, Fatal):
                raise
            except Exception as e:
                failure = transport_failure(e)
                if failure is None:
                    raise
                raise failure from None

        try:
            return call_with_retry(once, self.policy, on_retry=self.tally.retried)
        except (Fatal, RetriesExhausted) as e:
            raise teacher_failure(self.teacher, e, self.answered, self.total) from None

    def find(self, display: str):
        """The account's job with this display name (a create that reached the server before a kill)."""
        for job in self.api("list batches", lambda: list(self.client.batches.list(config={"page_size": 100}))):
            if job.display_name == display:
                return job
        return None

    # ---------------------------------------------------------------- one pass over open keys
    def answer(self, attempt: int, todo: dict) -> dict[str, Reply]:
        """Run batch jobs until every key in `todo` ({key: (index, req, cache_key)}) is answered or its job
        has ended without an answer for it. Returns the answers; they are in the cache already."""
        answers: dict[str, Reply] = {}
        jobs = self.reattach(attempt, todo)
        covered = {k for j in jobs for k in j["keys"]}
        shards = self.shards(attempt, [k for k in todo if k not in covered], todo)
        waiting: Shard | None = None
        blocked_until, refusals = 0.0, 0
        while True:
            # 1. submit while the queue has room
            while time.monotonic() >= blocked_until:
                waiting = waiting or next(shards, None)
                if waiting is None:
                    break
                queued = sum(j["tokens"] for j in jobs if not j.get("applied"))
                if self.cfg.batch_queue_tokens and queued and queued + waiting.tokens > self.cfg.batch_queue_tokens:
                    break
                try:
                    jobs.append(self.submit(attempt, waiting, todo))
                    waiting, refusals = None, 0
                except QueueFull as e:
                    self.counts["create_429"] += 1
                    refusals += 1
                    if refusals > self.cfg.max_retries and not any(not j.get("applied") for j in jobs):
                        raise PrismError(f"the Batch API refused a new job {refusals} times with nothing of ours "
                                         f"queued: {e}", hint="the account's queued-token limit is taken by its "
                                         "other jobs or is below one shard: re-run later with --resume (same "
                                         "options), or start over with a smaller --batch-shard-requests") from None
                    blocked_until = time.monotonic() + self.policy.delay(refusals - 1, e.retry_after)
            # 2. poll every unfinished job; collect the ones that ended
            for rec in [j for j in jobs if not j.get("applied")]:
                self.poll(rec, todo, answers)
            self.report()
            if waiting is None and not any(not j.get("applied") for j in jobs):
                waiting = next(shards, None)
                if waiting is None:
                    return answers
                continue
            if any(not j.get("applied") for j in jobs):
                self.sleep(self.cfg.batch_poll)
            else:  # nothing of ours queued: only the 429 backoff to wait out
                self.sleep(max(0.0, blocked_until - time.monotonic()))

    def reattach(self, attempt: int, todo: dict) -> list[dict]:
        jobs = []
        for rec in self.log.jobs():
            if rec.get("applied") or rec["attempt"] != attempt or not any(k in todo for k in rec["keys"]):
                continue
            if not rec.get("name"):
                found = self.find(rec["display"])
                if found is None:  # killed before the create reached the server: the keys go out again
                    rec.update(state="NEVER_CREATED", applied=True)
                    self.log.put(rec)
                    continue
                rec["name"] = found.name
                self.log.put(rec)
            self.counts["jobs_reattached"] += 1
            jobs.append(rec)
        if jobs:
            console.info(f"re-attached to {len(jobs)} batch job(s) of attempt {attempt + 1}")
        return jobs

    def shards(self, attempt: int, keys: list[str], todo: dict):
        teacher = self.teacher

        def line_of(key):
            _, req, _ = todo[key]
            return (json.dumps({"key": key, "request": rest_request(teacher, req)},
                               separators=(",", ":")).encode() + b"\n", prompt_tokens(req))

        yield from plan_shards(keys, line_of, max_requests=self.cfg.batch_shard_requests,
                               max_bytes=int(self.cfg.batch_shard_mb * 1e6),
                               max_tokens=self.cfg.batch_queue_tokens, work=self.work)

    def input_kind(self, shard: Shard) -> str:
        if self.cfg.batch_input != "auto":
            return self.cfg.batch_input
        return "inline" if shard.size < self.cfg.batch_inline_mb * 1e6 else "file"

    def submit(self, attempt: int, shard: Shard, todo: dict) -> dict:
        rec = shard.extra.get("rec")
        if rec is None:  # the first try of this shard (a 429 retries under the same display name)
            rec = {"display": self.log.next_display(attempt), "attempt": attempt, "keys": shard.keys,
                   "input": self.input_kind(shard), "tokens": shard.tokens, "state": "SUBMITTING", "name": ""}
            self.log.put(rec)  # before the create: a kill after it is found again by this display name
            shard.extra["rec"] = rec
        src = shard.extra.get("src")
        if src is None and rec["input"] == "file":
            from google.genai import types

            uploaded = self.api("upload", lambda: self.client.files.upload(
                file=str(shard.lines), config=types.UploadFileConfig(display_name=rec["display"],
                                                                      mime_type="jsonl")))
            src = shard.extra["src"] = uploaded.name
        elif src is None:
            src = [inline_request(self.teacher, todo[k][1], k) for k in shard.keys]
        tried = []

        def create():
            if tried:  # a timeout or reset may hide a job that was made: look before making another
                found = self.find(rec["display"])
                if found is not None:
                    return found
            tried.append(1)
            from google.genai import errors

            try:
                return self.client.batches.create(model=self.teacher.model, src=src,
                                                  config={"display_name": rec["display"]})
            except errors.APIError as e:
                if int(getattr(e, "code", 0) or 0) != 429:
                    raise
                from stages.curate.gemini import retry_after_of

                raise QueueFull(retry_after_of(e), self.teacher.scrub(str(getattr(e, "message", "") or e))) \
                    from None

        job = self.api("create batch", create)
        rec.update(name=job.name, state=short_state(job.state))
        self.log.put(rec)
        self.counts["jobs_created"] += 1
        self.counts["requests_sent"] += len(rec["keys"])
        if shard.lines is not None:
            shard.lines.unlink(missing_ok=True)
        self.states[rec["display"]] = rec["state"]
        return rec

    def poll(self, rec: dict, todo: dict, answers: dict) -> None:
        job = self.api("get batch", lambda: self.client.batches.get(name=rec["name"]))
        state = short_state(job.state)
        self.states[rec["display"]] = state
        if state not in TERMINAL:
            return
        self.collect(job, todo, answers)
        rec.update(state=state, applied=True)
        self.log.put(rec)  # after every answer is in the cache: a kill before this re-reads, and skips them
        self.final_states[state] = self.final_states.get(state, 0) + 1

    def results(self, job):
        """(key, response, error) for every line of a finished job."""
        dest = job.dest
        if dest is None:
            return
        if dest.inlined_responses:
            for item in dest.inlined_responses:
                yield (item.metadata or {}).get("key"), item.response, item.error
        elif dest.file_name:
            self.work.mkdir(parents=True, exist_ok=True)
            path = self.work / f"results-{job.name.rsplit('/', 1)[-1]}.jsonl"
            self.api("download results", lambda: self.client.files.download(file=dest.file_name,
                                                                             destination=str(path)))
            try:
                with open(path, "rb") as f:
                    for line in f:
                        if line.strip():
                            d = json.loads(line)
                            yield d.get("key"), d.get("response"), d.get("error")
            finally:
                path.unlink(missing_ok=True)

    def collect(self, job, todo: dict, answers: dict) -> None:
        for key, response, error in self.results(job):
            if key not in todo:
                self.counts["unmatched_keys"] += 1
                continue
            _, _, cache_key = todo[key]
            # by key: a key cached by an earlier process is not in todo; one seen twice here counts once
            if key in answers:
                self.counts["duplicates_ignored"] += 1
                continue
            reply = reply_of_line(self.teacher, response, error)
            if reply is None:
                self.counts["line_errors"] += 1
                continue
            self.collector.record(cache_key, reply)  # in the cache before it is used
            self.tally.answered(reply, fresh=True)
            answers[key] = reply
            self.answered += 1

    # ---------------------------------------------------------------- progress
    def status(self) -> str:
        states: dict[str, int] = {}
        for s in self.states.values():
            states[s.lower()] = states.get(s.lower(), 0) + 1
        jobs = ", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "none yet"
        return f"jobs: {jobs} · answered {self.answered}/{self.total} · {self.tally.status()}"

    def report(self) -> None:
        text = self.status()
        if self.bar is not None:
            self.bar.update(status=text)
        plain = os.environ.get("PRISM_NO_PROGRESS") or not console.err.is_terminal
        if plain and time.monotonic() - self.last_report >= self.cfg.batch_report:
            self.last_report = time.monotonic()
            console.info(f"batch: {text}")

    def summary(self) -> dict:
        return {**self.counts, "final_states": dict(sorted(self.final_states.items())),
                "input": self.cfg.batch_input}


# ------------------------------------------------------------------------------------------- the recipe

def ask_teacher_in_batches(cfg, teacher, samples: list, state: Path, cache_path: Path) -> tuple[list[Outcome], Tally]:
    """Batch-mode twin of run.ask_teacher: the same outcomes, cache, gate and tally, at the batch price."""
    tally = Tally(teacher.model, cfg.prices)
    cache = JsonlCache(cache_path)
    if cache.torn:
        console.info(f"dropped {cache.torn} torn line(s) at the end of the teacher cache (a killed run)")
    log = JobLog(state / JOB_LOG)
    policy = RetryPolicy(max_retries=cfg.max_retries, base=cfg.backoff, cap=cfg.backoff_max)
    collector = Collector(teacher, cache, attempts=cfg.attempts, gate=cfg.gate, seed=cfg.seed,
                          concurrency=cfg.concurrency, rpm=cfg.rpm, policy=policy, tally=tally)
    outcomes = [collector.new_outcome(i) for i in range(len(samples))]
    try:
        with console.progress(f"teacher {teacher.name} (batch)", len(samples)) as bar:
            runner = BatchRunner(cfg, teacher, log, collector, tally, state / WORK_DIR, bar=bar)
            pending = list(range(len(samples)))
            for attempt in range(cfg.attempts):
                if not pending:
                    break
                replies = gather(cfg, runner, collector, samples, pending, attempt)
                still = []
                for i in pending:
                    if collector.absorb(outcomes[i], replies[i], samples[i]) or attempt == cfg.attempts - 1:
                        collector._advance(bar, outcomes[i])
                    else:
                        still.append(i)
                pending = still
    finally:
        cache.close()
        log.close()
        teacher.close()
    tally.batch = runner.summary()
    return outcomes, tally


def gather(cfg, runner: BatchRunner, collector: Collector, samples: list, indices: list[int],
           attempt: int) -> dict[int, Reply]:
    """One reply per problem for this attempt: from the cache, then batch jobs, then (optionally) interactive."""
    replies: dict[int, Reply] = {}
    todo: dict[str, tuple] = {}
    first: dict[str, int] = {}          # cache key -> the problem that asks it
    twins: dict[int, int] = {}          # a problem identical to an earlier one (another id) -> that one
    for i in indices:
        req, cache_key = collector.request(samples[i], attempt)
        cached = collector.cached(cache_key)
        if cached is not None:
            collector.tally.answered(cached, fresh=False)
            replies[i] = cached
        elif cache_key in first:  # the same request: asked once, its answer replayed (as interactive mode's cache does)
            twins[i] = first[cache_key]
        else:
            first[cache_key] = i
            todo[batch_key(samples[i].id, attempt)] = (i, req, cache_key)
    runner.total = runner.answered + len(todo)
    for round_ in range(cfg.batch_retries + 1):
        if not todo:
            break
        if round_:
            console.info(f"{len(todo)} request(s) of attempt {attempt + 1} got no answer from their batch "
                         f"(failed, expired or a line error): "
                         + ("asking them interactively" if cfg.batch_fallback else "sending them in a new batch"))
            if cfg.batch_fallback:
                replies.update(ask_interactively(collector, samples, todo, attempt, runner))
                todo = {}
                break
        for key, reply in runner.answer(attempt, todo).items():
            replies[todo.pop(key)[0]] = reply
    if todo:
        raise PrismError(f"{len(todo)} request(s) of attempt {attempt + 1} still unanswered after "
                         f"{cfg.batch_retries + 1} batch(es) (e.g. {next(iter(todo))})",
                         hint="every answer so far is cached: re-run with the same options and --resume; "
                              "a run started with --batch-fallback asks such keys interactively")
    for i, same in twins.items():
        replies[i] = replies[same]
        collector.tally.answered(replies[i], fresh=False)
    return replies


def ask_interactively(collector: Collector, samples: list, todo: dict, attempt: int, runner: BatchRunner) -> dict:
    """The interactive path (standard price) for keys the Batch API did not answer (--batch-fallback)."""
    replies: dict[int, Reply] = {}
    with ThreadPoolExecutor(max_workers=collector.concurrency, thread_name_prefix="teacher") as pool:
        futures = {pool.submit(collector.call_remote, samples[i], attempt): i for i, _, _ in todo.values()}
        for fut in as_completed(futures):
            try:
                replies[futures[fut]] = fut.result()
            except (Fatal, RetriesExhausted) as e:
                collector.stop.set()
                raise teacher_failure(collector.teacher, e, runner.answered, runner.total) from None
            runner.answered += 1
            runner.counts["answered_interactively"] = runner.counts.get("answered_interactively", 0) + 1
    return replies
