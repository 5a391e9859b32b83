"""The checked-in JSON Schema is valid JSON Schema that editors can check with: every constraint in its terms, and
each type or range error that `validate` rejects is rejected by the schema too."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from typer.testing import CliRunner

from tests.conftest import REPO
from volembed_runner.cli import app
from volembed_runner.loading import load_data

runner = CliRunner()
SCHEMA = json.loads((REPO / "schemas" / "pipeline.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
# Keywords that only annotate (the rest must be keywords a 2020-12 validator checks).
ANNOTATIONS = {"$schema", "$id", "$defs", "$comment", "title", "description", "default", "examples"}
SUBSCHEMA_MAPS = ("properties", "$defs", "patternProperties")
SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")

BASE: dict[str, Any] = {
    "version": 1,
    "name": "ok",
    "backend": "local",
    "volume": "v",
    "dataset": {"files": ["d.jsonl"]},
    "chunking": {"size": 128, "overlap": 16},
    "embedding": {"model": "sentence-transformers/all-MiniLM-L6-v2"},
    "compute": {"gpu": "A10G"},
}

# (dotted field, a value of the wrong type or out of range)
BAD = [
    ("version", 2),
    ("name", "Bad_Name"),
    ("backend", "cloud"),
    ("volume", "a/b"),
    ("dataset.limit", 0),
    ("dataset.limit", 1.5),
    ("dataset.num_rows", 0),
    ("dataset.num_bytes", "big"),
    ("dataset.shard_rows", True),
    ("dataset.duplicate_ids", "keep"),
    ("dataset.keep_columns", "url"),
    ("chunking.size", 0),
    ("chunking.size", 1.5),
    ("chunking.overlap", -1),
    ("chunking.overlap", 0.5),
    ("chunking.overlap", "some"),
    ("chunking.workers", 0),
    ("chunking.sise", 128),
    ("embedding.dimensions", 0),
    ("embedding.precision", "fp16"),
    ("embedding.endpoint", "ftp://host"),
    ("compute.gpu", "B300"),
    ("compute.concurrency_limit", True),
    ("compute.allow_concurrent_inputs", 0),
    ("compute.timeout", 30),
    ("compute.timeout", 100_000),
    ("compute.retries", -1),
    ("compute.max_cost", 0),
    ("compute.secrets", ["bad name"]),
    ("output.hub", {"repo": "no-owner"}),
]


def with_value(field: str, value: Any) -> dict[str, Any]:
    spec = copy.deepcopy(BASE)
    *parents, last = field.split(".")
    node = spec
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return spec


def keywords(schema: Any) -> set[str]:
    """Every keyword used anywhere in `schema` (property names and default values are not keywords)."""
    if not isinstance(schema, dict):
        return set()
    found = set(schema)
    for key, value in schema.items():
        if key in SUBSCHEMA_MAPS:
            found |= set().union(*(keywords(v) for v in value.values()))
        elif key in SUBSCHEMA_LISTS:
            found |= set().union(*(keywords(v) for v in value))
        elif key not in ANNOTATIONS and isinstance(value, dict):
            found |= keywords(value)
    return found


def test_schema_is_valid_against_the_meta_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


def test_every_keyword_is_json_schema() -> None:
    known = set(jsonschema.Draft202012Validator.VALIDATORS) | ANNOTATIONS
    assert keywords(SCHEMA) - known == set()  # e.g. pydantic's `ge`, which no editor checks


def test_constraints_are_in_json_schema_terms() -> None:
    chunking = SCHEMA["$defs"]["Chunking"]["properties"]
    assert {"minimum": 1, "type": "integer"} in chunking["size"]["anyOf"]
    compute = SCHEMA["$defs"]["Compute"]["properties"]
    assert (compute["timeout"]["minimum"], compute["timeout"]["maximum"]) == (60, 86_400)
    assert "pattern" in compute["gpu"]


@pytest.mark.parametrize("path", sorted((REPO / "pipelines").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_specs_pass_the_schema(path: Path) -> None:
    errors = [e.message for e in VALIDATOR.iter_errors(load_data(path).data)]
    assert errors == []


def test_the_base_spec_passes_both(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(BASE))
    assert list(VALIDATOR.iter_errors(BASE)) == []
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(("field", "value"), BAD, ids=[f"{f}={v!r}" for f, v in BAD])
def test_schema_and_validate_both_reject(tmp_path: Path, field: str, value: Any) -> None:
    spec = with_value(field, value)
    errors = list(VALIDATOR.iter_errors(spec))
    assert errors, f"the schema accepts {field}: {value!r}"
    parent = field.rsplit(".", 1)[0] if "." in field else ""
    where = [".".join(str(p) for p in e.absolute_path) for e in errors]
    assert any(w in (field, parent) or w.startswith(field) for w in where), where
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    assert f" {field}" in result.output or f" {parent}" in result.output, result.output
