"""Why larger_shape sat near its majority-answer rate on tiny-seeing: the experiments of docs/seeing-base.md.

larger_shape asks which of two named shapes is larger; the oracle's think restates each option's size ("red
square large, blue circle small, so"). Until the fifth language round shipped, synth named sizes only in that
family's captions ("- large red square"). This script changes, for its own process only, the caption format
and the language training, and measures where the chain caption -> think -> answer breaks. What it found is
now the recipe: sizes after every object in every caption, and a fifth round on unseen problems.

    # a base of the recipe's first four rounds with the captions of the early rows (--captions
    # larger-shape-only), sizes before every object (size-before) or after it (size-after = shipped)
    python benchmarks/larger_shape_probe.py build OUT --rounds 4 --captions size-after       # ~20 min, one core
    # one more language round on 2,000 larger_shape problems (--focus) + 3,000 of the usual mix (tower frozen);
    # --counterfactual: half the larger_shape demos swap the two options' sizes in caption, think and answer
    # (the image unchanged) and carry no caption loss, so only the caption predicts their think;
    # --focus 0 --usual 6000 --usual-seed 4000: the fifth round of the shipped recipe (6,000 unseen problems)
    python benchmarks/larger_shape_probe.py round SRC OUT --steps 3000 [--counterfactual]
    # the chain on the larger_shape problems among the first N test problems, and the 500-problem evaluation
    python benchmarks/larger_shape_probe.py diagnose CKPT

Each command prints one JSON line and writes it to OUT/probe.json (diagnose: --out). One thread, greedy, seeds
fixed; the numbers in docs/seeing-base.md came from these steps on the 2-core CI-class VM.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.common.contract.samples import Teacher
from stages.common.models import seeing_base
from stages.common.world.synth import generate, oracle, with_oracle_demos
from stages.common.world.synth.scene import reading_order
from stages.common.world.synth.tasks import LETTERS, counted, groups_in_order, solve_larger_shape, unique_object

SHIPPED_CAPTION = oracle.caption_for  # since the fifth round shipped: every object's size, after it


def caption_with_sizes(scene: dict, task: str, after: bool) -> str:
    """Every object's size in the caption, before ("large red square") or after ("red square large") it."""
    if scene["kind"] == "chart" or after:
        return SHIPPED_CAPTION(scene, task)
    kinds = [(o["color"], o["shape"], o["size"]) for o in reading_order(scene["objects"])]
    return "\n".join(f"- {counted(n, f'{size} {color} {shape}') if n > 1 else f'{size} {color} {shape}'}"
                     for (color, shape, size), n in groups_in_order(kinds))


def caption_sizes_in_larger_shape_only(scene: dict, task: str) -> str:
    """synth's caption before the fifth round: sizes named (before the object) in larger_shape captions only."""
    if scene["kind"] == "chart" or task == "larger_shape":
        return caption_with_sizes(scene, task, after=False)
    kinds = [(o["color"], o["shape"]) for o in reading_order(scene["objects"])]
    return "\n".join(f"- {counted(n, f'{color} {shape}')}" if n > 1 else f"- {color} {shape}"
                      for (color, shape), n in groups_in_order(kinds))


def use_captions(kind: str) -> None:
    """Patch synth's oracle caption for this process (the experiment; synth itself is unchanged). "shipped" and
    "size-after" are synth's own captions now; "larger-shape-only" is the format the first rows used."""
    if kind == "size-before":
        oracle.caption_for = lambda scene, task: caption_with_sizes(scene, task, after=False)
    elif kind == "larger-shape-only":
        oracle.caption_for = caption_sizes_in_larger_shape_only


def counterfactual(sample):
    """The demo of the same image as if the two options' sizes were swapped: caption, think and answer agree
    with each other and not with the image."""
    scene, query = sample.meta["scene"], sample.meta["query"]
    named = [unique_object(scene, o["color"], o["shape"]) for o in query["options"]]
    swapped = {id(named[0]): named[1]["size"], id(named[1]): named[0]["size"]}
    seen = dict(scene, objects=[dict(o, size=swapped.get(id(o), o["size"])) for o in scene["objects"]])
    reasoning = solve_larger_shape(seen, query)
    return dataclasses.replace(sample, teacher=Teacher(caption=oracle.caption_for(seen, sample.task),
                                                       think=reasoning.think, answer=reasoning.answer,
                                                       model="counterfactual"))


def language_round(src: str, out: str, steps: int, with_counterfactuals: bool, focus: int = 2000, usual: int = 3000,
                   usual_seed: int = 1000) -> dict:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(src)
    model = AutoModelForImageTextToText.from_pretrained(src, dtype=torch.float32)
    for p in model.model.visual.parameters():
        p.requires_grad_(False)
    rng = random.Random("cf")
    extra = with_oracle_demos(generate("train", focus, seed=3000, tasks=["larger_shape"])) if focus else []
    swapped = [with_counterfactuals and rng.random() < 0.5 for _ in extra]
    samples = [counterfactual(s) if f else s for s, f in zip(extra, swapped)]
    # seed 1000 is the build's own training stream (its first `usual` problems); another seed gives fresh ones
    samples += with_oracle_demos(generate("train", usual, seed=usual_seed))
    swapped += [False] * usual
    encoded = []
    for i in range(0, len(samples), 256):
        encoded += seeing_base.encode_demos(samples[i:i + 256], processor)
    think_id = processor.tokenizer.convert_tokens_to_ids("<think>")
    for e, f in zip(encoded, swapped):
        if f:  # no loss on the (counterfactual) caption: it would teach the caption to misread the image
            e["labels"][:(e["input_ids"] == think_id).nonzero()[-1].item()] = -100
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    model.train()
    t0 = time.time()
    for step in range(steps):
        for group in opt.param_groups:  # 20 warmup steps, then linear decay to 0.1x, as the recipe's rounds
            group["lr"] = 1e-3 * min(1.0, (step + 1) / 20) * (1.0 - 0.9 * step / steps)
        batch = seeing_base.collate([encoded[rng.randrange(len(encoded))] for _ in range(8)],
                                    processor.tokenizer.pad_token_id)
        loss = model(**batch, use_cache=False).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 200 == 0:
            print(f"step {step} loss {loss.item():.3f} {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    model.eval()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return {"steps": steps, "focus_problems": focus, "usual_problems": usual, "usual_seed": usual_seed, "counterfactual_demos": sum(swapped), "train_s": round(time.time() - t0),
            "eval_500": seeing_base.evaluate(model, processor, generate("test", 500, seed=0))}


def chain(ckpt: str, problems: int, captions: str) -> dict:
    """On the larger_shape problems among the first `problems` test problems: does the caption name both
    options' sizes right, does the think, does the think say what the caption said, does the answer follow
    the think's sizes, and is it right."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from stages.common.data.chat import problem_messages
    from stages.common.protocol import parse_response

    processor = AutoProcessor.from_pretrained(ckpt)
    model = AutoModelForImageTextToText.from_pretrained(ckpt).eval()
    tests = [s for s in generate("test", problems, seed=0) if s.task == "larger_shape"]
    tok = processor.tokenizer
    tok.padding_side = "left"

    def size_named(text, option, after):
        c, s = option["color"], option["shape"]
        found = re.search(rf"{c} {s} (large|small)" if after else rf"(large|small) {c} {s}", text)
        return found.group(1) if found else None

    counts = {key: 0 for key in ("caption_sizes_right", "think_sizes_right", "think_agrees_with_caption",
                                 "answer_follows_think", "accuracy")}
    for i in range(0, len(tests), 16):
        chunk = tests[i:i + 16]
        enc = processor.apply_chat_template([problem_messages(s, True, s.pil_images()) for s in chunk], tokenize=True,
                                            return_dict=True, return_tensors="pt", add_generation_prompt=True,
                                            processor_kwargs={"padding": True})
        with torch.no_grad():
            out = model.generate(**enc, do_sample=False, max_new_tokens=120)
        for s, text in zip(chunk, tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)):
            response = parse_response(text)
            options = s.meta["query"]["options"]
            truth = [unique_object(s.meta["scene"], o["color"], o["shape"])["size"] for o in options]
            caption = [size_named(response.caption or "", o, captions in ("size-after", "shipped")) for o in options]
            think = [size_named(response.think or "", o, True) for o in options]   # the oracle's think format
            implied = [LETTERS[k] for k, size in enumerate(think) if size == "large"]
            answer = (response.answer or "").strip()
            counts["caption_sizes_right"] += caption == truth
            counts["think_sizes_right"] += think == truth
            counts["think_agrees_with_caption"] += think == caption
            counts["answer_follows_think"] += len(implied) == 1 and answer.startswith(implied[0])
            counts["accuracy"] += answer.startswith(s.answer)
    return {"problems": len(tests), **{k: round(v / max(len(tests), 1), 3) for k, v in counts.items()}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build")
    build.add_argument("out")
    build.add_argument("--rounds", type=int, default=0,
                       help="the recipe's first N language rounds only (0: all; the rows before round five used 4)")
    round_ = sub.add_parser("round")
    round_.add_argument("src")
    round_.add_argument("out")
    round_.add_argument("--steps", type=int, default=3000)
    round_.add_argument("--counterfactual", action="store_true")
    round_.add_argument("--focus", type=int, default=2000, help="new larger_shape problems in the mix (0: the usual mix only)")
    round_.add_argument("--usual", type=int, default=3000, help="problems of every family in the mix")
    round_.add_argument("--usual-seed", type=int, default=1000, help="1000: the build's own problems; other: fresh")
    diagnose = sub.add_parser("diagnose")
    diagnose.add_argument("ckpt")
    diagnose.add_argument("--problems", type=int, default=300)
    diagnose.add_argument("--out")
    for p in (build, round_, diagnose):
        p.add_argument("--captions", choices=("shipped", "size-before", "size-after", "larger-shape-only"),
                       default="shipped", help="shipped = size-after; larger-shape-only: synth's before round five")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    use_captions(args.captions)
    if args.command == "build":
        from transformers import AutoModelForImageTextToText, AutoProcessor

        rounds = seeing_base.RECIPE.text_rounds[:args.rounds] if args.rounds else seeing_base.RECIPE.text_rounds
        seeing_base.build(args.out, recipe=dataclasses.replace(seeing_base.RECIPE, text_rounds=rounds))
        model = AutoModelForImageTextToText.from_pretrained(args.out).eval()
        result = {"eval_500": seeing_base.evaluate(model, AutoProcessor.from_pretrained(args.out),
                                                   generate("test", 500, seed=0))}
        out = Path(args.out) / "probe.json"
    elif args.command == "round":
        result = language_round(args.src, args.out, args.steps, args.counterfactual, args.focus, args.usual,
                                args.usual_seed)
        out = Path(args.out) / "probe.json"
    else:
        result = chain(args.ckpt, args.problems, args.captions)
        out = Path(args.out) if args.out else None
    result = {"command": args.command, "captions": args.captions, **result}
    line = json.dumps(result)
    print(line)
    if out is not None:
        out.write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
