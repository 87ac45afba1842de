"""Release activities against real SeaweedFS, Mosquitto and a migrated database."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine
from sqlmodel import Session, delete, select
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.monitoring import MonitoringActivities
from activities.signing import SigningActivities
from activities.storage import StorageActivities
from activities.target_queries import count_wave, mark_dispatched
from activities.targeting import TargetingActivities
from activities.verification import VerificationActivities
from otaflow.db import make_engine, session_scope
from otaflow.heartbeats import INGEST, record_heartbeat
from otaflow.manifest import FileSigningKey, TrustedKey, TrustStore, verify_manifest
from otaflow.models import Device, Firmware, ReleaseTarget, ServiceHeartbeat, utc_now
from otaflow.settings import Settings
from otaflow.storage import FirmwareStore, image_key, staging_key
from tests.databases import migrated_database
from workflows.messages import (
    AwaitWaveInput,
    PlanWavesInput,
    SignManifestInput,
    StoreReleaseInput,
    VerifyArtifactInput,
)
from workflows.policy import default_policy, resolve_policy

IMAGE = secrets.token_bytes(4096)
IMAGE_SHA = hashlib.sha256(IMAGE).hexdigest()


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    with migrated_database("sqlite", tmp_path_factory.mktemp("db")) as url:
        engine = make_engine(url)
        yield engine
        engine.dispose()


@pytest.fixture(scope="module")
def store(infra_stack: Settings) -> FirmwareStore:
    store = FirmwareStore(infra_stack)
    store.ensure_bucket()
    return store


@pytest.fixture
def product() -> str:
    return f"p{secrets.token_hex(4)}"


def add_devices(
    engine: Engine, product: str, count: int, version: str = "1.0.0", **fields: object
) -> list[str]:
    ids = [f"{product}-{index:03d}" for index in range(count)]
    with session_scope(engine) as session:
        for device_id in ids:
            session.add(
                Device(
                    device_id=device_id,
                    product=product,
                    hardware="qemu_arm64",
                    current_version=version,
                    online=True,
                    **fields,
                )
            )
    return ids


def verify_input(product: str, key: str, **overrides: object) -> VerifyArtifactInput:
    values: dict[str, object] = {
        "release_id": f"{product}:qemu_arm64:2.0.0",
        "product": product,
        "hardware": "qemu_arm64",
        "version": "2.0.0",
        "security_version": 0,
        "sha256": IMAGE_SHA,
        "size_bytes": len(IMAGE),
        "staging_key": key,
        "allow_downgrade": False,
    }
    return VerifyArtifactInput.model_validate({**values, **overrides})


def staged(store: FirmwareStore, product: str, data: bytes = IMAGE) -> str:
    key = staging_key(product, "qemu_arm64", "2.0.0", hashlib.sha256(data).hexdigest())
    store.put_bytes(key, data)
    return key


async def verify(
    infra_stack: Settings,
    engine: Engine,
    store: FirmwareStore,
    request: VerifyArtifactInput,
) -> object:
    activities = VerificationActivities(infra_stack, engine, store)
    return await ActivityEnvironment().run(activities.verify_artifact, request)


async def test_verify_accepts_matching_build(
    infra_stack: Settings, engine: Engine, store: FirmwareStore, product: str
) -> None:
    add_devices(engine, product, 3)
    key = staged(store, product)
    result = await verify(infra_stack, engine, store, verify_input(product, key))
    assert result.fleet_devices == 3  # type: ignore[attr-defined]


async def test_verify_hash_mismatch_names_both_and_removes_upload(
    infra_stack: Settings, engine: Engine, store: FirmwareStore, product: str
) -> None:
    add_devices(engine, product, 3)
    key = staged(store, product)
    declared = "0" * 64
    with pytest.raises(ApplicationError) as caught:
        await verify(
            infra_stack, engine, store, verify_input(product, key, sha256=declared)
        )
    assert declared in caught.value.message
    assert IMAGE_SHA in caught.value.message
    assert caught.value.non_retryable
    assert store.size_of(key) is None


async def test_verify_rejects_version_not_newer(
    infra_stack: Settings, engine: Engine, store: FirmwareStore, product: str
) -> None:
    add_devices(engine, product, 2, version="2.0.0")
    key = staged(store, product)
    with pytest.raises(ApplicationError, match=r"not newer than 2\.0\.0 running on 2"):
        await verify(infra_stack, engine, store, verify_input(product, key))


async def test_verify_downgrade_needs_higher_security_version(
    infra_stack: Settings, engine: Engine, store: FirmwareStore, product: str
) -> None:
    add_devices(engine, product, 2, version="3.0.0", security_version=4)
    key = staged(store, product)
    request = verify_input(product, key, allow_downgrade=True, security_version=4)
    with pytest.raises(ApplicationError, match="security version above 4"):
        await verify(infra_stack, engine, store, request)


async def test_verify_unknown_hardware_is_rejected(
    infra_stack: Settings, engine: Engine, store: FirmwareStore, product: str
) -> None:
    add_devices(engine, product, 2)
    key = staged(store, product)
    with pytest.raises(ApplicationError, match="hardware: no registered device"):
        await verify(
            infra_stack, engine, store, verify_input(product, key, hardware="x86")
        )


async def test_verify_unknown_product_names_product(
    infra_stack: Settings, engine: Engine, store: FirmwareStore, product: str
) -> None:
    key = staged(store, product)

    with pytest.raises(ApplicationError) as caught:
        await verify(infra_stack, engine, store, verify_input(product, key))

    assert caught.value.message.startswith("product: no registered device")
    assert repr(product) in caught.value.message


async def test_verify_oversized_build_is_rejected(
    infra_stack: Settings, engine: Engine, store: FirmwareStore, product: str
) -> None:
    limit = infra_stack.max_image_bytes
    with pytest.raises(ApplicationError, match="exceeds the limit"):
        await verify(
            infra_stack, engine, store, verify_input(product, "x", size_bytes=limit + 1)
        )


async def sign_and_store(
    infra_stack: Settings, engine: Engine, store: FirmwareStore, product: str, key: str
) -> tuple[StoreReleaseInput, FileSigningKey]:
    signer = FileSigningKey.generate()
    signed = await ActivityEnvironment().run(
        SigningActivities(infra_stack, signer).sign_manifest,
        SignManifestInput(
            release_id=f"{product}:qemu_arm64:2.0.0",
            product=product,
            hardware="qemu_arm64",
            version="2.0.0",
            security_version=0,
            sha256=IMAGE_SHA,
            size_bytes=len(IMAGE),
            image_key=image_key(product, "qemu_arm64", "2.0.0"),
            target_groups=(),
            created=datetime.now(UTC),
        ),
    )
    request = StoreReleaseInput(
        release_id=f"{product}:qemu_arm64:2.0.0",
        product=product,
        hardware="qemu_arm64",
        version="2.0.0",
        security_version=0,
        sha256=IMAGE_SHA,
        size_bytes=len(IMAGE),
        staging_key=key,
        image_key=image_key(product, "qemu_arm64", "2.0.0"),
        signed=signed,
        uploaded_by="token:ci",
    )
    await ActivityEnvironment().run(
        StorageActivities(engine, store).store_release, request
    )
    return request, signer


async def test_store_writes_image_manifest_signature(
    infra_stack: Settings, engine: Engine, store: FirmwareStore, product: str
) -> None:
    key = staged(store, product)
    _, signer = await sign_and_store(infra_stack, engine, store, product, key)
    prefix = f"releases/{product}/qemu_arm64/2.0.0/"
    assert sorted(store.list_keys(prefix)) == [
        prefix + "image.bin",
        prefix + "manifest.json",
        prefix + "manifest.sig",
    ]
    assert store.digest(prefix + "image.bin") == (IMAGE_SHA, len(IMAGE))
    assert store.size_of(key) is None
    with Session(engine) as session:
        firmware = session.exec(
            select(Firmware).where(Firmware.product == product)
        ).one()
    assert firmware.key_id == signer.key_id


async def test_stored_manifest_verifies_on_a_device(
    infra_stack: Settings, engine: Engine, store: FirmwareStore, product: str
) -> None:
    key = staged(store, product)
    request, signer = await sign_and_store(infra_stack, engine, store, product, key)
    trust = TrustStore().with_key(TrustedKey.from_public_key(signer.public_key))
    manifest = verify_manifest(
        request.signed,
        trust,
        now=datetime.now(UTC),
        product=product,
        hardware="qemu_arm64",
        group="default",
        highest_security_version=0,
    )
    assert manifest.sha256 == IMAGE_SHA


async def test_store_twice_is_harmless(
    infra_stack: Settings, engine: Engine, store: FirmwareStore, product: str
) -> None:
    key = staged(store, product)
    request, _ = await sign_and_store(infra_stack, engine, store, product, key)
    staged(store, product)
    await ActivityEnvironment().run(
        StorageActivities(engine, store).store_release, request
    )
    assert store.digest(request.image_key) == (IMAGE_SHA, len(IMAGE))


async def test_store_refuses_to_replace_a_stored_build(
    infra_stack: Settings, engine: Engine, store: FirmwareStore, product: str
) -> None:
    key = staged(store, product)
    request, _ = await sign_and_store(infra_stack, engine, store, product, key)
    other = secrets.token_bytes(100)
    other_key = staged(store, product, other)
    replaced = request.model_copy(
        update={
            "staging_key": other_key,
            "sha256": hashlib.sha256(other).hexdigest(),
            "size_bytes": len(other),
        }
    )
    with pytest.raises(ApplicationError, match="immutable"):
        await ActivityEnvironment().run(
            StorageActivities(engine, store).store_release, replaced
        )
    assert store.digest(request.image_key) == (IMAGE_SHA, len(IMAGE))


async def test_store_detects_upload_replaced_after_verification(
    infra_stack: Settings, engine: Engine, store: FirmwareStore, product: str
) -> None:
    key = staged(store, product)
    store.put_bytes(key, b"evil" * 1024)  # Same length, other bytes.
    with pytest.raises(ApplicationError, match="changed after verification"):
        await sign_and_store(infra_stack, engine, store, product, key)
    assert store.size_of(image_key(product, "qemu_arm64", "2.0.0")) is None


def plan_input(
    product: str, policy_document: dict[str, object] | None = None
) -> PlanWavesInput:
    policy = resolve_policy(policy_document) if policy_document else default_policy()
    return PlanWavesInput(
        release_id=f"{product}:qemu_arm64:2.0.0",
        product=product,
        hardware="qemu_arm64",
        version="2.0.0",
        target_groups=(),
        policy=policy,
    )


async def test_plan_splits_fleet_into_waves(engine: Engine, product: str) -> None:
    add_devices(engine, product, 50)
    plan = await ActivityEnvironment().run(
        TargetingActivities(engine).plan_waves, plan_input(product)
    )
    assert plan.wave_sizes == (3, 10, 37)
    assert count_wave(engine, f"{product}:qemu_arm64:2.0.0", 0).targeted == 3


async def test_plan_skips_offline_and_current_devices(
    engine: Engine, product: str
) -> None:
    add_devices(engine, product, 10)
    with session_scope(engine) as session:
        for device in session.exec(
            select(Device).where(Device.product == product)
        ).all()[:4]:
            device.online = False
            session.add(device)
    with session_scope(engine) as session:
        session.add(
            Device(
                device_id=f"{product}-current",
                product=product,
                hardware="qemu_arm64",
                current_version="2.0.0",
                online=True,
            )
        )
    plan = await ActivityEnvironment().run(
        TargetingActivities(engine).plan_waves, plan_input(product)
    )
    assert sum(plan.wave_sizes) == 6
    assert plan.skipped_offline == 4
    assert plan.already_current == 1


async def test_plan_is_same_on_retry(engine: Engine, product: str) -> None:
    add_devices(engine, product, 20)
    activities = TargetingActivities(engine)
    first = await ActivityEnvironment().run(activities.plan_waves, plan_input(product))
    second = await ActivityEnvironment().run(activities.plan_waves, plan_input(product))
    assert first.wave_sizes == second.wave_sizes


async def test_plan_same_canary_for_every_release(engine: Engine, product: str) -> None:
    add_devices(engine, product, 40)
    canaries = []
    for version in ("2.0.0", "2.1.0"):
        request = plan_input(product).model_copy(
            update={"release_id": f"{product}:qemu_arm64:{version}", "version": version}
        )
        await ActivityEnvironment().run(TargetingActivities(engine).plan_waves, request)
        with Session(engine) as session:
            rows = session.exec(
                select(ReleaseTarget.device_id).where(
                    ReleaseTarget.release_id == request.release_id,
                    ReleaseTarget.wave_index == 0,
                )
            ).all()
        canaries.append(sorted(rows))
    assert len(canaries[0]) == 2
    assert canaries[0] == canaries[1]


def overdue_wave(engine: Engine, product: str, release_id: str) -> list[str]:
    """Wave 0 dispatched 30 s ago, its first device succeeded, the other silent."""
    with Session(engine) as session:
        ids = list(
            session.exec(
                select(ReleaseTarget.device_id).where(
                    ReleaseTarget.release_id == release_id,
                    ReleaseTarget.wave_index == 0,
                )
            ).all()
        )
    mark_dispatched(engine, release_id, ids, utc_now() - timedelta(seconds=30))
    with session_scope(engine) as session:
        first = session.get(ReleaseTarget, (release_id, ids[0]))
        assert first is not None
        first.state, first.state_rank = "succeeded", 8
        session.add(first)
    return ids


async def test_await_wave_fails_devices_past_deadline(
    infra_stack: Settings, engine: Engine, product: str
) -> None:
    add_devices(engine, product, 3)
    release_id = f"{product}:qemu_arm64:2.0.0"
    await ActivityEnvironment().run(
        TargetingActivities(engine).plan_waves, plan_input(product)
    )
    overdue_wave(engine, product, release_id)
    record_heartbeat(engine, INGEST, "test")
    settings = infra_stack.model_copy(update={"await_poll_interval_s": 0.05})
    counts = await ActivityEnvironment().run(
        MonitoringActivities(settings, engine).await_wave,
        AwaitWaveInput(release_id=release_id, wave_index=0, device_deadline_s=10),
    )
    assert counts.targeted == 2
    assert counts.succeeded == 1
    assert counts.failed == 1
    assert counts.failure_reasons == {"deadline_exceeded": 1}
    assert [sample.reason for sample in counts.failure_samples] == ["deadline_exceeded"]
    assert counts.in_progress == 0


async def test_await_wave_pauses_deadlines_while_ingest_is_down(
    infra_stack: Settings, engine: Engine, product: str
) -> None:
    add_devices(engine, product, 3)
    release_id = f"{product}:qemu_arm64:2.0.0"
    await ActivityEnvironment().run(
        TargetingActivities(engine).plan_waves, plan_input(product)
    )
    ids = overdue_wave(engine, product, release_id)
    with session_scope(engine) as session:
        session.exec(delete(ServiceHeartbeat))  # type: ignore[call-overload]
    settings = infra_stack.model_copy(update={"await_poll_interval_s": 0.05})
    waiting = asyncio.ensure_future(
        ActivityEnvironment().run(
            MonitoringActivities(settings, engine).await_wave,
            AwaitWaveInput(release_id=release_id, wave_index=0, device_deadline_s=10),
        )
    )
    await asyncio.sleep(1)
    with Session(engine) as session:
        silent = session.get(ReleaseTarget, (release_id, ids[1]))
    assert not waiting.done()
    assert silent is not None
    assert silent.state == "dispatched"

    record_heartbeat(engine, INGEST, "test")
    counts = await asyncio.wait_for(waiting, 10)
    assert counts.failure_reasons == {"deadline_exceeded": 1}
