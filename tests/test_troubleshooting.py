"""Every error and warning message that the package can show has an entry in the guide.

The messages are read from the source: the first argument of each exception
that is constructed (`raise DataError(f"...")`, `return CheckpointWriteError(...)`),
of each `_fail(...)` in the command line, and of each `log.warning(...)`. A
message is reduced to its lead: the text up to the first separator after
enough literal text (`_SEPARATORS`), with every placeholder read as "any
text". A guide entry covers the message when one of the code spans in its
first column starts with that lead, so `PATH has N bytes but its manifest
records M` covers f"{path} has {size} bytes but its manifest records {m}".
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "platform" / "resmom"
GUIDE = ROOT / "docs" / "troubleshooting.md"

# The lead ends at the first separator after enough literal text, so that
# values and remedies after it may change without a new entry. A clause ends
# sooner than a phrase, because "X failed: ..." must keep more than "X".
_SEPARATORS = {"; ": 16, ". ": 16, "\n": 16, ": ": 24, ", ": 24, " (": 24}
_ANY = object()  # a placeholder in a message
_PRINTF_PLACEHOLDER = re.compile(r"%[-+ #0]*\d*(?:\.\d+)?[sdifgeEr]")

# Messages that no command can show, because the spec validation or the
# platform's own calls exclude their cause. Each checks for a programming
# error. The keys are pieces of their literal text, the values the reasons.
INTERNAL = {
    "kNN needs a non-empty feature bank": "splits are never empty, and every rank gathers all",
    "LARS learning rate must be positive": "optim.lr is validated as positive",
    "resume needs a checkpoint directory": "orchestrate always passes one",
    "unknown alpha schedule": "rm.alpha_schedule is validated",
    "unknown ResNet depth": "model.backbone is validated",
    "unknown stem": "model.stem is validated",
    "unknown residual distance": "rm.distance is validated",
    "queue size must be positive": "method.queue_size is validated",
    "keys per step do not divide the queue size": "the spec requires a multiple",
    "EMA momentum must be in [0, 1]": "the momentum schedules stay in [0, 1]",
    "teacher and student parameters differ in shape": "the teacher is a copy of the student",
    "student and teacher outputs must both be (V, B, D)": "the training step builds both",
    "BYOL uses exactly 2 views": "the training step makes two views",
    "contains images of several sizes: pass a resolution": "training always passes one",
    "spec asks for": "Ray Train starts run.workers workers, so the counts agree",
}


@dataclass(frozen=True)
class Message:
    where: str
    parts: tuple  # literal strings and _ANY
    literal: str

    def lead_pattern(self) -> str:
        pattern, literal_chars = "", 0
        for part in self.parts:
            if part is _ANY:
                pattern += ".+?"
                continue
            cut = _first_cut(part, literal_chars)
            if cut is not None:
                return pattern + re.escape(part[:cut])
            pattern += re.escape(part)
            literal_chars += len(part)
        return pattern


def _first_cut(text: str, chars_before: int) -> int | None:
    """Return where the lead ends in `text`, which follows `chars_before` literal characters."""
    positions = [
        match.start()
        for separator, chars_needed in _SEPARATORS.items()
        for match in re.finditer(re.escape(separator), text)
        if chars_before + match.start() >= chars_needed
    ]
    return min(positions) if positions else None


def _parts(node: ast.expr, printf: bool) -> tuple | None:
    """Return the literal pieces and placeholders of a message expression, or None."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        if not printf:
            return (node.value,)
        pieces: list = []
        for index, piece in enumerate(_PRINTF_PLACEHOLDER.split(node.value)):
            if index:
                pieces.append(_ANY)
            pieces.append(piece.replace("%%", "%"))
        return tuple(pieces)
    if isinstance(node, ast.JoinedStr):
        pieces = []
        for value in node.values:
            if isinstance(value, ast.Constant):
                pieces.append(value.value)
            else:
                pieces.append(_ANY)
        return tuple(pieces)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _parts(node.left, printf), _parts(node.right, printf)
        if left is None:
            return None
        return left + (right if right is not None else (_ANY,))
    return None


def _is_message_call(call: ast.Call) -> tuple[bool, bool]:
    """Return whether `call` shows a message, and whether it uses printf placeholders."""
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    if isinstance(func, ast.Attribute) and name in ("warning", "error", "critical"):
        return getattr(func.value, "id", "") == "log", True
    return name == "_fail" or name.endswith(("Error", "Exception")), False


def collect_messages() -> list[Message]:
    messages = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            shows, printf = _is_message_call(node)
            if not shows:
                continue
            parts = _parts(node.args[0], printf)
            if parts is None or not any(part is not _ANY and part.strip() for part in parts):
                continue  # a message passed on, e.g. _fail(str(exc))
            literal = "".join(part for part in parts if part is not _ANY)
            if sum(character.isalpha() for character in literal) < 3:
                continue  # another message with a prefix, e.g. f"{type(exc).__name__}: {exc}"
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            messages.append(Message(where, parts, literal))
    return messages


def guide_spans() -> list[str]:
    """Return the code spans in the first column of the guide's tables."""
    spans = []
    for line in GUIDE.read_text().splitlines():
        if not line.startswith("| ") or line.startswith("| ---"):
            continue
        first_cell = line[2:].split(" | ", 1)[0]
        # ``...`` spans may contain single backticks.
        for double, single in re.findall(r"``\s?(.+?)\s?``|`([^`]+)`", first_cell):
            spans.append(double or single)
    return spans


def test_collector_finds_known_messages():
    leads = {message.lead_pattern() for message in collect_messages()}
    # An exception built in a helper and returned, not raised.
    assert re.escape("failed to write checkpoint ") + ".+?" in leads
    # A placeholder first, and a cut before the clause that explains it.
    manifest_size = (
        ".+?",
        re.escape(" has "),
        ".+?",
        re.escape(" bytes but its manifest records "),
    )
    assert "".join(manifest_size) + ".+?" in leads
    # A log.warning with printf placeholders.
    assert re.escape("possible collapse in epoch ") + ".+?" in leads


def test_lead_matches_guide_placeholders():
    parts = (_ANY, " has ", _ANY, " bytes but its manifest records ", _ANY)
    lead = Message("example", parts, "").lead_pattern()
    assert re.match(lead, "PATH has N bytes but its manifest records M")
    assert not re.match(lead, "PATH has no manifest")


def test_every_message_in_guide():
    spans = guide_spans()
    missing = []
    for message in collect_messages():
        if any(key in message.literal for key in INTERNAL):
            continue
        pattern = message.lead_pattern()
        if not any(re.match(pattern, span) for span in spans):
            readable = "".join("…" if part is _ANY else part for part in message.parts)
            missing.append(f"{message.where}: {readable!r}")
    assert not missing, "messages without an entry in docs/troubleshooting.md:\n" + "\n".join(
        missing
    )
