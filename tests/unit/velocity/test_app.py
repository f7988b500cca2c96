"""create_app wires the app from the settings; the settings reject what cannot work."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from tokvel_common.velocity_math import TokenWindows
from velocity.app import create_app
from velocity.settings import VelocitySettings
from velocity.tables import TokenState


def test_the_app_is_configured_from_the_settings(tmp_path: Path) -> None:
    settings = VelocitySettings(
        kafka_bootstrap_servers="k1:9092, k2:9093",
        topic_prefix="t-1.",
        velocity_store="rocksdb://",
        velocity_data_dir=tmp_path,
        velocity_producer_linger_ms=7,
        velocity_changelog_replicas=3,
    )
    app = create_app(settings)
    conf = app.conf
    assert conf.id == "t-1.tokvel-velocity"
    assert [str(url) for url in conf.broker] == ["kafka://k1:9092", "kafka://k2:9093"]
    assert str(conf.store) == "rocksdb:"
    assert conf.web_enabled is False
    assert conf.producer_linger == pytest.approx(0.007)
    assert conf.topic_replication_factor == 3
    assert set(app.agents) == {"velocity"}
    table = app.state_table
    assert table.partitions == 6
    assert table.changelog_topic.get_topic_name() == "t-1.tokvel-velocity-token-state-changelog"


def test_a_token_state_round_trips_with_its_last_applied_input() -> None:
    state = TokenState.from_bytes(
        TokenState(TokenWindows(60), partition=4, offset=99).to_bytes(), 60
    )
    assert (state.partition, state.offset) == (4, 99)
    assert state.has_applied(4, 99) and state.has_applied(4, 3)
    assert not state.has_applied(4, 100)
    assert not state.has_applied(3, 1)  # another partition: not comparable, so applied again


@pytest.mark.parametrize("data", [b"", b"\x02" + bytes(12), b"\x01" + bytes(12) + b"junk"])
def test_a_malformed_token_state_is_refused(data: bytes) -> None:
    with pytest.raises(ValueError, match="state"):
        TokenState.from_bytes(data, 60)


@pytest.mark.parametrize(
    "overrides",
    [
        {"velocity_store": "redis://"},
        {"velocity_heartbeat_interval_seconds": 11, "velocity_session_timeout_seconds": 30},
        {"velocity_session_timeout_seconds": 5},
        {"velocity_expected_interval_seconds": 0},
    ],
)
def test_settings_that_cannot_work_are_refused(overrides: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        VelocitySettings.model_validate(overrides)
