"""The `btd` command line parses and lists every area's sub-commands."""

from service.cli import build_parser


def test_help_lists_subcommands(capsys):
    parser = build_parser()
    help_text = parser.format_help()
    assert "btd" in help_text
