# The evaluation settings of the SmolLM2 table (sourced by smollm2_table.sh and smollm2_long_retrofit.sh, so
# every DMS model and baseline is measured with the same windows, prompts and probes). Reasoning: 200
# basic_arithmetic problems, each after 48 solved examples (~1,500-token prompts, so the 64-token DMS window
# holds a small part of them: issue 16 item 5).
TABLE_EVAL="python3 -m dms_flex.eval --device cuda --dtype bfloat16 --ppl-windows 4 --ppl-len 1024 --ppl-prefix 64
    --batch-size 16 --dms-calibrate --cr 2,4,8 --reasoning-n 200 --reasoning-shots 48 --lengths 1024,2048,4096
    --depths 0.1,0.5,0.9 --trials 2"
