"""The built wheel carries the Hydra config tree and the bundled data, and composes outside the checkout."""

import os
import shutil
import subprocess
import sys
import zipfile

from conftest import REPO

CHECK = """
import sdft_cli, sys
from sdft_cli.compose import compose, conf_dir
from sdft_cli.rows import bundled_dir
from sdft_cli.tasks import load_task
assert sdft_cli.__file__.startswith(sys.argv[1]), sdft_cli.__file__
assert str(conf_dir()).startswith(sys.argv[1]), conf_dir()
cfg = compose(["method=sft", "task=[mcq,facts]"])
task = load_task("facts", cfg.task["facts"])
print(type(cfg.method).__name__, list(cfg.task), len(task.train), bundled_dir())
"""


def test_wheel_has_configs_and_data_and_composes_when_installed(tmp_path):
    pip = [sys.executable, "-m", "pip"]
    # build from a copy: an in-tree build/ directory could carry stale modules into the wheel
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".venv*", ".git", "build", "runs", "*.egg-info"))
    dist = tmp_path / "dist"
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(src)],
        check=True,
        capture_output=True,
    )
    wheel = next(dist.glob("sdft_cli-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for conf in (REPO / "conf").rglob("*.yaml"):
        assert f"sdft_cli/conf/{conf.relative_to(REPO / 'conf').as_posix()}" in names, conf
    for data in (REPO / "sdft_cli" / "data").rglob("*.jsonl"):
        assert f"sdft_cli/{data.relative_to(REPO / 'sdft_cli').as_posix()}" in names, data

    target = tmp_path / "site"
    subprocess.run(
        [*pip, "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run(
        [sys.executable, "-c", CHECK, str(target)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("SFTConfig ['mcq', 'facts'] 48")
