"""A real Petals server (run inside the Petals venv): petals' own ``run_server`` plus a ready file.

    .petals-venv/bin/python -m bench.petals_server --ready-file F <petals run_server arguments>

The ready file (JSON: ``maddrs``, ``pid``, ``blocks``) is written once the server's blocks are loaded and
serving. Standard library and petals only: nothing of the project besides the shim is imported.
"""

from __future__ import annotations

import json
import os
import sys

from bench.petals_shim import install


def main() -> None:
    argv = sys.argv[1:]
    i = argv.index("--ready-file")
    ready_file = argv[i + 1]
    del argv[i:i + 2]
    install()
    import petals.cli.run_server as run_server
    import petals.server.server as server

    original = server.ModuleContainer.create

    def create(*args, **kwargs):
        container = original(*args, **kwargs)   # returns once its runtime is ready
        dht = kwargs["dht"]
        ready = {"maddrs": [str(a) for a in dht.get_visible_maddrs()], "pid": os.getpid(),
                 "blocks": list(kwargs["block_indices"])}
        with open(ready_file + ".tmp", "w") as f:
            json.dump(ready, f)
        os.replace(ready_file + ".tmp", ready_file)
        return container

    server.ModuleContainer.create = create
    run_server.validate_version = lambda: None       # no version check against PyPI
    sys.argv = ["petals.cli.run_server", *argv]
    run_server.main()


if __name__ == "__main__":
    main()
