#!/bin/bash
# rule 4911436: adapt with band_edges=inside on the eight ofactl students (seeds 0-7), every task
cd /work/wt-band
export OMP_NUM_THREADS=1 PYTHONPATH=/work/wt-band
P="/work/main/.venv/bin/python benchmarks/ablation.py --corpus /work/main/data/synth-tiny --adapt difference --no-adaptive-sweeps --out /work/main/runs/ablation-band-inside"
O="--variants ofactl --tasks pr,ks,sid,ks-fsdd,sid-large,sid-fsdd --adapt-set band_edges=inside"
L=/work/main/runs
date >> $L/band.times
( for s in 0 2 4 6; do $P $O --seeds $s > $L/band-s$s.json 2> $L/band-s$s.log; echo "s$s rc=$? $(date)" >> $L/band.times; done ) &
( for s in 1 3 5 7; do $P $O --seeds $s > $L/band-s$s.json 2> $L/band-s$s.log; echo "s$s rc=$? $(date)" >> $L/band.times; done ) &
wait
echo "all $(date)" >> $L/band.times
