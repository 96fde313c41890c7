"""The `layercache` / `kubectl layercache` command line.

- `main`: the typer app (operator, agent, cleanup, plan, status, ...).
- `statusapi`: reading LayerCaches and NodeLayerCaches for the commands.
- `statusview`: rendering them as tables and JSON.
- `uninstall`: removing what layercache left on a cluster.
"""
