"""The floors of the package (docs/architecture.md), read from the code's own imports: the library never imports
the commands, the pipeline or the CLI; the commands never import the pipeline that runs them; feedback/ and eval/
stand side by side on llm_api/; io/ and llm_api/ stand on nothing of tuna-jax but each other's floor."""
import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "tuna_jax"


def _imports() -> dict[str, set[str]]:
    """module path (``feedback/judge.py``) -> the tuna_jax modules it imports, anywhere in the file."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tuna_jax"):
                names.add(node.module)
                names.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names if a.name.startswith("tuna_jax"))
        out[str(path.relative_to(PACKAGE))] = names
    return out


IMPORTS = _imports()


def _offenders(modules, forbidden) -> dict:
    return {m: sorted(i for i in IMPORTS[m] if any(i == f or i.startswith(f + ".") for f in forbidden))
            for m in modules if any(i == f or i.startswith(f + ".") for i in IMPORTS[m] for f in forbidden)}


def _under(*folders) -> list[str]:
    return [m for m in IMPORTS if m.split("/")[0] in folders]


LIBRARY = [m for m in IMPORTS if m.split("/")[0] not in ("commands", "pipeline") and m != "cli.py"]


@pytest.mark.parametrize("modules,forbidden", [
    (LIBRARY, ["tuna_jax.commands", "tuna_jax.pipeline", "tuna_jax.cli"]),
    (_under("commands"), ["tuna_jax.pipeline", "tuna_jax.cli"]),
    (_under("pipeline"), ["tuna_jax.cli"]),
    (_under("feedback"), ["tuna_jax.eval"]),
    (_under("eval"), ["tuna_jax.feedback"]),
], ids=["library", "commands", "pipeline", "feedback", "eval"])
def test_no_import_runs_up_a_floor(modules, forbidden):
    assert modules and not _offenders(modules, forbidden)


def test_io_and_llm_api_stand_on_the_ground():
    allowed = ("tuna_jax.io", "tuna_jax.llm_api")
    for m in _under("io", "llm_api"):
        assert all(i.startswith(allowed) for i in IMPORTS[m]), (m, IMPORTS[m])
