"""The shape of the code (docs/design.md, "Layout"), read from the source with ast, nothing imported:

- the CLI is the roof: prism_cli dispatches to the stages through one table, and nothing under stages/ imports it;
- no stage imports another stage, and stages/common imports no stage (what two stages share lives in common);
- stages/common is built in floors (FLOORS, lowest first): a floor imports only itself and the floors below it,
  and every module of common sits on a named floor;
- product code (prism_cli, stages) imports neither tests/ nor benchmarks/, and benchmarks/ import no tests (only the
  local fakes of tests/fakes);
- no import circles, in the product, the benchmarks or the tests;
- a dynamic import names what it loads: `importlib.import_module`/`__import__` take a literal, and a string such as
  "stages.sft.run:run" in the source counts as an edge to the module it names (the CLI's dispatch table);
- the CLI starts without importing torch (it imports every stage's config), and loading a real checkpoint does not
  load the tiny world's factories;
- no product or benchmark function longer than 60 lines unless its docstring gives a reason ("Long because" and at
  least eight words), and none over 120 lines whatever the reason.

Imports inside functions count like module-level ones: a lazy import hides an edge, it does not remove it.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("prism_cli", "stages", "benchmarks", "tests")
PRODUCT = ("prism_cli", "stages")
MAX_FUNCTION_LINES = 60
MAX_WITH_REASON = 120
LONG_REASON = "Long because"
MIN_REASON_WORDS = 8
# The floors of stages/common, lowest first, each with its purpose (the package's docstring says it at length).
FLOORS = {
    "contract": "checkpoint directories, configs, the sample schema, errors, console, trackers, plots, variant tables",
    "world": "the embedded tiny world: tiny model factories, their vocabulary, the synth benchmark and its oracle",
    "protocol": "the <caption><think><answer> response protocol",
    "rewards": "verifiable rewards (the reward table, answer matching)",
    "rollout": "the rollout engines (hf, vllm) and prompt building",
    "data": "training data in: dataset formats, chat rendering of a sample",
    "models": "models from any checkpoint spec: policy, processor, discriminator, shapes, the seeing base",
    "training": "the training runtime: backends, optimiser, save/resume, collectives, groups over ranks",
    "policy_update": "the policy-update maths: log-probabilities, advantages, losses, the PPO step",
    "evaluation": "held-out evaluation: the synth scorer prism eval uses, evaluation during training, the best kept",
    "plan": "the memory model of a run and the --dry-run report",
}
# Edges that go up a floor, each lazy and with its reason.
FLOOR_EXCEPTIONS = {
    ("stages.common.contract.checkpoint", "stages.common.world.tiny"):
        "a tiny spec names its cache path and fingerprint; imported only when a spec is tiny",
}
# Modules whose dynamic imports load what the user names (their own code), not the project's.
DYNAMIC_OK = {
    "prism_cli.app": "loads the stage its dispatch table (STAGES) names; the graph reads the table's strings",
    "benchmarks.device.check": "checks which optional packages the device machine has",
    "stages.common.rewards.table": "imports the user's own verifier named by --reward module:function",
}
# What benchmarks may take from tests/: the local fakes that speak a real service's protocol.
SHARED_FAKES = "tests.fakes"
TINY_FACTORIES = ("stages.common.world.tiny", "stages.common.world.qwen_vocab", "stages.common.models.seeing_base")


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources(root: Path = ROOT, packages=PACKAGES) -> dict[str, Path]:
    return {_module_name(p, root): p for pkg in packages if (root / pkg).is_dir()
            for p in sorted((root / pkg).rglob("*.py")) if "__pycache__" not in p.parts}


def _imported(module: str, is_package: bool, node: ast.AST, known: set[str]) -> set[str]:
    """The project modules one import statement loads (`from pkg import sub` loads pkg.sub)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            here = module.split(".") if is_package else module.split(".")[:-1]
            here = here[:len(here) - (node.level - 1)]
            base = ".".join(here + ([node.module] if node.module else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    return {m for m in map(lambda n: _known_prefix(n, known), names) if m}


def _known_prefix(name: str, known: set[str]) -> str | None:
    while name and name not in known:  # `import a.b.c` of a name inside a module
        name = name.rpartition(".")[0]
    return name or None


MODULE_STRING = re.compile(r"^(?:prism_cli|stages|benchmarks|tests)(?:\.\w+)+(?::\w+)?$")


def _is_dynamic_import(node: ast.AST) -> bool:
    if not isinstance(node, ast.Call):
        return False
    f = node.func
    return (isinstance(f, ast.Attribute) and f.attr == "import_module") or (isinstance(f, ast.Name) and
                                                                           f.id in ("__import__", "import_module"))


def import_graph(sources: dict[str, Path] | None = None) -> dict[str, set[str]]:
    """module -> the project modules it imports: import statements (lazy ones too), dynamic imports of a literal,
    and strings that name a module ("stages.sft.run:run", the CLI's dispatch table)."""
    sources = sources or _sources()
    known = set(sources)
    graph = {}
    for module, path in sources.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges |= _imported(module, path.name == "__init__.py", node, known)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and MODULE_STRING.match(node.value):
                target = _known_prefix(node.value.partition(":")[0], known)
                if target and target.count(".") >= 1:
                    edges.add(target)
        graph[module] = edges - {module}
    return graph


def unresolved_imports(sources: dict[str, Path] | None = None) -> list[str]:
    """Imports of a project module that does not exist (a stale path after a move, a relative import that climbs
    to the wrong package): Python finds them only when the line runs, which for a lazy import may be never in CI."""
    sources = sources or _sources()
    known = set(sources)
    bad = []
    for module, path in sources.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    here = module.split(".") if is_package else module.split(".")[:-1]
                    here = here[:len(here) - (node.level - 1)]
                    base = ".".join(here + ([node.module] if node.module else []))
                targets = [base]
            else:
                continue
            for name in targets:
                if name.split(".")[0] in PACKAGES and name not in known:
                    bad.append(f"{module}:{node.lineno} imports {name}")
    return bad


def blind_dynamic_imports(sources: dict[str, Path] | None = None) -> list[str]:
    """Dynamic imports whose target the source does not name (a variable, an f-string): invisible to the graph."""
    bad = []
    for module, path in (sources or _sources()).items():
        if module in DYNAMIC_OK or module.split(".")[0] == "tests":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if _is_dynamic_import(node):
                arg = node.args[0] if node.args else None
                if not (isinstance(arg, ast.Constant) and isinstance(arg.value, str)):
                    bad.append(f"{module}:{node.lineno}")
    return bad


def _ancestors(module: str) -> set[str]:
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def load_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """What importing really runs: loading a.b.c first runs the packages a and a.b (their __init__), so an
    import of a submodule is also an edge to each of its packages the importer is not already inside."""
    return {module: targets | {a for t in targets for a in _ancestors(t) if a in graph} - _ancestors(module)
            - {module} for module, targets in graph.items()}


def stage_of(module: str) -> str | None:
    """"rl" for stages.rl.run, "common" for stages.common.x, None outside stages/."""
    parts = module.split(".")
    return parts[1] if parts[0] == "stages" and len(parts) > 1 else None


def floor_of(module: str) -> str | None:
    """"training" for stages.common.training.runtime, "protocol" for stages.common.protocol; None outside common
    (and for the package stages.common itself)."""
    parts = module.split(".")
    return parts[2] if parts[:2] == ["stages", "common"] and len(parts) > 2 else None


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    order = list(FLOORS)
    bad = []
    for module, targets in graph.items():
        top, here = module.split(".")[0], stage_of(module)
        floor = floor_of(module)
        if floor is not None and floor not in FLOORS:
            bad.append(f"{module} (on no floor of stages/common: add it to one)")
        for target in sorted(targets):
            ttop, there, tfloor = target.split(".")[0], stage_of(target), floor_of(target)
            if top in PRODUCT and ttop in ("tests", "benchmarks"):
                bad.append(f"{module} -> {target} (product code imports no {ttop})")
            elif top == "benchmarks" and ttop == "tests" and not target.startswith(SHARED_FAKES):
                bad.append(f"{module} -> {target} (benchmarks import no tests)")
            elif top == "stages" and ttop == "prism_cli":
                bad.append(f"{module} -> {target} (the CLI is the roof: stages import no prism_cli)")
            elif top != "stages" or there is None or there == here and here != "common":
                continue
            elif here == "common" and there != "common":
                bad.append(f"{module} -> {target} (common imports no stage)")
            elif here not in (None, "common") and there != "common":
                bad.append(f"{module} -> {target} (a stage imports only itself and common)")
            elif (here == "common" and floor in FLOORS and tfloor in FLOORS
                  and order.index(tfloor) > order.index(floor) and (module, target) not in FLOOR_EXCEPTIONS):
                bad.append(f"{module} -> {target} (the {floor} floor imports only floors below it)")
    return sorted(bad)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _reason(docstring: str) -> str:
    at = docstring.find(LONG_REASON)
    return docstring[at + len(LONG_REASON):] if at >= 0 else ""


def long_functions(sources: dict[str, Path] | None = None, root: Path = ROOT) -> list[tuple[str, str, int]]:
    """Product and benchmark functions over the limit without a reason of MIN_REASON_WORDS words, or over the cap."""
    out = []
    for module, path in (sources or _sources(root)).items():
        if module.split(".")[0] == "tests":  # a test reads as one scenario; its fixtures may be long
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                reasoned = len(_reason(ast.get_docstring(node) or "").split()) >= MIN_REASON_WORDS
                if length > MAX_WITH_REASON or (length > MAX_FUNCTION_LINES and not reasoned):
                    out.append((path.relative_to(root).as_posix(), node.name, length))
    return out


# ------------------------------------------------------------------------------------------- the tree

def test_the_layers_and_floors_hold():
    assert layering_violations(import_graph()) == []


def test_no_import_circles():
    assert cycles(load_graph(import_graph())) == []


def test_no_long_function_without_a_reason():
    assert long_functions() == []


def test_every_project_import_resolves():
    assert unresolved_imports() == []


def test_every_dynamic_import_names_its_target():
    assert blind_dynamic_imports() == []


def test_every_floor_exists_and_says_what_it_holds():
    common = ROOT / "stages" / "common"
    rooms = {p.stem if p.suffix == ".py" else p.name for p in common.iterdir()
             if (p.suffix == ".py" and p.name != "__init__.py") or (p.is_dir() and (p / "__init__.py").exists())}
    assert rooms == set(FLOORS)
    for room in FLOORS:
        init = common / room / "__init__.py" if (common / room).is_dir() else common / f"{room}.py"
        assert ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))), f"{init} has no one-line purpose"


def test_the_cli_dispatches_to_every_stage_through_its_table():
    """The dispatch table's strings are edges of the graph: prism_cli.app reaches each stage's config and run."""
    edges = import_graph()["prism_cli.app"]
    for stage in ("curate", "sft", "align", "rl", "eval", "export"):
        assert {f"stages.{stage}.config", f"stages.{stage}.run"} <= edges, stage


def test_the_cli_starts_without_torch():
    """prism_cli.app imports every stage's config to build its options: configs and the tables they read
    (algorithms, task names) stay free of torch, so `prism --help` and option errors answer at once."""
    code = "import sys, prism_cli.app; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_loading_a_real_checkpoint_does_not_load_the_tiny_world(tmp_path):
    """A plain Hugging Face folder (here: the tiny model saved as one) loads without the tiny factories, the seeing
    base builder or the Qwen vocabulary reader: every stage pays for them only when a spec is tiny."""
    from stages.common.models.loading import as_spec
    from transformers import AutoModelForImageTextToText
    AutoModelForImageTextToText.from_pretrained(as_spec("tiny").model_path).save_pretrained(tmp_path / "hf")
    code = ("import sys, stages.sft.run, stages.align.run, stages.rl.run, stages.eval.run, stages.export.run\n"
            "from stages.common.models.loading import load_policy\n"
            f"load_policy({str(tmp_path / 'hf')!r})\n"
            f"print(sorted(m for m in {TINY_FACTORIES!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr[-2000:]


def test_tiny_stays_a_leaf():
    """stages.common.contract.checkpoint may import stages.common.world.tiny (FLOOR_EXCEPTIONS) only because tiny
    reaches nothing of the project but its vocabulary reader, its recipe and the error types."""
    graph = import_graph()
    reached, todo = set(), ["stages.common.world.tiny"]
    while todo:
        for dep in graph.get(todo.pop(), set()):
            if dep not in reached:
                reached.add(dep)
                todo.append(dep)
    assert reached <= {"stages.common.world.qwen_vocab", "stages.common.world.seeing_recipe",
                       "stages.common.contract", "stages.common.contract.errors"}, reached


# ------------------------------------------------------------------------------------------- the checks

def test_the_checks_catch_what_they_are_for(tmp_path):
    files = {
        "stages/__init__.py": "",
        "stages/rl/__init__.py": "",
        "stages/rl/run.py": "def f():\n    from stages.align import scoring\n",   # lazy stage -> stage
        "stages/align/__init__.py": "",
        "stages/align/scoring.py": "from ..rl import run\n",                     # relative, and a circle
        "stages/align/stale.py": "from stages.common.gone import x\ndef f():\n    from .nowhere import y\n",  # moved away
        "stages/sft/__init__.py": "",
        "stages/sft/run.py": "import importlib\nTABLE = 'stages.rl.run:f'\n"   # a string edge (stage -> stage)
                             "def g(name):\n    return importlib.import_module(name)\n",  # a blind dynamic import
        "stages/common/__init__.py": "",
        "stages/common/policy_update/__init__.py": '"""the maths"""\n',
        "stages/common/policy_update/ppo.py": "from stages.rl.run import f\n",     # common -> stage
        "stages/common/contract/__init__.py": "",
        "stages/common/contract/errors.py": "from prism_cli import app\n",        # a stage floor imports the roof
        "stages/common/contract/console.py": "from stages.common.policy_update import ppo\n",  # down -> up a floor
        "stages/common/drawer.py": "",                                            # on no floor
        "prism_cli/__init__.py": "",
        "prism_cli/app.py": "import tests.helpers\n",                            # product -> tests
        "tests/__init__.py": "",
        "tests/helpers.py": "",
        "benchmarks/__init__.py": "",
        "benchmarks/b.py": "from tests import helpers\n",                        # benchmark -> tests
        "stages/common/long.py": "def g():\n" + "    x = 1\n" * 61,
        "stages/common/terse.py": 'def h():\n    """Long because."""\n' + "    x = 1\n" * 61,
        "stages/common/ok.py": 'def h():\n    """Long because it is one table read in order, one row a case."""\n'
                               + "    x = 1\n" * 61,
        "stages/common/huge.py": 'def h():\n    """Long because it is one table read in order, one row a case."""\n'
                                 + "    x = 1\n" * 121,
        "stages/common/rollout/__init__.py": "from stages.common.rollout.hf import Engine\n",
        "stages/common/rollout/base.py": "",
        "stages/common/rollout/hf.py": "from stages.common.policy_update.logprobs import mask\n",
        "stages/common/policy_update/logprobs.py": "from stages.common.rollout.base import Prompt\n",  # runs rollout/__init__
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    sources = _sources(tmp_path)
    graph = import_graph(sources)
    assert layering_violations(graph) == [
        "benchmarks.b -> tests.helpers (benchmarks import no tests)",
        "prism_cli.app -> tests.helpers (product code imports no tests)",
        "stages.align.scoring -> stages.rl.run (a stage imports only itself and common)",
        "stages.common.contract.console -> stages.common.policy_update.ppo (the contract floor imports only floors "
        "below it)",
        "stages.common.contract.errors -> prism_cli.app (the CLI is the roof: stages import no prism_cli)",
        "stages.common.drawer (on no floor of stages/common: add it to one)",
        "stages.common.huge (on no floor of stages/common: add it to one)",
        "stages.common.long (on no floor of stages/common: add it to one)",
        "stages.common.ok (on no floor of stages/common: add it to one)",
        "stages.common.policy_update.ppo -> stages.rl.run (common imports no stage)",
        "stages.common.rollout.hf -> stages.common.policy_update.logprobs (the rollout floor imports only floors "
        "below it)",
        "stages.common.terse (on no floor of stages/common: add it to one)",
        "stages.rl.run -> stages.align.scoring (a stage imports only itself and common)",
        "stages.sft.run -> stages.rl.run (a stage imports only itself and common)",
    ]
    assert blind_dynamic_imports(sources) == ["stages.sft.run:4"]
    assert unresolved_imports(sources) == ["stages.align.stale:1 imports stages.common.gone",
                                           "stages.align.stale:3 imports stages.align.nowhere"]
    assert ["stages.align.scoring", "stages.rl.run"] in cycles(graph)
    init_cycle = ["stages.common.policy_update.logprobs", "stages.common.rollout", "stages.common.rollout.hf"]
    assert init_cycle in cycles(load_graph(graph)) and init_cycle not in cycles(graph)
    assert sorted((p, n) for p, n, _ in long_functions(sources, tmp_path)) == [
        ("stages/common/huge.py", "h"), ("stages/common/long.py", "g"), ("stages/common/terse.py", "h")]
