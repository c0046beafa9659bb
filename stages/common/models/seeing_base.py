"""`--ckpt tiny-seeing`: the tiny Qwen3-VL made to see, standing in for a pretrained Qwen3-VL-Instruct.

The paper starts from a model that already perceives; SFT then drifts it. The plain `tiny` model is blind
(its random vision tower, trained jointly at the text learning rate, collapses into an occupancy detector).
This builder gives it eyes in two deterministic phases, cached under $PRISM_HOME/tiny like the others:

  1. vision pretraining: the tower alone, supervised per merged token. Images are 48x48 (the processor's
     pixel bound resizes synth's 64-px images), so the 3x3 merged tokens are exactly the 3x3 scene grid and
     token i is trained to name cell i's colour, shape and size (or "empty"); chart images train a pooled
     head to read every bar's value. A penalty holds the merged tokens' norm near the text embeddings' scale,
     so the language model is not swamped by them (the failure the feasibility study measured).
  2. language pretraining: the tower frozen, the language model learns the clean oracle's demonstrations
     (caption, think, answer) of synth training problems, in six rounds, the last two on problems the earlier
     ones did not see (docs/seeing-base.md has the numbers).

`feature_cosines` is the collapse monitor: cosine of merged tokens for same-cell objects that differ only in
colour or only in shape (near 1 means the tower cannot tell them apart).
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import torch
import torch.nn.functional as F

from stages.common.world.seeing_recipe import IMAGE_PIXELS, RECIPE, SeeingRecipe, recipe_key  # noqa: F401
from stages.common.world.synth.scene import COLORS, GRID, SIDES, SIZES

# The build's output for seed 0, shipped with the package so nobody waits for the build (CI included);
# `python -m stages.common.models.seeing_base build --ship` remakes it when the recipe changes.
SHIPPED = Path(__file__).parent / "assets" / "tiny-seeing"
REBUILD_ENV = "PRISM_SEEING_REBUILD"

COLOR_NAMES = tuple(COLORS)
SHAPE_NAMES = tuple(SIDES)
CHART_MAX = 8


# ---- what each merged token should know (targets from the scene graph) ---------------------------------------

def cell_targets(scene: dict) -> dict[str, list[int]]:
    """Per grid cell (row-major): colour, shape, size class; 0 means empty, k the k-th name + 1.
    Chart scenes: every cell is "empty" for these heads (the chart head reads them)."""
    color, shape, size = [0] * GRID * GRID, [0] * GRID * GRID, [0] * GRID * GRID
    if scene["kind"] == "shapes":
        for o in scene["objects"]:
            cell = int(o["y"] * GRID) * GRID + int(o["x"] * GRID)
            color[cell] = COLOR_NAMES.index(o["color"]) + 1
            shape[cell] = SHAPE_NAMES.index(o["shape"]) + 1
            size[cell] = SIZES.index(o["size"]) + 1
    return {"color": color, "shape": shape, "size": size}


def chart_targets(scene: dict) -> list[int]:
    """Per colour: its bar's value (0 when the colour has no bar, or the scene is not a chart)."""
    values = [0] * len(COLOR_NAMES)
    if scene["kind"] == "chart":
        for b in scene["bars"]:
            values[COLOR_NAMES.index(b["color"])] = b["value"]
    return values


class PerceptionHeads(torch.nn.Module):
    """Linear probes the vision pretraining trains through: thrown away afterwards."""

    def __init__(self, dim: int):
        super().__init__()
        self.color = torch.nn.Linear(dim, len(COLOR_NAMES) + 1)
        self.shape = torch.nn.Linear(dim, len(SHAPE_NAMES) + 1)
        self.size = torch.nn.Linear(dim, len(SIZES) + 1)
        self.kind = torch.nn.Linear(dim, 2)
        self.bars = torch.nn.Linear(dim, len(COLOR_NAMES) * (CHART_MAX + 1))

    def losses(self, tokens: torch.Tensor, targets: dict) -> dict[str, torch.Tensor]:
        """tokens [B, 9, D]; targets tensors color/shape/size [B, 9], kind [B], bars [B, 5]."""
        flat = tokens.reshape(-1, tokens.shape[-1])
        pooled = tokens.mean(1)
        bars = self.bars(pooled).view(-1, len(COLOR_NAMES), CHART_MAX + 1)
        is_chart = targets["kind"] == 1
        out = {name: F.cross_entropy(getattr(self, name)(flat), targets[name].reshape(-1))
               for name in ("color", "shape", "size")}
        out["kind"] = F.cross_entropy(self.kind(pooled), targets["kind"])
        out["bars"] = (F.cross_entropy(bars[is_chart].reshape(-1, CHART_MAX + 1), targets["bars"][is_chart].reshape(-1))
                       if is_chart.any() else tokens.sum() * 0.0)
        return out

    @torch.no_grad()
    def accuracy(self, tokens: torch.Tensor, targets: dict) -> dict[str, float]:
        """Per-cell accuracy on occupied cells (colour, shape, size), chart bar-value accuracy."""
        flat = tokens.reshape(-1, tokens.shape[-1])
        occupied = targets["shape"].reshape(-1) > 0
        out = {}
        for name in ("color", "shape", "size"):
            pred = getattr(self, name)(flat).argmax(-1)
            out[name] = float((pred == targets[name].reshape(-1))[occupied].float().mean()) if occupied.any() else 1.0
        is_chart = targets["kind"] == 1
        if is_chart.any():
            bars = self.bars(tokens.mean(1)).view(-1, len(COLOR_NAMES), CHART_MAX + 1).argmax(-1)
            out["bars"] = float((bars[is_chart] == targets["bars"][is_chart]).float().mean())
        return out


def batch_targets(scenes: list[dict]) -> dict[str, torch.Tensor]:
    cells = [cell_targets(s) for s in scenes]
    out = {name: torch.tensor([c[name] for c in cells]) for name in ("color", "shape", "size")}
    out["kind"] = torch.tensor([int(s["kind"] == "chart") for s in scenes])
    out["bars"] = torch.tensor([chart_targets(s) for s in scenes])
    return out


def merged_tokens(visual, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> tuple[torch.Tensor, list]:
    """The tower's merged tokens [B, 9, D] and its deepstack features (same shape), for 48-px images."""
    out = visual(pixel_values, grid_thw=grid_thw)
    n = grid_thw.shape[0]
    tokens = out.pooler_output.view(n, -1, out.pooler_output.shape[-1])
    deep = [d.view(n, -1, d.shape[-1]) for d in (out.deepstack_features or [])]
    return tokens, deep


def norm_penalty(tokens: torch.Tensor, target: float) -> torch.Tensor:
    """Mean squared excess of the tokens' L2 norm over `target`: keeps visual embeddings on the text scale."""
    return F.relu(tokens.norm(dim=-1) - target).pow(2).mean()


# ---- the collapse monitor ---------------------------------------------------------------------------------------

def probe_scenes() -> list[tuple[str, dict, dict]]:
    """(what differs, scene a, scene b): one large object in the centre cell, differing in one attribute."""
    def one(color, shape):
        return {"kind": "shapes", "objects": [{"shape": shape, "color": color, "size": "large", "x": 0.5, "y": 0.5}]}
    return [("colour", one("red", "square"), one("green", "square")),
            ("colour", one("blue", "circle"), one("yellow", "circle")),
            ("shape", one("red", "square"), one("red", "triangle")),
            ("shape", one("blue", "pentagon"), one("blue", "hexagon")),
            ("shape", one("green", "circle"), one("green", "square"))]


@torch.no_grad()
def feature_cosines(visual, image_processor) -> dict[str, float]:
    """Mean cosine of the centre merged token between scenes differing only in colour / only in shape."""
    from stages.common.world.synth.scene import render

    pairs = probe_scenes()
    images = [render(s, 64) for _, a, b in pairs for s in (a, b)]
    enc = image_processor(images=images, return_tensors="pt")
    tokens, _ = merged_tokens(visual, enc["pixel_values"], enc["image_grid_thw"])
    centre = tokens[:, (GRID * GRID) // 2]
    cos = F.cosine_similarity(centre[0::2], centre[1::2], dim=-1)
    out: dict[str, list[float]] = {}
    for (what, _, _), c in zip(pairs, cos.tolist()):
        out.setdefault(what, []).append(c)
    result = {f"cos_{k}": sum(v) / len(v) for k, v in out.items()}
    result["token_norm"] = float(tokens.norm(dim=-1).mean())
    return result


def scene_images(n: int, seed: int, split: str = "train") -> list[tuple[dict, object]]:
    """n (scene, 64-px image) pairs drawn like synth's problems (all task families, all levels)."""
    from stages.common.world.synth.scene import render, split_of
    from stages.common.world.synth.tasks import FAMILIES, TASKS

    rng = random.Random(f"seeing/{seed}/{split}")
    out = []
    while len(out) < n:
        task = TASKS[len(out) % len(TASKS)]
        problem = FAMILIES[task].build(rng, rng.choice((1, 2, 3)))
        if split_of(problem.scene) == split:
            out.append((problem.scene, render(problem.scene, 64)))
    return out


# ---- phase 1: vision pretraining -------------------------------------------------------------------------------

def pretrain_vision(visual, image_processor, recipe: SeeingRecipe, log=print) -> list[dict]:
    """Train the tower (and throw-away heads) to name every cell's colour/shape/size and every bar's value.
    Returns the monitor records (losses, held-out probe accuracy, feature cosines)."""
    torch.manual_seed(recipe.seed)
    heads = PerceptionHeads(visual.merger.linear_fc2.out_features)
    train = scene_images(recipe.vision_images, recipe.seed)
    held = scene_images(200, recipe.seed, "test")

    def encode(items):
        enc = image_processor(images=[im for _, im in items], return_tensors="pt")
        return enc["pixel_values"], enc["image_grid_thw"], batch_targets([s for s, _ in items])

    held_enc = encode(held)
    params = list(visual.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.vision_lr, weight_decay=0.01)
    rng = random.Random(f"seeing-vision/{recipe.seed}")
    records = []
    visual.train()
    for step in range(recipe.vision_steps):
        for group in opt.param_groups:
            group["lr"] = recipe.vision_lr * min(1.0, (step + 1) / recipe.vision_warmup)
        pixels, grid, targets = encode([train[rng.randrange(len(train))] for _ in range(recipe.vision_batch)])
        tokens, deep = merged_tokens(visual, pixels, grid)
        losses = heads.losses(tokens, targets)
        loss = sum(losses.values()) + recipe.norm_weight * norm_penalty(tokens, recipe.norm_target)
        for d in deep:  # the deepstack features enter the language model too: same supervision
            loss = loss + sum(heads.losses(d, targets).values()) + recipe.norm_weight * norm_penalty(d, recipe.norm_target)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 250 == 0 or step == recipe.vision_steps - 1:
            with torch.no_grad():
                held_tokens, _ = merged_tokens(visual, held_enc[0], held_enc[1])
                record = {"phase": "vision", "step": step, "loss": float(loss),
                          **{f"probe_{k}": v for k, v in heads.accuracy(held_tokens, held_enc[2]).items()},
                          **feature_cosines(visual, image_processor)}
            records.append(record)
            log(record)
    visual.eval()
    return records


# ---- phase 2: the language model learns to describe and answer, on the frozen tower ---------------------------

def encode_demos(samples, processor) -> list[dict]:
    """Samples with teacher demos -> model inputs with labels on the assistant turn only (unpadded)."""
    from stages.common.data.chat import sft_messages

    conversations = [sft_messages(s, True, s.pil_images()) for s in samples]
    enc = processor.apply_chat_template(conversations, tokenize=True, return_dict=True, return_tensors=None,
                                        return_assistant_tokens_mask=True, processor_kwargs={"padding": False})
    pixels = torch.as_tensor(enc["pixel_values"])
    grid = torch.as_tensor(enc["image_grid_thw"])
    per_image = grid.prod(-1).tolist()
    out, at = [], 0
    for i in range(len(samples)):
        ids = torch.tensor(enc["input_ids"][i])
        mask = torch.tensor(enc["assistant_masks"][i], dtype=torch.bool)
        out.append({"input_ids": ids, "labels": torch.where(mask, ids, torch.full_like(ids, -100)),
                    "mm_token_type_ids": torch.tensor(enc["mm_token_type_ids"][i]),
                    "pixel_values": pixels[at:at + per_image[i]], "image_grid_thw": grid[i:i + 1]})
        at += per_image[i]
    return out


def collate(items: list[dict], pad_id: int) -> dict:
    """Right-padded batch; pads carry no label, and the causal mask keeps real tokens off them."""
    length = max(len(e["input_ids"]) for e in items)

    def padded(key, value):
        rows = torch.full((len(items), length), value, dtype=torch.long)
        for i, e in enumerate(items):
            rows[i, :len(e[key])] = e[key]
        return rows

    return {"input_ids": padded("input_ids", pad_id), "labels": padded("labels", -100),
            "mm_token_type_ids": padded("mm_token_type_ids", 0),
            "attention_mask": padded("input_ids", pad_id).ne(pad_id).long(),
            "pixel_values": torch.cat([e["pixel_values"] for e in items]),
            "image_grid_thw": torch.cat([e["image_grid_thw"] for e in items])}


def pretrain_language(model, processor, recipe: SeeingRecipe, log=print, first_round: int = 0) -> list[dict]:
    """The tower frozen; everything else learns the clean oracle's demonstrations of synth problems.
    first_round > 0 continues weights that already ran the earlier rounds: each round starts from a fresh
    optimiser and its own data order, so that is the same computation as the whole build."""
    from stages.common.world.synth import generate, with_oracle_demos

    for p in model.model.visual.parameters():
        p.requires_grad_(False)
    problem_sets: dict[int, list[dict]] = {}

    def problem_set(k: int) -> list[dict]:  # set k: its own problems (synth train seed seed + 1000 + 3000k)
        if k not in problem_sets:
            samples = with_oracle_demos(generate("train", recipe.text_problems, seed=recipe.seed + 1000 + 3000 * k))
            problem_sets[k] = [encoded for i in range(0, len(samples), 256)
                               for encoded in encode_demos(samples[i:i + 256], processor)]
        return problem_sets[k]

    params = [p for p in model.parameters() if p.requires_grad]
    pad_id = processor.tokenizer.pad_token_id
    records = []
    model.train()
    for round_index, (steps, lr, warmup, *rest) in enumerate(recipe.text_rounds):
        if round_index < first_round:
            continue
        encoded = problem_set(rest[0] if rest else 0)  # a round without a set index trains on set 0
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)  # a fresh optimiser per round
        rng = random.Random(f"seeing-text/{recipe.seed}")
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = lr * min(1.0, (step + 1) / warmup) * (1.0 - 0.9 * step / steps)
            batch = collate([encoded[rng.randrange(len(encoded))] for _ in range(recipe.text_batch)], pad_id)
            loss = model(**batch, use_cache=False).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            if step % 100 == 0 or step == steps - 1:
                record = {"phase": "text", "round": round_index, "step": step, "loss": loss.item()}
                records.append(record)
                log(record)
    model.eval()
    return records


# ---- how well it sees: greedy captions on the synth test split -------------------------------------------------

def attribute_f1(named: list[str], actual: list[str]) -> float:
    from collections import Counter

    a, b = Counter(named), Counter(actual)
    hit = sum((a & b).values())
    if not a and not b:
        return 1.0
    p = hit / sum(a.values()) if a else 0.0
    r = hit / sum(b.values()) if b else 0.0
    return 2 * p * r / (p + r) if p + r else 0.0


def perception_scores(caption: str, sample) -> dict:
    """Caption F1 (objects), colour F1 and shape F1 (attribute multisets), exact count (as many things named
    as drawn)."""
    from stages.common.world.synth.caption_check import caption_accuracy, mentions, scene_items

    named, actual = mentions(caption), scene_items(sample.meta["scene"])
    expand = lambda c, i: [k[i] for k, n in c.items() for _ in range(n)]
    out = {"caption_f1": caption_accuracy(caption, sample)["f1"],
           "color_f1": attribute_f1(expand(named, 0), expand(actual, 0)),
           "exact_count": float(sum(named.values()) == sum(actual.values()))}
    if sample.meta["scene"]["kind"] == "shapes":
        out["shape_f1"] = attribute_f1(expand(named, 1), expand(actual, 1))
    return out


@torch.no_grad()
def evaluate(model, processor, samples, batch_size: int = 16, max_new_tokens: int = 120) -> dict:
    """Greedy responses -> mean caption/colour/shape F1, exact counts, accuracy overall and per family."""
    from stages.common.data.chat import problem_messages
    from stages.common.protocol import parse_response
    from stages.common.rewards import compute_score

    tok = processor.tokenizer
    tok.padding_side = "left"
    rows = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        conversations = [problem_messages(s, True, s.pil_images()) for s in chunk]
        enc = processor.apply_chat_template(conversations, tokenize=True, return_dict=True, return_tensors="pt",
                                            add_generation_prompt=True, processor_kwargs={"padding": True})
        out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens)
        texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        for s, text in zip(chunk, texts):
            row = perception_scores(parse_response(text).caption or "", s)
            row["acc"] = compute_score(text, s.answer, s.choices)["acc"]
            row["task"] = s.task
            rows.append(row)
    tok.padding_side = "right"
    mean = lambda key: sum(r[key] for r in rows if key in r) / max(1, sum(key in r for r in rows))
    result = {k: mean(k) for k in ("caption_f1", "color_f1", "shape_f1", "exact_count", "acc")}
    result["acc_by_task"] = {t: sum(r["acc"] for r in rows if r["task"] == t) / sum(r["task"] == t for r in rows)
                             for t in dict.fromkeys(r["task"] for r in rows)}
    result["n"] = len(rows)
    return result


# ---- the build ---------------------------------------------------------------------------------------------------

def progress_line(record: dict) -> str:
    return "tiny-seeing build: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in record.items())


def build(out_dir, seed: int = 0, recipe: SeeingRecipe | None = None, log=None):
    """Build tiny-seeing into out_dir: the tiny dense model's tokenizer and initial weights (same seed), a
    processor that feeds it 48-px images, then the two pretraining phases. Writes seeing.json (the recipe
    and every monitor record) next to the weights. About 45 minutes on one free CPU core."""
    from pathlib import Path

    from stages.common.contract import console

    from stages.common.world import tiny

    recipe = recipe or dataclasses.replace(RECIPE, seed=seed)
    log = log or (lambda record: console.info(progress_line(record)))
    log({"phase": "start", "note": "building tiny-seeing once (vision, then language pretraining); cached after"})
    tok = tiny._build_tokenizer(seed)
    processor = tiny._build_processor(tok)
    bounds = {"shortest_edge": tiny.MIN_PIXELS, "longest_edge": IMAGE_PIXELS * IMAGE_PIXELS}
    processor.image_processor.size = bounds
    model = tiny._build_model(tok, moe=False, seed=seed)
    records = pretrain_vision(model.model.visual, processor.image_processor, recipe, log)
    records += pretrain_language(model, processor, recipe, log)
    for p in model.parameters():
        p.requires_grad_(True)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    (out_dir / "seeing.json").write_text(json.dumps({"recipe": recipe_key(recipe), "records": records}, indent=1) + "\n")
    return out_dir


def continue_build(src, out_dir, recipe: SeeingRecipe | None = None, log=None):
    """Run the language rounds src has not run yet: src is a build of a recipe equal to this one except that
    its `text_rounds` are a prefix of this one's. Each round starts from a fresh optimiser and its own data
    order, so this is the build's own computation (a test checks the weights are identical), in the time of
    the new rounds only. Writes out_dir like build (src's config and tokenizer files, seeing.json with src's
    records and the new ones)."""
    import shutil
    from pathlib import Path

    from transformers import AutoModelForImageTextToText, AutoProcessor

    from stages.common.contract import console
    from stages.common.contract.errors import PrismError

    src, out_dir = Path(src), Path(out_dir)
    recipe = recipe or RECIPE
    key = json.loads(json.dumps(recipe_key(recipe)))
    try:
        done = json.loads((src / "seeing.json").read_text())
    except (OSError, ValueError) as e:
        raise PrismError(f"{src} is not a tiny-seeing build (no readable seeing.json: {e})") from None
    rounds = done["recipe"].get("text_rounds", [])
    same_otherwise = {k: v for k, v in done["recipe"].items() if k != "text_rounds"} == \
        {k: v for k, v in key.items() if k != "text_rounds"}
    if not same_otherwise or rounds != key["text_rounds"][:len(rounds)] or len(rounds) == len(key["text_rounds"]):
        raise PrismError(f"{src} cannot be continued into this recipe: its recipe must equal this one except for "
                         f"fewer language rounds, the same first ones (it has {len(rounds)} of "
                         f"{len(key['text_rounds'])})")
    log = log or (lambda record: console.info(progress_line(record)))
    processor = AutoProcessor.from_pretrained(src)
    model = AutoModelForImageTextToText.from_pretrained(src, dtype=torch.float32)
    records = pretrain_language(model, processor, recipe, log, first_round=len(rounds))
    for p in model.parameters():
        p.requires_grad_(True)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    for f in src.iterdir():  # the configuration and tokenizer files as the build wrote them
        if f.name not in ("model.safetensors", "seeing.json") and not f.name.startswith("."):
            shutil.copy2(f, out_dir / f.name)
    (out_dir / "seeing.json").write_text(json.dumps({"recipe": recipe_key(recipe),
                                                     "records": done["records"] + records}, indent=1) + "\n")
    return out_dir


# ---- the shipped build ---------------------------------------------------------------------------------------------

def shipped_recipe() -> dict | None:
    record = SHIPPED / "seeing.json"
    return json.loads(record.read_text())["recipe"] if record.is_file() else None


def shipped_is_current() -> bool:
    """True when the shipped weights are this recipe's build (the recipe is their cache key)."""
    return shipped_recipe() == json.loads(json.dumps(recipe_key()))


def provide(out_dir, seed: int = 0, log=None):
    """What tiny.ensure runs for tiny-seeing: a copy of the shipped build when it is this recipe's (seed 0),
    else the build itself. PRISM_SEEING_REBUILD=1 always builds. A stale shipped copy is never used."""
    import os
    import shutil

    from stages.common.contract import console
    if seed == 0 and os.environ.get(REBUILD_ENV) != "1" and shipped_is_current():
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for f in SHIPPED.iterdir():
            shutil.copy2(f, out_dir / f.name)
        return out_dir
    if seed == 0 and shipped_recipe() is not None and not shipped_is_current():
        console.warn("the shipped tiny-seeing was built from another recipe; building this one (about 45 min "
                     "on a free core; `python -m stages.common.models.seeing_base build --ship` refreshes the shipped copy)")
    return build(out_dir, seed=seed, log=log)


def main(argv=None) -> int:
    """`python -m stages.common.models.seeing_base build --out DIR [--from BUILD] [--eval N] [--ship]`: build from
    scratch (or continue BUILD), report how far the weights are from the shipped ones, evaluate, and (--ship)
    replace the shipped copy."""
    import argparse
    import shutil
    import tempfile

    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from stages.common.world.synth import generate

    parser = argparse.ArgumentParser(prog="python -m stages.common.models.seeing_base")
    parser.add_argument("command", choices=["build"])
    parser.add_argument("--out", default="", help="where to build (default: a temporary directory)")
    parser.add_argument("--eval", type=int, default=200, help="synth test problems to evaluate on (0: none)")
    parser.add_argument("--ship", action="store_true", help="replace the shipped copy with this build")
    parser.add_argument("--from", dest="from_dir", default="",
                        help="continue a build of this recipe's first language rounds (see continue_build)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the build is deterministic per thread count; the shipped copy used one
    out = Path(args.out or tempfile.mkdtemp(prefix="tiny-seeing-"))
    if args.from_dir:
        continue_build(args.from_dir, out)
    else:
        build(out)
    if (SHIPPED / "model.safetensors").is_file():
        new, old = load_file(out / "model.safetensors"), load_file(SHIPPED / "model.safetensors")
        diff = max(float((new[k] - old[k]).abs().max()) for k in new) if new.keys() == old.keys() else float("inf")
        print(f"max |weight - shipped weight|: {diff:.3g}")
    if args.eval:
        model = AutoModelForImageTextToText.from_pretrained(out).eval()
        print(json.dumps(evaluate(model, AutoProcessor.from_pretrained(out), generate("test", args.eval, seed=0))))
    if args.ship:
        shutil.rmtree(SHIPPED, ignore_errors=True)
        SHIPPED.mkdir(parents=True)
        for f in out.iterdir():
            if not f.name.startswith("."):
                shutil.copy2(f, SHIPPED / f.name)
        print(f"shipped: {SHIPPED}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
