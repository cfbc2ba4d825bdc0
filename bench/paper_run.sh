#!/usr/bin/env bash
# The paper run behind docs/figures/: every workload (a)-(h) at a 60 MB/s + 20 ms client link (node links the
# same), placements hpc, centralized, petals, swarm, hybrid where each applies (bench/cli.py PLACEMENTS_OF),
# N measured repetitions + WARMUP warm-ups per point, then the figures and summary.md.
#
#   bench/paper_run.sh                                   # defaults below; .venv, results/paper-<date>/
#   PY=/path/to/python RUN_ID=paper-x N=5 bench/paper_run.sh
#   SIZES_LARGE= bench/paper_run.sh                      # skip the 500M and 1B models
#
# Three invocations append to one run directory: the SmolLM2 workloads first (the headline numbers), then the
# size workloads on the small synthetic models, then on the large ones -- so a run cut short still has its
# headline. The petals rows need .petals-venv (`make petals-env`); without it they are skipped with a message.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
RUN_ID=${RUN_ID:-paper-$(date -u +%Y%m%d-%H%M)}
N=${N:-5}
WARMUP=${WARMUP:-1}
LINK=${LINK:-60MB/s,20ms}
USERS=${USERS:-1,2,4}
SIZES_SMALL=${SIZES_SMALL:-llama-10m,llama-40m,llama-150m}
SIZES_LARGE=${SIZES_LARGE-llama-500m,llama-1b}   # ~4 min each on a 2-core box at n=5
FIGURES=${FIGURES:-docs/figures}

run() { "$PY" -m plots.cli run --suite paper --link "$LINK" -n "$N" --warmup "$WARMUP" --run-id "$RUN_ID" "$@"; }

run --workload remote_inference,patching,ioi_patching,logit_lens,steering_generation,concurrency,attribution_patching \
    --users "$USERS"
run --workload setup_time,patching_vs_size --sizes "$SIZES_SMALL"
if [ -n "$SIZES_LARGE" ]; then
    run --workload setup_time,patching_vs_size --sizes "$SIZES_LARGE"
fi
"$PY" -m plots.cli plot "results/$RUN_ID" --out "$FIGURES"
