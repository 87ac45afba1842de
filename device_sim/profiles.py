"""Behaviour profiles: how a simulated device deviates from a healthy one.

Profiles and what they do:

================== ==========================================================
``healthy``        every step succeeds after a short, jittered delay
``slow``           every step and every download chunk takes several times
                   longer, so the device is still busy when faster ones finish
``flaky_download`` the first download attempt of each install breaks halfway,
                   the retry succeeds
``crash``          every newly installed version fails its first boot, so the
                   bootloader falls back to the previous slot
``offline``        never connects to the broker
``corrupt_download`` flips one byte of every download, which fails the SHA-256
                   check (``hash_mismatch``)
================== ==========================================================

``--crash-on-version V`` is independent of the profile: every device of the
fleet, whatever its profile, fails to boot version ``V``. The ``crash``
profile needs no version because it crashes on all of them.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

SLOW_FACTOR = 5.0
# Each device's delays vary by up to this fraction either way, so a fleet
# started at once does not report in lockstep.
JITTER_FRACTION = 0.5


class Profile(StrEnum):
    """Name of a behaviour profile, as given to ``--profile``."""

    HEALTHY = "healthy"
    SLOW = "slow"
    FLAKY_DOWNLOAD = "flaky_download"
    CRASH = "crash"
    OFFLINE = "offline"
    CORRUPT_DOWNLOAD = "corrupt_download"


@dataclass(frozen=True)
class ProfileCount:
    """One ``--profile NAME[:COUNT]`` option; ``count`` None means the rest."""

    profile: Profile
    count: int | None

    @classmethod
    def parse(cls, text: str) -> ProfileCount:
        name, _, count_text = text.partition(":")
        try:
            profile = Profile(name)
        except ValueError:
            choices = ", ".join(item.value for item in Profile)
            raise ValueError(
                f"invalid profile {name!r} in {text!r}: choose one of {choices}"
            ) from None
        if not count_text:
            return cls(profile, None)
        if not count_text.isdigit() or int(count_text) < 1:
            raise ValueError(
                f"invalid device count {count_text!r} in {text!r}: expected a"
                " positive integer, as in slow:10"
            )
        return cls(profile, int(count_text))


def assign_profiles(devices: int, counts: Sequence[ProfileCount]) -> list[Profile]:
    """Assign a profile to each device index, in the order the options were given.

    Profiles with a count take consecutive devices from index 0. One profile
    may omit its count and then takes every remaining device; the remaining
    devices are ``healthy`` otherwise. Raises ``ValueError`` when the counts
    exceed ``devices`` or more than one profile omits its count.
    """
    open_ended = [item for item in counts if item.count is None]
    if len(open_ended) > 1:
        names = ", ".join(item.profile.value for item in open_ended)
        raise ValueError(
            f"profiles {names} all omit a count: give every profile but one a"
            " count, as in slow:10"
        )
    counted = sum(item.count or 0 for item in counts)
    if counted > devices:
        raise ValueError(
            f"profile counts add up to {counted}, more than the {devices} devices;"
            " lower the counts or raise --devices"
        )
    rest = open_ended[0].profile if open_ended else Profile.HEALTHY
    assigned: list[Profile] = []
    for item in counts:
        if item.count is not None:
            assigned.extend([item.profile] * item.count)
    assigned.extend([rest] * (devices - counted))
    return assigned


@dataclass(frozen=True)
class Behaviour:
    """Timings and faults of one device, derived from its profile and id."""

    profile: Profile
    step_delay_s: float
    chunk_delay_s: float
    break_first_download: bool
    corrupt_download: bool
    crash_new_versions: bool
    crash_on_version: str | None
    connects: bool

    def crashes_on(self, version: str) -> bool:
        return self.crash_new_versions or version == self.crash_on_version


def device_random(seed: str, device_id: str) -> random.Random:
    """Random generator that is the same for a device id in every run.

    ``random.Random`` hashes a string seed with SHA-512, so the sequence does
    not depend on ``PYTHONHASHSEED``.
    """
    return random.Random(f"{seed}:{device_id}")


def behaviour_for(
    profile: Profile,
    rng: random.Random,
    *,
    step_delay_s: float,
    crash_on_version: str | None,
) -> Behaviour:
    """Build the behaviour of one device, jittering its delays with ``rng``."""
    jitter = 1.0 + rng.uniform(-JITTER_FRACTION, JITTER_FRACTION)
    factor = SLOW_FACTOR if profile is Profile.SLOW else 1.0
    return Behaviour(
        profile=profile,
        step_delay_s=step_delay_s * jitter * factor,
        chunk_delay_s=step_delay_s * jitter / 10 if profile is Profile.SLOW else 0.0,
        break_first_download=profile is Profile.FLAKY_DOWNLOAD,
        corrupt_download=profile is Profile.CORRUPT_DOWNLOAD,
        crash_new_versions=profile is Profile.CRASH,
        crash_on_version=crash_on_version,
        connects=profile is not Profile.OFFLINE,
    )
