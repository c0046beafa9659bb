"""Which problems go to the teacher: all of them, or those the student cannot solve.

`--select unsolved` rolls the student k times per problem (rollout engine, temperature sampling),
scores each rollout with the verifiable reward and keeps a problem when its pass rate (correct / k)
is at most `max_pass`; the default 0 keeps "the hardest problems unsolved by current models". Each
problem's count of correct rollouts is recorded (sample meta and the manifest's histogram) and saved
to state/ as it is computed, so a resumed run does not roll the student again.
"""

from __future__ import annotations

from stages.common.contract.checkpoint import resolve
from stages.common.contract.samples import Sample
from stages.common.data.chat import rollout_prompt
from stages.common.models.loading import load_policy, load_processor
from stages.common.rewards import compute_score
from stages.common.rollout import SamplingParams, make_engine
from stages.curate.cache import JsonlCache, cache_key


def pass_histogram(correct_counts: list[int], k: int) -> dict[str, int]:
    """{"0": problems with 0 correct of k, ..., "k": ...}."""
    hist = {str(c): 0 for c in range(k + 1)}
    for c in correct_counts:
        hist[str(c)] += 1
    return hist


def keep_unsolved(correct: int, k: int, max_pass: float) -> bool:
    return correct / k <= max_pass + 1e-9


def student_key(student_fingerprint: str, sample: Sample, k: int, temperature: float, max_new_tokens: int,
                seed: int) -> str:
    import hashlib

    return cache_key(student=student_fingerprint, id=sample.id, question=sample.question, answer=sample.answer,
                     images=[hashlib.sha256(b).hexdigest() for b in sample.images], k=k, temperature=temperature,
                     max_new_tokens=max_new_tokens, seed=seed)


def count_correct(samples: list[Sample], student: str, *, k: int, temperature: float, max_new_tokens: int,
                  seed: int, engine: str, batch_size: int, cache: JsonlCache, progress=None) -> list[int]:
    """Correct rollouts out of k for each sample (cached per sample in `cache`)."""
    spec = resolve(student, role="--student")
    keys = [student_key(spec.fingerprint, s, k, temperature, max_new_tokens, seed) for s in samples]
    counts: list[int | None] = [cache.get(key) for key in keys]
    if progress is not None:
        progress.advance(sum(c is not None for c in counts))
    todo = [i for i, c in enumerate(counts) if c is None]
    if todo:
        processor = load_processor(spec)
        rollout = make_engine(engine, load_policy(spec, train=False), processor, max_new_tokens=max_new_tokens)
        for start in range(0, len(todo), batch_size):
            part = todo[start:start + batch_size]
            params = SamplingParams(n=k, temperature=temperature, max_new_tokens=max_new_tokens,
                                    seed=seed * 100003 + part[0])
            groups = rollout.generate([rollout_prompt(samples[i]) for i in part], params)
            for i, group in zip(part, groups):
                s = samples[i]
                c = sum(compute_score(g.text, s.answer, choices=s.choices)["acc"] >= 0.5 for g in group)
                counts[i] = int(c)
                cache.put(keys[i], int(c))
            if progress is not None:
                progress.advance(len(part), status=f"unsolved so far {sum(1 for c in counts if c == 0)}")
    return [int(c) for c in counts]  # type: ignore[arg-type]
