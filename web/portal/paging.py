"""Query-string parsing shared by the portal's paginated, filterable lists."""

from __future__ import annotations

from typing import Annotated

from pydantic import BeforeValidator, StringConstraints


def _none_if_empty(value: object) -> object:
    return None if value == "" else value


# An HTML form sends an unset filter as an empty value; it means "no filter".
EmptyIsNone = BeforeValidator(_none_if_empty)


# The text of a filter such as a product or device id search.
FilterText = Annotated[str, StringConstraints(strip_whitespace=True, max_length=200)]


def page_count(total: int, page_size: int) -> int:
    """Number of pages for ``total`` items; an empty list still has one page."""
    return max(1, -(-total // page_size))
