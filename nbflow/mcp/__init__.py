"""nbflow's MCP server (Model Context Protocol): the tools an AI agent uses to find flows, run them with
typed parameters, wait for them and explain a failure down to the cell (docs/agents.md).

A surface beside ``api``, ``cli`` and ``jupyter``: ``nbflow.mcp.server`` builds the tools on the official
``mcp`` SDK, each calling the service layer (``nbflow.core``) with the store, as the REST routes do;
``nbflow mcp`` (``nbflow.cli.mcp``) serves them over stdio, and ``nbflow serve`` mounts them under
``/mcp`` over streamable HTTP (``nbflow.mcp.http``), authorised by the API's keys and scopes.

May import: ``core``, ``store``, the foundation, ``services.autostart`` (a stdio trigger with no live
runner starts one, as ``nbflow trigger`` does), and ``api``'s authentication, errors and schemas (one
key, one scope rule, one error shape and one run document for both). The SDK is imported only when a
server is built: ``nbflow serve`` pays its import (~1 s) at the first MCP request, not at start.
"""
