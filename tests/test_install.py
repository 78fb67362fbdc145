"""`make setup`'s installer (tools/uv_install.py) hands pip's configuration to uv: the same package sources, the
PIP_* variables winning over the files as they do for pip."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_installer():
    spec = importlib.util.spec_from_file_location("uv_install", ROOT / "tools" / "uv_install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pip_sources_become_uv_options(tmp_path, monkeypatch):
    config = tmp_path / "pip.conf"
    config.write_text(
        "[global]\nfind-links = /from/file\nextra-index-url = file:///a/simple file:///b/simple\n"
        "constraint = /c/constraints.txt\n[install]\ntrusted-host = mirror.example\n"
    )
    for name in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_INDEX_URL", "PIP_CONSTRAINT", "PIP_NO_INDEX"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PIP_CONFIG_FILE", str(config))
    monkeypatch.setenv("PIP_INDEX_URL", "https://mirror.example/simple")
    installer = load_installer()
    options = installer.uv_options(installer.pip_settings())
    pairs = list(zip(options[::2], options[1::2]))
    assert pairs[0] == ("--index-strategy", "unsafe-best-match")  # pip's choice: the best version anywhere
    assert ("--default-index", "https://mirror.example/simple") in pairs
    assert ("--extra-index-url", "file:///a/simple") in pairs
    assert ("--extra-index-url", "file:///b/simple") in pairs
    assert ("--constraints", "/c/constraints.txt") in pairs
    assert ("--allow-insecure-host", "mirror.example") in pairs
    assert ("--find-links", "/from/file") in pairs
    monkeypatch.setenv("PIP_FIND_LINKS", "/from/env")  # a variable beats the file, as for pip
    options = installer.uv_options(installer.pip_settings())
    assert "/from/env" in options and "/from/file" not in options
