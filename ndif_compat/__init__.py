"""ndif_compat: see shared/DESIGN.md. Import direction: plots -> bench -> ndif_compat -> hybrid -> swarm."""
