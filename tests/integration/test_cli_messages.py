"""Messages that name the cause, for the failures that need a real Azurite or a (fake) Hub:
a refused storage key, a Hub that refuses the model id, a Hub that cannot be reached."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.errors import QAError
from shared.refresh.worker import handle_message, run_refresh
from shared.settings import Settings
from shared.store.model_store import ModelStore
from shared.store.refresh_queue import RefreshRequest
from tests.conftest import AZURITE_KEY, ROOT
from tests.fixtures.cli_runs import run_cli as cli
from tests.fixtures.fake_hub import FakeHubServer

pytestmark = pytest.mark.integration
REPO = "org/tiny-bert"


@pytest.fixture
def hub() -> Iterator[FakeHubServer]:
    with FakeHubServer() as server:
        yield server


@pytest.fixture
def env(azurite: str, container_name: str, hub: FakeHubServer) -> Iterator[dict[str, str]]:
    values = {
        "MODEL_STORAGE": azurite,
        "MODEL_CONTAINER": container_name,
        "MODEL_ID": REPO,
        "HF_ENDPOINT": hub.endpoint,
        "MODEL_CANARY": json.dumps({"question": "Who won?", "context": "The Denver Broncos won the game."}),
        "MODEL_ARTIFACTS": "none",
    }
    yield values
    from azure.core.exceptions import ResourceNotFoundError

    try:
        ModelStore.from_settings(Settings.from_env(values)).container.delete_container()
    except ResourceNotFoundError:  # a test that never reached storage
        pass


@pytest.mark.parametrize("command", [["status"], ["ask", "--question", "Who won?", "--context", "The Broncos won."]], ids=lambda c: c[0])
def test_a_wrong_storage_key_is_refused_credentials_not_an_outage(azurite: str, container_name: str, command: list[str]) -> None:
    env = {"MODEL_CONTAINER": container_name, "MODEL_ID": "org/tiny-bert"}
    wrong = AZURITE_KEY[:-4] + ("AAA=" if not AZURITE_KEY.endswith("AAA=") else "BBB=")
    code, out, _ = cli({**env, "MODEL_STORAGE": azurite.replace(AZURITE_KEY, wrong)}, *command)
    message = str(out["error"]["message"])  # type: ignore[index]
    assert code == 1 and "refused the credentials" in message, message
    assert "Azurite running" not in message and "Start it" not in message


@pytest.mark.parametrize(
    "refusal", [None, (401, "Invalid credentials in Authorization header"), (404, "Not Found"), (403, "Forbidden")], ids=str
)
def test_a_hub_that_refuses_the_model_is_a_permanent_error(
    env: dict[str, str], hub: FakeHubServer, refusal: tuple[int, str] | None
) -> None:
    """401/403/404 for the model id (a missing repo, a private one, a bad HF_TOKEN, a mirror's 404) is
    not an outage: it names MODEL_ID and HF_TOKEN, and the queue worker does not retry it."""
    if refusal is not None:
        hub.hub.refuse[REPO] = refusal
    settings = Settings.from_env({**env, "HF_TOKEN": "hf_wrong"})
    with pytest.raises(QAError) as caught:
        run_refresh(settings, RefreshRequest())
    assert caught.value.code == "not_found", caught.value.message
    assert "not found or not accessible" in caught.value.message and "MODEL_ID" in caught.value.message
    assert "HF_TOKEN" in caught.value.message and "hf_wrong" not in caught.value.message
    assert handle_message(settings, RefreshRequest().to_bytes()) is None  # completed, not raised for a retry


def test_offline_isolate_names_the_hub_suggests_from_dir_and_keeps_the_served_version_clear(
    env: dict[str, str], tiny_bert_dir: Path
) -> None:
    code, first, _ = cli(env, "isolate", "--from-dir", str(tiny_bert_dir), "--model-id", env["MODEL_ID"])
    assert code == 0
    with socket.socket() as dead:
        dead.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{dead.getsockname()[1]}"
        code, out, _ = cli({**env, "HF_ENDPOINT": endpoint}, "isolate")
    message = str(out["error"]["message"])  # type: ignore[index]
    assert code == 1 and out["error"]["code"] == "source_unavailable"  # type: ignore[index]
    assert endpoint in message and "unreachable" in message and "--from-dir" in message, message
    last = ModelStore.from_settings(Settings.from_env(env)).read_last_refresh()
    assert last is not None and last["outcome"] == "failed" and last["previous_revision"] == first["revision"]
    proc = subprocess.run(
        [sys.executable, "-m", "shared", "status"], cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=120
    )
    assert f"still serving {first['revision']}" in proc.stdout, proc.stdout
