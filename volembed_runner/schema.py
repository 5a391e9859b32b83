"""The JSON Schema of the spec, generated from the pydantic models (checked in as schemas/pipeline.schema.json)."""

from __future__ import annotations

from typing import Any

from volembed_runner.spec import Spec

SCHEMA_ID = "https://volembed-runner.dev/schemas/pipeline.schema.json"


def spec_schema() -> dict[str, Any]:
    """The spec's JSON Schema (draft 2020-12), with `extends` allowed at the top level."""
    schema = Spec.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = SCHEMA_ID
    schema["properties"]["extends"] = {
        "type": "string",
        "description": "Path of a base spec (relative to this file) deep-merged under this one",
    }
    return schema
