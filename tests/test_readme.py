"""README stays true: its example runs, and CI runs the test command README prints."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme():
    with open(os.path.join(ROOT, "README.md")) as fh:
        return fh.read()


def test_readme_examples_run():
    """Every python block of the README, in order, in one namespace (later blocks build on the first)."""
    blocks = re.findall(r"```python\n(.*?)```", _readme(), re.S)
    assert len(blocks) >= 2
    scope = {}
    for code in blocks:
        exec(compile(code, "README.md", "exec"), scope)
    assert scope["logit"].shape == (4096,)
    assert scope["loss"].item() > 0
    assert scope["probs"].shape == (4096,) and bool(((scope["probs"] > 0) & (scope["probs"] < 1)).all())


def test_ci_runs_the_readme_test_command():
    commands = [line.strip() for line in _readme().splitlines() if line.startswith("    ./install.sh")]
    assert len(commands) == 2, commands
    test_command = [c for c in commands if "pytest" in c]
    assert len(test_command) == 1
    with open(os.path.join(ROOT, ".ci", "run")) as fh:
        ci = fh.read()
    assert test_command[0] in ci
