"""Rollout policy: how a release expands through the fleet and when it stops.

Everything here is pure and deterministic, because the release workflow calls
it during replay: no I/O, no clock, no randomness. A policy is written in YAML
(``load_policy``); stage fields left out take the policy-wide defaults, so the
resolved policy that a workflow carries states every value it acts on.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from enum import StrEnum
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    model_validator,
)

from otaflow.errors import PolicyError, PolicyProblem
from workflows.policy_errors import (
    MAX_REPORTED_PROBLEMS,
    describe_validation_errors,
    describe_yaml_error,
)

DEFAULT_POLICY_RESOURCE = "default_policy.yaml"
# Upper bounds of policy values. Larger values are typing mistakes rather
# than plans, and a deadline beyond Python's datetime range would fail the
# activities that compute with it.
MAX_STAGES = 50
MAX_DURATION_S = 30 * 24 * 3600
MAX_DEVICE_COUNT = 10_000_000
MAX_DISPATCH_RATE_PER_S = 100_000


class GateMode(StrEnum):
    AUTO = "auto"
    MANUAL = "manual"


class FailureAction(StrEnum):
    ROLL_BACK = "rollback"
    PAUSE = "pause"


class StagePolicy(BaseModel):
    """One wave of a release, with every threshold resolved."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=64)
    percent: float = Field(gt=0, le=100, description="Cumulative share of the fleet.")
    min_devices: int = Field(default=0, ge=0, description="Cumulative minimum count.")
    gate: GateMode
    bake_s: float = Field(ge=0)
    success_threshold: float = Field(gt=0, le=1)
    max_failures: int | None = Field(ge=0)
    min_finished: int = Field(ge=0)
    device_deadline_s: float = Field(gt=0)
    on_failure: FailureAction


class RolloutPolicy(BaseModel):
    """A resolved rollout policy: ordered stages and release-wide switches."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(default="custom", min_length=1, max_length=64)
    stages: tuple[StagePolicy, ...] = Field(min_length=1)
    seed: str = Field(
        default="",
        max_length=200,
        description="Salt of the stable hash; empty means the product name.",
    )
    skip_offline: bool = True
    four_eyes: bool = True
    lab_devices_first: bool = False
    dispatch_rate_per_s: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _stages_expand(self) -> RolloutPolicy:
        pairs = [(stage.name, stage.percent) for stage in self.stages]
        problems = stage_order_problems(pairs)
        if problems:
            raise ValueError(str(problems[0]))
        return self


class _StageInput(BaseModel):
    """A stage as written in YAML, where any threshold may be left to the defaults."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    percent: float = Field(gt=0, le=100)
    min_devices: int | None = Field(default=None, ge=0, le=MAX_DEVICE_COUNT)
    gate: GateMode | None = None
    bake_s: float | None = Field(default=None, ge=0, le=MAX_DURATION_S)
    success_threshold: float | None = Field(default=None, gt=0, le=1)
    max_failures: int | None = Field(default=None, ge=0, le=MAX_DEVICE_COUNT)
    min_finished: int | None = Field(default=None, ge=0, le=MAX_DEVICE_COUNT)
    device_deadline_s: float | None = Field(default=None, gt=0, le=MAX_DURATION_S)
    on_failure: FailureAction | None = None


class _Defaults(BaseModel):
    model_config = ConfigDict(extra="forbid")

    gate: GateMode = GateMode.AUTO
    bake_s: float = Field(default=60.0, ge=0, le=MAX_DURATION_S)
    success_threshold: float = Field(default=0.95, gt=0, le=1)
    max_failures: int | None = Field(default=None, ge=0, le=MAX_DEVICE_COUNT)
    min_finished: int = Field(default=1, ge=0, le=MAX_DEVICE_COUNT)
    device_deadline_s: float = Field(default=900.0, gt=0, le=MAX_DURATION_S)
    on_failure: FailureAction = FailureAction.ROLL_BACK


class _PolicyInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="custom", min_length=1, max_length=64)
    defaults: _Defaults = Field(default_factory=_Defaults)
    stages: list[_StageInput] = Field(min_length=1, max_length=MAX_STAGES)
    seed: str = Field(default="", max_length=200)
    # Strict, so that a quoted "yes" is an error rather than true.
    skip_offline: StrictBool = True
    four_eyes: StrictBool = True
    lab_devices_first: StrictBool = False
    dispatch_rate_per_s: float | None = Field(
        default=None, gt=0, le=MAX_DISPATCH_RATE_PER_S
    )


def resolve_policy(document: Any, source: str | None = None) -> RolloutPolicy:
    """Validate a parsed policy document and fill stage fields from the defaults.

    Raises ``PolicyError`` listing every invalid field (up to
    ``MAX_REPORTED_PROBLEMS``), for example ``stages[1].percent``. ``source``
    names the policy's file in the error.
    """
    problems: list[PolicyProblem] = []
    raw = None
    try:
        raw = _PolicyInput.model_validate(document)
    except ValidationError as error:
        problems += describe_validation_errors(error, _PolicyInput)
    if isinstance(document, dict) and isinstance(document.get("stages"), list):
        problems += stage_order_problems(_names_and_percents(document["stages"]))
    if problems or raw is None:
        raise _policy_error(problems, source)

    try:
        stages = [_resolve_stage(stage, raw.defaults) for stage in raw.stages]
        return RolloutPolicy(
            name=raw.name,
            stages=tuple(stages),
            seed=raw.seed,
            skip_offline=raw.skip_offline,
            four_eyes=raw.four_eyes,
            lab_devices_first=raw.lab_devices_first,
            dispatch_rate_per_s=raw.dispatch_rate_per_s,
        )
    except ValidationError as error:
        problems = describe_validation_errors(error, RolloutPolicy)
        raise _policy_error(problems, source) from None


def _resolve_stage(stage: _StageInput, defaults: _Defaults) -> StagePolicy:
    explicit = stage.model_dump(exclude_none=True)
    return StagePolicy.model_validate(
        {**defaults.model_dump(), "min_devices": 0, **explicit}
    )


def stage_order_problems(
    stages: Sequence[tuple[object, object]],
) -> list[PolicyProblem]:
    """Find stage names used twice and percentages that do not increase.

    ``stages`` contains each stage's name and percent as written. A name that is
    not text, or a percent that is not a number from above 0 to 100, is left
    to the field checks, which report it.
    """
    problems = []
    names: set[str] = set()
    previous = 0.0
    for index, (name, percent) in enumerate(stages):
        if isinstance(name, str) and name in names:
            problems.append(
                PolicyProblem(
                    f"stages[{index}].name",
                    name,
                    f"{name!r} is used twice; give each stage its own name",
                )
            )
        if isinstance(name, str):
            names.add(name)
        if not _is_valid_percent(percent):
            continue
        assert isinstance(percent, int | float)
        if percent <= previous:
            problems.append(
                PolicyProblem(
                    f"stages[{index}].percent",
                    percent,
                    f"{percent:g} is not above the previous stage's {previous:g};"
                    " percentages are cumulative and must increase",
                )
            )
        previous = percent
    return problems


def _is_valid_percent(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return 0 < value <= 100


def _names_and_percents(stages: list[Any]) -> list[tuple[object, object]]:
    return [
        (stage.get("name"), stage.get("percent"))
        if isinstance(stage, dict)
        else (None, None)
        for stage in stages
    ]


def _policy_error(problems: list[PolicyProblem], source: str | None) -> PolicyError:
    shown = problems[:MAX_REPORTED_PROBLEMS]
    hidden = len(problems) - len(shown)
    if hidden:
        shown.append(PolicyProblem("policy", None, f"{hidden} more problems not shown"))
    return PolicyError.from_problems(shown, source, total_problems=len(problems))


def load_policy(path: Path | None = None, text: str | None = None) -> RolloutPolicy:
    """Load a rollout policy from a YAML file or text; the default one if neither.

    ``path`` with ``text`` only names the text's file in errors.
    """
    import yaml  # Imported here so that the workflow sandbox never loads it.

    source = str(path) if path is not None else None
    if text is None and path is None:
        text = (
            resources.files("workflows").joinpath(DEFAULT_POLICY_RESOURCE).read_text()
        )
        source = "the default policy"
    elif text is None and path is not None:
        text = read_policy_file(path)
    try:
        document = yaml.safe_load(text or "")
    except yaml.YAMLError as error:
        raise PolicyError(
            "policy", None, describe_yaml_error(error), source=source
        ) from None
    if not isinstance(document, dict):
        raise PolicyError(
            "policy",
            None,
            "expected a mapping with a 'stages' list at the top level, such as"
            " 'stages: [{name: all, percent: 100}]'",
            source=source,
        )
    return resolve_policy(document, source)


def read_policy_file(path: Path) -> str:
    """Read a policy file as UTF-8 text, raising ``PolicyError`` when it is not."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise PolicyError(
            "policy",
            str(path),
            f"cannot read the file ({error.strerror}); check the path and its"
            " permissions",
            source=str(path),
        ) from None
    try:
        # utf-8-sig also accepts the byte order mark that some editors write.
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise PolicyError(
            "policy",
            str(path),
            f"not UTF-8 text (byte 0x{data[error.start]:02x} at offset"
            f" {error.start}); save the policy as UTF-8 YAML",
            source=str(path),
        ) from None


def default_policy() -> RolloutPolicy:
    return load_policy()


# --- Wave planning -------------------------------------------------------------


class PlannedDevice(BaseModel):
    model_config = ConfigDict(frozen=True)

    device_id: str
    lab: bool = False


def rollout_order(
    devices: Iterable[PlannedDevice], seed: str, lab_first: bool
) -> list[str]:
    """Order devices by a stable hash of the seed and device id.

    The same fleet and seed always give the same order, so the same devices
    form the canary of every release planned with that policy. Lab devices
    come first when ``lab_first`` is set.
    """

    def sort_key(device: PlannedDevice) -> tuple[int, str]:
        digest = hashlib.sha256(f"{seed}\x00{device.device_id}".encode()).hexdigest()
        return (0 if lab_first and device.lab else 1, digest)

    return [device.device_id for device in sorted(devices, key=sort_key)]


def wave_sizes(stages: Sequence[StagePolicy], fleet_size: int) -> list[int]:
    """Number of devices in each wave for a fleet of ``fleet_size``.

    A stage's cumulative count is its percentage of the fleet rounded up, at
    least its ``min_devices`` and never more than the fleet. A wave whose
    count adds no device has size 0; the workflow skips it.
    """
    sizes = []
    reached = 0
    for stage in stages:
        cumulative = max(math.ceil(stage.percent * fleet_size / 100), stage.min_devices)
        cumulative = min(max(cumulative, reached), fleet_size)
        sizes.append(cumulative - reached)
        reached = cumulative
    return sizes


# --- Wave evaluation -----------------------------------------------------------


class WaveDecision(StrEnum):
    PROMOTE = "promote"
    HOLD = "hold"
    ROLL_BACK = "rollback"


SAMPLE_DETAIL_CHARS = 300


class FailureSample(BaseModel):
    """One failed device of a wave, shown with the gate decision."""

    model_config = ConfigDict(frozen=True)

    device_id: str
    reason: str
    detail: str = ""
    lab: bool = False


class WaveCounts(BaseModel):
    """Device states of one wave, as read from the database."""

    model_config = ConfigDict(frozen=True)

    targeted: int = Field(ge=0)
    succeeded: int = Field(default=0, ge=0)
    failed: int = Field(default=0, ge=0)
    in_progress: int = Field(default=0, ge=0)
    rolled_back: int = Field(default=0, ge=0)
    failure_reasons: dict[str, int] = Field(default_factory=dict)
    failure_samples: tuple[FailureSample, ...] = Field(
        default=(), description="A few failed devices, lab devices first."
    )

    @property
    def finished(self) -> int:
        return self.succeeded + self.failed


class WaveVerdict(BaseModel):
    model_config = ConfigDict(frozen=True)

    decision: WaveDecision
    healthy: bool
    reason: str


def evaluate_wave(stage: StagePolicy, counts: WaveCounts) -> WaveVerdict:
    """Decide whether a finished wave promotes, holds for a human or rolls back.

    The success rate is computed over the devices that finished (succeeded or
    failed); a device that missed its deadline has already been counted as
    failed. Devices still in progress do not count either way, which is why a
    minimum number of finished devices is required before a rate means
    anything.
    """
    summary = describe_counts(stage.name, counts)
    failing = _failure_cause(stage, counts)
    if failing is None and counts.finished < max(stage.min_finished, 1):
        return WaveVerdict(
            decision=WaveDecision.HOLD,
            healthy=False,
            reason=(
                f"{summary}; only {counts.finished} finished, at least"
                f" {max(stage.min_finished, 1)} needed to judge the wave: held for a"
                " decision"
            ),
        )
    if failing is None:
        return WaveVerdict(
            decision=WaveDecision.PROMOTE,
            healthy=True,
            reason=(
                f"{summary}, threshold {_percent(stage.success_threshold)} of finished"
            ),
        )
    example = _describe_sample(counts)
    if stage.on_failure is FailureAction.PAUSE:
        return WaveVerdict(
            decision=WaveDecision.HOLD,
            healthy=False,
            reason=f"{summary}; {failing}: paused for a decision{example}",
        )
    return WaveVerdict(
        decision=WaveDecision.ROLL_BACK,
        healthy=False,
        reason=f"{summary}; {failing}: rolling back{example}",
    )


def _describe_sample(counts: WaveCounts) -> str:
    """The first failed device and the end of its error, such as a boot log tail."""
    if not counts.failure_samples:
        return ""
    sample = counts.failure_samples[0]
    kind = "lab device " if sample.lab else ""
    detail = sample.detail.strip()
    if len(detail) > SAMPLE_DETAIL_CHARS:
        detail = "..." + detail[-SAMPLE_DETAIL_CHARS:]
    text = f". First failure: {kind}{sample.device_id}, {sample.reason}"
    return f"{text}: {detail}" if detail else text


def _failure_cause(stage: StagePolicy, counts: WaveCounts) -> str | None:
    if stage.max_failures is not None and counts.failed > stage.max_failures:
        return f"{counts.failed} failures exceed the maximum of {stage.max_failures}"
    if counts.finished == 0:
        return None
    rate = counts.succeeded / counts.finished
    if rate < stage.success_threshold:
        return (
            f"success rate {_percent(rate)} of finished is below the threshold"
            f" of {_percent(stage.success_threshold)}"
        )
    return None


def describe_counts(stage_name: str, counts: WaveCounts) -> str:
    """Summarise a wave: ``canary: 19 of 20 succeeded, 1 failed (download_timeout)``."""
    text = f"{stage_name}: {counts.succeeded} of {counts.targeted} succeeded"
    if counts.failed:
        reasons = ", ".join(
            f"{count} {reason}"
            if count > 1 or len(counts.failure_reasons) > 1
            else reason
            for reason, count in sorted(counts.failure_reasons.items())
        )
        text += f", {counts.failed} failed" + (f" ({reasons})" if reasons else "")
    if counts.in_progress:
        text += f", {counts.in_progress} in progress"
    return text


def _percent(fraction: float) -> str:
    return f"{fraction * 100:.4g}%"
