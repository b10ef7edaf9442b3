"""The transition table is the only way states change; every pair of states is checked."""

import itertools

import pytest

from model_orchestrator.lifecycle import TRANSITIONS, IllegalTransition, ModelSlot, State
from model_orchestrator.registry import parse_registry

LEGAL = {
    ("unloaded", "loading"),
    ("loading", "loaded"), ("loading", "failed"), ("loading", "unloading"),
    ("loaded", "unloading"), ("loaded", "failed"),
    ("unloading", "unloaded"),
    ("failed", "loading"), ("failed", "unloaded"),
}


def _slot() -> ModelSlot:
    reg = parse_registry('default_model = "m"\n[[models]]\nid = "m"\nsource = { type = "generated" }\n')
    return ModelSlot(reg.models[0])


def test_table_is_exactly_the_documented_lifecycle():
    assert {(a.value, b.value) for a, nexts in TRANSITIONS.items() for b in nexts} == LEGAL
    assert set(TRANSITIONS) == set(State)


@pytest.mark.parametrize("old, new", list(itertools.product(State, State)))
def test_every_pair(old, new):
    slot = _slot()
    seen = []
    slot._on_transition = lambda s, a, b: seen.append((a, b))
    slot.state = old
    if (old.value, new.value) in LEGAL:
        slot._transition(new)
        assert slot.state == new and seen == [(old, new)]
    else:
        with pytest.raises(IllegalTransition):
            slot._transition(new)
        assert slot.state == old and seen == []


async def test_a_waiter_of_a_load_cancelled_before_it_ran_gets_load_cancelled():
    """An unload can cancel the load task before its first step; its waiters (HTTP handlers) must get an answer,
    not a CancelledError that drops their connection (seen under load: ServerDisconnectedError)."""
    from model_orchestrator.lifecycle import LoadCancelled, join_load

    slot = _slot()

    async def launch():  # never reached
        raise AssertionError("the load ran")

    task = slot.start_load(launch, None, timeout=1, log_lines=10)
    task.cancel()
    with pytest.raises(LoadCancelled):
        await join_load(task, slot.id)
