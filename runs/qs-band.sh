#!/bin/bash
# rule 4911436 (c): the quickstart afresh with band_edges: inside (the working tree's default), then
# docs/sweep.md's FSDD sweeps and adapt runs on its student
set -u
Q=/tmp/qsb; rm -rf $Q; mkdir -p $Q; cd $Q
OF=/work/main/.venv/bin/ofactl
/usr/bin/time -f "quickstart %e s" $OF quickstart --out qs --json > qs.json 2> qs.log
F='/work/shared/data/fsdd/recordings::{label}_{speaker}_{take}'
$OF sweep --ckpt qs=qs/distill/student.pt --corpus "$F" --task ks --rates 1,0.5,0.33,0.25 --out sw_fsdd_ks --store fsdd.zarr --quiet
$OF sweep --ckpt qs=qs/distill/student.pt --corpus "$F" --task sid --rates 1,0.5,0.33,0.25 --out sw_fsdd_sid --store fsdd.zarr --quiet
$OF adapt --task ks --ckpt qs/distill/student.pt --corpus "$F" --out ad_fsdd_ks --compare-sweep sw_fsdd_ks --quiet
$OF adapt --task sid --ckpt qs/distill/student.pt --corpus "$F" --out ad_fsdd_sid --compare-sweep sw_fsdd_sid --quiet
echo done > $Q/DONE
