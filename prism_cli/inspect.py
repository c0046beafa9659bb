"""`prism inspect DIR`: what a checkpoint is, where it came from, how it did."""

from __future__ import annotations

from stages.common.contract import checkpoint, console
from stages.common.contract.errors import PrismError

EXPORT_LINEAGE = "prism_lineage.json"  # what `prism export` writes beside the HF files

# Config keys worth showing first, when a stage has them.
HIGHLIGHTS = ("ckpt", "data", "algo", "teacher", "tasks", "lr", "epochs", "steps", "max_steps", "batch_size",
              "n_samples", "prompts_per_step", "rollouts_per_prompt", "max_new_tokens", "alpha", "select", "seed")


def show(path: str, verify: bool = False) -> None:
    from pathlib import Path

    if (Path(path).expanduser() / EXPORT_LINEAGE).is_file() and not (Path(path).expanduser() / checkpoint.MANIFEST).exists():
        return show_export(Path(path).expanduser(), verify)
    spec = checkpoint.resolve(path, role="checkpoint")
    if spec.kind != "prism":
        raise PrismError(f"{path} is a {spec.kind} base model, not a prism checkpoint")
    m = spec.manifest
    console.print_table(f"{path}", ["field", "value"], [
        ["stage", m["stage"]], ["created", m["created"]], ["prism", m["versions"].get("prism")],
        ["torch / transformers", f"{m['versions'].get('torch')} / {m['versions'].get('transformers')}"],
        ["files", f"{len(m['files'])} ({sum(f['size'] for f in m['files'].values()) / 1e6:.1f} MB)"],
    ])
    best = (m.get("summary") or {}).get(checkpoint.BEST_KEY)
    if best and spec.stage in checkpoint.POLICY_STAGES:
        final = m["summary"].get(f"final_{best['metric']}")
        console.print_table("weights (--ckpt takes either)", ["spec", "weights", "evaluation"], [
            [path, "model/ (the final)", f"{best['metric']} {final:.4f} at the end" if final is not None else ""],
            [f"{path}{checkpoint.VARIANT_MARK}{checkpoint.BEST_DIR}", f"{best['dir']}/model/ (the best)",
             f"{best['metric']} {best['value']:.4f} at step {best['step']}"]])
    chain = checkpoint.lineage(spec)
    console.print_table("lineage (newest first)", ["stage", "checkpoint", "role", "fingerprint ok"],
                        [[c["stage"], c["ref"], c["role"], "yes" if c["ok"] else "NO / missing"] for c in chain])
    data_rows = data_lineage(chain)
    if data_rows:
        console.print_table("data lineage (newest first)", ["stage", "checkpoint", "data source", "fingerprint",
                                                            "dropped"], data_rows)
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


def _fingerprint(value) -> str:
    if isinstance(value, str):
        return value[:16]
    if isinstance(value, dict):
        return str(value.get("fingerprint", ""))[:16] or ", ".join(sorted(value))[:40]
    return str(value)[:40]


def _dropped(summary: dict, source: str) -> str:
    entry = (summary.get("data_dropped") or {}).get(source)
    if not entry:
        return ""
    return f"{entry.get('malformed', 0)} malformed, {entry.get('filtered', 0)} filtered"


def _data_rows(stage: str, ref: str, data: dict, summary: dict) -> list[list]:
    rows = []
    for source, value in (data or {}).items():
        if source == "sources" and isinstance(value, dict):  # curate: {spec: {rows, malformed, fingerprint}}
            for spec, info in value.items():
                rows.append([stage, ref, spec, _fingerprint(info),
                             f"{info.get('malformed', 0)} malformed" if isinstance(info, dict) else ""])
        else:
            rows.append([stage, ref, source, _fingerprint(value), _dropped(summary, source)])
    return rows


def data_lineage(chain: list[dict]) -> list[list]:
    """Each checkpoint of the lineage with the data it was trained on (sources, fingerprints, drops)."""
    rows = []
    for link in chain:
        try:
            node = checkpoint.resolve(link["ref"])
        except PrismError:
            continue
        if node.kind == "prism":
            rows += _data_rows(node.stage, link["ref"], node.manifest.get("data", {}), node.manifest.get("summary", {}))
    return rows


def show_export(path, verify: bool = False) -> None:
    """An exported HF folder: where it came from (its prism_lineage.json), the data and the evals; with
    verify, every file against the sizes and sha256 the export recorded."""
    import json

    try:
        record = json.loads((path / EXPORT_LINEAGE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise PrismError(f"{path / EXPORT_LINEAGE} is not valid JSON") from None
    console.print_table("exported Hugging Face folder", ["field", "value"], [
        ["folder", str(path)], ["exported from", record.get("exported_from")], ["what", record.get("what")], ["dtype", record.get("dtype")],
        ["verification", ", ".join(f"{k} {v}" for k, v in (record.get("verification") or {}).items())]])
    lineage = record.get("lineage") or []
    console.print_table("lineage (newest first)", ["stage", "checkpoint", "created", "fingerprint ok"],
                        [[r.get("stage"), r.get("ref"), r.get("created", ""), "yes" if r.get("fingerprint_ok") else "NO"]
                         for r in lineage])
    rows = [row for r in lineage for row in _data_rows(r.get("stage", "?"), r.get("ref", "?"), r.get("data") or {},
                                                      r.get("summary") or {})]
    if rows:
        console.print_table("data lineage (newest first)", ["stage", "checkpoint", "data source", "fingerprint",
                                                            "dropped"], rows)
    for ev in record.get("eval") or []:
        console.print_table(f"eval {ev.get('dir', '')}", ["task", "value"],
                            [[k, v] for k, v in (ev.get("tasks") or {}).items()])
    if verify:
        files = record.get("files")
        if not isinstance(files, dict) or not files:
            raise PrismError(f"{path / EXPORT_LINEAGE} records no file checksums (an export by an older prism): "
                             "cannot verify it", hint="export the checkpoint again")
        problems = checkpoint.verify_files(path, {"files": files}, full=True)
        if problems:
            raise PrismError(f"{path}: {len(problems)} file(s) do not match {EXPORT_LINEAGE}: {'; '.join(problems[:5])}",
                             hint="the folder was modified or damaged after export; export it again")
        console.out.print(f"[green]verified[/] {len(files)} files against {EXPORT_LINEAGE}")
