#!/usr/bin/env bash
# Wait until /tmp/O/$UNTIL exists (default DONE; at most WAIT seconds, default 560), then pack /tmp/O into
# $OUT/$TAG.tgz: one file comes back, whatever the chain wrote (calls return at most 8 files).
UNTIL=${UNTIL:-DONE}; WAIT=${WAIT:-560}; TAG=${TAG:-out}
t=0
while [ ! -f "/tmp/O/$UNTIL" ] && [ "$t" -lt "$WAIT" ]; do sleep 5; t=$((t + 5)); done
tar czf "$OUT/$TAG.tgz" -C /tmp/O .
ls -la /tmp/O
tail -25 /tmp/O/chain.log 2>/dev/null
