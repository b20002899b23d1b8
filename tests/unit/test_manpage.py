"""The man pages: pve-gpu-hook(8) is what the generator makes of the parser, pve-gpu-hook.yaml(5)
documents every key of the override file, and both are clean roff.

A parser change without ``make man`` fails :func:`test_page_is_current`; the other tests read the
committed pages the way a person (or lintian) would, independently of the generator.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pvegpuhook import __version__
from pvegpuhook.cli import build_parser
from pvegpuhook.settings import SCHEMA, parse_settings
from tests.fronts import REPO
from tools import manpage

PAGE = REPO / "man" / "pve-gpu-hook.8"
YAML_PAGE = REPO / "man" / "pve-gpu-hook.yaml.5"
PAGES = (PAGE, YAML_PAGE)
STALE = "man/pve-gpu-hook.8 is not what the parser gives: run `make man` and commit the page"


def read(page: Path) -> str:
    return page.read_text(encoding="utf-8")


def plain(roff: str) -> str:
    """Roff source as text to search in: font, hyphen and zero-width escapes undone."""
    text = re.sub(r"\\f[BIRP]", "", roff)
    for escaped, char in (("\\-", "-"), ("\\&", ""), ("\\ ", " "), ("\\e", "\\")):
        text = text.replace(escaped, char)
    return text


def section(roff: str, start: str, stops: tuple[str, ...] = (".SH", ".SS")) -> str:
    """The lines after the line ``start`` up to the next line starting with one of ``stops``."""
    lines = roff.splitlines()
    index = lines.index(start)
    out = []
    for text in lines[index + 1 :]:
        if text.startswith(stops):
            break
        out.append(text)
    return "\n".join(out)


def subcommands() -> dict[str, argparse.ArgumentParser]:
    return manpage.subcommands(build_parser())


# ---- pve-gpu-hook(8) is current -----------------------------------------------------------------


def assert_current(path: Path, expected: str) -> None:
    committed = path.read_text(encoding="utf-8")
    if committed != expected:
        diff = difflib.unified_diff(
            committed.splitlines(), expected.splitlines(), "committed", "generated", lineterm=""
        )
        stale = f"{path.relative_to(REPO)} is not what tools/manpage.py makes: run `make man`"
        pytest.fail(stale + "\n" + "\n".join(list(diff)[:40]), pytrace=False)


def test_page_is_current() -> None:
    assert_current(PAGE, manpage.render())


def test_yaml_page_keys_and_config_template_are_current() -> None:
    """One schema (settings.OPTIONS) drives the validation, the man page's KEYS and the template."""
    assert_current(YAML_PAGE, manpage.render_yaml_page(read(YAML_PAGE)))
    assert_current(REPO / "etc/config.yaml", manpage.render_config())


def test_config_template_is_all_defaults() -> None:
    """Uncommenting every key of the installed template changes no setting."""
    text = (REPO / "etc/config.yaml").read_text()
    keys = [line[1:] for line in text.splitlines() if re.match(r"#[a-z_]+: ", line)]
    assert [key.split(":")[0] for key in keys] == list(SCHEMA)
    assert parse_settings("\n".join(keys), "x").as_dict() == parse_settings("", "x").as_dict()


def test_generator_output_does_not_depend_on_the_environment(tmp_path: Path) -> None:
    # a terminal width, time zone, locale or test root must not leak into the page
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(REPO),
        "COLUMNS": "40",
        "TZ": "Pacific/Kiritimati",
        "LC_ALL": "C",
        "SOURCE_DATE_EPOCH": "0",
        "PVE_GPU_HOOK_ROOT": str(tmp_path),
    }
    result = subprocess.run(
        [sys.executable, "-m", "tools.manpage"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == read(PAGE), STALE


def test_date_and_version_come_from_the_release() -> None:
    date = manpage.RELEASE_DATES[__version__]
    for page in PAGES:
        header = next(text for text in read(page).splitlines() if text.startswith(".TH "))
        assert f'"{date}"' in header, f"{page.name}: .TH should carry {date}"
        assert f'"pve\\-gpu\\-hook {__version__}"' in header, (
            f"{page.name}: .TH names another version than {__version__}"
        )


def test_unknown_version_has_no_made_up_date(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(manpage, "__version__", "99.0.0")
    with pytest.raises(SystemExit, match="RELEASE_DATES"):
        manpage.render()


# ---- what the page says -------------------------------------------------------------------------


def test_page_has_every_section() -> None:
    headers = [text for text in read(PAGE).splitlines() if text.startswith(".SH ")]
    assert headers == [
        ".SH NAME",
        ".SH SYNOPSIS",
        ".SH DESCRIPTION",
        ".SH OPTIONS",
        ".SH COMMANDS",
        ".SH OUTPUT FORMATS",
        ".SH METRICS",
        ".SH EXIT STATUS",
        ".SH ENVIRONMENT",
        ".SH FILES",
        ".SH EXAMPLES",
        ".SH SEE ALSO",
    ]


def test_every_subcommand_option_and_help_is_in_its_section() -> None:
    roff = read(PAGE)
    # .SY pve-gpu-hook, then the lines of one command: its name and its options, then .YS
    blocks = plain(section(roff, ".SH SYNOPSIS", (".SH",))).split(".SY pve-gpu-hook\n")
    synopses = {block.split()[0]: " ".join(block.split()) for block in blocks if block.strip()}
    commands = subcommands()
    assert set(commands) == {
        *("status", "scan", "dry-run", "recover", "register", "unregister", "start", "handover")
    }
    for name, parser in commands.items():
        text = plain(section(roff, f".SS {manpage.escape(name)}"))
        assert " ".join((parser.description or "").split()) in " ".join(text.split()), name
        synopsis = synopses.get(name, "")
        assert synopsis, f"{name} missing from SYNOPSIS"
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            words = action.option_strings or [str(action.metavar or action.dest)]
            for word in words:
                assert word in text, f"{name}: {word} not documented"
                assert word in synopsis, f"{name}: {word} missing from SYNOPSIS"
            assert str(action.help) in " ".join(text.split()), f"{name}: help of {words}"
            for choice in action.choices or ():
                assert choice in text, f"{name}: choice {choice} of {words}"


def test_every_option_string_of_the_parser_is_in_the_page() -> None:
    text = plain(read(PAGE))
    parsers = [build_parser(), *subcommands().values()]
    for parser in parsers:
        for action in parser._actions:
            for option in action.option_strings:
                assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text), option


def test_exit_codes_files_environment_and_see_also() -> None:
    roff = read(PAGE)
    exits = plain(section(roff, ".SH EXIT STATUS", (".SH",)))
    for code in ("0", "1", "2"):
        assert f".TP\n{code}\n" in exits
    files = plain(section(roff, ".SH FILES", (".SH",)))
    for path in (
        "/etc/vzdump.conf",
        "/usr/share/pve-gpu-hook/vzdump-hook",
        "/etc/pve-gpu-hook/config.yaml",
        "/var/lib/pve-gpu-hook/state.json",
        "/var/log/pve-gpu-hook.log",
        "/run/lock/pve-gpu-hook.lock",
        "/etc/pve/jobs.cfg",
    ):
        assert path in files, path
    assert "PVE_GPU_HOOK_ROOT" in plain(section(roff, ".SH ENVIRONMENT", (".SH",)))
    see_also = plain(section(roff, ".SH SEE ALSO", (".SH",)))
    for ref in ("vzdump (1)", "qm (1)", "pct (1)", "pve-gpu-hook.yaml (5)"):
        assert ref in see_also, ref


def test_examples_are_valid_command_lines() -> None:
    # every example must parse with the real parser: an option renamed breaks this test
    roff = read(PAGE)
    examples = plain(section(roff, ".SH EXAMPLES", (".SH",)))
    lines = [text.strip() for text in examples.splitlines() if text.startswith("  pve-gpu-hook ")]
    assert len(lines) >= 5
    for example in lines:
        args = build_parser().parse_args(example.split()[1:])
        assert args.command in subcommands(), example


def test_json_shapes_name_every_key_the_commands_print(tmp_path: Path) -> None:
    # the shapes come from the modules' docstrings: check them against a real run's keys
    env = dict(os.environ, PVE_GPU_HOOK_ROOT=str(tmp_path), PYTHONPATH=str(REPO))
    roff = read(PAGE)
    commands = (("status", []), ("scan", []), ("dry-run", ["--all"]), ("recover", ["--dry-run"]))
    for name, args in commands:
        result = subprocess.run(
            [sys.executable, "-m", "pvegpuhook", name, *args, "--output-format", "json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.stdout, result.stderr
        shape = plain(section(roff, f'.SS "{manpage.escape(name)} output"'))
        for key in json.loads(result.stdout):
            assert f'"{key}"' in shape, f"{name} prints {key!r}; its shape does not name it"


# ---- pve-gpu-hook.yaml(5) -----------------------------------------------------------------------


def yaml_value(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def key_blocks() -> dict[str, str]:
    """KEYS section of the .5 page: key → its paragraph (plain text)."""
    keys = section(read(YAML_PAGE), ".SH KEYS", (".SH",))
    blocks: dict[str, str] = {}
    for block in keys.split(".TP\n")[1:]:
        head, _, body = block.partition("\n")
        assert head.startswith(".B "), head
        blocks[head[3:]] = plain(body)
    return blocks


def test_yaml_page_documents_every_key_with_type_and_default() -> None:
    blocks = key_blocks()
    assert set(blocks) == set(SCHEMA), "KEYS of pve-gpu-hook.yaml(5) differ from settings.SCHEMA"
    for key, option in SCHEMA.items():
        first = " ".join(blocks[key].split("\n.br\n")[0].split())  # a long one is filled
        assert first == f"Type: {option.expected}; default: {yaml_value(option.default)}.", key


def test_yaml_page_example_is_a_valid_override_file() -> None:
    example = section(read(YAML_PAGE), ".SH EXAMPLE", (".SH",))
    block = plain(example.split(".EX\n", 1)[1].split(".EE", 1)[0])
    settings = parse_settings(block, "example")
    assert settings.shutdown_timeout == 300
    assert settings.protect == frozenset({110})
    assert settings.restart == "after-job"


def test_yaml_page_explains_validation() -> None:
    text = " ".join(plain(section(read(YAML_PAGE), ".SH VALIDATION", (".SH",))).split())
    for words in ("file:line", "stops nobody", "starts again every guest", "status 2"):
        assert words in text, words


# ---- clean roff ---------------------------------------------------------------------------------


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_groff_reports_no_warning(page: Path) -> None:
    if shutil.which("groff") is None:
        pytest.skip("groff is not installed (apt-get install groff-base)")
    result = subprocess.run(
        ["groff", "-man", "-ww", "-z", str(page)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_man_reports_no_warning(page: Path) -> None:
    if shutil.which("man") is None or shutil.which("groff") is None:
        pytest.skip("man or groff is not installed (apt-get install man-db groff-base)")
    # lintian's own invocation
    env = dict(os.environ, LC_ALL="C.UTF-8", MANROFFSEQ="", MANWIDTH="80")
    result = subprocess.run(
        ["man", "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z", str(page)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_mandoc_reports_no_warning(page: Path) -> None:
    if shutil.which("mandoc") is None:
        pytest.skip("mandoc is not installed (optional: apt-get install mandoc)")
    result = subprocess.run(
        ["mandoc", "-T", "lint", "-W", "warning", str(page)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and not (result.stdout + result.stderr), result


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_no_unescaped_hyphen_in_options(page: Path) -> None:
    # lintian's hyphen-used-as-minus-sign: an option must be \-\-name, or it may print as
    # a typographic hyphen that does not work when copied to a shell
    bad = []
    for number, text in enumerate(read(page).splitlines(), 1):
        if text.startswith('.\\"'):
            continue
        unfonted = re.sub(r"\\f[BIRP]", "", text)
        if re.search(r"(?<![\\\w-])--?[A-Za-z]", unfonted):
            bad.append(f"{page.name}:{number}: {text}")
    assert not bad, "\n".join(bad)
    source = read(page)
    for parser in (build_parser(), *subcommands().values()):
        for action in parser._actions:
            for option in action.option_strings:
                assert re.search(rf"(?<![\\\w]){re.escape(option)}", source) is None, option


# ---- the generator's escaping -------------------------------------------------------------------


def test_escape() -> None:
    assert manpage.escape("a\\b-c") == "a\\eb\\-c"
    assert manpage.escape("über — ok") == "\\[u00FC]ber \\[u2014] ok"
    assert manpage.line(".start") == "\\&.start"
    assert manpage.line("'quote") == "\\&'quote"
    assert manpage.line("plain") == "plain"
    assert manpage.marked("see --all in /etc/vzdump.conf.") == (
        "see \\fB\\-\\-all\\fR in \\fI/etc/vzdump.conf\\fR."
    )
    assert manpage.inline("``qm stop`` or *VMID*") == "\\fBqm stop\\fR or \\fIVMID\\fR"


def test_tricky_parser_texts_give_clean_roff(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser(prog="pve-gpu-hook", description="Tricky.")
    commands = parser.add_subparsers(dest="command")
    sub = commands.add_parser("odd", help="h", description=".starts with a dot \\ and 'quotes'")
    sub.add_argument("--limit", type=int, default=5, help="at most %(default)s — or less")
    sub.add_argument("--path", metavar="FILE", help="'quoted' start, 100%% sure")
    sub.add_argument("items", nargs="+", help="one or more")
    roff = manpage.render(parser)
    assert "\\&.starts with a dot \\e and 'quotes'" in roff
    assert "at most 5 \\[u2014] or less" in roff
    assert "\\&'quoted' start, 100% sure" in roff
    assert "\\fIitems\\fR [\\fIitems\\fR ...]" in roff
    if shutil.which("groff") is not None:
        page = tmp_path / "odd.8"
        page.write_text(roff, encoding="utf-8")
        result = subprocess.run(
            ["groff", "-man", "-ww", "-z", str(page)], capture_output=True, text=True, timeout=60
        )
        assert result.stderr == ""
