"""CDS Hooks 2.0 feedback: validating what the EHR reports about our cards."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from ..errors import ServiceError


class FeedbackError(ServiceError):
    """A feedback body or entry of the wrong shape (400 ``invalid``)."""


# The longest values the feedback store keeps in its bounded columns (storage/tables.py; a test keeps the
# two equal): a longer one is refused, naming the field.
STORED_LENGTHS = {"card": 64, "outcomeTimestamp": 64}


def _timestamp(value: Any, where: str) -> None:
    if not isinstance(value, str):
        raise FeedbackError(f"{where}.outcomeTimestamp is required (an ISO 8601 date-time)")
    try:
        moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise FeedbackError(f"{where}.outcomeTimestamp is not an ISO 8601 date-time") from None
    if moment.tzinfo is None:
        raise FeedbackError(f"{where}.outcomeTimestamp must include a time zone")


def parse_feedback(body: Any) -> list[Mapping[str, Any]]:
    """The feedback entries, validated: each names a card uuid, an outcome (accepted needs
    acceptedSuggestions), and an outcomeTimestamp."""
    if not isinstance(body, Mapping) or not isinstance(body.get("feedback"), list) or not body["feedback"]:
        raise FeedbackError("the body must be an object with a non-empty 'feedback' array")
    entries = []
    for i, entry in enumerate(body["feedback"]):
        where = f"feedback[{i}]"
        if not isinstance(entry, Mapping):
            raise FeedbackError(f"{where} must be an object")
        if not isinstance(entry.get("card"), str) or not entry["card"]:
            raise FeedbackError(f"{where}.card is required (the card's uuid)")
        outcome = entry.get("outcome")
        if outcome not in ("accepted", "overridden"):
            raise FeedbackError(f"{where}.outcome must be 'accepted' or 'overridden'")
        _timestamp(entry.get("outcomeTimestamp"), where)
        for key in STORED_LENGTHS:
            if len(entry[key]) > STORED_LENGTHS[key]:
                raise FeedbackError(f"{where}.{key} is longer than {STORED_LENGTHS[key]} characters")
        suggestions = entry.get("acceptedSuggestions")
        if outcome == "accepted":
            if not isinstance(suggestions, list) or not suggestions or not all(
                isinstance(s, Mapping) and isinstance(s.get("id"), str) and s["id"] for s in suggestions
            ):
                raise FeedbackError(f"{where}: an accepted outcome needs acceptedSuggestions, each with an id")
        elif suggestions is not None:
            raise FeedbackError(f"{where}: acceptedSuggestions is only for an accepted outcome")
        override = entry.get("overrideReason")
        if override is not None:
            if outcome != "overridden" or not isinstance(override, Mapping):
                raise FeedbackError(f"{where}.overrideReason is only for an overridden outcome, as an object")
            reason = override.get("reason")
            if reason is not None and (not isinstance(reason, Mapping) or not isinstance(reason.get("code"), str)):
                raise FeedbackError(f"{where}.overrideReason.reason must be a Coding with a code")
            comment = override.get("userComment")
            if comment is not None and not isinstance(comment, str):
                raise FeedbackError(f"{where}.overrideReason.userComment must be text")
        entries.append(entry)
    return entries
