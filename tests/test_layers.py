"""The package's shape: imports point one way, down the stages, and `pip install` installs `k4trt` alone.

Every module's imports are read with `ast` (lazy imports inside functions and type-only imports included,
since both couple the modules as much as a top-level import does) and checked against the stage order. A
stage may import its own modules and any stage below it; an upward or sideways import fails the test.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "k4trt"

#: lowest first; each entry is one stage (several names: one stage whose members may import each other)
STAGES: list[tuple[str, ...]] = [
    ("errors",),
    ("config", "fsutil"),  # the released model's facts; generic file utilities
    ("models",),  # the PyTorch modules and their configs
    ("weights",),  # weights folders: layout, loading, make-tiny, verify (they build models to check shapes)
    ("core",),  # what every backend shares: sampler, VAE chunk schedule, executor, graph registry, manifest
    ("parallel",),  # sequence parallelism over torch.distributed
    ("export",),  # PyTorch -> ONNX
    ("engine",),  # ONNX -> TensorRT
    ("runtime",),  # prompt -> video over an executor
    ("bench",),  # the benchmark harness
    ("serve",),  # the HTTP service
    ("cli", "__init__", "__main__"),  # commands, and the package's own entry points
]
RANK = {name: rank for rank, names in enumerate(STAGES) for name in names}


def _stage(module: str) -> str:
    """`k4trt.core.graphs` -> `core`; `k4trt` itself, or a name it defines (`k4trt.__version__`) -> `__init__`."""
    parts = module.split(".")
    if len(parts) == 1 or not ((PACKAGE / parts[1]).is_dir() or (PACKAGE / f"{parts[1]}.py").is_file()):
        return "__init__"
    return parts[1]


def _imports(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, k4trt module) for every import of this package in the file, relative ones resolved."""
    module = ".".join(path.relative_to(root).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # `from k4trt import config` imports k4trt.config; `from k4trt.core import graphs` imports k4trt.core
            found += [(node.lineno, f"{base}.{a.name}") for a in node.names] if base == "k4trt" else [(node.lineno, base)]
    return [(line, name) for line, name in found if name == "k4trt" or name.startswith("k4trt.")]


def test_every_module_belongs_to_a_stage():
    stages = {_stage(".".join(p.relative_to(ROOT).with_suffix("").parts)) for p in PACKAGE.rglob("*.py")}
    assert stages <= set(RANK), f"modules in no stage of the order: {sorted(stages - set(RANK))}"


def test_imports_point_only_down():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = _stage(".".join(path.relative_to(ROOT).with_suffix("").parts))
        for line, imported in _imports(path):
            there = _stage(imported)  # a bare `import k4trt` is the package's facade, the top stage
            same = RANK[there] == RANK[here] and (there == here or len(STAGES[RANK[here]]) > 1)
            if RANK[there] > RANK[here] or (RANK[there] == RANK[here] and not same):
                upward.append(f"{path.relative_to(ROOT)}:{line} ({here}) imports {imported} ({there})")
    assert not upward, "imports against the stage order:\n" + "\n".join(upward)


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    """The rule above is only as good as the parser: a lazy import inside a function is an import."""
    path = tmp_path / "k4trt" / "core" / "probe.py"
    path.parent.mkdir(parents=True)
    path.write_text("def f():\n    from k4trt.runtime.pipeline import Pipeline\n    from ..cli import main\n")
    assert [name for _, name in _imports(path, tmp_path)] == ["k4trt.runtime.pipeline", "k4trt.cli"]


def test_the_wheel_installs_the_k4trt_package_alone(tmp_path):
    """Built from the checkout with the installed setuptools (no network): its only top-level name is k4trt."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
                    str(ROOT)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("k4trt-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        top_level = next(n for n in archive.namelist() if n.endswith(".dist-info/top_level.txt"))
        assert archive.read(top_level).decode().split() == ["k4trt"]
        assert {n.split("/")[0] for n in archive.namelist() if not n.split("/")[0].endswith(".dist-info")} == {"k4trt"}
