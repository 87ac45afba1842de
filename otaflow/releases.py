"""Release service: start releases, act on them and read them back.

The API and the portal share this layer. Starting a release stores the
uploaded image under its content-addressed staging key, records the Release
row with a ``release.start`` audit entry, and then starts the release
workflow with the release id as its workflow id. The id derives from product,
hardware and version, so a CI job that retries its start reaches the same
release instead of creating a second one. A retry must repeat the release's
inputs (image, policy, security version, target groups, allow_downgrade);
different inputs for the same version are a conflict.

Blocking work (the database, the ``minio`` client) runs in worker threads, so
the async methods can be awaited from an event loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path

from anyio import to_thread
from sqlalchemy import Engine, delete, func
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select
from temporalio.client import (
    Client,
    WorkflowExecutionStatus,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import (
    FailureError,
    TemporalError,
    WorkflowAlreadyStartedError,
)
from temporalio.service import RPCError, RPCStatusCode

from otaflow.audit import record_audit
from otaflow.db import session_scope
from otaflow.errors import (
    ConflictError,
    InvalidInputError,
    NotFoundError,
    OtaflowError,
    StorageError,
)
from otaflow.models import (
    Release,
    ReleaseEvent,
    ReleaseTarget,
    ReleaseWave,
    utc_now,
)
from otaflow.release_inputs import ReleaseDraft, UploadedImage
from otaflow.settings import Settings
from otaflow.storage import FirmwareStore, staging_key
from otaflow.temporal import (
    HARDWARE_ATTRIBUTE,
    PHASE_ATTRIBUTE,
    PRODUCT_ATTRIBUTE,
    VERSION_ATTRIBUTE,
    connect_temporal,
)
from workflows.messages import (
    FINAL_PHASES,
    RELEASE_WORKFLOW_NAME,
    AbortRequest,
    ActionResult,
    GateApproval,
    GateRejection,
    PauseRequest,
    ReleasePhase,
    ReleaseProgress,
    ReleaseRequest,
    ReleaseResult,
    ResumeRequest,
)
from workflows.policy import RolloutPolicy
from workflows.policy_errors import show_value

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
# An update waits for a worker to run its validator and handler. Without a
# running worker, temporalio 1.35 repeats UpdateWorkflowExecution until the
# update is accepted, so the call is bounded here.
UPDATE_TIMEOUT_S = 30.0
QUERY_TIMEOUT_S = 5.0
TIMELINE_EVENT_LIMIT = 50


class WorkflowServiceError(OtaflowError):
    """Temporal is unreachable or rejected a call, or no worker finished in time."""


class ReleaseActionRejectedError(ConflictError):
    """The release workflow's update validator rejected an action."""

    def __init__(self, release_id: str, action: str, reason: str) -> None:
        self.release_id = release_id
        self.action = action
        self.reason = reason
        super().__init__(f"{action} of release {release_id} rejected: {reason}")


class ReleaseAction(StrEnum):
    """Actions on a running release; each value is the workflow's update name."""

    APPROVE = "approve"
    REJECT = "reject"
    PAUSE = "pause"
    RESUME = "resume"
    ABORT = "abort"


ActionRequest = (
    GateApproval | GateRejection | PauseRequest | ResumeRequest | AbortRequest
)


# --- Temporal connection -------------------------------------------------------


class TemporalConnector:
    """One lazily connected Temporal client, shared by the requests of a process.

    The connection is made on first use, so the process starts and serves
    database-only requests while Temporal is down. A failed attempt is not
    cached: the next call connects again.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._client: Client | None = None
        self._lock = asyncio.Lock()

    async def client(self) -> Client:
        if self._client is not None:
            return self._client
        async with self._lock:
            if self._client is None:
                self._client = await self._connect()
        return self._client

    async def _connect(self) -> Client:
        address = self._settings.temporal_address
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                client = await connect_temporal(self._settings)
        except (RuntimeError, TimeoutError, RPCError) as error:
            logger.warning("cannot connect to Temporal at %s: %s", address, error)
            raise self.unavailable(error) from error
        logger.info("connected to Temporal at %s", address)
        return client

    def unavailable(self, error: BaseException) -> WorkflowServiceError:
        """Translate a failed Temporal call, dropping the client if it lost contact.

        Dropping the client after UNAVAILABLE makes the next call connect anew.
        """
        if isinstance(error, RPCError) and error.status == RPCStatusCode.UNAVAILABLE:
            self._client = None
        return WorkflowServiceError(
            f"Temporal at {self._settings.temporal_address} is unreachable or"
            f" failed ({error}); start the local stack with 'otaflow dev up', or"
            " set OTAFLOW_TEMPORAL_HOST and OTAFLOW_TEMPORAL_PORT"
        )


# --- Service -------------------------------------------------------------------


@dataclass(frozen=True)
class StartedRelease:
    """Result of a start: the release row, and whether a workflow was started."""

    release: Release
    created: bool


@dataclass(frozen=True)
class TimelineEvent:
    """A step in a release's timeline, as the API and the portal show it."""

    at: datetime
    stage: str
    message: str


@dataclass(frozen=True)
class ReleaseDetails:
    """A release row with its waves and its latest timeline events."""

    release: Release
    waves: list[ReleaseWave]
    events: list[TimelineEvent]


@dataclass(frozen=True)
class LiveProgress:
    """The workflow's ``progress`` query, or why it is unavailable."""

    progress: ReleaseProgress | None
    error: str | None = None


class _ConcurrentStartError(Exception):
    """Another request created or restarted the same release first."""


class ReleaseService:
    """Starts releases, forwards actions to their workflows and reads them."""

    def __init__(
        self, settings: Settings, engine: Engine, temporal: TemporalConnector
    ) -> None:
        self._settings = settings
        self._engine = engine
        self._temporal = temporal
        self._store: FirmwareStore | None = None
        self._store_lock = threading.Lock()

    def store(self) -> FirmwareStore:
        """Create the firmware store and its bucket on first use, and return it.

        Blocks on S3 requests, so async callers run it in a worker thread.
        """
        with self._store_lock:
            if self._store is None:
                store = FirmwareStore(self._settings)
                store.ensure_bucket()
                self._store = store
            return self._store

    # Starting ---------------------------------------------------------------

    async def start_release(
        self, draft: ReleaseDraft, image: UploadedImage, actor: str
    ) -> StartedRelease:
        """Start the release of ``image``, or return the release already started.

        A release that failed verification starts again with the inputs of
        this request. Any other existing release is returned as it is when the
        request repeats its inputs; otherwise ``ConflictError`` names the
        inputs that differ. Raises ``WorkflowServiceError`` or
        ``StorageError`` when Temporal or the object store fails, and then
        leaves no Release row or staging object.
        """
        if image.size_bytes == 0:
            # The file name here is the server's temporary file, so it is not
            # shown back.
            raise InvalidInputError(
                "image", None, "the image is empty (0 bytes); upload the firmware file"
            )
        sha256 = draft.declared_sha256 or image.sha256
        request = _release_request(draft, image, sha256, actor)
        existing = await to_thread.run_sync(self.get_release, draft.release_id)
        if existing is not None and existing.state != ReleasePhase.FAILED:
            await self._check_same_inputs(existing, request)
            logger.info(
                "release %s already exists in phase %s; not starting it again",
                existing.id,
                existing.state,
            )
            return StartedRelease(existing, created=False)

        await self._check_no_active_release(request)
        await to_thread.run_sync(self._upload, request.staging_key, image.path)
        try:
            release, previous = await to_thread.run_sync(
                self._record_start, request, existing
            )
        except _ConcurrentStartError:
            release = await to_thread.run_sync(self._settle_concurrent_start, request)
            await self._check_same_inputs(release, request)
            return StartedRelease(release, created=False)

        try:
            await self._start_workflow(request)
        except Exception:
            await to_thread.run_sync(self._undo_start, request, previous)
            raise
        logger.info(
            "started release %s (sha256 %s, %d bytes) for %s",
            request.release_id,
            request.sha256,
            request.size_bytes,
            actor,
        )
        return StartedRelease(release, created=True)

    def _upload(self, key: str, path: Path) -> None:
        try:
            self.store().put_file(key, path)
        except StorageError as error:
            raise StorageError(
                "cannot store the image in the object store at"
                f" {self._settings.s3_endpoint} ({error}); start the local stack"
                " with 'otaflow dev up', or check the OTAFLOW_S3_* settings"
            ) from error

    async def _check_no_active_release(self, request: ReleaseRequest) -> None:
        """Raise ``ConflictError`` while another release targets the same devices.

        Two releases of one product and hardware would each install their
        build on the same devices, and the later wave of the older version
        would downgrade devices that the newer one had updated. A row that is
        not final but whose workflow no longer runs (terminated in the
        Temporal UI, say) does not block.
        """
        # NOTE: two starts of different versions within the same moment can
        # both pass this check, because it runs before the row is written.
        for other in await to_thread.run_sync(self._active_releases_like, request):
            if await self._workflow_running(other.id):
                raise ConflictError(
                    f"release {other.id} of product {other.product} on hardware"
                    f" {other.hardware} is still {other.state}, and two releases"
                    " must not update the same devices; wait until it ends, or"
                    f" abort it with 'otaflow release abort {other.id} --comment"
                    " TEXT'"
                )
            logger.warning(
                "release %s is recorded as %s but its workflow is not running;"
                " not letting it block release %s",
                other.id,
                other.state,
                request.release_id,
            )

    def _active_releases_like(self, request: ReleaseRequest) -> list[Release]:
        """List the releases of the request's product and hardware not yet final."""
        with Session(self._engine) as session:
            rows = session.exec(
                select(Release).where(
                    Release.product == request.product,
                    Release.hardware == request.hardware,
                    Release.id != request.release_id,
                    col(Release.state).not_in([phase.value for phase in FINAL_PHASES]),
                )
            ).all()
        return list(rows)

    async def _workflow_running(self, release_id: str) -> bool:
        client = await self._temporal.client()
        try:
            description = await client.get_workflow_handle(release_id).describe(
                rpc_timeout=timedelta(seconds=QUERY_TIMEOUT_S)
            )
        except RPCError as error:
            if error.status == RPCStatusCode.NOT_FOUND:
                return False
            raise self._temporal.unavailable(error) from error
        return description.status == WorkflowExecutionStatus.RUNNING

    def _record_start(
        self, request: ReleaseRequest, existing: Release | None
    ) -> tuple[Release, Release | None]:
        """Insert the Release row, or reset a failed one.

        Returns the row as written and, after a reset, a copy of the row as it
        was before.
        """
        try:
            with session_scope(self._engine) as session:
                previous = None
                if existing is None:
                    release = _new_release_row(request)
                    session.add(release)
                else:
                    release, previous = _reset_failed_release(session, request)
                record_audit(
                    session,
                    request.started_by,
                    "release.start",
                    request.release_id,
                    _start_detail(request, restarted=previous is not None),
                )
                return release, previous
        except IntegrityError as error:
            raise _ConcurrentStartError() from error

    def _settle_concurrent_start(self, request: ReleaseRequest) -> Release:
        """Return the release that another request created first."""
        release = self.get_release(request.release_id)
        if release is None or release.staging_key != request.staging_key:
            self._delete_staging_object(request.staging_key)
        if release is None:
            raise ConflictError(
                f"release {request.release_id} was changed by another request while"
                " this one started it; retry the request"
            )
        return release

    async def _check_same_inputs(
        self, release: Release, request: ReleaseRequest
    ) -> None:
        """Raise ``ConflictError`` unless ``request`` repeats the release's inputs.

        The SHA-256, security version and policy are on the release row. The
        target groups and allow_downgrade are read from the request that
        started the release's workflow.
        """
        _check_same_artifact(release, request.sha256)
        started = await self._started_request(release.id)
        differences = _input_differences(release, started, request)
        if differences:
            stored = ", ".join(difference.stored for difference in differences)
            requested = ", ".join(difference.requested for difference in differences)
            raise ConflictError(
                f"release {release.id} exists with {stored}; this request has"
                f" {requested}; the inputs of a release cannot change, so publish"
                " the build under a new version, and abort release"
                f" {release.id} first if it should stop"
            )

    async def _started_request(self, release_id: str) -> ReleaseRequest | None:
        """Read the request that started the latest workflow run of a release.

        Returns None when Temporal has no such workflow (its start has not
        happened yet, or its history was deleted after the retention period),
        or when the stored request no longer decodes as a ``ReleaseRequest``.
        """
        client = await self._temporal.client()
        handle = client.get_workflow_handle(release_id)
        try:
            async for event in handle.fetch_history_events(
                page_size=1, rpc_timeout=timedelta(seconds=QUERY_TIMEOUT_S)
            ):
                attributes = event.workflow_execution_started_event_attributes
                decoded = await client.data_converter.decode(
                    attributes.input.payloads, [ReleaseRequest]
                )
                request: ReleaseRequest = decoded[0]
                return request
        except RPCError as error:
            if error.status == RPCStatusCode.NOT_FOUND:
                return None
            raise self._temporal.unavailable(error) from error
        except ValueError as error:
            logger.warning(
                "the start request of release %s does not decode (%s); comparing"
                " only the inputs stored on its row",
                release_id,
                error,
            )
        return None

    async def _start_workflow(self, request: ReleaseRequest) -> None:
        client = await self._temporal.client()
        try:
            await client.start_workflow(
                RELEASE_WORKFLOW_NAME,
                request,
                id=request.release_id,
                task_queue=self._settings.task_queue,
                result_type=ReleaseResult,
                # Only a failed run may be replaced; a start while one runs
                # returns that run, so a retried CI request is harmless.
                id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY,
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                search_attributes=_search_attributes(request),
            )
        except WorkflowAlreadyStartedError as error:
            raise ConflictError(
                f"release {request.release_id} already has a closed workflow in"
                " Temporal that did not fail, so it cannot be started again;"
                " publish the build under a new version"
            ) from error
        except RPCError as error:
            raise self._temporal.unavailable(error) from error

    def _undo_start(self, request: ReleaseRequest, previous: Release | None) -> None:
        """Remove what a start wrote after its workflow failed to start."""
        logger.warning(
            "starting the workflow of release %s failed; removing its row and"
            " staging object %s",
            request.release_id,
            request.staging_key,
        )
        try:
            with session_scope(self._engine) as session:
                row = session.get(Release, request.release_id)
                if row is not None and previous is None:
                    session.delete(row)
                elif row is not None and previous is not None:
                    _restore_release(row, previous)
                    session.add(row)
                record_audit(
                    session,
                    request.started_by,
                    "release.start_failed",
                    request.release_id,
                    "the workflow could not be started",
                )
        except Exception:
            logger.exception(
                "cannot remove the row of release %s after a failed start",
                request.release_id,
            )
        self._delete_staging_object(request.staging_key)

    def _delete_staging_object(self, key: str) -> None:
        try:
            self.store().delete(key)
        except OtaflowError:
            logger.exception("cannot delete staging object %s", key)

    # Actions ----------------------------------------------------------------

    async def act(
        self, release_id: str, action: ReleaseAction, request: ActionRequest
    ) -> ActionResult:
        """Send ``action`` to the release's workflow as an update, and audit it.

        Raises ``NotFoundError`` for an unknown release,
        ``ReleaseActionRejectedError`` when the workflow's validator rejects
        the action, ``ConflictError`` when the workflow has closed, and
        ``WorkflowServiceError`` when Temporal or the worker does not respond.
        """
        release = await to_thread.run_sync(self.get_release, release_id)
        if release is None:
            raise NotFoundError("release", release_id)
        handle = (await self._temporal.client()).get_workflow_handle(release_id)
        try:
            async with asyncio.timeout(UPDATE_TIMEOUT_S):
                result: ActionResult = await handle.execute_update(
                    action.value, request, result_type=ActionResult
                )
        except WorkflowUpdateFailedError as error:
            reason = _failure_reason(error.cause)
            logger.info("%s of release %s rejected: %s", action, release_id, reason)
            raise ReleaseActionRejectedError(release_id, action, reason) from error
        except (TimeoutError, WorkflowUpdateRPCTimeoutOrCancelledError) as error:
            raise WorkflowServiceError(
                f"no worker completed the {action} of release {release_id} within"
                f" {UPDATE_TIMEOUT_S:g} s; check that the otaflow worker runs and"
                f" polls task queue {self._settings.task_queue!r}"
            ) from error
        except RPCError as error:
            if error.status == RPCStatusCode.NOT_FOUND:
                raise ConflictError(
                    f"release {release_id} is {release.state} and has no running"
                    f" workflow, so it accepts no {action}"
                ) from error
            raise self._temporal.unavailable(error) from error

        await to_thread.run_sync(self._record_action, release_id, action, request)
        logger.info("%s of release %s by %s", action, release_id, request.actor)
        return result

    def _record_action(
        self, release_id: str, action: ReleaseAction, request: ActionRequest
    ) -> None:
        with session_scope(self._engine) as session:
            record_audit(
                session,
                request.actor,
                f"release.{action}",
                release_id,
                request.model_dump_json(exclude={"actor"}),
            )

    async def live_progress(self, release: Release) -> LiveProgress:
        """Query the workflow of a release that is not final.

        A failed query, or an unreachable Temporal, comes back as ``error``
        in the result instead of an exception.

        A final release needs no query: its row holds the outcome, and a query
        of a closed workflow would need a worker to replay its history.
        """
        if release.state in FINAL_PHASES:
            return LiveProgress(None)
        try:
            handle = (await self._temporal.client()).get_workflow_handle(release.id)
            progress: ReleaseProgress = await handle.query(
                "progress",
                result_type=ReleaseProgress,
                rpc_timeout=timedelta(seconds=QUERY_TIMEOUT_S),
            )
        except WorkflowServiceError as error:
            return LiveProgress(None, str(error))
        except (TemporalError, ValueError) as error:
            # ValueError covers a result that does not decode as ReleaseProgress.
            logger.warning("progress query of release %s failed: %s", release.id, error)
            if isinstance(error, RPCError):
                self._temporal.unavailable(error)
            return LiveProgress(None, f"progress query failed: {error}")
        return LiveProgress(progress)

    # Reads (blocking) -------------------------------------------------------

    def get_release(self, release_id: str) -> Release | None:
        with Session(self._engine) as session:
            return session.get(Release, release_id)

    def load_release_details(self, release_id: str) -> ReleaseDetails:
        """Load the release with its waves and latest timeline events, oldest first."""
        with Session(self._engine) as session:
            release = session.get(Release, release_id)
            if release is None:
                raise NotFoundError("release", release_id)
            waves = session.exec(
                select(ReleaseWave)
                .where(ReleaseWave.release_id == release_id)
                .order_by(col(ReleaseWave.wave_index))
            ).all()
            latest_events = session.exec(
                select(ReleaseEvent.at, ReleaseEvent.stage, ReleaseEvent.message)
                .where(ReleaseEvent.release_id == release_id)
                .order_by(col(ReleaseEvent.id).desc())
                .limit(TIMELINE_EVENT_LIMIT)
            ).all()
        events = [TimelineEvent(*event) for event in reversed(latest_events)]
        return ReleaseDetails(release, list(waves), events)

    def list_releases(
        self,
        *,
        state: str | None = None,
        product: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> tuple[list[Release], int]:
        """Load one page of releases, newest first, and count all that match."""
        conditions = []
        if state is not None:
            conditions.append(col(Release.state) == state)
        if product is not None:
            conditions.append(col(Release.product) == product)
        with Session(self._engine) as session:
            total = session.exec(
                select(func.count()).select_from(Release).where(*conditions)
            ).one()
            rows = session.exec(
                select(Release)
                .where(*conditions)
                .order_by(col(Release.created_at).desc(), col(Release.id).desc())
                .limit(limit)
                .offset(offset)
            ).all()
        return list(rows), total


# --- Row helpers ---------------------------------------------------------------


@dataclass(frozen=True)
class _InputDifference:
    """One input of a release start, as stored and as requested again."""

    stored: str
    requested: str


def _input_differences(
    release: Release, started: ReleaseRequest | None, request: ReleaseRequest
) -> list[_InputDifference]:
    """List the inputs of ``request`` that differ from those of ``release``.

    ``started`` is the request that started the release's workflow; without
    it, target groups and allow_downgrade cannot be compared.
    """
    differences = []
    stored_policy = _stored_policy(release)
    if stored_policy is not None and stored_policy != request.policy:
        differences.append(_policy_difference(stored_policy, request.policy))
    if release.security_version != request.security_version:
        differences.append(
            _InputDifference(
                f"security version {release.security_version}",
                f"security version {request.security_version}",
            )
        )
    if started is None:
        return differences
    if set(started.target_groups) != set(request.target_groups):
        differences.append(
            _InputDifference(
                _describe_groups(started.target_groups),
                _describe_groups(request.target_groups),
            )
        )
    if started.allow_downgrade != request.allow_downgrade:
        differences.append(
            _InputDifference(
                _describe_downgrade(started.allow_downgrade),
                _describe_downgrade(request.allow_downgrade),
            )
        )
    return differences


def _stored_policy(release: Release) -> RolloutPolicy | None:
    try:
        return RolloutPolicy.model_validate_json(release.policy_json)
    except ValueError as error:
        logger.warning(
            "the stored policy of release %s does not load (%s); not comparing it",
            release.id,
            error,
        )
        return None


def _policy_difference(
    stored: RolloutPolicy, requested: RolloutPolicy
) -> _InputDifference:
    if stored.name != requested.name:
        return _InputDifference(f"policy {stored.name!r}", f"policy {requested.name!r}")
    # Two versions of one policy file: name the first setting that changed.
    found = _first_difference(
        stored.model_dump(mode="json"), requested.model_dump(mode="json")
    )
    if found is None:
        return _InputDifference(f"policy {stored.name!r}", "another version of it")
    path, stored_value, requested_value = found
    return _InputDifference(
        f"policy {stored.name!r} with {path} {show_value(stored_value)}",
        f"{path} {show_value(requested_value)}",
    )


def _first_difference(
    stored: object, requested: object, path: str = ""
) -> tuple[str, object, object] | None:
    """Return the path and both values where two JSON values first differ."""
    if isinstance(stored, dict) and isinstance(requested, dict):
        keys = [*stored, *(key for key in requested if key not in stored)]
        for key in keys:
            child = f"{path}.{key}" if path else str(key)
            found = _first_difference(stored.get(key), requested.get(key), child)
            if found is not None:
                return found
        return None
    if isinstance(stored, list) and isinstance(requested, list):
        if len(stored) != len(requested):
            return (f"number of {path}", len(stored), len(requested))
        for index, (left, right) in enumerate(zip(stored, requested, strict=True)):
            found = _first_difference(left, right, f"{path}[{index}]")
            if found is not None:
                return found
        return None
    if stored != requested:
        return (path, stored, requested)
    return None


def _describe_groups(groups: tuple[str, ...]) -> str:
    if not groups:
        return "all device groups"
    return "device groups " + ", ".join(sorted(groups))


def _describe_downgrade(allowed: bool) -> str:
    return "downgrade allowed" if allowed else "downgrade not allowed"


def _check_same_artifact(release: Release, sha256: str) -> None:
    if release.sha256 != sha256:
        raise ConflictError(
            f"release {release.id} was started with SHA-256 {release.sha256}, not"
            f" {sha256}; a version's image cannot change, so publish the new"
            " build under a new version"
        )


def _release_request(
    draft: ReleaseDraft, image: UploadedImage, sha256: str, actor: str
) -> ReleaseRequest:
    # The staging key names the measured digest, while the request carries the
    # declared one: the workflow's first activity compares the two.
    key = staging_key(draft.product, draft.hardware, draft.version, image.sha256)
    return ReleaseRequest(
        release_id=draft.release_id,
        product=draft.product,
        hardware=draft.hardware,
        version=draft.version,
        security_version=draft.security_version,
        sha256=sha256,
        size_bytes=image.size_bytes,
        staging_key=key,
        policy=draft.policy,
        started_by=actor,
        allow_downgrade=draft.allow_downgrade,
        target_groups=draft.target_groups,
    )


def _new_release_row(request: ReleaseRequest) -> Release:
    return Release(
        id=request.release_id,
        product=request.product,
        hardware=request.hardware,
        version=request.version,
        security_version=request.security_version,
        sha256=request.sha256,
        size_bytes=request.size_bytes,
        staging_key=request.staging_key,
        policy_json=request.policy.model_dump_json(),
        state=ReleasePhase.PENDING,
        started_by=request.started_by,
    )


def _reset_failed_release(
    session: Session, request: ReleaseRequest
) -> tuple[Release, Release]:
    """Reset a failed release to pending; return it and a copy of it as it was.

    The failed run's waves and device targets are deleted, because the new
    run plans its waves again. Its timeline events stay as history.
    """
    row = session.exec(
        select(Release).where(Release.id == request.release_id).with_for_update()
    ).one()
    if row.state != ReleasePhase.FAILED:
        raise _ConcurrentStartError()
    previous = Release.model_validate(row.model_dump())
    _restore_release(row, _new_release_row(request))
    row.created_at = previous.created_at
    session.add(row)
    for table in (ReleaseWave, ReleaseTarget):
        session.execute(delete(table).where(col(table.release_id) == row.id))
    return row, previous


def _restore_release(row: Release, source: Release) -> None:
    """Copy every column of ``source`` except the id onto ``row``."""
    for name, value in source.model_dump(exclude={"id"}).items():
        setattr(row, name, value)
    row.updated_at = utc_now()


def _start_detail(request: ReleaseRequest, restarted: bool) -> str:
    detail = (
        f"sha256 {request.sha256}, {request.size_bytes} bytes,"
        f" policy {request.policy.name}"
    )
    return detail + ", restarted after a failed run" if restarted else detail


def _search_attributes(request: ReleaseRequest) -> TypedSearchAttributes:
    return TypedSearchAttributes(
        [
            SearchAttributePair(PRODUCT_ATTRIBUTE, request.product),
            SearchAttributePair(HARDWARE_ATTRIBUTE, request.hardware),
            SearchAttributePair(VERSION_ATTRIBUTE, request.version),
            SearchAttributePair(PHASE_ATTRIBUTE, ReleasePhase.PENDING.value),
        ]
    )


def _failure_reason(error: BaseException) -> str:
    if isinstance(error, FailureError):
        return error.message
    return str(error)
