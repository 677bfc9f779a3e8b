"""The set-up files agree with each other: one list of dependencies, mirrored."""

import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_environment_yml_mirrors_pyproject():
    project = pyproject()["project"]
    extras = project["optional-dependencies"]
    wanted = set(project["dependencies"]) | set(extras["dev"]) | set(extras["docs"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_list = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    mirrored = {line for line in pip_list if not line.startswith("-e")}
    assert "-e ." in pip_list, "environment.yml installs the kit itself (conda and Binder)"
    assert mirrored == wanted, f"only in pyproject: {wanted - mirrored}; only in environment.yml: {mirrored - wanted}"


def test_torch_is_pinned_to_the_cpu_wheel():
    assert "torch==2.13.0" in pyproject()["project"]["dependencies"]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make test" in ci
    assert "make demo" in readme
