"""The hook layer, without a server: registration is idempotent and targets resolve."""
import argparse
import importlib.metadata
import pkgutil

import pytest

from sglang.srt.plugins.hook_registry import HookRegistry

import tokenwise_safety.patches as patches
from tokenwise_safety.patches import server_args


@pytest.fixture
def clean_registry():
    saved = {k: list(v) for k, v in HookRegistry._hooks.items()}
    HookRegistry._hooks.clear()
    yield HookRegistry
    HookRegistry._hooks.clear()
    HookRegistry._hooks.update(saved)


def test_entry_point_is_installed():
    eps = importlib.metadata.entry_points(group="sglang.srt.plugins")
    assert any(ep.value == "tokenwise_safety.patches:register" for ep in eps)


def test_register_is_idempotent(clean_registry):
    patches.register()
    patches.register()
    for target, hook, _ in patches._HOOKS:
        assert sum(h is hook for _, h, *_ in clean_registry._hooks[target]) == 1


def test_every_target_resolves_in_the_pinned_sglang():
    from tokenwise_safety.patches import harmless_draft  # registered where a draft model loads
    for target, _, _ in patches._HOOKS + harmless_draft.HOOKS:
        assert callable(pkgutil.resolve_name(target)), target


def test_cli_flags_are_added_once():
    parser = argparse.ArgumentParser()
    server_args.add_cli_args(None, parser)
    server_args.add_cli_args(None, parser)  # a second load in the same process
    args = parser.parse_args(["--safety-plugin", "tokenwise", "--safety-threshold", "0.3"])
    assert args.safety_plugin == "tokenwise" and args.safety_mode == "shadow"
    assert args.safety_threshold == 0.3


def test_without_the_flag_server_args_are_untouched():
    parser = argparse.ArgumentParser()
    server_args.add_cli_args(None, parser)
    sentinel = object()
    assert server_args.from_cli_args(sentinel, None, parser.parse_args([])) is sentinel
