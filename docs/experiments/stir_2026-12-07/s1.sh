#!/bin/bash
# stream 1: the STIR library, then the one test run of STIR mode with its ablations (pre-committed:
# STIR mode at the preset's values, whatever validation says)
source /work/exp/stir/common.sh
offline stir $C || exit 1
run esm-eval $C $TEST 'eval.methods=[greedy,esm]' 'eval.ablations=[no_memory,no_probing,static]' \
  eval.artifact_run_dir=$R/stir/r1 outputs.run_name=test outputs.run_id=stir
