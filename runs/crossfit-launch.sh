#!/bin/bash
# rule in docs/ablation.md, "Lambda read from held-out folds of train and dev": pr and sid adapted with
# lambda_data=crossfit on the eight students of runs/ablation-band-inside (seeds 0-7), two one-thread processes
exec "$(dirname "$0")/adapt-seeds-launch.sh" /work/wt-cf pr,sid runs/crossfit difference band_edges=inside,lambda_data=crossfit
