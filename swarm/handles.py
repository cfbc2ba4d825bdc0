"""RPC handle names: explicit, versioned constants (renaming a class never changes the wire)."""

FORWARD = "swarm.v1.forward"
BACKWARD = "swarm.v1.backward"
INFERENCE = "swarm.v1.inference"
INFO = "swarm.v1.info"
COLLECT = "swarm.v1.collect"
STRIPE = "swarm.v1.stripe"
