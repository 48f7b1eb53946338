"""The agentic runtime's command-line flags (`mistralrs-serve serve`), and the
AgentConfig they make. `--agent` turns on search, code execution and shell."""

from __future__ import annotations

import argparse

from mistralrs_serve.config import AgentConfig

D = AgentConfig()


def add_agent_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("agentic runtime (server-side tools; all off by default)")
    g.add_argument("--agent", action="store_true", help="turn on web search, code execution and shell")
    g.add_argument("--enable-search", action="store_true", help="server-side web search and page reading")
    g.add_argument(
        "--search-url",
        default=None,
        help="a SearXNG instance to search with (its JSON API); default: DuckDuckGo",
    )
    g.add_argument("--enable-code-execution", action="store_true", help="the server-side Python interpreter")
    g.add_argument(
        "--code-exec-timeout",
        type=float,
        default=D.code_exec_timeout_s,
        help="seconds one Python run may take",
    )
    g.add_argument(
        "--code-exec-python", default=None, help="the Python that runs code (default: the server's own)"
    )
    g.add_argument("--enable-shell", action="store_true", help="server-side shell commands (and Skills)")
    g.add_argument(
        "--shell-timeout", type=float, default=D.shell_timeout_s, help="seconds one command may take"
    )
    _add_sandbox_args(g)
    _add_loop_args(g)


def _add_sandbox_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--sandbox",
        choices=["auto", "on", "off"],
        default=D.sandbox,
        help="run code and shell in bubblewrap: auto (when installed; a warning when not), "
        "on (refuse to start without it) or off",
    )
    g.add_argument(
        "--sandbox-network",
        choices=["none", "loopback"],
        default=D.sandbox_network,
        help="network inside the sandbox (default none)",
    )
    g.add_argument(
        "--sandbox-memory-mb", type=int, default=D.sandbox_memory_mb, help="address space per process"
    )
    g.add_argument("--sandbox-cpu-s", type=int, default=D.sandbox_cpu_s, help="CPU seconds per process")
    g.add_argument("--sandbox-max-procs", type=int, default=D.sandbox_max_procs, help="processes per sandbox")
    g.add_argument(
        "--max-tool-output-kb",
        type=int,
        default=D.max_output_bytes >> 10,
        help="stdout and stderr kept of one tool call (each)",
    )


def _add_loop_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--max-tool-rounds",
        type=int,
        default=D.max_tool_rounds,
        help="server-side tool rounds per request (a request's max_tool_rounds overrides it)",
    )
    g.add_argument(
        "--agent-permission",
        choices=["auto", "ask", "deny"],
        default=D.agent_permission,
        help="whether server-side tools run (auto), wait for approval (ask) or are refused (deny); "
        "requests may tighten it, never loosen it",
    )
    g.add_argument(
        "--approval-timeout",
        type=float,
        default=D.approval_timeout_s,
        help="seconds before an approval is denied",
    )
    g.add_argument(
        "--tool-dispatch-url",
        default=None,
        help="execute function tools server-side by POSTing {name, arguments} here",
    )
    g.add_argument(
        "--mcp-config", default=None, help="a JSON file of MCP servers whose tools the model may use"
    )
    g.add_argument(
        "--skills-dir",
        default=None,
        help="where uploaded Skills live (default: <temp>/mistralrs-serve-skills)",
    )
    g.add_argument(
        "--session-ttl-h", type=float, default=D.session_ttl_s / 3600, help="hours a session is kept"
    )
    g.add_argument("--max-sessions", type=int, default=D.max_sessions, help="sessions kept (least recent go)")
    g.add_argument(
        "--allow-private-urls",
        action="store_true",
        help="let web search and page fetches reach loopback and private addresses",
    )


def agent_config(args: argparse.Namespace) -> AgentConfig:
    return AgentConfig(
        enable_search=args.agent or args.enable_search,
        search_url=args.search_url,
        enable_code_execution=args.agent or args.enable_code_execution,
        code_exec_timeout_s=args.code_exec_timeout,
        code_exec_python=args.code_exec_python,
        enable_shell=args.agent or args.enable_shell,
        shell_timeout_s=args.shell_timeout,
        sandbox=args.sandbox,
        sandbox_network=args.sandbox_network,
        sandbox_memory_mb=args.sandbox_memory_mb,
        sandbox_cpu_s=args.sandbox_cpu_s,
        sandbox_max_procs=args.sandbox_max_procs,
        max_output_bytes=args.max_tool_output_kb << 10,
        max_tool_rounds=args.max_tool_rounds,
        agent_permission=args.agent_permission,
        approval_timeout_s=args.approval_timeout,
        tool_dispatch_url=args.tool_dispatch_url,
        mcp_config=args.mcp_config,
        skills_dir=args.skills_dir,
        session_ttl_s=int(args.session_ttl_h * 3600),
        max_sessions=args.max_sessions,
        allow_private_urls=args.allow_private_urls,
    )
