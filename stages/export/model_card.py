"""The lineage of an exported model and its README model card (pure functions of manifests and results)."""

from __future__ import annotations

import json
from pathlib import Path

from stages.common.contract import checkpoint
from stages.common.contract.errors import PrismError

# Hyperparameters worth a line in the card, when a stage's config has them.
KEY_HYPERPARAMETERS = ("algo", "lr", "epochs", "steps", "max_steps", "batch_size", "prompts_per_step",
                       "rollouts_per_prompt", "max_new_tokens", "temperature", "alpha", "format_penalty",
                       "disc_lr", "clip_low", "clip_high", "kl_coef", "teacher", "select", "data", "seed")
LINEAGE_FILE = "prism_lineage.json"


def lineage_records(spec) -> list[dict]:
    """Every stage from this checkpoint back to the base model, newest first: stage, ref, created,
    fingerprint check, key hyperparameters, data fingerprints, summary metrics."""
    records = []
    for link in checkpoint.lineage(spec):
        record = {"stage": link["stage"], "ref": link["ref"], "fingerprint_ok": link["ok"]}
        try:
            node = checkpoint.resolve(link["ref"])
        except PrismError:
            node = None
        if node is not None and node.kind == "prism":
            m = node.manifest
            config = m.get("config", {})
            record.update(created=m.get("created"), fingerprint=node.fingerprint,
                          system_prompt=config.get("system_prompt", True),
                          hyperparameters={k: config[k] for k in KEY_HYPERPARAMETERS if k in config},
                          data=m.get("data", {}), summary=m.get("summary", {}))
        elif node is not None:
            record.update(fingerprint=node.fingerprint, base_model=True)
        records.append(record)
    return records


def trained_system_prompt(lineage: list[dict]) -> str | None:
    """The protocol system prompt when a prism stage in the lineage trained the policy with it (sft unless
    its system_prompt was off; align and rl always prompt with it), else None."""
    from stages.common.protocol import SYSTEM_PROMPT

    for r in lineage:
        if r.get("stage") in ("sft", "align", "rl") and r.get("system_prompt", True) is not False:
            return SYSTEM_PROMPT
    return None


def usage_snippet(system_prompt: str | None) -> list[str]:
    """Python lines that prompt the exported policy the way it was trained (with its system prompt)."""
    lines = ["```python", "from PIL import Image",
             "from transformers import AutoModelForImageTextToText, AutoProcessor",
             "model = AutoModelForImageTextToText.from_pretrained(\"PATH_OR_REPO\")",
             "processor = AutoProcessor.from_pretrained(\"PATH_OR_REPO\")",
             "image = Image.open(\"problem.png\")",
             "question = \"How many red objects are there?\""]
    if system_prompt is not None:
        lines += ["# the system prompt the policy was trained with: without it, it answers without the protocol",
                  "SYSTEM_PROMPT = " + json.dumps(system_prompt)]
    lines.append("messages = [")
    if system_prompt is not None:
        lines.append("    {\"role\": \"system\", \"content\": SYSTEM_PROMPT},")
    lines += ["    {\"role\": \"user\", \"content\": [{\"type\": \"image\", \"image\": image},",
              "                                 {\"type\": \"text\", \"text\": question}]},",
              "]",
              "inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,",
              "                                       return_dict=True, return_tensors=\"pt\")",
              "output = model.generate(**inputs, max_new_tokens=512)",
              "new_tokens = output[0, inputs[\"input_ids\"].shape[-1]:]  # the response only, not the prompt",
              "print(processor.decode(new_tokens, skip_special_tokens=True))", "```"]
    return lines


def eval_results(directories: list[Path]) -> list[dict]:
    """results.json of each eval directory that has one: [{"dir", "tasks": {name: value}, "average"}]."""
    out = []
    for d in directories:
        path = Path(d) / "results.json"
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise PrismError(f"{path} is not valid JSON") from None
        tasks = {name: r.get("value") for name, r in (data.get("tasks") or {}).items()}
        out.append({"dir": str(d), "tasks": tasks, "average": data.get("average"), "judge": data.get("judge")})
    return out


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, default=str)
    return str(value)


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def render(name: str, what: str, dtype: str, lineage: list[dict], evals: list[dict], verification: dict,
           system_prompt: str | None = None) -> str:
    """README.md: what the model is, its lineage, hyperparameters, data fingerprints, results, usage
    (with `system_prompt`, the prompt the policy was trained with, in the usage snippet)."""
    base = lineage[-1]["ref"] if lineage else "?"
    lines = ["---", "library_name: transformers", "pipeline_tag: image-text-to-text", "tags:", "- prism",
             "- vision-language", f"base_model: {base}" if "/" in base and not Path(base).exists() else "", "---", "",
             f"# {name}", "",
             f"A {'PRISM discriminator (Qwen3-VL backbone + scalar value head)' if what == 'discriminator' else 'vision-language policy'} "
             f"post-trained with the prism toolkit (SFT -> PRISM pre-alignment -> RLVR), exported in {dtype}.",
             "Responses follow the protocol `<caption>...</caption> <think>...</think> <answer>...</answer>`.", "",
             "## Lineage (newest first)", "", "| stage | checkpoint | created | fingerprint |", "|---|---|---|---|"]
    for r in lineage:
        ok = "ok" if r.get("fingerprint_ok") else "changed or missing"
        lines.append(f"| {r['stage']} | `{r['ref']}` | {r.get('created') or '-'} | {ok} |")
    lines += ["", "## Key hyperparameters", ""]
    for r in lineage:
        if r.get("hyperparameters"):
            params = ", ".join(f"{k}={_fmt(v)}" for k, v in r["hyperparameters"].items())
            lines.append(f"- **{r['stage']}**: {params}")
    lines += ["", "## Data fingerprints", ""]
    any_data = False
    for r in lineage:
        for key, value in (r.get("data") or {}).items():
            lines.append(f"- {r['stage']}: {key} = `{_fmt(value)}`")
            any_data = True
    if not any_data:
        lines.append("- none recorded")
    if evals:
        lines += ["", "## Evaluation (accuracy, %)", ""]
        columns = []
        for e in evals:
            columns += [t for t in e["tasks"] if t not in columns]
        lines += ["| eval | " + " | ".join(columns) + " | avg |", "|---|" + "---|" * (len(columns) + 1)]
        for e in evals:
            cells = [("-" if e["tasks"].get(c) is None else f"{100 * e['tasks'][c]:.1f}") for c in columns]
            avg = "-" if e.get("average") is None else f"{100 * e['average']:.1f}"
            lines.append(f"| `{Path(e['dir']).name}` | " + " | ".join(cells) + f" | {avg} |")
        lines.append("")
        lines.append("Scored by prism's rule-based verifier unless a judge is named (see the prism README).")
    lines += ["", "## Requirements", ""]
    if what == "discriminator":
        lines.append(f"- the prism toolkit (a custom value head); written with transformers {_transformers_version()}")
    else:
        lines.append(f"- transformers >= 4.57 (the first with Qwen3-VL); written with transformers "
                     f"{_transformers_version()}, with the config fields 4.57 reads")
    lines += ["", "## Usage", ""]
    if what == "discriminator":
        lines += ["```python", "from stages.common.models.discriminator import load_discriminator",
                  "disc = load_discriminator(\"PATH_OR_REPO\")  # needs the prism toolkit: a custom value head", "```"]
    else:
        lines += usage_snippet(system_prompt) + ["",
                  "vLLM and lmms-eval load the folder as any Qwen3-VL checkpoint "
                  "(`prism eval --ckpt PATH` uses the protocol system prompt)."]
    if verification:
        lines += ["", "## Export check", "", f"- {_fmt(verification)}"]
    lines.append("")
    return "\n".join(line for line in lines if line is not None)
