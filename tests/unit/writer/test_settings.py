"""The writer's settings: environment variables, defaults, and the rules between them."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from writer.settings import WriterSettings


def test_defaults_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WRITER_BATCH_MAX_ROWS", "250")
    monkeypatch.setenv("WRITER_RETENTION_DAYS", "30")
    settings = WriterSettings()
    assert settings.writer_batch_max_rows == 250
    assert settings.writer_retention_days == 30
    assert settings.writer_warm_top_n == 100
    assert settings.writer_ops_port == 8092


def test_the_popular_look_ahead_must_exceed_the_refresh_interval() -> None:
    with pytest.raises(ValidationError, match="REFRESH_AHEAD_SECONDS must exceed"):
        WriterSettings(
            writer_popular_refresh_interval_seconds=30, writer_popular_refresh_ahead_seconds=20
        )
