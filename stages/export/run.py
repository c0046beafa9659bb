"""`prism export`: a checkpoint as a plain Hugging Face folder, read top to bottom.

    resolve the checkpoint -> check --out (empty or --overwrite, writable) -> load policy (or discriminator)
    in the export dtype -> save sharded safetensors + config + processor + chat template + generation config
    into a staging folder -> lineage + README model card -> reload and generate (policy: logits compared with
    the loaded model) -> move into place -> optionally push to the hub

The folder is not a prism checkpoint (no prism.json, no state/): it is what a user downloads. Its lineage is
in README.md and prism_lineage.json.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from stages.common.contract import checkpoint, console
from stages.common.contract.errors import PrismError
from stages.common.data.chat import problem_messages
from stages.common.models.discriminator import load_discriminator, load_discriminator_processor
from stages.common.models.loading import load_policy, load_processor
from stages.common.world import synth
from stages.export import model_card
from stages.export.config import ExportConfig

LOGITS_ATOL = {"fp32": 1e-4, "bf16": 0.0, "fp16": 0.0}  # same dtype both sides: reload must be bit-exact


def run(cfg: ExportConfig) -> Path:
    spec = checkpoint.resolve(cfg.ckpt)
    if cfg.what == "discriminator":
        checkpoint.require_stage(spec, ("align",))
    else:
        checkpoint.require_stage(spec, checkpoint.POLICY_STAGES)
    out = Path(cfg.out).expanduser()
    checkpoint.refuse_overlap(cfg.out, [spec])  # --overwrite would delete the checkpoint being exported
    check_output(out, cfg.overwrite)
    if cfg.dry_run:
        console.print_table("export plan", ["field", "value"], [["checkpoint", spec.describe()], ["what", cfg.what],
                                                                  ["dtype", cfg.dtype], ["out", str(out)]])
        return out

    staging = out.with_name(out.name + ".exporting")
    shutil.rmtree(staging, ignore_errors=True)
    device = torch.device("cpu")  # export never needs an accelerator, and CPU memory is the larger pool
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # save_pretrained imports DeepSpeed: no accelerator warning
    if cfg.what == "discriminator":
        model, processor = save_discriminator(spec, cfg, staging, device)
    else:
        model, processor = save_policy(spec, cfg, staging, device)
        add_transformers4_fields(staging)   # before the reload check below, which then covers it

    lineage = model_card.lineage_records(spec)
    beside = [checkpoint.default_eval_dir(spec)] if spec.path is not None else []  # a hub model has no results
    evals = model_card.eval_results([Path(d) for d in cfg.eval] or beside)
    verification = verify(cfg, staging, model, processor) if cfg.verify else {}
    write_card(staging, out.name, cfg, lineage, evals, verification)
    checkpoint.share_as_umask_allows(staging)   # safetensors are saved 0600; labmates read exports too

    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)
    console.info(f"exported {spec.describe()} ({cfg.what}, {cfg.dtype}) -> {out}")
    if cfg.push_to_hub:
        push(out, cfg.push_to_hub, cfg.private)
    return out


# ------------------------------------------------------------------------------------------- pieces

def check_output(out: Path, overwrite: bool) -> None:
    """--out must be new, empty, or replaced with --overwrite; its parent must be writable."""
    if out.exists() and not out.is_dir():
        raise PrismError(f"--out {out} exists and is a file")
    if (out / checkpoint.MANIFEST).is_file():
        raise PrismError(f"--out {out} is a prism checkpoint; export will not replace one",
                         hint="choose another --out")
    is_export = (out / model_card.LINEAGE_FILE).is_file()  # what export writes; --overwrite replaces only that
    if out.is_dir() and any(out.iterdir()):
        if not is_export:
            raise PrismError(f"--out {out} is a non-empty folder that is not a prism export"
                             + ("; --overwrite will not delete it" if overwrite else ""),
                             hint="choose an empty or new --out; prism never deletes files it did not write")
        if not overwrite:
            raise PrismError(f"--out {out} already holds an export",
                             hint="pass --overwrite to replace it, or choose another --out")
    parent = out.parent if out.parent != Path("") else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PrismError(f"cannot create the parent of --out {out}: {e.strerror}") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PrismError(f"cannot write to --out {out}: {parent} is not writable")


def save_policy(spec, cfg: ExportConfig, staging: Path, device):
    processor = load_processor(spec)
    model = load_policy(spec, dtype=cfg.dtype, device=device, train=False)
    write_hf_folder(model, processor, staging, cfg.max_shard_size)
    return model, processor


def save_discriminator(spec, cfg: ExportConfig, staging: Path, device):
    model = load_discriminator(spec.path, dtype=cfg.dtype, device=device, train=False)
    processor = load_discriminator_processor(spec.path)
    write_hf_folder(model, processor, staging, cfg.max_shard_size)
    return model, processor


def write_hf_folder(model, processor, directory: Path, max_shard_size: str) -> None:
    try:
        directory.mkdir(parents=True)
        model.save_pretrained(directory, safe_serialization=True, max_shard_size=max_shard_size)
        processor.save_pretrained(directory)
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None and not (directory / "generation_config.json").is_file():
            generation_config.save_pretrained(directory)
    except OSError as e:
        raise PrismError(f"cannot write the export to {directory}: {e.strerror or e}") from None


def add_transformers4_fields(directory: Path) -> None:
    """Also make the folder loadable by transformers 4.57 (the first with Qwen3-VL; the last 4.x, still
    common), which 5.x's save does not: 4.57 reads the M-RoPE settings from `rope_scaling` and `rope_theta`
    (5.x writes `rope_parameters`: without them Qwen3-VL raises AttributeError 'NoneType' has no 'get'),
    and takes tokenizer `extra_special_tokens` as a mapping (5.x writes an empty list: AttributeError
    'list' has no 'keys'). Fields are only added or an empty list made an empty mapping; 5.x reads the
    folder as before (docs/first-hour.md, "transformers 4.57")."""
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    for section in [config, *(v for v in config.values() if isinstance(v, dict))]:
        rope = section.get("rope_parameters")
        if isinstance(rope, dict) and "mrope_section" in rope and section.get("rope_scaling") is None:
            section["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
            if "rope_theta" in rope and "rope_theta" not in section:
                section["rope_theta"] = rope["rope_theta"]
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tokenizer_path = directory / "tokenizer_config.json"
    if tokenizer_path.is_file():
        tokenizer = json.loads(tokenizer_path.read_text(encoding="utf-8"))
        if tokenizer.get("extra_special_tokens") == []:
            tokenizer["extra_special_tokens"] = {}
            tokenizer_path.write_text(json.dumps(tokenizer, indent=2) + "\n", encoding="utf-8")


def verify(cfg: ExportConfig, directory: Path, model, processor) -> dict:
    """Reload the folder the way a user would; compare logits on a synth prompt and generate a few tokens."""
    if cfg.what == "discriminator":
        reloaded = load_discriminator(directory, dtype=cfg.dtype, device=torch.device("cpu"))
        return {"reloaded": True, "max_abs_weight_diff": max_weight_diff(model, reloaded)}
    from transformers import AutoModelForImageTextToText, AutoProcessor

    check_dtype = verify_dtype(model.dtype)
    if check_dtype != model.dtype:   # the weights are written: the check may run them wider (never narrower)
        model = model.to(check_dtype)
    try:
        reloaded = AutoModelForImageTextToText.from_pretrained(directory, dtype=check_dtype,
                                                               attn_implementation=model.config._attn_implementation)
        reprocessor = AutoProcessor.from_pretrained(directory)
    except (OSError, ValueError) as e:
        raise PrismError(f"the export in {directory} does not reload: {str(e).splitlines()[0]}") from None
    reloaded.eval()
    inputs = probe_inputs(reprocessor)
    with torch.inference_mode():
        diff = (model(**inputs).logits.float() - reloaded(**inputs).logits.float()).abs().max().item()
        generated = reloaded.generate(**inputs, max_new_tokens=8, do_sample=False)
    if diff > LOGITS_ATOL[cfg.dtype]:
        raise PrismError(f"the reloaded export in {directory} computes different logits (max diff {diff:.3g})")
    new_tokens = int(generated.shape[-1] - inputs["input_ids"].shape[-1])
    return {"reloaded": True, "max_abs_logit_diff": diff, "generated_tokens": new_tokens}


def verify_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the CPU reload check computes in: the export's own, except half precision where torch's CPU
    kernels lack it. torch's bf16/fp16 attention on x86 needs its AVX512 kernels ("pack_vnni2 is only supported
    when avx512 is supported" on AVX2 and default kernel paths, issue 37); there the check runs the exported
    weights in fp32, which holds every half-precision value exactly, so bit-exactness still holds."""
    half = dtype in (torch.bfloat16, torch.float16)
    if half and torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AVX512_BF16", "AMX"):
        return torch.float32
    return dtype


def probe_inputs(processor) -> dict:
    """One synth problem as the model would see it (image + question under the chat template)."""
    sample = synth.load("synth:test:1")[0]
    messages = problem_messages(sample, images=sample.pil_images())
    return dict(processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                              return_tensors="pt"))


def max_weight_diff(a, b) -> float:
    theirs = b.state_dict()
    return max(((t.float() - theirs[k].float()).abs().max().item() for k, t in a.state_dict().items()), default=0.0)


def write_card(directory: Path, name: str, cfg: ExportConfig, lineage: list[dict], evals: list[dict],
               verification: dict) -> None:
    # sizes and sha256 of what was written so far (weights, config, processor): `prism inspect --verify` checks them
    files = {f.relative_to(directory).as_posix(): {"size": f.stat().st_size, "sha256": checkpoint.sha256_file(f)}
             for f in sorted(directory.rglob("*")) if f.is_file()}
    record = {"exported_from": cfg.ckpt, "what": cfg.what, "dtype": cfg.dtype, "lineage": lineage,
              "eval": evals, "verification": verification, "files": files}
    (directory / model_card.LINEAGE_FILE).write_text(json.dumps(record, indent=1, default=str) + "\n")
    system_prompt = model_card.trained_system_prompt(lineage) if cfg.what != "discriminator" else None
    (directory / "README.md").write_text(model_card.render(name, cfg.what, cfg.dtype, lineage, evals, verification,
                                                           system_prompt))


def push(directory: Path, repo: str, private: bool) -> None:
    """Upload the folder; any hub failure (offline, no token, no rights) is one line."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise PrismError(f"cannot push to {repo}: HF_HUB_OFFLINE is set", hint=f"the export is complete in {directory}")
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        api.create_repo(repo, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=str(directory), commit_message="prism export")
    except Exception as e:  # network, auth and hub errors come in many types; none is a success
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PrismError(f"cannot push to {repo}: {type(e).__name__}: {first}",
                         hint=f"the export is complete in {directory}; check network access and $HF_TOKEN") from None
    console.info(f"pushed {directory} to https://huggingface.co/{repo}")
