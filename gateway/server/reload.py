"""Apps reloaded live: on SIGHUP and when the file they come from changes.

The apps are read again from the same sources as at start (the ``--config`` file or
``apps_file``, ``GATEWAY_APPS``, ``--app``) and validated whole: one bad entry refuses the
whole reload with a log line naming it, and the apps in force stay. Otherwise the new apps are
put in force at once: added apps accept connections, removed apps' connections get 4001, and
changed apps (a rotated secret, new limits or webhooks) apply to every socket from its next
frame. Node settings are not reloaded (a changed one is named in a warning: it needs a
restart). Secrets are never logged: only the names of the settings that changed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace

from gateway.config import AppConfig, ConfigError, NodeConfig
from gateway.metrics import Metrics

__all__ = ["AppsReloader", "AppsSource", "file_signature"]

log = logging.getLogger("gateway.apps")


@dataclass(frozen=True)
class AppsSource:
    """Where a node's apps come from, to read them again.

    Attributes:
        load: Reads the whole configuration again (as at start).
        paths: Files to watch for changes (the config file, the apps file).
    """

    load: Callable[[], NodeConfig]
    paths: tuple[str, ...] = ()


def file_signature(path: str) -> tuple[int, int, int] | None:
    """What changes when a file is replaced or edited (mtime, size, inode); None if absent."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _changed_fields(old: AppConfig, new: AppConfig) -> list[str]:
    return [f.name for f in fields(AppConfig) if getattr(old, f.name) != getattr(new, f.name)]


class AppsReloader:
    """Reloads a node's apps.

    Args:
        source: Where the apps come from.
        current: The configuration in force.
        apply: Puts a configuration in force; returns sockets closed per removed app id.
        metrics: ``pg_apps_reloads_total{result}`` and the gauge ``pg_apps``.
    """

    def __init__(
        self,
        source: AppsSource,
        current: Callable[[], NodeConfig],
        apply: Callable[[NodeConfig], dict[str, int]],
        metrics: Metrics,
    ) -> None:
        self.source = source
        self.current = current
        self.apply = apply
        self.metrics = metrics
        self._signatures = [file_signature(p) for p in source.paths]
        metrics.gauge("pg_apps", "Apps in force", lambda: {(): float(len(current().apps))})

    def reload(self, why: str) -> bool:
        """Read the apps again and put them in force; False (and the old apps stay) when the
        new ones are refused."""
        old = self.current()
        try:
            fresh = self.source.load()
            config = replace(old, apps=fresh.apps)
        except ConfigError as exc:
            self.metrics.inc("pg_apps_reloads_total", result="refused")
            log.error(
                "apps reload (%s) refused, the %d apps in force stay: %s", why, len(old.apps), exc
            )
            return False
        restart = [
            f.name
            for f in fields(NodeConfig)
            if f.name != "apps"
            and not f.name.startswith("_")
            and getattr(fresh, f.name) != getattr(old, f.name)
        ]
        if restart:
            log.warning(
                "apps reload (%s): node settings changed (%s); they take effect at the next "
                "restart",
                why,
                ", ".join(restart),
            )
        before = {a.id: a for a in old.apps}
        after = {a.id: a for a in config.apps}
        added = sorted(after.keys() - before.keys())
        removed = sorted(before.keys() - after.keys())
        changed = {
            i: _changed_fields(before[i], after[i])
            for i in sorted(before.keys() & after.keys())
            if before[i] != after[i]
        }
        if not (added or removed or changed):
            self.metrics.inc("pg_apps_reloads_total", result="unchanged")
            log.info("apps reload (%s): no change (%d apps)", why, len(old.apps))
            return True
        closed = self.apply(config)
        self.metrics.inc("pg_apps_reloads_total", result="ok")
        log.info(
            "apps reloaded (%s): %d apps; added %s; removed %s; changed %s",
            why,
            len(config.apps),
            _ids(added),
            _ids([f"{i} ({closed.get(i, 0)} connections closed with 4001)" for i in removed]),
            _ids([f"{i} ({', '.join(names)})" for i, names in changed.items()]),
        )
        return True

    def poll(self) -> None:
        """Reload when a watched file changed since the last look."""
        signatures = [file_signature(p) for p in self.source.paths]
        if signatures == self._signatures:
            return
        pairs = zip(self.source.paths, self._signatures, signatures, strict=True)
        changed = [p for p, a, b in pairs if a != b]
        self._signatures = signatures
        self.reload(f"{', '.join(changed)} changed")


def _ids(items: Sequence[str]) -> str:
    return ", ".join(items) if items else "none"
