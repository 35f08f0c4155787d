"""Lines the tier's tests add (what they counted), printed in pytest's closing summary by conftest.py."""
from __future__ import annotations

LINES: list[str] = []
