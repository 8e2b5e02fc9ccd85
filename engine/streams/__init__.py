"""Event streams into a store: a broker-independent core (`core`) and broker adapters.

`core.apply_messages` validates, deduplicates by event_id and applies a batch; `core.consume`
loops a `core.Source` through it. `redis_stream.RedisStreamSource` is the Redis Streams adapter
(the `scale` extra); a Kafka one would implement the same two methods.
"""

from .core import Message, Result, Source, Summary, apply_messages, consume, parse_message

__all__ = ["Message", "Result", "Source", "Summary", "apply_messages", "consume", "parse_message"]
