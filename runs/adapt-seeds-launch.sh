#!/bin/bash
# adapt runs on the eight students of runs/ablation-band-inside (seeds 0-7), as two one-thread processes
# (even and odd seeds) from a worktree of the commit measured.
# usage: runs/adapt-seeds-launch.sh WORKTREE TASKS LOGDIR GRADIENT SETTINGS
#   e.g. /work/wt-sf pr,ks,ks-fsdd runs/speakerfolds difference band_edges=inside,lambda_data=crossfit
WT=$1 TASKS=$2 L=/work/main/$3 GRADIENT=$4 SETTINGS=$5
cd "$WT" || exit 1
export OMP_NUM_THREADS=1 PYTHONPATH=$WT
P="/work/main/.venv/bin/python benchmarks/ablation.py --corpus /work/main/data/synth-tiny --adapt $GRADIENT --no-adaptive-sweeps --out /work/main/runs/ablation-band-inside"
O="--variants ofactl --tasks $TASKS"
for kv in ${SETTINGS//,/ }; do O="$O --adapt-set $kv"; done
mkdir -p "$L"
date >> "$L/times"
( for s in 0 2 4 6; do $P $O --seeds $s > "$L/s$s.json" 2> "$L/s$s.log"; echo "s$s rc=$? $(date)" >> "$L/times"; done ) &
( for s in 1 3 5 7; do $P $O --seeds $s > "$L/s$s.json" 2> "$L/s$s.log"; echo "s$s rc=$? $(date)" >> "$L/times"; done ) &
wait
echo "all $(date)" >> "$L/times"
