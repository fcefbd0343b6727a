from functools import partial

import messaging as mq
import redis
from pydantic import BaseModel


class Person(BaseModel):  # what this model reads of a person's data; the rest is ignored
    name: str


def build(settings: mq.BrokerSettings, client: redis.Redis) -> mq.Consumer:
    gate, handlers = mq.RedisVersionGate(client), mq.Handlers()

    @handlers.on("person.created", "person.updated", data=Person)
    def named(event, person):  # a change: applied only if its version is newer than the one held
        return f"names:{event.entity_id}", event.entity_version, {"name": person.name, "gone": 0}

    @handlers.on("person.deleted")
    def gone(event, _):  # a tombstone: a late event cannot bring the name back
        return f"names:{event.entity_id}", event.entity_version, {"gone": 1}

    def apply(changes):  # a batch in one round trip; a Redis away or refusing writes pauses
        with mq.redis_errors():
            pipe = client.pipeline(transaction=False)
            for key, version, fields in changes:
                gate.apply(key, version, fields, pipe=pipe)
            pipe.execute()

    topology = settings.topology("names")  # names.<exchange>, its retry queues and .dead
    marker = mq.RedisGeneration(client, "names:generation")  # lost with the data: heals by replay
    healing = mq.Healing(marker, settings.amqp_url, settings.events_exchange, topology.queue)
    probe = partial(mq.redis_write_probe, client, "names:probe")  # an outage waits on a write
    queues = mq.ConsumerSettings(settings.amqp_url, topology)
    return mq.Consumer(queues, handlers, apply, probe=probe, healing=healing)


if __name__ == "__main__":  # AMQP_URL, EVENTS_EXCHANGE (RETRY_DELAYS...) from the environment
    raise SystemExit(mq.run(build(mq.BrokerSettings(), redis.Redis()), health_port=8181))
