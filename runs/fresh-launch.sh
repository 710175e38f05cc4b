#!/bin/bash
# rule 4862153: lambda_loss metric on fresh seeds 3, 4 and seed 2
cd /work/main
export OMP_NUM_THREADS=1
P=".venv/bin/python benchmarks/ablation.py --corpus data/synth-tiny --variants ofactl --adapt difference --no-adaptive-sweeps"
F="--out runs/ablation-hubert-tiny-v3-nomel-fresh --tasks pr,ks,sid,ks-fsdd,sid-large"
M="--adapt-set lambda_loss=metric"
( $P $F --seeds 3 > runs/fresh-s3.json 2> runs/fresh-s3.log; echo "s3 rc=$? $(date)" >> runs/fresh.times
  $P $F --seeds 3 $M > runs/fresh-s3m.json 2> runs/fresh-s3m.log; echo "s3m rc=$? $(date)" >> runs/fresh.times
  $P --out runs/ablation-hubert-tiny-v3-nomel-3seeds --seeds 2 $M > runs/fresh-s2m.json 2> runs/fresh-s2m.log; echo "s2m rc=$? $(date)" >> runs/fresh.times ) &
( $P $F --seeds 4 > runs/fresh-s4.json 2> runs/fresh-s4.log; echo "s4 rc=$? $(date)" >> runs/fresh.times
  $P $F --seeds 4 $M > runs/fresh-s4m.json 2> runs/fresh-s4m.log; echo "s4m rc=$? $(date)" >> runs/fresh.times
  $P --out runs/ablation-hubert-tiny-v3-nomel-sid-large --tasks sid-large --seeds 2 $M > runs/fresh-s2lm.json 2> runs/fresh-s2lm.log; echo "s2lm rc=$? $(date)" >> runs/fresh.times ) &
wait
$P $F --seeds 3,4 --report > runs/fresh-report.json 2> runs/fresh-report.log
$P $F --seeds 3,4 $M --report > runs/fresh-report-m.json 2> runs/fresh-report-m.log
echo "all rc=$? $(date)" >> runs/fresh.times
