"""The built wheel works on its own: installed in a fresh venv outside the checkout.

Usage: ``python3 tools/wheel_smoke.py DIST`` (``make wheel-smoke`` builds DIST first). DIST holds
one wheel and one sdist. The script creates a venv in a temporary folder, installs torch
``TORCH_VERSION`` (environment, default below; from ``TORCH_INDEX`` when set), then the wheel with
its ``data`` and ``plot`` extras, and from a folder outside the checkout checks that:

- ``import dropcluster`` comes from the venv's site-packages, at the wheel's version;
- ``dropcluster --help`` and ``--version`` work, and so does ``reproduce --preset demo --dry-run``;
- the presets' JSON files and ``py.typed`` are installed (and are in the sdist);
- a two-epoch training run on the synthetic data set writes its log and result;
- every other user extra (lightning, ray, slurm, ...: all but ``test`` and ``bench``) resolves
  beside the installed torch (``pip install --dry-run``: nothing is installed, and no other torch
  would be; this step needs the package index, as ``make venv`` does).

Each step prints one line; a failure prints the command's output and exits 1. The temporary
folder is removed in every case. Standard library only: it runs on the system Python.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

__all__ = ["TORCH_VERSION", "SmokeError", "check_archives", "main"]

#: The torch release installed in the venv: the Makefile's TORCH_VERSION (tests/test_packaging.py).
TORCH_VERSION = "2.13.0"

ROOT = Path(__file__).resolve().parents[1]
PRESET_FOLDER = ROOT / "src" / "dropcluster" / "experiments" / "presets"
PRESETS = sorted(path.name for path in PRESET_FOLDER.glob("*.json"))
#: Extras for development, not for users: left out of the resolution check.
DEVELOPMENT_EXTRAS = ("test", "bench")


class SmokeError(Exception):
    """A check failed; the message says what was expected and what was found."""


def _step(start: float, message: str) -> None:
    print(f"wheel-smoke [{time.monotonic() - start:5.1f} s] {message}", flush=True)


def _run(command: list[str], cwd: Path, env: dict[str, str]) -> str:
    """Run ``command``; its stdout, or SmokeError with its stdout and stderr on failure."""
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SmokeError(
            f"`{' '.join(command)}` exited {done.returncode}:\n{done.stdout}{done.stderr}"
        )
    return done.stdout


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise SmokeError(message)


def _one(dist: Path, pattern: str) -> Path:
    found = sorted(dist.glob(pattern))
    _expect(len(found) == 1, f"expected one {pattern} in {dist}, found {[p.name for p in found]}")
    return found[0]


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def check_archives(wheel: Path, sdist: Path) -> tuple[str, dict[str, set[str]]]:
    """The wheel's version and each extra's distributions (normalized names), after checking that
    both archives hold the presets and py.typed."""
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = [name for name in names if name.endswith(".dist-info/METADATA")]
        _expect(len(metadata) == 1, f"expected one .dist-info/METADATA in {wheel.name}")
        text = archive.read(metadata[0]).decode()
    version = re.search(r"^Version: (\S+)$", text, re.M)
    _expect(version is not None, f"no Version in the METADATA of {wheel.name}")
    extras: dict[str, set[str]] = {
        extra: set() for extra in re.findall(r"^Provides-Extra: (\S+)$", text, re.M)
    }
    for name, extra in re.findall(
        r"^Requires-Dist: ([A-Za-z0-9._-]+)[^;\n]*; extra == \"([^\"]+)\"$", text, re.M
    ):
        extras.setdefault(extra, set()).add(_normalized(name))
    wanted = {"dropcluster/py.typed"} | {f"dropcluster/experiments/presets/{p}" for p in PRESETS}
    _expect(wanted <= names, f"the wheel lacks {sorted(wanted - names)}")
    with tarfile.open(sdist) as archive:
        sdist_names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    _expect(
        {f"src/{name}" for name in wanted} <= sdist_names,
        f"the sdist lacks {sorted({f'src/{name}' for name in wanted} - sdist_names)}",
    )
    return version.group(1), extras


def _smoke(dist: Path, temp: Path, start: float) -> None:
    wheel, sdist = _one(dist, "dropcluster-*.whl"), _one(dist, "dropcluster-*.tar.gz")
    version, extras = check_archives(wheel, sdist)
    user_extras = ",".join(extra for extra in extras if extra not in DEVELOPMENT_EXTRAS)
    installed_extras = ("data", "plot")
    _expect(set(installed_extras) <= set(extras), f"expected data and plot among {sorted(extras)}")
    heavy = set().union(
        *(names for extra, names in extras.items() if extra not in DEVELOPMENT_EXTRAS)
    ) - set().union(*(extras[extra] for extra in installed_extras))
    _step(start, f"{wheel.name}, {sdist.name}: version {version}, py.typed, {len(PRESETS)} presets")

    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.pop("VIRTUAL_ENV", None)
    work = temp / "work"
    work.mkdir()
    venv = temp / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], work, env)
    python, pip = str(venv / "bin/python"), [str(venv / "bin/python"), "-m", "pip"]
    # --no-compile: byte-compiling torch's thousands of files is slow and checks nothing here.
    install = [*pip, "install", "--quiet", "--no-compile"]
    _step(start, f"fresh venv {venv} (Python {sys.version.split()[0]}), run from {work}")

    torch_version = os.environ.get("TORCH_VERSION") or TORCH_VERSION
    index = os.environ.get("TORCH_INDEX")
    _run(
        [*install, f"torch=={torch_version}"] + (["--index-url", index] if index else []),
        work,
        env,
    )
    installed = _run([python, "-c", "import torch; print(torch.__version__)"], work, env).strip()
    _step(start, f"pip install torch=={torch_version}: torch {installed}")

    _run([*install, f"{wheel}[{','.join(installed_extras)}]"], work, env)
    probe = (
        "import dropcluster, sysconfig, yaml, PIL, matplotlib; "
        "print(dropcluster.__file__); print(dropcluster.__version__); "
        "print(sysconfig.get_paths()['purelib'])"
    )
    location, imported_version, purelib = _run([python, "-c", probe], work, env).split()
    _expect(
        Path(location).resolve().is_relative_to(Path(purelib).resolve()),
        f"expected dropcluster from {purelib}, imported {location}",
    )
    _expect(imported_version == version, f"expected version {version}, got {imported_version}")
    _step(
        start,
        f"pip install {wheel.name}[{','.join(installed_extras)}]: "
        f"imports from {Path(location).parent}",
    )

    package = Path(location).parent
    installed_presets = sorted(p.name for p in (package / "experiments/presets").glob("*.json"))
    _expect(installed_presets == PRESETS, f"expected presets {PRESETS}, got {installed_presets}")
    _expect((package / "py.typed").is_file(), f"no py.typed in {package}")
    _step(start, f"installed: py.typed and the presets {', '.join(installed_presets)}")

    command = str(venv / "bin/dropcluster")
    usage = _run([command, "--help"], work, env)
    _expect(usage.startswith("usage: dropcluster"), f"unexpected --help output:\n{usage}")
    shown = _run([command, "--version"], work, env).strip()
    _expect(shown == f"dropcluster {version}", f"expected `dropcluster {version}`, got {shown!r}")
    _step(start, f"dropcluster --help, dropcluster --version: {shown}")

    plan = _run([command, "reproduce", "--preset", "demo", "--dry-run", "--out", "demo"], work, env)
    header = re.match(r"preset demo \(demo scale\): (\d+) runs\n", plan)
    rows = re.findall(r"^\S+-s\d+ +\d+ +(?:yes|no) +new ", plan, re.M)
    _expect(
        header is not None and len(rows) == int(header.group(1)) > 0,
        f"expected the demo's runs, each new, got:\n{plan}",
    )
    _expect("estimated time" in plan, f"expected the estimated time, got:\n{plan}")
    _expect(not (work / "demo").exists(), "the dry run wrote its output folder")
    _step(
        start,
        f"dropcluster reproduce --preset demo --dry-run: {len(rows)} runs listed, nothing written",
    )

    train = [command, "train", "--dataset", "synthetic", "--model", "resnet20"]
    train += ["--regularizer", "dropcluster", "--p", "0.1", "--epochs", "2"]
    train += ["--cluster-every", "1", "--train-fraction", "0.02", "--out", "run"]
    _run(train, work, env)
    log = [json.loads(line) for line in (work / "run/log.jsonl").read_text().splitlines()]
    result = json.loads((work / "run/result.json").read_text())
    _expect([record["epoch"] for record in log] == [0, 1], f"expected epochs 0 and 1, got {log}")
    _expect("structured" in log[1], f"expected the clusters refitted at epoch 1, got {log[1]}")
    _expect(result["epochs"] == 2, f"expected a two-epoch result, got {result}")
    _step(
        start,
        f"dropcluster train (resnet20, synthetic, dropcluster, 2 epochs): top-1 {result['top1']} %"
        f", clusters refitted ({log[1]['structured']} structured channels)",
    )

    plan = _run([*pip, "install", "--dry-run", f"{wheel}[{user_extras}]"], work, env)
    would = re.search(r"^Would install (.*)$", plan, re.M)
    packages = would.group(1).split() if would else []
    names = {_normalized(package.rsplit("-", 1)[0]) for package in packages}
    _expect("torch" not in names, f"the extras would replace torch {installed}: {packages}")
    _expect(heavy <= names, f"expected {sorted(heavy)} in the resolution, got {packages}")
    _step(
        start,
        f"pip install --dry-run {wheel.name}[{user_extras}]: resolves "
        f"({len(packages)} packages, {', '.join(sorted(heavy))} among them; "
        f"torch {installed} kept)",
    )


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python3 tools/wheel_smoke.py DIST", file=sys.stderr)
        return 2
    dist = Path(argv[0]).resolve()
    start = time.monotonic()
    temp = Path(tempfile.mkdtemp(prefix="dropcluster-wheel-smoke-"))
    try:
        if temp.is_relative_to(ROOT):
            raise SmokeError(f"the temporary folder {temp} is inside the checkout {ROOT}")
        _smoke(dist, temp, start)
    except SmokeError as error:
        print(f"wheel-smoke: FAILED: {error}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    _step(start, f"passed; removed {temp}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
