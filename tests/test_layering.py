"""The house rules import-linter cannot see (the contracts themselves are in pyproject.toml).

- `gptcli.cli` imports no heavy library at import time: tab completion re-runs the program on every
  keypress and `gptcli --help` must be instant. import-linter reads the lazy imports inside functions
  too, so this is checked by importing every cli module in a fresh interpreter.
- Module sizes: no module under src/ over 400 lines, no command module over 200.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gptcli

SRC = Path(gptcli.__file__).resolve().parent
MODULE_LIMIT = 400
COMMAND_LIMIT = 200
# Modules over the limit today, each with the size it may not grow past. Remove an entry when its module is split.
OVERSIZE_CEILINGS: dict[str, int] = {}
# Libraries the command line loads only inside the command that needs them.
HEAVY = (
    "torch",
    "onnxruntime",
    "onnx",
    "transformers",
    "tokenizers",
    "safetensors",
    "numpy",
    "gguf",
    "accelerate",
    "matplotlib",
    "fastapi",
    "uvicorn",
)

IMPORT_EVERY_CLI_MODULE = """
import importlib, json, pkgutil, sys
import gptcli.cli
import gptcli.cli.app
for info in pkgutil.iter_modules(gptcli.cli.__path__):
    importlib.import_module("gptcli.cli." + info.name)
print(json.dumps({"modules": sorted(sys.modules), "file": gptcli.cli.__file__}))
"""


def line_count(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


def source_modules() -> dict[str, int]:
    """Every module under src/gptcli, by its path relative to the package, with its line count."""
    return {path.relative_to(SRC).as_posix(): line_count(path) for path in sorted(SRC.rglob("*.py"))}


def test_cli_modules_import_no_heavy_library() -> None:
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_EVERY_CLI_MODULE], capture_output=True, text=True, check=True, timeout=120
    )
    loaded = json.loads(result.stdout)
    assert Path(loaded["file"]).resolve().parent == SRC / "cli"  # the sources under test, not another checkout
    cli_modules = {f"gptcli.cli.{path.stem}" for path in (SRC / "cli").glob("*.py") if path.stem != "__init__"}
    assert cli_modules - set(loaded["modules"]) == set()
    heavy = sorted({name.split(".")[0] for name in loaded["modules"]} & set(HEAVY))
    assert heavy == [], f"importing gptcli.cli loads {heavy}: import them inside the command that needs them"


def test_no_module_over_the_size_limit() -> None:
    sizes = source_modules()
    over = {path: n for path, n in sizes.items() if n > OVERSIZE_CEILINGS.get(path, MODULE_LIMIT)}
    assert over == {}, f"over {MODULE_LIMIT} lines (or past their recorded ceiling): split them"


def test_oversize_ceilings_name_modules_that_are_still_oversize() -> None:
    sizes = source_modules()
    stale = {path: sizes.get(path) for path in OVERSIZE_CEILINGS if sizes.get(path, 0) <= MODULE_LIMIT}
    assert stale == {}, "these modules are back under the limit (or gone): remove them from OVERSIZE_CEILINGS"


def test_no_command_module_over_200_lines() -> None:
    commands = [*sorted((SRC / "cli").glob("*_cmd.py")), SRC / "cli" / "generate.py"]
    assert len(commands) >= 10
    over = {path.name: line_count(path) for path in commands if line_count(path) > COMMAND_LIMIT}
    assert over == {}, f"command modules over {COMMAND_LIMIT} lines: move the work into the feature or cli.common"
