"""`prism inspect DIR`: what a checkpoint is, where it came from, how it did."""

from __future__ import annotations

from prism_cli import checkpoint, console
from prism_cli.errors import PrismError

# Config keys worth showing first, when a stage has them.
HIGHLIGHTS = ("ckpt", "data", "algo", "teacher", "tasks", "lr", "epochs", "steps", "max_steps", "batch_size",
              "n_samples", "prompts_per_step", "rollouts_per_prompt", "max_new_tokens", "alpha", "select", "seed")


def show(path: str, verify: bool = False) -> None:
    spec = checkpoint.resolve(path, role="checkpoint")
    if spec.kind != "prism":
        raise PrismError(f"{path} is a {spec.kind} base model, not a prism checkpoint")
    m = spec.manifest
    console.print_table(f"{path}", ["field", "value"], [
        ["stage", m["stage"]], ["created", m["created"]], ["prism", m["versions"].get("prism")],
        ["torch / transformers", f"{m['versions'].get('torch')} / {m['versions'].get('transformers')}"],
        ["files", f"{len(m['files'])} ({sum(f['size'] for f in m['files'].values()) / 1e6:.1f} MB)"],
    ])
    chain = checkpoint.lineage(spec)
    console.print_table("lineage (newest first)", ["stage", "checkpoint", "role", "fingerprint ok"],
                        [[c["stage"], c["ref"], c["role"], "yes" if c["ok"] else "NO / missing"] for c in chain])
    cfg = m.get("config", {})
    rows = [[k, cfg[k]] for k in HIGHLIGHTS if k in cfg]
    if rows:
        console.print_table("config highlights", ["key", "value"], rows)
    summary = m.get("summary", {})
    flat = [[k, v] for k, v in summary.items() if isinstance(v, (int, float, str))]
    if flat:
        console.print_table("summary metrics", ["metric", "value"], flat)
    if verify:
        problems = checkpoint.verify_files(spec.path, m, full=True)
        if problems:
            raise PrismError(f"{path}: {len(problems)} file(s) do not match the manifest: {'; '.join(problems[:5])}")
        console.out.print(f"[green]verified[/] {len(m['files'])} files against {checkpoint.MANIFEST}")
