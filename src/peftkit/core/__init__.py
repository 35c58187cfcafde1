"""The engine: target selection, site hosts, the delta protocol, the tuned model, registry and files.
Nothing in here names a specific method."""
