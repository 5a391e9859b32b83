"""Spec file → validated `Spec`: safe YAML with line numbers, `${VAR}`, `extends:`, `--set a.b=c`, one-line errors.

Every value remembers where it came from (file:line:col of its key, or the `--set` that gave it), so an error in a
value inherited from a base file or set on the command line is reported where the user can fix it.
"""

from __future__ import annotations

import difflib
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from volembed_runner.errors import SpecError, SpecIssue
from volembed_runner.spec import ModelFit, Spec

Path_ = tuple[str | int, ...]
_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
MAX_EXTENDS_DEPTH = 32  # base files above a spec; a longer chain is refused as too deep, a repeated file as a cycle
# Bounds on what one spec may make the loader do, so a hostile or broken file fails in one line instead of eating
# memory: PyYAML itself has none (yaml/pyyaml#235). The same guards as go-yaml's after the Kubernetes API server's
# alias bomb (kubernetes/kubernetes#83253), SnakeYAML's LoaderOptions (maxAliasesForCollections, nesting depth,
# codePointLimit) and cfn-lint's flattened node count (aws-cloudformation/cfn-lint#4670).
MAX_SPEC_BYTES = 256 * 2**10  # a spec is a page of settings; the largest example is under 4 KiB
MAX_DEPTH = 64  # nested mappings and lists; a spec needs about 4
MAX_VALUES = 5_000  # keys, list items and scalars, as written and once every alias is expanded
MAX_ALIASES = 200  # `*name` references in one file


@dataclass
class Loaded:
    """A spec's merged data before validation, and where each value came from."""

    data: dict[str, Any]
    origins: dict[Path_, str]
    path: Path
    variables: dict[str, str] = field(default_factory=dict)  # the `${VAR}` values it used, kept out of records


class _Loader(yaml.SafeLoader):
    """SafeLoader (Python tags are rejected, as in `yaml.safe_load`) that refuses deep nesting and many aliases
    while it composes, before any of it is expanded."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._aliases = 0
        self._values = 0

    def fetch_flow_collection_start(self, token_class: type) -> None:
        """`[` and `{` are counted as they are scanned: the scanner's simple-key bookkeeping grows with them."""
        if self.flow_level >= MAX_DEPTH:
            raise _Limit(f"nested more than {MAX_DEPTH} levels deep", self.get_mark())
        super().fetch_flow_collection_start(token_class)  # type: ignore[no-untyped-call]

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node | None:
        """PyYAML's composer recurses once per level: bound it far below Python's recursion limit."""
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise _Limit(f"more than {MAX_ALIASES} aliases (*name); write the values out", self.peek_event())
        self._values += 1
        if self._values > MAX_VALUES:
            raise _Limit(f"more than {MAX_VALUES:,} keys, list items and values; a spec is a page of settings",
                         self.peek_event())
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Limit(f"nested more than {MAX_DEPTH} levels deep", self.peek_event())
            return super().compose_node(parent, index)  # type: ignore[no-untyped-call]
        finally:
            self._depth -= 1


class _Limit(yaml.MarkedYAMLError):
    """A spec over one of the loader's bounds (depth, aliases, values)."""

    def __init__(self, problem: str, at: yaml.Event | yaml.Mark) -> None:
        super().__init__(problem=problem, problem_mark=at.start_mark if isinstance(at, yaml.Event) else at)


def _expanded_size(node: yaml.Node, seen: dict[int, int]) -> int:
    """How many nodes `node` stands for once aliases are expanded, counted once per distinct node (memoized by
    identity), so an alias bomb is measured without being expanded."""
    known = seen.get(id(node))
    if known is not None:
        return known
    seen[id(node)] = MAX_VALUES + 1  # a node met again inside itself is a recursive alias: over any bound
    size = 1
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            size += _expanded_size(key, seen) + _expanded_size(value, seen)
            if size > MAX_VALUES:
                break
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            size += _expanded_size(item, seen)
            if size > MAX_VALUES:
                break
    seen[id(node)] = size
    return size


def _origin(path: Path, mark: yaml.Mark) -> str:
    return f"{_display(path)}:{mark.line + 1}:{mark.column + 1}"


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _positions(node: yaml.Node, at: Path_, file: Path, out: dict[Path_, str], issues: list[SpecIssue]) -> None:
    """Record where every key and list item starts; report duplicate keys (PyYAML would keep the last silently)."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, str] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            here = _origin(file, key_node.start_mark)
            if key in seen:
                issues.append(SpecIssue(here, _dotted((*at, key)), f"duplicate key (first defined at {seen[key]})"))
            seen[key] = here
            out[(*at, key)] = here
            _positions(value_node, (*at, key), file, out, issues)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[(*at, i)] = _origin(file, item.start_mark)
            _positions(item, (*at, i), file, out, issues)


def parse_yaml(text: str, file: Path) -> tuple[Any, dict[Path_, str]]:
    """Parse one YAML document safely and within the loader's bounds, returning the data and the position of every
    key."""
    loader: _Loader | None = None
    try:
        loader = _Loader(text)
        node = loader.get_single_node()
        if node is None:
            return {}, {}
        if _expanded_size(node, {}) > MAX_VALUES:
            raise SpecError([SpecIssue(_origin(file, node.start_mark), "", f"more than {MAX_VALUES:,} values once "
                                       "aliases are expanded; a spec is a page of settings")])
        origins: dict[Path_, str] = {(): _origin(file, node.start_mark)}
        issues: list[SpecIssue] = []
        _positions(node, (), file, origins, issues)
        if issues:
            raise SpecError(issues)
        return loader.construct_document(node), origins
    except _Limit as exc:
        where = _origin(file, exc.problem_mark) if exc.problem_mark else _display(file)
        raise SpecError([SpecIssue(where, "", str(exc.problem))]) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = _origin(file, mark) if mark else _display(file)
        problem = exc.problem or exc.context or "invalid YAML"
        tag = re.search(r"constructor for the tag '([^']*)'", problem)
        if tag:
            problem = f"tag {_short_tag(tag.group(1))} is not allowed (specs are loaded safely)"
        raise SpecError([SpecIssue(where, "", f"invalid YAML: {_one_line(problem)}")]) from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        raise SpecError([SpecIssue(f"{_display(file)}:{line}:{column}", "", f"invalid YAML: character "
                                   f"#x{exc.character:04x} is not allowed in YAML (control characters must be "
                                   "escaped in a double-quoted string)")]) from None
    except yaml.YAMLError as exc:
        raise SpecError([SpecIssue(_display(file), "", f"invalid YAML: {_one_line(str(exc))}")]) from None
    finally:
        if loader is not None:
            loader.dispose()


def _short_tag(tag: str) -> str:
    """`tag:yaml.org,2002:python/object/apply:os.system` → `!!python/object/apply:os.system`, as it was written."""
    return "!!" + tag[len("tag:yaml.org,2002:"):] if tag.startswith("tag:yaml.org,2002:") else tag


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _interpolate(value: Any, at: Path_, origins: dict[Path_, str], env: dict[str, str], issues: list[SpecIssue],
                 used: dict[str, str]) -> Any:
    """Fill `${VAR}` / `${VAR:-default}` in every string from `env` (recording in `used` the values taken from it);
    `$$` is a literal `$`."""
    if isinstance(value, dict):
        return {k: _interpolate(v, (*at, k), origins, env, issues, used) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, (*at, i), origins, env, issues, used) for i, v in enumerate(value)]
    if not isinstance(value, str) or "$" not in value:
        return value

    def fill(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, default = match.group(1), match.group(2)
        if name in env:
            used[name] = env[name]
            return env[name]
        if default is not None:
            return default
        issues.append(SpecIssue(_find_origin(origins, at), _dotted(at), f"environment variable {name} is not set "
                                "and has no default (write ${" + name + ":-default})"))
        return ""

    return _VAR.sub(fill, value)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `over` onto `base`: mappings merge key by key, everything else is replaced."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _load_file(path: Path, env: dict[str, str], chain: tuple[Path, ...]) -> Loaded:
    if path.is_dir():
        specs = sorted(path.glob("*.y*ml"))
        example = f", e.g. {_display(specs[0])} (validate takes several: {_display(path / '*.yaml')})" if specs else ""
        where = f"{_display(chain[-1])}" if chain else ""
        raise SpecError([SpecIssue(where, "extends" if chain else "",
                                   f"{_display(path)} is a folder, not a spec file; name a spec file in it{example}")])
    if not path.is_file():
        where = f"{_display(chain[-1])}" if chain else ""
        raise SpecError([SpecIssue(where, "extends" if chain else "", f"spec file {_display(path)} does not exist")])
    text = _read_spec(path)
    data, origins = parse_yaml(text, path)
    if not isinstance(data, dict):
        raise SpecError([SpecIssue(origins.get((), _display(path)), "", "a spec must be a mapping of keys")])
    issues: list[SpecIssue] = []
    used: dict[str, str] = {}
    data = _interpolate(data, (), origins, env, issues, used)
    if issues:
        raise SpecError(issues)
    base_ref = data.pop("extends", None)
    if base_ref is None:
        return Loaded(data, origins, path, used)
    if not isinstance(base_ref, str):
        raise SpecError([SpecIssue(origins[("extends",)], "extends", "must be a path to a base spec")])
    base_path = (path.parent / base_ref).resolve()
    if base_path in chain or base_path == path.resolve():
        raise SpecError([SpecIssue(origins[("extends",)], "extends", f"{base_ref} extends itself (a cycle)")])
    if len(chain) >= MAX_EXTENDS_DEPTH:
        raise SpecError([SpecIssue(origins[("extends",)], "extends", f"more than {MAX_EXTENDS_DEPTH} base specs "
                                   "in one chain of extends")])
    base = _load_file(base_path, env, (*chain, path.resolve()))
    _rebase_relative_files(base, path.parent)
    merged_origins = {**base.origins, **{k: v for k, v in origins.items() if k != ("extends",)}}
    return Loaded(_merge(base.data, data), merged_origins, path, {**base.variables, **used})


def _read_spec(path: Path) -> str:
    """A spec file's text: at most MAX_SPEC_BYTES of UTF-8 (read so, since /proc files and pipes say size 0)."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_SPEC_BYTES + 1)
    except OSError as exc:
        raise SpecError([SpecIssue(_display(path), "", f"cannot read spec: {exc.strerror or exc}")]) from None
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError([SpecIssue(_display(path), "", f"spec is larger than {MAX_SPEC_BYTES // 2**10} KiB; a spec "
                                   "is a page of settings (list many files with a glob)")])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError([SpecIssue(_display(path), "", f"not UTF-8 text (byte {exc.start})")]) from None


def _rebase_relative_files(base: Loaded, child_dir: Path) -> None:
    """Relative `dataset.files` in a base spec stay relative to the base file, not to the spec extending it."""
    files = base.data.get("dataset", {}).get("files") if isinstance(base.data.get("dataset"), dict) else None
    if files is None:
        return
    items = [files] if isinstance(files, str) else files
    if not isinstance(items, list):
        return
    rebased = [
        str(os.path.relpath(base.path.parent / f, child_dir)) if isinstance(f, str) and _is_relative_file(f) else f
        for f in items
    ]
    base.data["dataset"]["files"] = rebased


def _is_relative_file(ref: str) -> bool:
    return not (ref.startswith(("/", "~")) or ":" in ref.split("/")[0])


def parse_set(expr: str) -> tuple[Path_, Any]:
    """`a.b=c` → (("a", "b"), value typed as YAML: 256 → int, true → bool, [x, y] → list)."""
    key, sep, raw = expr.partition("=")
    if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
        message = "expected KEY=VALUE with a dotted key, e.g. chunking.size=256"
        raise SpecError([SpecIssue(f"--set {expr}", "", message)])
    value: Any = ""
    if raw.strip():
        try:
            value, _ = parse_yaml(raw, Path(f"--set {expr}"))
        except SpecError as exc:
            why = exc.issues[0].message.removeprefix("invalid YAML: ")
            raise SpecError([SpecIssue(f"--set {expr}", key.strip(), f"value is not valid YAML ({why}); quote it "
                                       "to pass a string, e.g. --set 'key=\"a: b\"'")]) from None
    return tuple(key.strip().split(".")), value


def _apply_set(loaded: Loaded, expr: str) -> None:
    path, value = parse_set(expr)
    node: Any = loaded.data
    for i, part in enumerate(path[:-1]):
        if not isinstance(node.get(part), dict):
            node[part] = {}
            loaded.origins[path[: i + 1]] = f"--set {expr}"
        node = node[part]
    node[path[-1]] = value
    for known in [k for k in loaded.origins if k[: len(path)] == path]:
        del loaded.origins[known]
    loaded.origins[path] = f"--set {expr}"


def load_data(path: Path, sets: list[str] | None = None, env: dict[str, str] | None = None) -> Loaded:
    """Read a spec file with its bases, variables and overrides, not yet validated."""
    loaded = _load_file(Path(path), dict(os.environ) if env is None else env, ())
    for expr in sets or []:
        _apply_set(loaded, expr)
    return loaded


def load_spec(path: Path, sets: list[str] | None = None, env: dict[str, str] | None = None) -> Spec:
    """Read and validate a spec; every problem is reported at once in one SpecError."""
    loaded = load_data(path, sets, env)
    try:
        spec = Spec.model_validate(loaded.data)
    except ValidationError as exc:
        issues = _issues(exc, loaded)
        raise SpecError(issues + [i for i in _model_fit_issues(loaded) if i not in issues]) from None
    spec._variables = loaded.variables
    return spec


def _model_fit_issues(loaded: Loaded) -> list[SpecIssue]:
    """The chunk-size-vs-model problem of a spec that has other problems too (Spec checks it only when all else is
    valid)."""
    try:
        ModelFit.model_validate(loaded.data)
    except ValidationError as exc:
        return _issues(exc, loaded)
    return []


def _dotted(at: Path_) -> str:
    out = ""
    for part in at:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _find_origin(origins: dict[Path_, str], at: Path_) -> str:
    for n in range(len(at), -1, -1):
        if at[:n] in origins:
            return origins[at[:n]]
    return ""


def _model_at(at: Path_) -> type[BaseModel] | None:
    """The pydantic model that validates the mapping at `at` (for did-you-mean suggestions)."""
    model: type[BaseModel] | None = Spec
    for part in at:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return None
        annotation = model.model_fields[part].annotation  # a section, or an optional one (`Hub | None`)
        candidates = (annotation, *typing.get_args(annotation))
        model = next((a for a in candidates if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return model


def _clean_loc(loc: tuple[Any, ...]) -> Path_:
    """Drop pydantic's union-branch labels (`int`, `constrained-float`, ...) from an error location."""
    spec_keys: list[str | int] = []
    model: type[BaseModel] | None = Spec
    for part in loc:
        if isinstance(part, int):
            spec_keys.append(part)
        elif model is not None and part in model.model_fields:
            spec_keys.append(part)
            model = _model_at(tuple(k for k in spec_keys if isinstance(k, str)))
        elif model is None and not spec_keys:
            spec_keys.append(part)
    return tuple(spec_keys)


def _issues(exc: ValidationError, loaded: Loaded) -> list[SpecIssue]:
    issues: list[SpecIssue] = []
    seen: set[tuple[str, str]] = set()
    for err in exc.errors(include_url=False):
        ctx = err.get("ctx") or {}
        loc = tuple(err["loc"])
        if err["type"] == "extra_forbidden":
            at = _clean_loc(loc[:-1]) + (loc[-1],)
            model = _model_at(at[:-1])
            message = "unknown key"
            if model is not None:
                close = difflib.get_close_matches(str(at[-1]), list(model.model_fields), n=1, cutoff=0.6)
                known = ", ".join(model.model_fields)
                message += f"; did you mean `{close[0]}`?" if close else f" (expected one of: {known})"
        else:
            at = _clean_loc(loc)
            if err["type"] == "cross_field":
                at = at + tuple(str(ctx["field"]).split("."))
            message = _message(err)
        key = (_dotted(at), message)
        if key in seen:
            continue
        seen.add(key)
        issues.append(SpecIssue(_find_origin(loaded.origins, at), _dotted(at), message))
    return issues


def _message(err: dict[str, Any]) -> str:
    kind, msg = err["type"], err["msg"]
    if kind == "missing":
        return "required key is missing"
    if kind == "literal_error":
        return msg.replace("Input should be", "must be")
    if kind == "string_pattern_mismatch" and err["loc"] and err["loc"][-1] in ("name", "volume"):
        allowed = "lowercase letters, digits and '-'" if err["loc"][-1] == "name" else "letters, digits, '.', '_', '-'"
        return f"{err['input']!r} must use only {allowed} (at most 63 characters)"
    return msg[0].lower() + msg[1:] if msg else kind
