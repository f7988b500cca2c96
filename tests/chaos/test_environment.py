"""Which stack the chaos suite may break (tests.chaos.environment)."""

from __future__ import annotations

import pytest

from tests.chaos.environment import SharedStackError, private_stack
from tokvel_common.infra.layout import RUN_DIR_ENV
from tokvel_common.localstack import PORT_OFFSET_ENV
from tokvel_common.paths import PROJECT_ROOT


def test_without_an_offset_the_suite_takes_its_own_stack_whatever_the_run_dir() -> None:
    # A run dir alone belongs to a stack on the default ports: it is not the suite's.
    env = private_stack({RUN_DIR_ENV: "/somewhere/else", "OTHER": "kept"})
    assert env == {
        RUN_DIR_ENV: str(PROJECT_ROOT / ".run" / "chaos"),
        PORT_OFFSET_ENV: "2000",
        "OTHER": "kept",
    }


def test_an_offset_gets_a_run_dir_of_its_own_unless_one_is_given() -> None:
    assert private_stack({PORT_OFFSET_ENV: "3000"})[RUN_DIR_ENV] == str(
        PROJECT_ROOT / ".run" / "chaos-3000"
    )
    given = {PORT_OFFSET_ENV: "3000", RUN_DIR_ENV: "/work/runs/mine"}
    assert private_stack(given) == given


def test_the_default_stack_is_refused() -> None:
    with pytest.raises(SharedStackError):
        private_stack({PORT_OFFSET_ENV: "0", RUN_DIR_ENV: "/work/runs/mine"})
