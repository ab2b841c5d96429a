"""Queueing a refresh with an identity that may send messages but not create queues."""

from __future__ import annotations

import pytest
from azure.core.exceptions import HttpResponseError, ResourceExistsError

from shared.store.refresh_queue import RefreshRequest, ensure_queue


class FakeQueue:
    """Raises on create_queue as a service would; counts the calls."""

    def __init__(self, error: Exception | None) -> None:
        self.error = error
        self.creates = 0

    def create_queue(self) -> None:
        self.creates += 1
        if self.error is not None:
            raise self.error


def http_error(status: int) -> HttpResponseError:
    err = HttpResponseError(message=f"status {status}")
    err.status_code = status
    return err


@pytest.mark.parametrize("error", [None, ResourceExistsError("exists"), http_error(403)])
def test_an_existing_or_forbidden_create_goes_on_to_send(error: Exception | None) -> None:
    queue = FakeQueue(error)
    ensure_queue(queue)
    assert queue.creates == 1


def test_other_failures_still_raise() -> None:
    with pytest.raises(HttpResponseError):
        ensure_queue(FakeQueue(http_error(500)))


def test_request_flags_round_trip_through_the_message() -> None:
    request = RefreshRequest(revision="main", explicit=True, reason="cli", repair=True, build_artifacts=True)
    again = RefreshRequest.from_bytes(request.to_bytes())
    assert (again.revision, again.explicit, again.repair, again.build_artifacts, again.reason) == ("main", True, True, True, "cli")


def test_refresh_body_rejects_unknown_fields_and_non_booleans() -> None:
    from shared.errors import InputError
    from shared.serving.validation import check_body
    from shared.settings import Limits
    from shared.store.refresh_queue import RefreshOptions

    def from_body(data: dict[str, object]) -> RefreshRequest:
        return RefreshRequest.from_options(check_body(Limits(), RefreshOptions, data))

    assert from_body({"repair": True}).repair
    assert from_body({"revision": "main"}).explicit and not from_body({"revision": None}).explicit
    with pytest.raises(InputError, match="revison"):
        from_body({"revison": "main"})
    with pytest.raises(InputError, match="repair"):
        from_body({"repair": "yes"})
