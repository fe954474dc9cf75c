"""What the CLI prints is the text its sources hold: Rich markup ate `[trigger]` from
`sample --help` and from `config --keys` (every bracketed word in a help string or a key's
documentation vanished)."""

from __future__ import annotations

import re

import typer
from conftest import cli

from lorakit import config as cfg
from lorakit.cli import app


def _commands():
    group = typer.main.get_command(app)
    stack = [([], group)]
    while stack:
        path, cmd = stack.pop()
        if hasattr(cmd, "commands"):  # a group (typer may ship its own click)
            stack += [([*path, n], c) for n, c in cmd.commands.items()]
        else:
            yield path, cmd


def test_bracketed_words_in_help_survive_rendering():
    checked = 0
    for path, cmd in _commands():
        for param in cmd.params:
            text = getattr(param, "help", None) or ""
            for word in re.findall(r"\[[a-z_]+\]", text.replace("\\[", "[")):
                out = " ".join(cli(*path, "--help").output.split())
                assert word in out, (path, param.name, word)
                checked += 1
    assert checked, "no bracketed help text found: the test checks nothing"


def test_config_keys_print_their_documentation_verbatim():
    out = " ".join(cli("config", "--keys").output.split())
    docs = cfg.field_docs()
    assert "[trigger]" in docs["data.trigger"]
    for dotted, doc in docs.items():
        for word in re.findall(r"\[[a-z_]+\]", doc):
            assert word in out, (dotted, word)
