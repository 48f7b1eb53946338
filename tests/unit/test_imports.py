"""Importing the package is cheap, and no lower layer pulls in the HTTP layer."""

from __future__ import annotations

import subprocess
import sys

import mistralrs_serve

LOWER_LAYERS = ("engine", "models", "layers", "tokenizer")


def loaded_after(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running `code`."""
    probe = f"{code}\nimport sys\nprint('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    return set(out.stdout.split())


def test_import_of_the_package_loads_no_engine_and_no_server() -> None:
    for code in ("import mistralrs_serve", "import mistralrs_serve._native"):
        heavy = {m for m in loaded_after(code) if m.split(".")[0] in ("torch", "fastapi", "pydantic")}
        assert not heavy, (code, sorted(heavy)[:5])


def test_lower_layers_never_import_the_http_layer() -> None:
    code = (
        "import importlib, pkgutil\n"
        f"for sub in {LOWER_LAYERS!r}:\n"
        "    pkg = importlib.import_module('mistralrs_serve.' + sub)\n"
        "    for m in pkgutil.iter_modules(pkg.__path__):\n"
        "        importlib.import_module(f'mistralrs_serve.{sub}.{m.name}')"
    )
    assert not {m for m in loaded_after(code) if m.startswith(("mistralrs_serve.entrypoints", "fastapi"))}


def test_public_names_resolve_on_first_use() -> None:
    for name in mistralrs_serve.__all__:
        assert getattr(mistralrs_serve, name).__name__ == name
    assert set(mistralrs_serve.__all__) <= set(dir(mistralrs_serve))
