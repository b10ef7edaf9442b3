"""The transition table is the only way states change; every pair of states is checked."""

import itertools

import pytest

from model_orchestrator.core.lifecycle import TRANSITIONS, IllegalTransition, LoadCancelled, ManagedModel, State
from support.registry import model, registry

LEGAL = {
    ("unloaded", "loading"), ("unloaded", "downloading"),
    ("downloading", "unloaded"), ("downloading", "failed"),
    ("loading", "loaded"), ("loading", "failed"), ("loading", "unloading"),
    ("loaded", "unloading"), ("loaded", "failed"),
    ("unloading", "unloaded"),
    ("failed", "loading"), ("failed", "unloaded"), ("failed", "downloading"),
}


def _slot() -> ManagedModel:
    reg = registry(model("m"))
    return ManagedModel(reg.models[0])


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
    slot = _slot()

    async def launch():  # never reached
        raise AssertionError("the load ran")

    slot.begin_load(launch, timeout=1, log_lines=10)
    slot._load_task.cancel()
    with pytest.raises(LoadCancelled):
        await slot.join_load()


def test_a_load_priority_override_lasts_as_long_as_its_process():
    """A load's `priority` applied to that load only: after the model fails or is unloaded, the registry's holds
    again (it used to stick after an unload)."""
    slot = _slot()
    slot.state = State.UNLOADED
    slot.priority_override = 42
    assert slot.priority == 42
    for path in ([State.LOADING, State.LOADED, State.UNLOADING, State.UNLOADED], [State.LOADING, State.FAILED]):
        slot.state, slot.priority_override = State.UNLOADED, 42
        for state in path:
            slot._transition(state)
        assert slot.priority == slot.spec.priority == 0
