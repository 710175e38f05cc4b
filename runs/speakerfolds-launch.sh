#!/bin/bash
# rule in docs/ablation.md, "Crossfit with speaker folds": pr, ks and ks-fsdd adapted with lambda_data=crossfit
# (speaker folds) on the eight students of runs/ablation-band-inside (seeds 0-7), two one-thread processes
exec "$(dirname "$0")/adapt-seeds-launch.sh" /work/wt-sf pr,ks,ks-fsdd runs/speakerfolds difference band_edges=inside,lambda_data=crossfit
