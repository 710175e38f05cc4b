#!/bin/bash
# rule add107b: seeds 5-7 of the head-off ofactl and fixed-rate students (both targets read on eight seeds)
cd /work/wt-abl
export OMP_NUM_THREADS=1 PYTHONPATH=/work/wt-abl
P="/work/main/.venv/bin/python benchmarks/ablation.py --corpus /work/main/data/synth-tiny --adapt difference --no-adaptive-sweeps --out /work/main/runs/ablation-hubert-tiny-v3-nomel-more"
O="--variants ofactl --tasks pr,ks,sid,ks-fsdd,sid-large"
X="--variants avgpool-0.5,avgpool-0.25,cif-fixed-0.5,cif-fixed-0.25 --tasks pr,ks,sid,ks-fsdd"
L=/work/main/runs
date >> $L/more.times
( $P $O --seeds 5 > $L/more-s5.json 2> $L/more-s5.log; echo "s5 rc=$? $(date)" >> $L/more.times
  $P $X --seeds 5 > $L/more-s5x.json 2> $L/more-s5x.log; echo "s5x rc=$? $(date)" >> $L/more.times
  $P $O --seeds 7 > $L/more-s7.json 2> $L/more-s7.log; echo "s7 rc=$? $(date)" >> $L/more.times ) &
( $P $O --seeds 6 > $L/more-s6.json 2> $L/more-s6.log; echo "s6 rc=$? $(date)" >> $L/more.times
  $P $X --seeds 6 > $L/more-s6x.json 2> $L/more-s6x.log; echo "s6x rc=$? $(date)" >> $L/more.times
  $P $X --seeds 7 > $L/more-s7x.json 2> $L/more-s7x.log; echo "s7x rc=$? $(date)" >> $L/more.times ) &
wait
echo "all $(date)" >> $L/more.times
