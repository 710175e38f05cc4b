#!/bin/bash
# rule 4911436, seeds 2-7: the same adapt runs the ablation makes (its settings are each clamp run's
# config.yaml; band_edges=inside), through the CLI, against the committed sweeps, so the sweeps are not
# run again (seeds 0 and 1 went through benchmarks/ablation.py and re-swept to the same rows)
cd /work/wt-band
export OMP_NUM_THREADS=1 PYTHONPATH=/work/wt-band
R=/work/main/runs/ablation-band-inside
L=/work/main/runs
corpus() { case $1 in ks-fsdd) echo $R/fsdd-ks.tsv;; sid-fsdd) echo $R/fsdd-sid.tsv;; sid-large) echo $R/synth-sid-large/manifest.tsv;; *) echo /work/main/data/synth-tiny/manifest.tsv;; esac; }
one() {  # seed task-unit
  s=$1; u=$2; out=$R/adapt/$u-difference-band_edges-inside-s$s
  [ -f $out/summary.json ] && return
  /work/main/.venv/bin/ofactl adapt --ckpt $R/students/ofactl-s$s/student.pt --corpus $(corpus $u) \
    -c $R/adapt/$u-difference-s$s/config.yaml --set band_edges=inside --compare-sweep $R/sweeps/ofactl-s$s-$u \
    --out $out --quiet >> $L/band2-s$s.log 2>&1
  echo "s$s $u rc=$? $(date)" >> $L/band.times
}
seeds() { for s in "$@"; do for u in sid pr-conv ks sid-large ks-fsdd sid-fsdd; do one $s $u; done; done; }
date >> $L/band.times
seeds 2 4 6 &
seeds 3 5 7 &
wait
echo "all2 $(date)" >> $L/band.times
