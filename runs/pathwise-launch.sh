#!/bin/bash
# rule in docs/ablation.md, "The pathwise gradient with the shipped recipe": adapt with --adapt pathwise on the
# eight students of runs/ablation-band-inside (seeds 0-7).   usage: runs/pathwise-launch.sh WORKTREE
exec "$(dirname "$0")/adapt-seeds-launch.sh" "$1" pr,ks,sid,ks-fsdd,sid-large runs/pathwise pathwise band_edges=inside
