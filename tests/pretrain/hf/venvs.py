"""Fresh virtual environments that hold only torch and one version of transformers (and what those two
need), for loading an export the way a user of the published model would. Cached under .cache/hf-venvs/
(gitignored): the first run creates one (about a minute: transformers and its dependencies from the
package index), later runs reuse it.

torch is not installed a second time (a minute or more per venv to unpack): the venv, created without
the system's site-packages, gets a .pth line naming a folder of symbolic links to this interpreter's
torch and the packages torch requires, nothing else. So the venv sees this torch build, and pip
installs transformers next to it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib.metadata import distribution
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import REPO

CACHE = REPO / ".cache" / "hf-venvs"
PY = f"python{sys.version_info.major}.{sys.version_info.minor}"


def torch_and_requirements() -> list[Path]:
    """The top-level files and folders (packages and dist-info) of torch and of every package it
    requires, as installed for this interpreter."""
    paths, seen, todo = set(), set(), ["torch"]
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        dist = distribution(name)
        for file in dist.files or []:
            if file.parts[0] != "..":  # console scripts live outside site-packages
                paths.add(Path(dist.locate_file(file.parts[0])))
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return sorted(p for p in paths if p.exists() and p.name != "__pycache__" and p.suffix != ".pth")


def torch_links() -> Path:
    import torch

    folder = CACHE / f"torch-{torch.__version__}"
    if not (folder / ".ready").exists():
        tmp = folder.with_name(folder.name + f".partial-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for path in torch_and_requirements():
            (tmp / path.name).symlink_to(path)
        (tmp / ".ready").touch()
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    return folder


def transformers_venv(version: str) -> Path:
    """The python of a venv with torch and transformers==version only (created once, then cached)."""
    import torch

    venv = CACHE / f"transformers-{version}-torch-{torch.__version__}"  # linked to this torch: a new one, a new venv
    python = venv / "bin" / "python"
    if (venv / ".ready").exists():
        return python
    links = torch_links()
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    (venv / "lib" / PY / "site-packages" / "torch-only.pth").write_text(f"{links}\n")
    pin = venv / "torch-pin.txt"  # pip must never replace the linked torch
    pin.write_text(f"torch=={torch.__version__.split('+')[0]}\n")
    proc = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-c", str(pin),
                           f"transformers=={version}"], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"pip install transformers=={version} into {venv} failed:\n{proc.stderr[-3000:]}")
    (venv / ".ready").touch()
    return python
