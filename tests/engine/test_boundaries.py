"""engine/ must work with indexer/ and trainer/ deleted (DESIGN.md): it never imports them."""

import ast
from pathlib import Path

ENGINE = Path(__file__).parents[2] / "engine"


def test_engine_imports_neither_indexer_nor_trainer():
    offenders = []
    for path in ENGINE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [
                f"{path.name}: {n}" for n in names if n.split(".")[0] in ("indexer", "trainer")
            ]
    assert offenders == []
