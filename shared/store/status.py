"""What is stored, as ``python -m shared status`` and ``GET /api/model`` report it: one frozen
dataclass per shape (:mod:`shared.wire`), from which the OpenAPI document's schema comes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from ..wire import wire_field

RefreshOutcome = Literal["published", "made_current", "up_to_date", "repaired", "failed"]
ArtifactStateName = Literal["ok", "unusable", "damaged", "missing"]
TIME = {"format": "date-time"}


@dataclass(frozen=True)
class RecordDamage:
    """A damaged record of the store: which, what is wrong, and the command that repairs it."""

    record: str = wire_field("the record: current.json, manifest.json of version X, last-refresh.json, refresh.lock, an artifact's blob")
    problem: str = wire_field("what is wrong with it")
    repair: str = wire_field("the command that repairs it")

    @property
    def message(self) -> str:
        return self.problem


@dataclass(frozen=True)
class PointerStatus:
    """``current.json``: its values, or its last recorded ones (its history) when it cannot be read."""

    wire_description: ClassVar[str] = "null until a first version is isolated"

    state: Literal["ok", "damaged", "missing", "dangling"] = wire_field(
        "damaged or missing: current.json cannot be read, and these are its last recorded values (the pointer's history); "
        "dangling: it points at a version that is gone or damaged"
    )
    revision: str | None = wire_field("the version it names (null: damaged, and no history to tell)")
    previous: tuple[str, ...] = wire_field("earlier versions, newest first")
    pinned: bool = wire_field("a scheduled refresh leaves a pinned pointer alone")
    updated_at: str | None = wire_field(schema=TIME)
    problem: str | None = wire_field("what is wrong with it (null: nothing)")
    repair: str | None = wire_field("the command that repairs it")


@dataclass(frozen=True)
class ArtifactListing:
    """One ONNX serving artifact of a version, from its record."""

    state: ArtifactStateName = wire_field(
        "ok; unusable (recorded at build, see reason); damaged (a blob or the record does not match its sha256: reason names "
        "it and the repair command); missing (MODEL_ARTIFACTS expects it and there is none)"
    )
    size: int = wire_field("bytes of its blobs", schema={"minimum": 0})
    sha256: str = wire_field("of artifact.json, which pins each blob's sha256")
    usable: bool = wire_field()
    reason: str | None = wire_field("why it is not usable, and the repair")


@dataclass(frozen=True)
class VersionStatus:
    """One stored version: complete (its manifest is there and intact), incomplete (staged) or damaged."""

    revision: str = wire_field()
    state: Literal["complete", "incomplete", "damaged"] = wire_field(
        "damaged: its manifest.json is damaged (problem, repair): never served or rolled back to"
    )
    complete: bool = wire_field("its manifest exists")
    files: int = wire_field("model files stored (artifacts apart)", schema={"minimum": 0})
    bytes: int = wire_field(schema={"minimum": 0})
    last_modified: str = wire_field("of its newest blob", schema=TIME)
    isolated_at: str | None = wire_field("when it was isolated (its manifest's time)", schema=TIME)
    problem: str | None = wire_field()
    repair: str | None = wire_field()
    artifacts: dict[str, ArtifactListing] = wire_field("ONNX serving artifacts by variant (fp32, int8); {{}} when none")


@dataclass(frozen=True)
class LastRefresh:
    """``last-refresh.json``: the last refresh's outcome (a skipped one keeps the last real outcome)."""

    wire_description: ClassVar[str] = "last-refresh.json: null before the first refresh, and while it is damaged (see damage)"

    outcome: RefreshOutcome | None = wire_field("null when every refresh so far was skipped (pinned pointer)")
    model_id: str = wire_field()
    revision: str | None = wire_field(default=None)
    previous_revision: str | None = wire_field(default=None)
    source: str | None = wire_field(default=None)
    bytes_moved: int = wire_field(default=0, schema={"minimum": 0})
    files_copied: int = wire_field(default=0, schema={"minimum": 0})
    files_reused: int = wire_field(default=0, schema={"minimum": 0})
    deleted_versions: tuple[str, ...] = wire_field("versions retention deleted", default=())
    started: str = wire_field(default="", schema=TIME)
    finished: str | None = wire_field(default=None, schema=TIME)
    seconds: float = wire_field(default=0.0, schema={"minimum": 0})
    error: str | None = wire_field(default=None)
    error_code: str | None = wire_field(default=None)
    files_repaired: tuple[str, ...] = wire_field("files and records a repair wrote again", default=())
    artifacts: dict[str, str] = wire_field('by variant: "built", "exists", "rebuilt" or "unusable: <reason>"', default_factory=dict)
    skipped_reason: Literal["pinned"] | None = wire_field(default=None)
    last_skipped_at: str | None = wire_field(default=None, omit_none=True, schema=TIME)

    @classmethod
    def of(cls, record: dict[str, Any]) -> LastRefresh:
        """The shape of a record read from storage (already checked: :func:`is_refresh_record`);
        fields a record written by an earlier version lacks take their defaults."""
        known = {name: record[name] for name in cls.__dataclass_fields__ if name in record}
        for name in ("deleted_versions", "files_repaired"):
            if isinstance(known.get(name), list):
                known[name] = tuple(known[name])
        return cls(**known)


def is_refresh_record(record: dict[str, Any]) -> bool:
    """Whether a record has the shape every ``last-refresh.json`` this app wrote has."""
    texts = ("revision", "previous_revision", "source", "error", "error_code", "finished", "skipped_reason", "last_skipped_at")
    numbers = ("seconds", "bytes_moved", "files_copied", "files_reused")
    lists = ("deleted_versions", "files_repaired")
    return (
        "outcome" in record
        and (record["outcome"] is None or record["outcome"] in RefreshOutcome.__args__)  # type: ignore[attr-defined]
        and isinstance(record.get("model_id"), str)
        and all(isinstance(record.get(name), (str, type(None))) for name in texts)
        and all(isinstance(record.get(name, 0), (int, float)) and not isinstance(record.get(name, 0), bool) for name in numbers)
        and all(isinstance(record.get(name, []), list) and all(isinstance(v, str) for v in record.get(name, [])) for name in lists)
        and isinstance(record.get("artifacts", {}), dict)
        and record.get("skipped_reason") in (None, "pinned")
    )


@dataclass(frozen=True)
class StoreStatus:
    """The pointer, every stored version, the last refresh, and every damaged record with its repair."""

    model_id: str = wire_field()
    container: str = wire_field()
    pointer: PointerStatus | None = wire_field()
    versions: tuple[VersionStatus, ...] = wire_field("newest first")
    last_refresh: LastRefresh | None = wire_field()
    damage: tuple[RecordDamage, ...] = wire_field("every damaged record of the store, with the command that repairs it")
