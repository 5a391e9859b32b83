"""What the README promises users matches the tool: its command table and `--help`, the `--prices` keys it documents,
the output folders `plan` prints, and `validate` reporting every error."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from typer.testing import CliRunner

from tests.conftest import REPO
from volembed_runner.cli import app
from volembed_runner.estimate.prices import load_prices

runner = CliRunner()
README = (REPO / "README.md").read_text()
OPTION = re.compile(r"(?<![\w`-])(--?[a-z][a-z-]*)")


def readme_commands() -> dict[str, set[str]]:
    """The README's command table: verb (`run` for `volembed-run SPEC`) → the options its line names."""
    section = README.split("## Commands", 1)[1].split("\n## ", 1)[0]
    table: dict[str, set[str]] = {}
    verb = None
    for line in section.splitlines():
        if line.startswith("    volembed-run "):
            word = line.split()[1]
            verb = "run" if word == "SPEC" else word
            table[verb] = set()
        elif not line.startswith("      ") or verb is None:
            verb = None
            continue
        table[verb] |= set(OPTION.findall(line.strip().split("   ")[0] if verb != "run" else line))
    return table


def help_of(*args: str) -> str:
    result = runner.invoke(app, [*args, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    return result.output


def test_readme_command_table_lists_the_commands_of_help() -> None:
    listed = help_of().split("Commands:", 1)[1]
    verbs = {line.split()[0] for line in listed.splitlines() if line.strip()}
    assert set(readme_commands()) == verbs


def test_every_option_in_the_readme_table_is_in_the_commands_help() -> None:
    for verb, options in readme_commands().items():
        offered = set(OPTION.findall(help_of(verb).split("Options:", 1)[1]))
        assert options <= offered, f"{verb}: README names {sorted(options - offered)}, --help has {sorted(offered)}"


def test_documented_price_keys_are_accepted(tmp_path: Path) -> None:
    paragraph = README[README.index("`--prices FILE`"):][:400]
    keys = re.findall(r"`(\w+)` in \$/", paragraph)
    assert keys == ["cpu", "memory", "volume"], paragraph
    prices_file = tmp_path / "prices.yaml"
    prices_file.write_text(yaml.safe_dump({"A10G": 0.001, "cpu": 0.5, "memory": 0.25, "volume": 2.0}))
    prices = load_prices(prices_file)
    assert (prices.gpu["A10"], prices.cpu_core_s, prices.memory_gib_s, prices.volume_gib_month) == (
        0.001, 0.5, 0.25, 2.0)


def test_plan_prints_the_output_folders() -> None:
    result = runner.invoke(app, ["plan", str(REPO / "pipelines" / "local-demo.yaml")])
    assert result.exit_code == 0, result.output
    outputs = json.loads(result.output)["outputs"]
    assert set(outputs) == {"data", "chunks", "embeddings"}
    assert outputs["embeddings"].endswith("/runs/local-demo/embeddings/" + outputs["embeddings"].rsplit("/", 1)[1])


def test_validate_reports_every_error_the_model_fit_included(tmp_path: Path) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text("version: 1\nname: Bad_Name\nvolume: v\ndataset: {files: [d.jsonl]}\n"
                    "chunking: {size: 400, overlap: 16}\nembedding: {model: sentence-transformers/all-MiniLM-L6-v2}\n"
                    "compute: {gpu: B300}\n")
    result = runner.invoke(app, ["validate", str(spec)])
    assert result.exit_code == 2
    lines = result.output.splitlines()
    assert [line.split()[2] for line in lines] == ["name:", "compute.gpu:", "chunking.size:"], result.output
    assert "bad.yaml:5:12 chunking.size: 400 tokens do not fit sentence-transformers/all-MiniLM-L6-v2" in lines[2]
