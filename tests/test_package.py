"""jaxkd as an installable package: the wheel pyproject.toml builds (distribution
`jaxkd-distill`) holds every module of jaxkd and the dependency list, and `import jaxkd` works
from it outside the checkout."""

import os
import shutil
import subprocess
import sys
import zipfile

import helpers


def test_the_wheel_holds_jaxkd_and_imports_outside_the_checkout(tmp_path):
  wheel_dir, target, source = tmp_path / "wheel", tmp_path / "site", tmp_path / "source"
  # Built from a copy of what it needs, so that setuptools' build/ and *.egg-info are not left
  # in the checkout.
  shutil.copytree(helpers.REPO / "jaxkd", source / "jaxkd",
                  ignore=shutil.ignore_patterns("__pycache__"))
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(helpers.REPO / name, source / name)
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w",
                  str(wheel_dir), str(source)], check=True, timeout=600)
  (wheel,) = wheel_dir.glob("jaxkd_distill-*.whl")
  with zipfile.ZipFile(wheel) as archive:
    names = set(archive.namelist())
    metadata = next(archive.read(n).decode() for n in names if n.endswith("METADATA"))
  modules = {str(p.relative_to(helpers.REPO)) for p in (helpers.REPO / "jaxkd").rglob("*.py")}
  assert modules <= names, sorted(modules - names)
  assert not any(n.startswith(("tests/", "configs/", "experiments/")) for n in names)
  # The distribution's name is not `jaxkd` (on PyPI, an unrelated k-d tree library).
  assert "\nName: jaxkd-distill\n" in metadata
  for requirement in ("jax>=0.10.2", "flax>=0.12.8; python_version < \"3.12\"",
                      "flax>=0.12.10; python_version >= \"3.12\"", "optax>=0.2.8",
                      "tensorflow-datasets"):
    assert f"Requires-Dist: {requirement}" in metadata
  subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target",
                  str(target), str(wheel)], check=True, timeout=600)
  done = subprocess.run(
      [sys.executable, "-c", "import jaxkd.methods, jaxkd.models; print(jaxkd.__file__); "
       "print(len(jaxkd.methods.METHOD_NAMES))"],
      cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(target)), capture_output=True,
      text=True, timeout=300, check=True)
  path, count = done.stdout.split()[-2:]
  assert path.startswith(str(target)) and int(count) >= 28


def test_ci_runs_the_readme_test_command():
  """CI's steps run the suite with the arguments of the README's test command."""
  readme = (helpers.REPO / "README.md").read_text()
  command = next(line for line in readme.splitlines() if line.startswith("python -m pytest "))
  ci = (helpers.REPO / ".ci" / "run").read_text()
  (args,) = [line for line in ci.splitlines() if line.startswith("PYTEST_ARGS=(")]
  assert args.removeprefix("PYTEST_ARGS=(").removesuffix(")") == command.removeprefix(
      "python -m pytest ")
  assert ci.count('"${PYTEST_ARGS[@]}"') == 2  # Python 3.11 and 3.13.
