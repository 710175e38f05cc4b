#!/bin/bash
# rule in docs/ablation.md, "Crossfit with speaker folds": pr, ks and ks-fsdd adapted with lambda_data=crossfit
# (speaker folds) on the eight students of runs/ablation-band-inside (seeds 0-7), two one-thread processes
cd /work/wt-sf
export OMP_NUM_THREADS=1 PYTHONPATH=/work/wt-sf
P="/work/main/.venv/bin/python benchmarks/ablation.py --corpus /work/main/data/synth-tiny --adapt difference --no-adaptive-sweeps --out /work/main/runs/ablation-band-inside"
O="--variants ofactl --tasks pr,ks,ks-fsdd --adapt-set band_edges=inside --adapt-set lambda_data=crossfit"
L=/work/main/runs/speakerfolds
mkdir -p $L
date >> $L/times
( for s in 0 2 4 6; do $P $O --seeds $s > $L/s$s.json 2> $L/s$s.log; echo "s$s rc=$? $(date)" >> $L/times; done ) &
( for s in 1 3 5 7; do $P $O --seeds $s > $L/s$s.json 2> $L/s$s.log; echo "s$s rc=$? $(date)" >> $L/times; done ) &
wait
echo "all $(date)" >> $L/times
