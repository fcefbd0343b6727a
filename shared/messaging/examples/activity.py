from functools import partial

import messaging as mq
import redis

PERSON = ("person.created", "person.updated", "person.activation_requested", "person.deleted")


def build(settings: mq.BrokerSettings, client: redis.Redis) -> mq.Consumer:
    gate, handlers = mq.RedisVersionGate(client), mq.Handlers()

    @handlers.on(*PERSON)
    def changed(event, _):  # each version counted once: the gate skips one it has seen
        return f"activity:{event.entity_id}", event.entity_version

    def apply(changes):
        with mq.redis_errors():
            pipe = client.pipeline(transaction=False)
            for key, version in changes:
                gate.apply(key, version, increments={"changes": 1}, pipe=pipe)
            pipe.execute()

    # A model that accumulates cannot heal from each entity's latest event (its counts would
    # start again at one): it rebuilds from every event the producer's outbox still holds.
    topology = settings.topology("activity")
    marker = mq.RedisGeneration(client, "activity:generation")
    healing = mq.Healing(
        marker, settings.amqp_url, settings.events_exchange, topology.queue, scope="history"
    )
    probe = partial(mq.redis_write_probe, client, "activity:probe")
    queues = mq.ConsumerSettings(settings.amqp_url, topology)
    return mq.Consumer(queues, handlers, apply, probe=probe, healing=healing)


if __name__ == "__main__":
    raise SystemExit(mq.run(build(mq.BrokerSettings(), redis.Redis()), health_port=8182))
