"""The pure rollout policy: loading, wave sizes, stable ordering and evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from otaflow.errors import PolicyError
from workflows.policy import (
    MAX_DURATION_S,
    MAX_STAGES,
    FailureAction,
    FailureSample,
    GateMode,
    PlannedDevice,
    StagePolicy,
    WaveCounts,
    WaveDecision,
    default_policy,
    evaluate_wave,
    load_policy,
    resolve_policy,
    rollout_order,
    wave_sizes,
)


def stage(**overrides: Any) -> StagePolicy:
    values: dict[str, Any] = {
        "name": "canary",
        "percent": 5,
        "gate": GateMode.AUTO,
        "bake_s": 0,
        "success_threshold": 0.95,
        "max_failures": None,
        "min_finished": 1,
        "device_deadline_s": 60,
        "on_failure": FailureAction.ROLL_BACK,
    }
    return StagePolicy(**{**values, **overrides})


def test_default_policy_has_canary_early_fleet() -> None:
    policy = default_policy()
    assert [s.name for s in policy.stages] == ["canary", "early", "fleet"]
    assert [s.percent for s in policy.stages] == [5, 25, 100]
    assert policy.stages[0].min_devices == 2
    assert {s.gate for s in policy.stages} == {GateMode.AUTO}


def test_policy_stage_inherits_defaults() -> None:
    policy = resolve_policy(
        {
            "defaults": {"bake_s": 5, "success_threshold": 0.9},
            "stages": [
                {"name": "a", "percent": 50, "bake_s": 1},
                {"name": "b", "percent": 100},
            ],
        }
    )
    assert policy.stages[0].bake_s == 1
    assert policy.stages[1].bake_s == 5
    assert policy.stages[1].success_threshold == 0.9


@pytest.mark.parametrize(
    ("document", "field", "fragment"),
    [
        ({"stages": []}, "stages", "at least one stage is required"),
        ({}, "stages", "at least one stage is required"),
        (
            {"stages": [{"name": "a", "percent": 50}, {"name": "b", "percent": 40}]},
            "stages[1].percent",
            "must increase",
        ),
        (
            {"stages": [{"name": "a", "percent": 50}, {"name": "a", "percent": 90}]},
            "stages[1].name",
            "used twice",
        ),
        ({"stages": [{"name": "a", "percent": 150}]}, "stages[0].percent", "100"),
        (
            {"stages": [{"name": "a", "percent": 10, "gate": "maybe"}]},
            "stages[0].gate",
            "",
        ),
        (
            {"stages": [{"name": "a", "percent": 10}], "colour": "red"},
            "colour",
            "unknown field",
        ),
        (
            {
                "defaults": {"success_threshold": 1.5},
                "stages": [{"name": "a", "percent": 9}],
            },
            "defaults.success_threshold",
            "1",
        ),
    ],
)
def test_policy_invalid_names_field(
    document: dict[str, Any], field: str, fragment: str
) -> None:
    with pytest.raises(PolicyError) as caught:
        resolve_policy(document, "test.yaml")
    assert caught.value.field == field
    assert fragment in caught.value.message


def test_policy_unknown_field_lists_known_fields() -> None:
    document = {"stages": [{"name": "a", "percent": 10, "bake": 5}]}

    with pytest.raises(PolicyError) as caught:
        resolve_policy(document)

    assert caught.value.field == "stages[0].bake"
    assert caught.value.value == 5
    assert "known fields: name, percent, min_devices, gate, bake_s," in (
        caught.value.message
    )
    assert caught.value.message.endswith("did you mean bake_s?")


@pytest.mark.parametrize(
    ("document", "suggestion"),
    [
        (
            {"stages": [{"name": "a", "percent": 10, "sucess_threshold": 1}]},
            "success_threshold",
        ),
        ({"stages": [{"name": "a", "percent": 10}], "stage": []}, "stages"),
        (
            {"stages": [{"name": "a", "percent": 10}], "defaults": {"gates": "auto"}},
            "gate",
        ),
    ],
)
def test_policy_unknown_field_suggests_close_name(
    document: dict[str, Any], suggestion: str
) -> None:
    with pytest.raises(PolicyError) as caught:
        resolve_policy(document)

    assert f"did you mean {suggestion}?" in caught.value.message


def test_policy_unknown_field_without_close_name_suggests_none() -> None:
    document = {"stages": [{"name": "a", "percent": 10, "colour": "red"}]}

    with pytest.raises(PolicyError) as caught:
        resolve_policy(document)

    assert "did you mean" not in caught.value.message


@pytest.mark.parametrize(
    ("stage_fields", "message"),
    [
        (
            {"success_threshold": 95},
            "stages[0].success_threshold: 95 is above 1; it is a fraction of"
            " finished devices, such as 0.95",
        ),
        (
            {"percent": 150},
            "stages[0].percent: 150 is above 100; it is the cumulative share of"
            " the fleet in percent, such as 25",
        ),
        (
            {"bake_s": -5},
            "stages[0].bake_s: -5 is below 0; it is seconds to watch a finished"
            " wave before judging it",
        ),
        (
            {"device_deadline_s": 0},
            "stages[0].device_deadline_s: 0 is not above 0; it is seconds a device"
            " has to finish its install",
        ),
        (
            {"bake_s": "ten"},
            "stages[0].bake_s: 'ten' is not a number; it is seconds to watch a"
            " finished wave before judging it",
        ),
        (
            {"min_devices": 2.5},
            "stages[0].min_devices: 2.5 is not a whole number; it is a cumulative"
            " number of devices",
        ),
        (
            {"gate": "maybe"},
            "stages[0].gate: 'maybe' is not valid; expected 'auto' or 'manual'",
        ),
        (
            {"name": ""},
            "stages[0].name: '' is empty; it is a name of 1 to 64 characters",
        ),
    ],
)
def test_policy_value_error_in_words(
    stage_fields: dict[str, Any], message: str
) -> None:
    document = {"stages": [{"name": "a", "percent": 10, **stage_fields}]}

    with pytest.raises(PolicyError) as caught:
        resolve_policy(document)

    assert caught.value.message == message


def test_policy_missing_stage_field_names_it() -> None:
    with pytest.raises(PolicyError) as caught:
        resolve_policy({"stages": [{"name": "a"}]})

    assert caught.value.field == "stages[0].percent"
    assert caught.value.value is None
    assert "every stage needs a name and a percent" in caught.value.message


@pytest.mark.parametrize(
    ("stages", "field", "value"),
    [
        (
            [{"name": "a", "percent": 50}, {"name": "b", "percent": 40}],
            "stages[1].percent",
            40,
        ),
        (
            [{"name": "a", "percent": 50}, {"name": "a", "percent": 90}],
            "stages[1].name",
            "a",
        ),
    ],
)
def test_policy_stage_order_error_value_is_field_value(
    stages: list[dict[str, Any]], field: str, value: object
) -> None:
    with pytest.raises(PolicyError) as caught:
        resolve_policy({"stages": stages})

    assert caught.value.field == field
    assert caught.value.value == value
    assert "{" not in caught.value.message


def test_policy_reports_every_problem() -> None:
    document = {
        "stages": [
            {"name": "a", "percent": 50, "bake": 1},
            {"name": "a", "percent": 40, "success_threshold": 95},
        ],
        "colour": "red",
    }

    with pytest.raises(PolicyError) as caught:
        resolve_policy(document)

    fields = [problem.field for problem in caught.value.problems]
    assert sorted(fields) == sorted(
        [
            "stages[0].bake",
            "stages[1].success_threshold",
            "colour",
            "stages[1].name",
            "stages[1].percent",
        ]
    )
    assert len(caught.value.message.splitlines()) == 5


def test_policy_problems_stop_at_ten() -> None:
    stage = {"name": "a", "percent": 10, **{f"extra_{n}": n for n in range(15)}}

    with pytest.raises(PolicyError) as caught:
        resolve_policy({"stages": [stage]})

    lines = caught.value.message.splitlines()
    assert len(lines) == 11
    assert lines[-1] == "policy: 5 more problems not shown"
    assert caught.value.total_problems == 15


@pytest.mark.parametrize(
    ("document", "field"),
    [
        (
            {"defaults": {"device_deadline_s": 99999999999}},
            "defaults.device_deadline_s",
        ),
        ({"defaults": {"bake_s": 1e14}}, "defaults.bake_s"),
        (
            {"stages_extra": {"device_deadline_s": 31 * 86400}},
            "stages[0].device_deadline_s",
        ),
        ({"stages_extra": {"min_devices": 10**12}}, "stages[0].min_devices"),
        ({"dispatch_rate_per_s": 10**9}, "dispatch_rate_per_s"),
    ],
)
def test_policy_value_above_maximum_is_error(
    document: dict[str, Any], field: str
) -> None:
    stage: dict[str, Any] = {"name": "all", "percent": 100}
    stage |= document.pop("stages_extra", {})

    with pytest.raises(PolicyError) as caught:
        resolve_policy({**document, "stages": [stage]})

    assert caught.value.field == field
    assert " is above " in caught.value.message


def test_policy_thirty_day_deadline_loads() -> None:
    stage = {"name": "all", "percent": 100, "device_deadline_s": MAX_DURATION_S}

    policy = resolve_policy({"stages": [stage]})

    assert policy.stages[0].device_deadline_s == MAX_DURATION_S


def test_policy_too_many_stages_is_error() -> None:
    stages = [
        {"name": f"s{n}", "percent": (n + 1) * 100 / (MAX_STAGES + 1)}
        for n in range(MAX_STAGES + 1)
    ]

    with pytest.raises(PolicyError) as caught:
        resolve_policy({"stages": stages})

    assert caught.value.field == "stages"


def test_policy_quoted_yes_is_not_boolean() -> None:
    with pytest.raises(PolicyError) as caught:
        resolve_policy({"four_eyes": "yes", "stages": [{"name": "a", "percent": 100}]})

    assert caught.value.field == "four_eyes"


def test_policy_error_names_source_file() -> None:
    with pytest.raises(PolicyError) as caught:
        resolve_policy({"stages": []}, "deploy/policies/mine.yaml")

    assert str(caught.value).startswith("deploy/policies/mine.yaml: stages: ")


def test_policy_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"

    with pytest.raises(PolicyError) as caught:
        load_policy(path=path, text="name: x\nstages: [\n")

    assert caught.value.message.startswith("invalid YAML at line 3, column 1:")
    assert "<unicode string>" not in caught.value.message
    assert str(caught.value).startswith(f"{path}: ")


def test_policy_file_not_utf8_is_policy_error(tmp_path: Path) -> None:
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\xff\xfe\x00stages")

    with pytest.raises(PolicyError) as caught:
        load_policy(path=path)

    assert caught.value.message.startswith("not UTF-8 text (byte 0xff at offset 0)")
    assert caught.value.message.endswith("save the policy as UTF-8 YAML")


def test_policy_file_with_byte_order_mark_loads(tmp_path: Path) -> None:
    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbfstages: [{name: all, percent: 100}]\n")

    assert load_policy(path=path).stages[0].name == "all"


def test_policy_yaml_syntax_error_is_policy_error() -> None:
    with pytest.raises(PolicyError, match="invalid YAML"):
        load_policy(text="stages: [")


def test_policy_yaml_must_be_mapping() -> None:
    with pytest.raises(PolicyError, match="mapping"):
        load_policy(text="- 1\n- 2\n")


@pytest.mark.parametrize(
    ("fleet", "expected"),
    [
        (50, [3, 10, 37]),
        (3, [2, 0, 1]),
        (1, [1, 0, 0]),
        (0, [0, 0, 0]),
        (1000, [50, 200, 750]),
    ],
)
def test_wave_sizes_default_policy(fleet: int, expected: list[int]) -> None:
    assert wave_sizes(default_policy().stages, fleet) == expected


def test_wave_sizes_cover_fleet_exactly() -> None:
    for fleet in range(0, 500):
        assert sum(wave_sizes(default_policy().stages, fleet)) == fleet


def test_wave_sizes_partial_rollout_stops_at_percent() -> None:
    stages = [stage(name="a", percent=10), stage(name="b", percent=50)]
    assert wave_sizes(stages, 100) == [10, 40]


def test_rollout_order_is_stable() -> None:
    devices = [PlannedDevice(device_id=f"dev-{i}") for i in range(100)]
    first = rollout_order(devices, "gw", lab_first=False)
    second = rollout_order(list(reversed(devices)), "gw", lab_first=False)
    assert first == second


def test_rollout_order_depends_on_seed() -> None:
    devices = [PlannedDevice(device_id=f"dev-{i}") for i in range(100)]
    assert (
        rollout_order(devices, "a", False)[:5] != rollout_order(devices, "b", False)[:5]
    )


def test_rollout_order_canary_survives_fleet_growth() -> None:
    devices = [PlannedDevice(device_id=f"dev-{i}") for i in range(100)]
    grown = devices + [PlannedDevice(device_id=f"new-{i}") for i in range(5)]
    before = rollout_order(devices, "gw", False)
    after = [d for d in rollout_order(grown, "gw", False) if d.startswith("dev-")]
    assert before == after


def test_rollout_order_puts_lab_devices_first() -> None:
    devices = [PlannedDevice(device_id=f"dev-{i}") for i in range(50)]
    devices.append(PlannedDevice(device_id="lab-1", lab=True))
    assert rollout_order(devices, "gw", lab_first=True)[0] == "lab-1"


def test_evaluate_all_succeeded_promotes() -> None:
    verdict = evaluate_wave(stage(), WaveCounts(targeted=20, succeeded=20))
    assert verdict.decision is WaveDecision.PROMOTE
    assert verdict.reason.startswith("canary: 20 of 20 succeeded")


def test_evaluate_rate_uses_finished_denominator() -> None:
    counts = WaveCounts(
        targeted=20,
        succeeded=19,
        failed=1,
        failure_reasons={"download_timeout": 1},
    )
    verdict = evaluate_wave(stage(), counts)
    assert verdict.decision is WaveDecision.PROMOTE
    assert "1 failed (download_timeout)" in verdict.reason
    assert "threshold 95% of finished" in verdict.reason


def test_evaluate_in_progress_not_in_denominator() -> None:
    counts = WaveCounts(targeted=40, succeeded=19, failed=1, in_progress=20)
    assert evaluate_wave(stage(), counts).decision is WaveDecision.PROMOTE


def test_evaluate_below_threshold_rolls_back() -> None:
    counts = WaveCounts(
        targeted=20, succeeded=18, failed=2, failure_reasons={"boot_failed": 2}
    )
    verdict = evaluate_wave(stage(), counts)
    assert verdict.decision is WaveDecision.ROLL_BACK
    assert "90% of finished is below the threshold of 95%" in verdict.reason


def test_evaluate_threshold_is_inclusive() -> None:
    counts = WaveCounts(targeted=20, succeeded=19, failed=1)
    verdict = evaluate_wave(stage(success_threshold=0.95), counts)
    assert verdict.decision is WaveDecision.PROMOTE


def test_evaluate_max_failures_rolls_back_despite_rate() -> None:
    counts = WaveCounts(targeted=1000, succeeded=990, failed=10)
    verdict = evaluate_wave(stage(success_threshold=0.9, max_failures=5), counts)
    assert verdict.decision is WaveDecision.ROLL_BACK
    assert "10 failures exceed the maximum of 5" in verdict.reason


def test_evaluate_max_failures_zero_allows_none() -> None:
    counts = WaveCounts(targeted=100, succeeded=99, failed=1)
    verdict = evaluate_wave(stage(success_threshold=0.5, max_failures=0), counts)
    assert verdict.decision is WaveDecision.ROLL_BACK


def test_evaluate_deadline_failures_count_as_failed() -> None:
    counts = WaveCounts(
        targeted=3, succeeded=2, failed=1, failure_reasons={"deadline_exceeded": 1}
    )
    verdict = evaluate_wave(stage(), counts)
    assert verdict.decision is WaveDecision.ROLL_BACK
    assert "deadline_exceeded" in verdict.reason


def test_evaluate_minimum_sample_holds() -> None:
    counts = WaveCounts(targeted=10, succeeded=2, in_progress=8)
    verdict = evaluate_wave(stage(min_finished=5), counts)
    assert verdict.decision is WaveDecision.HOLD
    assert "at least 5 needed" in verdict.reason


def test_evaluate_nothing_finished_holds() -> None:
    verdict = evaluate_wave(stage(), WaveCounts(targeted=5, in_progress=5))
    assert verdict.decision is WaveDecision.HOLD


def test_evaluate_failure_pauses_when_configured() -> None:
    counts = WaveCounts(targeted=10, succeeded=5, failed=5)
    verdict = evaluate_wave(stage(on_failure=FailureAction.PAUSE), counts)
    assert verdict.decision is WaveDecision.HOLD
    assert "paused for a decision" in verdict.reason


def test_evaluate_failure_beats_small_sample() -> None:
    counts = WaveCounts(targeted=10, failed=2, in_progress=8)
    verdict = evaluate_wave(stage(min_finished=5, max_failures=1), counts)
    assert verdict.decision is WaveDecision.ROLL_BACK


def test_evaluate_failure_names_first_failed_device() -> None:
    sample = FailureSample(
        device_id="lab-1",
        reason="boot_failed",
        detail="x" * 400 + "no banner",
        lab=True,
    )
    counts = WaveCounts(targeted=2, succeeded=1, failed=1, failure_samples=(sample,))
    verdict = evaluate_wave(stage(), counts)
    assert "First failure: lab device lab-1, boot_failed" in verdict.reason
    assert verdict.reason.endswith("no banner")
    assert len(verdict.reason) < 600
