"""The operator: reconciles LayerCaches into per-node NodeLayerCache specs and statuses.

`controller.Controller` owns the state, the parts (resolver, replanner, reporter, warm
signal) and their loops; kopf handlers (`controller.handlers`) stay thin and call it;
`ports` declares what it needs of Kubernetes and registries (docs/architecture.md, "The
operator's core"). The operator never imports the agent (import contract
`operator-not-agent`).
"""
