"""Typed errors of owl3-export.

Library code raises these; only the CLI turns them into exit codes and the one-line message of the
error contract (shared docs, reliability.md):

    owl3-export: error: <what was expected, what was found> (<file, tensor or step>): <what to do>

Each error carries the three parts separately so that the CLI, logs and tests can read them.
"""

from __future__ import annotations


class Owl3Error(Exception):
    """Base class. ``exit_code`` follows the error contract."""

    exit_code = 1

    def __init__(self, problem: str, *, where: str | None = None, fix: str | None = None) -> None:
        self.problem = problem
        self.where = where
        self.fix = fix
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = self.problem
        if self.where:
            text += f" ({self.where})"
        if self.fix:
            text += f": {self.fix}"
        return text


class UsageError(Owl3Error):
    """Bad flags or arguments, or a refusal to overwrite (exit 2)."""

    exit_code = 2


class InvalidInputError(Owl3Error):
    """Invalid checkpoint, config, tokenizer, image, video or dataset (exit 3)."""

    exit_code = 3


class ConfigError(InvalidInputError):
    """config.json is missing, malformed or of an unsupported architecture."""


class CheckpointError(InvalidInputError):
    """Weights files are missing, truncated, mis-named, mis-shaped or hold NaN/Inf."""


class TokenizerError(InvalidInputError):
    """tokenizer.json is missing or lacks the tokens the chat format needs."""


class MediaError(InvalidInputError):
    """An image or video is empty, truncated, too large or undecodable."""


class PromptError(InvalidInputError):
    """Messages, placeholders and media do not agree, or a request exceeds its limits."""


class EnvironmentProblem(Owl3Error):
    """A missing library, wrong device or incompatible version (exit 4)."""

    exit_code = 4


class ResourceError(Owl3Error):
    """Not enough memory, disk or time (exit 5)."""

    exit_code = 5


class GateFailure(Owl3Error):
    """An accuracy gate failed; artifacts are kept and marked rejected (exit 6)."""

    exit_code = 6
