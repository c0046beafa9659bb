"""The `prism` command line: one thin command per stage.

Each stage command is generated from the stage's Config dataclass (its fields' help text and panels
become the grouped --help), resolves the config (defaults < --config YAML < flags < --set) and calls
the stage's run(config). Stage modules are imported only when their command runs, so `prism --help`
stays fast (no torch import).
"""

from __future__ import annotations

import dataclasses
import errno
import importlib
import inspect
import os
import re
import sys
import traceback
import typing
from contextlib import contextmanager
from typing import Optional

import typer
from typer.core import TyperGroup

try:  # typer >= 0.2x vendors click; older ones use the click package
    from typer._click.exceptions import NoArgsIsHelpError
    from typer._click.exceptions import UsageError as ClickUsageError
except ImportError:  # pragma: no cover
    from click.exceptions import NoArgsIsHelpError
    from click.exceptions import UsageError as ClickUsageError

from prism_cli.inspect import show
from stages.common.contract import __version__, console
from stages.common.contract import config as cfgmod
from stages.common.contract.errors import PrismError, UsageError

# stage -> (config class, run function, one-line description)
STAGES = {
    "curate": ("stages.curate.config:CurateConfig", "stages.curate.run:run",
               "Collect teacher demonstrations (Gemini, OpenAI-compatible, local, oracle) for what the student cannot solve."),
    "sft": ("stages.sft.config:SFTConfig", "stages.sft.run:run",
            "Supervised fine-tuning on demonstrations (assistant-token loss, packing, accelerate)."),
    "align": ("stages.align.config:AlignConfig", "stages.align.run:run",
              "PRISM pre-alignment: adversarial on-policy distillation against an MoE discriminator."),
    "rl": ("stages.rl.config:RLConfig", "stages.rl.run:run",
           "Verifiable-reward RL with GRPO, DAPO or GSPO."),
    "eval": ("stages.eval.config:EvalConfig", "stages.eval.run:run",
             "Evaluate checkpoints on synth and lmms-eval benchmarks; compare runs in a table."),
    "export": ("stages.export.config:ExportConfig", "stages.export.run:run",
               "Export a checkpoint as a plain Hugging Face folder with a model card."),
}

@contextmanager
def _one_line_usage_errors():
    """A flag the parser rejects (wrong type, unknown option) is one `error:` line and exit 2, like a bad
    --set or YAML value, instead of click's multi-line usage box."""
    try:
        yield
    except NoArgsIsHelpError:
        raise
    except ClickUsageError as e:
        ctx = getattr(e, "ctx", None)
        console.error_line(e.format_message().replace("\n", " "),
                           f"see `{ctx.command_path} --help`" if ctx is not None else None)
        raise typer.Exit(2) from None


class _PrismGroup(TyperGroup):
    def make_context(self, info_name, args, parent=None, **extra):
        with _one_line_usage_errors():
            return super().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx):
        with _one_line_usage_errors():
            return super().invoke(ctx)


app = typer.Typer(name="prism", cls=_PrismGroup, add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="PRISM post-training for vision-language models: curate -> sft -> align -> rl -> eval -> export.")


def _import(path: str):
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def _version_callback(value: bool):
    if value:
        console.out.print(f"prism {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Optional[bool] = typer.Option(None, "--version", callback=_version_callback, is_eager=True,
                                                 help="Show the version and exit.")):
    pass


def report_errors(fn, debug: bool):
    """Run fn; a PrismError becomes one line and its exit code, a bug one line (traceback under --debug)."""
    try:
        return fn()
    except PrismError as e:
        if debug:
            traceback.print_exc()
        console.error_line(e.message, e.hint)
        raise typer.Exit(e.exit_code)
    except OSError as e:
        if e.errno not in _WRITE_ERRNOS:
            raise_internal(e, debug)
        if debug:
            traceback.print_exc()
        where = f" {e.filename}" if e.filename else " the output"
        console.error_line(f"cannot write{where} (--out): {e.strerror}", "free space or fix permissions, then "
                                                                         "re-run with --resume")
        raise typer.Exit(1)
    except KeyboardInterrupt:
        console.error_line("interrupted", "re-run with --resume to continue")
        raise typer.Exit(130)
    except (typer.Exit, SystemExit):
        raise
    except Exception as e:  # a bug, not a user error: say so, keep it to one line unless --debug
        if "No space left on device" in str(e):  # libraries (safetensors) wrap ENOSPC in their own types
            console.error_line("cannot write the output (--out): no space left on device",
                               "free space, then re-run with --resume")
            raise typer.Exit(1)
        raise_internal(e, debug)


_WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT, errno.EPERM}


def raise_internal(e: BaseException, debug: bool):
    if debug:
        traceback.print_exc()
    first = str(e).splitlines()[0] if str(e) else ""
    console.error_line(f"internal error: {type(e).__name__}: {first}",
                       None if debug else "run with --debug for the traceback")
    raise typer.Exit(1)


def _cli_type(tp):
    """The type typer should parse a field as (always optional: None means 'not given')."""
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType")) and len(args) == 1:
        tp = args[0]
        origin = typing.get_origin(tp)
    if origin in (list, tuple):
        return Optional[list[str]]
    if tp in (int, float, str, bool):
        return Optional[tp]
    return Optional[str]


def _no_emoji(text: str) -> str:
    """Rich renders ':word:' as an emoji (synth:train:2000 -> a train); a zero-width space prevents it."""
    return re.sub(r":(?=[\w+-]+:)", ":\u200b", text)


NEGATED = "__no"  # the parameter of a --no-X switch: field X set to False


def check_switch_pairs(given: dict, negated: list[str], flags_of: dict) -> None:
    """--x with --no-x: the later one winning silently would run what half the command line did not ask for."""
    for name in negated:
        field_name = name[:-len(NEGATED)]
        if given.get(name) and given.get(field_name):
            flag = flags_of[field_name]
            raise UsageError(f"{flag} and {flag.replace('--', '--no-', 1)} contradict each other",
                             hint="give one of them")


def _make_stage_command(stage: str, config_path: str, run_path: str, description: str):
    config_cls = _import(config_path)  # every stage is built: failing to import one is a bug, not "not built"
    hints = typing.get_type_hints(config_cls)
    params = [
        inspect.Parameter("config_file", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
                          default=typer.Option(None, "--config", help="YAML file of config values.",
                                               rich_help_panel="Config")),
        inspect.Parameter("sets", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[list[str]],
                          default=typer.Option(None, "--set", help="Override any config field: key=value (repeatable).",
                                               rich_help_panel="Config")),
        inspect.Parameter("debug", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                          default=typer.Option(False, "--debug", help="Show tracebacks.", rich_help_panel="Config")),
    ]
    cli_fields, negated, flags_of = [], [], {}
    for f in dataclasses.fields(config_cls):
        meta = f.metadata or {}
        if not meta.get("cli", True):
            continue
        flag = flags_of[f.name] = meta.get("flag") or "--" + f.name.replace("_", "-")
        default_text = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        tp = _cli_type(hints[f.name])
        # A switch is offered in the forms that change its default (--freeze-vision; --no-verify; both for one
        # another option decides), each its own option: a --x/--no-x pair takes two name columns in --help,
        # which cut long names at 80 columns (a log's width). --no-x is parameter x__no, turned into x=False.
        help_text = _no_emoji(f"{meta.get('help', '')} [dim](default: {default_text!r})[/]")
        panel = meta.get("group", "Options")
        if tp is not Optional[bool] or default_text is not True:
            params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=tp, default=typer.Option(
                None, flag, help=help_text, rich_help_panel=panel, show_default=False)))
        if tp is Optional[bool] and default_text is not False:   # on by default, or decided by other options
            negated.append(f.name + NEGATED)
            params.append(inspect.Parameter(f.name + NEGATED, inspect.Parameter.KEYWORD_ONLY, annotation=tp,
                                            default=typer.Option(None, flag.replace("--", "--no-", 1),
                                                                 help=help_text if default_text is True else "",
                                                                 rich_help_panel=panel, show_default=False)))
        cli_fields.append(f.name)

    def command(**kwargs):
        debug = kwargs.pop("debug")
        config_file = kwargs.pop("config_file")
        sets = kwargs.pop("sets")
        flags = {k: v for k, v in kwargs.items() if v is not None and k not in negated}
        flags.update({k[:-len(NEGATED)]: False for k in negated if kwargs.get(k)})

        def go():
            check_switch_pairs(kwargs, negated, flags_of)
            cfg = cfgmod.resolve(config_cls, config_file=config_file, flags=flags, sets=sets)
            run = _import(run_path)
            result = run(cfg)
            if result is not None and console.is_main_process():
                console.out.print(str(result))

        report_errors(go, debug)

    command.__signature__ = inspect.Signature(params)
    command.__doc__ = description
    command.__name__ = stage
    app.command(stage, help=description)(command)


for _stage, (_cfg, _run, _desc) in STAGES.items():
    _make_stage_command(_stage, _cfg, _run, _desc)


@app.command("inspect", help="Show a checkpoint's stage, lineage, config highlights and metrics.")
def inspect_cmd(path: str = typer.Argument(..., help="checkpoint directory"),
                verify: bool = typer.Option(False, "--verify", help="re-hash every file against the manifest"),
                debug: bool = typer.Option(False, "--debug", help="Show tracebacks.")):
    report_errors(lambda: show(path, verify=verify), debug)


def main():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # prism draws its own progress bars; transformers' per-load bars would interleave with one-line errors
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_PROGRESS_BAR", "1")
    try:
        app(standalone_mode=True)
    except SystemExit as e:
        sys.exit(e.code)


if __name__ == "__main__":
    main()
