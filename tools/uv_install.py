"""`python tools/uv_install.py PIP_INSTALL_ARGS...`: `pip install` into this Python's environment, done by uv.

`make setup` installs with uv: it downloads and installs in parallel, so a cold install takes a fraction of pip's
time. uv does not read pip's configuration (pip.conf, PIP_* variables), so a machine whose pip is set up with a
mirror, local wheel folders, constraints or a CA bundle would have uv resolve against plain PyPI instead, and could
get other builds (a CUDA torch instead of the CPU wheel a wheel folder holds). This hands pip's settings to uv and
asks it to pick the best version across all sources as pip does (`unsafe-best-match`), so both resolve the same
versions. Unlike pip it does not byte-compile all of site-packages (a minute of CPU, mostly for modules that never
run): Python writes the bytecode of what it imports, once (the Makefile lets it, see PYTHONDONTWRITEBYTECODE there).

Standard library only: it runs with the venv's python before anything but pip is in it (it installs uv itself).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

UV_SPEC = "uv>=0.8,<1"
# pip setting → uv option; a setting may hold several space-separated values, each becomes one option.
OPTIONS = {
    "index-url": "--default-index",
    "extra-index-url": "--extra-index-url",
    "find-links": "--find-links",
    "constraint": "--constraints",
    "trusted-host": "--allow-insecure-host",
}


# Sections of `pip config list` that `pip install` reads, in pip's order of precedence: the files' [global], their
# [install], then the PIP_* variables.
SECTIONS = ("global", "install", ":env:")


def pip_settings() -> dict[str, str]:
    """pip's effective settings, from `pip config list` (lines such as `global.find-links='/opt/wheels'` and
    `:env:.find-links='/opt/wheels'`)."""
    listing = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True
    ).stdout
    found: dict[str, dict[str, str]] = {section: {} for section in SECTIONS}
    for line in listing.splitlines():
        key, sep, value = line.partition("=")
        section, _, name = key.rpartition(".")
        if sep and section in found:
            found[section][name] = ast.literal_eval(value)
    return {name: value for section in SECTIONS for name, value in found[section].items()}


def uv_options(settings: dict[str, str]) -> list[str]:
    options = ["--index-strategy", "unsafe-best-match"]
    for name, option in OPTIONS.items():
        for value in settings.get(name, "").split():
            options += [option, value]
    if settings.get("no-index", "").lower() in ("1", "true", "yes", "on"):
        options.append("--no-index")
    return options


def main(args: list[str]) -> int:
    settings = pip_settings()
    uv = Path(sys.executable).with_name("uv")
    if not uv.exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", UV_SPEC], check=True)
    env = dict(os.environ)
    if settings.get("cert"):
        env.setdefault("SSL_CERT_FILE", settings["cert"])  # uv's TLS trusts what pip was told to trust
    command = [str(uv), "pip", "install", "--quiet", "--python", sys.executable]
    return subprocess.run(command + uv_options(settings) + args, env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
