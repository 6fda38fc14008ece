"""Side environments for the benches that need other packages than the project's.

The flower bench needs Flower (which pins another Ray) and the cluster bench needs
``ray[default]`` (the job server); neither belongs in the project's environment.
Each is a virtual environment next to ``pyproject.toml``, created on first use and
reused while its probe imports succeed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


class BenchSetupError(RuntimeError):
    """A side environment could not be created; the message says which step failed."""


def repo_root() -> Path:
    """The source checkout (the benches that build environments install from it)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "pyproject.toml").is_file():
        raise BenchSetupError(
            f"{root} has no pyproject.toml: this bench builds its own virtual environment "
            "from a source checkout; run it from one"
        )
    return root


def pip_install(python: Path, args: list[str], step: str) -> None:
    """``python -m pip install -q ARGS``; raises BenchSetupError naming ``step`` on failure."""
    done = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", *args], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise BenchSetupError(
            f"creating the bench environment failed at '{step}' (pip install "
            f"{' '.join(args)}), exit {done.returncode}:\n{done.stderr[-3000:]}"
        )


def ensure_venv(
    venv: Path, probe: str, steps: list[tuple[str, list[str]]], share_site: bool = False
) -> Path:
    """The interpreter of ``venv``, created if ``probe`` (Python code) fails to run there.

    Args:
        venv: the environment's folder.
        probe: imports that succeed once the environment is complete.
        steps: (name, pip install arguments), installed in order (torch first, so a
            plain torch requirement later does not pull a multi-GB CUDA build).
        share_site: add this environment's site-packages to the new one (a ``.pth``
            line), so it installs only what it adds.
    """
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([str(python), "-c", probe]).returncode == 0:
        return python
    print(f"creating the bench environment {venv} (once, a few minutes)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    if share_site:
        site = subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        here = next(p for p in sys.path if p.endswith("site-packages") and Path(p, "ray").is_dir())
        Path(site, "_pf2lora_base.pth").write_text(here + "\n")
    for name, args in steps:
        pip_install(python, args, name)
    return python
