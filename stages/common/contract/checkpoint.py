"""The checkpoint-directory contract (docs/design.md, "The checkpoint directory").

A stage reads checkpoint specs (`resolve`) and writes exactly one output directory (`open_output` ->
`Run`). The manifest prism.json is written last and atomically: its presence means the directory is
complete. It records the stage, versions, parents with fingerprints, the resolved config, data
fingerprints, summary metrics, every file's size and sha256, and a hash of itself so hand edits are
caught. Only the main process writes.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
import platform
import re
import shutil
from pathlib import Path
from typing import Any

from stages.common.contract import __version__, console, hub
from stages.common.contract.console import is_main_process
from stages.common.contract.errors import PrismError, UsageError
from stages.common.contract.redact import redact

FORMAT_VERSION = 1
MANIFEST = "prism.json"
RUN_MARKER = ".prism-run.json"  # written at start: marks a directory as a (possibly partial) prism run
LOCK = ".prism-lock"            # held (flock) by the one process writing a run; records its pid and host
STAGES = ("curate", "sft", "align", "rl", "eval", "export")
POLICY_STAGES = ("base", "sft", "align", "rl")  # checkpoints whose model/ is a policy
TINY_SPECS = ("tiny", "tiny-moe", "tiny-qwen", "tiny-seeing")
# Published Qwen3-VL shapes with no weights (stages.common.models.shapes): for --dry-run plans and GPU benchmarks.
SHAPE_SPECS = ("qwen3vl-2b-shape", "qwen3vl-4b-shape", "qwen3vl-8b-shape")
# Keys that name a credential ("api_key", "hf_token", "password"), not counts like "max_new_tokens".
_SECRET_KEY = re.compile(r"((api|secret|access|private)[_-]?key|secret|passw(or)?d|credentials?"
                         r"|(^|[_-])(access|auth|bearer|hf|api)?[_-]?token)$", re.I)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# --keep best:METRIC: the best evaluation's weights in <ckpt>/best/model, its record in best/best.json and in the
# manifest's summary["best"]; a spec DIR#best names them (docs/eval-during-training.md).
BEST_DIR = "best"
BEST_RECORD = "best.json"
BEST_KEY = "best"
VARIANT_MARK = "#"
VARIANTS = (BEST_DIR,)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()


def library_versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "prism": __version__}
    for name in ("torch", "transformers", "accelerate", "datasets", "deepspeed", "vllm", "flash-attn",
                 "google-genai", "lmms-eval"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def scrub(obj: Any) -> Any:
    """Belt and braces: configs never hold secrets, but a key that looks secret is never written."""
    if isinstance(obj, dict):
        return {k: ("<redacted>" if _SECRET_KEY.search(str(k)) and v not in (None, "") else scrub(v))
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [scrub(v) for v in obj]
    if isinstance(obj, str):
        return redact(obj)  # http://user:TOKEN@host -> http://<redacted>@host
    return obj


# ----------------------------------------------------------------------------------------- reading

@dataclasses.dataclass
class CkptSpec:
    """What a --ckpt / --data / --disc argument resolved to."""

    ref: str                      # as the user gave it
    kind: str                     # "prism" | "hf" | "hub" | "tiny" | "shape"
    path: Path | None = None      # directory on disk (prism checkpoint dir or HF model dir)
    manifest: dict | None = None  # prism.json for kind == "prism"
    variant: str = ""             # "best": the weights of its best evaluation (DIR#best), "" the final ones

    @property
    def stage(self) -> str:
        return self.manifest["stage"] if self.manifest else "base"

    @property
    def model_path(self) -> str:
        """Where from_pretrained should load the policy from."""
        if self.kind == "prism":
            return str(self.path / self.variant / "model" if self.variant else self.path / "model")
        if self.kind == "tiny":
            from stages.common.world import tiny  # only a tiny spec loads the tiny world (the architecture test)
            path = tiny.cached_path(self.ref)
            if not tiny.is_built(path):
                raise RuntimeError(f"the {self.ref} model is not built yet: load it through stages.common.models.loading")
            return str(path)
        if self.kind == "shape":
            raise PrismError(f"{self.ref} is a shape with no weights: only --dry-run plans and benchmarks use it",
                             hint=f"train from a real checkpoint; --dry-run --ckpt {self.ref} plans its memory")
        if self.kind == "hf":
            return str(self.path)
        return self.ref

    @property
    def fingerprint(self) -> str:
        if self.kind == "prism":   # the manifest hashes both weights; the variant says which one is meant
            sha = hashlib.sha256((self.path / MANIFEST).read_bytes()).hexdigest()
            return f"{sha}{VARIANT_MARK}{self.variant}" if self.variant else sha
        if self.kind == "tiny":
            from stages.common.world import tiny
            return f"tiny:{tiny.build_key(self.ref)}"
        if self.kind == "shape":
            return f"shape:{self.ref}"
        if self.kind == "hf" and (self.path / "config.json").is_file():
            return "config:" + sha256_file(self.path / "config.json")
        return f"hub:{self.ref}"

    def describe(self) -> str:
        what = self.stage if self.kind == "prism" else self.kind + " base model"
        if self.variant:
            best = (self.manifest.get("summary") or {}).get(BEST_KEY) or {}
            what += f", best {best.get('metric', '?')} {best.get('value', '?')} at step {best.get('step', '?')}"
        return f"{self.ref} ({what})"


def load_manifest(path: str | Path) -> dict:
    """Read and validate prism.json of a checkpoint directory (without re-hashing the files)."""
    path = Path(path)
    mpath = path / MANIFEST
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PrismError(f"{path} has no {MANIFEST}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PrismError(f"{mpath} is not valid JSON ({e.__class__.__name__})",
                         hint="the checkpoint is corrupt; re-run the stage that wrote it") from None
    if not isinstance(manifest, dict) or "self_sha256" not in manifest:
        raise PrismError(f"{mpath} is not a prism manifest")
    claimed = manifest["self_sha256"]
    body = {k: v for k, v in manifest.items() if k != "self_sha256"}
    if hashlib.sha256(_canonical(body)).hexdigest() != claimed:
        raise PrismError(f"{mpath} does not match its own checksum: it was edited or corrupted",
                         hint="re-run the stage that wrote it")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise PrismError(f"{mpath} has format version {manifest.get('format_version')}, "
                         f"this prism reads version {FORMAT_VERSION}")
    if manifest.get("stage") not in STAGES:
        raise PrismError(f"{mpath} names an unknown stage {manifest.get('stage')!r}")
    return manifest


def verify_files(path: str | Path, manifest: dict | None = None, full: bool = True) -> list[str]:
    """Problems with the files a manifest lists: missing, wrong size, (full) wrong sha256."""
    path = Path(path)
    manifest = manifest or load_manifest(path)
    problems = []
    for rel, info in sorted(manifest.get("files", {}).items()):
        f = path / rel
        if not f.is_file():
            problems.append(f"{rel}: missing")
        elif f.stat().st_size != info["size"]:
            problems.append(f"{rel}: size {f.stat().st_size} != {info['size']}")
        elif full and sha256_file(f) != info["sha256"]:
            problems.append(f"{rel}: sha256 mismatch")
    return problems


# Files up to this size are re-hashed every time a checkpoint is opened (configs, tokenizers, data
# shards of tiny runs); larger ones get a size check, and a full re-hash with `prism inspect --verify`.
QUICK_HASH_LIMIT = 64 << 20


def _quick_verify(path: Path, manifest: dict) -> None:
    for rel, info in sorted(manifest.get("files", {}).items()):
        f = path / rel
        if not f.is_file():
            raise PrismError(f"checkpoint {path} is missing {rel}", hint="it was modified after it was written")
        size = f.stat().st_size
        if size != info["size"] or (size <= QUICK_HASH_LIMIT and sha256_file(f) != info["sha256"]):
            raise PrismError(f"checkpoint {path}: {rel} does not match its checksum in {MANIFEST}",
                             hint="the file was modified or corrupted; re-run the stage that wrote it")


def resolve(ref: str, role: str = "--ckpt") -> CkptSpec:
    """Turn a checkpoint spec into a CkptSpec, refusing incomplete, corrupt or unknown directories."""
    if not ref:
        raise UsageError(f"{role} is required")
    if ref in TINY_SPECS:
        return CkptSpec(ref=ref, kind="tiny")
    if ref in SHAPE_SPECS:
        return CkptSpec(ref=ref, kind="shape")
    ref = str(ref)   # a Path is a spec too
    path = Path(ref).expanduser()
    base, mark, variant = ref.rpartition(VARIANT_MARK)
    if mark and base and not path.exists():
        return resolve_variant(ref, base, variant, role)
    if path.is_dir():
        if (path / MANIFEST).is_file():
            manifest = load_manifest(path)
            _quick_verify(path, manifest)
            return CkptSpec(ref=ref, kind="prism", path=path, manifest=manifest)
        if (path / RUN_MARKER).is_file() or (path / "state").is_dir():
            holder = lock_holder(path)
            if holder is not None:
                raise PrismError(f"{role} {ref} is still being written by a prism run (pid {holder.get('pid', '?')} "
                                 f"on {holder.get('host', '?')}): it is not a checkpoint until that run finishes",
                                 hint="wait for it to finish, or use an earlier checkpoint")
            raise PrismError(f"{role} {ref} is an incomplete checkpoint (no {MANIFEST}): its run was interrupted",
                             hint=f"finish it with --resume --out {ref}")
        if (path / "config.json").is_file():
            return CkptSpec(ref=ref, kind="hf", path=path)
        raise PrismError(f"{role} {ref} is neither a prism checkpoint (no {MANIFEST}) nor a Hugging Face model "
                         f"directory (no config.json)")
    if path.exists():
        raise PrismError(f"{role} {ref} is a file, not a checkpoint directory")
    first = ref.split("/")[0]
    looks_local = ref.startswith((".", "/", "~")) or Path(first).exists() or not _HUB_ID.match(ref)
    if looks_local:
        raise PrismError(f"{role} {ref} does not exist", hint="give a prism checkpoint, an HF model directory, "
                                                               "a hub id, or 'tiny'")
    hub.require_hub(ref, "model", role)  # seconds, not minutes of retries, when there is no network
    return CkptSpec(ref=ref, kind="hub")


def resolve_variant(ref: str, base: str, variant: str, role: str) -> CkptSpec:
    """DIR#best: the weights a run kept for its best evaluation (--keep best:METRIC), checked like the final ones
    (the manifest lists and hashes both)."""
    if variant not in VARIANTS:
        raise PrismError(f"{role} {ref}: unknown variant #{variant}", hint="DIR (the final weights) or DIR#best")
    spec = resolve(base, role)
    if spec.kind != "prism":
        raise PrismError(f"{role} {ref}: #{variant} names a prism checkpoint's kept weights; {base} is a "
                         f"{spec.kind} model")
    record = (spec.manifest.get("summary") or {}).get(BEST_KEY)
    if not record or f"{BEST_DIR}/model/config.json" not in spec.manifest.get("files", {}):
        raise PrismError(f"{role} {ref}: {base} kept no best checkpoint (its run had no --keep best:METRIC, or "
                         "no evaluation)", hint=f"use {base} for its final weights")
    return dataclasses.replace(spec, ref=ref, variant=variant)


def default_eval_dir(spec: CkptSpec) -> Path:
    """Where `prism eval` writes by default, and where `prism export` looks for a checkpoint's results:
    eval-NAME beside a checkpoint directory, or eval-REF (made file-safe) in the working directory."""
    if spec.path is not None:
        return spec.path.parent / f"eval-{spec.path.name}{'-' + spec.variant if spec.variant else ''}"
    return Path(f"eval-{re.sub(r'[^A-Za-z0-9._-]+', '--', spec.ref)}")


def require_stage(spec: CkptSpec, allowed: tuple[str, ...], role: str = "--ckpt") -> CkptSpec:
    """Refuse a checkpoint from the wrong stage, naming what was expected."""
    if spec.stage not in allowed:
        want = " or ".join(f"'{s}'" for s in allowed)
        raise PrismError(f"{role} {spec.ref} is a '{spec.stage}' checkpoint; this stage needs {want}")
    if set(allowed) & set(POLICY_STAGES) and is_discriminator_folder(spec):
        align = spec.path.parent
        hint = (f"use the align checkpoint's policy: {role} {align}" if (align / MANIFEST).is_file()
                else "give a policy checkpoint")
        raise PrismError(f"{role} {spec.ref} is a PRISM discriminator (a scorer whose language-model head was "
                         "never trained), not a policy", hint=hint)
    return spec


DISCRIMINATOR_KEY = "prism_discriminator"  # stages.common.models.discriminator.CONFIG_KEY: set in a discriminator's config


def is_discriminator_folder(spec: CkptSpec) -> bool:
    """A plain HF folder holding a saved (or exported) PRISM discriminator rather than a policy."""
    if spec.kind != "hf" or spec.path is None:
        return False
    try:
        config = json.loads((spec.path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and DISCRIMINATOR_KEY in config


def lineage(spec: CkptSpec, max_depth: int = 16) -> list[dict]:
    """Walk parents back to the base model: [{ref, stage, role, ok}] from this checkpoint backwards."""
    chain = [{"ref": spec.ref, "stage": spec.stage, "role": "self", "ok": True}]
    current = spec
    for _ in range(max_depth):
        if current.kind != "prism":
            break
        parents = current.manifest.get("parents", [])
        policy = next((p for p in parents if p["role"] in ("policy", "model")), parents[0] if parents else None)
        if policy is None:
            break
        nxt, ref = resolve_parent(policy, current.path)
        if nxt is None:
            chain.append({"ref": ref, "stage": policy.get("stage", "?"), "role": policy["role"], "ok": False})
            break
        chain.append({"ref": ref, "stage": nxt.stage, "role": policy["role"],
                      "ok": nxt.fingerprint == policy["fingerprint"]})
        current = nxt
    return chain


def parent_record(role: str, spec: CkptSpec, child: Path) -> dict:
    """A parent as the manifest stores it. A directory parent is stored resolved (absolute), and relative
    to the child checkpoint too, so the lineage does not depend on the working directory the stage ran in,
    and survives moving or copying a whole chain."""
    record = {"role": role, "ref": spec.ref, "kind": spec.kind, "stage": spec.stage, "fingerprint": spec.fingerprint}
    if spec.path is not None and spec.kind in ("prism", "hf"):
        suffix = f"{VARIANT_MARK}{spec.variant}" if spec.variant else ""   # resolve_parent finds the same weights
        record["ref"] = str(_real(spec.path)) + suffix
        record["relative"] = os.path.relpath(_real(spec.path), _real(child)) + suffix
        if spec.variant:
            record["variant"] = spec.variant
    return record


def resolve_parent(record: dict, child: Path | None) -> tuple[CkptSpec | None, str]:
    """(the parent's CkptSpec or None when it cannot be found, the ref it was found at). Tried in order:
    relative to the child, the stored ref; the one whose fingerprint matches wins, else the first found."""
    candidates = []
    if record.get("relative") and child is not None:
        candidates.append(os.path.normpath(Path(child) / record["relative"]))
    candidates.append(record["ref"])
    found = []
    for ref in dict.fromkeys(candidates):
        try:
            spec = resolve(ref)
        except PrismError:
            continue
        if spec.fingerprint == record.get("fingerprint"):
            return spec, ref
        found.append((spec, ref))
    return found[0] if found else (None, record["ref"])


# ----------------------------------------------------------------------------------------- writing

class Run:
    """An output directory being written by one stage. `finalize` makes it a checkpoint."""

    def __init__(self, path: Path, stage: str, config: dict, parents: list[CkptSpec | tuple[str, CkptSpec]],
                 resuming: bool):
        self.path = path
        self.stage = stage
        self.config = config
        self.parents = parents
        self.resuming = resuming
        self.main = is_main_process()

    model_dir = property(lambda self: self.path / "model")
    state_dir = property(lambda self: self.path / "state")
    metrics_path = property(lambda self: self.path / "metrics.jsonl")

    def log_metrics(self, record: dict) -> None:
        """Append one JSON line to metrics.jsonl (main process only)."""
        if not self.main:
            return
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=float) + "\n")

    def read_metrics(self) -> list[dict]:
        if not self.metrics_path.is_file():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def truncate_metrics(self, after_step: int, key: str = "step") -> None:
        """On resume, drop records logged after the saved state so the log has no duplicated steps."""
        if not self.main or not self.metrics_path.is_file():
            return
        kept = [r for r in self.read_metrics() if r.get(key, 0) <= after_step]
        tmp = self.metrics_path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.metrics_path)

    def finalize(self, summary: dict | None = None, data: dict | None = None, keep_state: bool = False) -> Path:
        """Hash every file and write prism.json last, atomically. Returns the directory."""
        if not self.main:
            return self.path
        # state/ is removed only once the manifest is written: a Ctrl-C while hashing leaves a partial run
        # that --resume continues from its last save, not one that starts again from step 0
        drop_state = not keep_state and self.state_dir.exists()
        share_as_umask_allows(self.path)
        files = {}
        for f in sorted(self.path.rglob("*")):
            rel = f.relative_to(self.path).as_posix()
            if drop_state and (rel == "state" or rel.startswith("state/") or rel.startswith("state.")):
                continue
            if f.is_file() and rel not in (MANIFEST, RUN_MARKER, LOCK) and not rel.endswith(".tmp"):
                files[rel] = {"size": f.stat().st_size, "sha256": sha256_file(f)}
        parents = []
        for item in self.parents:
            role, spec = item if isinstance(item, tuple) else ("policy", item)
            parents.append(parent_record(role, spec, self.path))
        body = {
            "format_version": FORMAT_VERSION,
            "stage": self.stage,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "versions": library_versions(),
            "parents": parents,
            "config": scrub(self.config),
            "data": data or {},
            "summary": scrub(summary or {}),
            "files": files,
        }
        # Hash what a reader will load: JSON turns int keys into strings (and re-sorts them), tuples into
        # lists, Paths and numpy ints into strings; hashing the Python objects would not match on reload.
        body = json.loads(json.dumps(body, default=str))
        manifest = dict(body, self_sha256=hashlib.sha256(_canonical(body)).hexdigest())
        tmp = self.path / (MANIFEST + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1, sort_keys=True, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path / MANIFEST)
        (self.path / RUN_MARKER).unlink(missing_ok=True)
        if drop_state:
            for leftover in ("state", "state.old", "state.saving"):   # save_state's rename steps too
                shutil.rmtree(self.path / leftover, ignore_errors=True)
        release_lock(self.path)
        return self.path


def _umask() -> int:
    try:  # read without setting it: os.umask() changes the process's umask for a moment (threads)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share_as_umask_allows(root: Path) -> None:
    """Give every file and directory under root at least the mode the user's umask gives new files.
    Libraries save through private temp files (transformers' safetensors: mode 0600), which would leave the
    weights unreadable to a lab group that can read everything else. Bits are only ever added."""
    import stat

    mask = _umask()
    for p in [root, *root.rglob("*")]:
        if p.is_symlink():
            continue
        try:
            mode = stat.S_IMODE(p.stat().st_mode)
            want = mode | ((0o777 if p.is_dir() else 0o666) & ~mask)
            if want != mode:
                os.chmod(p, want)
        except OSError:  # not ours to change (another owner): leave it as it is
            continue


# Fields a resumed run may change: how long it runs (extend a run), how often it saves, logs and
# evaluates, where it reports, and align's discriminator checkpointing and layout (memory and speed, not the
# maths: the layouts agree to rounding, tests/test_scoring.py; `auto` resolves them from the device's memory,
# so a run resumed on another machine may resolve them differently). Everything else (data, model, optimiser,
# algorithm) must match the interrupted run, or the resumed half would be a different experiment.
SAFE_ON_RESUME = ("max_steps", "steps", "epochs", "save_every", "log_every", "eval_every", "report_to",
                  "keep_state", "disc_gradient_checkpointing", "disc_layout")


def _config_for_compare(config: dict) -> dict:
    plain = json.loads(json.dumps(scrub(config), default=str))
    return {k: v for k, v in plain.items() if k not in ("resume", "overwrite", "dry_run")}


def open_output(out: str, stage: str, config: dict, parents: list, overwrite: bool = False,
                resume: bool = False, barrier=None) -> Run:
    """Prepare the output directory of a stage run.

    complete (manifest) -> refused unless --overwrite; partial (marker or state/) -> refused unless
    --resume or --overwrite; a non-empty directory that is not a prism run -> refused unless --overwrite;
    a directory another live process is writing -> refused (lock); --out equal to, inside or around an
    input checkpoint -> refused before anything is deleted.
    Under several processes pass barrier=accelerator.wait_for_everyone: every process decides from the
    directory as it was, then only the main process changes it.
    """
    if not out:
        raise UsageError("--out is required")
    path = Path(out).expanduser()
    main = is_main_process()
    refuse_overlap(out, [spec for item in parents for spec in [item[1] if isinstance(item, tuple) else item]])
    resuming = _output_decision(path, out, stage, config, overwrite, resume)
    if main:  # decided read-only first (a refused --out is not created); then again under the lock
        acquire_lock(path, out)
        resuming = _output_decision(path, out, stage, config, overwrite, resume, check_lock=False, announce=True)
    if barrier is not None:
        barrier()
    if resume and not resuming and main:   # a typo in --out would otherwise restart a long run from step 0 unsaid
        console.warn(f"--resume: {out} holds no interrupted {stage} run; starting a new one from step 0")
    if main:
        try:
            if overwrite and path.exists():
                _empty_dir(path)
            path.mkdir(parents=True, exist_ok=True)
            if not resuming:
                (path / RUN_MARKER).write_text(json.dumps({"stage": stage, "config": scrub(config)}, default=str,
                                                          sort_keys=True))
        except OSError as e:
            raise PrismError(f"cannot write to --out {out}: {e.strerror}") from None
    if barrier is not None:
        barrier()
    return Run(path, stage, config, parents, resuming)


def _empty_dir(path: Path) -> None:
    """--overwrite: remove everything but the lock this process holds."""
    for child in path.iterdir():
        if child.name == LOCK:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _real(p: Path) -> Path:
    return Path(os.path.realpath(p.expanduser()))


def refuse_overlap(out: str, inputs: list) -> None:
    """--out must not be an input checkpoint, lie inside one (even in its model/), or contain one:
    writing (or --overwrite deleting) there destroys the input. Checked before anything is touched."""
    target = _real(Path(out))
    for spec in inputs:
        if getattr(spec, "path", None) is None or spec.kind == "tiny":
            continue
        source = _real(spec.path)
        if target == source:
            raise PrismError(f"--out {out} is the input checkpoint {spec.ref}: writing there would destroy it",
                             hint="choose a new --out")
        if source in target.parents:
            raise PrismError(f"--out {out} is inside the input checkpoint {spec.ref}", hint="choose a --out outside it")
        if target in source.parents:
            raise PrismError(f"--out {out} contains the input checkpoint {spec.ref}",
                             hint="choose a --out that does not hold the inputs")


# Locks this process holds, by real path: a stage run re-opening its own --out (tests, resume after an
# in-process failure) is not another writer.
_HELD_LOCKS: dict[str, int] = {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _lock_owner(path: Path) -> dict:
    try:
        return json.loads((path / LOCK).read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        return {}


def acquire_lock(path: Path, out: str) -> None:
    """Take the exclusive write lock of an output directory (created if missing) for this process.

    flock is released by the kernel when its holder dies, so a lock file left by a killed run is stale
    and simply taken over; the pid it records is only for the message naming the live holder."""
    import fcntl
    import socket

    key = str(_real(path))
    if key in _HELD_LOCKS:
        return
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise PrismError(f"cannot write to --out {out}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        owner = _lock_owner(path)
        raise PrismError(f"--out {out} is being written by another prism process (pid {owner.get('pid', '?')} "
                         f"on {owner.get('host', '?')})",
                         hint="wait for it to finish, or choose another --out") from None
    previous = _lock_owner(path)
    if previous.get("pid") and previous.get("host") == socket.gethostname() and not _pid_alive(previous["pid"]):
        from stages.common.contract import console
        console.info(f"--out {out}: taking over a stale lock left by pid {previous['pid']} (no longer running)")
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
    _HELD_LOCKS[key] = fd


def release_lock(path: Path) -> None:
    fd = _HELD_LOCKS.pop(str(_real(path)), None)
    if fd is None:
        return
    (Path(path) / LOCK).unlink(missing_ok=True)
    os.close(fd)


def lock_holder(path: Path) -> dict | None:
    """The owner recorded in the lock of a directory another process is writing now; None if free."""
    import fcntl

    if str(_real(path)) in _HELD_LOCKS or not (path / LOCK).is_file():
        return None
    try:
        fd = os.open(path / LOCK, os.O_RDWR)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except OSError:
        return _lock_owner(path) or {"pid": "?"}
    finally:
        os.close(fd)


def check_output(out: str, stage: str, config: dict, overwrite: bool = False, resume: bool = False) -> bool:
    """Read-only: refuse a bad --out before any slow work (loading models); True if it will resume."""
    if not out:
        raise UsageError("--out is required")
    return _output_decision(Path(out).expanduser(), out, stage, config, overwrite, resume)


def _output_decision(path: Path, out: str, stage: str, config: dict, overwrite: bool, resume: bool,
                     check_lock: bool = True, announce: bool = False) -> bool:
    """Read-only: may this run write to `path`, and is it resuming? Raises with the reason when not.
    announce: say which safe keys a resume changes (once: the decision is taken up to three times)."""
    if path.exists() and not path.is_dir():
        raise PrismError(f"--out {out} exists and is a file")
    # only the main process takes the lock, so only it asks (other ranks would see their own main's lock)
    holder = lock_holder(path) if check_lock and is_main_process() and path.is_dir() else None
    if holder is not None:
        raise PrismError(f"--out {out} is being written by another prism process (pid {holder.get('pid', '?')} "
                         f"on {holder.get('host', '?')})", hint="wait for it to finish, or choose another --out")
    if resume and overwrite:
        raise UsageError("--resume and --overwrite contradict each other: --overwrite would throw the "
                         "interrupted run's progress away", hint="pass --resume to continue it, or --overwrite alone "
                                                                 "to start again from step 0")
    if not (path.is_dir() and any(p.name != LOCK for p in path.iterdir())):
        return False
    complete = (path / MANIFEST).is_file()
    partial = not complete and ((path / RUN_MARKER).is_file() or (path / "state").is_dir())
    if overwrite:
        _check_replaceable(path, out, stage, complete, partial)
        return False
    if complete:
        found = _stage_of(path)
        raise PrismError(f"--out {out} already holds a complete '{found}' checkpoint",
                         hint="pass --overwrite to replace it, or choose another --out" if found == stage
                         else "choose another --out")
    if partial and resume:
        marker = _read_marker(path)
        if marker.get("stage") != stage:
            raise PrismError(f"--out {out} holds a partial '{marker.get('stage')}' run, not '{stage}'")
        before, now = _config_for_compare(marker.get("config", {})), _config_for_compare(config)
        changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        unsafe = [k for k in changed if k not in SAFE_ON_RESUME]
        if unsafe:
            raise PrismError(f"cannot resume {out}: config differs from the interrupted run in "
                             f"{', '.join(f'{k} ({before.get(k)!r} -> {now.get(k)!r})' for k in unsafe)}",
                             hint=f"resume with the same options (only {', '.join(SAFE_ON_RESUME)} may change), "
                                  "or --overwrite")
        if changed and announce and is_main_process():
            from stages.common.contract import console
            console.info(f"resuming {out} with changed {', '.join(f'{k} {before.get(k)!r} -> {now.get(k)!r}' for k in changed)}")
        return True
    if partial:
        found = _read_marker(path).get("stage")
        if found != stage:
            raise PrismError(f"--out {out} holds an interrupted '{found or 'unknown'}' run, not '{stage}'",
                             hint="choose another --out")
        raise PrismError(f"--out {out} holds an interrupted run",
                         hint="pass --resume to continue it or --overwrite to start again")
    raise PrismError(f"--out {out} is a non-empty directory that is not a prism run",
                     hint="choose an empty or new directory; prism never deletes files it did not write")


def _check_replaceable(path: Path, out: str, stage: str, complete: bool, partial: bool) -> None:
    """--overwrite deletes everything in --out, so it only ever replaces a run of this same stage (complete
    or interrupted): never a folder of the user's own files, nor another stage's checkpoint."""
    if complete:
        found = _stage_of(path)
        if found != stage:
            raise PrismError(f"--out {out} holds a complete '{found}' checkpoint; --overwrite only replaces a "
                             f"'{stage}' run", hint="choose another --out")
        return
    if partial:
        found = _read_marker(path).get("stage")
        if found != stage:
            raise PrismError(f"--out {out} holds a partial '{found or 'unknown'}' run; --overwrite only replaces "
                             f"a '{stage}' run", hint="choose another --out")
        return
    raise PrismError(f"--out {out} is a non-empty directory that is not a prism run; --overwrite will not "
                     "delete it", hint="choose an empty or new directory")


def _read_marker(path: Path) -> dict:
    try:
        return json.loads((path / RUN_MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _stage_of(path: Path) -> str:
    try:
        return json.loads((path / MANIFEST).read_text()).get("stage", "?")
    except (OSError, json.JSONDecodeError):
        return "?"
