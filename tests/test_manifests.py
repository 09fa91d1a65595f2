"""The Kubernetes manifests and the fleet config: valid against Kubernetes' own schemas
(kubernetes-validate, strict), and pinned to the probe that actually ships."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tokenwise_safety import bundled
from tokenwise_safety.launch import fleet

K8S = Path(__file__).resolve().parents[1] / "launch" / "k8s"
SHIPPED_SHA = hashlib.sha256(bundled.PROBE_PATH.read_bytes()).hexdigest()


def docs():
    return [(p.name, d) for p in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text())]


@pytest.mark.parametrize("name,doc", docs(), ids=lambda x: x if isinstance(x, str) else "")
def test_manifest_is_valid_kubernetes(name, doc):
    kubernetes_validate.validate(doc, "1.34", strict=True)


def test_a_schema_violation_is_caught():
    bad = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {"ports": [{"port": "eighty"}]}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, "1.34", strict=True)


def test_tracks_pin_the_shipped_probe_and_differ_only_in_mode_and_size():
    by_name = {d["metadata"]["name"]: d for _, d in docs()}
    stable, canary = by_name["tokenwise-stable"], by_name["tokenwise-canary"]
    for d in (stable, canary):
        [init] = d["spec"]["template"]["spec"]["initContainers"]
        assert init["env"][0]["value"] == SHIPPED_SHA
        assert d["spec"]["template"]["metadata"]["labels"]["app"] == by_name["tokenwise"]["spec"]["selector"]["app"]
    mode = lambda d: d["spec"]["template"]["spec"]["containers"][0]["args"][-1]  # noqa: E731
    assert (mode(stable), mode(canary)) == ("shadow", "enforce")


def test_fleet_config_pins_the_shipped_probe():
    config = fleet.load_config(fleet.DEFAULT_CONFIG)
    assert config["probe"]["sha256"] == SHIPPED_SHA
    assert fleet.probe_path(config) == bundled.PROBE_PATH
    assert fleet.modes_for(config, "canary") == ["enforce", "shadow"]
    assert fleet.modes_for(config, "shadow") == ["shadow", "shadow"]
    assert fleet.modes_for({**config, "replicas": 4, "stages": {"c": 0.1}}, "c") == ["enforce"] + ["shadow"] * 3
