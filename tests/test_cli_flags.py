"""One spelling per concept across the `aet` subcommands: the test walks every parser."""

from __future__ import annotations

import argparse
import importlib
import re

import pytest

from aet.cli import COMMANDS

# Each shared concept: its one flag, the other spellings it must never take, and the commands
# that must offer it under that flag.
CONCEPTS = {
    "--dataset": (
        {"--data", "--data-set", "--dataset-name"},
        {"pretrain", "probe", "embed", "demo"},
    ),
    "--data-path": (
        {"--path", "--data-dir", "--data-file", "--data-root", "--input"},
        {"pretrain", "probe", "embed", "demo"},
    ),
    "--seed": (
        {"--random-seed", "--random-state", "--split-seed"},
        {"pretrain", "probe", "embed", "demo"},
    ),
    "--test-fraction": (
        {"--test-size", "--test-split", "--test-ratio"},
        {"pretrain", "probe", "embed"},
    ),
    "--val-fraction": (
        {"--val-size", "--val-split", "--validation-fraction", "--val-ratio"},
        {"pretrain", "probe", "embed"},
    ),
    "--limit": (
        {"--max-rows", "--n-rows", "--num-rows", "--max-examples"},
        {"pretrain", "probe", "embed"},
    ),
    "--model": (
        {"--model-name", "--model-dir", "--model-path", "--encoder"},
        {"export", "probe", "embed", "demo"},
    ),
    "--repository": (
        {"--repo", "--model-repository", "--repository-dir", "--exported", "--model-repo"},
        {"export", "serve", "demo"},
    ),
    "--device": (
        {"--gpu", "--cuda", "--use-cuda", "--accelerator"},
        {"serve", "pretrain", "embed", "probe"},
    ),
    "--columns": ({"--features", "--feature-columns", "--cols"}, {"pretrain", "embed"}),
    "--label-column": ({"--label", "--target", "--target-column", "--y"}, {"pretrain", "embed"}),
    "--drop-missing": ({"--dropna", "--drop-na", "--skip-missing"}, {"pretrain", "embed"}),
}
# Flags whose values mean the same thing everywhere: the same type and choices in every command.
SAME_MEANING = (
    "--dataset",
    "--data-path",
    "--test-fraction",
    "--val-fraction",
    "--limit",
    "--columns",
    "--label-column",
    "--drop-missing",
)


def parsers() -> dict[str, argparse.ArgumentParser]:
    built = {}
    for command, (module_name, _) in COMMANDS.items():
        parser = argparse.ArgumentParser(prog=f"aet {command}")
        importlib.import_module(module_name).configure_parser(parser)
        built[command] = parser
    return built


def flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {
        option: action
        for action in parser._actions
        for option in action.option_strings
        if option.startswith("--")
    }


PARSERS = parsers()


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_no_command_spells_a_shared_concept_another_way(command):
    offered = set(flags(PARSERS[command]))
    for flag, (other_spellings, _) in CONCEPTS.items():
        clash = offered & other_spellings
        assert not clash, f"aet {command}: {sorted(clash)} spells {flag} another way"


@pytest.mark.parametrize("flag", sorted(CONCEPTS))
def test_each_shared_concept_is_offered_under_its_one_flag(flag):
    _, commands = CONCEPTS[flag]
    missing = sorted(c for c in commands if flag not in flags(PARSERS[c]))
    assert not missing, f"{flag} missing from: {', '.join('aet ' + c for c in missing)}"


@pytest.mark.parametrize("flag", SAME_MEANING)
def test_shared_flags_take_the_same_values_everywhere(flag):
    kinds = {
        command: (action.type, frozenset(action.choices or ()))
        for command, parser in PARSERS.items()
        if (action := flags(parser).get(flag)) is not None
    }
    assert len(set(kinds.values())) == 1, f"{flag} differs between commands: {kinds}"


def test_no_two_flags_differ_only_in_separators_or_plural():
    """`--data-path` and `--datapath`, `--label-count` and `--label-counts`: one concept."""
    seen: dict[str, tuple[str, str]] = {}
    for command, parser in PARSERS.items():
        for flag in flags(parser):
            key = re.sub(r"[-_]", "", flag).removesuffix("s")
            if key in seen and seen[key][0] != flag:
                pytest.fail(f"aet {command} {flag} vs aet {seen[key][1]} {seen[key][0]}")
            seen.setdefault(key, (flag, command))
