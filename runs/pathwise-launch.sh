#!/bin/bash
# rule in docs/ablation.md, "The pathwise gradient with the shipped recipe": adapt with --adapt pathwise on the
# eight students of runs/ablation-band-inside (seeds 0-7), two one-thread processes (even and odd seeds),
# from a worktree of the commit measured.   usage: runs/pathwise-launch.sh WORKTREE
WT=$1 L=/work/main/runs/pathwise
cd "$WT" || exit 1
export OMP_NUM_THREADS=1 PYTHONPATH=$WT
P="/work/main/.venv/bin/python benchmarks/ablation.py --corpus /work/main/data/synth-tiny --adapt pathwise --no-adaptive-sweeps --out /work/main/runs/ablation-band-inside"
O="--variants ofactl --tasks pr,ks,sid,ks-fsdd,sid-large --adapt-set band_edges=inside"
mkdir -p "$L"
date >> "$L/times"
( for s in 0 2 4 6; do $P $O --seeds $s > "$L/s$s.json" 2> "$L/s$s.log"; echo "s$s rc=$? $(date)" >> "$L/times"; done ) &
( for s in 1 3 5 7; do $P $O --seeds $s > "$L/s$s.json" 2> "$L/s$s.log"; echo "s$s rc=$? $(date)" >> "$L/times"; done ) &
wait
echo "all $(date)" >> "$L/times"
