"""Log output settings."""
from __future__ import annotations

from dataclasses import dataclass

from ._parse import ConfigError

LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class LoggingSettings:
    level: str = "info"
    #: "json" for machines (default), "console" for people at a terminal
    format: str = "json"
    #: one structured line per proxied request
    access_log: bool = True

    def validate(self, path: str) -> None:
        if self.level not in LEVELS:
            raise ConfigError(f"{path}.level", f"must be one of {', '.join(LEVELS)}")
        if self.format not in ("json", "console"):
            raise ConfigError(f"{path}.format", "must be json or console")
