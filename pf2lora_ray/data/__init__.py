"""Client data: partitioning examples across clients and per-client splits."""
