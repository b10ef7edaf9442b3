"""Every error code has exactly one HTTP status, in the one table (http_errors.STATUS)."""

from model_orchestrator.platform.errors import Code
from model_orchestrator.server.http_errors import STATUS


def test_every_code_has_a_status_and_the_table_names_no_other():
    assert set(STATUS) == set(Code), set(Code) ^ set(STATUS)
    assert all(400 <= s <= 599 for s in STATUS.values())
