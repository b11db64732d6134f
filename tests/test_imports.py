"""The architecture's import boundaries: math without torch.distributed, distribution without models."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "kvb_dist"


def imported_modules(path: Path) -> set:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_codebook_math_does_not_import_torch_distributed():
    for name in ("codebook.py", "kmeans.py", "native/build.py", "core.py", "splitters.py", "decoders.py", "encoders.py"):
        assert not any(m.startswith("torch.distributed") for m in imported_modules(PACKAGE / name)), name


def test_the_distributed_layer_knows_no_models_or_classification():
    allowed = {"torch", "torch.distributed", "math", "dataclasses", "datetime", "typing", "warnings", "__future__"}
    assert {m for m in imported_modules(PACKAGE / "distributed" / "layout.py") if not m.startswith("torch.distributed")} <= allowed
    for path in (PACKAGE / "distributed").glob("*.py"):
        assert not any(m.startswith(("kvb_dist.run", "kvb_dist.decoders", "kvb_dist.data")) for m in imported_modules(path)), path


def test_the_top_level_exports_the_distributed_api_and_is_typed():
    import kvb_dist

    for name in ("ShardedKeyValueBottleneck", "ParallelLayout", "streaming_kmeans", "ShardStream"):
        assert name in kvb_dist.__all__ and getattr(kvb_dist, name) is not None
    assert all(hasattr(kvb_dist, name) for name in kvb_dist.__all__)
    assert (PACKAGE / "py.typed").is_file()
    assert '"kvb_dist" = ["py.typed"]' in (PACKAGE.parent / "pyproject.toml").read_text()  # shipped in the wheel


def test_the_installed_packages_are_kvb_dist_and_its_shipped_configs_only():
    tomllib = __import__("pytest").importorskip("tomllib")  # Python 3.11+
    setuptools = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]
    # Listed by hand (package discovery cannot map configs/ into kvb_dist): a new subpackage must be added.
    on_disk = {
        ".".join(path.parent.relative_to(PACKAGE.parent).parts) for path in PACKAGE.rglob("__init__.py")
    }
    assert set(setuptools["packages"]) == on_disk | {"kvb_dist.configs"}
    assert setuptools["package-dir"] == {"kvb_dist.configs": "configs"}
    assert not (PACKAGE.parent / "launch" / "__init__.py").exists()  # scripts and launcher configs, not a package
