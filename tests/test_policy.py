"""policy.resolve, every branch, without a server: what a request may do to the policy."""
import pytest

from tokenwise_safety.policy import ECHO_CHARS, OVERRIDE_KEY_ENV, PolicyError, Resolved, resolve

KEY = "operator-secret"
SHADOW = {"mode": "shadow", "threshold": 0.5, "enforce_possible": True, "client_override": True}
ENFORCING = {**SHADOW, "mode": "enforce"}


@pytest.fixture(autouse=True)
def key_env(monkeypatch):
    monkeypatch.setenv(OVERRIDE_KEY_ENV, KEY)


def refused(requested, server=SHADOW) -> PolicyError:
    with pytest.raises(PolicyError) as e:
        resolve(requested, server)
    return e.value


def test_no_policy_field_means_the_operators_policy():
    assert resolve(None, SHADOW) is None


def test_an_empty_object_resolves_to_the_operators_policy():
    assert resolve({}, SHADOW) == {"mode": "shadow", "threshold": 0.5}


@pytest.mark.parametrize("requested, kind", [("enforce", "str"), (["enforce"], "list"), (0.3, "float")])
def test_a_policy_that_is_not_an_object_gets_400(requested, kind):
    e = refused(requested)
    assert (e.status_code, str(e)) == (400, f"custom_params.tokenwise_safety must be an object, got {kind}")


def test_unknown_fields_get_400_naming_them():
    e = refused({"mode": "enforce", "colour": "red"})
    assert e.status_code == 400
    assert str(e) == ("custom_params.tokenwise_safety has unknown field(s) ['colour']; "
                      "allowed: mode, threshold, override_key")


@pytest.mark.parametrize("mode", [[], ["enforce"], {"a": 1}, 2, None, True, "bogus", "ENFORCE"])
def test_a_mode_that_is_not_a_known_name_gets_400(mode):
    e = refused({"mode": mode})
    assert e.status_code == 400
    assert str(e).startswith("custom_params.tokenwise_safety.mode must be one of "
                             "['enforce', 'off', 'shadow'], got ")


@pytest.mark.parametrize("threshold", [True, False, "0.3", None, [0.3], float("nan"), float("inf"),
                                       float("-inf"), 0.0, 1.0, -0.2, 1.5, 0, 1,
                                       pytest.param(10 ** 400, id="400-digit int"),
                                       pytest.param(-(10 ** 400), id="-400-digit int")])
def test_a_threshold_that_is_not_a_probability_gets_400(threshold):
    e = refused({"threshold": threshold})
    assert e.status_code == 400
    assert str(e).startswith("custom_params.tokenwise_safety.threshold must be a number "
                             "strictly between 0 and 1")


def test_echoed_values_are_cut():
    for requested in ({"mode": "x" * 10_000}, {"threshold": 10 ** 400}, {"k" * 10_000: 1}):
        message = str(refused(requested))
        assert len(message) < 200, message
        assert "x" * ECHO_CHARS not in message and "9" * ECHO_CHARS not in message
        assert "k" * ECHO_CHARS not in message


@pytest.mark.parametrize("requested, expected", [
    ({"mode": "enforce"}, {"mode": "enforce", "threshold": 0.5}),
    ({"threshold": 0.2}, {"mode": "shadow", "threshold": 0.2}),
    ({"mode": "enforce", "threshold": 0.5}, {"mode": "enforce", "threshold": 0.5}),
])
def test_tightening_is_accepted_without_the_key(requested, expected):
    effective = resolve(requested, SHADOW)
    assert effective == expected and type(effective) is Resolved and not effective.full_trace


@pytest.mark.parametrize("requested, server", [
    ({"mode": "off"}, SHADOW), ({"threshold": 0.6}, SHADOW),
    ({"mode": "shadow"}, ENFORCING), ({"mode": "off"}, ENFORCING),
])
def test_loosening_without_the_right_key_gets_403(requested, server):
    for key in (None, "wrong", KEY[:-1], 12345):
        e = refused({**requested, **({"override_key": key} if key is not None else {})}, server)
        assert e.status_code == 403 and "loosens the operator's policy" in str(e)


def test_enforce_to_shadow_on_an_enforcing_server_needs_the_key():
    assert refused({"mode": "shadow"}, ENFORCING).status_code == 403
    granted = resolve({"mode": "shadow", "override_key": KEY}, ENFORCING)
    assert granted == {"mode": "shadow", "threshold": 0.5} and granted.full_trace


def test_loosening_with_the_key_is_granted_and_the_key_is_dropped():
    effective = resolve({"mode": "off", "threshold": 0.9, "override_key": KEY}, SHADOW)
    assert effective == {"mode": "off", "threshold": 0.9}
    assert "override_key" not in effective and effective.full_trace


def test_the_key_without_loosening_still_earns_the_full_trace():
    assert resolve({"override_key": KEY}, SHADOW).full_trace
    assert not resolve({"override_key": "wrong"}, SHADOW).full_trace


def test_the_right_key_on_a_server_without_client_override_is_refused():
    no_override = {**SHADOW, "client_override": False}
    assert refused({"mode": "off", "override_key": KEY}, no_override).status_code == 403
    assert not resolve({"override_key": KEY}, no_override).full_trace


def test_the_key_is_refused_when_the_environment_has_none(monkeypatch):
    monkeypatch.delenv(OVERRIDE_KEY_ENV)
    assert refused({"mode": "off", "override_key": ""}).status_code == 403


def test_enforce_is_refused_where_enforcement_is_impossible():
    overlap = {**SHADOW, "enforce_possible": False}
    e = refused({"mode": "enforce"}, overlap)
    assert e.status_code == 400 and "--safety-keep-overlap-schedule" in str(e)
    assert resolve({"mode": "shadow"}, overlap) == {"mode": "shadow", "threshold": 0.5}


def test_a_resolved_policy_passes_through_unchanged():
    granted = resolve({"mode": "off", "override_key": KEY}, SHADOW)
    assert resolve(granted, SHADOW) is granted  # a second seam does not re-check (the key is gone)
    assert refused(dict(granted)).status_code == 403  # a plain copy is just a client's dict
