#!/bin/bash
# stream 2: seed-ESM's library, validation (STIR mode, seed-ESM, each mechanism switched back), test seed-ESM
source /work/exp/stir/common.sh
offline seed $S || exit 1
until [ -e $R/stir/r1/memory ] && grep -q "esm-memory $C" $LOG; do sleep 20; done
A=eval.artifact_run_dir
run esm-eval $C $VAL 'eval.methods=[greedy,esm]' $A=$R/stir/r1 outputs.run_name=val outputs.run_id=stir
run esm-eval $S $VAL 'eval.methods=[greedy,esm]' $A=$R/seed/r1 outputs.run_name=val outputs.run_id=seed
# mechanism 1, 4a: online switches on the STIR library
run esm-eval $C $VAL 'eval.methods=[esm]' $A=$R/stir/r1 online.inject=segment outputs.run_name=val outputs.run_id=inject_segment
run esm-eval $C $VAL 'eval.methods=[esm]' $A=$R/stir/r1 online.retrieve_same_m=false outputs.run_name=val outputs.run_id=all_m
# mechanism 2, 4b: the memory rebuilt from the STIR library
for v in "anchors0 offline_memory.null_anchors=false online.null_score=zero" "centered offline_memory.center_keys=true"; do
  set -- $v; n=$1; shift
  mkdir -p $R/$n/r1 && cp -r $R/stir/r1/mine $R/stir/r1/library $R/$n/r1/
  run esm-memory $C "$@" outputs.run_name=$n outputs.run_id=r1
  run esm-eval $C $VAL 'eval.methods=[esm]' $A=$R/$n/r1 "$@" outputs.run_name=val outputs.run_id=$n
done
# mechanism 3, 5: mined again
offline segmean $C offline_mine.vector=segment_mean
run esm-eval $C $VAL 'eval.methods=[esm]' $A=$R/segmean/r1 offline_mine.vector=segment_mean outputs.run_name=val outputs.run_id=segmean
offline m0 $C control_points.first_m=0
run esm-eval $C $VAL 'eval.methods=[esm]' $A=$R/m0/r1 control_points.first_m=0 outputs.run_name=val outputs.run_id=first_m0
run esm-eval $S $TEST 'eval.methods=[esm]' 'eval.ablations=[]' $A=$R/seed/r1 outputs.run_name=test outputs.run_id=seed
