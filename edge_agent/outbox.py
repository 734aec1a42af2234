"""Where replies go: published to the job's reply topic, then the job is acknowledged.

The outbox is the only writer of replies, so the rule "acknowledge a job only once its
reply is out" lives in one place.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import structlog

from edge_agent.protocol import CONTENT_TYPE, Reply

log = structlog.get_logger("edge_agent.outbox")

Ack = Callable[[], None]


class Publisher(Protocol):
    """What the outbox needs from the MQTT link."""

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        correlation_data: bytes | None = None,
        content_type: str | None = None,
    ) -> int | None: ...


class Outbox:
    def __init__(self, link: Publisher) -> None:
        self.link = link

    def deliver(self, reply: Reply, ack: Ack) -> None:
        mid = self._publish(reply)
        if mid is None:
            log.warning("reply.not_sent", job_id=reply.job_id, topic=reply.route.topic)
            return  # not acknowledged: the broker redelivers the job after reconnect
        ack()

    def notify(self, reply: Reply) -> None:
        self._publish(reply)

    def _publish(self, reply: Reply) -> int | None:
        return self.link.publish(
            reply.route.topic,
            reply.encode(),
            qos=1,
            correlation_data=reply.route.correlation_data,
            content_type=CONTENT_TYPE,
        )
