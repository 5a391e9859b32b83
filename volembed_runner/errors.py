"""One exception tree for volembed-runner; the CLI maps each class to a one-line message and an exit status.

VolembedError                 base; never raised itself
├── SpecError                 a job spec is invalid: every problem with file, line, column and field   (exit 2)
├── SourceError               a dataset source cannot be found, listed, read or downloaded              (exit 3)
├── ModelError                a model or tokenizer cannot be resolved                                   (exit 3)
├── EmbedderError             the embedding engine or TEI server rejected an input or misbehaved        (exit 1)
│   ├── EmbedderUnavailable   ... or kept failing transiently (429, 5xx, timeouts) beyond its retries   (exit 1)
│   ├── TextsFailedError      some texts of one embed call were refused; `indices` locate them
│   └── VectorCheckError      an answer failed a vector check (count, dimension, finite, norm...); `check`
├── StageError                one or more shards of a stage failed; the manifest lists them             (exit 1)
├── OutputError               an output cannot be written: disk full, quota, read-only (transient)      (exit 1)
├── BackendError              the backend cannot run the job (no Modal credentials, app failed)         (exit 4)
├── Declined                  the user answered no when asked to start a paid run                       (exit 5)
├── RunHeld                   another writer holds the run's lease (one writer per run)                 (exit 6)
└── BudgetExhausted           a Modal run stopped feeding work at compute.max_cost (it drained first)   (exit 7)

Each class says whether its failure is `transient`: whether the same input may succeed on another attempt. Only
transient failures are retried (by Modal, whose `Retries` retry whatever a function raises, so a stage returns a
deterministic failure instead of raising it); `is_transient` extends the rule to the exceptions of the libraries.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass


def describe(exc: BaseException) -> str:
    """`Type: first line of the message`: how a failed shard's cause is recorded in the manifest and logs."""
    from volembed_runner.redact import scrub

    lines = scrub(str(exc)).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def first_line(exc: BaseException | str) -> str:
    """The first line of an error's message (its type's name when it has none), so a message stays on one line."""
    text = str(exc).strip()
    if text:
        return text.splitlines()[0].strip()
    return exc if isinstance(exc, str) else type(exc).__name__


def name_list(names: Iterable[object], most: int = 12) -> str:
    """A comma-separated list of names for a message, cut after `most` with a count of the rest."""
    items = [str(n) for n in names]
    more = f", … ({len(items) - most} more)" if len(items) > most else ""
    return (", ".join(items[:most]) or "none") + more


def is_transient(exc: BaseException) -> bool:
    """True when another attempt at the same input may succeed: a transient VolembedError, or an I/O failure
    (OSError: the Volume, the network, timeouts). Invalid data, rejected inputs and bugs fail the same way again."""
    if isinstance(exc, VolembedError):
        return exc.transient
    return isinstance(exc, OSError)


def unfixable(failed: int, unretryable: Mapping[str, Mapping[str, int]] | None) -> bool:
    """True when all `failed` shards failed on input a rerun cannot fix (an unreadable row: SourceError's exit 3),
    as the manifest's `unretryable` records them per stage and shard."""
    final = [status for stage in (unretryable or {}).values() for status in stage.values()]
    return failed > 0 and len(final) == failed and SourceError.exit_code in final


class VolembedError(Exception):
    """Base of every error the CLI reports as one line instead of a traceback."""

    exit_code = 1
    transient = False  # True: the same input may succeed on another attempt, so it is worth retrying


@dataclass(frozen=True)
class SpecIssue:
    """One problem in a spec: where it is (file:line:col or `--set ...`), which dotted field, and what is wrong."""

    origin: str
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.origin} " if self.origin else ""
        what = f"{self.field}: " if self.field else ""
        return f"{where}{what}{self.message}"


class SpecError(VolembedError):
    """A spec failed to load or validate; carries every issue found, not just the first."""

    exit_code = 2

    def __init__(self, issues: list[SpecIssue]) -> None:
        self.issues = list(issues)
        super().__init__("\n".join(str(i) for i in self.issues))


class SourceError(VolembedError):
    """A dataset source cannot be found, listed, read or downloaded."""

    exit_code = 3


class ModelError(VolembedError):
    """A model or its tokenizer cannot be resolved from disk, a package or the Hub."""

    exit_code = 3


class EmbedderError(VolembedError):
    """The embedding engine or server rejected an input (TEI 4xx, over a limit) or returned something unusable."""

    exit_code = 1


class TextsFailedError(EmbedderError):
    """Texts of one `embed` call were refused (413/422/400) or failed beyond retries.

    `indices` are their positions in that call's `texts`, so the caller can name the chunk (doc id, chunk index).
    """

    def __init__(self, message: str, indices: tuple[int, ...]) -> None:
        super().__init__(message)
        self.indices = tuple(indices)

    def __reduce__(self) -> tuple[type, tuple[str, tuple[int, ...]]]:
        return type(self), (str(self), self.indices)


class VectorCheckError(EmbedderError):
    """An engine's answer failed a vector check; nothing of it may be written.

    `check` names the check (json, numeric, shape, count, dimension, finite, norm); `indices` are the positions,
    in the call's `texts`, of the texts that answer was for.
    """

    def __init__(self, message: str, check: str, indices: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.check = check
        self.indices = tuple(indices)

    def __reduce__(self) -> tuple[type, tuple[str, str, tuple[int, ...]]]:
        return type(self), (str(self), self.check, self.indices)


class EmbedderUnavailable(EmbedderError):
    """The embedding server kept failing transiently (429, 5xx, connection errors, timeouts) beyond its retries."""

    transient = True


class StageError(VolembedError):
    """A stage finished with failed shards; they are listed in the manifest and retried on the next run."""

    exit_code = 1


class OutputError(VolembedError):
    """A file of the run cannot be written (no space left, over quota, read-only); nothing finished was replaced,
    and a rerun once there is room finishes the work."""

    exit_code = 1
    transient = True

    @classmethod
    def of(cls, path: object, exc: OSError) -> OutputError:
        """The one-line error for `exc` met while writing `path`."""
        return cls(f"cannot write {path}: {exc.strerror or first_line(exc)}; nothing finished was replaced, "
                   "rerun once there is room")


WRITE_ERRNOS = frozenset({28, 122, 30, 27})  # ENOSPC, EDQUOT, EROFS, EFBIG (Linux errno numbers)


def is_write_failure(exc: BaseException) -> bool:
    """True for an OSError that says the disk will not take the bytes (pyarrow's carry the text, not the errno)."""
    return isinstance(exc, OSError) and (exc.errno in WRITE_ERRNOS or "No space left on device" in str(exc))


class BackendError(VolembedError):
    """The backend cannot run the job (e.g. no Modal credentials)."""

    exit_code = 4


class Declined(VolembedError):
    """The user answered no (or nothing) when asked to start a paid run; nothing was started."""

    exit_code = 5


class RunHeld(VolembedError):
    """Another run holds this run's lease (or took it over): one writer per run, so this one does not write."""

    exit_code = 6


class BudgetExhausted(VolembedError):
    """A run stopped feeding new work before an input that would pass `compute.max_cost`; what was in flight
    finished, the rest is left for a rerun with a raised budget."""

    exit_code = 7
