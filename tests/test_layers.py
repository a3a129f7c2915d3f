"""The package's parts depend one way (README, How it works): ``cli`` -> ``web`` -> ``archive``; ``web`` -> ``fences``.

Read from the source (every import, at any depth of a module), so that a
shortcut across the parts fails here rather than in a review.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "archiver"

# What each part may import of the package besides itself (DESIGN.md: cli -> app -> download ->
# archive -> storage -> config).  ``logs`` and ``config`` are leaves.
ALLOWED = {
    "archive": {"config", "logs"},
    "fences": {"logs"},
    "web": {"archive", "fences", "config", "logs"},
    "logs": set(),
    "config": {"logs"},
}


def _part(module: str) -> str:
    """``archiver.web.app`` -> ``web``; ``archiver.logs`` -> ``logs``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imported(path: Path) -> set[str]:
    """The package's modules (dotted) that ``path`` imports, relative imports resolved."""
    # ``archiver.web.__init__``'s package is ``archiver.web``, as ``archiver.web.app``'s is.
    package = ".".join(path.relative_to(PACKAGE.parent).parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_bytes(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return {name for name in found if name.startswith("archiver.")}


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda path: str(path.relative_to(PACKAGE)))
def test_a_module_imports_only_the_parts_below_its_own(path: Path) -> None:
    own = _part(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts))
    if own not in ALLOWED:  # cli, index_command, asgi, __main__: the top, which may import any part
        return
    crossing = {name for name in _imported(path) if _part(name) not in {own, *ALLOWED[own]}}
    assert not crossing, f"{path.relative_to(PACKAGE)} ({own}) imports {sorted(crossing)}"


def test_the_check_sees_a_crossing() -> None:
    # The test above would pass on a parser that saw nothing: it must see a relative import upwards.
    archive = PACKAGE / "archive" / "producer.py"
    assert any(_part(name) == "archive" for name in _imported(archive))
    web = PACKAGE / "web" / "app.py"
    assert {"archive", "fences", "config"} <= {_part(name) for name in _imported(web)}


def test_the_service_does_not_load_the_producers_program() -> None:
    # The producers' program runs in the launchers (which import it, and fork each producer from
    # themselves): the service names its files only.  Imported into the service, it would cost every
    # worker its modules' memory, and a module of it could come to lean on the service's state.
    program = ("producer_program", "launcher_program", "producer_files", "producer_output")
    check = (
        "import sys, archiver.asgi, archiver.cli; "
        f"print(sorted(name for name in sys.modules if name.rsplit('.', 1)[-1] in {program!r}))"
    )
    loaded = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]"


def test_the_readme_counts_the_modules_the_producers_program_imports() -> None:
    # The producer is standard library and its own few modules (README, "Why not Info-ZIP"): helper 178
    # found the README saying "six" where the program imports eight.
    closure: set[Path] = set()
    todo = [PACKAGE / "archive" / "producer_program.py"]
    while todo:
        path = todo.pop()
        if path in closure:
            continue
        closure.add(path)
        for name in _imported(path):
            module = PACKAGE.parent.joinpath(*name.split(".")).with_suffix(".py")
            if module.exists():
                todo.append(module)
    imported = sorted(path.name for path in closure if path.name != "producer_program.py")
    words = ["no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]
    readme = (PACKAGE.parent / "README.md").read_text()
    assert f"`archiver/archive/producer_program.py` and\nthe {words[len(imported)]} small modules" in readme, imported
    assert all(f"`{name}`" in readme for name in imported), imported
