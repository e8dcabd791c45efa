"""Inference servers: launched, watched, restarted and stopped by infermill."""

from __future__ import annotations

from typing import TYPE_CHECKING

from infermill.servers.base import InferenceServer, ServerState, find_free_port
from infermill.servers.custom import CustomServer
from infermill.servers.dummy import DummyServer
from infermill.servers.endpoint import EndpointServer
from infermill.servers.engines import SGLangServer, VLLMServer
from infermill.servers.managed import ManagedServer
from infermill.servers.pool import Affinity, ReplicaPool

if TYPE_CHECKING:
    from infermill.config import InferenceConfig

#: every ``server_type`` and its class: the config accepts exactly these names
SERVER_CLASSES: dict[str, type[InferenceServer]] = {
    "custom": CustomServer,
    "vllm": VLLMServer,
    "sglang": SGLangServer,
    "endpoint": EndpointServer,
    "dummy": DummyServer,
}


def create_server(config: InferenceConfig, rank: int = 0) -> InferenceServer:
    """The server that ``config.server_type`` names; a :class:`ReplicaPool` of them when
    ``replicas`` > 1 or ``endpoint_url`` lists several URLs."""
    urls = config.endpoint_urls()
    if config.server_type == "endpoint" and len(urls) > 1:
        return ReplicaPool(config, rank, [EndpointServer(config, rank, url) for url in urls])
    server_class = SERVER_CLASSES[config.server_type]
    if config.replicas > 1:
        return ReplicaPool(config, rank, [server_class(config, rank) for _ in range(config.replicas)])
    return server_class(config, rank)


__all__ = [
    "SERVER_CLASSES", "Affinity", "CustomServer", "DummyServer", "EndpointServer", "InferenceServer",
    "ManagedServer", "ReplicaPool", "SGLangServer", "ServerState", "VLLMServer", "create_server", "find_free_port",
]  # fmt: skip
