"""The scheduler trusts only policies the HTTP side checked (SGLang's gRPC servicers, and
the Rust server, hand requests straight to the scheduler): unit tests of the admission
rule and of the enforce seam that applies it."""
import types

import pytest

from tokenwise_safety import admission, metrics
from tokenwise_safety.patches import enforce

OPERATOR = {"mode": "enforce", "threshold": 0.5, "enforce_possible": True}


@pytest.fixture(autouse=True)
def secret(monkeypatch):
    monkeypatch.setenv(admission.STAMP_ENV, "per-launch-secret")


@pytest.mark.parametrize("raw", [
    {"mode": "enforce", "threshold": 0.2},  # tighter threshold
    {"mode": "enforce"},
    {},
    None,
])
def test_policies_at_least_as_strict_as_the_operators_need_no_stamp(raw):
    policy, trusted = admission.admit(raw, OPERATOR)
    assert trusted and policy["mode"] == "enforce" and policy["threshold"] <= 0.5


@pytest.mark.parametrize("raw", [
    {"mode": "off"}, {"mode": "shadow"}, {"threshold": 0.9}, {"mode": "shadow", "threshold": 0.9},
    {"mode": "off", "stamp": "0" * 64},  # a forged stamp
])
def test_unstamped_loosening_falls_back_to_the_operators_policy(raw):
    assert admission.admit(raw, OPERATOR) == ({"mode": "enforce", "threshold": 0.5}, False)


@pytest.mark.parametrize("raw", [
    "x", ["enforce"], 3, {"mode": []}, {"mode": "bogus"}, {"threshold": "0.1"}, {"threshold": float("nan")},
    {"threshold": True}, {"threshold": 10 ** 400}, {"threshold": 0.0}, {"override_key": "k"}, {"colour": "red"},
])
def test_malformed_policies_fall_back_to_the_operators_policy(raw):
    assert admission.admit(raw, OPERATOR) == ({"mode": "enforce", "threshold": 0.5}, False)


def test_a_stamp_from_the_http_side_admits_exactly_its_policy():
    granted = admission.stamp({"mode": "shadow", "threshold": 0.9})
    assert admission.admit(granted, OPERATOR) == ({"mode": "shadow", "threshold": 0.9}, True)
    moved = {**granted, "mode": "off"}  # the stamp does not carry over to another policy
    assert admission.admit(moved, OPERATOR)[1] is False


def test_a_stamp_from_another_launch_is_refused(monkeypatch):
    granted = admission.stamp({"mode": "off", "threshold": 0.5})
    monkeypatch.setenv(admission.STAMP_ENV, "another-launch")
    assert admission.admit(granted, OPERATOR)[1] is False


def _req(custom_params):
    return types.SimpleNamespace(rid="r1", sampling_params=types.SimpleNamespace(custom_params=custom_params))


@pytest.mark.parametrize("custom", [{"tokenwise_safety": "x"}, "x", {"tokenwise_safety": {"mode": "off"}}])
def test_the_enforce_seam_applies_the_operators_policy_and_counts_it(custom):
    """A malformed policy used to crash before_forward; a loosened one used to be obeyed."""
    counter = metrics._metrics()["untrusted_policies"]
    before = counter._value.get()
    batch = types.SimpleNamespace(reqs=[_req(custom)])
    (state,) = enforce.states_of(worker=None, batch=batch, config={**OPERATOR, "top_k": 20})
    assert state.policy.enforce and state.policy.threshold == 0.5
    assert counter._value.get() == before + 1


def test_the_enforce_seam_keeps_a_clients_tightening_and_labels_it():
    batch = types.SimpleNamespace(reqs=[_req({"tokenwise_safety": {"mode": "enforce", "threshold": 0.1}})])
    (state,) = enforce.states_of(worker=None, batch=batch, config={**OPERATOR, "top_k": 20})
    assert state.policy.threshold == 0.1 and state.policy.origin == "client"
