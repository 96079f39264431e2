"""Each merge knob is declared once, in ``MergeConfig``'s field metadata: the command line's options and the
engine functions that take a knob as an argument carry its default, and its help is one sentence."""

from __future__ import annotations

import inspect
import re

import pytest

from duolora import cli, config, mergers, priors


def test_every_knob_has_one_sentence_of_help() -> None:
    for f in config.KNOBS:
        text = f.metadata["help"]
        assert text.endswith(".") and len(text) <= 200, (f.name, text)
        assert not re.search(r"[.!?] +[A-Z]", re.sub(r"\b(e\.g|i\.e)\. ", "", text[:-1])), (f.name, text)


def test_the_command_line_defaults_are_the_config_defaults() -> None:
    args = cli.build_parser().parse_args(["merge", "a.safetensors", "b.safetensors", "-o", "out.safetensors"])
    values = cli._knob_values(args)
    assert sorted(values) == sorted(f.name for f in config.KNOBS if f.metadata["cli"] is not None)
    assert len(values) == 21
    assert config.MergeConfig(objective="weights_only", **values) == config.MergeConfig(objective="weights_only")


def test_the_command_line_sets_every_knob() -> None:
    args = cli.build_parser().parse_args(["merge", "a.safetensors", "b.safetensors", "-o", "o.safetensors",
                                          "--priors", "none", "--no-prior-loss", "--lambda-sim", "0.5",
                                          "--margin", "0.25", "--max-rank", "8", "--method", "direct"])
    values = cli._knob_values(args)
    assert (values["prior_preset"], values["prior_loss"], values["lambda_sim"]) == ("none", False, 0.5)
    assert (values["margin"], values["max_rank"], values["method"]) == (0.25, 8, "direct")


@pytest.mark.parametrize("function", [priors.layer_prior_loss, priors.prior_init, mergers.Merger.__init__,
                                      mergers.ZipRankMerger.__init__])
def test_engine_functions_take_their_defaults_from_the_config(function) -> None:
    aliases = {"kind": "prior_loss_kind", "push": "prior_push"}
    checked = 0
    for name, parameter in inspect.signature(function).parameters.items():
        knob = aliases.get(name, name)
        if knob in {f.name for f in config.KNOBS} and parameter.default is not inspect.Parameter.empty:
            assert parameter.default == config.default(knob), (function.__qualname__, name)
            checked += 1
    assert checked >= 1
