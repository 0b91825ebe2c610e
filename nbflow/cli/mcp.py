"""``nbflow mcp``: nbflow's MCP tools for a local AI agent, over stdio (docs/agents.md)."""

from __future__ import annotations

import click

from nbflow.cli.common import _store, cli, handle_errors


@cli.command("mcp")
@click.option("--key", metavar="KEY", help="Act with this API key's scope (default: NBFLOW_API_KEY, if set). "
                                           "Prefer the variable: a command line is visible to other users.")
@click.option("--scope", type=click.Choice(["read", "trigger", "admin"]),
              help="Allow at most this scope (with a key: the narrower of the two).")
@handle_errors
def mcp(key: str | None, scope: str | None) -> None:
    """Serve nbflow's tools to an AI agent over stdio (Model Context Protocol): list flows, trigger,
    wait for, cancel and retry runs, read logs, diagnose a failure down to the cell.

    The agent's MCP client starts this command and speaks on its standard input and output. It acts on
    the local store as you do, with every scope, unless a key (--key or NBFLOW_API_KEY) or --scope
    restricts it: then a tool outside that scope is refused, as the REST API refuses it.
    """
    from nbflow.api.auth import Caller
    from nbflow.api.errors import Unauthorized
    from nbflow.core.keys import SCOPES, authenticate
    from nbflow.settings import get_settings

    store = _store()
    key = key if key is not None else get_settings().api_key
    found = authenticate(store, key) if key is not None else None
    if key is not None and found is None:
        raise Unauthorized("the API key given (--key or NBFLOW_API_KEY) is not an active key of this store: it is "
                           "unknown, malformed or revoked")
    from nbflow.mcp.server import LOCAL_USER, build  # the SDK: only once the key is known good

    caller = Caller(found.name, found.scope) if found is not None else Caller(LOCAL_USER, SCOPES[-1])
    if scope is not None and SCOPES.index(scope) < SCOPES.index(caller.scope):
        caller = Caller(caller.name, scope)
    build(store, local=caller).run("stdio")
