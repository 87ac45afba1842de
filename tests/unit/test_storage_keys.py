"""Object keys are built only from validated names."""

from __future__ import annotations

import pytest

from otaflow.storage import image_key, release_prefix, staging_key

SHA = "ab" * 32


def test_staging_key_layout() -> None:
    assert staging_key("gw", "qemu_arm64", "1.2.0", SHA) == (
        f"staging/gw/qemu_arm64/1.2.0/{SHA}.bin"
    )


def test_image_key_layout() -> None:
    assert (
        image_key("gw", "qemu_arm64", "1.2.0")
        == "releases/gw/qemu_arm64/1.2.0/image.bin"
    )


@pytest.mark.parametrize(
    ("product", "hardware", "version"),
    [
        ("../etc", "hw", "1.0.0"),
        ("gw", "a/b", "1.0.0"),
        ("gw", "hw", "1.0.0/../../x"),
        ("GW", "hw", "1.0.0"),
        ("", "hw", "1.0.0"),
    ],
)
def test_release_prefix_rejects_unsafe_parts(
    product: str, hardware: str, version: str
) -> None:
    with pytest.raises(ValueError, match="invalid"):
        release_prefix(product, hardware, version)


@pytest.mark.parametrize("sha256", ["../x", "AB" * 32, "ab" * 31])
def test_staging_key_rejects_bad_sha256(sha256: str) -> None:
    with pytest.raises(ValueError, match="invalid"):
        staging_key("gw", "hw", "1.0.0", sha256)
