"""The notifier of :class:`~flymy_receiver.stores.RedisStore`: subscribes like
:class:`~flymy_receiver.awaiting.RedisNotifier`, publishes nothing itself, since the store's
scripts publish a run id in the same call that settles its entry (no round trip of its own).
"""

from __future__ import annotations

from ..awaiting import RedisNotifier

__all__ = ["ScriptedRedisNotifier"]


class ScriptedRedisNotifier(RedisNotifier):
    """Subscriptions to the store's channel; :meth:`publish` is the scripts' job."""

    def publish(self, run_id: str) -> None:
        """Nothing to send: the script that settled the entry published ``run_id``."""
