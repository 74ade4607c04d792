"""The command line as users type it: prompts before or after the options; anything else left over is refused."""

from __future__ import annotations

import pytest

from madapt.cli import parse


@pytest.mark.parametrize(
    "argv",
    [
        ["predict", "c.yaml", "hi there", "--adapter", "coding"],
        ["predict", "c.yaml", "--adapter", "coding", "hi there"],
        ["predict", "--adapter", "coding", "c.yaml", "hi there"],
    ],
    ids=["prompt first", "options first", "options before the config"],
)
def test_predict_takes_its_prompts_on_either_side_of_the_options(argv):
    args = parse(argv)
    assert (args.config, args.prompt, args.adapter) == ("c.yaml", ["hi there"], ["coding"])


@pytest.mark.parametrize(
    "argv", [["validate", "c.yaml", "stray"], ["predict", "c.yaml", "--adapter", "coding", "hi", "--nope"]]
)
def test_what_no_command_takes_is_refused_by_name(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse(argv)
    assert exit_.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err
