"""The device page with its boot logs, and lab device marks on the release page."""

from __future__ import annotations

from datetime import timedelta

from fastapi.testclient import TestClient
from sqlalchemy import Engine

from otaflow.db import session_scope
from otaflow.models import BootLog, Device, ReleaseTarget, utc_now
from otaflow.protocol import STATE_RANK, DeviceState
from tests.portal.portal_support import seed_release

BANNER = "U-Boot 2023.01+dfsg-2+deb12u3 (Jun 22 2026 - 08:38:07 +0000)"
LAB_CHIP = (
    '<span class="chip" title="Lab device: boots each release in QEMU">lab</span>'
)


def seed_device(engine: Engine, device_id: str, product: str, *, lab: bool) -> None:
    with session_scope(engine) as session:
        session.add(
            Device(
                device_id=device_id,
                product=product,
                hardware="qemu_arm64",
                lab=lab,
                current_version="1.0.0",
                previous_version="2.0.0" if lab else None,
                boot_result="failed" if lab else "ok",
                boot_banner=BANNER if lab else None,
                crash_count=1 if lab else 0,
                online=True,
            )
        )


def seed_boot_logs(engine: Engine, device_id: str) -> None:
    """A good factory boot, then a failed trial boot of 2.0.0 with its fallback."""
    now = utc_now()
    with session_scope(engine) as session:
        session.add(
            BootLog(
                device_id=device_id,
                seq=0,
                version="1.0.0",
                slot="a",
                result="ok",
                log="=== power-on boot of slot a (1.0.0), 0.2 s, ok ===\n" + BANNER,
                booted_at=now - timedelta(minutes=5),
            )
        )
        session.add(
            BootLog(
                device_id=device_id,
                seq=9,
                version="1.0.0",
                slot="a",
                result="failed",
                log="=== trial boot of slot b (2.0.0), 3.0 s, failed ===\n"
                "### ERROR ### Please RESET the board ###",
                booted_at=now,
            )
        )


def test_device_page_shows_boot_logs_newest_first(
    viewer: TestClient, engine: Engine, product: str
) -> None:
    device_id = f"{product}-lab"
    seed_device(engine, device_id, product, lab=True)
    seed_boot_logs(engine, device_id)

    response = viewer.get(f"/devices/{device_id}")
    page = response.text

    assert response.status_code == 200
    assert LAB_CHIP in page
    assert f"<code>{BANNER}</code>" in page
    assert "Boot logs <span" in page
    assert page.index("trial boot of slot b (2.0.0)") < page.index(
        "power-on boot of slot a (1.0.0)"
    )
    assert "### ERROR ### Please RESET the board ###" in page
    assert page.count('<pre class="console">') == 2


def test_device_page_virtual_device_has_no_logs(
    viewer: TestClient, engine: Engine, product: str
) -> None:
    device_id = f"{product}-sim"
    seed_device(engine, device_id, product, lab=False)

    page = viewer.get(f"/devices/{device_id}").text

    assert LAB_CHIP not in page
    assert "only lab devices send the console output" in page
    assert '<pre class="console">' not in page


def test_device_page_unknown_device_is_404(viewer: TestClient, product: str) -> None:
    response = viewer.get(f"/devices/{product}-missing")

    assert response.status_code == 404
    assert f"device &#39;{product}-missing&#39; not found" in response.text


def test_devices_list_links_device_page(
    viewer: TestClient, engine: Engine, product: str
) -> None:
    device_id = f"{product}-lab"
    seed_device(engine, device_id, product, lab=True)

    page = viewer.get(f"/devices?product={product}").text

    assert f'href="/devices/{device_id}"' in page
    assert '<span class="chip">lab</span>' in page


def test_release_page_marks_lab_devices(
    viewer: TestClient, engine: Engine, product: str
) -> None:
    seeded = seed_release(engine, product)
    lab_id, virtual_id = f"{product}-lab", f"{product}-sim"
    seed_device(engine, lab_id, product, lab=True)
    seed_device(engine, virtual_id, product, lab=False)
    with session_scope(engine) as session:
        for device_id in (lab_id, virtual_id):
            session.add(
                ReleaseTarget(
                    release_id=seeded.release_id,
                    device_id=device_id,
                    wave_index=0,
                    state=DeviceState.SUCCEEDED,
                    state_rank=STATE_RANK[DeviceState.SUCCEEDED],
                )
            )

    page = viewer.get(f"/releases/{seeded.release_id}").text

    assert page.count(LAB_CHIP) == 1
    assert f">{lab_id}</a> {LAB_CHIP}" in page
    assert f">{virtual_id}</a></td>" in page
