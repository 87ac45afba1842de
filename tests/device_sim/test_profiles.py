"""Profile parsing, assignment to devices and per-device jitter."""

from __future__ import annotations

import pytest

from device_sim.profiles import (
    Profile,
    ProfileCount,
    assign_profiles,
    behaviour_for,
    device_random,
)


def test_profile_count_parses_name_and_count() -> None:
    assert ProfileCount.parse("slow:10") == ProfileCount(Profile.SLOW, 10)
    assert ProfileCount.parse("crash") == ProfileCount(Profile.CRASH, None)


@pytest.mark.parametrize("text", ["sleepy", "slow:0", "slow:-1", "slow:x"])
def test_profile_count_rejects_invalid_text(text: str) -> None:
    with pytest.raises(ValueError, match="invalid"):
        ProfileCount.parse(text)


def test_assign_profiles_counts_then_rest_healthy() -> None:
    counts = [ProfileCount(Profile.CRASH, 2), ProfileCount(Profile.SLOW, 1)]
    assigned = assign_profiles(5, counts)

    assert assigned == [
        Profile.CRASH,
        Profile.CRASH,
        Profile.SLOW,
        Profile.HEALTHY,
        Profile.HEALTHY,
    ]


def test_assign_profiles_open_count_takes_rest() -> None:
    counts = [ProfileCount(Profile.SLOW, None), ProfileCount(Profile.CRASH, 1)]
    assigned = assign_profiles(3, counts)

    assert assigned == [Profile.CRASH, Profile.SLOW, Profile.SLOW]


def test_assign_profiles_rejects_too_many() -> None:
    with pytest.raises(ValueError, match="more than the 2 devices"):
        assign_profiles(2, [ProfileCount(Profile.SLOW, 3)])


def test_assign_profiles_rejects_two_open_counts() -> None:
    counts = [ProfileCount(Profile.SLOW, None), ProfileCount(Profile.CRASH, None)]
    with pytest.raises(ValueError, match="omit a count"):
        assign_profiles(2, counts)


def test_behaviour_jitter_is_deterministic_per_device() -> None:
    first = behaviour_for(
        Profile.HEALTHY,
        device_random("seed", "sim-0001"),
        step_delay_s=1.0,
        crash_on_version=None,
    )
    again = behaviour_for(
        Profile.HEALTHY,
        device_random("seed", "sim-0001"),
        step_delay_s=1.0,
        crash_on_version=None,
    )
    other = behaviour_for(
        Profile.HEALTHY,
        device_random("seed", "sim-0002"),
        step_delay_s=1.0,
        crash_on_version=None,
    )

    assert first == again
    assert first.step_delay_s != other.step_delay_s
    assert 0.5 <= first.step_delay_s <= 1.5


def test_behaviour_slow_is_slower() -> None:
    slow = behaviour_for(
        Profile.SLOW, device_random("s", "d"), step_delay_s=1.0, crash_on_version=None
    )
    healthy = behaviour_for(
        Profile.HEALTHY,
        device_random("s", "d"),
        step_delay_s=1.0,
        crash_on_version=None,
    )

    assert slow.step_delay_s == pytest.approx(healthy.step_delay_s * 5)
    assert slow.chunk_delay_s > 0


@pytest.mark.parametrize(
    ("profile", "crash_on_version", "version", "crashes"),
    [
        (Profile.HEALTHY, None, "2.0.0", False),
        (Profile.HEALTHY, "2.0.0", "2.0.0", True),
        (Profile.HEALTHY, "2.0.0", "2.1.0", False),
        (Profile.CRASH, None, "2.1.0", True),
        (Profile.SLOW, "2.0.0", "2.0.0", True),
    ],
)
def test_behaviour_crash_semantics(
    profile: Profile, crash_on_version: str | None, version: str, crashes: bool
) -> None:
    behaviour = behaviour_for(
        profile,
        device_random("s", "d"),
        step_delay_s=0.0,
        crash_on_version=crash_on_version,
    )

    assert behaviour.crashes_on(version) is crashes
