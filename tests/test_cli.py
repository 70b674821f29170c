"""The `xattn-video` command line: subcommand registry, --help at every level, exit codes, both entry points."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from xattn_video import cli

ROOT = Path(__file__).resolve().parents[1]


def test_every_registered_command_has_the_interface():
    assert "generate" in cli.COMMANDS
    for name, module_name in cli.COMMANDS.items():
        module = importlib.import_module(module_name)
        assert isinstance(module.HELP, str) and module.HELP, name
        assert callable(module.add_arguments) and callable(module.run), name
        assert module.__doc__, f"{module_name} needs a docstring: it is the command's --help description"


def test_help_at_every_level(capsys):
    with pytest.raises(SystemExit) as top:
        cli.main(["--help"])
    assert top.value.code == 0
    out = capsys.readouterr().out
    assert "generate" in out and "COMMAND" in out
    for name in cli.COMMANDS:
        with pytest.raises(SystemExit) as sub:
            cli.main([name, "--help"])
        assert sub.value.code == 0
        assert f"xattn-video {name}" in capsys.readouterr().out


def test_generate_help_documents_usage(capsys):
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    out = capsys.readouterr().out
    for fragment in ["[CONFIG.yaml] [key=value ...]", "--print-config", "--dry-run", "--rank", "--world-size",
                     "manifest.jsonl", "VBench"]:
        assert fragment in out


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as err:
        cli.main([])
    assert err.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


def test_a_new_command_slots_in(tmp_path, monkeypatch, capsys):
    pkg = tmp_path / "extra_cmd.py"
    pkg.write_text(
        '"""Say hello."""\n'
        'HELP = "say hello"\n'
        "def add_arguments(p):\n    p.add_argument('--name', default='world')\n"
        "def run(args):\n    print('hello', args.name)\n    return 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.COMMANDS, "hello", "extra_cmd")
    assert cli.main(["hello", "--name", "xattn"]) == 3
    assert "hello xattn" in capsys.readouterr().out


def test_print_config_and_config_errors(capsys):
    assert cli.main(["generate", "--print-config", "video.steps=3", "seeds=[5]"]) == 0
    out = capsys.readouterr().out
    assert "steps: 3" in out and "- 5" in out and "id: tiny" in out
    assert cli.main(["generate", "attention.threshold=2"]) == 2
    err = capsys.readouterr().err
    assert "attention.threshold = 2" in err and "(0, 1]" in err and "Traceback" not in err
    assert cli.main(["generate", "no-such-config.yaml"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_dry_run_loads_no_model(tmp_path, capsys):
    code = cli.main(["generate", "--dry-run", f"output.root={tmp_path}", "prompts=[a cat, a dog]"])
    assert code == 0
    err = capsys.readouterr().err
    assert "4 videos" in err and "would make dense/0000_a-cat_seed0_0.mp4" in err
    assert not any(tmp_path.iterdir())  # nothing written


def test_options_and_overrides_in_any_order(tmp_path, capsys):
    config = ROOT / "configs" / "hunyuan_720x1280.yaml"
    assert cli.main(["generate", str(config), "--dry-run", f"output.root={tmp_path}", "seeds=[0,1]"]) == 0
    assert "4 prompts x 2 seeds x 1 videos x 3 variants = 24 videos" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        cli.main(["generate", str(config), "--dry-run", "--no-such-flag"])
    assert err.value.code == 2 and "--no-such-flag" in capsys.readouterr().err


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_unknown_option_shows_the_subcommand_usage(command, capsys):
    """``xattn-video COMMAND --foo`` is a usage error of COMMAND: its usage line, not the top level's."""
    needs_positional = {"quality": ["some-dir"], "vbench": ["some-dir", "--dimensions", "quality"]}
    with pytest.raises(SystemExit) as err:
        cli.main([command, *needs_positional.get(command, []), "--foo"])
    assert err.value.code == 2
    text = capsys.readouterr().err
    assert f"usage: xattn-video {command} " in text and "unrecognized arguments: --foo" in text
    assert "COMMAND" not in text.splitlines()[0]


def _run(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(list(argv), cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_python_m_and_console_script_agree(tmp_path):
    by_module = _run(sys.executable, "-m", "xattn_video", "generate", "--help", cwd=tmp_path)
    assert by_module.returncode == 0, by_module.stderr
    assert "xattn-video generate" in by_module.stdout
    script = shutil.which("xattn-video", path=str(Path(sys.executable).parent))
    assert script, "the console script xattn-video is not installed (pip install -e .)"
    by_script = _run(script, "generate", "--help", cwd=tmp_path)
    assert by_script.returncode == 0, by_script.stderr
    assert by_script.stdout == by_module.stdout
