"""Inference servers: launched, watched, restarted and stopped by infermill."""

from __future__ import annotations

from typing import TYPE_CHECKING

from infermill.servers.base import InferenceServer, ServerState, find_free_port
from infermill.servers.custom import CustomServer
from infermill.servers.dummy import DummyServer
from infermill.servers.endpoint import EndpointServer
from infermill.servers.engines import SGLangServer, VLLMServer
from infermill.servers.managed import ManagedServer

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
    """The server that ``config.server_type`` names."""
    return SERVER_CLASSES[config.server_type](config, rank)


__all__ = [
    "SERVER_CLASSES", "CustomServer", "DummyServer", "EndpointServer", "InferenceServer", "ManagedServer",
    "SGLangServer", "ServerState", "VLLMServer", "create_server", "find_free_port",
]  # fmt: skip
