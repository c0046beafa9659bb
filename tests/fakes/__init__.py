"""Fake remote services for tests and benchmarks: they speak the real wire protocols on 127.0.0.1 only."""

import hashlib


def oracle_responder(samples, wrong_ids=()):
    """A responder that answers each synth sample as its oracle would (wrong on purpose for wrong_ids):
    it recognises the sample by its question text and image hash, as a real teacher would see them."""
    from stages.common.data.chat import question_text
    from stages.common.protocol import format_response
    from stages.common.world.synth import oracle_demo
    from tests.fakes.gemini_server import request_images, request_text

    table = {}
    for s in samples:
        demo = oracle_demo(s)
        answer = demo.answer if s.id not in wrong_ids else demo.answer + "9"
        key = (question_text(s), tuple(hashlib.sha256(b).hexdigest() for b in s.images))
        table[key] = format_response(demo.caption, demo.think, answer)

    def respond(body: dict) -> str:
        key = (request_text(body), tuple(hashlib.sha256(b).hexdigest() for b in request_images(body)))
        return table.get(key, "<caption>?</caption><think>unknown problem</think><answer>none</answer>")

    return respond
