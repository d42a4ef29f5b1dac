# shared by the STIR experiment scripts (docs/results.md §11)
export PYTHONPATH=/work/exp/wt/src
export PATH=/work/main/.venv/bin:$PATH
R=/work/exp/stir/outputs
LOG=/work/exp/stir/commands.txt
SIZES="seed=4242 task.max_train_examples=200 control_points.M=3 offline_mine.max_new_tokens=48 decode.max_new_tokens=48 outputs.root_dir=$R model.num_threads=1"
C="experiment=stir_debug offline_select.B=256 $SIZES"
# seed-ESM was the default on 2026-12-07; since the STIR-mode default (docs/results.md §13) it is mode=seed
S="mode=seed experiment=debug task=arith_steps prompt=arith_steps_3shot offline_select.B=24 $SIZES"
VAL="eval.split=val task.max_eval_examples=300 eval.ablations=[]"
TEST="eval.split=test task.max_eval_examples=1000"
run() {  # run a command, append it with start, end, wall and rc to the command log
  local t0=$(date +%s) s=$(date -u +%H:%M:%S)
  "$@" > /work/exp/stir/logs/$(date +%s%N).log 2>&1; local rc=$?
  echo "[$s -> $(date -u +%H:%M:%S), $(( $(date +%s) - t0 )) s, rc=$rc] $*" >> $LOG
  return $rc
}
offline() {  # name, overrides...: mine, select, memory into $R/<name>/r1
  local n=$1; shift
  for st in mine select memory; do run esm-$st "$@" outputs.run_name=$n outputs.run_id=r1 || return 1; done
}
