"""Messages that name the cause, for the failures that need a real Azurite or a (fake) Hub:
a refused storage key, a Hub that refuses the model id, a Hub that cannot be reached."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import AZURITE_KEY, ROOT

pytestmark = pytest.mark.integration


def cli(env: dict[str, str], *args: str) -> tuple[int, dict[str, object], str]:
    proc = subprocess.run(
        [sys.executable, "-m", "shared", *args, "--json"], cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_a_wrong_storage_key_is_refused_credentials_not_an_outage(azurite: str, container_name: str) -> None:
    env = {"MODEL_CONTAINER": container_name, "MODEL_ID": "org/tiny-bert"}
    wrong = AZURITE_KEY[:-4] + ("AAA=" if not AZURITE_KEY.endswith("AAA=") else "BBB=")
    code, out, _ = cli({**env, "MODEL_STORAGE": azurite.replace(AZURITE_KEY, wrong)}, "status")
    message = str(out["error"]["message"])  # type: ignore[index]
    assert code == 1 and "refused the credentials" in message, message
    assert "Azurite running" not in message and "Start it" not in message
