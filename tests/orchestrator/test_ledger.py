import pytest

from orchestrator.ledger import Ledger


def test_balanced_run_with_drops_and_held_groups():
    led = Ledger()
    for g in "abcde":
        led.produce(g)
    for g in "abcd":
        led.score(g)
    led.consume("a")
    led.consume("b")
    led.drop("c", "stale")
    led.retried += 2
    b = led.balance(held={"d", "e"})
    assert b["produced"] == 5 and b["consumed"] == 2 and b["dropped"] == 1 and b["dropped_stale"] == 1
    assert b["pending"] == 2 and b["lost"] == 0 and b["retried"] == 2 and b["balanced"]


def test_forgotten_group_is_lost_and_unbalanced():
    led = Ledger()
    led.produce("a")
    led.produce("b")
    led.score("a")
    led.consume("a")
    b = led.balance(held=set())  # the pipeline forgot "b"
    assert b["lost"] == 1 and not b["balanced"]


def test_double_counting_is_refused():
    led = Ledger()
    led.produce("a")
    led.score("a")
    led.consume("a")
    with pytest.raises(ValueError, match="consumed twice"):
        led.consume("a")
    with pytest.raises(ValueError, match="produced twice"):
        led.produce("a")
    with pytest.raises(ValueError, match="dropped twice or after use"):
        led.drop("a", "stale")
    with pytest.raises(ValueError, match="out of order"):
        led.produce("z") or led.consume("z")
    b = led.balance(held={"a", "z"})  # held and consumed at once
    assert b["counted_twice"] == 1 and not b["balanced"]


def test_state_round_trip():
    led = Ledger()
    led.produce("a")
    led.score("a")
    led.drop("a", "data_error")
    led.retried = 3
    again = Ledger.from_state_dict(led.state_dict())
    assert again.balance() == led.balance()
