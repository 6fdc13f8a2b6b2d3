"""A wheel works outside the repository: it is built from a copy of the project, installed into a fresh virtual
environment (no network: the test environment's own packages stand in for the dependencies), and the installed
``prefopt`` answers --help and --cfg job from a folder that has nothing of prefopt in it."""

from __future__ import annotations

import ast
import os
import shutil
import site
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _run(*command, cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, (command, result.stdout[-2000:], result.stderr[-3000:])
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the venv's bin folder, a working folder outside the repository, the wheel, a clean environment)."""
    root = tmp_path_factory.mktemp("packaging")
    source = root / "source"  # build from a copy, so the checkout gets no build/ or egg-info folder
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, source / name)
    for name in ("prefopt", "conf"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", root / "dist", source, cwd=root)
    wheel = next((root / "dist").glob("prefopt-*.whl"))

    venv = root / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=root)
    purelib = _run(venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                   cwd=root).stdout.strip()
    # the test environment's packages (torch, Lightning, Hydra, pip ...) stand in for a download of the dependencies;
    # listed after the venv's own site-packages, so the installed prefopt comes first
    Path(purelib, "_test_environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PREFOPT_CONFIG_DIR", "VIRTUAL_ENV")}
    env["HF_HUB_OFFLINE"] = "1"
    _run(venv / "bin" / "python", "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel, cwd=root, env=env)
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    return venv / "bin", elsewhere, wheel, env


def test_every_package_and_config_is_in_the_wheel(installed):
    _, _, wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = {str(p.parent.relative_to(REPO)).replace(os.sep, ".") for p in (REPO / "prefopt").rglob("__init__.py")}
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    assert packages <= listed, f"add {sorted(packages - listed)} to [tool.setuptools] packages in pyproject.toml"
    for module in (REPO / "prefopt").rglob("*.py"):
        assert str(module.relative_to(REPO)).replace(os.sep, "/") in names, module
    configs = sorted(p.relative_to(REPO / "conf") for p in (REPO / "conf").rglob("*.yaml"))
    assert configs and all(f"prefopt/conf/{c.as_posix()}" in names for c in configs)
    assert any(name.endswith("LICENSE") for name in names)


def test_the_installed_command_runs_from_any_folder(installed):
    bin_dir, elsewhere, _, env = installed
    where = _run(bin_dir / "python", "-c", "import prefopt, prefopt.cli as c; print(prefopt.__file__); "
                 "print(c._hydra_config_path())", cwd=elsewhere, env=env).stdout.split()
    assert where[0].startswith(str(bin_dir.parent)) and where[1] == "pkg://prefopt.conf"

    help_text = _run(bin_dir / "prefopt", "--help", cwd=elsewhere, env=env).stdout
    assert help_text.startswith("prefopt: DPO-family preference optimization")
    assert "\ndomain: bandit, control, diffusion, sequence" in help_text

    job = _run(bin_dir / "prefopt", "--cfg", "job", "loss=ipo", "seed=3", cwd=elsewhere, env=env).stdout
    assert "_target_: prefopt.tasks.control" in job and "env_id: Pendulum-v1" in job  # the default job is control
    assert "loss_type: ipo" in job and "\nseed: 3\n" in "\n" + job
    assert list(elsewhere.iterdir()) == []  # --cfg job writes nothing


def test_core_imports_are_declared_dependencies():
    """Every third-party module that prefopt's core imports (outside the domain packages, which have extras) is a
    core dependency in pyproject.toml."""
    distribution = {"yaml": "pyyaml", "PIL": "pillow", "sklearn": "scikit-learn", "hydra": "hydra-core"}
    declared = {d.split(">")[0].split("[")[0].split("=")[0].strip().lower() for d in PYPROJECT["project"]["dependencies"]}
    optional = {d.split(">")[0].split("[")[0].strip().lower()
                for extra in PYPROJECT["project"]["optional-dependencies"].values() for d in extra}
    domain_only = ("tasks/diffusion", "tasks/sequence", "adapters/sequence.py", "data/folders.py", "report.py")
    stdlib = set(sys.stdlib_module_names)
    for module in (REPO / "prefopt").rglob("*.py"):
        relative = module.relative_to(REPO / "prefopt").as_posix()
        for node in ast.walk(ast.parse(module.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            for name in names:
                top = name.split(".")[0]
                if top in stdlib or top == "prefopt":
                    continue
                dist = distribution.get(top, top).lower()
                assert dist in declared | optional, f"{relative} imports {top}, which pyproject.toml does not declare"
                if not relative.startswith(domain_only) and dist not in declared:
                    # outside a domain, an optional package is imported where it is used (inside a function)
                    assert node.col_offset > 0, f"{relative} imports the optional {top} at the top of the module"
