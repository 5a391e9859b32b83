"""Any input, however broken or hostile, ends in one-line errors and an exit status from the README's table: never a
traceback, a hang or unbounded memory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.main import get_command

from tests.test_spec import VALID  # the smallest valid spec, one for both files
from volembed_runner.cli import app
from volembed_runner.loading import MAX_DEPTH, MAX_EXTENDS_DEPTH, MAX_SPEC_BYTES, load_spec

runner = CliRunner()
COMMAND = get_command(app)  # built once: the fuzz tests call it hundreds of times



def validate(path: Path, *sets: str):
    """`volembed-run validate PATH [--set ...]`, as a user runs it (no --debug)."""
    args = ["validate", str(path)]
    for expr in sets:
        args += ["--set", expr]
    return runner.invoke(COMMAND, args)


def one_line_error(result, *needles: str) -> str:
    """The run failed with exit 2 and one `error:` line holding every needle, no traceback."""
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_alias_bomb_is_refused_without_expanding(write_spec) -> None:
    levels = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        levels.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    path = write_spec("\n".join(levels) + "\n")
    assert len(path.read_bytes()) < 1024  # the 742-byte bomb of the issue: 9 levels of 9
    one_line_error(validate(path), "spec.yaml:", "aliases")


def test_a_few_aliases_still_work(write_spec) -> None:
    text = VALID.replace("dataset:\n  hf: org/data", "dataset:\n  hf: &src org/data\n  config: *src")
    assert load_spec(write_spec(text)).dataset.config == "org/data"


def test_deep_nesting_is_refused_at_its_line(write_spec) -> None:
    one_line_error(validate(write_spec("[" * 5000)), f"nested more than {MAX_DEPTH} levels deep", "spec.yaml:1:")


def test_oversized_spec_is_refused_before_parsing(write_spec) -> None:
    path = write_spec("".join(f"key{i}: {i}\n" for i in range(MAX_SPEC_BYTES // 8)))
    one_line_error(validate(path), "spec.yaml", "larger than")


def test_a_million_unknown_keys_are_refused_quickly(write_spec) -> None:
    path = write_spec("{" + ",".join(f"k{i}: 1" for i in range(20_000)) + "}\n")  # under the size bound
    assert len(path.read_bytes()) < MAX_SPEC_BYTES
    one_line_error(validate(path), "spec.yaml:1:", "keys, list items and values")


def test_control_character_names_its_line(write_spec) -> None:
    path = write_spec(VALID.replace("name: demo", "name: de\x01mo"))
    one_line_error(validate(path), "spec.yaml:2:9", "#x0001")


def test_extends_of_a_proc_file_is_one_line(write_spec) -> None:
    line = one_line_error(validate(write_spec(VALID + "extends: /proc/self/environ\n")), "environ")
    for value in os.environ.values():  # the environment's values are not echoed
        if len(value) > 8:
            assert value not in line


def test_python_tag_message_names_the_tag_as_written(write_spec) -> None:
    path = write_spec(VALID + 'x: !!python/object/apply:os.system ["echo hi"]\n')
    line = len(VALID.splitlines()) + 1
    one_line_error(validate(path), "tag !!python/object/apply:os.system is not allowed", f"spec.yaml:{line}:")


def test_fourteen_deep_extends_chain_is_no_cycle(write_spec) -> None:
    previous = write_spec(VALID, "base.yaml")
    for i in range(14):
        previous = write_spec(f"extends: {previous.name}\n", f"level-{i}.yaml")
    assert load_spec(previous).name == "demo"
    result = validate(previous)
    assert result.exit_code == 0, result.output


def test_too_deep_extends_chain_says_so(write_spec) -> None:
    previous = write_spec(VALID, "base.yaml")
    for i in range(MAX_EXTENDS_DEPTH + 1):
        previous = write_spec(f"extends: {previous.name}\n", f"level-{i}.yaml")
    line = one_line_error(validate(previous), "extends:", f"more than {MAX_EXTENDS_DEPTH} base specs")
    assert "cycle" not in line


def test_extends_cycle_is_still_a_cycle(write_spec) -> None:
    write_spec(VALID + "extends: b.yaml\n", "a.yaml")
    one_line_error(validate(write_spec("extends: a.yaml\n", "b.yaml")), "a cycle")


def test_set_with_invalid_yaml_is_refused_not_taken_as_a_string(write_spec) -> None:
    one_line_error(validate(write_spec(VALID), "dataset.files=[unclosed"),
                   "--set dataset.files=[unclosed", "not valid YAML", "quote it")


def test_set_value_bomb_is_bounded(write_spec) -> None:
    one_line_error(validate(write_spec(VALID), "compute.secrets=" + "[" * 3000), "nested more than")


def test_not_utf8_spec_is_one_line(write_spec, tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(VALID.replace("demo", "d\xe9mo").encode("latin-1"))
    one_line_error(validate(path), "latin1.yaml", "not UTF-8")


# ── Fuzzing: random and mutated YAML, random --set values ────────────────────────────────────────────────────────
MUTATIONS = st.lists(st.tuples(st.integers(0, len(VALID)), st.integers(0, 8),
                               st.text(st.characters(codec="utf-8"), max_size=8)), max_size=6)
YAMLISH = st.lists(st.sampled_from(list("[]{}:,-&*!|>'\"#%@`?\n\t \x00\x01\x7f\ufeff") + ["a", "1", "- ", ": "]),
                   max_size=120).map("".join)


def _mutate(text: str, edits: list[tuple[int, int, str]]) -> str:
    for at, cut, insert in edits:
        at = min(at, len(text))
        text = text[:at] + insert + text[at + cut:]
    return text


def _check_validate(path: Path, *sets: str) -> None:
    result = validate(path, *sets)
    assert result.exit_code in (0, 2), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output


FUZZ = settings(max_examples=60, deadline=2000, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@FUZZ
@given(edits=MUTATIONS)
def test_mutated_spec_never_tracebacks(tmp_path: Path, edits: list[tuple[int, int, str]]) -> None:
    path = tmp_path / "mutated.yaml"
    path.write_text(_mutate(VALID, edits), encoding="utf-8")
    _check_validate(path)


@FUZZ
@given(text=YAMLISH)
def test_random_yaml_never_tracebacks(tmp_path: Path, text: str) -> None:
    path = tmp_path / "random.yaml"
    path.write_text(text, encoding="utf-8")
    _check_validate(path)


@FUZZ
@given(key=st.sampled_from(["name", "dataset.files", "chunking.size", "compute.secrets", "embedding.endpoint",
                            "dataset", "x.y.z", "chunking.overlap", "dataset.limit"]),
       value=YAMLISH)
def test_random_set_values_never_traceback(tmp_path: Path, key: str, value: str) -> None:
    path = tmp_path / "spec.yaml"
    if not path.exists():
        path.write_text(VALID, encoding="utf-8")
    _check_validate(path, f"{key}={value}")


@pytest.mark.parametrize("body", ["", "~", "[]", "- a\n- b\n", "'str'", "&a [*a]", "a: &a [*a]\n"])
def test_odd_documents_are_one_line_errors(write_spec, body: str) -> None:
    result = validate(write_spec(body))
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
