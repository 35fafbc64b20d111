"""Judging a VLM reply: parse it, check it against the findings with :mod:`.guard`, and record
the outcome as a :class:`Narration` with flags (never an exception).

Standard library only.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import VLMError
from .guard import MAX_REPLY_CHARS, check_narrative, identifier_strings, parse_reply, violation_kind

__all__ = ["Narration", "FLAGS", "FLAG_OF_KIND", "judge_reply", "model_name"]

logger = logging.getLogger("wsiengine")

#: Flag codes a :class:`Narration` can carry.
FLAGS = ("vlm_timeout", "vlm_http_error", "vlm_connection_error", "vlm_malformed", "vlm_contradiction",
         "vlm_treatment_advice", "vlm_identifier", "vlm_markup", "vlm_text_only")

#: The flag of each :class:`~wsiengine.report.transport.VLMRequestError` ``kind``.
FLAG_OF_KIND = {"timeout": "vlm_timeout", "http": "vlm_http_error", "connection": "vlm_connection_error",
                "malformed": "vlm_malformed"}


@dataclass
class Narration:
    """What :meth:`VLMClient.narrate` made of one report.

    Attributes
    ----------
    text : str or None
        The accepted narrative, or None (the report keeps its template text).
    accepted : bool
    flags : list of str
        Codes from :data:`FLAGS`.
    violations : list of str
        What :func:`~wsiengine.report.guard.check_narrative` found wrong.
    model : str or None
        The model that answered (as the server names it) or was asked for.
    images_sent : int
        Evidence images in the request that produced the reply.
    attempts : int
        HTTP requests made (retries and a text-only resend included).
    raw : str or None
        The reply content as received (its first :data:`~wsiengine.report.guard.MAX_REPLY_CHARS`
        characters), kept for audit.
    elapsed_s : float
        Seconds spent, all attempts included.
    error : str or None
        Why no usable reply arrived (timeout, HTTP status and message, malformed reply).
    """

    text: str | None
    accepted: bool
    flags: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    model: str | None = None
    images_sent: int = 0
    attempts: int = 0
    raw: str | None = None
    elapsed_s: float = 0.0
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of all fields."""
        return asdict(self)


def judge_reply(narration: Narration, content: str, findings: dict[str, Any],
                forbidden_strings: Sequence[str] = ()) -> None:
    """Parse and check the reply ``content`` against ``findings``; fill ``narration`` in place.

    A reply that is not the expected JSON object flags ``vlm_malformed``; guard violations flag
    ``vlm_treatment_advice``, ``vlm_identifier``, ``vlm_markup`` (images, links, URLs, HTML) or
    ``vlm_contradiction`` and are listed in ``narration.violations``; otherwise the narrative is
    accepted. Never raises: a reply that cannot be judged is ``vlm_malformed``. ``forbidden_strings`` (slide id,
    file name...) must not appear in the reply.
    """
    narration.raw = content[:MAX_REPLY_CHARS] if isinstance(content, str) else None
    try:
        reply = parse_reply(content)
        violations = check_narrative(reply, findings,
                                     forbidden_strings=identifier_strings(findings, forbidden_strings))
    except (VLMError, RecursionError, TypeError, ValueError, AttributeError) as exc:
        narration.flags.append("vlm_malformed")
        narration.error = str(exc) if isinstance(exc, VLMError) else \
            f"the reply could not be judged: {type(exc).__name__}: {str(exc)[:200]}"
        logger.warning("VLM narrative not used: %s", narration.error)
        return
    narration.violations = violations
    kinds = {violation_kind(v) for v in violations}
    if "treatment advice" in kinds:
        narration.flags.append("vlm_treatment_advice")
    if "identifier" in kinds:
        narration.flags.append("vlm_identifier")
    if "markup" in kinds:
        narration.flags.append("vlm_markup")
    if kinds - {"treatment advice", "identifier", "markup"}:
        narration.flags.append("vlm_contradiction")
    if violations:
        logger.warning("VLM narrative rejected: %s", "; ".join(violations))
        return
    narration.text, narration.accepted = reply["narrative"], True


def model_name(name: str | None) -> str | None:
    """The model name a server reports; a file path (llama-cpp-python reports the GGUF's path)
    is cut to its base name."""
    if not name:
        return None
    return re.split(r"[\\/]", name.rstrip("/\\"))[-1] or None
