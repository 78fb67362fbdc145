"""The wheel: one `m3w` package with its configs as package data and its compiled DOM walk, importable outside
the checkout.

Built with `pip wheel` from a clean copy of the source and installed with pip into a fresh venv, offline: no
build isolation (the dev venv's setuptools and Cython), `--no-deps`, and the dev venv's site-packages appended to the fresh
venv's path for the dependencies (a plain path entry: the editable install of this checkout that it holds is not
activated).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECK = """
import importlib.util, sys
import m3w, m3w.pipeline, m3w.pipeline.extract, m3w.trainer.train, m3w.model, m3w.schemas, m3w.demo
print(m3w.__file__)
for name in ("pipeline", "model", "trainer", "schemas", "demo", "configs"):
    assert importlib.util.find_spec(name) is None, name
assert sorted(p.name for p in m3w.CONFIGS_DIR.glob("*.yaml")) == sys.argv[1].split(","), sys.argv[1]
from m3w.pipeline.tokenizer import load_tokenizer
assert load_tokenizer().convert_tokens_to_ids(["<image>", "<EOC>"]) == [2, 3]  # the shipped tokenizer's assets
"""


BUILT = ("*.so", "html_walk.c")  # what an in-place build of the compiled walk leaves in the checkout


def clean_source(into: Path) -> Path:
    """What the wheel is built from, without a checkout's build/ and *.egg-info (setuptools would take files
    from those that the package data rules no longer name)."""
    into.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(ROOT / name, into / name)
    shutil.copytree(ROOT / "m3w", into / "m3w", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", *BUILT))
    return into


def test_wheel_installs_one_namespace_with_its_configs(tmp_path):
    source = clean_source(tmp_path / "source")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(tmp_path), str(source)],
        check=True, cwd=tmp_path, capture_output=True,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("m3w-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert top == {"m3w", "-".join(wheel.name.split("-")[:2]) + ".dist-info"}, top  # name-version.dist-info
    data = {  # every file of the package that is not code: configs, the tokenizer, word lists
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "m3w").rglob("*")
        if path.is_file()
        and path.suffix not in (".py", ".pyc", ".pyx", ".c", ".so")
        and "__pycache__" not in path.parts
    }
    assert any(name.startswith("m3w/pipeline/html_walk.") and name.endswith(".so") for name in names), names
    assert data and data <= set(names), sorted(data - set(names))

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "--quiet", str(wheel)],
        check=True, capture_output=True,
    )  # fmt: skip
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(site) / "dev-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shipped = ",".join(sorted(p.name for p in (ROOT / "m3w" / "configs").glob("*.yaml")))
    result = subprocess.run([python, "-c", CHECK, shipped], capture_output=True, text=True, cwd=outside)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().startswith(site), result.stdout  # the installed copy, not this checkout
    shown = subprocess.run(
        [venv / "bin" / "m3w", "config", "show", "filter"], capture_output=True, text=True, cwd=outside
    )
    assert shown.returncode == 0 and shown.stdout == (ROOT / "m3w" / "configs" / "filters.yaml").read_text()
