#!/bin/bash
# the fixed-rate students of seeds 3 and 4 beside the fresh OFA students (read afterwards; decides nothing)
cd /work/main
export OMP_NUM_THREADS=1
P=".venv/bin/python benchmarks/ablation.py --corpus data/synth-tiny --adapt difference --no-adaptive-sweeps --out runs/ablation-hubert-tiny-v3-nomel-fresh --tasks pr,ks,sid,ks-fsdd,sid-large"
V="--variants avgpool-0.5,avgpool-0.25,cif-fixed-0.5,cif-fixed-0.25"
( $P $V --seeds 3 > runs/fresh-fixed-s3.json 2> runs/fresh-fixed-s3.log; echo "s3 rc=$? $(date)" >> runs/fresh-fixed.times ) &
( $P $V --seeds 4 > runs/fresh-fixed-s4.json 2> runs/fresh-fixed-s4.log; echo "s4 rc=$? $(date)" >> runs/fresh-fixed.times ) &
wait
$P --variants ofactl,avgpool-0.5,avgpool-0.25,cif-fixed-0.5,cif-fixed-0.25 --seeds 3,4 --report > runs/fresh-fixed-report.json 2> runs/fresh-fixed-report.log
echo "report rc=$? $(date)" >> runs/fresh-fixed.times
