"""The entry point and the package's layout: every stage answers --help with readable text, a
stage imports library modules only, and library modules never parse argv."""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from picochat import cli

PACKAGE = Path(cli.__file__).parent


@pytest.mark.parametrize("stage", list(cli.STAGES))
def test_every_stage_explains_its_flags(stage, capsys):
    module = importlib.import_module(cli.STAGES[stage][0])
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: picochat {stage} ")
    assert "`" not in text  # markdown quoting reads as noise in a terminal
    assert "(default: None)" not in text and "(default: )" not in text
    parser_actions = [line for line in text.splitlines() if line.strip().startswith("--")]
    assert parser_actions


def test_help_shows_defaults_and_preset_values(capsys):
    for stage in ("base-eval", "base-train"):
        with pytest.raises(SystemExit):
            importlib.import_module(cli.STAGES[stage][0]).main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "bpb rows per forward pass (default: 32)" in text  # base-eval
    # base-train's preset-dependent flags say which preset gives which value
    assert "AdamW lr of lm_head (if not given: 0.008 with --preset default, 0.004 with --preset jan29)" in text
    assert "--fp8 run the attention, MLP and lm_head matmuls in fp8 with tensorwise scaling" in text


def test_cli_dispatch():
    out = subprocess.run([sys.executable, "-m", "picochat"], capture_output=True, text=True)
    assert out.returncode == 2 and all(name in out.stdout for name in cli.STAGES)
    out = subprocess.run([sys.executable, "-m", "picochat", "exprot"], capture_output=True, text=True)
    assert out.returncode == 2 and "'exprot' is not a stage" in out.stderr
    out = subprocess.run([sys.executable, "-m", "picochat", "tok-eval", "--no-such-flag"], capture_output=True,
                         text=True)
    assert out.returncode == 2 and "unrecognized arguments: --no-such-flag" in out.stderr


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_layout():
    stages = sorted(p.stem for p in (PACKAGE / "stages").glob("*.py") if p.stem != "__init__")
    assert sorted(m.rsplit(".", 1)[1] for m, _ in cli.STAGES.values()) == stages
    for stage in stages:
        others = {f"picochat.stages.{s}" for s in stages if s != stage} | {"picochat.stages"}
        assert not imports(PACKAGE / "stages" / f"{stage}.py") & others, f"stage {stage} imports another stage"
    for library in PACKAGE.glob("*.py"):
        if library.stem not in ("cli", "__main__"):
            assert "argparse" not in imports(library), f"{library.name} parses argv"
            assert not any(n.startswith("picochat.stages") for n in imports(library)), library.name
