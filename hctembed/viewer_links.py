"""Links from search hits back to the study in the PACS viewer (``--viewer-url``).

The template names the study by ``{StudyInstanceUID}`` (and may name the series by ``{SeriesInstanceUID}``), e.g.
``http://pacs:8042/ohif/viewer?StudyInstanceUIDs={StudyInstanceUID}``. The UIDs are read from the locator (where a
PACS series lies: ``STUDY/SERIES`` under the server's URL) on the machine that holds it, only for hits that came
from a PACS and only when a template is configured: without one no UID leaves the locator.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

from hctembed.errors import InputError
from hctembed.io.locator import Location

FIELDS = ("StudyInstanceUID", "SeriesInstanceUID")


@dataclass(frozen=True)
class ViewerLinks:
    template: str

    def __post_init__(self) -> None:
        try:
            names = {name for _, name, _, _ in string.Formatter().parse(self.template) if name is not None}
        except ValueError as exc:  # an unmatched brace
            raise InputError(f"--viewer-url {self.template!r}: {exc}") from None
        if "StudyInstanceUID" not in names or not names <= set(FIELDS):
            raise InputError(
                f"--viewer-url must name the study as {{StudyInstanceUID}} (and may use {{SeriesInstanceUID}}), "
                f"not {sorted(names) or 'nothing'}"
            )
        if urlsplit(self.template.replace("{", "").replace("}", "")).scheme not in ("http", "https"):
            raise InputError("--viewer-url must be an http(s):// address")

    def link(self, where: Location | None) -> str | None:
        """The viewer link of a scan found at ``where``: a PACS series (root a URL, location STUDY/SERIES), else
        None."""
        if where is None or "://" not in where.root:
            return None
        study, _, series = where.location.partition("/")
        if not study or not series:
            return None
        return self.template.format(StudyInstanceUID=quote(study, safe=""), SeriesInstanceUID=quote(series, safe=""))

    def links(self, locations: Mapping[str, Location]) -> dict[str, str]:
        """``{scan_id: link}`` for the scans among ``locations`` that came from a PACS."""
        return {key: url for key, where in locations.items() if (url := self.link(where)) is not None}
