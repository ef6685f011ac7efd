"""(filled in below)"""

from __future__ import annotations

__all__ = ["CHECKS", "FUNCTIONS", "PARAMETERS", "UINT8_SLACK"]

FUNCTIONS: dict = {}
PARAMETERS: dict = {}
UINT8_SLACK: dict = {}
CHECKS: dict = {}
