"""OCI primitives: digests, references, platforms, media types and one `ResolvedImage`.

`resolved.ResolvedImage` is an image resolved for a platform (what the registry said);
`image.PlanImage` is the planner's input made from it (`ResolvedImage.plan_input`).

Pure: no I/O, no Kubernetes, no HTTP (import contract `bottom` in .importlinter).
"""
