#!/bin/bash
# rule db53a0c: sid-fsdd (speaker ID on FSDD) and pr on the ofactl students of seeds 0-7, distilled again
cd /work/wt-abl
export OMP_NUM_THREADS=1 PYTHONPATH=/work/wt-abl
P="/work/main/.venv/bin/python benchmarks/ablation.py --corpus /work/main/data/synth-tiny --adapt difference --no-adaptive-sweeps --out /work/main/runs/ablation-hubert-tiny-v3-nomel-sid-fsdd"
O="--variants ofactl --tasks pr,sid-fsdd"
L=/work/main/runs
date >> $L/sid-fsdd.times
( for s in 0 2 4 6; do $P $O --seeds $s > $L/sid-fsdd-s$s.json 2> $L/sid-fsdd-s$s.log; echo "s$s rc=$? $(date)" >> $L/sid-fsdd.times; done ) &
( for s in 1 3 5 7; do $P $O --seeds $s > $L/sid-fsdd-s$s.json 2> $L/sid-fsdd-s$s.log; echo "s$s rc=$? $(date)" >> $L/sid-fsdd.times; done ) &
wait
echo "all $(date)" >> $L/sid-fsdd.times
