"""Soak: concurrent asks through the real ``/api/ask`` while ``/api/model/rollback`` moves the
pointer back and forth between two versions whose answers differ, and storage (a proxy in front of
Azurite, the serving instance's only way to it) drops for a few seconds.

No 500; every 200 carries, for each item, the golden answer of the revision it names (computed
with the engine straight from each version's folder); once storage returns, a pointer move made
during the outage is served, and the time that took is printed with the counts.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from shared.engine.question_answering import QAItem
from shared.engine.torch_model import engine_from_dir
from shared.store.model_store import ModelStore
from tests.fixtures.function_calls import call
from tests.fixtures.storage_proxy import StorageProxy
from tests.fixtures.tiny_models import build_bert, publish

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ITEMS = (
    ("Who won the game?", "Super Bowl 50 was played in 2016 in San Francisco. The Denver Broncos won the game against Carolina."),
    ("What is the capital of France?", "Paris is the capital of France. The river that runs through the city is called the Seine."),
    ("When was the school known for music?", "The university was known for its music school during the war, and later for football."),
)
ASKERS = 4
MOVES_BEFORE, OUTAGE_SECONDS, MOVES_AFTER = 8, 3.0, 4
MOVE_EVERY = 0.6  # seconds between pointer moves: a tiny model reloads well within it
HANG_GUARD = 60  # seconds; only stops a broken run from hanging CI


@dataclass(frozen=True)
class Reply:
    began: float
    ended: float
    status: int
    code: str | None  # the error code of a non-200
    revision: str | None
    answers: tuple[tuple[str, int, int], ...]  # one per item asked
    items: tuple[int, ...]


def golden_answers(folder: Path) -> tuple[tuple[str, int, int], ...]:
    engine = engine_from_dir(folder)
    found = []
    for question, context in ITEMS:
        [best] = engine.answer([QAItem(question, context)])[0]
        found.append((best.answer, best.start, best.end))
    return tuple(found)


def ask(items: tuple[int, ...]) -> Reply:
    began = time.monotonic()
    if len(items) == 1:
        question, context = ITEMS[items[0]]
        status, body, _ = call("ask", body={"question": question, "context": context})
        results = [body] if status == 200 else []
    else:
        status, body, _ = call("ask", body={"items": [{"question": ITEMS[i][0], "context": ITEMS[i][1]} for i in items]})
        results = body["results"] if status == 200 else []
    answers = tuple((r["answer"], r["start"], r["end"]) for r in results)
    code = body["error"]["code"] if status != 200 and "error" in body else None
    return Reply(began, time.monotonic(), status, code, body.get("revision"), answers, items)


def test_asks_stay_golden_while_the_pointer_moves_and_storage_drops(
    azurite: str, store: ModelStore, tmp_path: Path, install: Callable[..., Any]
) -> None:
    folders = [build_bert(tmp_path / "a", seed=51), build_bert(tmp_path / "b", seed=52)]
    revisions = [publish(store, folder) for folder in folders]
    golden = {revision: golden_answers(folder) for revision, folder in zip(revisions, folders, strict=True)}
    assert golden[revisions[0]] != golden[revisions[1]], "the two versions must answer differently"

    with StorageProxy.for_blob_endpoint(azurite) as proxy:
        install(
            {
                "MODEL_STORAGE": proxy.connection_string(azurite),  # serving reaches storage only through the proxy
                "MODEL_CONTAINER": store.container.container_name,
                "MODEL_ID": store.model_id,
                "MODEL_POLL_SECONDS": "0.2",
                "QA_DEADLINE_SECONDS": "10",
                "QA_MAX_CONCURRENT": str(ASKERS),
            }
        )
        assert ask((0,)).status == 200  # the first load
        replies: list[Reply] = []
        stop = threading.Event()

        def keep_asking(n: int) -> None:
            turn = 0
            while not stop.is_set():
                turn += 1
                items = (0, 1, 2) if n == 0 and turn % 4 == 0 else ((n + turn) % len(ITEMS),)  # some batches
                reply = ask(items)
                replies.append(reply)
                if reply.status == 503:
                    time.sleep(0.1)  # a client that backs off a little (Retry-After asks for more)

        askers = [threading.Thread(target=keep_asking, args=(n,), name=f"asker-{n}") for n in range(ASKERS)]
        for asker in askers:
            asker.start()
        moves: Counter[int] = Counter()
        target = revisions[1]
        try:
            for _ in range(MOVES_BEFORE):  # through the function, as an operator would
                target = revisions[0] if target == revisions[1] else revisions[1]
                status, _, _ = call("model_rollback", body={"to": target})
                moves[status] += 1
                time.sleep(MOVE_EVERY)
            target = revisions[0] if target == revisions[1] else revisions[1]
            moves[call("model_rollback", body={"to": target})[0]] += 1
            time.sleep(0.25)  # the instance has seen the move and is reloading: storage drops under the load
            proxy.stop()
            outage_began = time.monotonic()
            status, body, _ = call("model_rollback", body={"to": revisions[0]})
            moves[status] += 1
            assert (status, body["error"]["code"]) == (503, "storage_unavailable")
            # meanwhile the pointer moves where the instance cannot see it
            during = revisions[0] if target == revisions[1] else revisions[1]
            store.rollback(to=during)
            time.sleep(max(0.0, outage_began + OUTAGE_SECONDS - time.monotonic()))
            proxy.start()
            back = time.monotonic()
            recovered = _first(replies, lambda r: r.began >= back and r.status == 200 and r.revision == during)
            while recovered is None and time.monotonic() < back + HANG_GUARD:
                time.sleep(0.05)
                recovered = _first(replies, lambda r: r.began >= back and r.status == 200 and r.revision == during)
            assert recovered is not None, "the move made during the outage was never served"
            target = during
            for _ in range(MOVES_AFTER):
                target = revisions[0] if target == revisions[1] else revisions[1]
                moves[call("model_rollback", body={"to": target})[0]] += 1
                time.sleep(MOVE_EVERY)
        finally:
            stop.set()
            for asker in askers:
                asker.join(HANG_GUARD)

    statuses = Counter(r.status for r in replies)
    codes = Counter(f"{r.status} {r.code}" for r in replies if r.status != 200)
    served = Counter(r.revision for r in replies if r.status == 200)
    wrong = [r for r in replies if r.status == 200 and r.answers != tuple(golden[r.revision][i] for i in r.items)]
    outage_replies = [r for r in replies if outage_began <= r.began < back]
    print(
        f"\nsoak: {len(replies)} asks by {ASKERS} threads ({sum(len(r.items) > 1 for r in replies)} of them batches of "
        f"{len(ITEMS)}), statuses {dict(sorted(statuses.items()))} {dict(codes)}, served {[served[rev] for rev in revisions]} from the two "
        f"versions, {len(outage_replies)} asks during the {OUTAGE_SECONDS:.0f} s outage "
        f"({dict(Counter(r.status for r in outage_replies))}); pointer moves {dict(sorted(moves.items()))}; "
        f"recovery {recovered.ended - back:.1f} s after storage returned"
    )
    assert statuses[500] == 0
    assert set(statuses) <= {200, 503}, statuses
    assert not wrong, f"{len(wrong)} answers are not the golden answers of the revision they name, e.g. {wrong[0]}"
    assert all(served[rev] > 0 for rev in revisions) and set(served) == set(revisions)
    assert moves[500] == 0 and moves[200] >= MOVES_BEFORE + MOVES_AFTER
    last = max(replies, key=lambda r: r.began)
    assert last.status == 200, "asks did not succeed again after the outage"


def _first(replies: list[Reply], condition: Callable[[Reply], bool]) -> Reply | None:
    return next((r for r in list(replies) if condition(r)), None)
