#!/bin/bash
# reading (decides nothing): adapt from init_rate 0.9 with the default band_edges: inside, on the
# students and settings of runs/ablation-band-inside (seeds 0 and 6), against the committed sweeps
export OMP_NUM_THREADS=1
R=/work/main/runs/ablation-band-inside
O=/work/main/runs/start09
one() {  # seed task-unit
  s=$1; u=$2; out=$O/$u-s$s
  [ -f $out/summary.json ] && return
  /work/main/.venv/bin/ofactl adapt --ckpt $R/students/ofactl-s$s/student.pt --corpus /work/main/data/synth-tiny/manifest.tsv \
    -c $R/adapt/$u-difference-band_edges-inside-s$s/config.yaml --set init_rate=0.9 --compare-sweep $R/sweeps/ofactl-s$s-$u \
    --out $out --quiet >> $O/s$s.log 2>&1
  echo "s$s $u rc=$? $(date)" >> $O/times
}
for s in 0 6; do (for u in sid pr-conv ks; do one $s $u; done) & done
wait
echo "all $(date)" >> $O/times
