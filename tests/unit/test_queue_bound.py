"""The requests queues' bound as data (events.topology.requests_bound_policy), the commands that apply it
(ops.rabbitmq_policy) and how a broker's refusal is told from an outage (mlp.bus.is_nack)."""

from __future__ import annotations

import json
import re

import aiormq
import aiormq.exceptions
import pytest

from events.topology import all_queues, requests_bound_policy
from mlp.bus import is_nack
from ops.rabbitmq_policy import management_request, management_url_for, rabbitmqctl_args, vhost_of


def test_the_policy_matches_every_request_queue_and_nothing_else() -> None:
    policy = requests_bound_policy(10_000)
    pattern = re.compile(policy.pattern)
    names = [q.name for q in all_queues(("basic-model", "all-minilm-l6-v2"))]
    assert [n for n in names if pattern.search(n)] == ["mlp.requests.basic-model", "mlp.requests.all-minilm-l6-v2"]
    assert not pattern.search("ext.mlp-external.mine")  # the external publishers' queues keep their own policy
    assert policy.definition == {"max-length": 10_000, "overflow": "reject-publish"}
    assert policy.priority > 0  # above an operator's catch-all at the default 0
    assert policy.apply_to == "queues"


def test_a_bound_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        requests_bound_policy(0)


@pytest.mark.parametrize(
    ("url", "vhost"),
    [
        ("amqp://guest:guest@127.0.0.1:5672/", "/"),
        ("amqp://guest:guest@127.0.0.1:5672", "/"),
        ("amqp://u:p@broker:5672/mlp", "mlp"),
        ("amqp://u:p@broker:5672/%2F", "/"),
    ],
)
def test_the_vhost_is_the_urls_path(url: str, vhost: str) -> None:
    assert vhost_of(url) == vhost


def test_the_commands_that_set_it() -> None:
    policy = requests_bound_policy(5)
    args = rabbitmqctl_args(policy, "mlp")
    assert args[:7] == ["set_policy", "-p", "mlp", "--apply-to", "queues", "--priority", str(policy.priority)]
    assert args[7:9] == [policy.name, policy.pattern]
    assert json.loads(args[9]) == {"max-length": 5, "overflow": "reject-publish"}
    path, body = management_request(policy, "/")
    assert path == f"/api/policies/%2F/{policy.name}"
    assert body == {
        "pattern": policy.pattern,
        "definition": policy.definition,
        "priority": policy.priority,
        "apply-to": "queues",
    }


def test_a_nack_is_a_refusal_and_a_timeout_is_not() -> None:
    assert is_nack(aiormq.exceptions.DeliveryError(None, aiormq.spec.Basic.Nack(delivery_tag=1)))
    assert not is_nack(TimeoutError())
    assert not is_nack(aiormq.exceptions.ChannelInvalidStateError("closed"))


def test_rabbitmqctl_only_for_a_broker_on_this_machine() -> None:
    local, remote = "amqp://guest:guest@127.0.0.1:5672/", "amqp://ops:secret@broker.internal:5672/mlp"
    assert management_url_for(local, "", rabbitmqctl_on_path=True) == ""
    assert management_url_for(local, "", rabbitmqctl_on_path=False) == "http://guest:guest@127.0.0.1:15672"
    assert management_url_for(remote, "", rabbitmqctl_on_path=True) == "http://ops:secret@broker.internal:15672"
    assert management_url_for(remote, "http://a:b@mgmt:15672", rabbitmqctl_on_path=True) == "http://a:b@mgmt:15672"
