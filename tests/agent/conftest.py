"""The agent tests' servers: a fake web on loopback, and the real server over
the scripted model with every server-side tool on (agent_servers.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from agent.agent_servers import KETTLE, AgentServer, agent_server
from agent.fake_web import FakeWeb, fake_web
from agent.scripted_model import by_round


@pytest.fixture(scope="module")
def web() -> Iterator[FakeWeb]:
    with fake_web({"/kettle": KETTLE}) as w:
        w.results = [{"title": "How kettles work", "url": w.url("/kettle"), "content": "Kettles boil water."}]
        yield w


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, web: FakeWeb) -> Iterator[AgentServer]:
    s = agent_server(
        tmp_path_factory.mktemp("agent-data"),
        by_round("Hello."),
        enable_search=True,
        search_url=web.base_url,
        allow_private_urls=True,
        enable_code_execution=True,
        enable_shell=True,
        code_exec_timeout_s=30,
        max_tool_rounds=3,
    )
    yield s
    s.stop()
