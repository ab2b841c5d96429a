"""scripts/package.sh (azd's prepackage hook) builds a CPU-only package under the 1 GB limit,
whatever requirements.txt lists."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.deploy.conftest import ROOT

pytestmark = [pytest.mark.deploy, pytest.mark.slow]

SITE = ROOT / ".python_packages" / "lib" / "site-packages"
LIMIT = 1_000_000_000  # Flex Consumption's deployment package limit, 1 GB (README, Deploy)


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names() -> set[str]:
    names = set()
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            names.add(normalize(re.split(r"[\s<>=!~;\[]", line, maxsplit=1)[0]))
    return names


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, str], str]:
    zip_path = tmp_path_factory.mktemp("package") / "package.zip"
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "package.sh"), "--zip", str(zip_path)],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        env={**os.environ, "PYTHON": sys.executable},
    )
    summary = [line for line in done.stdout.splitlines() if line.startswith("package:")]
    print("\n" + "\n".join(summary))
    assert done.returncode == 0, f"scripts/package.sh failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    dists = {}
    for meta in SITE.glob("*.dist-info/METADATA"):
        text = meta.read_text(encoding="utf-8", errors="replace")
        name = re.search(r"^Name: (.+)$", text, re.M)
        version = re.search(r"^Version: (.+)$", text, re.M)
        assert name and version, meta
        dists[normalize(name.group(1).strip())] = version.group(1).strip()
    zip_path.unlink()
    return dists, summary[0]


def test_every_requirement_is_in_the_package(package: tuple[dict[str, str], str]) -> None:
    dists, _ = package
    missing = sorted(requirement_names() - set(dists))
    assert not missing, f"requirements.txt lists {missing}, not in .python_packages"


def test_package_is_cpu_only(package: tuple[dict[str, str], str]) -> None:
    dists, _ = package
    cuda = sorted(name for name in dists if name.startswith(("nvidia-", "cuda-")) or name in ("triton", "pytorch-triton"))
    assert not cuda, f"CUDA distributions in the package: {cuda}"
    libraries = sorted(str(p.relative_to(SITE)) for p in SITE.rglob("*") if re.match(r"lib(cu|cudnn|nccl)", p.name))
    assert not libraries, f"CUDA libraries in the package: {libraries[:10]}"
    assert dists["torch"].endswith("+cpu"), f"torch {dists['torch']} is not the CPU build"


def test_package_is_under_the_deployment_limit_zipped_and_unzipped(package: tuple[dict[str, str], str]) -> None:
    _, summary = package
    found = re.search(r"unzipped ([\d.]+) MB, zipped ([\d.]+) MB", summary)
    assert found, summary
    unzipped, zipped = (float(value) * 1e6 for value in found.groups())
    assert zipped < LIMIT and unzipped < LIMIT, summary


def test_the_app_imports_from_the_package_alone(package: tuple[dict[str, str], str]) -> None:
    """Like the Functions worker: only the app folder and .python_packages on sys.path (-S: no
    site-packages of this machine), so a dependency missing from the package fails here."""
    code = (
        "import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]\n"
        "import function_app, torch, transformers, azure.identity\n"
        "assert torch.__file__.startswith(sys.argv[1]), torch.__file__\n"
        "print(torch.__version__)"
    )
    done = subprocess.run([sys.executable, "-S", "-c", code, str(SITE), str(ROOT)], capture_output=True, text=True, check=False, cwd="/")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("+cpu")
