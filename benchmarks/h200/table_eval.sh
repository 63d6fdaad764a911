# The evaluation settings of the SmolLM2 table (sourced by smollm2_table.sh and smollm2_long_retrofit.sh, so
# every DMS model and baseline is measured with the same windows, prompts and probes).
TABLE_EVAL="python3 -m dms_flex.eval --device cuda --dtype bfloat16 --ppl-windows 4 --ppl-len 1024 --ppl-prefix 64
    --batch-size 16 --dms-calibrate --cr 2,4,8 --reasoning-n 64 --lengths 1024,2048,4096 --depths 0.1,0.5,0.9 --trials 2"
